"""CPU backend: the Cython/OpenMP core on validated (outer, C, inner) NumPy views.

Every function receives views the Python layer (``_api``) already checked and shaped:
the inner axis is contiguous (inner > 1) or the channel axis is (inner == 1); per-channel
parameters are float64 (C,) arrays; outputs are preallocated. Nothing is re-checked.
Optional fused extras: ``res3`` (residual added before the activation), ``relu``,
``y3`` (forward output of a fused ReLU, masks the gradient), ``dres3`` (OUT: the masked
gradient, i.e. the residual's gradient).
"""
import numpy as np

from . import _bn_cpu, _moments

name = "cpu"

# Threads (one below ~16k elements) and streaming stores (outputs of 8 MB+ whose lines
# are written whole): policies of the compiled core, which its plain calls share.
def _threads(a):
    return _bn_cpu.threads_for(a.size)


_stream = _bn_cpu.stream_output


_RUNNING_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def update_running(running_mean, running_var, mean, var, count, momentum):
    """The PyTorch-convention running-statistics update in place (one compiled loop for
    float32/float64 statistics: a small call's NumPy update costs ~5 us)."""
    dt = running_mean.dtype
    if dt != running_var.dtype or dt not in _RUNNING_DTYPES or np.may_share_memory(
            running_mean, running_var):
        return _moments.update_running(running_mean, running_var, mean, var, count, momentum)
    _bn_cpu.update_running(running_mean, running_var, mean, var, float(count), momentum)


def inference_scale(weight, running_var, eps):
    """weight / sqrt(running_var + eps), float64 (C,), in one compiled loop."""
    scale = np.empty(weight.shape[0])
    if scale.size:
        _bn_cpu.inference_scale(weight, running_var, eps, scale)
    return scale


def moments(x3):
    """-> (count, mean, m2) with float64 mean and M2 (sum of squared deviations)."""
    C = x3.shape[1]
    mean = np.empty(C)
    m2 = np.empty(C)
    count = _bn_cpu.moments(x3, mean, m2, _threads(x3))
    return count, mean, m2


def train_forward(x3, y3, weight, bias, eps, res3=None, relu=False):
    """Fused training forward into y3. -> (mean, biased var, invstd), float64 (C,)."""
    C = x3.shape[1]
    mean = np.empty(C)
    var = np.empty(C)
    invstd = np.empty(C)
    _bn_cpu.train_forward(x3, y3, weight, bias, eps, mean, var, invstd, _threads(x3),
                          res3, relu, _stream(y3))
    return mean, var, invstd


def normalize(x3, y3, mean, scale, shift, res3=None, relu=False):
    """y3 = relu?((x3 - mean) * scale + shift + res3?), per channel."""
    _bn_cpu.normalize(x3, y3, mean, scale, shift, _threads(x3), res3, relu,
                      _bn_cpu.inference_stream(y3))


def backward(dy3, x3, dx3, mean, invstd, weight, frozen, y3=None, dres3=None):
    """Fused backward into dx3. -> (sum(g), sum(g * (x - mean))), float64 (C,)."""
    C = x3.shape[1]
    sdy = np.empty(C)
    sxmu = np.empty(C)
    _bn_cpu.backward(dy3, x3, dx3, mean, invstd, weight, frozen, sdy, sxmu, _threads(x3),
                     y3, dres3, _stream(dx3))
    return sdy, sxmu


def backward_reduce(dy3, x3, mean, y3=None):
    """-> (sum(g), sum(g * (x - mean))), float64 (C,)."""
    C = x3.shape[1]
    sdy = np.empty(C)
    sxmu = np.empty(C)
    _bn_cpu.backward_reduce(dy3, x3, mean, sdy, sxmu, _threads(x3), y3)
    return sdy, sxmu


def backward_apply(dy3, x3, dx3, mean, a, b, c, frozen, y3=None, dres3=None):
    """dx3 = a*g + b*(x - mean) + c per channel."""
    _bn_cpu.backward_apply(dy3, x3, dx3, mean, a, b, c, frozen, _threads(x3), y3, dres3,
                           _stream(dx3))
