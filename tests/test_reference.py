"""The oracle itself, against formulas written out in plain NumPy."""
import numpy as np

import fastbn as fbn
from conftest import reference


def test_reference_forward_and_backward_match_formulas():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4, 5))
    dy = rng.normal(size=x.shape)
    w, b = rng.normal(size=4), rng.normal(size=4)
    y, mean, invstd = reference(fbn.batch_norm_forward, x, w, b, eps=1e-3)
    mu = x.mean(axis=(0, 2))
    var = x.var(axis=(0, 2))
    np.testing.assert_allclose(mean, mu, rtol=1e-14)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var + 1e-3), rtol=1e-14)
    xhat = (x - mu[:, None]) / np.sqrt(var[:, None] + 1e-3)
    np.testing.assert_allclose(y, w[:, None] * xhat + b[:, None], rtol=1e-13, atol=1e-14)
    dx, dw, db = reference(fbn.batch_norm_backward, dy, x, mean, invstd, w)
    m = x.shape[0] * x.shape[2]
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(dw, (dy * xhat).sum(axis=(0, 2)), rtol=1e-13)
    expect = (w * invstd)[:, None] / m * (m * dy - db[:, None] - xhat * dw[:, None])
    np.testing.assert_allclose(dx, expect, rtol=1e-12, atol=1e-14)


def test_reference_numerical_gradient():
    """Central differences of sum(y * dy) agree with the analytic backward."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 2, 4))
    dy = rng.normal(size=x.shape)
    w = rng.normal(size=2)

    def loss(xv):
        return float((reference(fbn.batch_norm_forward, xv, w)[0] * dy).sum())

    _, mean, invstd = reference(fbn.batch_norm_forward, x, w)
    dx = reference(fbn.batch_norm_backward, dy, x, mean, invstd, w)[0]
    num = np.zeros_like(x)
    h = 1e-6
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        num[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-7)
