"""Per-channel statistics of an array larger than this machine's memory, with Dask.

The array (default 26 GB of float32, shape (100000, 64, 32, 32), 200 chunks of 131 MB)
is generated lazily, chunk by chunk, and never exists as a whole: x = u * scale_c +
offset_c with u uniform in [0, 1), so channel c has mean offset_c + scale_c/2 and
variance scale_c^2/12 (offsets up to 1e4 make float32 accumulation visibly inexact).
Each method runs in its own process so its peak resident memory is its own:

  fastbn   fbn.moments(x) - one dask reduction, fastbn's Welford per block, Chan merges
  dask32   dask.array's x.mean(axis) and x.var(axis), computed together
  dask64   the same with dtype=float64

Run:  python benchmarks/dask_large.py [--rows N] [--json results.json]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

C, H, W = 64, 32, 32


def build(rows, chunk_rows):
    import dask.array as da
    rng = da.random.default_rng(1234)
    u = rng.random((rows, C, H, W), dtype=np.float32, chunks=(chunk_rows, C, H, W))
    scale = np.linspace(0.5, 4.0, C, dtype=np.float32)[None, :, None, None]
    offset = np.linspace(0.0, 1e4, C, dtype=np.float32)[None, :, None, None]
    return u * scale + offset


def run_one(method, rows, chunk_rows):
    import dask
    import dask.array as da
    import fastbn as fbn
    x = build(rows, chunk_rows)
    axes = (0, 2, 3)
    t = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        if method == "fastbn":
            mean, var = da.compute(*fbn.moments(x, axis=1))
        elif method == "dask32":
            mean, var = da.compute(x.mean(axis=axes), x.var(axis=axes))
        else:
            mean, var = da.compute(x.mean(axis=axes, dtype=np.float64),
                                   x.var(axis=axes, dtype=np.float64))
    seconds = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "seconds": seconds, "peak_rss_mb": peak_mb,
            "mean": np.asarray(mean, np.float64).tolist(),
            "var": np.asarray(var, np.float64).tolist()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100000)
    p.add_argument("--chunk-rows", type=int, default=500)
    p.add_argument("--method")
    p.add_argument("--json")
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_one(args.method, args.rows, args.chunk_rows)))
        return
    nbytes = args.rows * C * H * W * 4
    try:
        import psutil
        ram = f", machine memory {psutil.virtual_memory().total / 1e9:.1f} GB"
    except ImportError:
        ram = ""
    print(f"array ({args.rows}, {C}, {H}, {W}) float32 = {nbytes / 1e9:.1f} GB{ram}")
    results = []
    for method in ("fastbn", "dask32", "dask64"):
        out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows),
                              "--chunk-rows", str(args.chunk_rows), "--method", method],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    scale = np.linspace(0.5, 4.0, C, dtype=np.float32).astype(np.float64)
    offset = np.linspace(0.0, 1e4, C, dtype=np.float32).astype(np.float64)
    reference = {r["method"]: r for r in results}["fastbn"]
    print(f"{'method':8} {'time s':>7} {'GB/s':>6} {'peak RSS MB':>12} "
          f"{'max |var/var_fastbn - 1|':>25} {'max |var/(s^2/12) - 1|':>23}")
    for r in results:
        var = np.array(r["var"])
        rel = np.abs(var / np.array(reference["var"]) - 1).max()
        vs_population = np.abs(var / (scale ** 2 / 12) - 1).max()
        print(f"{r['method']:8} {r['seconds']:7.1f} {nbytes / r['seconds'] / 1e9:6.2f} "
              f"{r['peak_rss_mb']:12.0f} {rel:25.2e} {vs_population:23.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "bytes": nbytes, "results": results}, f)


if __name__ == "__main__":
    main()
