"""No function writes to its inputs (bottleneck's input_modification_test)."""
import numpy as np
import pytest

import fastbn as fbn
from conftest import DTYPES, make_data


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_inputs_not_modified(xp, dtype, axis):
    F = xp.api
    x = make_data((6, 4, 5), dtype)
    dy = make_data((6, 4, 5), dtype, seed=1)
    C = x.shape[axis]
    w, b = np.linspace(0.5, 2, C), np.linspace(-1, 1, C)
    mean, invstd = np.zeros(C, np.float32), np.ones(C, np.float32)
    rm, rv = np.zeros(C), np.ones(C)
    inputs = [x, dy, w, b, mean, invstd, rm, rv]
    copies = [a.copy() for a in inputs]
    F.moments(x, axis)
    F.welford(x, axis)
    F.batch_norm(x, rm, rv, w, b, axis=axis)
    F.batch_norm_forward(x, w, b, axis=axis)
    F.batch_norm(x, None, None, w, b, training=True, axis=axis)
    F.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    F.batch_norm_backward(dy, x, mean, invstd, w, training=False, axis=axis)
    for a, c in zip(inputs, copies):
        np.testing.assert_array_equal(a, c)
