"""Tests for sae_vision/sae/kernels.py: sparse kernels against dense autograd, top-k selection."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from sae_vision.core.config import SAEConfig
from sae_vision.sae.architectures import forward_reference, make_sae
from sae_vision.sae.kernels import JumpReLUFn, ReluL1Loss, StepFn, batch_topk_flat


def randomised(sae, seed=0):
    """Perturb biases so that every gradient path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g))
    return sae


def _grads(sae, fn):
    sae.zero_grad(set_to_none=True)
    out = fn()
    out.losses["loss"].backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


# --------------------------------------------------------------------------------------------
# Sparse kernels against dense autograd


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_backward_matches_dense_autograd_float64(arch, with_dead):
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, n_features=96, k=5, aux_k=8)
    sae = randomised(make_sae(cfg, 16, input_scale=1.7, mean=torch.randn(16)).double())
    x = torch.randn(64, 16, dtype=torch.float64)
    dead = torch.arange(96) % 3 == 0 if with_dead else None
    out, g_sparse = _grads(sae, lambda: sae(x, dead_mask=dead))
    ref, g_dense = _grads(sae, lambda: forward_reference(sae, x, dead_mask=dead))
    assert set(out.losses) == {"loss", "mse", "auxk"}
    for key in ref.losses:
        torch.testing.assert_close(out.losses[key], ref.losses[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.codes, ref.codes, rtol=0, atol=0)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-5, atol=1e-10)
    if with_dead:
        assert out.losses["auxk"] > 0


@pytest.mark.parametrize("sync_free", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_auxk_with_any_number_of_dead_features_matches_dense_autograd(n_dead, sync_free):
    # sync_free AuxK keeps aux_k pairs per row whatever the number of dead features (no host
    # count): the padding pairs must add nothing, and no dead feature must give an AuxK loss of 0.
    torch.manual_seed(2)
    sae = randomised(make_sae(SAEConfig(arch="topk", n_features=96, k=5, aux_k=8), 16).double())
    sae.sync_free = sync_free
    x = torch.randn(64, 16, dtype=torch.float64)
    dead = torch.arange(96) < n_dead
    out, g_sparse = _grads(sae, lambda: sae(x, dead_mask=dead))
    ref, g_dense = _grads(sae, lambda: forward_reference(sae, x, dead_mask=dead))
    for key in ref.losses:
        torch.testing.assert_close(out.losses[key], ref.losses[key], rtol=1e-12, atol=1e-12)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-5, atol=1e-10)
    assert (out.losses["auxk"] > 0) == (n_dead > 0)
    if n_dead:  # bf16 selection, float32 values recomputed for the kept pairs only
        sae = sae.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sae(x.float(), dead_mask=dead).losses["auxk"]
        torch.testing.assert_close(low, out.losses["auxk"].float(), rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_backward_gives_input_gradient_like_autograd(arch):
    torch.manual_seed(1)
    sae = randomised(make_sae(SAEConfig(arch=arch, n_features=48, k=4), 8).double())
    x0 = torch.randn(32, 8, dtype=torch.float64)
    grads = []
    for fn in (sae, forward_reference):
        x = x0.clone().requires_grad_(True)
        fn(sae, x).losses["loss"].backward() if fn is forward_reference else fn(x).losses[
            "loss"
        ].backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# relu_l1's fused loss (ReluL1Loss) against plain autograd


def _relu_l1(seed, d=16, n_feat=96):
    torch.manual_seed(seed)
    sae = randomised(make_sae(SAEConfig(arch="relu_l1", n_features=n_feat, l1_coeff=3.0), d,
                              input_scale=0.7, mean=torch.randn(d).abs()).double(), seed)
    with torch.no_grad():  # unequal row norms, and one zero row (the norm's gradient at 0)
        sae.W_dec.mul_(torch.rand(n_feat, 1, dtype=torch.float64) + 0.5)
        sae.W_dec[3].zero_()
        sae.l1_log_ctrl.fill_(0.3)
    sae.set_l1_scale(0.5)
    return sae


def test_relu_l1_fused_loss_matches_plain_autograd_float64():
    sae = _relu_l1(0)
    x = torch.randn(64, 16, dtype=torch.float64).abs()
    out, g_fused = _grads(sae, lambda: sae(x))
    ref, g_plain = _grads(sae, lambda: forward_reference(sae, x))
    assert set(out.losses) == set(ref.losses) == {"loss", "mse", "l1"}
    for key in ref.losses:
        torch.testing.assert_close(out.losses[key], ref.losses[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.codes, ref.codes, rtol=1e-12, atol=1e-12)
    assert 0 < (out.codes > 0).float().mean() < 1  # both branches of the ReLU are exercised
    torch.testing.assert_close(out.feature_counts(), (ref.codes > 0).sum(0).double(), rtol=0,
                               atol=0)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-10, atol=1e-12)
    assert g_fused["b_dec"].abs().max() > 0


def test_relu_l1_fused_loss_passes_gradcheck():
    sae = _relu_l1(1, d=5, n_feat=12)
    x = torch.randn(9, 5, dtype=torch.float64).abs() * sae.input_scale
    lam = sae.l1_coeff_now
    params = [p.detach().clone().requires_grad_(True)
              for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    assert torch.autograd.gradcheck(lambda *p: ReluL1Loss.apply(x, *p, lam)[0], params)


def test_relu_l1_keeps_the_input_gradient_and_bf16_autocast_on_the_plain_path():
    # (the plain path computes in float32, as the trainer does)
    sae = _relu_l1(2).float()
    x = torch.randn(32, 16).abs().requires_grad_(True)
    sae(x).losses["loss"].backward()
    g = x.grad.clone()
    x.grad = None
    forward_reference(sae, x).losses["loss"].backward()
    torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-5)
    assert g.abs().max() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sae(x.detach()).losses["loss"]
    torch.testing.assert_close(low, sae(x.detach()).losses["loss"], rtol=0.05, atol=0)


def test_relu_l1_step_runs_five_gemms_not_six(count_ops, one_thread):
    # The sixth dense GEMM of a plain autograd step is dL/dx of the encoder, formed only to be
    # reduced to b_dec's gradient; the fused loss gets that gradient as a matrix-vector product.
    sae = _relu_l1(3).float()
    x = torch.randn(64, 16).abs()
    counts = []
    for fn in (lambda: sae(x), lambda: forward_reference(sae, x)):
        counter = count_ops()
        with counter:
            fn().losses["loss"].backward()
        counts.append(counter.counts["mm"] + counter.counts["addmm"])
    assert counts == [5, 6]


def _sparse_relu_l1(seed, density_shift=-2.5):
    """A relu_l1 SAE whose encoder bias leaves a few percent of its codes > 0."""
    sae = _relu_l1(seed)
    with torch.no_grad():
        sae.b_enc.add_(density_shift)
    return sae


def test_relu_l1_sparse_step_matches_plain_autograd_float64(monkeypatch):
    from sae_vision.sae import architectures

    monkeypatch.setattr(architectures, "RELU_L1_SPARSE_MAX_DENSITY", 1.0)  # always sparse
    for seed, shift in ((4, 0.0), (5, -2.5)):
        sae = _sparse_relu_l1(seed, shift)
        x = torch.randn(64, 16, dtype=torch.float64).abs()
        out, g_sparse = _grads(sae, partial(sae, x))
        ref, g_plain = _grads(sae, partial(forward_reference, sae, x))
        assert out.pairs is not None and out.dense_codes is None  # the sparse path ran
        assert 0 < (ref.codes > 0).float().mean() < 1
        for key in ref.losses:
            torch.testing.assert_close(out.losses[key], ref.losses[key], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.codes, ref.codes, rtol=0, atol=0)
        torch.testing.assert_close(out.feature_counts(), (ref.codes > 0).sum(0).double(),
                                   rtol=0, atol=0)
        for name in g_plain:
            torch.testing.assert_close(g_sparse[name], g_plain[name], rtol=1e-10, atol=1e-12)
        assert g_sparse["b_dec"].abs().max() > 0 and g_sparse["W_enc"].abs().max() > 0


def test_relu_l1_takes_the_sparse_path_only_for_sparse_codes_in_training_on_the_host():
    x = torch.randn(256, 16, dtype=torch.float64).abs()
    dense, sparse = _relu_l1(6), _sparse_relu_l1(6, -3.0)
    with torch.no_grad():
        assert (dense.encode(x) > 0).float().mean() > 0.2
        assert 0 < (sparse.encode(x) > 0).float().mean() < 0.03
    assert dense(x).pairs is None
    assert sparse(x).pairs is not None
    sparse.sync_free = True  # a step that may not read the device stays dense
    assert sparse(x).pairs is None
    sparse.sync_free = None
    sparse.eval()  # evaluation keeps dense codes
    assert sparse(x).pairs is None


def test_relu_l1_sparse_step_runs_one_dense_gemm(count_ops, one_thread, monkeypatch):
    from sae_vision.sae import architectures

    monkeypatch.setattr(architectures, "RELU_L1_SPARSE_MAX_DENSITY", 1.0)
    sae = _sparse_relu_l1(7).float()
    x = torch.randn(64, 16).abs()
    counter = count_ops()
    with counter:
        out = sae(x)
        out.losses["loss"].backward()
    assert out.pairs is not None
    assert counter.counts["mm"] + counter.counts["addmm"] == 1  # the encoder's GEMM only


@pytest.mark.parametrize(
    "shape,n", [((64, 96), 320), ((3, 10), 25), ((300, 400), 1200), ((7, 5), 35)]
)
def test_batch_topk_selection_is_exact(shape, n):
    torch.manual_seed(0)
    pre = torch.randn(shape)
    idx, vals = batch_topk_flat(pre, n)
    want = pre.reshape(-1).topk(n).values
    assert torch.equal(vals.sort(descending=True).values, want)
    assert torch.equal(pre.reshape(-1)[idx], vals)
    assert bool((idx[1:] > idx[:-1]).all())  # ascending, hence CSR row-major order


def test_batch_topk_selection_handles_ties():
    pre = torch.zeros(40, 30)
    pre[:5] = 1.0
    idx, vals = batch_topk_flat(pre, 100)
    assert idx.numel() == 100 and idx.unique().numel() == 100
    assert torch.equal(vals.sort(descending=True).values, pre.reshape(-1).topk(100).values)


def test_straight_through_estimators_match_hand_case():
    # Hand case for the straight-through estimators: z - θ inside the window (|u| < ε/2) or not.
    z = torch.tensor([[0.30, 0.55, 1.00, 0.0]], requires_grad=True)
    theta = torch.tensor([0.25, 0.50, 0.50, 0.5], requires_grad=True)
    eps = 0.2
    JumpReLUFn.apply(z, theta, eps).sum().backward()
    assert torch.equal(z.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([-0.25 / eps, -0.5 / eps, 0.0, 0.0]))
    theta.grad = None
    StepFn.apply(z.detach(), theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-1 / eps, -1 / eps, 0.0, 0.0]))


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_kernels_match_dense_autograd_on_cuda(arch):
    torch.manual_seed(0)
    sae = randomised(make_sae(SAEConfig(arch=arch, n_features=512, k=8, aux_k=16), 64)).cuda()
    x = torch.randn(256, 64, device="cuda")
    dead = (torch.arange(512) % 4 == 0).cuda()
    out, g_sparse = _grads(sae, lambda: sae(x, dead_mask=dead))
    ref, g_dense = _grads(sae, lambda: forward_reference(sae, x, dead_mask=dead))
    torch.testing.assert_close(out.losses["loss"], ref.losses["loss"], rtol=1e-4, atol=1e-4)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-3, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sae(x, dead_mask=dead)
    out.losses["loss"].backward()
    assert out.x_hat.dtype == torch.float32 and torch.isfinite(sae.W_enc.grad).all()
