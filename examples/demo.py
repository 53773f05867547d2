"""A short tour of fastbn's API on random data (the real-data example comes later).

Run:  python examples/demo.py
"""
import time

import numpy as np

import fastbn as fbn


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(1e4, 1.0, size=(32, 64, 56, 56)).astype(np.float32)  # NCHW, offset 1e4
    C = x.shape[1]
    print(f"fastbn {fbn.__version__}: backend={fbn.get_backend(x)}, threads={fbn.get_num_threads()}, "
          f"OpenMP={fbn._openmp_enabled()}")
    print(f"x: {x.shape} {x.dtype}, {x.nbytes / 1e6:.0f} MB")

    # statistics
    mean, var = fbn.moments(x)
    xd = x.astype(np.float64)
    var64 = xd.var(axis=(0, 2, 3))
    print(f"moments: mean[0]={mean[0]:.4f} var[0]={var[0]:.6f}; "
          f"max relative variance error vs float64: {np.max(np.abs(var / var64 - 1)):.1e}")

    # mergeable partials: statistics of two halves merged = statistics of the whole
    merged = fbn.welford(x[:10]).merge(fbn.welford(x[10:]))
    print(f"welford halves merged: count={merged.count}, "
          f"max |var - var_whole| = {np.max(np.abs(merged.var() - var64)):.1e}")

    # training step: fused forward (updates running stats in place), then backward
    weight, bias = np.ones(C, np.float32), np.zeros(C, np.float32)
    running_mean, running_var = np.zeros(C, np.float32), np.ones(C, np.float32)
    t = time.perf_counter()
    y, bmean, invstd = fbn.batch_norm_forward(x, weight, bias, running_mean, running_var)
    t_fwd = time.perf_counter() - t
    y64 = (xd - xd.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(var64[None, :, None, None] + 1e-5)
    print(f"training forward: {t_fwd * 1e3:.1f} ms, y mean={y.mean():.2e} std={y.std():.4f}, "
          f"max |y - y_float64| = {np.max(np.abs(y - y64)):.1e}")
    print(f"running_mean[:3]={running_mean[:3]}  running_var[:3]={running_var[:3]}")

    dy = rng.normal(size=x.shape).astype(np.float32)
    t = time.perf_counter()
    dx, dweight, dbias = fbn.batch_norm_backward(dy, x, bmean, invstd, weight)
    print(f"backward: {(time.perf_counter() - t) * 1e3:.1f} ms, dweight[:3]={dweight[:3]}, "
          f"dbias[:3]={dbias[:3]}")

    # inference with the running statistics, channels-last layout
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    t = time.perf_counter()
    y_eval = fbn.batch_norm(x_nhwc, running_mean, running_var, weight, bias, axis=-1)
    print(f"inference (channels-last, axis=-1): {(time.perf_counter() - t) * 1e3:.1f} ms, "
          f"y shape {y_eval.shape}")

    # results do not depend on the thread count, bit for bit
    fbn.set_num_threads(1)
    y1 = fbn.batch_norm_forward(x, weight, bias)[0]
    fbn.set_num_threads(None)
    print(f"1 thread vs {fbn.get_num_threads()} threads: bitwise identical = {np.array_equal(y1, y)}")


if __name__ == "__main__":
    main()
