"""CPU stand-ins of cupy.RawModule / RawKernel over the emulated kernels (runner.cpp)."""
import ctypes
import os
import pathlib
import shutil
import subprocess
import threading

import numpy as np

from fastbn import _cuda_kernels

HERE = pathlib.Path(__file__).resolve().parent
CXX = shutil.which("g++")

_CTYPES = {np.dtype(np.int64): ctypes.c_int64, np.dtype(np.float64): ctypes.c_double,
           np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint64): ctypes.c_uint64}


# The emulation keeps one launch's state in globals (grid and block sizes, the block's
# barriers, shared memory): launches from several host threads take turns, as kernels
# on one stream do.
_LAUNCH_LOCK = threading.Lock()


class EmulatedKernel:
    """kernel(grid, block, args) like cupy.RawKernel; arrays pass their data pointer."""

    def __init__(self, lib, name):
        self.lib, self.name = lib, name

    def __call__(self, grid, block, args, shared_mem=0):
        boxes = []
        for a in args:
            if isinstance(a, np.ndarray):
                boxes.append(ctypes.c_void_p(a.ctypes.data))
            else:
                boxes.append(_CTYPES[np.asarray(a).dtype](a))
        params = (ctypes.c_void_p * len(boxes))(*[ctypes.addressof(b) for b in boxes])
        with _LAUNCH_LOCK:
            status = self.lib.fbn_emu_launch_kernel(self.name.encode(), *grid, *block, params)
        assert status == 0, self.name


class EmulatedModule:
    """cupy.RawModule(code=..., name_expressions=...) stand-in."""

    def __init__(self, lib, name_expressions):
        for name in name_expressions:
            assert lib.fbn_emu_has_kernel(name.encode()), name
        self.lib = lib

    def get_function(self, name):
        return EmulatedKernel(self.lib, name)


def build_module(out):
    """Compile the runner into `out` (a .so path) -> an EmulatedModule."""
    cmd = [CXX, "-std=c++20", "-O1", "-g", "-pthread", "-shared", "-fPIC",
           str(HERE / "runner.cpp"), "-o", str(out)]
    sanitize = os.environ.get("FASTBN_EMU_SANITIZE")
    if sanitize:
        cmd.insert(1, f"-fsanitize={sanitize}")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return load_module(out)


def load_module(path):
    """An EmulatedModule over an already built runner library."""
    lib = ctypes.CDLL(str(path))
    lib.fbn_emu_launch_kernel.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_void_p]
    return EmulatedModule(lib, _cuda_kernels.NAME_EXPRESSIONS)


