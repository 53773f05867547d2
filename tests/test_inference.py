"""Folding, frozen BN constants and exact population statistics."""
import numpy as np
import pytest

import fastbn as fbn
from conftest import make_data


def _bn_params(C, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=C), rng.uniform(0.5, 2, size=C), rng.normal(size=C),
            rng.normal(size=C))


def test_fold_linear_equals_two_layers(xp):
    F = xp.api
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(6, 10)), rng.normal(size=6)
    rm, rv, g, beta = _bn_params(6)
    x = rng.normal(size=(32, 10))
    two_layers = F.batch_norm(x @ W.T + b, rm, rv, g, beta, eps=1e-3)
    Wf, bf = F.fold_batch_norm(W, b, rm, rv, g, beta, eps=1e-3)
    np.testing.assert_allclose(x @ Wf.T + bf, two_layers, rtol=1e-12, atol=1e-12)
    Wf0, bf0 = F.fold_batch_norm(W, None, rm, rv, g, beta, eps=1e-3)
    np.testing.assert_allclose(x @ Wf0.T + bf0, F.batch_norm(x @ W.T, rm, rv, g, beta, eps=1e-3),
                               rtol=1e-12, atol=1e-12)


def test_fold_conv_1x1_and_transposed_layout(xp):
    F = xp.api
    rng = np.random.default_rng(2)
    W = rng.normal(size=(5, 3, 1, 1)).astype(np.float32)
    rm, rv, g, beta = _bn_params(5)
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    conv = np.einsum("oi,nihw->nohw", W[:, :, 0, 0], x)
    Wf, bf = F.fold_batch_norm(W, None, rm, rv, g, beta)
    assert Wf.dtype == np.float32
    folded = np.einsum("oi,nihw->nohw", Wf[:, :, 0, 0], x) + bf[None, :, None, None]
    np.testing.assert_allclose(folded, F.batch_norm(conv, rm, rv, g, beta), rtol=1e-4, atol=1e-4)
    Wt = np.ascontiguousarray(W.transpose(1, 0, 2, 3))  # (in, out, kh, kw)
    Wtf, btf = F.fold_batch_norm(Wt, None, rm, rv, g, beta, transposed=True)
    np.testing.assert_allclose(Wtf.transpose(1, 0, 2, 3), Wf, rtol=1e-6)
    np.testing.assert_allclose(btf, bf, rtol=1e-6)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        F.fold_batch_norm(W, None, rm, rv, transposed=True)


def test_fold_matches_torch_fusion():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
    conv = torch.nn.Conv2d(3, 4, 3).double().eval()
    bn = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    fused = fuse_conv_bn_eval(conv, bn)
    p = {k: v.detach().numpy() for k, v in bn.state_dict().items()}
    Wf, bf = fbn.fold_batch_norm(conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                                 p["running_mean"], p["running_var"], p["weight"], p["bias"],
                                 eps=bn.eps)
    np.testing.assert_allclose(Wf, fused.weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(bf, fused.bias.detach().numpy(), rtol=1e-12)
    tconv = torch.nn.ConvTranspose2d(3, 4, 3).double().eval()
    fused_t = fuse_conv_bn_eval(tconv, bn, transpose=True)
    Wt, bt = fbn.fold_batch_norm(tconv.weight.detach().numpy(), tconv.bias.detach().numpy(),
                                 p["running_mean"], p["running_var"], p["weight"], p["bias"],
                                 transposed=True)
    np.testing.assert_allclose(Wt, fused_t.weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(bt, fused_t.bias.detach().numpy(), rtol=1e-12)
    lin = torch.nn.Linear(5, 4).double().eval()
    bn1 = torch.nn.BatchNorm1d(4).double().eval()
    with torch.no_grad():
        bn1.running_var.uniform_(0.5, 2)
    fused_l = fuse_linear_bn_eval(lin, bn1)
    q = {k: v.detach().numpy() for k, v in bn1.state_dict().items()}
    Wl, bl = fbn.fold_batch_norm(lin.weight.detach().numpy(), lin.bias.detach().numpy(),
                                 q["running_mean"], q["running_var"], q["weight"], q["bias"])
    np.testing.assert_allclose(Wl, fused_l.weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(bl, fused_l.bias.detach().numpy(), rtol=1e-12)


def test_frozen_params_equal_eval_batch_norm(xp):
    F = xp.api
    rm, rv, g, beta = _bn_params(3, seed=4)
    x = make_data((7, 3, 5), np.float64)
    scale, shift = F.frozen_batch_norm_params(rm, rv, g, beta, eps=1e-4)
    np.testing.assert_allclose(x * scale[:, None] + shift[:, None],
                               F.batch_norm(x, rm, rv, g, beta, eps=1e-4), rtol=1e-12, atol=1e-12)


def test_frozen_params_match_torchvision_semantics():
    torch = pytest.importorskip("torch")
    rm, rv, g, beta = _bn_params(3, seed=5)
    # torchvision.ops.FrozenBatchNorm2d: scale = w * (rv + eps).rsqrt(); bias = b - rm * scale
    t = {k: torch.from_numpy(v) for k, v in dict(rm=rm, rv=rv, g=g, beta=beta).items()}
    tscale = t["g"] * (t["rv"] + 1e-5).rsqrt()
    tshift = t["beta"] - t["rm"] * tscale
    scale, shift = fbn.frozen_batch_norm_params(rm, rv, g, beta)
    np.testing.assert_allclose(scale, tscale.numpy(), rtol=1e-14)
    np.testing.assert_allclose(shift, tshift.numpy(), rtol=1e-13, atol=1e-15)


def test_population_statistics_exact_vs_momentum(xp):
    F = xp.api
    data = make_data((3000, 4, 6), np.float32, loc=3.0)
    batches = np.array_split(data, 41)
    mean, var = F.population_statistics(xp.asarray(b) for b in batches)
    mean, var = xp.asnumpy(mean), xp.asnumpy(var)
    d = data.astype(np.float64).transpose(1, 0, 2).reshape(4, -1)
    np.testing.assert_allclose(mean, d.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(var, d.var(axis=1, ddof=1), rtol=1e-10)
    # from precomputed partials too
    mean2, var2 = map(xp.asnumpy, fbn.population_statistics([fbn.welford(xp.asarray(b))
                                                             for b in batches]))
    np.testing.assert_array_equal(mean2, mean)
    with pytest.raises(ValueError, match="at least one"):
        F.population_statistics([])
