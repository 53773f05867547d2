"""Data-parallel training with synchronized batch norm over MPI ranks.

Each global batch of 60 Fashion-MNIST images is split over the ranks (unevenly when 60
does not divide); every BN layer is a fastbn.SyncBatchNorm, so its statistics and
gradients span the whole global batch, and the affine layers' gradients are summed with
MPI Allreduce. The result matches one process training on the global batch, step for
step: with --check, rank 0 trains that single-process network alongside and reports the
largest parameter difference.

Run:  mpirun -n 4 python examples/fashion_mnist_mpi.py --steps 200 --check
      (as root add --allow-run-as-root; on a 2-core machine add --oversubscribe)
"""
import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist as fm  # noqa: E402

import fastbn as fbn  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=fm.DEFAULT_DATA_DIR)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--init-std", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="rank 0 also trains on the global batch in one process and compares")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    fbn.set_num_threads(1)  # one core per rank
    try:
        train_x, train_y, test_x, test_y = fm.load_fashion_mnist(args.data_dir)
    except fm.DataError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2

    net = fm.MLP(True, args.init_std, args.seed,
                 make_bn=lambda n: fbn.SyncBatchNorm(n, comm=comm))
    single = fm.MLP(True, args.init_std, args.seed) if args.check and rank == 0 else None
    cuts = np.linspace(0, args.batch, size + 1).round().astype(int)
    mine = slice(cuts[rank], cuts[rank + 1])

    def allreduce(grad):
        total = np.empty_like(grad)
        comm.Allreduce(grad, total, op=MPI.SUM)
        return total

    rng = np.random.default_rng(args.seed + 1000)  # the same global batches on every rank
    worst = 0.0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(train_x), args.batch, replace=False)
        net.step(train_x[idx][mine], train_y[idx][mine], args.lr, batch_total=args.batch,
                 reduce_grad=allreduce)
        if single is not None:
            single.step(train_x[idx], train_y[idx], args.lr)
            if step % 50 == 0 or step == args.steps:
                diff = max(float(np.abs(a - b).max())
                           for a, b in zip(net.parameters(), single.parameters()))
                worst = max(worst, diff)
                print(f"step {step:5d}: max |parameter difference| vs one process = {diff:.2e}")
    elapsed = time.perf_counter() - t0
    acc = fm.accuracy(net, test_x, test_y)
    if rank == 0:
        print(f"{size} ranks, batch {args.batch} split {np.diff(cuts).tolist()}, {args.steps} "
              f"steps in {elapsed:.1f} s; test accuracy {acc:.4f}")
        if single is not None:
            print(f"one process on the global batch: test accuracy "
                  f"{fm.accuracy(single, test_x, test_y):.4f}; largest parameter difference "
                  f"over the run {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
