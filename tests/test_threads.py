"""Results are bitwise independent of the thread count; the GIL is released; calls from
many Python threads at once are safe."""
import pathlib
import re
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fastbn as fbn
from conftest import core_thresholds, make_data

@pytest.fixture(autouse=True)
def _always_parallel():
    """Small calls normally run on one thread; here every call uses the whole team."""
    with core_thresholds(parallel_min_elements=0):
        yield


# odd sizes; shapes with many chunks (so several threads share a channel) and few channels;
# a wide channels-last batch of few rows (short blocks, channel tiles with a tail); short
# rows walked as channels-last columns, in many chunks of rows; wide channels-last rows
# whose serial steps the threads split by blocks of channels: in fewer row chunks than
# threads (3 chunks, 9 blocks) and in one chunk
SHAPES = [((97, 3, 1001), 1), ((5, 2, 70001), 1), ((40000, 3), -1), ((64, 9, 101), 1),
          ((8, 33, 17, 5), -1), ((3, 500, 7), 1), ((70, 1100), -1), ((3000, 9, 5), 1),
          ((20, 2100), -1), ((12, 1500), -1)]


def _all_outputs(x, axis):
    C = x.shape[axis]
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=C), rng.normal(size=C)
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = fbn.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    dy = make_data(x.shape, x.dtype, seed=1)
    grads = fbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    frozen = fbn.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w, training=False, axis=axis)
    y_eval = fbn.batch_norm(x, rm, rv, w, b, axis=axis)
    m = fbn.welford(x, axis)
    # the split backward (its items ask for the channel ahead within a thread's share)
    sums = fbn.backward_reduce(dy, x, mean, invstd, axis=axis)
    dx_split = fbn.backward_elementwise(dy, x, mean, invstd, w, *sums, x.size // C, axis=axis)
    return [y, mean, invstd, rm, rv, *grads, *frozen, y_eval, m.mean, m.m2, *sums, dx_split]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_n_threads_agnosticism(shape, axis, dtype):
    """results do not depend on the number of threads (set_num_threads)"""
    x = make_data(shape, dtype, loc=5.0)
    fbn.set_num_threads(1)
    expected = _all_outputs(x, axis)
    for n in (2, 3, 4, 7):
        fbn.set_num_threads(n)
        for a, e in zip(_all_outputs(x, axis), expected):
            np.testing.assert_array_equal(a, e)


@pytest.mark.skipif(not fbn._openmp_enabled(), reason="core built without OpenMP")
def test_threadpoolctl_limits_fastbn():
    apis = {(i["user_api"], i.get("prefix")) for i in threadpool_info()}
    assert any(api == "openmp" for api, _ in apis), apis
    x = make_data((64, 3, 3001), np.float32)
    full = _all_outputs(x, 1)
    with threadpool_limits(limits=1, user_api="openmp"):
        assert fbn.get_num_threads() == 1
        limited = _all_outputs(x, 1)
    for a, e in zip(limited, full):
        np.testing.assert_array_equal(a, e)


def test_set_num_threads_validation():
    with pytest.raises(ValueError, match="positive"):
        fbn.set_num_threads(0)
    with pytest.raises(TypeError, match="positive int"):
        fbn.set_num_threads(1.5)
    fbn.set_num_threads(3)
    assert fbn.get_num_threads() == 3
    fbn.set_num_threads(None)
    assert fbn.get_num_threads() >= 1


def test_many_python_threads_at_once():
    xs = [make_data((16, 8, 501), np.float32, seed=s) for s in range(8)]
    expected = [_all_outputs(x, 1) for x in xs]
    results = [None] * 24
    errors = []

    def work(i):
        try:
            results[i] = _all_outputs(xs[i % 8], 1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, r in enumerate(results):
        for a, e in zip(r, expected[i % 8]):
            np.testing.assert_array_equal(a, e)


def test_gil_is_released():
    """Another Python thread runs while one is inside a kernel: the main thread's wake-ups
    land inside the worker's calls. With the GIL held through a call, none could: a
    wake-up is stamped only once the main thread has the GIL back. (Counted, not timed
    against a threshold: the test holds on a loaded or single-core machine, where the two
    threads share a core.)"""
    import time
    x = make_data((64, 4, 200000), np.float32)
    fbn.set_num_threads(1)
    calls = []

    def work():
        for _ in range(3):
            t0 = time.perf_counter()
            fbn.moments(x)
            calls.append((t0, time.perf_counter()))

    worker = threading.Thread(target=work)
    stamps = []
    worker.start()
    while worker.is_alive():
        time.sleep(0.0002)  # a sleeper: woken promptly even where it shares the worker's core
        stamps.append(time.perf_counter())
    worker.join()
    # the middle half of each call: a thread waiting for the GIL can slip in at a call's
    # edges (before the kernel takes it, or as the call returns) but not there
    inside = [sum(t0 + (t1 - t0) / 4 < s < t1 - (t1 - t0) / 4 for s in stamps) for t0, t1 in calls]
    assert sum(inside) >= 3, (inside, calls)


_PYX = pathlib.Path(__file__).resolve().parents[1] / "src" / "_bn_cpu.pyx"


_PARALLEL_BLOCK = re.compile(r"\s*(for\s.*\sin\s+prange\(|with\s+(nogil,\s*)?parallel\()")


def _parallel_bodies(lines):
    """(line number, body lines) of every parallel block (or prange loop) of a Cython
    source."""
    for i, line in enumerate(lines):
        if not _PARALLEL_BLOCK.match(line):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        yield i + 1, body


_ADDRESS_OF_LOCAL = re.compile(r"&[A-Za-z_]\w*(?![\w\[])")


def _address_of_local_offenders(lines):
    """(block line, `&name`) for every local passed by address in a parallel block."""
    return [(n, m.group(0)) for n, body in _parallel_bodies(lines)
            for line in body if not line.lstrip().startswith("#")
            for m in _ADDRESS_OF_LOCAL.finditer(line)]


@pytest.mark.skipif(not _PYX.exists(), reason="needs the source checkout")
def test_parallel_blocks_pass_no_local_by_address():
    """Cython makes a variable private to a thread of a parallel block only where the block
    assigns it; one filled through `&name` stays shared by the team, a data race (a thread
    then walks another thread's work range, or none). Elements (`&a[i]`) are fine; a
    local's field (`&m.n`) is not. (The core's blocks are found: the audit is not empty.)"""
    lines = _PYX.read_text().splitlines()
    assert len(list(_parallel_bodies(lines))) >= 10
    offenders = _address_of_local_offenders(lines)
    assert not offenders, offenders


def test_audit_finds_address_of_local():
    """the audit above can fail"""
    src = ["with parallel(num_threads=n):", "    _block(n, t, &lo, &hi)", "    f(&a[t], &m.n)",
           "g(&x)", "for t in prange(n):", "    h(&q)"]
    bodies = list(_parallel_bodies(src))
    assert bodies == [(1, ["    _block(n, t, &lo, &hi)", "    f(&a[t], &m.n)"]), (5, ["    h(&q)"])]
    assert _address_of_local_offenders(src) == [(1, "&lo"), (1, "&hi"), (1, "&m"), (5, "&q")]


@pytest.mark.parametrize("shape,axis", [((3, 500, 7), 1), ((5, 3000), -1), ((2, 3, 5001), 1)])
def test_thread_ranges_under_oversubscription(shape, axis):
    """The per-thread work ranges (a channel range per thread; channels-last chunks walked
    by the thread that reduced them), called many times on more threads than cores: every
    call writes every output, with the one-thread bits."""
    x = make_data(shape, np.float64, loc=5.0)
    fbn.set_num_threads(1)
    expected = _all_outputs(x, axis)
    fbn.set_num_threads(8)
    for _ in range(40):
        for a, e in zip(_all_outputs(x, axis), expected):
            np.testing.assert_array_equal(a, e)


@pytest.mark.skipif(not fbn._openmp_enabled(), reason="core built without OpenMP")
def test_a_smaller_team_than_asked_for_still_does_all_the_work(tmp_path):
    """Each thread of a parallel block takes its share of the items by the team's size, not
    the count asked for: with OMP_THREAD_LIMIT=1 a request for 4 threads gets a team of one,
    which must still write every output (the one-thread bits). Run from tmp_path, so that
    the installed fastbn is imported, not the source tree."""
    import os
    import subprocess
    import sys
    script = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np, fastbn as fbn
from conftest import core_thresholds, make_data
from test_threads import SHAPES, _all_outputs
with core_thresholds(parallel_min_elements=0):
    for shape, axis in SHAPES:
        x = make_data(shape, np.float32, loc=5.0)
        fbn.set_num_threads(1)
        expected = _all_outputs(x, axis)
        fbn.set_num_threads(4)
        for a, e in zip(_all_outputs(x, axis), expected):
            np.testing.assert_array_equal(a, e)
print("ok")
""".format(tests=str(pathlib.Path(__file__).resolve().parent))
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("shape", [(0, 1100), (0, 3), (0, 7, 9)])
def test_empty_batch_backward_on_any_number_of_threads(shape):
    """An empty channels-last batch has no row chunks; the step between its passes (zero
    sums, the coefficients) still runs, on one thread, for every team size: the weight
    and bias gradients are zero, not whatever the scratch held."""
    C = shape[-1]
    x = np.zeros(shape, np.float32)
    dy = np.zeros(shape, np.float32)
    mean, invstd, w = np.zeros(C), np.ones(C), np.ones(C, np.float32)
    for n in (1, 2, 4):
        fbn.set_num_threads(n)
        dx, dw, db = fbn.batch_norm_backward(dy, x, mean, invstd, w, axis=-1)
        assert dx.shape == shape
        np.testing.assert_array_equal(dw, np.zeros(C, np.float32))
        np.testing.assert_array_equal(db, np.zeros(C, np.float32))
