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


def train_forward(x3, y3, weight, bias, eps, res3=None, relu=False):
    count, mean, m2 = moments(x3)
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)
    normalize(x3, y3, mean, weight * invstd, bias, res3, relu)
    return mean, var, invstd


def normalize(x3, y3, mean, scale, shift, res3=None, relu=False):
    y = (_f64(x3) - _per_channel(mean)) * _per_channel(scale) + _per_channel(shift)
    if res3 is not None:
        y = y + _f64(res3)
    if relu:
        y = np.where(y < 0, 0.0, y)  # keeps NaN, like torch.relu
    y3[...] = y.astype(y3.dtype)


def _grad(dy3, y3):
    g = _f64(dy3)
    return g if y3 is None else np.where(_f64(y3) > 0, g, 0.0)


def backward_reduce(dy3, x3, mean, y3=None):
    g = _grad(dy3, y3)
    xmu = _f64(x3) - _per_channel(mean)
    return g.sum(axis=_AXES), (g * xmu).sum(axis=_AXES)


def backward_apply(dy3, x3, dx3, mean, a, b, c, frozen, y3=None, dres3=None):
    g = _grad(dy3, y3)
    if dres3 is not None:
        dres3[...] = g.astype(dres3.dtype)
    dx = g * _per_channel(a)
    if not frozen:
        dx = dx + (_f64(x3) - _per_channel(mean)) * _per_channel(b) + _per_channel(c)
    dx3[...] = dx.astype(dx3.dtype)


def backward(dy3, x3, dx3, mean, invstd, weight, frozen, y3=None, dres3=None):
    sdy, sxmu = backward_reduce(dy3, x3, mean, y3)
    a = weight * invstd
    if frozen:
        b = c = np.zeros_like(a)
    else:
        m = x3.shape[0] * x3.shape[2]
        b = -a * invstd * (invstd * sxmu) / m
        c = -a * sdy / m
    backward_apply(dy3, x3, dx3, mean, a, b, c, frozen, y3, dres3)
    return sdy, sxmu
