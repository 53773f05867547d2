"""The CUDA kernels' source and instantiations: one RawModule per .cu file, compiled with
these name expressions (shared by the CuPy backend and the NVRTC compile gate in the
tests; importing this module never imports CuPy)."""
import os

import numpy as np

KERNEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "bn.cu")
THREADS = 256  # FBN_THREADS in bn.cu

# numpy dtype -> template argument
TYPE_NAMES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
              np.dtype(np.float16): "fbn_half"}
TEMPLATE_KERNELS = ("fbn_moments_partial", "fbn_normalize", "fbn_backward_partial",
                    "fbn_backward_elementwise")
PLAIN_KERNELS = ("fbn_moments_finalize", "fbn_backward_finalize")
NAME_EXPRESSIONS = tuple(f"{k}<{t}>" for t in TYPE_NAMES.values() for k in TEMPLATE_KERNELS) \
    + PLAIN_KERNELS
COMPILE_OPTIONS = ("--std=c++11",)


def source():
    with open(KERNEL_FILE) as f:
        return f.read()


def kernel_name(kernel, dtype=None):
    return kernel if dtype is None else f"{kernel}<{TYPE_NAMES[np.dtype(dtype)]}>"


def reduction_splits(C, m):
    """Blocks per channel of the reduction kernels: a function of the shape only, so a
    shape always gets the same merge tree (the same bits)."""
    per_block = THREADS * 32
    return int(max(1, min(-(-m // per_block), max(1, 2048 // max(C, 1)))))
