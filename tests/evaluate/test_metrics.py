"""sae_vision.evaluate.metrics: known values on constructed cases, and streaming == one big batch."""

import math

import numpy as np
import pytest
import torch

from sae_vision.evaluate import metrics as M


def _data(n=512, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + 2.0


def test_exact_reconstruction_has_zero_fvu_and_unit_cosine():
    x = _data()
    assert M.mse(x, x) == 0.0
    assert M.fvu(x, x) == 0.0
    assert M.explained_variance(x, x) == pytest.approx(1.0)
    assert torch.allclose(M.cosine_similarity(x, x), torch.ones(len(x), dtype=torch.float64))
    assert torch.allclose(M.l2_ratio(x, x), torch.ones(len(x), dtype=torch.float64))


def test_mean_vector_reconstruction_has_fvu_one_and_zero_reconstruction_more():
    x = _data()
    mean = x.mean(0, keepdim=True).expand_as(x)
    assert M.fvu(x, mean) == pytest.approx(1.0)
    # Zero is worse than the mean-vector baseline when the data has a non-zero mean.
    assert M.fvu(x, torch.zeros_like(x)) > 1.0
    assert M.l2_ratio(x, torch.zeros_like(x)).max() == 0.0


def test_explained_variance_ignores_a_constant_offset_but_fvu_does_not():
    x = _data()
    shifted = x + 0.5
    assert M.explained_variance(x, shifted) == pytest.approx(1.0)
    assert M.fvu(x, shifted) > 0.01


def test_l0_counts_nonzero_codes():
    codes = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, -1.0]])
    assert M.l0(codes).tolist() == [2, 0, 2]


def test_dead_and_dense_counts_on_a_constructed_case():
    n, f = 1000, 10
    codes = torch.zeros(n, f)
    codes[:, 0] = 1.0  # always on: dense
    codes[:200, 1] = 1.0  # 20%: dense at threshold 0.1
    codes[:100, 2] = 1.0  # exactly 10%: not dense (strictly greater is required)
    codes[:1, 3] = 1.0  # once: alive, rare
    codes[:50, 4] = 2.0  # 5%
    # features 5..9 never fire: dead
    stats = M.SparsityStats(f)
    for chunk in codes.split(137):  # streaming in uneven chunks
        stats.update(chunk)
    h = stats.health(dense_threshold=0.1)
    assert (h["n_dead"], h["n_dense"]) == (5, 2)
    assert h["dead_frac"] == pytest.approx(0.5) and h["dense_frac"] == pytest.approx(0.2)
    density = stats.density()
    assert density[:5].tolist() == pytest.approx([1.0, 0.2, 0.1, 0.001, 0.05])


def test_density_histogram_counts_live_features_and_reports_dead_apart():
    density = torch.tensor([0.0, 0.0, 1e-3, 2e-2, 2e-2, 0.5, 1.0], dtype=torch.float64)
    h = M.log_density_histogram(density, n_vectors=1000, n_bins=12)
    assert h["n_dead"] == 2 and h["n_live"] == 5 and sum(h["counts"]) == 5
    assert h["edges"][0] <= -3 and h["edges"][-1] == 0.0
    # The two 2e-2 features share a bin.
    i = int(np.digitize(np.log10(2e-2), h["edges"])) - 1
    assert h["counts"][i] == 2 and max(h["counts"]) == 2


def test_l0_distribution_summary_matches_direct_computation():
    g = torch.Generator().manual_seed(1)
    codes = (torch.rand(2000, 64, generator=g) < torch.rand(2000, 1, generator=g) * 0.5).float()
    stats = M.SparsityStats(64)
    for chunk in codes.split(300):
        stats.update(chunk)
    l0 = M.l0(codes).double()
    s = stats.l0_summary()
    assert s["l0"] == pytest.approx(float(l0.mean()))
    assert s["l0_std"] == pytest.approx(float(l0.std(unbiased=False)))
    assert s["l0_quantiles"]["p50"] == pytest.approx(float(l0.median()), abs=1)
    assert s["l0_max"] == int(l0.max())


def test_streaming_reconstruction_stats_equal_one_batch_metrics():
    x = _data(1000, 24)
    x_hat = x * 0.8 + 0.1 * torch.randn_like(x)
    stats = M.ReconstructionStats(24)
    for a, b in zip(x.split(77), x_hat.split(77)):
        stats.update(a, b)
    r = stats.compute()
    assert r["n_vectors"] == 1000
    assert r["mse"] == pytest.approx(M.mse(x, x_hat), rel=1e-9)
    assert r["fvu"] == pytest.approx(M.fvu(x, x_hat), rel=1e-9)
    assert r["explained_variance"] == pytest.approx(M.explained_variance(x, x_hat), rel=1e-9)
    assert r["cosine"] == pytest.approx(float(M.cosine_similarity(x, x_hat).mean()), rel=1e-9)
    assert r["l2_ratio"] == pytest.approx(float(M.l2_ratio(x, x_hat).mean()), rel=1e-9)


def test_zero_vectors_are_left_out_of_cosine_and_l2_ratio():
    x = torch.cat([torch.zeros(3, 4), torch.ones(5, 4)])
    stats = M.ReconstructionStats(4)
    stats.update(x, x * 0.5)
    r = stats.compute()
    assert r["n_zero_vectors"] == 3
    assert r["cosine"] == pytest.approx(1.0) and r["l2_ratio"] == pytest.approx(0.5)


def test_kl_is_zero_for_identical_logits_and_matches_a_hand_computation():
    logits = torch.randn(6, 1000)
    assert M.kl_divergence(logits, logits).abs().max() < 1e-12
    p = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)  # p = (1/4, 3/4)
    q = torch.zeros(1, 2, dtype=torch.float64)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(M.kl_divergence(p, q)) == pytest.approx(want, rel=1e-12)
    assert M.kl_divergence(q, p) > 0 and float(M.kl_divergence(q, p)) != pytest.approx(want)


def test_top1_agreement_and_kl_gap_recovered():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    assert M.top1_agreement(a, b).tolist() == [1.0, 0.0, 1.0]
    assert M.kl_recovered(0.0, 2.0) == 1.0
    assert M.kl_recovered(2.0, 2.0) == 0.0
    assert M.kl_recovered(1.0, 4.0) == 0.75
    assert M.kl_recovered(3.0, 2.0) < 0
    assert math.isnan(M.kl_recovered(1.0, 0.0))


def test_splice_stats_recover_fractions_per_ablation():
    g = torch.Generator().manual_seed(0)
    orig = torch.randn(8, 50, generator=g)
    zero = torch.randn(8, 50, generator=g) * 3
    mean = orig + torch.randn(8, 50, generator=g)
    stats = M.SpliceStats()
    stats.update(orig[:5], {"sae": orig[:5], "zero": zero[:5], "mean": mean[:5]})
    stats.update(orig[5:], {"sae": orig[5:], "zero": zero[5:], "mean": mean[5:]})
    s = stats.compute("sae")
    assert s["n_images"] == 8 and s["kl_sae"] < 1e-12 and s["agreement_sae"] == 1.0
    assert s["frac_recovered_zero"] == pytest.approx(1.0)
    assert s["frac_recovered_mean"] == pytest.approx(1.0)
    assert s["kl_zero"] == pytest.approx(float(M.kl_divergence(orig, zero).mean()))


def test_hungarian_matching_of_a_permuted_copy_is_perfect():
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(64, 16, generator=g)
    perm = torch.randperm(64, generator=g)
    scaled = dec[perm] * torch.rand(64, 1, generator=g).add(0.5)  # atom norms do not matter
    res = M.match_dictionaries(dec, scaled)
    assert res["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert res["frac_above"] == 1.0 and res["n_matched"] == 64
    # Row i of A is matched to the position of atom i in the permuted copy.
    inv = torch.argsort(perm)
    assert [res["cols"][r] for r in range(64)] == inv[res["rows"]].tolist()


def test_hungarian_matching_of_random_dictionaries_is_low():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(128, 64, generator=g), torch.randn(128, 64, generator=g)
    res = M.match_dictionaries(a, b)
    assert res["mean_cosine"] < 0.5 and res["frac_above"] == 0.0


def test_hungarian_matching_handles_unequal_sizes_and_refuses_other_spaces():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20, 8, generator=g)
    res = M.match_dictionaries(a, torch.cat([a[:10], torch.randn(30, 8, generator=g)]))
    assert res["n_matched"] == 20 and res["frac_above"] >= 0.5
    with pytest.raises(ValueError, match="d=8 vs d=9"):
        M.match_dictionaries(a, torch.randn(20, 9))


def test_topk_channels_keeps_each_vectors_largest_channels_and_fills_the_rest():
    x = torch.tensor([[3.0, 0.0, 1.0, 2.0], [0.0, 5.0, 4.0, 0.5]])
    assert torch.equal(M.topk_channels(x, 2), torch.tensor([[3.0, 0.0, 0.0, 2.0],
                                                            [0.0, 5.0, 4.0, 0.0]]).double())
    mean = torch.tensor([1.5, 2.5, 2.5, 1.25])
    assert torch.equal(M.topk_channels(x, 1, mean), torch.tensor([[3.0, 2.5, 2.5, 1.25],
                                                                  [1.5, 5.0, 2.5, 1.25]]).double())
    assert torch.equal(M.topk_channels(x, 0), torch.zeros(2, 4).double())
    assert torch.equal(M.topk_channels(x, 9), x.double())  # k >= D: the vector whole
    # Its FVU on this batch, by hand: the residuals are the dropped channels.
    fvu = M.fvu(x, M.topk_channels(x, 2))
    dropped = 1.0 ** 2 + 0.5 ** 2
    assert fvu == pytest.approx(dropped / float((x.double() - x.double().mean(0)).pow(2).sum()))


def test_neuron_gain_is_the_neuron_fvu_over_the_sae_fvu():
    assert M.neuron_gain(0.16, 0.04) == pytest.approx(4.0)
    assert M.neuron_gain(0.0009, 0.0075) == pytest.approx(0.12)  # the neurons win at L0 64
    assert math.isnan(M.neuron_gain(0.1, 0.0)) and math.isnan(M.neuron_gain(float("nan"), 0.1))
