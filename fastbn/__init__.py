"""fastbn: fast, exact batch normalization for NumPy arrays (and CuPy arrays).

Public API (see README.md and DESIGN.md):

    moments, welford, Moments, merge_moments,
    batch_norm, batch_norm_forward, batch_norm_backward,
    get_backend, set_num_threads, get_num_threads
"""
from ._api import (batch_norm, batch_norm_backward, batch_norm_forward, get_backend,
                   moments, welford)
from ._moments import Moments, merge_moments
from ._threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = ["moments", "welford", "Moments", "merge_moments", "batch_norm",
           "batch_norm_forward", "batch_norm_backward", "get_backend", "set_num_threads",
           "get_num_threads"]


def _openmp_enabled():
    """True when the compiled CPU core was built with OpenMP."""
    from . import _bn_cpu
    return _bn_cpu.openmp_enabled()
