"""Launch sequences of the CUDA kernels (fastbn/cuda/bn.cu), written once for any module
with CuPy's RawModule interface (``get_function(name)(grid, block, args)``) and any
array namespace `xp` for the small per-channel arrays.

With ``xp=cupy`` and a ``cupy.RawModule`` they run on the GPU (the CuPy backend, still to
be wired into the dispatcher); the tests run the very same sequences with ``xp=numpy``
and the CPU emulation of the kernels (tests/cuda_emulation), which has the RawModule
call shape. Arguments follow the kernels' signatures exactly: arrays, np.int64 for i64,
np.float64 for double, np.int32 for int, np.uint64(0) for a null pointer.

Every function takes validated (outer, C, inner) views with any element strides.
"""
import numpy as np

from ._cuda_kernels import THREADS, kernel_name, reduction_splits, uses_channels_last_reduction

NULL = np.uint64(0)
_MAX_BLOCKS = 65535


def _i64(v):
    return np.int64(v)


def _strides(a):
    return [_i64(s // a.itemsize) for s in a.strides]


def _blocks(n):
    return int(max(1, min(-(-n // THREADS), _MAX_BLOCKS)))


def _reduction(xp, x3, part_width, out_width):
    """Grid of the per-channel reductions: -> (channels_last, grid, m, splits, chunk,
    partials buffer [C][splits][part_width], result buffer [C][out_width])."""
    outer, C, inner = x3.shape
    m = outer * inner
    channels_last = uses_channels_last_reduction(C, inner)
    splits = reduction_splits(C, m, channels_last)
    chunk = -(-m // splits) if m else 0
    grid = (-(-C // 32) if channels_last else C, splits, 1)
    part = xp.empty((C, splits, part_width), dtype=np.float64)
    out = xp.empty((C, out_width), dtype=np.float64)
    return channels_last, grid, m, splits, chunk, part, out


def moments(module, xp, x3, eps=0.0):
    """-> (count, mean, m2, var, invstd) with float64 (C,) device arrays."""
    C, inner = x3.shape[1], x3.shape[2]
    channels_last, grid, m, splits, chunk, part, out = _reduction(xp, x3, 3, 5)
    so, sc, si = _strides(x3)
    if channels_last:
        module.get_function(kernel_name("fbn_moments_partial_cl", x3.dtype))(
            grid, (THREADS, 1, 1), (x3, _i64(C), so, sc, _i64(m), _i64(chunk), part))
    else:
        module.get_function(kernel_name("fbn_moments_partial", x3.dtype))(
            grid, (THREADS, 1, 1), (x3, _i64(inner), so, sc, si, _i64(m), _i64(chunk), part))
    module.get_function("fbn_moments_finalize")(
        (_blocks(C), 1, 1), (THREADS, 1, 1), (part, _i64(C), _i64(splits), np.float64(eps), out))
    cols = xp.ascontiguousarray(out.T)  # kernels take contiguous (C,) arrays
    return m, cols[1], cols[2], cols[3], cols[4]


def normalize(module, xp, x3, y3, mean, scale, shift, res3=None, relu=False):
    """y3 = relu?((x3 - mean) * scale + shift + res3?) per channel."""
    outer, C, inner = x3.shape
    n = outer * C * inner
    if n == 0:
        return
    rs = _strides(res3) if res3 is not None else [_i64(0)] * 3
    module.get_function(kernel_name("fbn_normalize", x3.dtype))(
        (_blocks(n), 1, 1), (THREADS, 1, 1),
        (x3, y3, NULL if res3 is None else res3, _i64(n), _i64(C), _i64(inner),
         *_strides(x3), *_strides(y3), *rs, mean, scale, shift, np.int32(bool(relu))))


def train_forward(module, xp, x3, y3, weight, bias, eps, res3=None, relu=False):
    """-> (mean, biased var, invstd), float64 (C,)."""
    _, mean, _, var, invstd = moments(module, xp, x3, eps)
    normalize(module, xp, x3, y3, mean, weight * invstd, bias, res3, relu)
    return mean, var, invstd


def backward_reduce(module, xp, dy3, x3, mean, y3=None):
    """-> (sum(g), sum(g * (x - mean))), float64 (C,); g = dy masked by y > 0."""
    C, inner = x3.shape[1], x3.shape[2]
    channels_last, grid, m, splits, chunk, part, out = _reduction(xp, x3, 2, 2)
    ys = _strides(y3) if y3 is not None else [_i64(0)] * 3
    y_arg = NULL if y3 is None else y3
    if channels_last:
        module.get_function(kernel_name("fbn_backward_partial_cl", x3.dtype))(
            grid, (THREADS, 1, 1),
            (dy3, x3, y_arg, _i64(C), *_strides(dy3)[:2], *_strides(x3)[:2], *ys[:2], _i64(m),
             _i64(chunk), mean, part))
    else:
        module.get_function(kernel_name("fbn_backward_partial", x3.dtype))(
            grid, (THREADS, 1, 1),
            (dy3, x3, y_arg, _i64(inner), *_strides(dy3), *_strides(x3), *ys, _i64(m),
             _i64(chunk), mean, part))
    module.get_function("fbn_backward_finalize")(
        (_blocks(C), 1, 1), (THREADS, 1, 1), (part, _i64(C), _i64(splits), out))
    cols = xp.ascontiguousarray(out.T)
    return cols[0], cols[1]


def backward_apply(module, xp, dy3, x3, dx3, mean, a, b, c, frozen, y3=None, dres3=None):
    """dx3 = a*g + b*(x - mean) + c per channel (b = c = 0 with frozen statistics)."""
    outer, C, inner = x3.shape
    n = outer * C * inner
    if n == 0:
        return
    if frozen:
        b = c = xp.zeros_like(a)
    ys = _strides(y3) if y3 is not None else [_i64(0)] * 3
    rs = _strides(dres3) if dres3 is not None else [_i64(0)] * 3
    module.get_function(kernel_name("fbn_backward_elementwise", x3.dtype))(
        (_blocks(n), 1, 1), (THREADS, 1, 1),
        (dy3, x3, NULL if y3 is None else y3, dx3, NULL if dres3 is None else dres3, _i64(n),
         _i64(C), _i64(inner), *_strides(dy3), *_strides(x3), *ys, *_strides(dx3), *rs, mean,
         a, b, c))


def backward(module, xp, dy3, x3, dx3, mean, invstd, weight, frozen, y3=None, dres3=None):
    """Backward with the coefficients of DESIGN.md. -> (sum(g), sum(g*(x-mean)))."""
    sdy, sxmu = backward_reduce(module, xp, dy3, x3, mean, y3)
    m = x3.shape[0] * x3.shape[2]
    a = weight * invstd
    b = -a * invstd * (invstd * sxmu) / m
    c = -a * sdy / m
    backward_apply(module, xp, dy3, x3, dx3, mean, a, b, c, frozen, y3, dres3)
    return sdy, sxmu
