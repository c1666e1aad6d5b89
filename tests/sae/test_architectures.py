"""Tests for sae_vision/sae/architectures.py: the four architectures, scaling."""

from __future__ import annotations

import pytest
import torch

from sae_vision.core.config import ARCH_TRAITS, ARCHS, SAEConfig
from sae_vision.sae.architectures import SAE_CLASSES, make_sae, resample_dead


@pytest.mark.parametrize("arch", ARCHS)
def test_make_sae_builds_the_registered_class_with_the_config_traits(arch):
    sae = make_sae(SAEConfig(arch=arch, n_features=16, k=2), 4)
    assert type(sae) is SAE_CLASSES[arch] and sae.arch == arch
    assert sae.uses_k == ARCH_TRAITS[arch].uses_k
    assert sae.has_sparsity_coeff == ARCH_TRAITS[arch].has_sparsity_coeff
    assert hasattr(sae, "l1_log_ctrl") == sae.has_sparsity_coeff
    assert set(SAE_CLASSES) == set(ARCHS)
    with pytest.raises(ValueError, match="sae.arch='nope' is not valid"):
        make_sae(SAEConfig(arch="nope"), 4)


def test_forward_output_is_a_frozen_dataclass_not_a_tuple():
    out = make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4)(torch.randn(3, 4))
    with pytest.raises(TypeError):
        iter(out)
    with pytest.raises(AttributeError):
        out.x_hat = None
    assert out.codes is out.codes  # densified once


# --------------------------------------------------------------------------------------------
# Architectures


def test_topk_codes_have_exactly_k_active_and_right_shapes():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", expansion=4, k=7), 12)
    x = torch.randn(50, 12)
    out = sae(x)
    assert out.x_hat.shape == (50, 12) and out.codes.shape == (50, 48)
    assert torch.equal((out.codes > 0).sum(1), torch.full((50,), 7))
    assert float(out.l0) == 7.0
    assert torch.equal(out.feature_counts(), (out.codes > 0).sum(0).float())
    assert torch.equal(sae.encode(x), out.codes)
    assert out.losses["loss"].requires_grad


def test_batchtopk_trains_with_k_per_sample_on_average_and_uses_threshold_in_eval():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="batchtopk", n_features=64, k=4), 16).train()
    assert float(sae.threshold) < 0  # not learned yet
    x = torch.randn(128, 16)
    out = sae(x)
    assert out.sparse[1].numel() == 4 * 128
    n_per_row = (out.codes > 0).sum(1)
    assert n_per_row.float().mean() <= 4 and n_per_row.max() > n_per_row.min()  # batch-level
    first = float(sae.threshold)
    vals = out.sparse[2].detach()
    assert first == pytest.approx(float(vals[vals > 0].min()))
    sae(torch.randn(128, 16))
    assert float(sae.threshold) != first  # EMA moves with each training batch

    sae.eval()
    with torch.no_grad():
        sae.threshold.fill_(0.5)
        x2 = torch.randn(33, 16)
        pre = sae.pre_acts(x2)
        want = pre * (pre > 0.5)
        out2 = sae(x2)
        torch.testing.assert_close(out2.codes, want)
        torch.testing.assert_close(sae.encode(x2), want)
        assert float(sae.threshold) == 0.5  # eval never updates it
        torch.testing.assert_close(out2.x_hat, sae.decode(want), rtol=1e-5, atol=1e-5)


def test_jumprelu_threshold_gets_gradient_from_l0_and_reconstruction():
    torch.manual_seed(0)
    cfg = SAEConfig(
        arch="jumprelu", n_features=32, l1_coeff=0.5, jumprelu_threshold=0.3, jumprelu_bandwidth=0.5
    )
    sae = make_sae(cfg, 8)
    x = torch.randn(64, 8)
    out = sae(x)
    assert set(out.losses) == {"loss", "mse", "l0"}
    assert float(out.losses["l0"]) == pytest.approx(float(out.l0))
    out.losses["loss"].backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0



def test_relu_l1_loss_matches_formula_on_hand_case():
    sae = make_sae(SAEConfig(arch="relu_l1", n_features=3, l1_coeff=0.1), 2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, -2.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]]))  # norms 2, 1, 5
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[1.0, 2.0]])
    # x - b_dec = [0.5, 2]: pre = [0.5, 1.5, -0.5] -> f = [0.5, 1.5, 0]; x̂ = [1.5, 1.5];
    # ||x - x̂||² = 0.5; Σ f·||d|| = 2.5
    out = sae(x)
    torch.testing.assert_close(out.codes, torch.tensor([[0.5, 1.5, 0.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[1.5, 1.5]]))
    assert float(out.losses["mse"]) == pytest.approx(0.5)
    assert float(out.losses["l1"]) == pytest.approx(2.5)
    assert float(out.losses["loss"].detach()) == pytest.approx(0.75)
    assert float(sae(x, l1_scale=0.5).losses["loss"].detach()) == pytest.approx(0.625)
    sae.set_l1_scale(0.0)
    assert float(sae(x).losses["loss"].detach()) == pytest.approx(0.5)


def test_relu_l1_init_is_tied_with_unit_rows_and_stays_unconstrained():
    sae = make_sae(SAEConfig(arch="relu_l1", n_features=40), 10)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((40,), 1.0))
    assert torch.equal(sae.W_enc, sae.W_dec.t()) and not sae.b_enc.any()
    with torch.no_grad():
        sae.W_dec.mul_(0.5)
    sae.normalize_decoder_()  # unconstrained: a no-op
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((40,), 0.5))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_decoder_gradient_is_orthogonal_to_rows_and_rows_stay_unit(arch):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=arch, n_features=40, k=4, aux_k=6), 10)
    out = sae(torch.randn(32, 10), dead_mask=torch.arange(40) < 20)
    out.losses["loss"].backward()
    along = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert along.abs().max() < 1e-5 * sae.W_dec.grad.abs().max()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grads_()  # idempotent
    torch.testing.assert_close(sae.W_dec.grad, before, rtol=1e-5, atol=1e-7)
    torch.optim.SGD(sae.parameters(), lr=1.0).step()
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


@pytest.mark.parametrize("arch", ARCHS)
def test_public_maps_work_in_raw_units(arch):
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, n_features=64, k=6)
    mean = torch.randn(16) * 3
    scale = 0.37
    sae = make_sae(cfg, 16, input_scale=scale, mean=mean).eval()
    torch.testing.assert_close(sae.b_dec.detach(), mean * scale)
    unit = make_sae(cfg, 16).eval()
    unit.load_state_dict(
        {**sae.state_dict(), "input_scale": torch.tensor(1.0), "mean": sae.mean * scale}
    )
    x = mean + 3 * torch.randn(40, 16)
    with torch.no_grad():
        out = sae(x)
        torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-4)
        # Scaling is internal: the same parameters on pre-scaled input give the scaled output.
        torch.testing.assert_close(sae.pre_acts(x), unit.pre_acts(x * scale))
        torch.testing.assert_close(out.x_hat * scale, unit(x * scale).x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.losses["loss"], unit(x * scale).losses["loss"])


def test_bf16_autocast_selects_in_bf16_but_keeps_float32_values_and_grads():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", n_features=64, k=4), 16)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, dead_mask=torch.arange(64) < 10)
    assert out.x_hat.dtype == torch.float32 and torch.isfinite(out.losses["loss"])
    crow, cols, vals = out.sparse
    rows = torch.repeat_interleave(torch.arange(32), crow[1:] - crow[:-1])
    with torch.no_grad():
        exact = sae.pre_acts(x)[rows, cols].clamp_min(0)  # float32 values at the chosen pairs
    torch.testing.assert_close(vals.detach(), exact, rtol=1e-6, atol=1e-6)
    out.losses["loss"].backward()
    assert sae.W_enc.grad.dtype == torch.float32 and torch.isfinite(sae.W_enc.grad).all()


def test_resample_dead_reinitialises_only_dead_features_and_their_adam_state():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="relu_l1", n_features=32), 8)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(64, 8)
    sae(x).losses["loss"].backward()
    opt.step()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7, 30]] = True
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    idx = resample_dead(sae, dead, x, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert idx.tolist() == [3, 7, 30]
    assert torch.equal(sae.W_dec[~dead], before["W_dec"][~dead])
    assert torch.equal(sae.W_enc[:, ~dead], before["W_enc"][:, ~dead])
    assert not torch.equal(sae.W_dec[dead], before["W_dec"][dead])
    assert not sae.b_enc[dead].any()
    assert not opt.state[sae.W_dec]["exp_avg"][dead].any()
    assert opt.state[sae.W_dec]["exp_avg"][~dead].any()
    assert not opt.state[sae.W_enc]["exp_avg_sq"][:, dead].any()


# --------------------------------------------------------------------------------------------
# Planted-dictionary recovery (Sharkey et al. 2022): does training find the true features?


def _planted_data(n_true=200, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_true, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)

    def sample(batch, n_active=4):
        idx = torch.rand(batch, n_true, generator=g).argsort(1)[:, :n_active]
        mags = 0.5 + torch.rand(batch, n_active, generator=g)
        return torch.zeros(batch, n_true).scatter_(1, idx, mags) @ dirs

    return dirs, sample


def _mean_max_cosine(sae, dirs):
    dec = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    return float((dirs @ dec.t()).max(1).values.mean())


RECOVERY = {  # arch: (config overrides, steps, required mean max cosine similarity)
    "topk": ({}, 300, 0.9),
    "batchtopk": ({}, 300, 0.9),
    "relu_l1": ({"l1_coeff": 1.0}, 300, 0.9),
    "jumprelu": (
        {"l1_coeff": 0.1, "jumprelu_threshold": 0.1, "jumprelu_bandwidth": 0.05},
        300,
        0.85,
    ),
}


def _recovery(arch):
    overrides, steps, need = RECOVERY[arch]
    dirs, sample = _planted_data()
    torch.manual_seed(1234)  # a different stream from the planted directions
    sae = make_sae(SAEConfig(arch=arch, n_features=256, k=4, **overrides), 64).train()
    at_init = _mean_max_cosine(sae, dirs)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(steps):
        sae.set_l1_scale(min(1.0, step / (0.1 * steps)))
        sae(sample(512)).losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
    return at_init, _mean_max_cosine(sae, dirs), need


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_planted_dictionary_is_recovered_by_topk_family(arch, one_thread):
    at_init, trained, need = _recovery(arch)
    assert at_init < 0.5  # random directions: the test can tell recovery from chance
    assert trained > need


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["relu_l1", "jumprelu"])
def test_planted_dictionary_is_recovered(arch, one_thread):
    at_init, trained, need = _recovery(arch)
    assert at_init < 0.5
    assert trained > need
