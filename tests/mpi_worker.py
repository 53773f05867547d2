"""Run under mpirun by test_mpi.py: synchronized BN on each rank's piece of a global
batch must equal single-process BN on the whole batch (float64 within 1e-12)."""
import sys

import numpy as np
from mpi4py import MPI

import fastbn as fbn

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def pieces(n, size, uneven, empty_rank):
    """Split n samples over ranks: uneven sizes, optionally one rank with none."""
    weights = np.arange(1, size + 1, dtype=float) if uneven else np.ones(size)
    if empty_rank is not None and size > 1:
        weights[empty_rank] = 0
    cuts = np.round(np.cumsum(weights) / weights.sum() * n).astype(int)
    starts = np.concatenate(([0], cuts[:-1]))
    return [slice(a, b) for a, b in zip(starts, cuts)]


def check(case):
    if case.startswith("cupy"):
        return check_cupy(case)
    axis = -1 if "nhwc" in case else 1
    shape = (23, 7, 5, 3) if axis == -1 else (23, 5, 6, 7)
    rng = np.random.default_rng(42)
    x = rng.normal(2.0, 3.0, size=shape)
    dy = rng.normal(size=shape)
    r = rng.normal(size=shape)
    C = shape[axis]
    w, b = rng.normal(size=C), rng.normal(size=C)
    fused = dict(activation="relu", residual=r) if "relu" in case else {}
    mine = pieces(shape[0], size, uneven="uneven" in case, empty_rank=1 if "empty" in case else None)[rank]
    tol = dict(rtol=1e-12, atol=1e-12)

    # whole batch, one process
    rm0, rv0 = np.zeros(C), np.ones(C)
    ys = []
    for step in range(2):
        y0, mean0, invstd0 = fbn.batch_norm_forward(x + step, w, b, rm0, rv0, axis=axis, **fused)
        ys.append(y0)
    dx0, dw0, db0, *dr0 = fbn.batch_norm_backward(
        dy, x + 1, mean0, invstd0, w, axis=axis, activation=fused.get("activation"),
        y=ys[-1] if fused else None, return_residual_grad=bool(fused))

    # the same, synchronized over the ranks
    rm, rv = np.zeros(C), np.ones(C)
    rfused = dict(fused, residual=r[mine]) if fused else {}
    for step in range(2):
        y, mean, invstd = fbn.sync_batch_norm_forward((x + step)[mine], w, b, rm, rv,
                                                      comm=comm, axis=axis, **rfused)
    np.testing.assert_allclose(y, ys[-1][mine], **tol)
    np.testing.assert_allclose(mean, mean0, **tol)
    np.testing.assert_allclose(invstd, invstd0, **tol)
    np.testing.assert_allclose(rm, rm0, **tol)
    np.testing.assert_allclose(rv, rv0, **tol)
    dx, dw, db, *dr = fbn.sync_batch_norm_backward(
        dy[mine], (x + 1)[mine], mean, invstd, w, comm=comm, axis=axis,
        activation=fused.get("activation"), y=y if fused else None,
        return_residual_grad=bool(fused))
    np.testing.assert_allclose(dx, dx0[mine], **tol)
    np.testing.assert_allclose(dw, dw0, **tol)
    np.testing.assert_allclose(db, db0, **tol)
    if fused:
        np.testing.assert_array_equal(dr[0], dr0[0][mine])
    # every rank holds the very same statistics and gradients
    for arr in (mean, invstd, rm, rv, dw, db):
        gathered = comm.allgather(arr)
        assert all(np.array_equal(g, arr) for g in gathered)

    # the layer
    layer = fbn.SyncBatchNorm(C, comm=comm, axis=axis, dtype=np.float64)
    whole = fbn.BatchNorm(C, axis=axis, dtype=np.float64)
    np.testing.assert_allclose(layer(x[mine]), whole(x)[mine], **tol)
    np.testing.assert_allclose(layer.backward(dy[mine]), whole.backward(dy)[mine], **tol)
    np.testing.assert_allclose(layer.grad_weight, whole.grad_weight, **tol)
    np.testing.assert_allclose(layer.running_var, whole.running_var, **tol)
    assert layer.num_batches_tracked == 1
    layer.eval()
    whole.eval()
    np.testing.assert_allclose(layer(x[mine]), whole(x)[mine], **tol)


def check_cupy(case):
    """Synchronized BN on "CuPy" arrays: the stand-in cupy of test_cupy.py over the
    emulated CUDA kernels (library built by the test, path in FASTBN_EMU_SO). The gather
    buffers are device arrays, as with a CUDA-aware MPI."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cuda_emulation.emulated import load_module
    from cuda_emulation.fake_cupy import _dev, _fake_cupy
    sys.modules["cupy"] = _fake_cupy(load_module(os.environ["FASTBN_EMU_SO"]))
    rng = np.random.default_rng(42)
    shape = (23, 4, 5)
    x = rng.normal(2.0, 3.0, size=shape)
    dy = rng.normal(size=shape)
    w, b = rng.normal(size=4), rng.normal(size=4)
    mine = pieces(shape[0], size, uneven=True, empty_rank=1 if size > 1 else None)[rank]
    rm0, rv0 = np.zeros(4), np.ones(4)
    y0, mean0, invstd0 = fbn.batch_norm_forward(x, w, b, rm0, rv0, activation="relu")
    dx0, dw0, db0 = fbn.batch_norm_backward(dy, x, mean0, invstd0, w, activation="relu", y=y0)
    rm, rv = _dev(np.zeros(4)), _dev(np.ones(4))
    y, mean, invstd = fbn.sync_batch_norm_forward(_dev(x[mine]), _dev(w), _dev(b), rm, rv,
                                                  comm=comm, activation="relu")
    assert type(y) is sys.modules["cupy"].ndarray
    dx, dw, db = fbn.sync_batch_norm_backward(_dev(dy[mine]), _dev(x[mine]), mean, invstd,
                                              _dev(w), comm=comm, activation="relu", y=y)
    tol = dict(rtol=1e-12, atol=1e-12)
    for a, e in ((y, y0[mine]), (mean, mean0), (invstd, invstd0), (rm, rm0), (rv, rv0),
                 (dx, dx0[mine]), (dw, dw0), (db, db0)):
        np.testing.assert_allclose(np.asarray(a), e, **tol)


def check_mismatch():
    C = 4 if rank == size - 1 else 3  # the last rank disagrees
    rm, rv = np.zeros(C), np.ones(C)
    try:
        fbn.sync_batch_norm_forward(np.ones((5, C)), running_mean=rm, running_var=rv, comm=comm)
    except fbn._sync.SyncError as e:
        assert "disagree" in str(e), e
        assert np.all(rm == 0)
        return
    raise AssertionError("no error")


def check_failing_rank():
    C = 3
    bad = rank == 1
    weight = np.ones(C + 1) if bad else np.ones(C)
    rm, rv = np.zeros(C), np.ones(C)
    try:
        fbn.sync_batch_norm_forward(np.ones((5, C)), weight, running_mean=rm,
                                    running_var=rv, comm=comm)
    except ValueError as e:
        assert bad and "weight.shape" in str(e), e
    except fbn._sync.SyncError as e:
        assert not bad and "failed on rank 1" in str(e), e
    else:
        raise AssertionError("no error")
    assert np.all(rm == 0)


if __name__ == "__main__":
    case = sys.argv[1]
    {"mismatch": check_mismatch, "failing": check_failing_rank}.get(case, lambda: check(case))()
    comm.Barrier()
    print(f"rank {rank}/{size} {case} OK", flush=True)
