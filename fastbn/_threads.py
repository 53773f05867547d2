"""Thread count of the CPU core.

Default: OpenMP's current team size, which honours OMP_NUM_THREADS and threadpoolctl
limits (threadpoolctl sees fastbn's OpenMP runtime). ``set_num_threads(n)`` overrides
both until ``set_num_threads(None)``. Results never depend on the thread count.
"""
import operator

from . import _bn_cpu  # the count lives in the compiled core, which its plain calls read


def set_num_threads(n):
    """Set the number of threads fastbn's CPU kernels use.

    Parameters
    ----------
    n : int or None
        A positive thread count, or None to go back to the default (OpenMP's team
        size: ``OMP_NUM_THREADS``, threadpoolctl limits, else all cores).

    Examples
    --------
    >>> import fastbn as fbn
    >>> fbn.set_num_threads(1)
    >>> fbn.get_num_threads()
    1
    >>> fbn.set_num_threads(None)
    """
    if n is None:
        _bn_cpu.set_num_threads(0)
        return
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be a positive int or None, got: {n!r}") from None
    if n < 1:
        raise ValueError(f"n must be a positive int or None, got: n={n}")
    _bn_cpu.set_num_threads(min(n, 1 << 30))


def get_num_threads():
    """Number of threads the next CPU kernel call will use.

    Examples
    --------
    >>> import fastbn as fbn
    >>> fbn.get_num_threads() >= 1
    True
    """
    return _bn_cpu.num_threads()
