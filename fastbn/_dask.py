"""Dask arrays: lazy batch-norm statistics and normalization.

Statistics are one ``dask.array.reduction``: the chunk step is fastbn's own Welford on the
block (NumPy blocks run the CPU core), the combine and aggregate steps are Chan merges in
a fixed order. Normalization is a ``map_blocks`` of ``fastbn.normalize`` with the merged
statistics. Everything stays lazy, except that a training call given running statistics
(NumPy arrays updated in place) computes the statistics right away.

This module is imported only for Dask inputs, that is, once the user imported Dask.
"""
import functools

import numpy as np

import dask.array as da
from dask.array.core import _concatenate2
from dask.utils import deepmap

from . import _api
from . import _moments
from ._moments import Moments

# one record per channel: count, mean, M2 (kept together through the reduction)
STATS = np.dtype([("n", "f8"), ("mean", "f8"), ("m2", "f8")])


def _block_moments(x, axis, keepdims=True, channel_axis=1, computing_meta=False, **kwargs):
    """Chunk step: the block's per-channel Welford moments, in keepdims shape."""
    shape = [1] * x.ndim
    shape[channel_axis] = x.shape[channel_axis]
    out = np.zeros(shape, dtype=STATS)
    if computing_meta or x.size == 0:
        return out
    m = _api.welford(x, channel_axis)  # NumPy blocks on the CPU core, CuPy blocks on CUDA
    out["n"] = m.count
    out["mean"] = _host(m.mean).reshape(shape)
    out["m2"] = _host(m.m2).reshape(shape)
    return out


def _host(a):
    """A (C,) per-channel array on the host (the partials are tiny)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _merge(parts, axis, keepdims=True, computing_meta=False, **kwargs):
    """Combine/aggregate step: Chan-merge the partials along the reduced axes, in C
    order of the blocks (a fixed order: reproducible bits)."""
    if not isinstance(parts, list):
        parts = [parts]
    stacked = _concatenate2(deepmap(lambda p: p, parts), axes=axis)
    if computing_meta:
        return stacked
    reduced = sorted(a % stacked.ndim for a in axis)
    kept = [a for a in range(stacked.ndim) if a not in reduced]
    flat = stacked.transpose(reduced + kept).reshape(-1, *[stacked.shape[a] for a in kept])
    total = np.zeros(flat.shape[1:], dtype=STATS)
    for part in flat:  # merge_into() of bn_kernels.hpp, elementwise over channels
        nb = part["n"]
        na = total["n"]
        n = na + nb
        first = (na == 0) & (nb > 0)
        both = (na > 0) & (nb > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = part["mean"] - total["mean"]
            mean = total["mean"] + d * (nb / n)
            m2 = total["m2"] + (part["m2"] + (d * d) * (na * nb / n))
        total["mean"] = np.where(first, part["mean"], np.where(both, mean, total["mean"]))
        total["m2"] = np.where(first, part["m2"], np.where(both, m2, total["m2"]))
        total["n"] = n
    out_shape = list(stacked.shape)
    for a in reduced:
        out_shape[a] = 1
    total = total.reshape(out_shape)
    if not keepdims:
        total = total.reshape([s for i, s in enumerate(out_shape) if i not in reduced])
    return total


def _stats(x, layout):
    """Lazy per-channel records (C,) of dtype STATS."""
    k = layout.axis % x.ndim
    reduce_axes = tuple(a for a in range(x.ndim) if a != k)
    return da.reduction(x, functools.partial(_block_moments, channel_axis=k), _merge,
                        combine=_merge, axis=reduce_axes, keepdims=False, dtype=STATS,
                        concatenate=False, meta=np.zeros(0, dtype=STATS))


def _checked(x, axis):
    if not _api._is_float_dtype(x.dtype):
        raise TypeError(f"x must be a floating array ({_api._DTYPES_TEXT}), got: "
                        f"x.dtype={x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch, channels, ...), got: "
                         f"x.ndim={x.ndim}")
    if any(np.isnan(c) for chunks in x.chunks for c in chunks):
        raise ValueError("x has unknown chunk sizes; call x.compute_chunk_sizes() first")
    return _api._Layout(x.shape, axis)


def welford(x, axis=1):
    layout = _checked(x, axis)
    s = _stats(x, layout)
    return Moments(layout.count, s["mean"], s["m2"])


def moments(x, axis=1, ddof=0):
    m = welford(x, axis)
    acc = _api._acc_dtype(x.dtype)
    if m.count == 0:
        nan = da.full(m.mean.shape, np.nan, dtype=acc)
        return nan, nan
    denom = m.count - ddof
    var = m.m2 / denom if denom > 0 else da.full(m.m2.shape, np.nan)
    return m.mean.astype(acc), var.astype(acc)


def _broadcast(v, x, layout):
    """A (C,) vector as an array of x's ndim, chunked like x along the channel axis."""
    k = layout.axis % x.ndim
    shape = [1] * x.ndim
    shape[k] = layout.C
    v = da.asarray(v).reshape(shape)
    chunks = [(1,)] * x.ndim
    chunks[k] = x.chunks[k]
    return v.rechunk(tuple(chunks))


def _normalize_block(xb, mean, invstd, weight, bias, channel_axis, activation, residual=None):
    xp = _api._xp_for(xb)  # the per-channel constants follow the block to its device
    flat = [xp.asarray(v.reshape(-1)) for v in (mean, invstd, weight, bias)]
    return _api.normalize(xb, flat[0], flat[1], flat[2], flat[3], axis=channel_axis,
                          activation=activation, residual=residual)


def normalize(x, mean, invstd, weight, bias, layout, activation=None, residual=None):
    k = layout.axis % x.ndim
    ones = np.ones(layout.C)
    args = [x] + [_broadcast(v, x, layout) for v in (
        mean, invstd, ones if weight is None else weight, 0 * ones if bias is None else bias)]
    if residual is not None:
        args.append(da.asarray(residual).rechunk(x.chunks))
    return da.map_blocks(
        lambda xb, m, s, w, b, *r: _normalize_block(xb, m, s, w, b, k, activation, *r),
        *args, dtype=x.dtype, meta=x._meta)


def _param(v, name, layout):
    return None if v is None else _api._check_channel_param(v, name, layout)


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
               activation=None, residual=None, return_stats=False):
    layout = _checked(x, axis)
    _api._check_activation(activation)
    w, b = _param(weight, "weight", layout), _param(bias, "bias", layout)
    momentum = _api._check_real(momentum, "momentum")
    eps = _api._check_real(eps, "eps", low=0.0)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be defined in evaluation "
                             "mode (training=False)")
        rm = _param(running_mean, "running_mean", layout)
        rv = _param(running_var, "running_var", layout)
        return normalize(x, rm, 1.0 / np.sqrt(rv + eps), w, b, layout, activation, residual)
    _api._check_running_pair(running_mean, running_var, layout)
    _api._check_training_batch(x, layout)
    m = welford(x, axis)
    if running_mean is not None:  # in-place update: the statistics are needed now
        mean, m2 = da.compute(m.mean, m.m2)
        m = Moments(m.count, mean, m2)
        _moments.update_running(running_mean, running_var, mean, m2 / m.count, m.count, momentum)
    invstd = m.invstd(eps)
    y = normalize(x, m.mean, invstd, w, b, layout, activation, residual)
    if return_stats:
        acc = _api._acc_dtype(x.dtype)
        return y, m.mean.astype(acc), invstd.astype(acc)
    return y
