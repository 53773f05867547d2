"""Every public function on the CPU backend against the float64 reference backend, over
dtypes, layouts (2-D..5-D, axis=1, axis=-1, other axes), odd sizes, multi-chunk shapes,
non-contiguous views and out= buffers."""
import numpy as np
import pytest

import fastbn as fbn
from conftest import DTYPES, assert_data_close, make_data, reference, stat_rtol

# (shape, axis): small odd sizes, the channels-last (inner == 1) path, shapes with several
# reduction chunks (rows and inner segments) so that the split paths run too
LAYOUTS = [
    ((2, 3), 1),
    ((97, 5), 1),
    ((97, 5), -1),
    ((5, 3, 7), 1),
    ((5, 7, 3), -1),
    ((2, 3, 5, 7), 1),
    ((2, 5, 7, 3), -1),
    ((2, 3, 4, 5), 2),
    ((3, 4, 5), 0),
    ((2, 3, 2, 3, 5), 1),
    ((2, 2, 3, 3, 3), -1),
    ((101, 4, 400), 1),
    ((3, 2, 40000), 1),
    ((5000, 7), -1),
    ((1, 1, 97), 1),
]
IDS = [f"{s}-ax{a}" for s, a in LAYOUTS]

# views the kernels take as they are, and views that need a copy
VIEWS = {
    "contiguous": lambda a: a,
    "batch-step": lambda a: a[::2],
    "reversed": lambda a: a[::-1],
    "fortran": lambda a: np.asfortranarray(a),
    "last-step": lambda a: a[..., ::2],
    "channel-step": lambda a: a[:, ::2],
}


def _assert_stats(a, e, dtype):
    assert a.dtype == (np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    np.testing.assert_allclose(a, e.astype(a.dtype), rtol=stat_rtol(dtype) * 4, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=IDS)
def test_moments(shape, axis, dtype):
    x = make_data(shape, dtype, loc=3.0)
    for ddof in (0, 1):
        mean, var = fbn.moments(x, axis, ddof=ddof)
        rmean, rvar = reference(fbn.moments, x, axis, ddof=ddof)
        _assert_stats(mean, rmean, dtype)
        _assert_stats(var, rvar, dtype)
    m, rm = fbn.welford(x, axis), reference(fbn.welford, x, axis)
    assert m.count == rm.count == x.size // x.shape[axis]
    np.testing.assert_allclose(m.mean, rm.mean, rtol=1e-13)
    np.testing.assert_allclose(m.m2, rm.m2, rtol=1e-11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=IDS)
def test_training_forward(shape, axis, dtype):
    x = make_data(shape, dtype, loc=-2.0)
    C = shape[axis]
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=C), rng.normal(size=C)
    y, mean, invstd = fbn.batch_norm_forward(x, w, b, eps=1e-4, axis=axis)
    ry, rmean, rinvstd = reference(fbn.batch_norm_forward, x, w, b, eps=1e-4, axis=axis)
    assert y.dtype == x.dtype and y.shape == x.shape and y.flags.c_contiguous
    assert_data_close(y, ry)
    _assert_stats(mean, rmean, dtype)
    _assert_stats(invstd, rinvstd, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=IDS)
def test_batch_norm_train_and_eval(shape, axis, dtype):
    x = make_data(shape, dtype, loc=1.0)
    C = shape[axis]
    state = {}
    for name in ("cpu", "reference"):
        rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
        call = fbn.batch_norm if name == "cpu" else (lambda *a, **k: reference(fbn.batch_norm, *a, **k))
        y_train = call(x, rm, rv, training=True, momentum=0.3, axis=axis)
        y_eval = call(x, rm, rv, np.full(C, 1.5), np.full(C, -0.5), axis=axis)
        state[name] = (y_train, y_eval, rm, rv)
    for a, e in zip(state["cpu"][:2], state["reference"][:2]):
        assert a.dtype == x.dtype
        assert_data_close(a, e)
    np.testing.assert_allclose(state["cpu"][2], state["reference"][2], rtol=1e-6)
    np.testing.assert_allclose(state["cpu"][3], state["reference"][3], rtol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=IDS)
def test_backward(shape, axis, dtype, training):
    x = make_data(shape, dtype, seed=2)
    dy = make_data(shape, dtype, seed=3, loc=0.1, scale=1.0)
    C = shape[axis]
    w = np.random.default_rng(4).normal(size=C)
    _, mean, invstd = reference(fbn.batch_norm_forward, x, w, axis=axis)
    args = (dy, x, mean, invstd, w)
    dx, dw, db = fbn.batch_norm_backward(*args, training=training, axis=axis)
    rdx, rdw, rdb = reference(fbn.batch_norm_backward, *args, training=training, axis=axis)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    # dx is a difference of O(1) terms: compare against the scale of dy * w * invstd
    atol, rtol = {np.dtype(np.float64): (1e-11, 1e-11), np.dtype(np.float32): (1e-5, 1e-5)}.get(
        np.dtype(dtype), (2e-2, 2e-2))
    scale = float(np.abs(rdx.astype(np.float64)).max()) + 1.0
    np.testing.assert_allclose(dx.astype(np.float64), rdx.astype(np.float64), rtol=rtol,
                               atol=atol * scale)
    srtol = stat_rtol(dtype) * 4
    for a, e in ((dw, rdw), (db, rdb)):
        assert a.dtype == (np.float64 if np.dtype(dtype) == np.float64 else np.float32)
        np.testing.assert_allclose(a, e, rtol=srtol, atol=srtol * np.abs(e).max())


@pytest.mark.parametrize("view", list(VIEWS), ids=list(VIEWS))
@pytest.mark.parametrize("axis", [1, -1])
def test_non_contiguous_views(view, axis):
    base = make_data((6, 8, 5, 6), np.float32, seed=5)
    x = VIEWS[view](base)
    C = x.shape[axis]
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = fbn.batch_norm_forward(x, running_mean=rm, running_var=rv, axis=axis)
    xc = np.ascontiguousarray(x)
    rm2, rv2 = np.zeros(C), np.ones(C)
    yc, meanc, invstdc = fbn.batch_norm_forward(xc, running_mean=rm2, running_var=rv2, axis=axis)
    # a strided view gives the very same bits as its contiguous copy
    np.testing.assert_array_equal(y, yc)
    np.testing.assert_array_equal(mean, meanc)
    np.testing.assert_array_equal(rm, rm2)
    ry = reference(fbn.batch_norm_forward, x, axis=axis)[0]
    assert_data_close(y, ry)
    dy = VIEWS[view](make_data(base.shape, np.float32, seed=6))
    dx = fbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0]
    dxc = fbn.batch_norm_backward(np.ascontiguousarray(dy), xc, mean, invstd, axis=axis)[0]
    np.testing.assert_array_equal(dx, dxc)
    for m_, rm_ in zip(fbn.moments(x, axis), fbn.moments(xc, axis)):
        np.testing.assert_array_equal(m_, rm_)
    # inference: short rows of contiguous arrays run channels-last over (C*inner); a
    # strided view takes the per-channel path; the bits agree
    w = np.linspace(0.5, 1.5, C)
    np.testing.assert_array_equal(fbn.batch_norm(x, rm, rv, w, axis=axis, activation="relu"),
                                  fbn.batch_norm(xc, rm, rv, w, axis=axis, activation="relu"))


@pytest.mark.parametrize("axis", [1, -1])
def test_out_buffers(axis):
    x = make_data((4, 6, 3, 5), np.float32, seed=7)
    C = x.shape[axis]
    expected = fbn.batch_norm_forward(x, axis=axis)[0]
    # plain buffer
    out = np.empty_like(x)
    y = fbn.batch_norm_forward(x, axis=axis, out=out)[0]
    assert y is out
    np.testing.assert_array_equal(out, expected)
    # strided out (a view into a bigger array) and a Fortran-ordered out
    big = np.zeros((4, 6, 3, 10), np.float32)
    view = big[..., ::2]
    assert fbn.batch_norm_forward(x, axis=axis, out=view)[0] is view
    np.testing.assert_array_equal(view, expected)
    assert np.all(big[..., 1::2] == 0)
    fort = np.asfortranarray(np.empty_like(x))
    fbn.batch_norm_forward(x, axis=axis, out=fort)
    np.testing.assert_array_equal(fort, expected)
    # in place: out=x
    xin = x.copy()
    fbn.batch_norm_forward(xin, axis=axis, out=xin)
    np.testing.assert_array_equal(xin, expected)
    # inference and backward with out
    rm, rv = np.zeros(C), np.ones(C)
    out2 = np.empty_like(x)
    assert fbn.batch_norm(x, rm, rv, axis=axis, out=out2) is out2
    np.testing.assert_array_equal(out2, fbn.batch_norm(x, rm, rv, axis=axis))
    _, mean, invstd = fbn.batch_norm_forward(x, axis=axis)
    dy = make_data(x.shape, np.float32, seed=8)
    dx_expected = fbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0]
    dyin = dy.copy()
    dx = fbn.batch_norm_backward(dyin, x, mean, invstd, axis=axis, out=dyin)[0]
    assert dx is dyin
    np.testing.assert_array_equal(dx, dx_expected)


def test_out_partially_overlapping_input():
    """out overlapping x in a shifted way must not corrupt the result."""
    buf = make_data((9, 4, 6), np.float64, seed=9)
    x = buf[:8]
    expected = fbn.batch_norm_forward(x.copy())[0]
    out = buf[1:]
    fbn.batch_norm_forward(x, out=out)
    np.testing.assert_array_equal(out, expected)


def test_array_likes():
    x = make_data((5, 3), np.float64).tolist()
    mean, var = fbn.moments(x)
    np.testing.assert_allclose(mean, np.mean(x, axis=0))
    y = fbn.batch_norm(x, np.zeros(3), np.ones(3), [1.0, 2.0, 3.0], (0.0, 0.0, 1.0))
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    mv = memoryview(np.ascontiguousarray(make_data((4, 2, 3), np.float32)))
    assert fbn.moments(mv)[0].dtype == np.float32


def test_moments_object_api():
    x = make_data((30, 4, 7), np.float64)
    whole = fbn.welford(x)
    merged = fbn.merge_moments(fbn.welford(p) for p in (x[:1], x[1:13], x[13:13], x[13:]))
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-14)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-13)
    np.testing.assert_allclose(whole.var(ddof=1), x.var(axis=(0, 2), ddof=1), rtol=1e-13)
    empty = fbn.welford(x[:0])
    assert empty.count == 0 and np.all(np.isnan(empty.var()))
    assert empty.merge(whole).count == whole.count
    np.testing.assert_array_equal(empty.merge(whole).mean, whole.mean)
    assert np.all(np.isnan(fbn.moments(x[:0])[0]))
    assert "Moments(count=210" in repr(whole)
    with pytest.raises(ValueError, match="at least one"):
        fbn.merge_moments([])
    with pytest.raises(ValueError, match="channel counts"):
        whole.merge(fbn.welford(x[:, :2]))
    with pytest.raises(TypeError, match="Moments"):
        whole.merge((1, 2, 3))


def test_empty_training_batch_changes_nothing():
    x = np.zeros((0, 3, 4), np.float32)
    rm, rv = np.full(3, 0.25), np.full(3, 4.0)
    y = fbn.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    np.testing.assert_array_equal(rm, 0.25)
    np.testing.assert_array_equal(rv, 4.0)


def test_running_stats_update_formula():
    x = make_data((10, 3, 4), np.float64, seed=11)
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    fbn.batch_norm(x, rm, rv, training=True, momentum=0.25)
    m = 40
    np.testing.assert_allclose(rm, 0.75 * 0.5 + 0.25 * x.mean(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(rv, 0.75 * 2.0 + 0.25 * x.var(axis=(0, 2)) * m / (m - 1),
                               rtol=1e-13)


def test_nan_and_inf_poison_only_their_channel():
    x = make_data((8, 4, 5), np.float32, seed=12)
    x[3, 1, 2] = np.nan
    x[0, 2, 0] = np.inf
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y, mean, invstd = fbn.batch_norm_forward(x, running_mean=rm, running_var=rv)
    for c in (1, 2):
        assert np.all(np.isnan(y[:, c])) and np.isnan(rv[c])
    for c in (0, 3):
        assert np.all(np.isfinite(y[:, c])) and np.isfinite(rm[c]) and np.isfinite(rv[c])
    mean_, var_ = fbn.moments(x)
    assert np.isnan(mean_[1]) and np.isinf(mean_[2]) and np.isfinite(mean_[[0, 3]]).all()
    dx, dw, db = fbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    assert np.isfinite(dx[:, [0, 3]]).all()
    # channels-last path too
    xl = np.ascontiguousarray(x.transpose(0, 2, 1))
    yl = fbn.batch_norm_forward(xl, axis=-1)[0]
    assert np.all(np.isnan(yl[..., 1])) and np.isfinite(yl[..., [0, 3]]).all()


def test_constant_channel_and_zero_eps():
    x = np.ones((4, 2, 3), np.float32)
    y = fbn.batch_norm(x, np.zeros(2), np.ones(2), training=True, eps=1e-5)
    np.testing.assert_array_equal(y, 0)
    y0 = fbn.batch_norm(x, np.zeros(2), np.ones(2), training=True, eps=0.0)
    assert np.all(np.isnan(y0))  # 0 * inf, as IEEE and PyTorch say


def test_accuracy_large_offset():
    """float32 data with offset 1e4 and std 1: variance within 1e-6 relative and y within
    1e-5 absolute of the float64 computation on the same input."""
    rng = np.random.default_rng(13)
    for shape, axis in (((32, 16, 28, 28), 1), ((32, 28, 28, 16), -1), ((4096, 64), 1)):
        x = (1e4 + rng.normal(size=shape)).astype(np.float32)
        ax = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        xd = x.astype(np.float64)
        var64 = xd.var(axis=ax)
        _, var = fbn.moments(x, axis)
        assert np.max(np.abs(var / var64 - 1)) < 1e-6
        y = fbn.batch_norm_forward(x, axis=axis, eps=1e-5)[0]
        shp = [1] * x.ndim
        shp[axis] = -1
        y64 = (xd - xd.mean(axis=ax).reshape(shp)) / np.sqrt(var64.reshape(shp) + 1e-5)
        assert np.max(np.abs(y - y64)) < 1e-5
        rm, rv = np.zeros(x.shape[axis]), np.ones(x.shape[axis])
        fbn.batch_norm(x, rm, rv, training=True, axis=axis, momentum=1.0)
        y_eval = fbn.batch_norm(x, rm, rv * 0 + var64, axis=axis)
        assert np.max(np.abs(y_eval - y64)) < 1e-5


def test_half_statistics_are_float32():
    x = make_data((16, 3, 5), np.float16)
    y, mean, invstd = fbn.batch_norm_forward(x)
    assert y.dtype == np.float16 and mean.dtype == np.float32 and invstd.dtype == np.float32
    rm, rv = np.zeros(3, np.float16), np.ones(3, np.float16)
    fbn.batch_norm(x, rm, rv, training=True)
    assert rm.dtype == np.float16 and np.all(rm != 0)


def test_float16_conversions_are_exact_for_every_value():
    """Every float16 bit pattern through the kernels' half <-> float conversions: the
    identity returns the input, and a float32 scale rounds like numpy (nearest even,
    subnormals, overflow to Inf, NaN stays NaN)."""
    h = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(-1, 1)
    nan = np.isnan(h)
    y = fbn.normalize(h, np.zeros(1), np.ones(1))
    assert np.array_equal(y[~nan], h[~nan]) and np.isnan(y[nan]).all()
    for scale in (1.0 + 2.0 ** -11, 0.7, 3.1e4, 1e-5):
        y = fbn.normalize(h, np.zeros(1), np.full(1, scale))
        with np.errstate(invalid="ignore", over="ignore"):  # inf * scale, overflow to inf
            expected = (h.astype(np.float32) * np.float32(scale)).astype(np.float16)
        assert np.array_equal(y[~nan], expected[~nan]), scale
        assert np.isnan(y[nan]).all()


@pytest.mark.parametrize("shape,axis", [((8, 4, 70001), 1), ((600001, 4), -1)],
                         ids=["long-rows", "channels-last"])
def test_streaming_stores_give_the_same_bits(shape, axis, monkeypatch):
    """Outputs of 8 MiB and more are written with non-temporal stores (through an L1
    staging buffer); the bits equal the ordinary-store path, edges included (odd sizes,
    unaligned row starts)."""
    from fastbn import _backend_cpu
    x = make_data(shape, np.float32, seed=21)
    dy = make_data(shape, np.float32, seed=22)
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)

    def outputs():
        y, mean, invstd = fbn.batch_norm_forward(x, w, b, axis=axis, activation="relu")
        y_eval = fbn.batch_norm(x, rm, rv, w, b, axis=axis)
        dx = fbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, activation="relu", y=y)[0]
        dx_frozen = fbn.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w,
                                            training=False, axis=axis)[0]
        return y, y_eval, dx, dx_frozen

    assert x.nbytes >= _backend_cpu._STREAM_MIN_BYTES
    streamed = outputs()
    monkeypatch.setattr(_backend_cpu, "_STREAM_MIN_BYTES", float("inf"))
    for a, e in zip(streamed, outputs()):
        np.testing.assert_array_equal(a, e)
    assert_data_close(streamed[1], reference(fbn.batch_norm, x, rm, rv, w, b, axis=axis))
