"""Inference tools: folding BN into the previous layer, frozen BN constants, and exact
population statistics ("precise BN")."""
import numpy as np

from ._moments import Moments, merge_moments

__all__ = ["fold_batch_norm", "frozen_batch_norm_params", "population_statistics"]


def _per_channel(name, a, C, dtype):
    a = np.asarray(a, dtype=dtype)
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},), got: {name}.shape={a.shape}")
    return a


def frozen_batch_norm_params(running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Per-channel ``scale, shift`` of batch norm with frozen statistics, so that
    ``y = x * scale + shift`` (torchvision's ``FrozenBatchNorm2d``).

    Computed in float64: ``scale = weight / sqrt(running_var + eps)``,
    ``shift = bias - running_mean * scale``.

    Parameters
    ----------
    running_mean, running_var : array_like of shape (C,)
    weight, bias : array_like of shape (C,), optional
    eps : float, default 1e-5

    Returns
    -------
    scale, shift : ndarray of shape (C,), float64

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> scale, shift = fbn.frozen_batch_norm_params([1.0, 2.0], [4.0, 0.25], eps=0.0)
    >>> scale, shift
    (array([0.5, 2. ]), array([-0.5, -4. ]))
    """
    rm = np.asarray(running_mean, dtype=np.float64)
    if rm.ndim != 1:
        raise ValueError(f"running_mean must be 1-D, got: running_mean.shape={rm.shape}")
    C = rm.shape[0]
    rv = _per_channel("running_var", running_var, C, np.float64)
    w = np.ones(C) if weight is None else _per_channel("weight", weight, C, np.float64)
    b = np.zeros(C) if bias is None else _per_channel("bias", bias, C, np.float64)
    scale = w / np.sqrt(rv + eps)
    return scale, b - rm * scale


def fold_batch_norm(weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None,
                    eps=1e-5, *, transposed=False):
    """Fold an inference-mode batch norm into the convolution or linear layer before it.

    ``bn(layer(x)) == layer'(x)`` with ``W' = W * scale`` along the output-channel axis
    and ``b' = (b - running_mean) * scale + bn_bias``, ``scale = bn_weight /
    sqrt(running_var + eps)`` (``torch.nn.utils.fusion.fuse_conv_bn_weights``).

    Parameters
    ----------
    weight : ndarray
        Layer weight with the output channel on axis 0 (convolution ``(out, in, *k)``,
        linear ``(out, in)``), or on axis 1 with ``transposed=True`` (transposed
        convolution ``(in, out, *k)``).
    bias : ndarray of shape (out,) or None
    running_mean, running_var : array_like of shape (out,)
    bn_weight, bn_bias : array_like of shape (out,), optional
    eps : float, default 1e-5
    transposed : bool, default False

    Returns
    -------
    folded_weight, folded_bias : ndarray
        In the dtype of `weight`.

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> W, b = np.ones((2, 3)), np.zeros(2)          # linear layer 3 -> 2
    >>> Wf, bf = fbn.fold_batch_norm(W, b, [1.0, 0.0], [4.0, 1.0], eps=0.0)
    >>> Wf, bf
    (array([[0.5, 0.5, 0.5],
           [1. , 1. , 1. ]]), array([-0.5,  0. ]))
    """
    weight = np.asarray(weight)
    if weight.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got: weight.ndim={weight.ndim}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise TypeError(f"weight must be floating, got: weight.dtype={weight.dtype}")
    axis = 1 if transposed else 0
    C = weight.shape[axis]
    scale, shift = frozen_batch_norm_params(
        _per_channel("running_mean", running_mean, C, np.float64), running_var, bn_weight,
        bn_bias, eps)
    shape = [1] * weight.ndim
    shape[axis] = C
    folded_weight = (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)
    b = np.zeros(C) if bias is None else _per_channel("bias", bias, C, np.float64)
    folded_bias = (b * scale + shift).astype(weight.dtype)
    return folded_weight, folded_bias


def population_statistics(batches, axis=1):
    """Exact population mean and unbiased variance over many batches ("precise BN").

    Merges the Welford moments of every batch (uneven sizes are exact), instead of the
    momentum average of running statistics. Use it to recalibrate running statistics
    after training (see also ``BatchNorm.population_mode``).

    Parameters
    ----------
    batches : iterable of array_like or of Moments
        Batches of data with channels on `axis`, or their ``welford`` partials.
    axis : int, default 1

    Returns
    -------
    mean, var : ndarray of shape (C,), float64
        ``var`` is unbiased (``ddof=1``), like running_var.

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> data = np.random.default_rng(0).normal(2.0, 3.0, size=(1000, 4))
    >>> mean, var = fbn.population_statistics(np.array_split(data, 7))
    >>> bool(np.allclose(mean, data.mean(0)) and np.allclose(var, data.var(0, ddof=1)))
    True
    """
    from ._api import welford

    def partials():
        for b in batches:
            yield b if isinstance(b, Moments) else welford(b, axis)

    total = merge_moments(partials())
    return total.mean.copy(), total.var(ddof=1)
