"""Run the exact CUDA kernel source on the CPU (tests/cuda_emulation): bn.cu compiled as
C++ against a header that emulates threads, blocks, __syncthreads, warp shuffles and
shared memory with real threads and barriers, launched through a stand-in with the call
shape of CuPy's RawModule/RawKernel, driven by the backend's own launch sequences
(fastbn/_cuda_launch.py) and compared with the float64 reference.

The kernels also run under ThreadSanitizer and AddressSanitizer+UBSan in a standalone
driver (test_emulated_kernels_under_sanitizers), and this whole file can run with an
ASan-built runner:
    LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        FASTBN_EMU_SANITIZE=address pytest tests/test_cuda_emulation.py
(a TSan-built runner does not load into CPython; the driver covers TSan).
"""
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from fastbn import _cuda_launch, _reference
from conftest import make_data
from cuda_emulation.emulated import build_module

HERE = pathlib.Path(__file__).resolve().parent / "cuda_emulation"
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not installed")


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    return build_module(tmp_path_factory.mktemp("emu") / "fbn_emu.so")

# (shape of the (outer, C, inner) view, how the view is made)
CASES = [((6, 3, 5), "contiguous"), ((37, 4, 1), "contiguous"), ((5, 3, 7), "channels-last"),
         ((4, 3, 6), "reversed"), ((3, 4, 5), "channel-step"), ((1, 2, 9001), "contiguous")]


def _view(shape, how, dtype, seed):
    outer, C, inner = shape
    if how == "channels-last":  # (outer, inner, C) memory seen as (outer, C, inner)
        return make_data((outer, inner, C), dtype, seed=seed).transpose(0, 2, 1)
    if how == "reversed":
        return make_data(shape, dtype, seed=seed)[::-1]
    if how == "channel-step":
        return make_data((outer, 2 * C, inner), dtype, seed=seed)[:, ::2]
    return make_data(shape, dtype, seed=seed)


def _tol(dtype):
    return {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6,
            np.dtype(np.float16): 2e-3}[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,how", CASES)
def test_emulated_kernels_match_the_reference(module, shape, how, dtype):
    x3 = _view(shape, how, dtype, 1)
    r3 = _view(shape, how, dtype, 2)
    dy3 = _view(shape, how, dtype, 3)
    C = shape[1]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    tol = _tol(dtype)

    count, mean, m2, var, invstd = _cuda_launch.moments(module, np, x3, eps=1e-5)
    rcount, rmean, rm2 = _reference.moments(x3)
    assert count == rcount
    np.testing.assert_allclose(mean, rmean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m2, rm2, rtol=1e-10)

    y3 = np.empty(shape, dtype)
    ry3 = np.empty(shape, dtype)
    mean, var, invstd = _cuda_launch.train_forward(module, np, x3, y3, w, b, 1e-5, r3, True)
    _reference.train_forward(x3, ry3, w, b, 1e-5, r3, True)
    np.testing.assert_allclose(y3.astype(float), ry3.astype(float), rtol=tol, atol=tol * 4)
    assert y3.min() >= 0

    for frozen in (False, True):
        dx3, dres3 = np.empty(shape, dtype), np.empty(shape, dtype)
        rdx3, rdres3 = np.empty(shape, dtype), np.empty(shape, dtype)
        sums = _cuda_launch.backward(module, np, dy3, x3, dx3, mean, invstd, w, frozen, y3, dres3)
        rsums = _reference.backward(dy3, x3, rdx3, mean, invstd, w, frozen, y3, rdres3)
        for s, rs in zip(sums, rsums):
            np.testing.assert_allclose(s, rs, rtol=1e-10, atol=1e-10 * np.abs(rs).max())
        scale = 1 + np.abs(rdx3.astype(float)).max()
        np.testing.assert_allclose(dx3.astype(float), rdx3.astype(float), rtol=tol * 10,
                                   atol=tol * 10 * scale)
        np.testing.assert_array_equal(dres3, rdres3)


def test_emulated_launches_are_deterministic(module):
    x3 = make_data((1, 2, 9001), np.float32, loc=1e4)
    first = _cuda_launch.moments(module, np, x3)
    for _ in range(2):
        again = _cuda_launch.moments(module, np, x3)
        for a, e in zip(again[1:], first[1:]):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("sanitizer", ["thread", "address,undefined"])
def test_emulated_kernels_under_sanitizers(sanitizer, tmp_path):
    """The kernels with several blocks and splits, under ThreadSanitizer (barriers and
    shuffles race-free) and AddressSanitizer+UBSan (no out-of-bounds access), in a
    standalone driver (sanitized libraries do not load reliably into Python)."""
    exe = tmp_path / "driver"
    build = subprocess.run([CXX, "-std=c++20", "-O1", "-g", "-pthread", f"-fsanitize={sanitizer}",
                            str(HERE / "sanitize_driver.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "cannot find" in build.stderr:
        pytest.skip(f"sanitizer runtime not installed: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=1",
               UBSAN_OPTIONS="halt_on_error=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(": ok") == 6, run.stdout
