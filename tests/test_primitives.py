"""Split primitives: bit-compatible with the one-call functions, and a simulated
synchronized BN (uneven pieces, an empty piece) equal to BN on the whole batch."""
import numpy as np
import pytest

import fastbn as fbn
from conftest import make_data

# (300, 600): channels-last rows wide enough for several blocks of channels in the serial
# step between the passes (finish_statistics_nlc, FINISH_BLOCK) and five row chunks
LAYOUTS = [((33, 4, 50), 1), ((40, 5, 7, 3), -1), ((3, 2, 40000), 1), ((5000, 7), -1),
           ((101, 4, 400), 1), ((70, 3, 2, 4), 1), ((300, 600), -1)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_one_piece_is_bitwise_the_one_call(xp, shape, axis, dtype):
    F = xp.api
    x = make_data(shape, dtype, seed=1, loc=3.0)
    dy = make_data(shape, dtype, seed=2)
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    y, mean, invstd = F.batch_norm_forward(x, w, b, eps=1e-3, axis=axis)
    m = F.welford(x, axis)
    acc = mean.dtype
    np.testing.assert_array_equal(m.mean.astype(acc), mean)
    np.testing.assert_array_equal(m.invstd(1e-3).astype(acc), invstd)
    y2 = F.normalize(x, m.mean, m.invstd(1e-3), w, b, axis=axis)
    np.testing.assert_array_equal(y2, y)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    sum_dy, sum_dy_xhat = F.backward_reduce(dy, x, mean, invstd, axis=axis)
    np.testing.assert_array_equal(sum_dy.astype(acc), db)
    np.testing.assert_array_equal(sum_dy_xhat.astype(acc), dw)
    dx2 = F.backward_elementwise(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat,
                                   m.count, axis=axis)
    np.testing.assert_array_equal(dx2, dx)


@pytest.mark.parametrize("shape,axis", [((37, 3, 11), 1), ((37, 6, 5, 3), -1)])
def test_simulated_sync_bn_equals_whole_batch(xp, shape, axis):
    """Pieces of a batch along axis 0 (uneven, one empty), synchronized through the
    primitives, give the statistics and gradients of BN on the whole batch."""
    F = xp.api
    x = make_data(shape, np.float64, seed=3, loc=2.0)
    dy = make_data(shape, np.float64, seed=4)
    r = make_data(shape, np.float64, seed=5)
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    cuts = [0, 5, 5, 19, shape[0]]
    pieces = [slice(a, c) for a, c in zip(cuts[:-1], cuts[1:])]
    y, mean, invstd = F.batch_norm_forward(x, w, b, axis=axis, activation="relu", residual=r)
    dx, dw, db, dres = F.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                               activation="relu", y=y, return_residual_grad=True)
    total = F.merge_moments(F.welford(x[p], axis) for p in pieces)
    np.testing.assert_allclose(total.mean, mean, rtol=1e-13)
    g_mean, g_invstd = total.mean, total.invstd(1e-5)
    np.testing.assert_allclose(g_invstd, invstd, rtol=1e-12)
    ys = [F.normalize(x[p], g_mean, g_invstd, w, b, axis=axis, activation="relu",
                        residual=r[p]) for p in pieces]
    np.testing.assert_allclose(np.concatenate(ys), y, rtol=1e-12, atol=1e-12)
    sums = [F.backward_reduce(dy[p], x[p], g_mean, g_invstd, axis=axis, activation="relu",
                                y=ys[i]) for i, p in enumerate(pieces)]
    sum_dy = sum(s[0] for s in sums)
    sum_dy_xhat = sum(s[1] for s in sums)
    np.testing.assert_allclose(sum_dy, db, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sum_dy_xhat, dw, rtol=1e-12, atol=1e-12)
    dxs, dress = zip(*(F.backward_elementwise(dy[p], x[p], g_mean, g_invstd, w, sum_dy,
                                                 sum_dy_xhat, total.count, axis=axis,
                                                 activation="relu", y=ys[i],
                                                 return_residual_grad=True)
                       for i, p in enumerate(pieces)))
    np.testing.assert_allclose(np.concatenate(dxs), dx, rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(np.concatenate(dress), dres)


def test_primitive_errors(xp):
    F = xp.api
    x = make_data((4, 3, 5), np.float32)
    with pytest.raises(ValueError, match="count must be > 1"):
        F.backward_elementwise(x, x, np.zeros(3), np.ones(3), None, np.zeros(3), np.zeros(3), 1)
    with pytest.raises(TypeError, match="count must be an int"):
        F.backward_elementwise(x, x, np.zeros(3), np.ones(3), None, np.zeros(3), np.zeros(3), 2.5)
    with pytest.raises(ValueError, match=r"sum_dy.shape=\(2,\)"):
        F.backward_elementwise(x, x, np.zeros(3), np.ones(3), None, np.zeros(2), np.zeros(3), 20)
    with pytest.raises(ValueError, match=r"invstd.shape=\(4,\)"):
        F.normalize(x, np.zeros(3), np.ones(4))
