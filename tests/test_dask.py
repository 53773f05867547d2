"""Dask arrays: lazy statistics (one reduction with fastbn's Welford per block and Chan
merges) and normalization (map_blocks), against the NumPy results."""
import subprocess
import sys

import numpy as np
import pytest

import fastbn as fbn
from conftest import make_data

da = pytest.importorskip("dask.array")

CASES = [((40, 5, 6, 7), 1, (7, 2, 6, 4)), ((40, 6, 7, 5), -1, (9, 6, 3, 2)),
         ((97, 3), 1, (10, 3)), ((12, 4, 30), 1, (12, 4, 30)), ((9, 4, 5), 2, (2, 2, 2))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape,axis,chunks", CASES)
def test_dask_matches_numpy(shape, axis, chunks, dtype):
    x = make_data(shape, dtype, loc=3.0)
    dx = da.from_array(x, chunks=chunks)
    C = shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    mean, var = fbn.moments(dx, axis, ddof=1)
    assert isinstance(mean, da.Array) and isinstance(var, da.Array)  # lazy
    emean, evar = fbn.moments(x, axis, ddof=1)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(mean.compute(), emean, rtol=rtol)
    np.testing.assert_allclose(var.compute(), evar, rtol=rtol)
    m = fbn.welford(dx, axis)
    assert m.count == x.size // C
    np.testing.assert_allclose(m.m2.compute(), fbn.welford(x, axis).m2, rtol=1e-11)
    y, mean_, invstd = fbn.batch_norm_forward(dx, w, b, axis=axis, activation="relu")
    ey, emean_, einvstd = fbn.batch_norm_forward(x, w, b, axis=axis, activation="relu")
    assert isinstance(y, da.Array) and y.dtype == x.dtype
    tol = {np.float64: 1e-12, np.float32: 2e-6, np.float16: 2e-3}[dtype]
    np.testing.assert_allclose(y.compute().astype(float), ey.astype(float), rtol=tol, atol=tol * 4)
    np.testing.assert_allclose(invstd.compute(), einvstd, rtol=rtol)
    rm, rv = np.zeros(C), np.ones(C)
    erm, erv = np.zeros(C), np.ones(C)
    yt = fbn.batch_norm(dx, rm, rv, w, b, training=True, axis=axis)
    fbn.batch_norm(x, erm, erv, w, b, training=True, axis=axis)
    np.testing.assert_allclose(rm, erm, rtol=1e-12)  # updated in place right away
    np.testing.assert_allclose(rv, erv, rtol=1e-10)
    assert isinstance(yt, da.Array)
    ye = fbn.batch_norm(dx, rm, rv, w, b, axis=axis)
    np.testing.assert_allclose(ye.compute().astype(float),
                               fbn.batch_norm(x, rm, rv, w, b, axis=axis).astype(float),
                               rtol=tol, atol=tol * 4)


def test_dask_errors_and_dispatch():
    dx = da.ones((8, 3), chunks=4)
    assert fbn.get_backend(dx) == "dask"
    with pytest.raises(TypeError, match="x.dtype=int64"):
        fbn.moments(da.ones((4, 3), dtype=np.int64, chunks=2))
    with pytest.raises(TypeError, match="out= is not supported"):
        fbn.batch_norm(dx, np.zeros(3), np.ones(3), out=np.empty((8, 3)))
    with pytest.raises(TypeError, match="backward functions take NumPy"):
        fbn.batch_norm_backward(dx, dx, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"weight.shape=\(4,\)"):
        fbn.batch_norm(dx, None, None, np.ones(4), training=True)


def test_fastbn_does_not_import_dask(tmp_path):
    code = ("import sys, numpy as np, fastbn as fbn; fbn.moments(np.ones((3, 2))); "
            "print('dask' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


def test_distributed_local_cluster_of_processes():
    distributed = pytest.importorskip("distributed")
    x = make_data((64, 4, 50), np.float64, loc=-1.0)
    dx = da.from_array(x, chunks=(8, 2, 25))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        mean, var = fbn.moments(dx)
        y = fbn.batch_norm(dx, None, None, training=True)
        mean, var, y = da.compute(mean, var, y)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(var, x.var(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(y, fbn.batch_norm_forward(x)[0], rtol=1e-12, atol=1e-12)


def test_dask_with_cupy_blocks(device):
    """Dask arrays whose blocks are CuPy arrays: the block statistics run on the CUDA
    backend, the merged statistics normalize each block on its device."""
    dev, host = device.to_dev, device.to_host
    x = make_data((24, 3, 10), np.float32, loc=2.0)
    dx = da.from_array(dev(x), chunks=(5, 3, 4), asarray=False)
    assert type(dx._meta) is device.module.ndarray
    mean, var = fbn.moments(dx)
    emean, evar = fbn.moments(x)
    np.testing.assert_allclose(host(mean.compute()), emean, rtol=1e-6)
    np.testing.assert_allclose(host(var.compute()), evar, rtol=1e-6)
    yd = fbn.batch_norm(dx, None, None, training=True)
    assert type(yd.blocks[1, 0, 2].compute()) is device.module.ndarray  # stays on the device
    y = host(yd.compute())
    np.testing.assert_allclose(y, fbn.batch_norm_forward(x)[0], rtol=2e-6, atol=2e-6)
