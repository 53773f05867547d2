"""CUDA backend for CuPy arrays: the kernels of fastbn/cuda/bn.cu in one RawModule,
compiled lazily (NVRTC, on first use) and memoized per device, launched by the shared
sequences of fastbn/_cuda_launch.py. Imported only for CuPy inputs, i.e. after the user
imported CuPy. Same interface as the CPU backend: validated (outer, C, inner) views
(any strides), float64 (C,) per-channel device arrays, preallocated outputs.
"""
import numpy as np

import cupy

from . import _cuda_kernels, _cuda_launch

name = "cuda"


@cupy.memoize(for_each_device=True)
def _module():
    return cupy.RawModule(code=_cuda_kernels.source(), options=_cuda_kernels.COMPILE_OPTIONS,
                          name_expressions=list(_cuda_kernels.NAME_EXPRESSIONS))


def _supported(a):
    if np.dtype(a.dtype) not in _cuda_kernels.TYPE_NAMES:
        raise TypeError(f"the CUDA backend takes float16, float32 or float64 data, got: "
                        f"dtype={a.dtype}")


def moments(x3):
    _supported(x3)
    count, mean, m2, _, _ = _cuda_launch.moments(_module(), cupy, x3)
    return count, mean, m2


def train_forward(x3, y3, weight, bias, eps, res3=None, relu=False):
    _supported(x3)
    return _cuda_launch.train_forward(_module(), cupy, x3, y3, weight, bias, eps, res3, relu)


def normalize(x3, y3, mean, scale, shift, res3=None, relu=False):
    _supported(x3)
    _cuda_launch.normalize(_module(), cupy, x3, y3, mean, scale, shift, res3, relu)


def backward(dy3, x3, dx3, mean, invstd, weight, frozen, y3=None, dres3=None):
    _supported(x3)
    return _cuda_launch.backward(_module(), cupy, dy3, x3, dx3, mean, invstd, weight, frozen,
                                 y3, dres3)


def backward_reduce(dy3, x3, mean, y3=None):
    _supported(x3)
    return _cuda_launch.backward_reduce(_module(), cupy, dy3, x3, mean, y3)


def backward_apply(dy3, x3, dx3, mean, a, b, c, frozen, y3=None, dres3=None):
    _supported(x3)
    _cuda_launch.backward_apply(_module(), cupy, dy3, x3, dx3, mean, a, b, c, frozen, y3, dres3)
