"""Fused BN+ReLU and BN+add+ReLU against the composition of separate steps."""
import numpy as np
import pytest

import fastbn as fbn
from conftest import DTYPES, assert_data_close, make_data, reference

LAYOUTS = [((97, 5), 1), ((5, 7, 3), -1), ((4, 3, 5, 7), 1), ((2, 5, 7, 3), -1),
           ((3, 2, 40000), 1), ((5000, 7), -1), ((41, 5, 3), 1),
           ((6, 1030), -1)]


def _relu(v):
    return np.where(v < 0, 0, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "add-relu"])
def test_forward_matches_composition(xp, shape, axis, dtype, with_residual):
    F = xp.api
    x = make_data(shape, dtype, seed=1)
    r = make_data(shape, dtype, seed=2, loc=-0.3) if with_residual else None
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-0.5, 0.5, C)
    y, mean, invstd = F.batch_norm_forward(x, w, b, axis=axis, activation="relu", residual=r)
    plain = reference(fbn.batch_norm_forward, x, w, b, axis=axis)[0].astype(np.float64)
    expected = _relu(plain + (0 if r is None else r.astype(np.float64)))
    assert y.dtype == x.dtype
    assert_data_close(y, expected.astype(dtype))
    np.testing.assert_array_equal(mean, F.batch_norm_forward(x, w, b, axis=axis)[1])
    # inference and the reference backend agree too
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    y_eval = F.batch_norm(x, rm, rv, w, b, axis=axis, activation="relu", residual=r)
    ref_eval = reference(fbn.batch_norm, x, rm, rv, w, b, axis=axis, activation="relu", residual=r)
    assert_data_close(y_eval, ref_eval)
    assert y_eval.min() >= 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward_matches_masked_composition(xp, shape, axis, dtype, training):
    F = xp.api
    x = make_data(shape, dtype, seed=3)
    r = make_data(shape, dtype, seed=4)
    dy = make_data(shape, dtype, seed=5, loc=0.0, scale=1.0)
    C = shape[axis]
    w = np.linspace(0.5, 1.5, C)
    y, mean, invstd = F.batch_norm_forward(x, w, axis=axis, activation="relu", residual=r)
    dx, dw, db, dres = F.batch_norm_backward(dy, x, mean, invstd, w, training=training,
                                               axis=axis, activation="relu", y=y,
                                               return_residual_grad=True)
    g = np.where(y > 0, dy, 0).astype(dtype)
    np.testing.assert_array_equal(dres, g)
    edx, edw, edb = F.batch_norm_backward(g, x, mean, invstd, w, training=training, axis=axis)
    np.testing.assert_array_equal(dx, edx)  # same kernel arithmetic on the masked gradient
    np.testing.assert_array_equal(dw, edw)
    np.testing.assert_array_equal(db, edb)
    rdx = reference(fbn.batch_norm_backward, dy, x, mean, invstd, w, training=training,
                    axis=axis, activation="relu", y=y)[0]
    tol = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(dx, rdx, rtol=tol, atol=tol * (1 + np.abs(rdx).max()))


def test_backward_activation_arguments(xp):
    F = xp.api
    x = make_data((6, 3, 4), np.float32)
    y, mean, invstd = F.batch_norm_forward(x, activation="relu")
    with pytest.raises(ValueError, match="needs y"):
        F.batch_norm_backward(x, x, mean, invstd, activation="relu")
    with pytest.raises(ValueError, match="only used with activation='relu'"):
        F.batch_norm_backward(x, x, mean, invstd, y=y)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        F.batch_norm_forward(x, activation="gelu")
    with pytest.raises(ValueError, match=r"residual.shape=\(6, 3\)"):
        F.batch_norm_forward(x, activation="relu", residual=np.ones((6, 3), np.float32))
    with pytest.raises(TypeError, match="residual.dtype=float64"):
        F.batch_norm(x, np.zeros(3), np.ones(3), residual=x.astype(np.float64))
    # without an activation the residual's gradient is dy itself
    dx, dw, db, dres = F.batch_norm_backward(x, x, mean, invstd, return_residual_grad=True)
    np.testing.assert_array_equal(dres, x)


def test_relu_keeps_nan(xp):
    F = xp.api
    x = make_data((6, 2, 3), np.float32)
    x[0, 1, 0] = np.nan
    y = F.batch_norm_forward(x, activation="relu")[0]
    assert np.all(np.isnan(y[:, 1])) and np.all(y[:, 0] >= 0)


def test_fused_matches_torch_autograd(xp):
    torch = pytest.importorskip("torch")
    TF = torch.nn.functional
    x = make_data((8, 4, 5, 6), np.float64, seed=6)
    r = make_data(x.shape, np.float64, seed=7)
    dy = make_data(x.shape, np.float64, seed=8)
    w, b = np.linspace(0.5, 1.5, 4), np.linspace(-0.2, 0.2, 4)
    tx, tr = torch.from_numpy(x).requires_grad_(), torch.from_numpy(r).requires_grad_()
    tw, tb = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    ty = TF.relu(TF.batch_norm(tx, None, None, tw, tb, training=True) + tr)
    ty.backward(torch.from_numpy(dy))
    F = xp.api
    y, mean, invstd = F.batch_norm_forward(x, w, b, activation="relu", residual=r)
    dx, dw, db, dres = F.batch_norm_backward(dy, x, mean, invstd, w, activation="relu", y=y,
                                               return_residual_grad=True)
    for ours, theirs in ((y, ty), (dx, tx.grad), (dw, tw.grad), (db, tb.grad), (dres, tr.grad)):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-10)
