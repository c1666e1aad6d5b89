"""The polysemanticity measures are well defined: shares in [0, 1] summing to at most 1, and a
selectivity comparison at chance for a random dictionary and clearly above for the true one."""

import numpy as np
import pytest
import torch

from sae_vision.census import polysemantic as P


def _rotated_sparse_sources(n=20_000, d=32, seed=0):
    """x = s Aᵀ: d sparse non-negative causes seen through a random rotation A (the neurons are
    arbitrary mixtures of the causes, so no neuron is privileged)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.05)
    a, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (s.double() @ a.T).float(), s, a.float()


def _compare_dictionary(x, dec_FD, k=4):
    """Codes = TopK(ReLU) of the centred projections on dec_FD (a dictionary used both ways)."""
    pre = (x - x.mean(0)) @ dec_FD.T
    top = pre.clamp_min(0).topk(k, dim=1)
    codes = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
    share = P.neuron_decomposition(codes, dec_FD)["share"]
    return P.selectivity_comparison(P.kurtosis(x), P.kurtosis(pre), P.own_features(share))


def test_shares_lie_in_unit_interval_and_sum_to_at_most_one():
    g = torch.Generator().manual_seed(1)
    codes = torch.relu(torch.randn(500, 40, generator=g))
    dec = torch.randn(40, 12, generator=g)  # mixed signs: some features inhibit a neuron
    out = P.neuron_decomposition(codes, dec, scale=2.0)
    share = out["share"]
    assert share.min() >= 0 and share.max() <= 1
    assert torch.all(share.sum(0) <= 1 + 1e-5)
    assert torch.allclose(share.sum(0), torch.ones(12), atol=1e-5)  # every neuron is driven
    assert torch.all((out["negative_frac"] > 0) & (out["negative_frac"] < 1))
    assert torch.all(out["n_effective"] >= 1 - 1e-5)


def test_a_neuron_no_feature_drives_has_zero_shares():
    codes = torch.ones(10, 3)
    dec = torch.tensor([[1.0, -1.0], [0.5, -2.0], [0.0, 0.0]])
    share = P.neuron_decomposition(codes, dec)["share"]
    assert torch.all(share[:, 1] == 0)
    assert torch.allclose(share[:, 0], torch.tensor([2 / 3, 1 / 3, 0.0]))


def test_random_dictionary_scores_at_chance_and_planted_one_above():
    x, _, a = _rotated_sparse_sources()
    planted = _compare_dictionary(x, a.T.contiguous())  # rows = the causes' directions
    rand = [_compare_dictionary(x, torch.nn.functional.normalize(
        torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(s)), dim=1))
        for s in range(4)]
    mean_rand = sum(r["mean_frac_more_selective"] for r in rand) / len(rand)
    assert 0.35 <= mean_rand <= 0.65, mean_rand
    assert planted["mean_frac_more_selective"] >= 0.9
    assert planted["mean_frac_more_selective"] - mean_rand >= 0.3


def test_baseline_helper_matches_chance_on_unprivileged_data():
    x, _, _ = _rotated_sparse_sources(seed=3)
    b = P.random_dictionary_baseline(x, n_features=64, k=4, seed=0)
    assert 0.3 <= b["mean_frac_more_selective"] <= 0.7
    # A wide random dictionary spreads every neuron thin; it is still scored, never undefined.
    wide = P.random_dictionary_baseline(x, n_features=1024, k=8, seed=1)
    assert wide["n_neurons_scored"] == x.shape[1] and wide["mean_frac_more_selective"] is not None


def test_report_is_well_formed_and_r2_is_a_true_r2():
    x, s, a = _rotated_sparse_sources(n=4000, d=16)
    dec = a.T.contiguous()
    pre = x @ dec.T
    codes = pre.clamp_min(0)
    recon = codes @ dec
    rep = P.polysemantic_report(x, codes, pre, recon, dec)
    assert len(rep["neurons"]) == 16
    for row in rep["neurons"]:
        assert row["r2"] <= 1.0
        assert 0 <= row["share_sum"] <= 1.0 + 1e-3
        assert all(0 <= f["share"] <= 1 for f in row["features"])
    # A perfect reconstruction has R² = 1; the zero reconstruction R² <= 0.
    assert min(r["r2"] for r in rep["neurons"]) > 0.999
    assert float(P.neuron_r2(x, torch.zeros_like(x)).max()) <= 0.0


def test_split_selectivity_separates_copies_from_splits():
    from sae_vision.census.polysemantic import split_selectivity

    rows = [  # two copied neurons (one more selective copy each), one split into three features
        {"features": [{"feature": 0}], "frac_features_more_selective": 1.0},
        {"features": [{"feature": 1}], "frac_features_more_selective": 1.0},
        {"features": [{"feature": 2}, {"feature": 3}, {"feature": 4}],
         "frac_features_more_selective": 1 / 3},
        {"features": [], "frac_features_more_selective": None},  # nothing reads it: unscored
    ]
    out = split_selectivity(rows)
    assert out["n_neurons_single"] == 2 and out["frac_more_selective_single"] == 1.0
    assert out["n_neurons_split"] == 1
    assert out["frac_more_selective_split"] == pytest.approx(1 / 3)
    # The pooled mean (what the summary's headline reports) hides that the split scored low.
    pooled = np.mean([r["frac_features_more_selective"] for r in rows[:3]])
    assert pooled > 0.7 > out["frac_more_selective_split"]
