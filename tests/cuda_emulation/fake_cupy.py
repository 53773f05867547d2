"""A stand-in `cupy` module for tests on machines without a GPU: NumPy-backed arrays of
their own type (so fastbn dispatches them to the CUDA backend) and a RawModule that runs
the CUDA kernels under the CPU emulation. It is not CuPy: no device memory, no streams,
no NVRTC."""
import functools
import types

import numpy as np


class FakeCupyArray(np.ndarray):
    @property
    def data(self):  # cupy.ndarray.data.ptr
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _dev(a):
    return np.asarray(a).view(FakeCupyArray)


def _fake_cupy(emulated):
    fake = types.ModuleType("cupy")
    fake.ndarray = FakeCupyArray
    fake.asarray = lambda a, dtype=None: _dev(np.asarray(a, dtype))
    fake.ascontiguousarray = lambda a: _dev(np.ascontiguousarray(a))
    fake.asfortranarray = lambda a: _dev(np.asfortranarray(a))
    fake.empty_like = lambda a: _dev(np.empty_like(a))
    fake.asnumpy = np.asarray
    fake.where = lambda cond, a, b: _dev(np.where(cond, a, b))
    fake.empty = lambda shape, dtype=float: _dev(np.empty(shape, dtype))
    fake.zeros = lambda shape, dtype=float: _dev(np.zeros(shape, dtype))
    fake.ones = lambda shape, dtype=float: _dev(np.ones(shape, dtype))
    fake.full = lambda shape, v, dtype=None: _dev(np.full(shape, v, dtype))
    fake.zeros_like = lambda a: _dev(np.zeros_like(a))
    fake.may_share_memory = np.may_share_memory
    fake.concatenate = lambda arrays: _dev(np.concatenate([np.asarray(a) for a in arrays]))
    stream = types.SimpleNamespace(synchronize=lambda: None)
    fake.cuda = types.SimpleNamespace(get_current_stream=lambda: stream)
    fake.memoize = lambda for_each_device=False: functools.lru_cache(maxsize=None)

    class RawModule:
        def __init__(self, code, options=(), name_expressions=()):
            assert "fbn_moments_partial" in code and tuple(options) == ("--std=c++11",)
            self._names = set(name_expressions)

        def get_function(self, name):
            assert name in self._names, name
            return emulated.get_function(name)

    fake.RawModule = RawModule
    return fake


