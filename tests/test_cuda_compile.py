"""Compile gate of the CUDA backend (runs without a GPU): every kernel and template
instantiation of fastbn/cuda/bn.cu compiles with NVRTC for sm_80 and sm_90 with
``-Xptxas -v``, with no register spills and resources the launch configuration
(FBN_THREADS threads per block) can run."""
import pytest

from fastbn import _cuda_kernels as kernels
from nvrtc_gate import compile_cubin, load_nvrtc, ptxas_resources

nvrtc = load_nvrtc()
pytestmark = pytest.mark.skipif(nvrtc is None, reason="NVRTC (nvidia-cuda-nvrtc-cu12) not installed")

REGISTERS_PER_SM = 65536
SMEM_PER_BLOCK = 48 * 1024


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_without_spills(arch):
    cubin, log, lowered = compile_cubin(nvrtc, kernels.source(), kernels.NAME_EXPRESSIONS,
                                        arch, kernels.COMPILE_OPTIONS)
    assert len(cubin) > 0
    assert set(lowered) == set(kernels.NAME_EXPRESSIONS)
    resources = ptxas_resources(log)
    for name in kernels.NAME_EXPRESSIONS:
        r = resources[lowered[name]]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (arch, name, r)
        assert r["stack"] == 0, (arch, name, r)
        assert r["registers"] * kernels.THREADS <= REGISTERS_PER_SM, (arch, name, r)
        assert r["smem"] <= SMEM_PER_BLOCK, (arch, name, r)


def test_splits_depend_on_the_shape_only():
    assert kernels.reduction_splits(64, 100352) == kernels.reduction_splits(64, 100352)
    assert kernels.reduction_splits(1, 10 ** 8) == 2048
    assert kernels.reduction_splits(4096, 10) == 1
    assert kernels.reduction_splits(64, 10 ** 6, channels_last=True) == 1024  # 2 tiles of 32
    assert kernels.uses_channels_last_reduction(16, 1)
    assert not kernels.uses_channels_last_reduction(15, 1)
    assert not kernels.uses_channels_last_reduction(64, 2)
