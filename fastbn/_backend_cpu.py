"""CPU backend: the Cython/OpenMP core on validated (outer, C, inner) NumPy views.

Every function receives views the Python layer (``_api``) already checked and shaped:
the inner axis is contiguous (inner > 1) or the channel axis is (inner == 1); per-channel
parameters are float64 (C,) arrays; outputs are preallocated. Nothing is re-checked.
"""
import numpy as np

from . import _bn_cpu
from ._threads import get_num_threads

name = "cpu"


def moments(x3):
    """-> (count, mean, m2) with float64 mean and M2 (sum of squared deviations)."""
    C = x3.shape[1]
    mean = np.empty(C)
    m2 = np.empty(C)
    count = _bn_cpu.moments(x3, mean, m2, get_num_threads())
    return count, mean, m2


def train_forward(x3, y3, weight, bias, eps):
    """Fused training forward into y3. -> (mean, biased var, invstd), float64 (C,)."""
    C = x3.shape[1]
    mean = np.empty(C)
    var = np.empty(C)
    invstd = np.empty(C)
    _bn_cpu.train_forward(x3, y3, weight, bias, eps, mean, var, invstd, get_num_threads())
    return mean, var, invstd


def normalize(x3, y3, mean, scale, shift):
    """y3 = (x3 - mean) * scale + shift, per channel."""
    _bn_cpu.normalize(x3, y3, mean, scale, shift, get_num_threads())


def backward(dy3, x3, dx3, mean, invstd, weight, frozen):
    """Fused backward into dx3. -> (sum(dy), sum(dy * (x - mean))), float64 (C,)."""
    C = x3.shape[1]
    sdy = np.empty(C)
    sxmu = np.empty(C)
    _bn_cpu.backward(dy3, x3, dx3, mean, invstd, weight, frozen, sdy, sxmu, get_num_threads())
    return sdy, sxmu
