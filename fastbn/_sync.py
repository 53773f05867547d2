"""Synchronized batch norm across processes (data-parallel training) over MPI.

The communicator is any object with the mpi4py ``Comm`` methods used here (duck type):
``Get_rank()``, ``Get_size()``, ``allgather(obj)`` (small Python objects) and
``Allgather(sendbuf, recvbuf)`` (arrays). ``mpi4py.MPI.COMM_WORLD`` or any
sub-communicator works; fastbn never imports mpi4py itself.

Forward: every rank computes its local Welford moments (count, mean, M2), all ranks
exchange them with one Allgather and merge them with Chan's formula in rank order, so
every rank gets bitwise identical statistics (uneven batch sizes are exact; a rank with
no samples is allowed), then normalizes its own piece. Backward: the per-channel sums
(sum dy, sum dy*xhat) of every rank are exchanged the same way and added in rank order,
then each rank computes its own dx.

Before the data exchange the ranks exchange a small status record (channel count, dtype,
axis, and any local argument error), so a bad or mismatched rank makes every rank raise
a clear error instead of leaving the others waiting in a collective.
"""
import sys

import numpy as np

from . import _api
from ._api import backward_elementwise, backward_reduce, normalize, welford
from . import _moments
from ._moments import Moments

__all__ = ["sync_batch_norm_forward", "sync_batch_norm_backward"]


class SyncError(RuntimeError):
    """Raised on every rank when any rank failed or disagreed."""


def _check_comm(comm):
    for method in ("Get_rank", "Get_size", "allgather", "Allgather"):
        if not callable(getattr(comm, method, None)):
            raise TypeError(f"comm must be an mpi4py-style communicator with {method}(), got: "
                            f"{type(comm).__name__}")


def _agree(comm, local_error, C, dtype, axis):
    """Exchange (error, C, dtype, axis) of every rank; raise the same error everywhere when
    a rank failed or the ranks disagree."""
    record = (None if local_error is None else f"{type(local_error).__name__}: {local_error}",
              C, str(dtype), axis)
    records = comm.allgather(record)
    for rank, (err, *_) in enumerate(records):
        if err is not None:
            if local_error is not None:
                raise local_error
            raise SyncError(f"synchronized batch norm failed on rank {rank}: {err}")
    shapes = {(c, d) for _, c, d, _ in records}
    if len(shapes) > 1:
        detail = ", ".join(f"rank {r}: C={c} dtype={d}" for r, (_, c, d, _) in enumerate(records))
        raise SyncError(f"ranks disagree on the channel count or dtype ({detail})")


def _allgather_rows(comm, xp, count, *vectors):
    """Gather one float64 row [count, *vectors] per rank -> (size, width) array of the
    namespace xp, rows in rank order. With CuPy arrays the buffers stay on the device
    (mpi4py passes them to a CUDA-aware MPI through __cuda_array_interface__)."""
    row = xp.concatenate([xp.full(1, float(count))] + [v.astype(np.float64) for v in vectors])
    out = xp.empty((comm.Get_size(), row.shape[0]), dtype=np.float64)
    if xp is not np:
        sys.modules["cupy"].cuda.get_current_stream().synchronize()  # row is ready
    comm.Allgather(row, out)
    return out


def _local(fn):
    """Run fn() and return (result, exception) instead of raising."""
    try:
        return fn(), None
    except Exception as e:  # reported to every rank by _agree
        return None, e


def sync_batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                            *, comm, momentum=0.1, eps=1e-5, axis=1, out=None,
                            activation=None, residual=None):
    """Training-mode batch norm with statistics over the batches of all ranks of `comm`.

    Same arguments and results as `batch_norm_forward`, plus `comm`. Every rank passes
    its own piece of the global batch (any size, also empty; channels and dtype must
    agree) and gets its piece of y; ``mean``, ``invstd`` and the updated running
    statistics are the global ones, identical on every rank.

    Examples
    --------
    Under ``mpirun -n 4 python script.py`` each rank passes its piece with
    ``comm=mpi4py.MPI.COMM_WORLD``. Here, a one-process stand-in of the duck type:

    >>> import numpy as np, fastbn as fbn
    >>> class OneProcess:
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    ...     def allgather(self, obj): return [obj]
    ...     def Allgather(self, send, recv): recv[0] = send
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4))
    >>> y, mean, invstd = fbn.sync_batch_norm_forward(x, comm=OneProcess())
    >>> bool(np.allclose(y, fbn.batch_norm_forward(x)[0]))
    True
    """
    _check_comm(comm)
    xa = np.asarray(x) if not hasattr(x, "shape") else x

    def local_moments():
        # every check of the local arguments happens before the exchange, so no rank can
        # fail (and leave running statistics out of step) after it
        xc = _api._check_data(xa, "x")
        layout = _api._Layout(xc.shape, axis)
        _api._check_running_pair(running_mean, running_var, layout)
        for name, p in (("weight", weight), ("bias", bias)):
            if p is not None:
                _api._check_channel_param(p, name, layout)
        if residual is not None:
            _api._check_like(residual, "residual", xc, layout)
        _api._check_activation(activation)
        if out is not None:
            _api._check_out(out, "out", layout.shape, xc.dtype)
        _api._check_real(momentum, "momentum")
        _api._check_real(eps, "eps", low=0.0)
        return welford(xc, axis)

    local, error = _local(local_moments)
    C = local.mean.shape[0] if local is not None else None
    _agree(comm, error, C, getattr(xa, "dtype", None), axis)
    xp = _api._xp_for(local.mean)
    rows = _allgather_rows(comm, xp, local.count, local.mean, local.m2)
    total = Moments(0, xp.zeros(C), xp.zeros(C))
    for row in rows:  # rank order: the same bits on every rank
        total = total.merge(Moments(int(row[0]), row[1:C + 1], row[C + 1:]))
    if total.count <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got "
                         f"{total.count} over all ranks")
    invstd = total.invstd(eps)
    y = normalize(xa, total.mean, invstd, weight, bias, axis=axis, out=out,
                  activation=activation, residual=residual)
    if running_mean is not None:
        _moments.update_running(running_mean, running_var, total.mean, total.m2 / total.count,
                             total.count, momentum)
    acc = np.float64 if y.dtype == np.float64 else np.float32
    return y, total.mean.astype(acc), invstd.astype(acc)


def sync_batch_norm_backward(dy, x, mean, invstd, weight=None, *, comm, axis=1, out=None,
                             activation=None, y=None, return_residual_grad=False):
    """Backward of `sync_batch_norm_forward`: (dx, dweight, dbias[, dresidual]).

    The per-channel sums of every rank are exchanged and added in rank order, so
    ``dweight`` and ``dbias`` are the gradients of the whole global batch, identical on
    every rank (PyTorch's SyncBatchNorm returns each rank's share and leaves the sum to
    DistributedDataParallel), and dx is each rank's piece of the global dx.

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> class OneProcess:
    ...     def Get_rank(self): return 0
    ...     def Get_size(self): return 1
    ...     def allgather(self, obj): return [obj]
    ...     def Allgather(self, send, recv): recv[0] = send
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4))
    >>> dy = np.ones_like(x)
    >>> y, mean, invstd = fbn.sync_batch_norm_forward(x, comm=OneProcess())
    >>> dx, dweight, dbias = fbn.sync_batch_norm_backward(dy, x, mean, invstd, comm=OneProcess())
    >>> dbias
    array([32., 32., 32.])
    """
    _check_comm(comm)
    xa = np.asarray(x) if not hasattr(x, "shape") else x
    local, error = _local(lambda: backward_reduce(dy, xa, mean, invstd, axis=axis,
                                                  activation=activation, y=y))
    C = local[0].shape[0] if local is not None else None
    _agree(comm, error, C, getattr(xa, "dtype", None), axis)
    count = xa.size // C if C else 0
    xp = _api._xp_for(local[0])
    rows = _allgather_rows(comm, xp, count, local[0], local[1])
    total_count = 0
    sum_dy = xp.zeros(C)
    sum_dy_xhat = xp.zeros(C)
    for row in rows:  # rank order
        total_count += int(row[0])
        sum_dy = sum_dy + row[1:C + 1]
        sum_dy_xhat = sum_dy_xhat + row[C + 1:]
    result = backward_elementwise(dy, xa, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                  total_count, axis=axis, out=out, activation=activation, y=y,
                                  return_residual_grad=return_residual_grad)
    acc = np.float64 if xa.dtype == np.float64 else np.float32
    grads = (sum_dy_xhat.astype(acc), sum_dy.astype(acc))
    if return_residual_grad:
        dx, dres = result
        return (dx,) + grads + (dres,)
    return (result,) + grads
