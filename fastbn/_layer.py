"""BatchNorm layer with the semantics of torch.nn.BatchNorm1d/2d/3d, on fastbn's kernels."""
import contextlib

import numpy as np

from ._api import _xp_for, batch_norm, batch_norm_backward, batch_norm_forward, welford
from ._moments import merge_moments

__all__ = ["BatchNorm", "SyncBatchNorm"]

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class BatchNorm:
    """Batch normalization layer (PyTorch's BatchNorm1d/2d/3d semantics) for NumPy arrays.

    ``forward(x)`` normalizes with the batch statistics in training mode (updating the
    running statistics in place) and with the running statistics in evaluation mode;
    ``backward(dy)`` returns dx and stores ``grad_weight``/``grad_bias``.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        None: cumulative moving average (``1 / num_batches_tracked``).
    affine : bool, default True
        Learnable ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Keep ``running_mean``/``running_var``; without them evaluation mode also uses
        batch statistics, as in PyTorch.
    axis : int, default 1
        Channel axis of the inputs (-1 for channels-last).
    dtype : dtype, default float32
        Dtype of the parameters and running statistics.
    activation : {None, 'relu'}, optional
        Fused activation of the forward (and its gradient in backward).

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> bn = fbn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(4.0, 2.0, size=(16, 3, 5, 5)).astype(np.float32)
    >>> y = bn(x)                                   # training mode: batch statistics
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.grad_bias
    array([400., 400., 400.], dtype=float32)
    >>> int(bn.num_batches_tracked), bn.running_mean.round(1)
    (1, array([0.4, 0.4, 0.4], dtype=float32))
    >>> y_eval = bn.eval()(x)                       # evaluation: running statistics
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, dtype=np.float32, activation=None):
        num_features = int(num_features)
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got: num_features={num_features}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got: activation={activation!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.dtype = np.dtype(dtype)
        self.activation = activation
        self.training = True
        C = num_features
        self.weight = np.ones(C, self.dtype) if affine else None
        self.bias = np.zeros(C, self.dtype) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(C, self.dtype)
            self.running_var = np.ones(C, self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = self.grad_residual = None
        self._cache = None
        self._population = None

    # ------------------------------------------------------------------ device
    def to(self, xp):
        """Move parameters, running statistics and gradients to the array namespace `xp`
        (``numpy``, or ``cupy`` for the CUDA backend), like ``torch.nn.Module.to``.
        Returns self.

        Examples
        --------
        >>> import numpy as np, fastbn as fbn
        >>> bn = fbn.BatchNorm(3).to(np)   # with CuPy: bn.to(cupy), then bn(cupy_x)
        >>> type(bn.weight).__name__
        'ndarray'
        """
        def move(a):
            if a is None:
                return None
            if xp is np:
                return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) \
                    else np.asarray(a)
            return xp.asarray(a)

        for name in ("weight", "bias", "running_mean", "running_var", "grad_weight",
                     "grad_bias"):
            setattr(self, name, move(getattr(self, name)))
        self._cache = None
        return self

    # ------------------------------------------------------------------ modes
    def train(self, mode=True):
        """Set training mode (``mode=False``: evaluation). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set evaluation mode. Returns self."""
        return self.train(False)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    # ------------------------------------------------------------------ passes
    def __call__(self, x, residual=None):
        return self.forward(x, residual)

    def forward(self, x, residual=None):
        """y = activation(BN(x) + residual); caches what backward needs.

        Parameters
        ----------
        x : ndarray
            Input with `num_features` channels on ``self.axis``.
        residual : ndarray, optional
            Added before the activation (shape and dtype of x).
        """
        shape = x.shape if hasattr(x, "shape") else np.shape(x)
        if len(shape) < 2 or not -len(shape) <= self.axis < len(shape) \
                or shape[self.axis] != self.num_features:
            raise ValueError(f"BatchNorm({self.num_features}) expected {self.num_features} "
                             f"channels along axis={self.axis}, got: x.shape={tuple(shape)}")
        if self._population is not None:
            return self._population_forward(x, residual)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            y = batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                           training=False, eps=self.eps, axis=self.axis,
                           activation=self.activation, residual=residual)
            # the statistics this forward used, for backward; invstd is computed there
            # (1/sqrt on every evaluation call cost ~1.2 us of a 5.7 us small call)
            stats = (self.running_mean.copy(), self.running_var.copy(), self.eps)
            self._cache = (x, stats, None, y, True, residual is not None)
            return y
        update = self.training and self.track_running_stats
        momentum = self.momentum
        if update and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        y, mean, invstd = batch_norm_forward(
            x, self.weight, self.bias, self.running_mean if update else None,
            self.running_var if update else None, momentum=0.0 if momentum is None else momentum,
            eps=self.eps, axis=self.axis, activation=self.activation, residual=residual)
        if update:  # only after the call succeeded: bad input changes nothing
            self.num_batches_tracked += 1
        self._cache = (x, mean, invstd, y, False, residual is not None)
        return y

    def backward(self, dy):
        """dx of the last forward; stores ``grad_weight``, ``grad_bias`` (and
        ``grad_residual`` when the forward had a residual). Gradients are overwritten,
        not accumulated. After an evaluation-mode forward, the running statistics and eps
        that forward used are the frozen statistics, whatever changed them since."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first")
        x, mean, invstd, y, frozen, had_residual = self._cache
        if invstd is None:  # evaluation mode: the running statistics the forward used
            mean, var, eps = mean
            invstd = 1.0 / np.sqrt(var.astype(np.float64) + eps)
        relu = self.activation == "relu"
        out = batch_norm_backward(dy, x, mean, invstd, self.weight, training=not frozen,
                                  axis=self.axis, activation=self.activation,
                                  y=y if relu else None, return_residual_grad=had_residual)
        dx, dweight, dbias = out[:3]
        self.grad_residual = out[3] if had_residual else None
        if self.affine:
            self.grad_weight = dweight.astype(self.dtype)
            self.grad_bias = dbias.astype(self.dtype)
        return dx

    # ------------------------------------------------------------------ precise BN
    @contextlib.contextmanager
    def population_mode(self):
        """Recalibrate the running statistics to exact population statistics.

        Inside the block, forward normalizes with batch statistics (as in training) and
        merges every batch's Welford moments; on leaving it without an error,
        ``running_mean``/``running_var`` become the exact mean and unbiased variance of
        all batches seen ("precise BN"), with no momentum approximation.

        Examples
        --------
        >>> import numpy as np, fastbn as fbn
        >>> bn = fbn.BatchNorm(2).eval()
        >>> data = np.random.default_rng(0).normal(1.0, 2.0, size=(300, 2)).astype(np.float32)
        >>> with bn.population_mode():
        ...     for batch in np.array_split(data, 7):
        ...         _ = bn(batch)
        >>> bool(np.allclose(bn.running_var, data.astype(np.float64).var(0, ddof=1), rtol=1e-6))
        True
        """
        if not self.track_running_stats:
            raise RuntimeError("population_mode needs track_running_stats=True")
        self._population = []
        try:
            yield self
            parts = self._population
        finally:
            self._population = None
        if parts:
            total = merge_moments(parts)
            var = total.var(ddof=1)
            self.running_mean[...] = total.mean
            self.running_var[...] = var

    def _population_forward(self, x, residual):
        y, mean, invstd = batch_norm_forward(x, self.weight, self.bias, eps=self.eps,
                                             axis=self.axis, activation=self.activation,
                                             residual=residual)
        self._population.append(welford(x, self.axis))
        self._cache = (x, mean, invstd, y, False, residual is not None)
        return y

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """Parameters and buffers under PyTorch's key names (copies)."""
        state = {}
        if self.affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Load a state dict (fastbn's or ``torch.nn.BatchNorm*d.state_dict()``; tensors
        are converted with ``numpy.asarray``). Everything is checked before anything is
        written."""
        expected = [k for k in _STATE_KEYS
                    if (k in ("weight", "bias") and self.affine)
                    or (k not in ("weight", "bias") and self.track_running_stats)]
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing keys {missing}, unexpected keys "
                           f"{unexpected}")
        new = {}
        for k in expected:
            if k not in state_dict:
                continue
            v = state_dict[k]
            if not hasattr(v, "__cuda_array_interface__"):
                v = np.asarray(v)  # NumPy arrays, CPU tensors, lists
            if k == "num_batches_tracked":
                if v.shape != ():
                    raise ValueError(f"num_batches_tracked must be a scalar, got shape {v.shape}")
                new[k] = int(v)
            else:
                if v.shape != (self.num_features,):
                    raise ValueError(f"{k} must have shape ({self.num_features},), got: "
                                     f"{k}.shape={v.shape}")
                new[k] = v
        for k, v in new.items():
            if k == "num_batches_tracked":
                self.num_batches_tracked = v
            else:
                target = getattr(self, k)
                xp = _xp_for(target)
                if xp is np and not isinstance(v, np.ndarray):
                    v = v.get()  # a device array into a NumPy layer
                target[...] = xp.asarray(v)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name}, activation={self.activation!r})")


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training-mode statistics and gradients span every rank of `comm`
    (data-parallel training; see `sync_batch_norm_forward`).

    Parameters
    ----------
    num_features : int
    comm : mpi4py-style communicator
        ``Get_rank``, ``Get_size``, ``allgather``, ``Allgather``.
    **kwargs
        As for `BatchNorm`.

    Evaluation mode uses the running statistics, which are identical on every rank.
    ``grad_weight``/``grad_bias`` are the gradients of the whole global batch (equal on
    every rank). In population mode each rank accumulates its own batches only.

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> class OneProcess:  # the communicator duck type, for a single process
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    ...     def allgather(self, obj): return [obj]
    ...     def Allgather(self, send, recv): recv[0] = send
    >>> bn = fbn.SyncBatchNorm(3, comm=OneProcess())
    >>> x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    >>> bool(np.allclose(bn(x), fbn.BatchNorm(3)(x), atol=1e-6))
    True
    """

    def __init__(self, num_features, *, comm, **kwargs):
        super().__init__(num_features, **kwargs)
        from ._sync import _check_comm
        _check_comm(comm)
        self.comm = comm

    def forward(self, x, residual=None):
        from ._sync import sync_batch_norm_forward
        if not self.training or self._population is not None:
            return super().forward(x, residual)
        update = self.track_running_stats
        momentum = self.momentum
        if update and momentum is None:
            momentum = 1.0 / (self.num_batches_tracked + 1)
        y, mean, invstd = sync_batch_norm_forward(
            x, self.weight, self.bias, self.running_mean if update else None,
            self.running_var if update else None, comm=self.comm,
            momentum=0.0 if momentum is None else momentum, eps=self.eps, axis=self.axis,
            activation=self.activation, residual=residual)
        if update:
            self.num_batches_tracked += 1
        self._cache = (x, mean, invstd, y, False, residual is not None, True)
        return y

    def backward(self, dy):
        from ._sync import sync_batch_norm_backward
        if self._cache is None or len(self._cache) == 6:
            return super().backward(dy)
        x, mean, invstd, y, _, had_residual, _ = self._cache
        relu = self.activation == "relu"
        out = sync_batch_norm_backward(dy, x, mean, invstd, self.weight, comm=self.comm,
                                       axis=self.axis, activation=self.activation,
                                       y=y if relu else None,
                                       return_residual_grad=had_residual)
        self.grad_residual = out[3] if had_residual else None
        if self.affine:
            self.grad_weight = out[1].astype(self.dtype)
            self.grad_bias = out[2].astype(self.dtype)
        return out[0]
