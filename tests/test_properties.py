"""Hypothesis property tests."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import fastbn as fbn

# the xp fixture is the same for every example of a test
XP_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@st.composite
def batch_and_splits(draw):
    n = draw(st.integers(1, 40))
    C = draw(st.integers(1, 5))
    inner = draw(st.integers(1, 6))
    x = draw(arrays(np.float64, (n, C, inner), elements=finite))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    return x, cuts


@settings(max_examples=60, **XP_SETTINGS)
@given(batch_and_splits())
def test_merge_of_random_splits_equals_whole(xp, case):
    F = xp.api
    x, cuts = case
    whole = F.welford(x)
    merged = fbn.merge_moments(F.welford(p) for p in np.split(x, cuts))
    assert merged.count == whole.count
    scale = 1 + np.abs(x).max()
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9, atol=1e-9 * scale ** 2)


@settings(max_examples=60, **XP_SETTINGS)
@given(arrays(np.float64, st.tuples(st.integers(2, 30), st.integers(1, 4), st.integers(1, 5)),
              elements=st.floats(-10, 10, allow_nan=False)),
       st.floats(-1e3, 1e3), st.floats(0.01, 100), st.sampled_from([1, -1]))
def test_normalized_output_is_shift_and_scale_invariant(xp, x, shift, scale, axis):
    F = xp.api
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    spread = x.std(axis=axes)
    if np.any(spread < 1e-3):  # near-constant channels are dominated by eps
        return
    y = F.batch_norm_forward(x, axis=axis, eps=0.0)[0]
    y2 = F.batch_norm_forward(x * scale + shift, axis=axis, eps=0.0)[0]
    np.testing.assert_allclose(y2, y, atol=1e-7)


@settings(max_examples=40, **XP_SETTINGS)
@given(arrays(np.float32, st.tuples(st.integers(2, 50), st.integers(1, 6)),
              elements=st.floats(-100, 100, allow_nan=False, width=32)))
def test_matches_two_pass_float64(xp, x):
    mean, var = xp.api.moments(x)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(mean, xd.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, xd.var(axis=0), rtol=1e-5, atol=1e-6)
