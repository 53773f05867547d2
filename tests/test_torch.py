"""fastbn against PyTorch CPU (the semantics fastbn copies), when torch is installed."""
import numpy as np
import pytest

import fastbn as fbn
from conftest import make_data

torch = pytest.importorskip("torch")
F = torch.nn.functional

CASES = [((8, 5), 1), ((4, 6, 9), 1), ((4, 6, 7, 5), 1), ((4, 7, 5, 6), -1), ((2, 3, 4, 5, 6), 1)]


def _to_torch(x, axis):
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.movedim(axis, 1) if axis != 1 else t


def _from_torch(t, axis):
    t = t.movedim(1, axis) if axis != 1 else t
    return t.detach().numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_training_steps_and_eval_match_torch(xp, shape, axis, dtype):
    B = xp.api
    C = shape[axis]
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    trm, trv = torch.zeros(C, dtype=torch.from_numpy(w).dtype), torch.ones(C, dtype=torch.from_numpy(w).dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    for step in range(4):
        x = make_data(shape, dtype, seed=step, loc=step, scale=1 + step)
        y = B.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-3, axis=axis)
        ty = F.batch_norm(_to_torch(x, axis), trm, trv, torch.from_numpy(w), torch.from_numpy(b),
                          training=True, momentum=0.2, eps=1e-3)
        np.testing.assert_allclose(y, _from_torch(ty, axis), **tol)
        np.testing.assert_allclose(rm, trm.numpy(), **tol)
        np.testing.assert_allclose(rv, trv.numpy(), **tol)
    x = make_data(shape, dtype, seed=9)
    y = B.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3, axis=axis)
    ty = F.batch_norm(_to_torch(x, axis), trm, trv, torch.from_numpy(w), torch.from_numpy(b),
                      training=False, eps=1e-3)
    np.testing.assert_allclose(y, _from_torch(ty, axis), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_matches_autograd(xp, shape, axis, dtype):
    B = xp.api
    C = shape[axis]
    rng = np.random.default_rng(1)
    x = make_data(shape, dtype, seed=2, loc=1.0)
    dy = make_data(shape, dtype, seed=3, loc=0.0, scale=1.0)
    w, b = rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)
    tx = _to_torch(x, axis).clone().requires_grad_(True)
    tw = torch.from_numpy(w).clone().requires_grad_(True)
    tb = torch.from_numpy(b).clone().requires_grad_(True)
    ty = F.batch_norm(tx, None, None, tw, tb, training=True, eps=1e-5)
    ty.backward(_to_torch(dy, axis))
    y, mean, invstd = B.batch_norm_forward(x, w, b, eps=1e-5, axis=axis)
    dx, dw, db = B.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(y, _from_torch(ty, axis), **tol)
    np.testing.assert_allclose(dx, _from_torch(tx.grad, axis), **tol)
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol)


@pytest.mark.parametrize("shape,axis", CASES)
def test_frozen_backward_matches_autograd_in_eval_mode(xp, shape, axis):
    B = xp.api
    C = shape[axis]
    rng = np.random.default_rng(5)
    x = make_data(shape, np.float64, seed=6)
    dy = make_data(shape, np.float64, seed=7)
    w, b = rng.normal(size=C), rng.normal(size=C)
    rm, rv = rng.normal(size=C), rng.uniform(0.5, 2, size=C)
    tx = _to_torch(x, axis).clone().requires_grad_(True)
    tw = torch.from_numpy(w).clone().requires_grad_(True)
    tb = torch.from_numpy(b).clone().requires_grad_(True)
    ty = F.batch_norm(tx, torch.from_numpy(rm), torch.from_numpy(rv), tw, tb, training=False, eps=1e-5)
    ty.backward(_to_torch(dy, axis))
    invstd = 1 / np.sqrt(rv + 1e-5)
    dx, dw, db = B.batch_norm_backward(dy, x, rm, invstd, w, training=False, axis=axis)
    np.testing.assert_allclose(dx, _from_torch(tx.grad, axis), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-10, atol=1e-11)


def test_one_value_per_channel_raises_like_torch():
    x = np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError) as ours:
        fbn.batch_norm(x, np.zeros(3), np.ones(3), training=True)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(torch.from_numpy(x), torch.zeros(3), torch.ones(3), training=True)
    assert str(ours.value).split(",")[0] == str(theirs.value).split(",")[0]


def test_float32_offset_accuracy_beats_torch():
    """The case from the core issue: offset 1e4, std 1. fastbn stays within 1e-5 of the
    float64 result; PyTorch CPU folds to x*alpha+beta in float32 and does not."""
    x = (1e4 + np.random.default_rng(8).normal(size=(32, 16, 28, 28))).astype(np.float32)
    xd = x.astype(np.float64)
    y64 = (xd - xd.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(
        xd.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    ours = np.abs(fbn.batch_norm_forward(x)[0] - y64).max()
    theirs = np.abs(F.batch_norm(torch.from_numpy(x), None, None, training=True).numpy() - y64).max()
    assert ours < 1e-5
    assert ours < theirs
