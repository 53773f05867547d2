"""Shared data for the asv suite: cached RandomState arrays (bottleneck/numpy style)."""
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=16)
def get_array(shape, dtype, layout):
    """NCHW data, or its channels-last copy for layout == 'nhwc' (channel axis -1)."""
    x = np.random.RandomState(1234).standard_normal(shape).astype(dtype)
    if layout == "nhwc":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x


def channel_axis(layout):
    return -1 if layout == "nhwc" else 1


class Benchmark:
    timeout = 60
