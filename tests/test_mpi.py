"""Synchronized BN under mpirun (-n 1..4, --oversubscribe): equal to single-process BN on
the concatenated batch, with uneven splits, an empty rank, channels-last and fused
activations; a mismatched or failing rank gives a clear error on every rank, not a hang."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mpi4py")
MPIRUN = shutil.which("mpirun")
WORKER = pathlib.Path(__file__).with_name("mpi_worker.py")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun (OpenMPI) not installed")


def _mpirun(n, case, timeout=120, **extra_env):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1", **extra_env)
    cmd = [MPIRUN, "-n", str(n), "--oversubscribe", sys.executable, str(WORKER), case]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=WORKER.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"{case} OK") == n, proc.stdout + proc.stderr


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("case", ["even", "uneven", "uneven-empty", "uneven-empty-nhwc",
                                  "uneven-relu", "empty-nhwc-relu"])
def test_sync_bn_equals_whole_batch(n, case):
    _mpirun(n, case)


@pytest.mark.parametrize("n", [1, 3])
def test_sync_bn_on_cupy_arrays(n, tmp_path_factory):
    """CuPy arrays (the stand-in over the emulated CUDA kernels; gather buffers on the
    "device" as with a CUDA-aware MPI), uneven pieces with an empty rank."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    from cuda_emulation.emulated import build_module
    lib = tmp_path_factory.mktemp("emu") / "fbn_emu.so"
    build_module(lib)
    _mpirun(n, "cupy-uneven-empty", FASTBN_EMU_SO=str(lib))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("case", ["mismatch", "failing"])
def test_bad_rank_raises_everywhere(n, case):
    _mpirun(n, case)


def test_data_parallel_example_matches_one_process():
    example = WORKER.parents[1] / "examples" / "fashion_mnist_mpi.py"
    if not example.exists() or not pathlib.Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("example or Fashion-MNIST data not available")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([MPIRUN, "-n", "4", "--oversubscribe", sys.executable, str(example),
                           "--steps", "20", "--check"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    worst = float(last.rsplit(" ", 1)[1])
    assert worst < 1e-5, proc.stdout
    accs = [line.split("test accuracy ")[1][:6] for line in proc.stdout.splitlines()
            if "test accuracy" in line]
    assert len(accs) == 2 and accs[0] == accs[1], proc.stdout
