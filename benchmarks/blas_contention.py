"""A parallel fastbn call right after a NumPy matrix product, on a machine with as many
cores as threads.

OpenBLAS's worker threads keep spinning for a while after each product
(OPENBLAS_THREAD_TIMEOUT, by default 2^28 cycles); an OpenMP parallel region started in
that window needs a core one of them holds and waits for the scheduler (milliseconds).
This script measures a (256, 2048) training-mode batch_norm alone, right after a product
(h = a @ w with 2-thread OpenBLAS), and the three ways around it: one BLAS thread
(threadpoolctl), one fastbn thread, and OPENBLAS_THREAD_TIMEOUT=4 (set before NumPy is
imported, so it runs in a child process).

Run:  python benchmarks/blas_contention.py
"""
import os
import subprocess
import sys
import time

import numpy as np

import fastbn as fbn

SHAPE = (256, 2048)


def measure(mode, repeats=200):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((SHAPE[0], 512), dtype=np.float32)
    w = rng.standard_normal((512, SHAPE[1]), dtype=np.float32)
    x = a @ w
    rm, rv = np.zeros(SHAPE[1], np.float32), np.ones(SHAPE[1], np.float32)
    times = []
    for _ in range(repeats):
        if mode != "alone":
            a @ w
        t = time.perf_counter()
        fbn.batch_norm(x, rm, rv, training=True)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(f"{measure('after product'):.0f}")
        return
    rows = [("batch_norm alone", measure("alone")),
            ("right after a matrix product", measure("after product"))]
    try:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=1, user_api="blas"):
            rows.append(("  ... with one BLAS thread (threadpoolctl)", measure("after product")))
    except ImportError:
        pass
    fbn.set_num_threads(1)
    rows.append(("  ... with one fastbn thread", measure("after product")))
    fbn.set_num_threads(None)
    env = dict(os.environ, OPENBLAS_THREAD_TIMEOUT="4")
    child = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True,
                           text=True, check=True)
    rows.append(("  ... with OPENBLAS_THREAD_TIMEOUT=4", float(child.stdout)))
    print(f"training-mode batch_norm {SHAPE} float32, {fbn.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; median of 200 calls")
    for name, us in rows:
        print(f"{name:46} {us:9.0f} us")


if __name__ == "__main__":
    main()
