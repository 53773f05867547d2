"""fastbn's public functions: NumPy-style signatures, argument checks, layout, dispatch.

This is the one place that validates arguments and normalizes layout. Backends receive
validated (outer, C, inner) views, float64 (C,) parameters and preallocated outputs,
and never re-check. Running statistics are written only after every check passed and
every kernel ran, so a failing call changes nothing.

The plain call of batch_norm, batch_norm_forward, batch_norm_backward, moments and welford
(NumPy arrays, C-contiguous data of one float dtype, float32/float64 (C,) parameters,
Python float momentum and eps, an int ddof, out= where the kernels can write it directly
(C-contiguous, writable, each input the very same array or apart from it); fused ReLU and
residual included) first goes to the compiled core's ``plain_*`` functions
(fastbn._bn_cpu, "plain calls"): they accept only what these checks accept, run the same
kernels on the same float64 parameters, and return None for anything else, which then
takes the path below. Their point is a call's fixed cost: after a pass over tens of MB the
Python checks run from cold caches (tests/test_plain_calls.py compares the two paths bit
for bit).
"""
import math
import numbers
import operator

import numpy as np

from . import _bn_cpu
from ._bn_cpu import SHORT_ROW_MAX as _SHORT_ROW_MAX
from ._dispatch import _ENV_DATA, _ENV_KEY
from ._dispatch import array_namespace as _xp_for
from ._dispatch import backend_for, backend_name_for, is_cupy_array
from ._moments import Moments, _var, update_running

__all__ = ["moments", "welford", "batch_norm", "batch_norm_forward",
           "batch_norm_backward", "normalize", "backward_reduce", "backward_elementwise",
           "get_backend"]

_NATIVE_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_F64 = np.dtype(np.float64)
_F32 = np.dtype(np.float32)
_DTYPES_TEXT = "float16, float32, float64 or bfloat16"

# Plain calls go to the compiled core (module docstring) unless FASTBN_BACKEND is set
# (checked in os.environ's own mapping: where there is none, they never do).
_PLAIN_CALLS = _ENV_DATA is not None


# ------------------------------------------------------------------ checks

def _is_float_dtype(dt):
    return dt in _NATIVE_FLOATS or (dt.name == "bfloat16" and dt.itemsize == 2)


def _acc_dtype(dt):
    """Dtype of returned statistics/gradients: float64 for float64 data, else float32."""
    return _F64 if dt == _F64 else _F32


def _as_array(a, like=None):
    """`a` as an array of its own type, or (array-likes) of the type of `like`."""
    if type(a) is np.ndarray or is_cupy_array(a):
        return a
    return _xp_for(like).asarray(a)


def _check_data(x, name):
    x = _as_array(x)
    if not _is_float_dtype(x.dtype):
        raise TypeError(f"{name} must be a floating array ({_DTYPES_TEXT}), got: "
                        f"{name}.dtype={x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch, channels, ...), "
                         f"got: {name}.ndim={x.ndim}")
    return x


class _Layout:
    """The (outer, C, inner) view of an array with channel axis `axis`."""

    __slots__ = ("shape", "axis", "C", "channel_shape", "shape3", "count")

    def __init__(self, shape, axis):
        try:
            axis = operator.index(axis)
        except TypeError:
            raise TypeError(f"axis must be an int, got: axis={axis!r}") from None
        ndim = len(shape)
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis={axis} is out of bounds for x.ndim={ndim}")
        k = axis % ndim
        outer = math.prod(shape[:k])
        inner = math.prod(shape[k + 1:])
        self.shape = shape
        self.axis = axis
        self.C = shape[k]
        self.channel_shape = (self.C,)
        self.shape3 = (outer, self.C, inner)
        self.count = outer * inner


# Layouts of recent (shape, axis) pairs: a layout is immutable, and building one costs
# ~1 us of a ~20 us small call.
_LAYOUTS = {}
_LAYOUTS_MAX = 256


def _layout(shape, axis):
    """_Layout(shape, axis), memoized for plain int axes (others are checked each time)."""
    if type(axis) is not int:
        return _Layout(shape, axis)
    key = (shape, axis)
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _Layout(shape, axis)  # raises for a bad axis: nothing is cached
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


def _kernel_ready(v):
    """Strides the CPU kernels take: unit inner stride (inner > 1) or unit channel stride;
    short rows (walked as channels-last columns) also need the channels side by side."""
    item = v.itemsize
    s0, s1, s2 = v.strides
    if s0 % item or s1 % item or s2 % item:
        return False
    C, inner = v.shape[1], v.shape[2]
    if inner > 1:
        return s2 == item and (inner > _SHORT_ROW_MAX or C == 1 or s1 == inner * item)
    return C == 1 or s1 == item


def _view3(a, layout):
    v = a.reshape(layout.shape3)  # a view whenever numpy can make one
    if type(v) is not np.ndarray and is_cupy_array(v):
        return v  # the CUDA kernels take any strides
    # a C-contiguous view (the common call) always has kernel strides: checked first
    return v if v.flags.c_contiguous or _kernel_ready(v) else np.ascontiguousarray(v)


def _check_channel_param(a, name, layout, like=None):
    if type(a) is not np.ndarray:
        a = _as_array(a, like)
    if not _is_float_dtype(a.dtype):
        raise TypeError(f"{name} must be a floating array ({_DTYPES_TEXT}), got: "
                        f"{name}.dtype={a.dtype}")
    if a.shape != layout.channel_shape:
        raise ValueError(f"{name} must have shape ({layout.C},) to match the {layout.C} "
                         f"channels of x along axis={layout.axis}, got: {name}.shape={a.shape}")
    return a.astype(_F64)


def _is_array(a):
    return isinstance(a, np.ndarray) or is_cupy_array(a)


def _writeable(a):
    return getattr(a.flags, "writeable", True)  # CuPy arrays are always writable


def _check_running(a, name, layout):
    if type(a) is not np.ndarray and not _is_array(a):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got: "
                        f"{type(a).__name__}")
    if not _is_float_dtype(a.dtype):
        raise TypeError(f"{name} must be a floating array ({_DTYPES_TEXT}), got: "
                        f"{name}.dtype={a.dtype}")
    if a.shape != layout.channel_shape:
        raise ValueError(f"{name} must have shape ({layout.C},) to match the {layout.C} "
                         f"channels of x along axis={layout.axis}, got: {name}.shape={a.shape}")
    if not _writeable(a):
        raise ValueError(f"{name} is read-only, but running statistics are updated in place")
    return a


def _check_running_pair(running_mean, running_var, layout):
    """Running statistics for a training call: both or neither, writable (C,) arrays."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither "
                         "be None")
    if running_mean is not None:
        _check_running(running_mean, "running_mean", layout)
        _check_running(running_var, "running_var", layout)


def _check_real(v, name, low=None):
    if type(v) is not float and not isinstance(v, numbers.Real):  # float: skip the ABC check
        raise TypeError(f"{name} must be a real number, got: {name}={v!r}")
    v = float(v)
    if not math.isfinite(v) or (low is not None and v < low):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got: {name}={v}")
    return v


def _check_out(out, name, shape, dtype):
    if not _is_array(out):
        raise TypeError(f"{name} must be a numpy.ndarray, got: {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got: {name}.shape={out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got: {name}.dtype={out.dtype}")
    if not _writeable(out):
        raise ValueError(f"{name} is read-only")


def _data_pointer(a):
    return a.data.ptr if is_cupy_array(a) else a.__array_interface__["data"][0]


def _same_view(a, b):
    return _data_pointer(a) == _data_pointer(b) and a.strides == b.strides and a.shape == b.shape


def _empty(xp, shape, dtype):
    """An output array: cache-line aligned for the CPU core's kernels (_bn_cpu.empty_output)."""
    return _bn_cpu.empty_output(shape, dtype) if xp is np else xp.empty(shape, dtype)


def _output(out, name, layout, dtype, inputs3):
    """-> (result array, kernel's (outer, C, inner) target, buffer to copy back or None).

    The kernels write `out` directly when they can: its 3-D view exists without a copy,
    has kernel strides, and aliases no input except as the very same view (an in-place
    call such as out=x is safe: a channel's reduction finishes before it is written)."""
    xp = np if type(inputs3[0]) is np.ndarray else _xp_for(inputs3[0])
    if out is None:
        y = _empty(xp, layout.shape, dtype)
        return y, y.reshape(layout.shape3), None
    _check_out(out, name, layout.shape, dtype)
    y3 = out.reshape(layout.shape3)
    direct = xp.may_share_memory(y3, out) or out.size == 0
    direct = direct and (xp is not np or _kernel_ready(y3)) and not any(
        v is not None and xp.may_share_memory(y3, v) and not _same_view(y3, v) for v in inputs3)
    if direct:
        return out, y3, None
    tmp = _empty(xp, layout.shape, dtype)
    return out, tmp.reshape(layout.shape3), tmp


def _finish(result, tmp):
    if tmp is not None:
        result[...] = tmp
    return result


def _check_training_batch(x, layout):
    if layout.count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {x.shape}")


_ACTIVATIONS = (None, "relu")


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got: activation={activation!r}")
    return activation == "relu"


def _check_like(a, name, x, layout, like="x"):
    """An array that must match x in shape and dtype (residual, dy, y) -> its 3-D view."""
    a = _as_array(a, x)
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the shape of {like} {x.shape}, got: "
                         f"{name}.shape={a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of {like} ({x.dtype}), got: "
                        f"{name}.dtype={a.dtype}")
    return _view3(a, layout)


def _activation_inputs(activation, y, x, layout):
    """The y view that masks the gradient of a fused ReLU (None without activation)."""
    if not _check_activation(activation):
        if y is not None:
            raise ValueError("y is only used with activation='relu' (it masks the gradient)")
        return None
    if y is None:
        raise ValueError("activation='relu' needs y, the forward output, to mask the gradient")
    return _check_like(y, "y", x, layout)


# ------------------------------------------------------------------ statistics

def welford(x, axis=1):
    """Per-channel Welford/Chan moments of `x`, as a mergeable partial.

    Parameters
    ----------
    x : array_like, at least 2-D, floating
        Data with channels along `axis` (float16, float32, float64 or bfloat16).
    axis : int, default 1
        Channel axis (1 for NC..., -1 for channels-last).

    Returns
    -------
    Moments
        ``.count`` elements per channel, float64 ``.mean`` and ``.m2`` of shape (C,).

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(64, 4, 10)).astype(np.float32)
    >>> m = fbn.welford(x)
    >>> m.count, m.mean.shape, m.mean.dtype
    (640, (4,), dtype('float64'))
    """
    if _PLAIN_CALLS and _ENV_KEY not in _ENV_DATA:
        parts = _bn_cpu.plain_welford(x, axis)
        if parts is not None:
            return Moments(*parts)
    return _welford(x, axis)[0]


def _welford(x, axis):
    name, backend = backend_for(x)
    if name == "dask":
        return backend.welford(x, axis), x.dtype
    x = _check_data(x, "x")
    layout = _layout(x.shape, axis)
    count, mean, m2 = backend.moments(_view3(x, layout))
    return Moments(count, mean, m2), x.dtype


def moments(x, axis=1, *, ddof=0):
    """Per-channel mean and variance of `x` over every axis but `axis`.

    One read of the data: per-channel Welford/Chan moments accumulated in float64.

    Parameters
    ----------
    x : array_like, at least 2-D, floating
    axis : int, default 1
        Channel axis.
    ddof : int, default 0
        Delta degrees of freedom: ``var = M2 / (count - ddof)``.

    Returns
    -------
    mean, var : ndarray of shape (C,)
        float64 for float64 input, float32 otherwise. NaN where ``count - ddof <= 0``.

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    >>> mean, var = fbn.moments(x)
    >>> mean, var
    (array([3.5, 5.5, 7.5], dtype=float32), array([9.25, 9.25, 9.25], dtype=float32))
    >>> fbn.moments(x.transpose(0, 2, 1), axis=-1)[0]
    array([3.5, 5.5, 7.5], dtype=float32)
    """
    if _PLAIN_CALLS and _ENV_KEY not in _ENV_DATA:
        result = _bn_cpu.plain_moments(x, axis, ddof)
        if result is not None:
            return result
    try:
        ddof = operator.index(ddof)
    except TypeError:
        raise TypeError(f"ddof must be an int, got: ddof={ddof!r}") from None
    if backend_name_for(x) == "dask":
        from . import _dask
        return _dask.moments(x, axis, ddof)
    m, dtype = _welford(x, axis)
    acc = _acc_dtype(dtype)
    mean = m.mean if m.count else np.full_like(m.mean, np.nan)
    return mean.astype(acc), _var(m.count, m.m2, ddof).astype(acc)


# ------------------------------------------------------------------ forward

def _train(backend, x, weight, bias, running_mean, running_var, momentum, eps, axis, out,
           activation, residual):
    """Shared body of training-mode batch_norm and batch_norm_forward."""
    x = _check_data(x, "x")
    layout = _layout(x.shape, axis)
    relu = _check_activation(activation)
    res3 = None if residual is None else _check_like(residual, "residual", x, layout)
    _check_running_pair(running_mean, running_var, layout)
    w = _xp_for(x).ones(layout.C) if weight is None else _check_channel_param(weight, "weight", layout, x)
    b = _xp_for(x).zeros(layout.C) if bias is None else _check_channel_param(bias, "bias", layout, x)
    momentum = _check_real(momentum, "momentum")
    eps = _check_real(eps, "eps", low=0.0)
    _check_training_batch(x, layout)
    x3 = _view3(x, layout)
    y, y3, tmp = _output(out, "out", layout, x.dtype, (x3, res3))
    if layout.count == 0:  # empty batch: nothing to normalize, statistics undefined
        nan = _xp_for(x).full(layout.C, np.nan)
        return y, nan, nan.copy()
    mean, var, invstd = backend.train_forward(x3, y3, w, b, eps, res3, relu)
    _finish(y, tmp)
    if running_mean is not None:
        getattr(backend, "update_running", update_running)(
            running_mean, running_var, mean, var, layout.count, momentum)
    return y, mean, invstd


def _inference_scale(weight, running_var, eps):
    """weight / sqrt(running_var + eps) for backends without a compiled one (np.sqrt
    dispatches to CuPy's ufunc on CuPy arrays)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return weight / np.sqrt(running_var + eps)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, axis=1, out=None, activation=None,
               residual=None):
    """Batch normalization, with the arguments and semantics of
    ``torch.nn.functional.batch_norm``.

    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` per channel, with the batch's
    statistics when ``training`` (updating the running statistics in place, unbiased
    variance, ``momentum``) and the running statistics otherwise.

    Parameters
    ----------
    x : array_like, at least 2-D, floating
        Input with channels along `axis` (NC, NCL, NCHW, NCDHW, or channels-last with
        ``axis=-1``).
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics; both or neither. Required when ``training`` is False.
        Updated in place when ``training``.
    weight, bias : array_like of shape (C,), optional
        Affine parameters (default 1 and 0).
    training : bool, default False
        Use batch statistics (and update running statistics).
    momentum : float, default 0.1
        ``running = (1 - momentum) * running + momentum * batch_statistic``.
    eps : float, default 1e-5
        Added to the variance.
    axis : int, default 1
        Channel axis.
    out : ndarray, optional
        Where to write y (shape and dtype of x; may be x itself).
    activation : {None, 'relu'}, optional
        Fused activation applied to the result, in the same pass.
    residual : array_like, optional
        Added before the activation (BN+add+ReLU of residual blocks); shape and dtype of x.

    Returns
    -------
    y : ndarray
        Same shape and dtype as x: ``activation(weight * xhat + bias + residual)``.

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.random.default_rng(0).normal(5.0, 3.0, size=(32, 4, 8, 8)).astype(np.float32)
    >>> rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    >>> y = fbn.batch_norm(x, rm, rv, training=True, momentum=0.5)
    >>> bool(abs(y.mean()) < 1e-5), bool(abs(y.std() - 1) < 1e-3)
    (True, True)
    >>> bool(np.allclose(rm, 0.5 * x.mean(axis=(0, 2, 3)), rtol=1e-6))  # momentum 0.5 from 0
    True
    >>> y_eval = fbn.batch_norm(x, rm, rv)  # inference: uses the running statistics
    >>> y_relu = fbn.batch_norm(x, rm, rv, activation="relu", residual=x)  # fused BN+add+ReLU
    >>> bool(y_relu.min() == 0)
    True
    """
    if _PLAIN_CALLS and _ENV_KEY not in _ENV_DATA:
        if training is True:
            y = _bn_cpu.plain_train(x, weight, bias, running_mean, running_var, momentum, eps,
                                    axis, activation, residual, False, out)
        else:
            y = None if training is not False else _bn_cpu.plain_inference(
                x, running_mean, running_var, weight, bias, momentum, eps, axis, activation,
                residual, out)
        if y is not None:
            return y
    name, backend = backend_for(x, running_mean, running_var, weight, bias, out, residual)
    if name == "dask":
        _no_out_for_dask(out)
        return backend.batch_norm(x, running_mean, running_var, weight, bias, training,
                                  momentum, eps, axis, activation, residual)
    if training:
        return _train(backend, x, weight, bias, running_mean, running_var, momentum, eps,
                      axis, out, activation, residual)[0]
    x = _check_data(x, "x")
    layout = _layout(x.shape, axis)
    relu = _check_activation(activation)
    res3 = None if residual is None else _check_like(residual, "residual", x, layout)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var must be defined in evaluation mode "
                         "(training=False)")
    rm = _check_channel_param(running_mean, "running_mean", layout, x)
    rv = _check_channel_param(running_var, "running_var", layout, x)
    w = _xp_for(x).ones(layout.C) if weight is None else _check_channel_param(weight, "weight", layout, x)
    b = _xp_for(x).zeros(layout.C) if bias is None else _check_channel_param(bias, "bias", layout, x)
    _check_real(momentum, "momentum")
    eps = _check_real(eps, "eps", low=0.0)
    x3 = _view3(x, layout)
    y, y3, tmp = _output(out, "out", layout, x.dtype, (x3, res3))
    scale = getattr(backend, "inference_scale", _inference_scale)(w, rv, eps)
    backend.normalize(x3, y3, rm, scale, b, res3, relu)
    return _finish(y, tmp)


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       momentum=0.1, eps=1e-5, axis=1, out=None, activation=None,
                       residual=None):
    """Training-mode batch norm that also returns what backward needs.

    One fused pass per channel: statistics, then normalization while the channel is in
    cache; running statistics (if given) are updated in place.

    Parameters
    ----------
    x : array_like, at least 2-D, floating
    weight, bias : array_like of shape (C,), optional
    running_mean, running_var : ndarray of shape (C,), optional
        Both or neither; updated in place (unbiased variance, `momentum`).
    momentum, eps : float
    axis : int, default 1
    out : ndarray, optional
        Where to write y.
    activation : {None, 'relu'}, optional
        Fused activation (same pass). Keep y: the backward needs it as its mask.
    residual : array_like, optional
        Added before the activation; shape and dtype of x.

    Returns
    -------
    y : ndarray
        Same shape and dtype as x.
    mean, invstd : ndarray of shape (C,)
        Batch mean and ``1/sqrt(var + eps)`` (float64 for float64 x, else float32).

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.random.default_rng(1).normal(size=(16, 3, 5)).astype(np.float32)
    >>> y, mean, invstd = fbn.batch_norm_forward(x, weight=np.full(3, 2.0), bias=np.zeros(3))
    >>> y.shape, mean.dtype, invstd.shape
    ((16, 3, 5), dtype('float32'), (3,))
    """
    if _PLAIN_CALLS and _ENV_KEY not in _ENV_DATA:
        result = _bn_cpu.plain_train(x, weight, bias, running_mean, running_var, momentum, eps,
                                     axis, activation, residual, True, out)
        if result is not None:
            return result
    name, backend = backend_for(x, weight, bias, running_mean, running_var, out, residual)
    if name == "dask":
        _no_out_for_dask(out)
        return backend.batch_norm(x, running_mean, running_var, weight, bias, True, momentum,
                                  eps, axis, activation, residual, return_stats=True)
    y, mean, invstd = _train(backend, x, weight, bias, running_mean, running_var, momentum,
                             eps, axis, out, activation, residual)
    acc = _acc_dtype(y.dtype)
    return y, mean.astype(acc), invstd.astype(acc)


# ------------------------------------------------------------------ backward

def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, axis=1,
                        out=None, activation=None, y=None, return_residual_grad=False):
    """Gradients of batch norm with respect to x, weight and bias.

    Training mode (statistics of the batch, gradient flows through them)::

        dbias   = sum(dy)
        dweight = sum(dy * xhat),  xhat = (x - mean) * invstd
        dx      = weight * invstd / m * (m * dy - dbias - xhat * dweight)

    With ``training=False``, `mean` and `invstd` are frozen running statistics and
    ``dx = dy * weight * invstd``. One fused pass per channel.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to y (shape and dtype of x).
    x : array_like
        The forward input.
    mean, invstd : array_like of shape (C,)
        As returned by `batch_norm_forward` (or ``running_mean`` and
        ``1/sqrt(running_var + eps)`` with ``training=False``).
    weight : array_like of shape (C,), optional
    training : bool, default True
    axis : int, default 1
    out : ndarray, optional
        Where to write dx (may be dy itself).
    activation : {None, 'relu'}, optional
        The forward's fused activation: the gradient is masked where ``y <= 0``.
    y : array_like, optional
        The forward output (required with ``activation='relu'``).
    return_residual_grad : bool, default False
        Also return the gradient of the forward's `residual` (the masked dy).

    Returns
    -------
    dx : ndarray
        Shape and dtype of x.
    dweight, dbias : ndarray of shape (C,)
        float64 for float64 x, else float32.
    dresidual : ndarray
        Only with ``return_residual_grad=True``; shape and dtype of x.

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.random.default_rng(2).normal(size=(8, 3, 4))
    >>> y, mean, invstd = fbn.batch_norm_forward(x)
    >>> dx, dw, db = fbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    >>> bool(np.abs(dx).max() < 1e-12), db  # a constant gradient does not reach x
    (True, array([32., 32., 32.]))
    """
    if _PLAIN_CALLS and _ENV_KEY not in _ENV_DATA:
        result = _bn_cpu.plain_backward(dy, x, mean, invstd, weight, training, axis, activation,
                                        y, return_residual_grad, out)
        if result is not None:
            return result
    _, backend = backend_for(dy, x, mean, invstd, weight, out, y)
    x, dy3, x3, layout, y3 = _check_backward_data(dy, x, axis, activation, y)
    mean = _check_channel_param(mean, "mean", layout, x)
    invstd = _check_channel_param(invstd, "invstd", layout, x)
    w = _xp_for(x).ones(layout.C) if weight is None else _check_channel_param(weight, "weight", layout, x)
    frozen = not training
    if not frozen:
        _check_training_batch(x, layout)
    dx, dx3, tmp = _output(out, "out", layout, x.dtype, (x3, dy3, y3))
    dres, dres3 = _residual_grad_output(return_residual_grad, x, layout, y3, dy3)
    sdy, sxmu = backend.backward(dy3, x3, dx3, mean, invstd, w, frozen, y3, dres3)
    acc = _acc_dtype(x.dtype)
    result = (_finish(dx, tmp), (invstd * sxmu).astype(acc), sdy.astype(acc))
    return result + (dres,) if return_residual_grad else result


def _no_out_for_dask(out):
    if out is not None:
        raise TypeError("out= is not supported for Dask arrays (results are lazy)")


def _check_backward_data(dy, x, axis, activation, y):
    if backend_name_for(dy, x, y) == "dask":
        raise TypeError("the backward functions take NumPy arrays; Dask arrays are supported "
                        "by moments, welford, batch_norm, batch_norm_forward and normalize")
    x = _check_data(x, "x")
    dy = _check_data(dy, "dy")
    layout = _layout(x.shape, axis)
    dy3 = _check_like(dy, "dy", x, layout)
    y3 = _activation_inputs(activation, y, x, layout)
    return x, dy3, _view3(x, layout), layout, y3


def _residual_grad_output(wanted, x, layout, y3, dy3):
    """(dresidual array, its view for the kernel) — the masked dy, or dy itself without an
    activation."""
    if not wanted:
        return None, None
    dres = _empty(_xp_for(x), layout.shape, x.dtype)
    if y3 is None:
        dres.reshape(layout.shape3)[...] = dy3
        return dres, None
    return dres, dres.reshape(layout.shape3)


# ------------------------------------------------------------------ split primitives
# The pieces the one-call functions are made of, public for custom or cross-process
# synchronization: welford -> Moments.merge / merge_moments -> normalize for the forward;
# backward_reduce -> (sum across processes) -> backward_elementwise for the backward.
# With the statistics of one process they give the bits of the one-call functions.

def normalize(x, mean, invstd, weight=None, bias=None, *, axis=1, out=None, activation=None,
              residual=None):
    """Elementwise batch norm with given statistics:
    ``activation((x - mean) * invstd * weight + bias + residual)``.

    The forward's second half: with ``mean = m.mean`` and ``invstd = m.invstd(eps)`` of
    the (merged) ``Moments`` m, it reproduces `batch_norm_forward` bit for bit.

    Parameters
    ----------
    x : array_like, at least 2-D, floating
    mean, invstd : array_like of shape (C,)
    weight, bias : array_like of shape (C,), optional
    axis : int, default 1
    out : ndarray, optional
    activation : {None, 'relu'}, optional
    residual : array_like, optional

    Returns
    -------
    y : ndarray
        Shape and dtype of x.

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 5)).astype(np.float32)
    >>> m = fbn.merge_moments([fbn.welford(x[:3]), fbn.welford(x[3:])])  # e.g. two workers
    >>> y = fbn.normalize(x, m.mean, m.invstd(1e-5))
    >>> bool(np.allclose(y, fbn.batch_norm_forward(x)[0], atol=1e-6))
    True
    """
    name, backend = backend_for(x, mean, invstd, weight, bias, out, residual)
    if name == "dask":
        _no_out_for_dask(out)
        layout = backend._checked(x, axis)
        _check_activation(activation)
        return backend.normalize(x, _check_channel_param(mean, "mean", layout, x),
                                 _check_channel_param(invstd, "invstd", layout, x),
                                 None if weight is None else _check_channel_param(weight, "weight", layout),
                                 None if bias is None else _check_channel_param(bias, "bias", layout),
                                 layout, activation, residual)
    x = _check_data(x, "x")
    layout = _layout(x.shape, axis)
    relu = _check_activation(activation)
    res3 = None if residual is None else _check_like(residual, "residual", x, layout)
    mean = _check_channel_param(mean, "mean", layout, x)
    invstd = _check_channel_param(invstd, "invstd", layout, x)
    w = _xp_for(x).ones(layout.C) if weight is None else _check_channel_param(weight, "weight", layout, x)
    b = _xp_for(x).zeros(layout.C) if bias is None else _check_channel_param(bias, "bias", layout, x)
    x3 = _view3(x, layout)
    y, y3, tmp = _output(out, "out", layout, x.dtype, (x3, res3))
    backend.normalize(x3, y3, mean, w * invstd, b, res3, relu)
    return _finish(y, tmp)


def backward_reduce(dy, x, mean, invstd, *, axis=1, activation=None, y=None):
    """Per-channel reductions of the backward: ``sum(dy)`` and ``sum(dy * xhat)``.

    They are dbias and dweight of the local batch; across processes, sum them (in a fixed
    order) and pass the totals to `backward_elementwise`.

    Parameters
    ----------
    dy, x : array_like
        Gradient of y, and the forward input (one shape and dtype).
    mean, invstd : array_like of shape (C,)
        The statistics the forward normalized with.
    axis : int, default 1
    activation : {None, 'relu'}, optional
    y : array_like, optional
        The forward output, with ``activation='relu'``.

    Returns
    -------
    sum_dy, sum_dy_xhat : ndarray of shape (C,), float64

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.random.default_rng(1).normal(size=(6, 2, 4))
    >>> dy = np.ones_like(x)
    >>> y, mean, invstd = fbn.batch_norm_forward(x)
    >>> sum_dy, sum_dy_xhat = fbn.backward_reduce(dy, x, mean, invstd)
    >>> sum_dy, bool(np.allclose(sum_dy_xhat, 0))
    (array([24., 24.]), True)
    """
    _, backend = backend_for(dy, x, mean, invstd, y)
    x, dy3, x3, layout, y3 = _check_backward_data(dy, x, axis, activation, y)
    mean = _check_channel_param(mean, "mean", layout, x)
    invstd = _check_channel_param(invstd, "invstd", layout, x)
    sdy, sxmu = backend.backward_reduce(dy3, x3, mean, y3)
    return sdy, invstd * sxmu


def backward_elementwise(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, *, axis=1,
                         out=None, activation=None, y=None, return_residual_grad=False):
    """dx of batch norm from the (global) backward sums::

        dx = weight * invstd / count * (count * dy - sum_dy - xhat * sum_dy_xhat)

    `count` is the number of elements per channel the statistics were computed over
    (all processes together). With local sums it reproduces `batch_norm_backward` bit
    for bit.

    Parameters
    ----------
    dy, x : array_like
    mean, invstd : array_like of shape (C,)
    weight : array_like of shape (C,) or None
    sum_dy, sum_dy_xhat : array_like of shape (C,)
        From `backward_reduce`, summed over every piece of the batch.
    count : int
        Elements per channel of the whole batch (> 1).
    axis : int, default 1
    out : ndarray, optional
    activation : {None, 'relu'}, optional
    y : array_like, optional
    return_residual_grad : bool, default False

    Returns
    -------
    dx : ndarray
        (and the residual's gradient with ``return_residual_grad=True``)

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.random.default_rng(2).normal(size=(6, 2, 4))
    >>> dy = np.random.default_rng(3).normal(size=x.shape)
    >>> y, mean, invstd = fbn.batch_norm_forward(x)
    >>> sums = fbn.backward_reduce(dy, x, mean, invstd)
    >>> dx = fbn.backward_elementwise(dy, x, mean, invstd, None, *sums, count=24)
    >>> bool(np.array_equal(dx, fbn.batch_norm_backward(dy, x, mean, invstd)[0]))
    True
    """
    _, backend = backend_for(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, out, y)
    x, dy3, x3, layout, y3 = _check_backward_data(dy, x, axis, activation, y)
    mean = _check_channel_param(mean, "mean", layout, x)
    invstd = _check_channel_param(invstd, "invstd", layout, x)
    w = _xp_for(x).ones(layout.C) if weight is None else _check_channel_param(weight, "weight", layout, x)
    sdy = _check_channel_param(sum_dy, "sum_dy", layout, x)
    sdx = _check_channel_param(sum_dy_xhat, "sum_dy_xhat", layout, x)
    try:
        count = operator.index(count)
    except TypeError:
        raise TypeError(f"count must be an int, got: count={count!r}") from None
    if count < 2:
        raise ValueError(f"count must be > 1 (elements per channel of the whole batch), got: "
                         f"count={count}")
    dx, dx3, tmp = _output(out, "out", layout, x.dtype, (x3, dy3, y3))
    dres, dres3 = _residual_grad_output(return_residual_grad, x, layout, y3, dy3)
    # the expressions of backward_coefficients() in src/bn_kernels.hpp
    a = w * invstd
    b = -a * invstd * sdx / count
    c = -a * sdy / count
    backend.backward_apply(dy3, x3, dx3, mean, a, b, c, False, y3, dres3)
    _finish(dx, tmp)
    return (dx, dres) if return_residual_grad else dx


def get_backend(x):
    """Name of the backend that runs fastbn on `x`: "cpu", "reference", "cuda" or "dask".

    NumPy arrays and array-likes run on "cpu" (the Cython/OpenMP core) unless
    ``FASTBN_BACKEND=reference`` selects the pure-NumPy float64 reference; Dask arrays
    run lazily through "dask" (blocks on the backend of their type).

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> fbn.get_backend(np.zeros((2, 3)))
    'cpu'
    """
    return backend_name_for(x)
