"""Bad input raises a clear exception naming the argument, and changes nothing."""
import numpy as np
import pytest

import fastbn as fbn

C = 3


def _state():
    x = np.random.default_rng(0).normal(size=(4, C, 5)).astype(np.float32)
    return x, np.zeros(C, np.float32), np.ones(C, np.float32)


def _assert_untouched(rm, rv):
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


BAD_TRAINING_CALLS = [
    # (description, kwargs overriding the good call, exception, message fragment)
    ("int x", dict(x=np.ones((4, C, 5), np.int64)), TypeError, "x.dtype=int64"),
    ("complex x", dict(x=np.ones((4, C, 5), np.complex64)), TypeError, "x.dtype=complex64"),
    ("1-D x", dict(x=np.ones(C, np.float32)), ValueError, "x.ndim=1"),
    ("object x", dict(x="abc"), TypeError, "x.dtype"),
    ("weight size", dict(weight=np.ones(C + 1)), ValueError, "weight.shape=(4,)"),
    ("bias shape", dict(bias=np.ones((C, 1))), ValueError, "bias.shape=(3, 1)"),
    ("int weight", dict(weight=np.ones(C, np.int32)), TypeError, "weight.dtype=int32"),
    ("running_mean size", dict(running_mean=np.zeros(C + 2, np.float32)), ValueError,
     "running_mean.shape=(5,)"),
    ("running_var list", dict(running_var=[1.0, 1.0, 1.0]), TypeError, "running_var must be a numpy.ndarray"),
    ("running_var int", dict(running_var=np.ones(C, np.int64)), TypeError, "running_var.dtype=int64"),
    ("only running_mean", dict(running_var=None), ValueError, "both be None"),
    ("axis out of range", dict(axis=3), ValueError, "axis=3"),
    ("axis not int", dict(axis=1.0), TypeError, "axis must be an int"),
    ("eps negative", dict(eps=-1.0), ValueError, "eps"),
    ("eps nan", dict(eps=float("nan")), ValueError, "eps"),
    ("momentum text", dict(momentum="0.1"), TypeError, "momentum"),
    ("out shape", dict(out=np.empty((4, C, 6), np.float32)), ValueError, "out.shape"),
    ("out dtype", dict(out=np.empty((4, C, 5), np.float64)), TypeError, "out.dtype=float64"),
    ("out list", dict(out=[0.0]), TypeError, "out must be a numpy.ndarray"),
    ("one value per channel", dict(x=np.ones((1, C, 1), np.float32)), ValueError,
     "Expected more than 1 value per channel"),
]


@pytest.mark.parametrize("desc,override,exc,fragment", BAD_TRAINING_CALLS,
                         ids=[c[0] for c in BAD_TRAINING_CALLS])
@pytest.mark.parametrize("api", ["batch_norm", "batch_norm_forward"])
def test_bad_training_input(xp, api, desc, override, exc, fragment):
    F = xp.api
    x, rm, rv = _state()
    args = dict(x=x, running_mean=rm, running_var=rv, weight=None, bias=None, momentum=0.1,
                eps=1e-5, axis=1, out=None)
    args.update(override)
    if not xp.is_numpy and any(isinstance(override.get(k), (list, str))
                                 for k in ("x", "running_mean", "running_var", "out")):
        exc, fragment = TypeError, "mixed array types"  # a host object among device arrays
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        if api == "batch_norm":
            F.batch_norm(training=True, **args)
        else:
            F.batch_norm_forward(**args)
    _assert_untouched(rm, rv)


def test_memoized_layouts_still_check_the_axis():
    """Layouts are memoized per (shape, axis): after good calls with one shape, a bad axis
    for it still raises, a NumPy integer axis still works, and a second shape with the
    same axis gets its own channels."""
    x, rm, rv = _state()
    fbn.batch_norm(x, rm, rv, training=True)
    for bad, exc in ((3, ValueError), (-4, ValueError), (1.0, TypeError), ("1", TypeError)):
        with pytest.raises(exc, match="axis"):
            fbn.batch_norm(x, rm, rv, training=True, axis=bad)
    y = fbn.batch_norm(x, rm, rv, training=True, axis=np.int64(1))
    np.testing.assert_array_equal(y, fbn.batch_norm(x, rm, rv, training=True, axis=1))
    x2 = np.ones((4, 2 * C, 5), np.float32)
    assert fbn.moments(x2, 1)[0].shape == (2 * C,)
    assert fbn.moments(x, 1)[0].shape == (C,)


def test_read_only_running_stats_change_nothing():
    x, rm, rv = _state()
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is read-only"):
        fbn.batch_norm(x, rm, rv, training=True)
    _assert_untouched(rm, rv)
    out = np.empty_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fbn.batch_norm_forward(x, out=out)


def test_eval_requires_running_stats(xp):
    F = xp.api
    x, rm, rv = _state()
    with pytest.raises(ValueError, match="must be defined in evaluation mode"):
        F.batch_norm(x)
    with pytest.raises(ValueError, match=r"running_var.shape=\(2,\)"):
        F.batch_norm(x, rm, np.ones(2))


def test_bad_backward_input(xp):
    F = xp.api
    x, rm, rv = _state()
    dy = np.ones_like(x)
    with pytest.raises(ValueError, match="dy.shape"):
        F.batch_norm_backward(dy[:2], x, rm, rv)
    with pytest.raises(TypeError, match="dy.dtype=float64"):
        F.batch_norm_backward(dy.astype(np.float64), x, rm, rv)
    with pytest.raises(ValueError, match=r"invstd.shape=\(4,\)"):
        F.batch_norm_backward(dy, x, rm, np.ones(4))
    with pytest.raises(TypeError, match="mean.dtype=int64"):
        F.batch_norm_backward(dy, x, np.zeros(C, np.int64), rv)
    with pytest.raises(ValueError, match="Expected more than 1 value"):
        F.batch_norm_backward(dy[:1, :, :1], x[:1, :, :1], rm, rv)
    # frozen statistics: one value per channel is fine
    F.batch_norm_backward(dy[:1, :, :1], x[:1, :, :1], rm, rv, training=False)


def test_bad_moments_input():
    with pytest.raises(TypeError, match="x.dtype=bool"):
        fbn.moments(np.ones((3, 2), bool))
    with pytest.raises(TypeError, match="ddof must be an int"):
        fbn.moments(np.ones((3, 2)), ddof=0.5)
    with pytest.raises(ValueError, match="x.ndim=0"):
        fbn.welford(np.float64(1.0))
    with pytest.raises(TypeError, match="MaskedArray"):
        fbn.moments(np.ma.ones((3, 2)))


def test_mixed_array_types_raise(monkeypatch):
    """A NumPy x with a 'CuPy' weight: TypeError naming both types (a stand-in cupy
    module, so no GPU or CuPy install is needed)."""
    import sys
    import types

    fake = types.ModuleType("cupy")

    class ndarray:  # noqa: N801 - mimics cupy.ndarray
        shape = (C,)

    fake.ndarray = ndarray
    monkeypatch.setitem(sys.modules, "cupy", fake)
    x, rm, rv = _state()
    with pytest.raises(TypeError, match=r"mixed array types: numpy.ndarray and .*ndarray"):
        fbn.batch_norm(x, rm, rv, weight=ndarray(), training=True)
    _assert_untouched(rm, rv)
    assert fbn.get_backend(ndarray()) == "cuda"


def test_foreign_device_arrays_raise():
    class DeviceArray:
        __cuda_array_interface__ = {}

    with pytest.raises(TypeError, match="unsupported array type"):
        fbn.moments(DeviceArray())
