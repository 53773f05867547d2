"""Reference backend: pure NumPy, float64 accumulation, two passes.

The oracle of the tests (bottleneck's slow twins) and selectable with
``FASTBN_BACKEND=reference``. Same interface as ``_backend_cpu``: validated
(outer, C, inner) views in, preallocated outputs.
"""
import numpy as np

name = "reference"
_AXES = (0, 2)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _per_channel(v):
    return v[None, :, None]


def moments(x3):
    count = x3.shape[0] * x3.shape[2]
    C = x3.shape[1]
    if count == 0:
        return 0, np.zeros(C), np.zeros(C)
    x = _f64(x3)
    mean = x.mean(axis=_AXES)
    m2 = ((x - _per_channel(mean)) ** 2).sum(axis=_AXES)
    return count, mean, m2


def train_forward(x3, y3, weight, bias, eps):
    count, mean, m2 = moments(x3)
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)
    normalize(x3, y3, mean, weight * invstd, bias)
    return mean, var, invstd


def normalize(x3, y3, mean, scale, shift):
    y = (_f64(x3) - _per_channel(mean)) * _per_channel(scale) + _per_channel(shift)
    y3[...] = y.astype(y3.dtype)


def backward(dy3, x3, dx3, mean, invstd, weight, frozen):
    g = _f64(dy3)
    xmu = _f64(x3) - _per_channel(mean)
    sdy = g.sum(axis=_AXES)
    sxmu = (g * xmu).sum(axis=_AXES)
    a = weight * invstd
    if frozen:
        dx = g * _per_channel(a)
    else:
        m = x3.shape[0] * x3.shape[2]
        dweight = invstd * sxmu
        dx = _per_channel(a / m) * (m * g - _per_channel(sdy) - xmu * _per_channel(invstd * dweight))
    dx3[...] = dx.astype(dx3.dtype)
    return sdy, sxmu
