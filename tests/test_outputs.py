"""Outputs the CPU core allocates: cache-line aligned from 64 KiB up to the size whose
outputs are streamed (8 MiB), through NumPy's memory-handler API, with NumPy's huge-page
advice from 4 MiB and a small cache of freed blocks, and ordinary NumPy arrays in every way
a user can see."""
import pickle
import sys

import numpy as np
import pytest

import fastbn as fbn
from fastbn import _api, _bn_cpu

try:  # NumPy 2
    from numpy._core import multiarray
except ImportError:  # NumPy 1.25/1.26
    from numpy.core import multiarray
get_handler_name = multiarray.get_handler_name
_set_madvise_hugepage = getattr(multiarray, "_set_madvise_hugepage", None)

LINE_HANDLER = "fastbn_line64"
DEFAULT_HANDLER = get_handler_name()


def _outputs(x, plain):
    """Every array output of the public functions for x (channels on axis -1)."""
    C = x.shape[-1]
    ax = -1
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = fbn.batch_norm_forward(x, axis=ax)
    out = {"batch_norm training": fbn.batch_norm(x, rm, rv, training=True, axis=ax),
           "batch_norm eval": fbn.batch_norm(x, rm, rv, axis=ax),
           "batch_norm_forward": y,
           "normalize": fbn.normalize(x, mean, invstd, axis=ax)}
    dx, _, _, dres = fbn.batch_norm_backward(x, x, mean, invstd, axis=ax, activation="relu",
                                             y=y, return_residual_grad=True)
    out["batch_norm_backward"], out["dresidual"] = dx, dres
    if not plain:  # out= that is not a kernel view goes through an (aligned) staging buffer
        strided = np.empty(x.shape[:-1] + (2 * C,), x.dtype)[..., ::2]
        assert fbn.batch_norm(x, rm, rv, training=True, axis=ax, out=strided) is strided
        np.testing.assert_array_equal(strided, out["batch_norm training"])
    return out


@pytest.mark.parametrize("plain", [True, False], ids=["plain calls", "checked path"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_mid_sized_outputs_start_on_a_cache_line(monkeypatch, plain, dtype):
    if not plain:
        monkeypatch.setattr(_api, "_PLAIN_CALLS", False)
    x = np.random.default_rng(0).standard_normal((300, 257)).astype(dtype)  # 77-300 KB
    for name, a in _outputs(x, plain).items():
        assert a.ctypes.data % 64 == 0, name
        assert get_handler_name(a) == LINE_HANDLER, name
        assert a.flags.owndata and a.flags.writeable and a.flags.c_contiguous, name
        assert a.base is None, name
    assert get_handler_name() == DEFAULT_HANDLER  # put back after each allocation


@pytest.mark.parametrize("shape", [(4, 257), (2100, 1024)], ids=["small", "streamed"])
def test_other_sizes_keep_numpys_allocator(shape):
    assert _bn_cpu.thresholds()[1] == 8 << 20
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for name, a in _outputs(x, True).items():
        assert get_handler_name(a) == DEFAULT_HANDLER, name
        assert a.flags.owndata, name


def test_empty_output_bounds():
    line = 1 << 16
    assert get_handler_name(_bn_cpu.empty_output((line // 4 - 1,), np.float32)) == DEFAULT_HANDLER
    assert get_handler_name(_bn_cpu.empty_output((line // 4,), np.float32)) == LINE_HANDLER
    top = (8 << 20) // 8
    assert get_handler_name(_bn_cpu.empty_output((top - 1,), np.float64)) == LINE_HANDLER
    assert get_handler_name(_bn_cpu.empty_output((top,), np.float64)) == DEFAULT_HANDLER
    a = _bn_cpu.empty_output((128, 3, 86), "float16")
    assert a.shape == (128, 3, 86) and a.dtype == np.float16 and a.ctypes.data % 64 == 0
    with pytest.raises(ValueError):
        _bn_cpu.empty_output((-1, 4), np.float32)
    assert get_handler_name() == DEFAULT_HANDLER


def test_aligned_outputs_behave_as_any_array():
    x = np.random.default_rng(2).standard_normal((200, 300))
    y = fbn.batch_norm(x, training=True, axis=-1)
    assert get_handler_name(y) == LINE_HANDLER
    expected = y.copy()
    assert np.array_equal(pickle.loads(pickle.dumps(y)), expected)
    y.resize((400, 300), refcheck=False)  # realloc through the same handler
    assert np.array_equal(y[:200], expected)
    y.resize((10, 300), refcheck=False)
    assert np.array_equal(y, expected[:10])
    for _ in range(200):  # allocated and freed through the handler, many times
        fbn.batch_norm(x, training=True, axis=-1)
    views = [fbn.batch_norm(x, training=True, axis=-1)[::2] for _ in range(3)]
    del y
    assert all(np.array_equal(v, expected[::2]) for v in views)


def _vm_flags(address):
    """The VmFlags of the mapping that holds address (/proc/self/smaps)."""
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= address < hi:
                for follow in lines[i + 1:]:
                    if follow.startswith("VmFlags:"):
                        return follow.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _set_madvise_hugepage is None,
                    reason="huge-page advice: Linux, NumPy's switch")
@pytest.mark.parametrize("advise", [True, False])
def test_huge_page_advice_follows_numpys(advise):
    previous = _set_madvise_hugepage(advise)
    try:
        ours = _bn_cpu.empty_output((6 << 20,), np.uint8)  # 6 MiB: aligned and advised
        numpys = np.empty(6 << 20, np.uint8)
        assert get_handler_name(ours) == LINE_HANDLER
        middle = lambda a: a.ctypes.data + a.nbytes // 2
        assert ("hg" in _vm_flags(middle(ours))) == ("hg" in _vm_flags(middle(numpys)))
        if advise:
            assert "hg" in _vm_flags(middle(ours))
        small = _bn_cpu.empty_output((3 << 20,), np.uint8)  # below NumPy's 4 MiB: no advice
        assert get_handler_name(small) == LINE_HANDLER
    finally:
        _set_madvise_hugepage(previous)


def test_out_staging_buffer_is_aligned(monkeypatch):
    made, original = [], _bn_cpu.empty_output

    def recording(shape, dtype):
        made.append(original(shape, dtype))
        return made[-1]

    monkeypatch.setattr(_bn_cpu, "empty_output", recording)
    x = np.random.default_rng(3).standard_normal((300, 257)).astype(np.float32)
    strided = np.empty((300, 514), np.float32)[:, ::2]  # not a kernel view: staged
    fbn.batch_norm(x, training=True, axis=-1, out=strided)
    assert len(made) == 1 and made[0].shape == x.shape
    assert made[0].ctypes.data % 64 == 0 and get_handler_name(made[0]) == LINE_HANDLER
    np.testing.assert_array_equal(strided, fbn.batch_norm(x, training=True, axis=-1))


def test_freed_outputs_are_reused_within_bounds():
    x = np.random.default_rng(4).standard_normal((256, 2048)).astype(np.float32)  # 2 MiB
    y = fbn.batch_norm(x, training=True, axis=-1)
    address = y.ctypes.data
    del y
    blocks, nbytes = _bn_cpu.cached_output_blocks()
    assert blocks >= 1 and nbytes >= x.nbytes
    y = fbn.batch_norm(x, training=True, axis=-1)  # the same size: the freed block again
    assert y.ctypes.data == address
    older = fbn.batch_norm(x, training=True, axis=-1)
    newer_address = y.ctypes.data
    del older, y  # of two fitting blocks, the one freed last comes back first
    assert fbn.batch_norm(x, training=True, axis=-1).ctypes.data == newer_address
    many = [fbn.batch_norm(x, training=True, axis=-1) for _ in range(12)]
    del many
    blocks, nbytes = _bn_cpu.cached_output_blocks()
    assert 1 <= blocks <= 6 and nbytes <= 48 << 20
    small = np.random.default_rng(5).standard_normal((300, 257)).astype(np.float32)
    z = fbn.batch_norm(small, training=True, axis=-1)  # 308 KB: no 2 MiB block is wasted on it
    assert get_handler_name(z) == LINE_HANDLER and z.ctypes.data != address


_FAULTS_SCRIPT = """
import ctypes, resource, sys
import numpy as np
import fastbn as fbn
# glibc's M_MMAP_THRESHOLD fixed at 128 KiB: every large malloc maps fresh pages, the state
# its own heuristics reach in some loops (README, "Outputs on a cache line")
assert ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024) == 1
x = np.random.default_rng(6).standard_normal((256, 2048)).astype(np.float32)  # 2 MiB
held = {}

def faults_per_step(step, n=20):
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

def numpy_step():  # the control: NumPy's own allocator in the same state
    held["a"] = np.empty_like(x)
    held["a"][...] = 1

def training_step():  # forward and backward outputs held for one step, as a loop holds them
    y, mean, invstd = fbn.batch_norm_forward(x, axis=-1)
    held["y"], held["dx"] = y, fbn.batch_norm_backward(y, x, mean, invstd, axis=-1)[0]

print(faults_per_step(numpy_step), faults_per_step(training_step))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or sys.implementation.name != "cpython",
                    reason="glibc's mallopt, getrusage page faults")
def test_outputs_do_not_fault_in_fresh_pages_when_malloc_maps_them(tmp_path):
    import subprocess
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # the installed fastbn, not the source tree
    assert run.returncode == 0, run.stderr
    numpy_faults, fastbn_faults = map(float, run.stdout.split())
    assert numpy_faults > 300  # every 2 MiB array faults in its ~512 pages: the state holds
    assert fastbn_faults < 50, (numpy_faults, fastbn_faults)  # two outputs per step, reused


def test_outputs_made_and_freed_on_many_threads():
    from concurrent.futures import ThreadPoolExecutor
    xs = [np.random.default_rng(i).standard_normal((128, 1024)).astype(np.float32)
          for i in range(8)]
    expected = [fbn.batch_norm(x, training=True, axis=-1) for x in xs]

    def work(i):
        for _ in range(20):
            y = fbn.batch_norm(xs[i % 8], training=True, axis=-1)
            assert np.array_equal(y, expected[i % 8])
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(32)))
