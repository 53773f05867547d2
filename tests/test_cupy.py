"""The public API on CuPy arrays end to end, against the CPU results.

Two flavours of `cupy`: "emulated", a stand-in module with NumPy-backed arrays of their
own type and a RawModule that runs the CUDA kernels under the CPU emulation (always;
exercises dispatch, validation, layouts, outputs, in-place running statistics and the
CUDA backend's launch sequences, but no device memory, streams or NVRTC), and "gpu",
the real CuPy, which runs whenever CuPy is installed and sees a GPU (never here)."""
import numpy as np
import pytest

import fastbn as fbn
from conftest import make_data
from cuda_emulation.emulated import CXX
from cuda_emulation.fake_cupy import _dev

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not installed")


CASES = [((6, 3, 5), 1), ((5, 4, 3), -1), ((37, 4), 1), ((2, 3, 4, 5), 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis", CASES)
def test_api_on_cupy_arrays_matches_the_cpu(device, shape, axis, dtype):
    x = make_data(shape, dtype, seed=1)
    dy = make_data(shape, dtype, seed=2)
    r = make_data(shape, dtype, seed=3)
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    tol = {np.float64: 1e-12, np.float32: 2e-6, np.float16: 2e-3}[dtype]
    dev, host = device.to_dev, device.to_host
    gx, gdy, gr, gw, gb = map(dev, (x, dy, r, w, b))
    assert fbn.get_backend(gx) == "cuda"

    mean, var = fbn.moments(gx, axis, ddof=1)
    emean, evar = fbn.moments(x, axis, ddof=1)
    assert type(mean) is device.module.ndarray
    np.testing.assert_allclose(host(mean), emean, rtol=1e-6)
    np.testing.assert_allclose(host(var), evar, rtol=1e-6)

    rm, rv = dev(np.zeros(C, np.float32)), dev(np.ones(C, np.float32))
    erm, erv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, gmean, ginvstd = fbn.batch_norm_forward(gx, gw, gb, rm, rv, axis=axis, activation="relu",
                                               residual=gr)
    ey, emean_, einvstd = fbn.batch_norm_forward(x, w, b, erm, erv, axis=axis, activation="relu",
                                                 residual=r)
    assert type(y) is device.module.ndarray and y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(host(y).astype(float), ey.astype(float), rtol=tol, atol=tol * 4)
    np.testing.assert_allclose(host(rm), erm, rtol=1e-6)  # updated in place
    np.testing.assert_allclose(host(rv), erv, rtol=1e-6)

    dx, dw, db, dres = fbn.batch_norm_backward(gdy, gx, gmean, ginvstd, gw, axis=axis,
                                               activation="relu", y=y, return_residual_grad=True)
    edx, edw, edb, edres = fbn.batch_norm_backward(dy, x, emean_, einvstd, w, axis=axis,
                                                   activation="relu", y=ey,
                                                   return_residual_grad=True)
    scale = 1 + np.abs(edx.astype(float)).max()
    np.testing.assert_allclose(host(dx).astype(float), edx.astype(float), rtol=tol * 10,
                               atol=tol * 10 * scale)
    np.testing.assert_allclose(host(dw), edw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(db), edb, rtol=1e-5, atol=1e-5)

    y_eval = fbn.batch_norm(gx, rm, rv, gw, gb, axis=axis)
    np.testing.assert_allclose(host(y_eval).astype(float),
                               fbn.batch_norm(x, erm, erv, w, b, axis=axis).astype(float),
                               rtol=tol, atol=tol * 4)
    out = dev(np.empty_like(x))
    assert fbn.batch_norm(gx, rm, rv, gw, gb, axis=axis, out=out) is out


def test_cupy_errors(device):
    dev = device.to_dev
    gx = dev(make_data((4, 3, 5), np.float32))
    with pytest.raises(TypeError, match="mixed array types"):
        fbn.batch_norm(gx, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"weight.shape=\(4,\)"):
        fbn.batch_norm_forward(gx, dev(np.ones(4)))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(TypeError, match="CUDA backend takes float16, float32 or float64"):
        fbn.moments(dev(np.ones((4, 3), ml_dtypes.bfloat16)))


def test_layer_moved_to_cupy(device):
    dev, host = device.to_dev, device.to_host
    x = make_data((8, 3, 4, 5), np.float32, seed=4)
    dy = make_data(x.shape, np.float32, seed=5)
    cpu = fbn.BatchNorm(3, activation="relu")
    gpu = fbn.BatchNorm(3, activation="relu").to(device.module)
    assert type(gpu.weight) is device.module.ndarray
    for step in range(2):
        np.testing.assert_allclose(host(gpu(dev(x + step))), cpu(x + step), rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(host(gpu.backward(dev(dy))), cpu.backward(dy), rtol=1e-5,
                                   atol=1e-5)
    np.testing.assert_allclose(host(gpu.running_var), cpu.running_var, rtol=1e-6)
    np.testing.assert_allclose(host(gpu.grad_weight), cpu.grad_weight, rtol=1e-5, atol=1e-5)
    gpu.eval()
    cpu.eval()
    np.testing.assert_allclose(host(gpu(dev(x))), cpu(x), rtol=2e-6, atol=2e-6)
    fresh = fbn.BatchNorm(3).to(device.module)
    fresh.load_state_dict(cpu.state_dict())  # NumPy state into a device layer
    np.testing.assert_array_equal(host(fresh.running_mean), cpu.running_mean)
    back = gpu.to(np)
    assert isinstance(back.running_var, np.ndarray)
    with pytest.raises(TypeError, match="mixed array types"):
        fbn.BatchNorm(3)(dev(x))  # NumPy parameters, device input


@pytest.mark.parametrize("shape,axis", [((5, 3, 7), 1), ((13, 40), 1), ((7, 5, 33), -1),
                                        ((4, 3, 2, 5), 2)])
def test_grid_stride_loops_and_channels_last_kernels(device, shape, axis, monkeypatch):
    """Grids of 3 blocks: the elementwise kernels' grid-stride loops step many times
    (their division-free index stepping carries across inner and channel boundaries);
    C >= 16 with axis=-1 runs the coalesced channels-last reductions."""
    from fastbn import _cuda_launch
    monkeypatch.setattr(_cuda_launch, "_MAX_BLOCKS", 3)
    x = make_data(shape, np.float64, seed=6)
    dy = make_data(shape, np.float64, seed=7)
    r = make_data(shape, np.float64, seed=8)
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    dev, host = device.to_dev, device.to_host
    y, mean, invstd = fbn.batch_norm_forward(dev(x), dev(w), dev(b), axis=axis,
                                             activation="relu", residual=dev(r))
    ey, emean, einvstd = fbn.batch_norm_forward(x, w, b, axis=axis, activation="relu", residual=r)
    np.testing.assert_allclose(host(y), ey, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(mean), emean, rtol=1e-12, atol=1e-13)
    dx, dw, db, dres = fbn.batch_norm_backward(dev(dy), dev(x), mean, invstd, dev(w), axis=axis,
                                               activation="relu", y=y, return_residual_grad=True)
    edx, edw, edb, edres = fbn.batch_norm_backward(dy, x, emean, einvstd, w, axis=axis,
                                                   activation="relu", y=ey,
                                                   return_residual_grad=True)
    np.testing.assert_allclose(host(dx), edx, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(host(dw), edw, rtol=1e-11, atol=1e-11)
    np.testing.assert_array_equal(host(dres), edres)
