"""Mergeable per-channel Welford/Chan moments."""
import numpy as np

from ._dispatch import array_namespace

__all__ = ["Moments", "merge_moments"]  # update_running: internal (used by every backend)


class Moments:
    """Per-channel moments of a batch: element count, mean and M2.

    M2 is the sum of squared deviations from the mean, so ``var = M2 / (count - ddof)``.
    Partials of disjoint pieces of data (threads, chunks, processes) merge exactly with
    Chan's formula; the merge is associative up to rounding and the result of merging
    the partials of any split equals the moments of the whole.

    Parameters
    ----------
    count : int
        Number of elements per channel (the same for every channel).
    mean, m2 : array of shape (C,)
        Per-channel mean and sum of squared deviations (float64 on the CPU).

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.arange(24, dtype=np.float64).reshape(4, 3, 2)
    >>> whole = fbn.welford(x)
    >>> parts = fbn.welford(x[:1]).merge(fbn.welford(x[1:]))
    >>> parts.count, np.allclose(parts.mean, whole.mean), np.allclose(parts.var(), whole.var())
    (8, True, True)
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count, mean, m2):
        count = int(count)
        if count < 0:
            raise ValueError(f"count must be >= 0, got: count={count}")
        if getattr(mean, "shape", None) != getattr(m2, "shape", None) or np.ndim(mean) != 1:
            raise ValueError("mean and m2 must be 1-D arrays of one shape (C,), got: "
                             f"mean.shape={np.shape(mean)}, m2.shape={np.shape(m2)}")
        self.count = count
        self.mean = mean
        self.m2 = m2

    def __repr__(self):
        return f"Moments(count={self.count}, mean={self.mean!r}, m2={self.m2!r})"

    def var(self, ddof=0):
        """Per-channel variance ``m2 / (count - ddof)``; NaN where count - ddof <= 0.

        Examples
        --------
        >>> import numpy as np, fastbn as fbn
        >>> fbn.welford(np.array([[1.0], [3.0]])).var(ddof=1)
        array([2.])
        """
        return _var(self.count, self.m2, ddof)

    def invstd(self, eps=1e-5):
        """``1 / sqrt(var + eps)`` (biased variance): what batch norm normalizes with.

        The same expression as the CPU core, so ``normalize(x, m.mean, m.invstd(eps))``
        reproduces ``batch_norm_forward`` bit for bit.

        Examples
        --------
        >>> import numpy as np, fastbn as fbn
        >>> fbn.welford(np.array([[1.0], [3.0]])).invstd(eps=0.0)
        array([1.])
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 / np.sqrt(self.m2 / float(self.count) + eps)

    def merge(self, other):
        """Chan's merge of two partials of disjoint data -> a new Moments.

        Examples
        --------
        >>> import numpy as np, fastbn as fbn
        >>> a = fbn.welford(np.array([[1.0], [2.0]]))
        >>> b = fbn.welford(np.array([[3.0], [4.0], [5.0]]))
        >>> m = a.merge(b)
        >>> m.count, m.mean, m.var()
        (5, array([3.]), array([2.]))
        """
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a fastbn.Moments, got: {type(other).__name__}")
        if other.mean.shape != self.mean.shape:
            raise ValueError("cannot merge moments of different channel counts: "
                             f"{self.mean.shape[0]} and {other.mean.shape[0]}")
        if other.count == 0:
            return Moments(self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return Moments(other.count, other.mean.copy(), other.m2.copy())
        # Same expression order as merge_into() in src/bn_kernels.hpp.
        na, nb = float(self.count), float(other.count)
        n = na + nb
        with np.errstate(invalid="ignore"):  # Inf - Inf: the NaN it should give
            d = other.mean - self.mean
            mean = self.mean + d * (nb / n)
            m2 = self.m2 + (other.m2 + (d * d) * (na * nb / n))
            # an Inf or NaN mean: as merge_into (a select, so device arrays never sync)
            finite = d * 0.0 == 0.0
            xp = array_namespace(mean)
            mean = xp.where(finite, mean, self.mean + other.mean)
            m2 = xp.where(finite, m2, d * 0.0)
        return Moments(self.count + other.count, mean, m2)


def _var(count, m2, ddof):
    denom = count - ddof
    if denom <= 0:
        return np.full_like(m2, np.nan)
    return m2 / denom


def merge_moments(moments):
    """Merge an iterable of Moments, left to right (a fixed order: reproducible bits).

    Examples
    --------
    >>> import numpy as np, fastbn as fbn
    >>> x = np.random.default_rng(0).normal(size=(10, 4))
    >>> m = fbn.merge_moments(fbn.welford(part) for part in np.array_split(x, 3))
    >>> m.count, np.allclose(m.var(), x.var(axis=0))
    (10, True)
    """
    it = iter(moments)
    try:
        total = next(it)
    except StopIteration:
        raise ValueError("merge_moments needs at least one Moments") from None
    if not isinstance(total, Moments):
        raise TypeError(f"merge_moments takes fastbn.Moments, got: {type(total).__name__}")
    for m in it:
        total = total.merge(m)
    return total


def update_running(running_mean, running_var, mean, var, count, momentum):
    """In-place PyTorch-convention running-statistics update in the arrays' namespace,
    computed first, then written (the CPU backend has a compiled twin with the same
    expression order and bits)."""
    new_mean = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
    new_var = (1.0 - momentum) * running_var.astype(np.float64) + momentum * (var * (count / (count - 1)))
    running_mean[...] = new_mean
    running_var[...] = new_var
