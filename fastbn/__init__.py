"""fastbn: fast, exact batch normalization for NumPy arrays (and CuPy arrays).

Public API (see README.md and DESIGN.md):

    moments, welford, Moments, merge_moments,
    batch_norm, batch_norm_forward, batch_norm_backward,
    normalize, backward_reduce, backward_elementwise      (split primitives)
    BatchNorm                                             (layer)
    fold_batch_norm, frozen_batch_norm_params, population_statistics
    get_backend, set_num_threads, get_num_threads
"""
from ._api import (backward_elementwise, backward_reduce, batch_norm, batch_norm_backward,
                   batch_norm_forward, get_backend, moments, normalize, welford)
from ._inference import fold_batch_norm, frozen_batch_norm_params, population_statistics
from ._layer import BatchNorm, SyncBatchNorm
from ._sync import sync_batch_norm_backward, sync_batch_norm_forward
from ._moments import Moments, merge_moments
from ._threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = ["moments", "welford", "Moments", "merge_moments", "batch_norm",
           "batch_norm_forward", "batch_norm_backward", "normalize", "backward_reduce",
           "backward_elementwise", "BatchNorm", "fold_batch_norm", "frozen_batch_norm_params",
           "population_statistics", "SyncBatchNorm", "sync_batch_norm_forward",
           "sync_batch_norm_backward", "get_backend", "set_num_threads", "get_num_threads"]


def _openmp_enabled():
    """True when the compiled CPU core was built with OpenMP."""
    from . import _bn_cpu
    return _bn_cpu.openmp_enabled()
