"""The compiled plain-call path (fastbn._bn_cpu.plain_*) against the checked Python path.

fastbn._api sends plain calls (NumPy arrays, C-contiguous data, float32/float64 (C,)
parameters, float momentum/eps, an out= the kernels can write directly; fused ReLU and
residual included) to compiled functions that must accept nothing the Python checks
reject, give the same bits, and hand anything else back (None) to the Python path.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbn as fbn
from fastbn import _api, _bn_cpu


def _general(monkeypatch):
    monkeypatch.setattr(_api, "_PLAIN_CALLS", False)


def _same(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
        return
    assert type(a) is type(b) is np.ndarray
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _no_python_path(*args, **kwargs):
    raise AssertionError("a plain call took the Python path")


@pytest.fixture
def plain_only(monkeypatch):
    """Fail any call that reaches the Python path's dispatch."""
    monkeypatch.setattr(_api, "backend_for", _no_python_path)


@pytest.fixture
def python_only(monkeypatch):
    """Fail any call that reaches a compiled plain function."""
    for name in ("plain_train", "plain_inference", "plain_backward", "plain_welford",
                 "plain_moments"):
        monkeypatch.setattr(_bn_cpu, name, _no_python_path)


@st.composite
def plain_case(draw):
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    axis = draw(st.sampled_from([1, -1, 0, ndim - 1, -ndim]))
    if np.prod(shape) // shape[axis] < 2:  # training needs 2+ values per channel: grow
        grow = 0 if axis % ndim != 0 else 1  # a dimension other than the channel axis
        shape = shape[:grow] + (shape[grow] + 1,) + shape[grow + 1:]
    param = st.sampled_from([None, np.float32, np.float64])
    return dict(dtype=dtype, shape=shape, axis=axis, weight=draw(param), bias=draw(param),
                activation=draw(st.sampled_from([None, "relu"])), residual=draw(st.booleans()),
                residual_grad=draw(st.booleans()),
                running=draw(st.sampled_from([None, np.float32, np.float64])),
                momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.37])),
                eps=draw(st.sampled_from([1e-5, 0.0, 1e-3])), seed=draw(st.integers(0, 2**16)))


def _arrays(case):
    rng = np.random.default_rng(case["seed"])
    x = (rng.standard_normal(case["shape"]) * 3 + 1).astype(case["dtype"])
    dy = rng.standard_normal(case["shape"]).astype(case["dtype"])
    C = case["shape"][case["axis"]]

    def param(dt, low=0.0):
        return None if dt is None else (rng.random(C) + low).astype(dt)

    return x, dy, C, param(case["weight"], 0.5), param(case["bias"]), rng


@settings(max_examples=120, deadline=None)
@given(plain_case())
def test_plain_calls_give_the_bits_of_the_python_path(case):
    x, dy, C, w, b, rng = _arrays(case)
    axis, momentum, eps = case["axis"], case["momentum"], case["eps"]
    fused = dict(activation=case["activation"],
                 residual=(rng.standard_normal(x.shape).astype(x.dtype) if case["residual"]
                           else None))
    rdt = case["running"]
    rm0 = None if rdt is None else rng.standard_normal(C).astype(rdt)
    rv0 = None if rdt is None else rng.random(C).astype(rdt)
    copy = (lambda a: None if a is None else a.copy())
    def calls(rm, rv):
        out = [fbn.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps,
                              axis=axis, **fused),
               fbn.batch_norm_forward(x, w, b, rm, rv, momentum=momentum, eps=eps, axis=axis,
                                      **fused)]
        y, mean, invstd = out[1]
        if rdt is not None:
            out.append(fbn.batch_norm(x, rm, rv, w, b, momentum=momentum, eps=eps, axis=axis,
                                      **fused))
        relu = dict(activation="relu", y=y) if case["activation"] else {}
        for training in (True, False):
            out.append(fbn.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                               axis=axis, **relu,
                                               return_residual_grad=case["residual_grad"]))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_api, "backend_for", _no_python_path)
        rm1, rv1 = copy(rm0), copy(rv0)
        plain = calls(rm1, rv1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_api, "_PLAIN_CALLS", False)
        rm2, rv2 = copy(rm0), copy(rv0)
        general = calls(rm2, rv2)
    for p, g in zip(plain, general):
        _same(p, g)
    if rdt is not None:
        _same(rm1, rm2)
        _same(rv1, rv2)


@settings(max_examples=80, deadline=None)
@given(plain_case(), st.sampled_from([0, 1, -1, 3, "count - 1", "count", "count + 1", 2**60]))
def test_statistics_take_the_plain_path_with_the_bits_of_the_python_path(case, ddof):
    x, _, C, _, _, _ = _arrays(case)
    count = x.size // C
    ddof = {"count - 1": count - 1, "count": count, "count + 1": count + 1}.get(ddof, ddof)
    runs = []
    for plain in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if plain:
                mp.setattr(_api, "backend_for", _no_python_path)
                mp.setattr(_api, "backend_name_for", _no_python_path)
            else:
                mp.setattr(_api, "_PLAIN_CALLS", False)
            if plain and abs(ddof) >= 2**52:  # handed back: not exact as a double
                assert _bn_cpu.plain_moments(x, case["axis"], ddof) is None
                mp.undo()
            m = fbn.welford(x, case["axis"])
            runs.append((fbn.moments(x, case["axis"], ddof=ddof), m.count, m.mean, m.m2))
    (plain, *pw), (general, *gw) = runs
    _same(plain, general)
    assert pw[0] == gw[0] == count
    _same(pw[1], gw[1])
    _same(pw[2], gw[2])


@pytest.mark.parametrize("ddof, error", [(True, None), (np.int64(1), None), (1.0, TypeError),
                                         ("1", TypeError)])
def test_ddof_the_plain_path_does_not_take_is_handed_back(ddof, error):
    x, _, C = _base()
    assert _bn_cpu.plain_moments(x, 1, ddof) is None
    if error:
        with pytest.raises(error, match="ddof must be an int"):
            fbn.moments(x, ddof=ddof)
    else:
        _same(fbn.moments(x, ddof=ddof), fbn.moments(x, ddof=1))


def _out_calls(case, where, x, dy, y, rm, rv, w, b, residual):
    """Each public call with out=: a new array, or in place (x for the forwards, dy for the
    backward). x and dy are the caller's copies, which an in-place call overwrites ->
    [(result, out)] in call order."""
    axis, momentum, eps = case["axis"], case["momentum"], case["eps"]
    fused = dict(activation=case["activation"], residual=residual)
    results = []

    def target(a):
        return a if where == "in place" else np.empty_like(a)

    xs = [x.copy() for _ in range(3)]
    out = target(xs[0])
    results.append((fbn.batch_norm(xs[0], rm, rv, w, b, training=True, momentum=momentum,
                                   eps=eps, axis=axis, out=out, **fused), out))
    out = target(xs[1])
    results.append((fbn.batch_norm_forward(xs[1], w, b, rm, rv, momentum=momentum, eps=eps,
                                           axis=axis, out=out, **fused), out))
    if rm is not None:
        out = target(xs[2])
        results.append((fbn.batch_norm(xs[2], rm, rv, w, b, momentum=momentum, eps=eps,
                                       axis=axis, out=out, **fused), out))
    _, mean, invstd = fbn.batch_norm_forward(x, w, b, axis=axis, **fused)
    relu = dict(activation="relu", y=y) if case["activation"] else {}
    for training in (True, False):
        g = dy.copy()
        out = target(g)
        results.append((fbn.batch_norm_backward(g, x, mean, invstd, w, training=training,
                                                axis=axis, out=out, **relu,
                                                return_residual_grad=case["residual_grad"]),
                        out))
    return results


@settings(max_examples=80, deadline=None)
@given(plain_case(), st.sampled_from(["new", "in place"]))
def test_out_takes_the_plain_path_with_the_bits_of_the_python_path(case, where):
    # out= that the kernels write directly (a C-contiguous array apart from the inputs, or
    # the input itself) is a plain call: the same bits, out returned, nothing else written
    x, dy, C, w, b, rng = _arrays(case)
    residual = rng.standard_normal(x.shape).astype(x.dtype) if case["residual"] else None
    rdt = case["running"]
    rm0 = None if rdt is None else rng.standard_normal(C).astype(rdt)
    rv0 = None if rdt is None else rng.random(C).astype(rdt)
    y = fbn.batch_norm_forward(x, w, b, axis=case["axis"], activation=case["activation"],
                               residual=residual)[0]
    inputs = [a.copy() for a in (x, dy, y) + ((residual,) if residual is not None else ())]
    runs = []
    for plain in (True, False):
        rm = None if rm0 is None else rm0.copy()
        rv = None if rv0 is None else rv0.copy()
        with pytest.MonkeyPatch.context() as mp:
            if plain:
                mp.setattr(_api, "backend_for", _no_python_path)
            else:
                mp.setattr(_api, "_PLAIN_CALLS", False)
            runs.append((_out_calls(case, where, x, dy, y, rm, rv, w, b, residual), rm, rv))
    (plain, rm1, rv1), (general, rm2, rv2) = runs
    for (p, p_out), (g, g_out) in zip(plain, general):
        _same(p, g)
        assert (p[0] if isinstance(p, tuple) else p) is p_out
        _same(p_out, g_out)
    if rdt is not None:
        _same(rm1, rm2)
        _same(rv1, rv2)
    for a, b0 in zip((x, dy, y) + ((residual,) if residual is not None else ()), inputs):
        _same(a, b0)  # the calls' own copies took the in-place writes


@pytest.mark.parametrize("kind", ["overlapping x", "non-contiguous", "read-only",
                                  "other dtype", "other shape", "a list"])
def test_out_the_kernels_cannot_write_is_handed_back(kind):
    x, dy, C = _base()
    mean, invstd = np.zeros(C, np.float32), np.ones(C, np.float32)
    n = x.size
    if kind == "overlapping x":  # one element off x: the Python path stages it
        block = np.random.default_rng(4).standard_normal(n + 1).astype(np.float32)
        x = block[:n].reshape(x.shape)
        out = block[1:].reshape(x.shape)
    elif kind == "non-contiguous":
        out = np.empty(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)[..., ::2]
    elif kind == "read-only":
        out = np.empty_like(x)
        out.flags.writeable = False
    elif kind == "other dtype":
        out = np.empty(x.shape, np.float64)
    elif kind == "other shape":
        out = np.empty(x.shape[::-1], x.dtype)
    else:
        out = np.zeros(x.shape).tolist()
    forward_args = (x, None, None, None, None, 0.1, 1e-5, 1, None, None)
    assert _bn_cpu.plain_train(*forward_args, True, out) is None
    assert _bn_cpu.plain_inference(x, mean, invstd, None, None, 0.1, 1e-5, 1, None, None,
                                   out) is None
    assert _bn_cpu.plain_backward(dy, x, mean, invstd, None, True, 1, None, None, False,
                                  out) is None
    if kind in ("overlapping x", "non-contiguous"):  # staged by the Python path: its bits
        expected = fbn.batch_norm_forward(x.copy())
        result = fbn.batch_norm_forward(x, out=out)
        assert result[0] is out
        _same(np.ascontiguousarray(out), expected[0])
        _same(result[1:], expected[1:])
    else:
        error = {"read-only": (ValueError, "out is read-only"),
                 "other dtype": (TypeError, "out must have dtype"),
                 "other shape": (ValueError, "out must have shape"),
                 "a list": (TypeError, "out must be a numpy.ndarray")}[kind]
        with pytest.raises(error[0], match=error[1]):
            fbn.batch_norm_forward(x, out=out)
        with pytest.raises(error[0], match=error[1]):
            fbn.batch_norm_backward(dy, x, mean, invstd, out=out)


def test_non_finite_data_takes_the_plain_path_with_the_same_bits(monkeypatch):
    x = np.random.default_rng(3).standard_normal((6, 4, 9)).astype(np.float32)
    x[0, 1, 2] = np.nan
    x[3, 2, :] = np.inf
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    monkeypatch.setattr(_api, "backend_for", _no_python_path)
    plain = fbn.batch_norm_forward(x, None, None, rm, rv)
    monkeypatch.undo()
    monkeypatch.setattr(_api, "_PLAIN_CALLS", False)
    rm2, rv2 = np.zeros(4, np.float32), np.ones(4, np.float32)
    _same(plain, fbn.batch_norm_forward(x, None, None, rm2, rv2))
    _same(rm, rm2)
    _same(rv, rv2)


def _base(n=6, C=4, inner=5, dtype=np.float32):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, C, inner)).astype(dtype)
    return x, rng.standard_normal(x.shape).astype(dtype), C


# Arguments fastbn accepts but the plain functions hand back to the Python path.
HANDED_BACK = {
    "non-contiguous x": lambda x, C: dict(x=x[:, :, ::2]),
    "Fortran-ordered x": lambda x, C: dict(x=np.asfortranarray(x)),
    "x a list": lambda x, C: dict(x=x.tolist()),
    "weight a list": lambda x, C: dict(weight=[1.5] * C),
    "weight float16": lambda x, C: dict(weight=np.full(C, 1.5, np.float16)),
    "weight strided": lambda x, C: dict(weight=np.full(2 * C, 1.5)[::2]),
    "momentum an int": lambda x, C: dict(momentum=1),
    "momentum a NumPy float": lambda x, C: dict(momentum=np.float64(0.2)),
    "eps a NumPy float32": lambda x, C: dict(eps=np.float32(1e-3)),
    "axis a NumPy int": lambda x, C: dict(axis=np.int64(1)),
    "axis True": lambda x, C: dict(axis=True),
    "running float16": lambda x, C: dict(running_mean=np.zeros(C, np.float16),
                                         running_var=np.ones(C, np.float16)),
    "running of two dtypes": lambda x, C: dict(running_mean=np.zeros(C, np.float32),
                                               running_var=np.ones(C)),
    "running strided": lambda x, C: dict(running_mean=np.zeros(2 * C, np.float32)[::2],
                                         running_var=np.ones(2 * C, np.float32)[::2]),
    "running one array": lambda x, C: dict(running_var="running_mean"),
}


@pytest.mark.parametrize("name", list(HANDED_BACK))
def test_other_arguments_are_handed_back_and_still_work(name):
    x, _, C = _base()
    args = dict(x=x, weight=np.full(C, 1.5, np.float32), bias=np.zeros(C),
                running_mean=np.zeros(C, np.float32), running_var=np.ones(C, np.float32),
                momentum=0.1, eps=1e-5, axis=1, activation=None, residual=None)
    args.update(HANDED_BACK[name](x, C))
    if isinstance(args["running_var"], str):
        args["running_var"] = args["running_mean"]
    assert _bn_cpu.plain_train(statistics=False, **args) is None
    # inference only reads the running statistics: those plain there are fine
    assert _bn_cpu.plain_inference(**args) is None or name in ("running of two dtypes",
                                                               "running one array")
    y = fbn.batch_norm(training=True, **args)
    assert np.shape(y) == np.shape(args["x"]) and np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize("x", [np.ones((4, 3, 2), ">f4"), np.ma.ones((4, 3, 2), np.float32)],
                         ids=["byte-swapped", "masked"])
def test_arrays_fastbn_refuses_are_handed_back(x):
    assert _bn_cpu.plain_train(x, None, None, None, None, 0.1, 1e-5, 1, None, None, False) is None
    assert _bn_cpu.plain_backward(x, x, np.zeros(3), np.ones(3), None, True, 1, None, None,
                                  False) is None
    with pytest.raises(TypeError, match="x must be a floating array|does not accept"):
        fbn.batch_norm(x, training=True)


def test_read_only_running_statistics_are_handed_back_and_refused():
    x, _, C = _base()
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    rv.flags.writeable = False
    assert _bn_cpu.plain_train(x, None, None, rm, rv, 0.1, 1e-5, 1, None, None, False) is None
    with pytest.raises(ValueError, match="running_var is read-only"):
        fbn.batch_norm(x, rm, rv, training=True)
    assert not rm.any()
    # inference only reads them: plain
    assert _bn_cpu.plain_inference(x, rm, rv, None, None, 0.1, 1e-5, 1, None, None) is not None


def test_backend_forced_by_environment_is_honoured(python_only, monkeypatch):
    x, dy, C = _base()
    monkeypatch.setenv("FASTBN_BACKEND", "reference")
    y, mean, invstd = fbn.batch_norm_forward(x)
    fbn.batch_norm(x, training=True)
    fbn.batch_norm_backward(dy, x, mean, invstd)
    assert fbn.get_backend(x) == "reference"


@pytest.mark.parametrize("call", ["train", "infer", "forward", "backward", "moments",
                                  "welford"])
def test_plain_calls_skip_the_python_checks(call, plain_only, monkeypatch):
    x, dy, C = _base(dtype=np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    monkeypatch.setattr(_api, "backend_name_for", _no_python_path)
    if call in ("moments", "welford"):
        if call == "moments":
            mean, var = fbn.moments(x, ddof=1)
        else:
            m = fbn.welford(x)
            mean, var = m.mean, m.var(ddof=1)
        assert mean.shape == var.shape == (C,) and mean.dtype == var.dtype == np.float64
        return
    if call == "train":
        y = fbn.batch_norm(x, rm, rv, training=True)
        assert rm.any()
    elif call == "infer":
        y = fbn.batch_norm(x, rm, rv, np.ones(C, np.float32), np.zeros(C, np.float32))
    elif call == "forward":
        y, mean, invstd = fbn.batch_norm_forward(x, momentum=0.5, eps=0.0)
        assert mean.dtype == invstd.dtype == np.float64
    else:
        _, mean, invstd = _bn_cpu.plain_train(x, None, None, None, None, 0.1, 1e-5, 1, None, None,
                                              True)
        y, dw, db = fbn.batch_norm_backward(dy, x, mean, invstd)
        assert dw.shape == db.shape == (C,)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("bad, error, match", [
    (dict(eps=-1e-5), ValueError, "eps must be a finite number >= 0"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number"),
    (dict(momentum=float("inf")), ValueError, "momentum must be a finite number"),
    (dict(axis=3), ValueError, "out of bounds"),
    (dict(weight=np.ones(3, np.float32)), ValueError, "weight must have shape"),
    (dict(bias=np.ones((4, 1), np.float32)), ValueError, "bias must have shape"),
    (dict(running_var=None), ValueError, "both be None or neither"),
    (dict(running_var=np.ones(4, np.float32)[::-1].copy().reshape(2, 2)), ValueError,
     "running_var must have shape"),
    (dict(x=np.ones((1, 4, 1), np.float32)), ValueError, "more than 1 value per channel"),
    (dict(x=np.ones((3, 4, 2), np.int32)), TypeError, "x must be a floating array"),
])
def test_bad_plain_looking_arguments_get_the_python_errors(bad, error, match):
    x, _, C = _base()
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    args = dict(x=x, running_mean=rm, running_var=rv, weight=None, bias=None, momentum=0.1,
                eps=1e-5, axis=1)
    args.update(bad)
    before = (args["running_mean"], args["running_var"])
    before = [None if a is None else a.copy() for a in before]
    with pytest.raises(error, match=match):
        fbn.batch_norm(training=True, **args)
    for a, b in zip((args["running_mean"], args["running_var"]), before):
        if a is not None:
            _same(a, b)


def test_backward_arguments_the_plain_path_hands_back():
    x, dy, C = _base()
    mean, invstd = np.zeros(C, np.float32), np.ones(C, np.float32)
    handed_back = [
        (dy, x, mean, invstd, None, 1, 1),  # truthy training, not True
        (dy, x, mean, invstd, np.ones(C, np.float16), True, 1),
        (dy, x, mean.tolist(), invstd, None, True, 1),
        (dy.astype(np.float64), x, mean, invstd, None, True, 1),
        (dy[:, :, :2].copy(), x, mean, invstd, None, True, 1),
        (dy[:1, :, :1].copy(), x[:1, :, :1].copy(), mean, invstd, None, True, 1),
        (dy, x, None, invstd, None, True, 1),
    ]
    for args in handed_back:
        assert _bn_cpu.plain_backward(*args, None, None, False) is None
    fbn.batch_norm_backward(dy, x, mean, invstd, training=1)
    fbn.batch_norm_backward(dy, x, mean, invstd, weight=np.ones(C, np.float16))
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        fbn.batch_norm_backward(dy.astype(np.float64), x, mean, invstd)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        fbn.batch_norm_backward(dy[:, :, :2].copy(), x, mean, invstd)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fbn.batch_norm_backward(dy[:1, :, :1].copy(), x[:1, :, :1].copy(), mean, invstd)
    # frozen statistics need no second value per channel: plain
    assert _bn_cpu.plain_backward(dy[:1, :, :1].copy(), x[:1, :, :1].copy(), mean, invstd,
                                  None, False, 1, None, None, False) is not None


def test_thread_count_reaches_the_plain_path():
    x = np.random.default_rng(1).standard_normal((64, 8, 1024)).astype(np.float32)
    n = fbn.get_num_threads()
    try:
        fbn.set_num_threads(1)
        assert _bn_cpu.threads_for(x.size) == 1 and fbn.get_num_threads() == 1
        y1 = fbn.batch_norm(x, training=True)
        fbn.set_num_threads(3)
        assert _bn_cpu.threads_for(x.size) == 3 and _bn_cpu.threads_for(100) == 1
        y3 = fbn.batch_norm(x, training=True)
    finally:
        fbn.set_num_threads(None)
    assert fbn.get_num_threads() == n
    _same(y1, y3)


def test_inference_arguments_the_plain_path_hands_back():
    x, _, C = _base()
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    for args in [(x, None, rv), (x, rm, None), (x, rm, rv.tolist()), (x, rm, np.ones(C + 1))]:
        assert _bn_cpu.plain_inference(*args, None, None, 0.1, 1e-5, 1, None, None) is None
    with pytest.raises(ValueError, match="must be defined in evaluation mode"):
        fbn.batch_norm(x, None, rv)
    with pytest.raises(ValueError, match="running_var must have shape"):
        fbn.batch_norm(x, rm, np.ones(C + 1))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        fbn.batch_norm(x, rm, rv, eps=-1.0)


def test_fused_arguments_the_plain_path_hands_back():
    x, dy, C = _base()
    y = fbn.batch_norm(x, training=True, activation="relu")
    mean, invstd = np.zeros(C, np.float32), np.ones(C, np.float32)
    for activation, residual in [("ReLU", None), ("gelu", None), (None, x.astype(np.float64)),
                                 (None, x[:, :, ::-1]), (None, x.tolist())]:
        assert _bn_cpu.plain_train(x, None, None, None, None, 0.1, 1e-5, 1, activation,
                                   residual, False) is None
        assert _bn_cpu.plain_inference(x, mean, invstd, None, None, 0.1, 1e-5, 1, activation,
                                       residual) is None
    for activation, y_arg, wanted in [("relu", None, False), (None, y, False),
                                      ("relu", y[:, :, ::-1], False), ("relu", y, 1)]:
        assert _bn_cpu.plain_backward(dy, x, mean, invstd, None, True, 1, activation, y_arg,
                                      wanted) is None
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        fbn.batch_norm(x, training=True, activation="gelu")
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        fbn.batch_norm(x, training=True, residual=x.astype(np.float64))
    with pytest.raises(ValueError, match="needs y"):
        fbn.batch_norm_backward(dy, x, mean, invstd, activation="relu")
    with pytest.raises(ValueError, match="y is only used with activation='relu'"):
        fbn.batch_norm_backward(dy, x, mean, invstd, y=y)
    # handed back, and the same results as their plain twins
    a = fbn.batch_norm(x, training=True, residual=x[:, :, ::-1])
    b = fbn.batch_norm(x, training=True, residual=np.ascontiguousarray(x[:, :, ::-1]))
    _same(a, b)
    a = fbn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y,
                                return_residual_grad=1)
    b = fbn.batch_norm_backward(dy, x, mean, invstd, activation="relu", y=y,
                                return_residual_grad=True)
    _same(a, b)
