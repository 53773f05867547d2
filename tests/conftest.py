import contextlib
import functools
import os
import sys

import numpy as np
import pytest

import fastbn as fbn

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # optional
    BFLOAT16 = None

DTYPES = [np.float16, np.float32, np.float64] + ([BFLOAT16] if BFLOAT16 is not None else [])

# (atol, rtol) for data outputs (y, dx) per dtype; statistics use STAT_RTOL
DATA_TOL = {
    np.dtype(np.float64): (1e-12, 1e-12),
    np.dtype(np.float32): (2e-6, 2e-6),
    np.dtype(np.float16): (2e-3, 2e-3),
}
if BFLOAT16 is not None:
    DATA_TOL[BFLOAT16] = (1.6e-2, 1.6e-2)
STAT_RTOL = {np.dtype(np.float64): 1e-12}  # float32 statistics otherwise


def stat_rtol(dtype):
    return STAT_RTOL.get(np.dtype(dtype), 2e-6)


@contextlib.contextmanager
def backend(name):
    """Run fastbn calls on the named backend (FASTBN_BACKEND)."""
    old = os.environ.get("FASTBN_BACKEND")
    os.environ["FASTBN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTBN_BACKEND"]
        else:
            os.environ["FASTBN_BACKEND"] = old


NEVER = 1 << 62  # a size threshold no array reaches


@contextlib.contextmanager
def core_thresholds(parallel_min_elements=None, stream_min_bytes=None,
                    spread_ahead_min_bytes=None, strips_max_bytes_per_thread=None):
    """Switch the compiled core's size policies (threads below a size, streaming stores
    and the spread requests of wide channels-last rows from a size, channel strips up to
    a size) within the block."""
    from fastbn import _bn_cpu
    saved = _bn_cpu.thresholds()
    _bn_cpu.thresholds(parallel_min_elements, stream_min_bytes, spread_ahead_min_bytes,
                       strips_max_bytes_per_thread)
    try:
        yield
    finally:
        _bn_cpu.thresholds(*saved)


def reference(fn, *args, **kwargs):
    """fn(*args, **kwargs) on the pure-NumPy float64 reference backend."""
    with backend("reference"):
        return fn(*args, **kwargs)


def assert_data_close(actual, expected, dtype=None):
    dtype = np.dtype(dtype or expected.dtype)
    atol, rtol = DATA_TOL[dtype]
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    scale = max(1.0, float(np.nanmax(np.abs(e)))) if e.size else 1.0
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale)


def make_data(shape, dtype, seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return rng.normal(loc, scale, size=shape).astype(dtype)


@pytest.fixture(autouse=True)
def _reset_threads():
    yield
    fbn.set_num_threads(None)


# ---------------------------------------------------------------- CuPy: stand-in or real
@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """The CUDA kernels compiled for the CPU emulation (tests/cuda_emulation)."""
    from cuda_emulation.emulated import CXX, build_module
    if CXX is None:
        pytest.skip("g++ not installed")
    return build_module(tmp_path_factory.mktemp("emu") / "fbn_emu.so")


class Device:
    """How a test moves arrays to and from the namespace under test."""

    def __init__(self, name, module, to_dev, to_host):
        self.name, self.module, self.to_dev, self.to_host = name, module, to_dev, to_host
        self.is_numpy = module is np

    # short names for the parametrized API suites
    def asarray(self, a):
        return self.to_dev(a)

    def asnumpy(self, a):
        return self.to_host(a)

    @property
    def api(self):
        """fastbn itself on NumPy; on CuPy a proxy whose functions take and return host
        arrays: NumPy array arguments go to the device, results come back, and device
        copies of the arguments are copied back into them after the call (so in-place
        updates of running statistics show, and so would any write to an input)."""
        return fbn if self.is_numpy else _HostProxy(self)

    def skip_unless_supported(self, dtype):
        """The CUDA backend takes float16/32/64 only (bfloat16 raises, tested)."""
        if not self.is_numpy and np.dtype(dtype) not in (np.float16, np.float32, np.float64):
            pytest.skip(f"{np.dtype(dtype)} is not a CUDA backend dtype")


class _HostProxy:
    def __init__(self, device):
        self._device = device

    def __getattr__(self, name):
        fn = getattr(fbn, name)
        return functools.partial(self._call, fn) if callable(fn) else fn

    def _to_dev(self, a, moved):
        if isinstance(a, np.ndarray):
            if BFLOAT16 is not None and a.dtype == BFLOAT16:
                self._device.skip_unless_supported(a.dtype)
            d = self._device.to_dev(a)
            moved.append((a, d))
            return d
        return a

    def _to_host(self, r):
        if isinstance(r, (tuple, list)):
            return type(r)(self._to_host(v) for v in r)
        if isinstance(r, fbn.Moments):
            return fbn.Moments(r.count, self._to_host(r.mean), self._to_host(r.m2))
        if isinstance(r, self._device.module.ndarray):
            return np.asarray(self._device.to_host(r))
        return r

    def _call(self, fn, *args, **kwargs):
        moved = []
        args = [self._to_dev(a, moved) for a in args]
        kwargs = {k: self._to_dev(v, moved) for k, v in kwargs.items()}
        try:
            result = fn(*args, **kwargs)
        finally:  # after a raise too: "changes nothing" must hold on the device
            for host, dev in moved:
                if host.flags.writeable:
                    np.copyto(host, self._device.to_host(dev))
        return self._to_host(result)


def _cupy_device(kind, request, monkeypatch):
    if kind == "gpu":
        real = pytest.importorskip("cupy")
        if not real.is_available():
            pytest.skip("CuPy is installed but sees no GPU")
        return Device("cupy", real, real.asarray, real.asnumpy)
    from cuda_emulation.fake_cupy import _dev, _fake_cupy
    emulated = request.getfixturevalue("emulated")
    fake = _fake_cupy(emulated)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delitem(sys.modules, "fastbn._backend_cupy", raising=False)
    request.addfinalizer(lambda: sys.modules.pop("fastbn._backend_cupy", None))
    # host -> "device" copies, as a transfer would make
    return Device("cupy-emulated", fake, lambda a: _dev(np.array(a)), np.asarray)


@pytest.fixture(params=["emulated", "gpu"])
def device(request, monkeypatch):
    """CuPy arrays: the stand-in over the emulated kernels, and the real CuPy (GPU only)."""
    return _cupy_device(request.param, request, monkeypatch)


@pytest.fixture(params=["numpy", "cupy-emulated", "cupy"])
def xp(request, monkeypatch):
    """The array namespace an API test runs on: NumPy (the CPU backend); the CuPy
    stand-in whose RawModule runs the CUDA kernels under the CPU emulation (always, so
    the CUDA launch paths run in CI); and the real CuPy (whenever cupy.is_available())."""
    if request.param == "numpy":
        return Device("numpy", np, np.asarray, np.asarray)
    return _cupy_device("emulated" if request.param == "cupy-emulated" else "gpu", request,
                        monkeypatch)
