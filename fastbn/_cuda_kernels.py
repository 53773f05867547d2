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
TEMPLATE_KERNELS = ("fbn_moments_partial", "fbn_moments_partial_cl", "fbn_normalize",
                    "fbn_backward_partial", "fbn_backward_partial_cl", "fbn_backward_elementwise")
PLAIN_KERNELS = ("fbn_moments_finalize", "fbn_backward_finalize")
NAME_EXPRESSIONS = tuple(f"{k}<{t}>" for t in TYPE_NAMES.values() for k in TEMPLATE_KERNELS) \
    + PLAIN_KERNELS
COMPILE_OPTIONS = ("--std=c++11",)


def source():
    with open(KERNEL_FILE) as f:
        return f.read()


def kernel_name(kernel, dtype=None):
    return kernel if dtype is None else f"{kernel}<{TYPE_NAMES[np.dtype(dtype)]}>"


WARPS = THREADS // 32
# channels-last reductions (inner == 1) read 32 channels per warp from this many on
CHANNELS_LAST_MIN_CHANNELS = 16


def uses_channels_last_reduction(C, inner):
    """A function of the shape only (like the splits), so a shape always gets the same
    kernels and merge tree -- the same bits for any strides."""
    return inner == 1 and C >= CHANNELS_LAST_MIN_CHANNELS


def reduction_splits(C, m, channels_last=False):
    """Blocks along the reduced dimension (per channel, or per 32 channels for the
    channels-last kernels), about 2048 blocks in all on large inputs; at least 32 (64
    channels-last) elements per thread. A function of the shape only."""
    if channels_last:
        channel_blocks, per_block = -(-C // 32), WARPS * 64
    else:
        channel_blocks, per_block = C, THREADS * 32
    return int(max(1, min(-(-m // per_block), max(1, 2048 // max(channel_blocks, 1)))))
