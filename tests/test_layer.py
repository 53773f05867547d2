"""The BatchNorm layer against torch.nn.BatchNorm1d/2d/3d (when torch is installed) and
its own contract."""
import numpy as np
import pytest

import fastbn as fbn
from conftest import make_data


def _torch_bn(torch, ndim, C, **kw):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[ndim]
    return cls(C, dtype=torch.float64, **kw)


@pytest.mark.parametrize("shape", [(16, 5), (8, 5, 7), (4, 5, 6, 3), (2, 5, 3, 4, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_layer_matches_torch(xp, shape, momentum, affine, track):
    torch = pytest.importorskip("torch")
    C = shape[1]
    ours = fbn.BatchNorm(C, momentum=momentum, affine=affine, track_running_stats=track,
                         dtype=np.float64).to(xp.module)
    host = xp.asnumpy
    theirs = _torch_bn(torch, len(shape), C, momentum=momentum, affine=affine,
                       track_running_stats=track)
    if affine:
        w = np.linspace(0.5, 2.0, C)
        ours.weight[...] = xp.asarray(w)
        with torch.no_grad():
            theirs.weight.copy_(torch.from_numpy(w))
    for step in range(3):
        for mode in ("train", "eval"):
            ours.train(mode == "train")
            theirs.train(mode == "train")
            x = make_data(shape, np.float64, seed=step, loc=step, scale=1 + step)
            dy = make_data(shape, np.float64, seed=10 + step)
            tx = torch.from_numpy(x).requires_grad_()
            ty = theirs(tx)
            ty.backward(torch.from_numpy(dy))
            y = host(ours(xp.asarray(x)))
            dx = host(ours.backward(xp.asarray(dy)))
            np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-11)
            np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-10)
            if affine:
                np.testing.assert_allclose(host(ours.grad_weight), theirs.weight.grad.numpy(),
                                           rtol=1e-9)
                np.testing.assert_allclose(host(ours.grad_bias), theirs.bias.grad.numpy(),
                                           rtol=1e-9)
                theirs.weight.grad = theirs.bias.grad = None
            if track:
                np.testing.assert_allclose(host(ours.running_mean), theirs.running_mean.numpy(),
                                           rtol=1e-12)
                np.testing.assert_allclose(host(ours.running_var), theirs.running_var.numpy(),
                                           rtol=1e-12)
                assert ours.num_batches_tracked == int(theirs.num_batches_tracked)


def test_state_dict_round_trips_with_torch():
    torch = pytest.importorskip("torch")
    ours = fbn.BatchNorm(4)
    for seed in range(3):
        ours(make_data((8, 4, 3, 3), np.float32, seed=seed))
    ours.weight[...] = [1, 2, 3, 4]
    theirs = torch.nn.BatchNorm2d(4)
    theirs.load_state_dict({k: torch.as_tensor(v) for k, v in ours.state_dict().items()})
    assert int(theirs.num_batches_tracked) == 3
    np.testing.assert_array_equal(theirs.running_var.numpy(), ours.running_var)
    back = fbn.BatchNorm(4)
    back.load_state_dict(theirs.state_dict())
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)
    assert set(theirs.state_dict()) == set(ours.state_dict())


def test_state_dict_checks_everything_first():
    bn = fbn.BatchNorm(3)
    sd = bn.state_dict()
    sd["running_mean"] = np.full(3, 7.0)
    sd["running_var"] = np.ones(4)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        bn.load_state_dict(sd)
    np.testing.assert_array_equal(bn.running_mean, 0)  # nothing half-loaded
    with pytest.raises(KeyError, match="missing keys"):
        bn.load_state_dict({"weight": np.ones(3)})
    assert "weight" not in fbn.BatchNorm(3, affine=False).state_dict()


def test_bad_input_changes_nothing(xp):
    bn = fbn.BatchNorm(3).to(xp.module)
    with pytest.raises(ValueError, match=r"expected 3 channels along axis=1, got: x.shape"):
        bn(xp.asarray(np.ones((4, 5, 2), np.float32)))  # 5 channels for a 3-channel layer
    with pytest.raises(ValueError, match="Expected more than 1 value"):
        bn(xp.asarray(np.ones((1, 3), np.float32)))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(xp.asnumpy(bn.running_mean), 0)
    with pytest.raises(RuntimeError, match="forward"):
        fbn.BatchNorm(3).backward(np.ones((2, 3)))


def test_channels_last_fused_layer_and_repr():
    bn = fbn.BatchNorm(6, axis=-1, activation="relu")
    x = make_data((4, 5, 6), np.float32)
    r = make_data((4, 5, 6), np.float32, seed=3)
    y = bn(x, residual=r)
    expected = fbn.batch_norm_forward(x, axis=-1, activation="relu", residual=r)[0]
    np.testing.assert_array_equal(y, expected)
    dx = bn.backward(np.ones_like(y))
    np.testing.assert_array_equal(bn.grad_residual, (y > 0).astype(np.float32))
    assert dx.shape == x.shape
    assert "BatchNorm(6" in repr(bn) and "relu" in repr(bn)


def test_no_running_stats_uses_batch_statistics_in_eval():
    bn = fbn.BatchNorm(3, track_running_stats=False).eval()
    x = make_data((10, 3), np.float64)
    np.testing.assert_array_equal(bn(x), fbn.batch_norm_forward(x)[0])
    assert bn.running_mean is None and bn.state_dict().keys() == {"weight", "bias"}


def test_population_mode_gives_exact_statistics(xp):
    bn = fbn.BatchNorm(4, dtype=np.float64).to(xp.module)
    data = make_data((999, 4, 3), np.float64, loc=5.0)
    batches = [xp.asarray(b) for b in np.array_split(data, 13)]  # uneven
    with bn.population_mode():
        for batch in batches:
            bn(batch)
    d = data.transpose(1, 0, 2).reshape(4, -1)
    np.testing.assert_allclose(xp.asnumpy(bn.running_mean), d.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(xp.asnumpy(bn.running_var), d.var(axis=1, ddof=1), rtol=1e-12)
    assert bn.num_batches_tracked == 0
    # a failure inside the block leaves the running statistics alone
    before = xp.asnumpy(bn.running_var).copy()
    with pytest.raises(ZeroDivisionError):
        with bn.population_mode():
            bn(batches[0] * 100)
            1 / 0
    np.testing.assert_array_equal(xp.asnumpy(bn.running_var), before)


def test_evaluation_backward_uses_the_statistics_of_its_forward():
    # the running statistics (and eps) an evaluation forward used, even where they change
    # before the backward (a load_state_dict, a training step of another batch)
    C = 4
    bn = fbn.BatchNorm(C, dtype=np.float64)
    x = make_data((8, C, 3), np.float64, seed=1, loc=2, scale=3)
    dy = make_data((8, C, 3), np.float64, seed=2)
    bn(x)  # a training step: running statistics away from 0 and 1
    bn.eval()
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    bn(x)
    bn.running_mean[...] = 100.0
    bn.running_var[...] = 50.0
    bn.eps = 0.5
    dx = bn.backward(dy)
    expected = fbn.batch_norm_backward(dy, x, rm, 1.0 / np.sqrt(rv + 1e-5), bn.weight,
                                       training=False)
    np.testing.assert_array_equal(dx, expected[0])
    np.testing.assert_array_equal(bn.grad_weight, expected[1])
    np.testing.assert_array_equal(bn.grad_bias, expected[2])
