"""Every public function against the float64 reference backend, over dtypes, layouts
(2-D..5-D, axis=1, axis=-1, other axes), odd sizes, multi-chunk shapes, non-contiguous
views and out= buffers -- on every array namespace of the `xp` fixture (conftest): NumPy
(the CPU core), the CuPy stand-in over the emulated CUDA kernels, and the real CuPy
whenever it sees a GPU. Inputs are made on the host, moved with xp.asarray; results come
back with xp.asnumpy and are checked on the host."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastbn as fbn
from fastbn import _bn_cpu
from conftest import (DTYPES, NEVER, assert_data_close, core_thresholds, make_data, reference,
                      stat_rtol)

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
    ((4, 3, 37), -1),  # 37 channels-last channels: CUDA's coalesced kernels, 2 warp tiles
    ((2000, 20), 1),  # 2-D with 20 channels: the same, over 4 splits of rows
    ((33, 6, 2), 1),  # rows of 2 and 16 elements: walked as channels-last columns on the CPU
    ((9, 5, 4, 4), 1),
    ((7, 1100), -1),  # wide channels-last rows: channel tiles (with a tail) over row groups
    ((5, 200, 3), 1),  # short rows as 600 columns: the same tiles
]
IDS = [f"{s}-ax{a}" for s, a in LAYOUTS]

# views the kernels take as they are, and views that need a copy
VIEWS = {
    "contiguous": lambda a, mod: a,
    "batch-step": lambda a, mod: a[::2],
    "reversed": lambda a, mod: a[::-1],
    "fortran": lambda a, mod: mod.asfortranarray(a),
    "last-step": lambda a, mod: a[..., ::2],
    "channel-step": lambda a, mod: a[:, ::2],
}


def _assert_stats(a, e, dtype):
    a = np.asarray(a)
    assert a.dtype == (np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    np.testing.assert_allclose(a, e.astype(a.dtype), rtol=stat_rtol(dtype) * 4, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=IDS)
def test_moments(xp, shape, axis, dtype):
    xp.skip_unless_supported(dtype)
    x = make_data(shape, dtype, loc=3.0)
    xd = xp.asarray(x)
    for ddof in (0, 1):
        mean, var = fbn.moments(xd, axis, ddof=ddof)
        assert type(mean) is type(xd)
        rmean, rvar = reference(fbn.moments, x, axis, ddof=ddof)
        _assert_stats(xp.asnumpy(mean), rmean, dtype)
        _assert_stats(xp.asnumpy(var), rvar, dtype)
    m, rm = fbn.welford(xd, axis), reference(fbn.welford, x, axis)
    assert m.count == rm.count == x.size // x.shape[axis]
    np.testing.assert_allclose(xp.asnumpy(m.mean), rm.mean, rtol=1e-13)
    np.testing.assert_allclose(xp.asnumpy(m.m2), rm.m2, rtol=1e-11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=IDS)
def test_training_forward(xp, shape, axis, dtype):
    xp.skip_unless_supported(dtype)
    x = make_data(shape, dtype, loc=-2.0)
    C = shape[axis]
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=C), rng.normal(size=C)
    y, mean, invstd = fbn.batch_norm_forward(xp.asarray(x), xp.asarray(w), xp.asarray(b),
                                             eps=1e-4, axis=axis)
    ry, rmean, rinvstd = reference(fbn.batch_norm_forward, x, w, b, eps=1e-4, axis=axis)
    assert type(y) is type(xp.asarray(x)) and y.flags.c_contiguous
    y = xp.asnumpy(y)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_data_close(y, ry)
    _assert_stats(xp.asnumpy(mean), rmean, dtype)
    _assert_stats(xp.asnumpy(invstd), rinvstd, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=IDS)
def test_batch_norm_train_and_eval(xp, shape, axis, dtype):
    xp.skip_unless_supported(dtype)
    x = make_data(shape, dtype, loc=1.0)
    C = shape[axis]
    state = {}
    for name, on, call in (("fastbn", xp.asarray, fbn.batch_norm),
                           ("reference", np.asarray,
                            lambda *a, **k: reference(fbn.batch_norm, *a, **k))):
        rm, rv = on(np.full(C, 0.5, np.float32)), on(np.full(C, 2.0, np.float32))
        y_train = call(on(x), rm, rv, training=True, momentum=0.3, axis=axis)
        y_eval = call(on(x), rm, rv, on(np.full(C, 1.5)), on(np.full(C, -0.5)), axis=axis)
        state[name] = [xp.asnumpy(a) for a in (y_train, y_eval, rm, rv)]
    for a, e in zip(state["fastbn"][:2], state["reference"][:2]):
        assert a.dtype == x.dtype
        assert_data_close(a, e)
    np.testing.assert_allclose(state["fastbn"][2], state["reference"][2], rtol=1e-6)
    np.testing.assert_allclose(state["fastbn"][3], state["reference"][3], rtol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=IDS)
def test_backward(xp, shape, axis, dtype, training):
    xp.skip_unless_supported(dtype)
    x = make_data(shape, dtype, seed=2)
    dy = make_data(shape, dtype, seed=3, loc=0.1, scale=1.0)
    C = shape[axis]
    w = np.random.default_rng(4).normal(size=C)
    _, mean, invstd = reference(fbn.batch_norm_forward, x, w, axis=axis)
    args = (dy, x, mean, invstd, w)
    dx, dw, db = (xp.asnumpy(a) for a in fbn.batch_norm_backward(
        *map(xp.asarray, args), training=training, axis=axis))
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
@pytest.mark.parametrize("base_shape", [(6, 8, 5, 6), (6, 8, 2, 3)], ids=["rows-30", "rows-6"])
def test_non_contiguous_views(xp, view, axis, base_shape):
    def same_bits(a, b):
        np.testing.assert_array_equal(xp.asnumpy(a), xp.asnumpy(b))

    mod = xp.module
    base = xp.asarray(make_data(base_shape, np.float32, seed=5))
    x = VIEWS[view](base, mod)
    C = x.shape[axis]
    rm, rv = xp.asarray(np.zeros(C)), xp.asarray(np.ones(C))
    y, mean, invstd = fbn.batch_norm_forward(x, running_mean=rm, running_var=rv, axis=axis)
    xc = mod.ascontiguousarray(x)
    rm2, rv2 = xp.asarray(np.zeros(C)), xp.asarray(np.ones(C))
    yc, meanc, invstdc = fbn.batch_norm_forward(xc, running_mean=rm2, running_var=rv2, axis=axis)
    # a strided view gives the very same bits as its contiguous copy
    same_bits(y, yc)
    same_bits(mean, meanc)
    same_bits(rm, rm2)
    ry = reference(fbn.batch_norm_forward, xp.asnumpy(x), axis=axis)[0]
    assert_data_close(xp.asnumpy(y), ry)
    dy = VIEWS[view](xp.asarray(make_data(base.shape, np.float32, seed=6)), mod)
    dx = fbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0]
    dxc = fbn.batch_norm_backward(mod.ascontiguousarray(dy), xc, mean, invstd, axis=axis)[0]
    same_bits(dx, dxc)
    for m_, rm_ in zip(fbn.moments(x, axis), fbn.moments(xc, axis)):
        same_bits(m_, rm_)
    # short rows (rows-6) are walked as channels-last columns on the CPU, which needs the
    # channels side by side: views that do not have them are copied, so the bits agree
    w = xp.asarray(np.linspace(0.5, 1.5, C))
    same_bits(fbn.batch_norm(x, rm, rv, w, axis=axis, activation="relu"),
              fbn.batch_norm(xc, rm, rv, w, axis=axis, activation="relu"))


@pytest.mark.parametrize("axis", [1, -1])
def test_out_buffers(xp, axis):
    mod, host = xp.module, xp.asnumpy
    x = xp.asarray(make_data((4, 6, 3, 5), np.float32, seed=7))
    C = x.shape[axis]
    expected = host(fbn.batch_norm_forward(x, axis=axis)[0])
    # plain buffer
    out = mod.empty_like(x)
    y = fbn.batch_norm_forward(x, axis=axis, out=out)[0]
    assert y is out
    np.testing.assert_array_equal(host(out), expected)
    # strided out (a view into a bigger array) and a Fortran-ordered out
    big = mod.zeros((4, 6, 3, 10), np.float32)
    view = big[..., ::2]
    assert fbn.batch_norm_forward(x, axis=axis, out=view)[0] is view
    np.testing.assert_array_equal(host(view), expected)
    assert np.all(host(big[..., 1::2]) == 0)
    fort = mod.asfortranarray(mod.empty_like(x))
    fbn.batch_norm_forward(x, axis=axis, out=fort)
    np.testing.assert_array_equal(host(fort), expected)
    # in place: out=x
    xin = x.copy()
    fbn.batch_norm_forward(xin, axis=axis, out=xin)
    np.testing.assert_array_equal(host(xin), expected)
    # inference and backward with out
    rm, rv = xp.asarray(np.zeros(C)), xp.asarray(np.ones(C))
    out2 = mod.empty_like(x)
    assert fbn.batch_norm(x, rm, rv, axis=axis, out=out2) is out2
    np.testing.assert_array_equal(host(out2), host(fbn.batch_norm(x, rm, rv, axis=axis)))
    _, mean, invstd = fbn.batch_norm_forward(x, axis=axis)
    dy = xp.asarray(make_data(x.shape, np.float32, seed=8))
    dx_expected = host(fbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0])
    dyin = dy.copy()
    dx = fbn.batch_norm_backward(dyin, x, mean, invstd, axis=axis, out=dyin)[0]
    assert dx is dyin
    np.testing.assert_array_equal(host(dx), dx_expected)


def test_out_partially_overlapping_input(xp):
    """out overlapping x in a shifted way must not corrupt the result."""
    buf = xp.asarray(make_data((9, 4, 6), np.float64, seed=9))
    x = buf[:8]
    expected = xp.asnumpy(fbn.batch_norm_forward(x.copy())[0])
    out = buf[1:]
    fbn.batch_norm_forward(x, out=out)
    np.testing.assert_array_equal(xp.asnumpy(out), expected)


def test_array_likes():
    x = make_data((5, 3), np.float64).tolist()
    mean, var = fbn.moments(x)
    np.testing.assert_allclose(mean, np.mean(x, axis=0))
    y = fbn.batch_norm(x, np.zeros(3), np.ones(3), [1.0, 2.0, 3.0], (0.0, 0.0, 1.0))
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    mv = memoryview(np.ascontiguousarray(make_data((4, 2, 3), np.float32)))
    assert fbn.moments(mv)[0].dtype == np.float32


def test_moments_object_api(xp):
    h = make_data((30, 4, 7), np.float64)
    x = xp.asarray(h)
    whole = fbn.welford(x)
    merged = fbn.merge_moments(fbn.welford(p) for p in (x[:1], x[1:13], x[13:13], x[13:]))
    assert merged.count == whole.count
    np.testing.assert_allclose(xp.asnumpy(merged.mean), xp.asnumpy(whole.mean), rtol=1e-14)
    np.testing.assert_allclose(xp.asnumpy(merged.m2), xp.asnumpy(whole.m2), rtol=1e-13)
    np.testing.assert_allclose(xp.asnumpy(whole.var(ddof=1)), h.var(axis=(0, 2), ddof=1),
                               rtol=1e-13)
    empty = fbn.welford(x[:0])
    assert empty.count == 0 and np.all(np.isnan(xp.asnumpy(empty.var())))
    assert empty.merge(whole).count == whole.count
    np.testing.assert_array_equal(xp.asnumpy(empty.merge(whole).mean), xp.asnumpy(whole.mean))
    assert np.all(np.isnan(xp.asnumpy(fbn.moments(x[:0])[0])))
    assert "Moments(count=210" in repr(whole)
    with pytest.raises(ValueError, match="at least one"):
        fbn.merge_moments([])
    with pytest.raises(ValueError, match="channel counts"):
        whole.merge(fbn.welford(x[:, :2]))
    with pytest.raises(TypeError, match="Moments"):
        whole.merge((1, 2, 3))


def test_empty_training_batch_changes_nothing(xp):
    x = xp.asarray(np.zeros((0, 3, 4), np.float32))
    rm, rv = xp.asarray(np.full(3, 0.25)), xp.asarray(np.full(3, 4.0))
    y = fbn.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    np.testing.assert_array_equal(xp.asnumpy(rm), 0.25)
    np.testing.assert_array_equal(xp.asnumpy(rv), 4.0)


@pytest.mark.parametrize("shape,axis", [((5, 0), -1), ((5, 0), 1), ((5, 0, 3), 1),
                                        ((5, 3, 0), -1), ((0, 0), -1), ((2, 0, 4, 4), 1)])
def test_zero_channels_give_empty_results(xp, shape, axis):
    """Arrays with no channels (C == 0) run every function without a crash (a channels-last
    grid once divided by the channel count) and give empty results of the right shapes."""
    x = xp.asarray(np.zeros(shape, np.float32))
    z, o = xp.asarray(np.zeros(0)), xp.asarray(np.ones(0))
    rm, rv = xp.asarray(np.zeros(0, np.float32)), xp.asarray(np.ones(0, np.float32))
    assert fbn.moments(x, axis=axis)[0].shape == (0,)
    y, mean, invstd = fbn.batch_norm_forward(x, axis=axis)
    assert y.shape == shape and mean.shape == invstd.shape == (0,)
    assert fbn.batch_norm(x, rm, rv, training=True, axis=axis).shape == shape
    assert fbn.batch_norm(x, rm, rv, axis=axis).shape == shape
    assert fbn.normalize(x, z, o, axis=axis).shape == shape
    for training in (True, False):
        dx, dw, db = fbn.batch_norm_backward(x, x, z, o, training=training, axis=axis)
        assert dx.shape == shape and dw.shape == db.shape == (0,)
    assert fbn.backward_reduce(x, x, z, o, axis=axis)[0].shape == (0,)


def test_running_stats_update_formula(xp):
    x = make_data((10, 3, 4), np.float64, seed=11)
    rm, rv = xp.asarray(np.full(3, 0.5)), xp.asarray(np.full(3, 2.0))
    fbn.batch_norm(xp.asarray(x), rm, rv, training=True, momentum=0.25)
    m = 40
    np.testing.assert_allclose(xp.asnumpy(rm), 0.75 * 0.5 + 0.25 * x.mean(axis=(0, 2)),
                               rtol=1e-14)
    np.testing.assert_allclose(xp.asnumpy(rv),
                               0.75 * 2.0 + 0.25 * x.var(axis=(0, 2)) * m / (m - 1), rtol=1e-13)


def test_inference_scale_is_the_numpy_expression_bit_for_bit():
    """The CPU backend's compiled weight / sqrt(running_var + eps) (fast twin) against the
    NumPy expression it replaced (slow twin): same bits, NaN/Inf/negative variance too."""
    from fastbn import _api, _backend_cpu
    rng = np.random.default_rng(15)
    w = rng.standard_normal(1037)
    rv = rng.standard_normal(1037) ** 3
    rv[:5] = [0.0, -0.0, np.inf, -1e-5, np.nan]
    w[5:8] = [np.nan, np.inf, 0.0]
    for eps in (1e-5, 0.0):
        fast = _backend_cpu.inference_scale(w, rv, eps)
        slow = _api._inference_scale(w, rv, eps)
        np.testing.assert_array_equal(fast.view(np.int64), slow.view(np.int64))
    assert _backend_cpu.inference_scale(w[:0], rv[:0], 1e-5).shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("view", ["contiguous", "strided", "reversed"])
def test_compiled_running_update_is_the_numpy_update_bit_for_bit(dtype, view):
    """The CPU backend's compiled running-statistics update (fast twin) against the
    NumPy update of fastbn._moments (slow twin), in place through views; elements
    outside the views untouched."""
    from fastbn import _backend_cpu, _moments
    rng = np.random.default_rng(16)
    C = 1031
    mean, var = rng.standard_normal(C), rng.random(C) * 3
    mean[:2], var[2] = [np.nan, np.inf], np.inf
    base_m = rng.standard_normal(3 * C).astype(dtype)
    base_v = rng.random(3 * C).astype(dtype)

    def views(bm, bv):
        if view == "contiguous":
            return bm[:C], bv[:C]
        if view == "strided":
            return bm[::3], bv[1::3]
        return bm[C - 1::-1], bv[2 * C - 1:C - 1:-1]

    fast_m, fast_v = base_m.copy(), base_v.copy()
    slow_m, slow_v = base_m.copy(), base_v.copy()
    _backend_cpu.update_running(*views(fast_m, fast_v), mean, var, 77, 0.3)
    _moments.update_running(*views(slow_m, slow_v), mean, var, 77, 0.3)
    np.testing.assert_array_equal(fast_m, slow_m)
    np.testing.assert_array_equal(fast_v, slow_v)
    assert not np.array_equal(fast_m, base_m) and not np.array_equal(fast_v, base_v)


def test_nan_and_inf_poison_only_their_channel(xp):
    h = make_data((8, 4, 5), np.float32, seed=12)
    h[3, 1, 2] = np.nan
    h[0, 2, 0] = np.inf
    x = xp.asarray(h)
    rm, rv = xp.asarray(np.zeros(4, np.float32)), xp.asarray(np.ones(4, np.float32))
    y, mean, invstd = fbn.batch_norm_forward(x, running_mean=rm, running_var=rv)
    y, rm, rv = map(xp.asnumpy, (y, rm, rv))
    for c in (1, 2):
        assert np.all(np.isnan(y[:, c])) and np.isnan(rv[c])
    for c in (0, 3):
        assert np.all(np.isfinite(y[:, c])) and np.isfinite(rm[c]) and np.isfinite(rv[c])
    mean_ = xp.asnumpy(fbn.moments(x)[0])
    assert np.isnan(mean_[1]) and np.isinf(mean_[2]) and np.isfinite(mean_[[0, 3]]).all()
    dx = xp.asnumpy(fbn.batch_norm_backward(xp.asarray(np.ones_like(h)), x, mean, invstd)[0])
    assert np.isfinite(dx[:, [0, 3]]).all()
    # channels-last path too
    xl = xp.asarray(np.ascontiguousarray(h.transpose(0, 2, 1)))
    yl = xp.asnumpy(fbn.batch_norm_forward(xl, axis=-1)[0])
    assert np.all(np.isnan(yl[..., 1])) and np.isfinite(yl[..., [0, 3]]).all()


@pytest.mark.parametrize("shape,axis", [((4, 4, 3000), 1), ((4000, 4), -1)])
def test_inf_means_agree_with_a_plain_sum_at_any_blocking(xp, shape, axis):
    """+Inf in a channel -> mean +Inf, +Inf and -Inf -> NaN, and var NaN, however the
    channel is split into blocks, chunks, threads and merged partials -- also when the
    +Inf is a block's first element (the CPU's one-pass block sums are shifted by it)."""
    h = make_data(shape, np.float64, seed=14)
    ch = [slice(None)] * h.ndim
    for c, at, bad in ((0, [5, -5], (np.inf, np.inf)), (1, [5, -5], (np.inf, -np.inf)),
                       (2, [0], (np.inf,))):
        ch[axis] = c
        view = h[tuple(ch)].reshape(-1)  # a copy for axis=-1; write back below
        view[at] = bad
        h[tuple(ch)] = view.reshape(h[tuple(ch)].shape)
    ax = tuple(i for i in range(h.ndim) if i != axis % h.ndim)
    with np.errstate(invalid="ignore"):
        emean, evar = h.mean(axis=ax), h.var(axis=ax)
    mean, var = map(xp.asnumpy, fbn.moments(xp.asarray(h), axis))
    np.testing.assert_array_equal(mean[:3], emean[:3])  # +Inf, NaN, +Inf
    assert np.isnan(var[:3]).all() and np.isnan(evar[:3]).all()
    np.testing.assert_allclose(mean[3:], emean[3:], rtol=1e-12)
    pieces = [fbn.welford(xp.asarray(p), axis) for p in np.array_split(h, 3, axis=0)]
    merged = fbn.merge_moments(pieces)
    np.testing.assert_array_equal(xp.asnumpy(merged.mean)[:3], emean[:3])
    assert np.isnan(xp.asnumpy(merged.var())[:3]).all()


def test_constant_channel_and_zero_eps(xp):
    x = xp.asarray(np.ones((4, 2, 3), np.float32))
    stats = [xp.asarray(np.zeros(2)), xp.asarray(np.ones(2))]
    y = fbn.batch_norm(x, *stats, training=True, eps=1e-5)
    np.testing.assert_array_equal(xp.asnumpy(y), 0)
    y0 = fbn.batch_norm(x, *stats, training=True, eps=0.0)
    assert np.all(np.isnan(xp.asnumpy(y0)))  # 0 * inf, as IEEE and PyTorch say


def test_accuracy_large_offset(xp):
    """float32 data with offset 1e4 and std 1: variance within 1e-6 relative and y within
    1e-5 absolute of the float64 computation on the same input."""
    rng = np.random.default_rng(13)
    shapes = (((32, 16, 28, 28), 1), ((32, 28, 28, 16), -1), ((4096, 64), 1))
    if xp.name == "cupy-emulated":  # the emulation runs every GPU thread on the CPU
        shapes = (((8, 16, 14, 14), 1), ((8, 14, 14, 16), -1), ((1024, 64), 1))
    for shape, axis in shapes:
        h = (1e4 + rng.normal(size=shape)).astype(np.float32)
        x = xp.asarray(h)
        ax = tuple(i for i in range(h.ndim) if i != axis % h.ndim)
        xd = h.astype(np.float64)
        var64 = xd.var(axis=ax)
        var = xp.asnumpy(fbn.moments(x, axis)[1])
        assert np.max(np.abs(var / var64 - 1)) < 1e-6
        y = xp.asnumpy(fbn.batch_norm_forward(x, axis=axis, eps=1e-5)[0])
        shp = [1] * h.ndim
        shp[axis] = -1
        y64 = (xd - xd.mean(axis=ax).reshape(shp)) / np.sqrt(var64.reshape(shp) + 1e-5)
        assert np.max(np.abs(y - y64)) < 1e-5
        rm, rv = xp.asarray(np.zeros(h.shape[axis])), xp.asarray(np.ones(h.shape[axis]))
        fbn.batch_norm(x, rm, rv, training=True, axis=axis, momentum=1.0)
        y_eval = xp.asnumpy(fbn.batch_norm(x, rm, xp.asarray(var64), axis=axis))
        assert np.max(np.abs(y_eval - y64)) < 1e-5


def test_half_statistics_are_float32(xp):
    x = xp.asarray(make_data((16, 3, 5), np.float16))
    y, mean, invstd = fbn.batch_norm_forward(x)
    assert y.dtype == np.float16 and mean.dtype == np.float32 and invstd.dtype == np.float32
    rm, rv = xp.asarray(np.zeros(3, np.float16)), xp.asarray(np.ones(3, np.float16))
    fbn.batch_norm(x, rm, rv, training=True)
    assert rm.dtype == np.float16 and np.all(xp.asnumpy(rm) != 0)


def test_float16_conversions_are_exact_for_every_value(xp):
    """Every float16 bit pattern through the kernels' half <-> float conversions: the
    identity returns the input, and a float32 scale rounds like numpy (nearest even,
    subnormals, overflow to Inf, NaN stays NaN)."""
    zero = xp.asarray(np.zeros(1))
    # (65536, 1): channels-last rows; (1, 1, 65536): one long channel row (F16C pieces
    # where the CPU has F16C)
    for h in (np.arange(65536, dtype=np.uint16).view(np.float16).reshape(-1, 1),
              np.arange(65536, dtype=np.uint16).view(np.float16).reshape(1, 1, -1)):
        nan = np.isnan(h)
        y = xp.asnumpy(fbn.normalize(xp.asarray(h), zero, xp.asarray(np.ones(1))))
        assert np.array_equal(y[~nan], h[~nan]) and np.isnan(y[nan]).all()
        for scale in (1.0 + 2.0 ** -11, 0.7, 3.1e4, 1e-5):
            y = xp.asnumpy(fbn.normalize(xp.asarray(h), zero, xp.asarray(np.full(1, scale))))
            with np.errstate(invalid="ignore", over="ignore"):  # inf * scale, overflow to inf
                expected = (h.astype(np.float32) * np.float32(scale)).astype(np.float16)
            assert np.array_equal(y[~nan], expected[~nan]), scale
            assert np.isnan(y[nan]).all()


_CAPPED_HALF_CHECK = """
import numpy as np, fastbn as fbn
from fastbn import _bn_cpu
cap = {cap!r}
used = _bn_cpu.half_conversion()
assert used == "plain" if cap == "plain" else used in ("f16c", "plain"), used
h = np.arange(65536, dtype=np.uint16).view(np.float16)
nan = np.isnan(h)
for x in (h.reshape(-1, 1), h.reshape(1, 1, -1)):
    for scale in (1.0, 1.0 + 2.0 ** -11, 0.7, 3.1e4, 1e-5):
        y = fbn.normalize(x, np.zeros(1), np.full(1, scale)).ravel()
        with np.errstate(invalid="ignore", over="ignore"):
            expected = (h.astype(np.float32) * np.float32(scale)).astype(np.float16)
        assert np.array_equal(y[~nan], expected[~nan]) and np.isnan(y[nan]).all(), scale
rng = np.random.default_rng(5)
for shape, axis in (((3, 5, 1300), 1), ((700, 6), -1), ((41, 600), 1)):
    x = (rng.standard_normal(shape) + 0.3).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    y, mean, invstd = fbn.batch_norm_forward(x, axis=axis)
    y32, mean32, invstd32 = fbn.batch_norm_forward(x.astype(np.float32), axis=axis)
    assert np.array_equal(y, y32.astype(np.float16)) and np.array_equal(mean, mean32)
    dx = fbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0]
    dx32 = fbn.batch_norm_backward(dy.astype(np.float32), x.astype(np.float32), mean32,
                                   invstd32, axis=axis)[0]
    assert np.array_equal(dx, dx32.astype(np.float16))
print(used)
"""


def test_float16_conversions_in_use_are_known():
    assert _bn_cpu.half_conversion() in ("avx512", "f16c", "plain")


@pytest.mark.parametrize("cap", ["f16c", "plain"])
def test_float16_narrower_conversions_are_exact(cap, tmp_path):
    """The float16 conversions a CPU without AVX-512 (8-wide F16C) or without F16C
    (branch-free) runs, on this machine: a process capped by FASTBN_HALF_CONVERSION checks
    every bit pattern and float16 training forward/backward against float32 rounded once."""
    env = dict(os.environ, FASTBN_HALF_CONVERSION=cap)
    done = subprocess.run([sys.executable, "-c", _CAPPED_HALF_CHECK.format(cap=cap)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("shape,axis", [((3, 5, 1300), 1), ((2, 3, 4, 5), 1), ((700, 6), -1),
                                        ((4, 9, 130), 2), ((3, 2, 40000), 1), ((9, 7, 300), -1),
                                        ((41, 600), 1), ((3, 2000, 5), 1), ((40, 3, 10, 10), 1),
                                        ((37, 50), -1), ((5, 3, 3, 64), -1)])
def test_float16_is_float32_arithmetic_rounded_once(shape, axis):
    """float16 data is computed in float32 (statistics in float64) and rounded once: every
    result equals the float32 computation on the exactly upcast inputs, rounded to
    float16 by NumPy -- bit for bit, in every layout, whichever float16 conversion the
    CPU uses (AVX-512 loops converting in registers, F16C pieces or the branch-free
    functions)."""
    h = make_data(shape, np.float16, seed=31, loc=0.3)
    r = make_data(shape, np.float16, seed=32)
    g = make_data(shape, np.float16, seed=33, scale=1.0)
    f = [a.astype(np.float32) for a in (h, r, g)]
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    rm, rv = np.linspace(-0.2, 0.2, C), np.linspace(0.5, 2, C)

    def run(x, res, dy):
        y, mean, invstd = fbn.batch_norm_forward(x, w, b, axis=axis, activation="relu",
                                                 residual=res)
        y_eval = fbn.batch_norm(x, rm, rv, w, b, axis=axis, residual=res)
        dx, dw, db, dres = fbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                   activation="relu", y=y,
                                                   return_residual_grad=True)
        dx_frozen = fbn.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w,
                                            training=False, axis=axis)[0]
        return (y, y_eval, dx, dres, dx_frozen), (mean, invstd, dw, db)

    half_data, half_stats = run(*(h, r, g))
    # the float32 run takes the float16 forward output as its ReLU mask input, as the
    # float16 run does
    y32, mean32, invstd32 = fbn.batch_norm_forward(f[0], w, b, axis=axis, activation="relu",
                                                   residual=f[1])
    np.testing.assert_array_equal(half_data[0], y32.astype(np.float16))
    np.testing.assert_array_equal(half_stats[0], mean32)
    np.testing.assert_array_equal(half_stats[1], invstd32)
    np.testing.assert_array_equal(
        half_data[1], fbn.batch_norm(f[0], rm, rv, w, b, axis=axis, residual=f[1]).astype(np.float16))
    dx32, dw32, db32, dres32 = fbn.batch_norm_backward(
        f[2], f[0], mean32, invstd32, w, axis=axis, activation="relu",
        y=half_data[0].astype(np.float32), return_residual_grad=True)
    np.testing.assert_array_equal(half_data[2], dx32.astype(np.float16))
    np.testing.assert_array_equal(half_data[3], dres32.astype(np.float16))
    np.testing.assert_array_equal(half_stats[2], dw32)
    np.testing.assert_array_equal(half_stats[3], db32)
    np.testing.assert_array_equal(
        half_data[4], fbn.batch_norm_backward(f[2], f[0], rm, 1 / np.sqrt(rv + 1e-5), w,
                                              training=False, axis=axis)[0].astype(np.float16))


def _same_bits_both_ways(outputs, on, off):
    """outputs() with the core's size policies set to `on`, then to `off`
    (core_thresholds): the two runs must agree bit for bit. Returns the first."""
    with core_thresholds(**on):
        first = outputs()
    with core_thresholds(**off):
        second = outputs()
    for a, e in zip(first, second):
        np.testing.assert_array_equal(a, e)
    return first


@pytest.mark.parametrize("shape,axis", [((8, 4, 70001), 1), ((600001, 4), -1)],
                         ids=["long-rows", "channels-last"])
def test_streaming_stores_give_the_same_bits(shape, axis):
    """Large training/backward outputs are written with non-temporal stores (through an
    L1 staging buffer, or straight from registers: NC rows of the forward and of the split
    backward primitive, float32 channels-last runs), and so are inference outputs
    of long NC rows (the threshold is set here so that these arrays qualify, inference's
    twice it included); the bits equal the ordinary-store path, edges included (odd
    sizes, unaligned row starts)."""
    from fastbn import _bn_cpu
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
        sums = fbn.backward_reduce(dy, x, mean, invstd, axis=axis, activation="relu", y=y)
        dx_split, dres_split = fbn.backward_elementwise(
            dy, x, mean, invstd, w, *sums, x.size // C, axis=axis, activation="relu", y=y,
            return_residual_grad=True)
        return y, y_eval, dx, dx_frozen, dx_split, dres_split

    assert x.nbytes >= 8 << 20
    streamed = _same_bits_both_ways(outputs, dict(stream_min_bytes=4 << 20),
                                    dict(stream_min_bytes=NEVER))
    assert_data_close(streamed[1], reference(fbn.batch_norm, x, rm, rv, w, b, axis=axis))


def test_inference_streams_long_nc_rows_from_16_mib():
    """Which inference outputs go out with streaming stores: of outputs of twice the
    training forward's size (16 MiB), where the CPU streams rows straight from registers
    (AVX-512), NC rows of 1 KB or more and float32 channels-last rows of 16 channels or
    more; not 7x7 rows (196 bytes: most lines would be shared by two rows), nor rows
    staged through L1 (no faster than ordinary stores, or slower)."""
    from fastbn import _bn_cpu

    def streams(shape, dtype=np.float32):
        return _bn_cpu.inference_stream(np.empty(shape, dtype))

    assert _bn_cpu.thresholds()[1] == 8 << 20
    assert streams((8, 8, 70001)) == _bn_cpu.channel_tiles()  # 17.9 MB
    assert streams((8, 4, 70001), np.float64) == _bn_cpu.channel_tiles()
    assert not streams((8, 4, 70001))  # 9 MB
    assert not streams((1400, 64, 49))  # 7x7 maps, 17.6 MB
    assert streams((262144, 16, 1)) == _bn_cpu.channel_tiles()  # channels-last, 16.8 MB
    assert not streams((1048576, 4, 1))  # 4 channels
    assert not streams((524288, 16, 1), np.float16)
    assert not streams((131072, 16, 1))  # 8.4 MB
    with core_thresholds(stream_min_bytes=0):
        assert streams((2, 3, 5001)) == _bn_cpu.channel_tiles()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels", [1100, 100])
def test_spread_requests_in_wide_backward_sums_give_the_same_bits(dtype, relu, channels):
    """Backward sums over large inputs ask for the next rows as the sweeps go (float32
    channels-last rows of 256 B+, RowsInOrder; narrower than 513 channels they leave the
    register tiles for it); the bits (dx, and the float64 sums) are those of the whole-row
    requests and the tiles. Rows of 1100 channels (4400 B; 9 chunks of rows, the last one
    short) and of 100 (400 B, 1.6 MB an array)."""
    rows = 64 * 8 + 37 if channels == 1100 else 4096 + 37
    x = make_data((rows, channels), dtype, seed=31)
    dy = make_data(x.shape, dtype, seed=32)
    y = fbn.batch_norm(x, training=True, activation="relu") if relu else None
    act = dict(activation="relu", y=y) if relu else {}
    _, mean, invstd = fbn.batch_norm_forward(x, axis=-1)

    def outputs():
        grads = fbn.batch_norm_backward(dy, x, mean, invstd, axis=-1, **act)
        sums = fbn.backward_reduce(dy, x, mean, invstd, axis=-1, **act)
        return [np.asarray(a).tobytes() for a in (*grads, *sums)]

    assert dy.nbytes + x.nbytes >= _bn_cpu.thresholds()[2]
    _same_bits_both_ways(outputs, {}, dict(spread_ahead_min_bytes=NEVER))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("epilogue", ["plain", "residual-relu"])
@pytest.mark.parametrize("rows", ["contiguous", "strided"])
def test_spread_requests_in_wide_forward_passes_give_the_same_bits(epilogue, rows, dtype):
    """Statistics, training forward and inference over large float32 and float64 inputs ask
    for the next rows as the sweeps go (wide channels-last rows, bn_kernels.hpp
    sweep_asking_ahead, RowsInOrder); the bits are those of the whole-row requests, and the
    values those of the reference. 9 chunks of rows (the last one short), rows of 1100
    channels (4400 or 8800 B), and a view of every row's first 1100 of 1300 channels."""
    whole = make_data((64 * 8 + 37, 1300 if rows == "strided" else 1100), dtype, seed=33)
    x = whole[:, :1100]
    C = x.shape[1]
    rm, rv = make_data((C,), dtype, seed=34), 1.0 + np.abs(make_data((C,), dtype, seed=35))
    w, b = make_data((C,), dtype, seed=36), make_data((C,), dtype, seed=37)
    fused = dict(activation="relu", residual=make_data(x.shape, dtype, seed=38)) \
        if epilogue == "residual-relu" else {}

    def outputs():
        trm, trv = rm.copy(), rv.copy()
        y, mean, invstd = fbn.batch_norm_forward(x, w, b, axis=-1, **fused)
        moments = fbn.moments(x, axis=-1)
        trained = fbn.batch_norm(x, trm, trv, w, b, training=True, axis=-1, **fused)
        inferred = fbn.batch_norm(x, rm, rv, w, b, axis=-1, **fused)
        return [np.asarray(a) for a in (y, mean, invstd, *moments, trained, trm, trv, inferred)]

    assert x.nbytes >= _bn_cpu.thresholds()[2]
    spread = _same_bits_both_ways(outputs, {}, dict(spread_ahead_min_bytes=NEVER))
    assert_data_close(spread[-1], reference(fbn.batch_norm, x, rm, rv, w, b, axis=-1, **fused))
    assert_data_close(spread[0], reference(fbn.batch_norm_forward, x, w, b, axis=-1, **fused)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("epilogue", ["plain", "residual-relu"])
@pytest.mark.parametrize("layout", ["channels-last", "strided-rows", "short-rows"])
def test_channel_strips_give_the_same_bits(dtype, epilogue, layout):
    """Wide channels-last rows that a second pass re-reads from cache (training forward,
    backward dx, inference of small inputs) are walked a strip of channels at a time
    (bn_kernels.hpp, normalize_strips_nlc); the bits are those of whole rows, and the values
    those of the reference. 1100 channels (strips of 1024 or 512 and a short last one), 111
    rows (chunks with a short last one, and rows left over from groups of four), a view of
    every row's first 1100 of 1300 channels, and (37, 300, 4) with axis=1, whose short rows
    are walked as 1200 channels-last columns."""
    if layout == "short-rows":
        x, axis = make_data((37, 300, 4), dtype, seed=41), 1
    else:
        whole = make_data((111, 1300 if layout == "strided-rows" else 1100), dtype, seed=41)
        x, axis = whole[:, :1100], -1
    dy = make_data(x.shape, dtype, seed=42)
    C = x.shape[axis]
    rm, rv = make_data((C,), dtype, seed=43), 1.0 + np.abs(make_data((C,), dtype, seed=44))
    w, b = make_data((C,), dtype, seed=45), make_data((C,), dtype, seed=46)
    fused = dict(activation="relu", residual=make_data(x.shape, dtype, seed=47)) \
        if epilogue == "residual-relu" else {}

    def outputs():
        y, mean, invstd = fbn.batch_norm_forward(x, w, b, axis=axis, **fused)
        inferred = fbn.batch_norm(x, rm, rv, w, b, axis=axis, **fused)
        dx = fbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
        sums = fbn.backward_reduce(dy, x, mean, invstd, axis=axis)
        dx_apart = fbn.backward_elementwise(dy, x, mean, invstd, w, *sums[:2], x.size // C,
                                            axis=axis)
        return [np.asarray(a) for a in (y, mean, invstd, inferred, *dx, dx_apart)]

    assert x.nbytes <= _bn_cpu.thresholds()[3]  # strips on at every thread count
    strips = _same_bits_both_ways(outputs, {}, dict(strips_max_bytes_per_thread=0))
    assert_data_close(strips[0], reference(fbn.batch_norm_forward, x, w, b, axis=axis,
                                           **fused)[0])
    assert_data_close(strips[3], reference(fbn.batch_norm, x, rm, rv, w, b, axis=axis, **fused))
    assert_data_close(strips[4], reference(fbn.batch_norm_backward, dy, x, strips[1], strips[2],
                                           w, axis=axis)[0])


def _formula_tolerance(dtype):
    # the streamed-kernel tests' check of the values against the float64 formula
    return {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}.get(np.dtype(dtype), 3e-2)


@pytest.mark.parametrize("shape", [(3, 5, 1031), (2, 3, 4099), (1001, 7, 1), (301, 50, 1),
                                   (203, 600, 1)],
                         ids=["rows", "long-rows", "channels-last", "channels-last-50",
                              "channels-last-wide"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", ["residual-relu", "plain"])
def test_streamed_elementwise_kernel_gives_the_same_bits(shape, dtype, epilogue):
    """The compiled elementwise pass with streaming stores requested directly (the API
    streams only training and backward outputs): the same bits as ordinary stores, with
    and without a residual and ReLU, odd sizes and an unaligned start."""
    from fastbn import _bn_cpu
    C = shape[1]
    buf = make_data((int(np.prod(shape)) + 1,), dtype, seed=23)
    x3 = buf[1:].reshape(shape)  # unaligned start
    fused = epilogue == "residual-relu"
    res3 = make_data(shape, dtype, seed=24) if fused else None
    mean, scale, shift = np.linspace(-1, 1, C), np.linspace(0.5, 2, C), np.linspace(-2, 2, C)
    outs = []
    for stream in (False, True):
        y3 = np.empty(int(np.prod(shape)) + 3, dtype)[3:].reshape(shape)
        _bn_cpu.normalize(x3, y3, mean, scale, shift, 2, res3, fused, stream)
        outs.append(y3)
    np.testing.assert_array_equal(outs[0], outs[1])
    if fused:
        assert np.any(outs[0] > 0) and np.all(outs[0] >= 0)
    else:
        expect = ((x3.astype(np.float64) - mean.reshape(1, C, 1)) * scale.reshape(1, C, 1)
                  + shift.reshape(1, C, 1))
        tol = _formula_tolerance(dtype)
        np.testing.assert_allclose(outs[0].astype(np.float64), expect, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("shape", [(3, 5, 1031), (1001, 7, 1), (301, 50, 1), (203, 600, 1)],
                         ids=["rows", "channels-last", "channels-last-50", "channels-last-wide"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "frozen", "relu"])
def test_streamed_backward_kernel_gives_the_same_bits(shape, dtype, variant):
    """dx written with streaming stores (channels-last: four rows at a time through the
    staging buffer) equals dx written with ordinary stores, bit for bit: odd sizes, rows
    wider than one staging piece, unaligned starts, each kind of backward."""
    from fastbn import _bn_cpu
    C = shape[1]
    n = int(np.prod(shape))
    dy3 = make_data((n + 1,), dtype, seed=25)[1:].reshape(shape)  # unaligned start
    x3 = make_data(shape, dtype, seed=26)
    y3 = make_data(shape, dtype, seed=27) if variant == "relu" else None
    mean, a, b, c = (np.linspace(-1, 1, C), np.linspace(0.5, 2, C), np.linspace(-0.3, 0.3, C),
                     np.linspace(-2, 2, C))
    outs = []
    for stream in (False, True):
        dx3 = np.empty(n + 3, dtype)[3:].reshape(shape)
        _bn_cpu.backward_apply(dy3, x3, dx3, mean, a, b, c, variant == "frozen", 2, y3,
                               None, stream)
        outs.append(dx3)
    np.testing.assert_array_equal(outs[0], outs[1])
    g = dy3.astype(np.float64) if y3 is None else np.where(y3 > 0, dy3, 0).astype(np.float64)
    shape_c = (1, C, 1)
    xm = x3.astype(np.float64) - mean.reshape(shape_c)
    expect = g * a.reshape(shape_c) + (0 if variant == "frozen" else
                                       xm * b.reshape(shape_c) + c.reshape(shape_c))
    tol = _formula_tolerance(dtype)
    np.testing.assert_allclose(outs[0].astype(np.float64), expect, rtol=tol, atol=tol * 4)


_TILES_CASES = [((301, 64), -1), ((97, 16), -1), ((53, 5), -1), ((41, 70), -1),
                ((2, 9, 7, 200), -1), ((13, 256), -1), ((9, 1030), -1), ((33, 6, 2), 1),
                ((5, 3, 7, 7), 1), ((2, 3, 5001), 1), ((4, 2, 40), 1)]


def _tile_outputs(dtype_name, stream, cases=_TILES_CASES):
    """Every pass the register tiles and rows take (statistics, inference, training forward,
    backward with and without a fused residual/ReLU, frozen statistics, the split backward
    primitive) on the shapes of
    `cases`, with data holding NaN, Inf, signed zeros and subnormals, contiguous and as
    views whose rows are farther apart; every output (and the backward's float64 sums) as
    bytes. stream: all outputs that can be written with streaming stores are (else none)."""
    with core_thresholds(stream_min_bytes=0 if stream else NEVER):
        return _tile_outputs_of(dtype_name, cases)


def _tile_outputs_of(dtype_name, cases):
    if dtype_name == "bfloat16":
        import ml_dtypes
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(dtype_name)
    out = {}
    for i, (shape, axis) in enumerate(cases):
        rng = np.random.default_rng(i)
        wide = shape[:-1] + (shape[-1] + 3,)
        for view in (False, True):
            def data(loc):
                a = rng.normal(loc, 2.0, size=wide if view else shape).astype(np.float32)
                a.ravel()[:6] = (np.nan, np.inf, -np.inf, -0.0, 1e-41, -3e-39)
                a = a.astype(dtype)
                return a[..., :shape[-1]] if view else a
            x, res, dy = data(0.5), data(0.0), data(0.0)
            C = shape[axis]
            w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
            rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
            key = f"{i}-{view}"
            out[key + "-infer"] = fbn.batch_norm(x, rm, rv, w, b, axis=axis)
            out[key + "-infer-fused"] = fbn.batch_norm(x, rm, rv, w, b, axis=axis,
                                                       activation="relu", residual=res)
            y, mean, invstd = fbn.batch_norm_forward(x, w, b, axis=axis, activation="relu",
                                                     residual=res)
            out[key + "-train"], out[key + "-mean"], out[key + "-invstd"] = y, mean, invstd
            out[key + "-var"] = fbn.moments(x, axis=axis, ddof=1)[1]
            out[key + "-dx"], out[key + "-dw"], out[key + "-db"] = fbn.batch_norm_backward(
                dy, x, mean, invstd, w, axis=axis)
            # the float64 sums themselves: a last-bit change rarely survives the rounding
            # of dw and dx to 16- or 32-bit data
            out[key + "-sums"], out[key + "-sums-relu"] = (
                np.stack(fbn.backward_reduce(dy, x, mean, invstd, axis=axis)),
                np.stack(fbn.backward_reduce(dy, x, mean, invstd, axis=axis, activation="relu",
                                             y=y)))
            dx, out[key + "-dw-relu"], _, dres = fbn.batch_norm_backward(
                dy, x, mean, invstd, w, axis=axis, activation="relu", y=y,
                return_residual_grad=True)
            out[key + "-dx-relu"], out[key + "-dres"] = dx, dres
            out[key + "-dx-frozen"] = fbn.batch_norm_backward(
                dy, x, rm, 1 / np.sqrt(rv + 1e-5), w, training=False, axis=axis)[0]
            count = x.size // C
            out[key + "-dx-split"] = fbn.backward_elementwise(
                dy, x, mean, invstd, w, *fbn.backward_reduce(dy, x, mean, invstd, axis=axis), count,
                axis=axis)
            out[key + "-dx-split-relu"], out[key + "-dres-split"] = fbn.backward_elementwise(
                dy, x, mean, invstd, w, *out[key + "-sums-relu"], count, axis=axis,
                activation="relu", y=y, return_residual_grad=True)
    return {k: np.ascontiguousarray(v).view(np.uint8) for k, v in out.items()}


_TILES_OFF_RUN = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_api import _tile_outputs
from fastbn import _bn_cpu
assert not _bn_cpu.channel_tiles()
np.savez({path!r}, **_tile_outputs({dtype!r}, {stream!r}))
"""


@pytest.mark.parametrize("stream", [False, True], ids=["stored", "streamed"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64", "float16", "bfloat16"])
def test_channel_tiles_give_the_same_bits(dtype_name, stream, tmp_path):
    """Channels-last passes with channel tiles in AVX-512 registers (the elementwise
    passes' constants, with masked tails, blocks of rows wider than a tile, streamed
    outputs through staging; the accumulators of the statistics and of the backward
    sums), NC rows of 16-bit data in registers with masked tails (7x7 rows, long
    rows, strided rows), and streamed NC rows of every dtype stored straight from
    registers (masked ordinary stores for the partial lines at either end) give the bits
    of the loops that a CPU without AVX-512 BW/VL runs: the same outputs in a process
    with FASTBN_CHANNEL_TILES=off, byte for byte."""
    if dtype_name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    if not _bn_cpu.channel_tiles():
        pytest.skip("this CPU has no AVX-512 BW/VL: only the row-by-row loops run")
    path = tmp_path / "off.npz"
    env = dict(os.environ, FASTBN_CHANNEL_TILES="off")
    code = _TILES_OFF_RUN.format(tests=os.path.dirname(__file__), path=str(path),
                                 dtype=dtype_name, stream=stream)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    off = np.load(path)
    on = _tile_outputs(dtype_name, stream)
    assert sorted(on) == sorted(off.files)
    for key, value in on.items():
        np.testing.assert_array_equal(value, off[key], err_msg=key)


# NC arrays of short rows (68-784 bytes) and channel counts that blocks do not divide
_BLOCK_CASES = [(12, 40, 7, 7), (19, 64, 17), (4, 70, 14, 14)]


@pytest.mark.parametrize("dtype_name", ["float32", "float64", "float16", "bfloat16"])
def test_channel_blocks_give_the_same_bits(dtype_name):
    """Large NC outputs of short rows (7x7 maps) are streamed a block of channels at a
    time, each row of the block one contiguous run whose partial end lines are stored
    ordinarily: training forward (with a fused residual and ReLU), backward (plain, ReLU
    with the residual's gradient, frozen statistics) give the bits of the per-channel
    path, whose short rows are written with ordinary stores, for contiguous inputs and
    for views whose rows are farther apart."""
    if dtype_name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    itemsize = 2 if dtype_name == "bfloat16" else np.dtype(dtype_name).itemsize
    for shape in _BLOCK_CASES:
        outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
        if inner * itemsize >= 1024:  # float64 14x14: rows long enough to stream alone
            continue
        for n_inputs in (1, 2):  # the training forward's and backward's blocks
            assert _bn_cpu.channel_block(outer, C, inner, itemsize, n_inputs, 2) > 1, shape
    cases = [(shape, 1) for shape in _BLOCK_CASES]
    fbn.set_num_threads(2)  # (conftest restores the default)
    streamed = _tile_outputs(dtype_name, True, cases)
    stored = _tile_outputs(dtype_name, False, cases)
    assert sorted(streamed) == sorted(stored)
    for key, value in streamed.items():
        np.testing.assert_array_equal(value, stored[key], err_msg=key)
