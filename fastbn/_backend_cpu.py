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
from ._threads import get_num_threads

name = "cpu"

# Below this many elements a call runs on one thread: waking an OpenMP team costs more
# than the work. Measured (2 threads, float32 training forward, whole call, interleaved):
# (16,32,8,8) 17.4 -> 12.8 us on 2 threads, (8,32,8,8) 13.1 -> 10.4 us. The results are
# the same bits either way. (Any multi-threaded call made while another runtime's threads
# spin, e.g. OpenBLAS's after a NumPy matmul, can wait milliseconds for a core; README,
# "Threads".)
_PARALLEL_MIN_ELEMENTS = 1 << 14


# Training forward and backward write outputs at least this large with non-temporal
# (streaming) stores: their second pass re-reads inputs from cache while the output, too
# large to stay cached for its next reader, would otherwise cost a read of every line
# it overwrites. Measured with a warm heap, (32,64,56,56) float32, 2 threads: training
# forward 2.30 -> 2.07 ms, backward 3.21 -> 3.01 ms; (8,256,28,28) float64 training
# 0.86 -> 0.75 ms. Inference (one read, one write) is not streamed: it was slower that
# way (1.43 -> 1.83 ms, 0.42 -> 0.62 ms), reading and streaming at once.
_STREAM_MIN_BYTES = 8 << 20


def _threads(a):
    return 1 if a.size < _PARALLEL_MIN_ELEMENTS else get_num_threads()


def _stream(out3):
    """Streaming stores only where they can write whole cache lines (partial-line
    streaming stores are slow): long rows, rows of channels that follow each other in
    memory (short ones are streamed a block of channels at a time, or not at all: the
    kernels decide per path), rows of a channels-last array that follow each other."""
    if out3.nbytes < _STREAM_MIN_BYTES:
        return False
    outer, C, inner = out3.shape
    if inner > 1:
        return inner * out3.itemsize >= 1024 or (
            inner > _bn_cpu.SHORT_ROW_MAX and out3.strides[1] == inner * out3.itemsize)
    return out3.strides[0] == C * out3.itemsize


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
    _bn_cpu.normalize(x3, y3, mean, scale, shift, _threads(x3), res3, relu, False)


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
