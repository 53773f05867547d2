"""Thread count of the CPU core.

Default: OpenMP's current team size, which honours OMP_NUM_THREADS and threadpoolctl
limits (threadpoolctl sees fastbn's OpenMP runtime). ``set_num_threads(n)`` overrides
both until ``set_num_threads(None)``. Results never depend on the thread count.
"""
import operator

_num_threads = None


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
    global _num_threads
    if n is None:
        _num_threads = None
        return
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be a positive int or None, got: {n!r}") from None
    if n < 1:
        raise ValueError(f"n must be a positive int or None, got: n={n}")
    _num_threads = n


def get_num_threads():
    """Number of threads the next CPU kernel call will use.

    Examples
    --------
    >>> import fastbn as fbn
    >>> fbn.get_num_threads() >= 1
    True
    """
    if _num_threads is not None:
        return _num_threads
    return max(1, _omp_max_threads())


def _omp_max_threads():
    # the compiled core, imported on first use and kept (an import statement per call
    # cost ~1 us of a ~20 us small call)
    global _omp_max_threads
    from ._bn_cpu import max_threads
    _omp_max_threads = max_threads
    return max_threads()
