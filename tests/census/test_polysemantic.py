"""The polysemanticity measures are well defined: shares in [0, 1] summing to at most 1, a
selectivity comparison at chance for a random dictionary and clearly above for the true one, and
fair to neurons and features alike on planted rectified neurons of known mixtures."""

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
    return P.matched_comparison(x, pre, P.firing_rate(x), P.firing_rate(codes),
                                P.own_features(share))


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
    b = P.random_dictionary_baseline(x, torch.full((64,), 4 / 64), seed=0)
    # Near chance, if a little above: choosing a neuron's own features by share picks random
    # directions with heavy upper tails (0.57-0.78 over six rotations, mean 0.64). That is why
    # it is reported beside every SAE, and the SAE's excess over it is the number to read.
    assert 0.35 <= b["mean_frac_more_selective"] <= 0.8
    planted = _compare_dictionary(x, _rotated_sparse_sources(seed=3)[2].T.contiguous())
    assert planted["mean_frac_more_selective"] >= b["mean_frac_more_selective"] + 0.2
    # A wide random dictionary spreads every neuron thin; it is still scored, never undefined.
    wide = P.random_dictionary_baseline(x, torch.full((1024,), 8 / 1024), seed=1)
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


# --------------------------------------------------------------------------------------------
# Planted rectified neurons of known mixtures: the score must say what is really there


def _causes(n_causes, n=60_000, seed=0):
    """Equally selective true units: a dense Gaussian background plus a rare large cause."""
    g = torch.Generator().manual_seed(seed)
    sparse = (torch.rand(n, n_causes, generator=g) < 0.02) * 4 * torch.empty(
        n, n_causes).exponential_(generator=g)
    return torch.randn(n, n_causes, generator=g) + sparse


def _rectified(z, bias):
    """A neuron's post-ReLU channel at a threshold (a real neuron's bias varies)."""
    return (z - bias).clamp_min(0.0)


def _report(acts, pre, dec, code_bias=2.5):
    """polysemantic_report for a dictionary whose pre-activations are `pre` (its codes fire
    above code_bias, sparser than the neurons, as an SAE's do)."""
    codes = (pre - code_bias).clamp_min(0.0)
    return P.polysemantic_report(acts, codes, pre, codes @ dec, dec)


def test_a_rectified_planted_mixture_scores_as_selective_as_it_really_is():
    """Four neurons each mix two causes; a dictionary of the causes splits every one of them.
    Each feature reads one cause, so it really is more selective than its two-cause neuron, at
    whatever threshold the neuron fires. The old score (post-ReLU neuron against pre-activation
    feature) said the opposite: the neuron's threshold alone outweighed the split."""
    u = _causes(8)
    acts = torch.stack([_rectified((u[:, 2 * i] + u[:, 2 * i + 1]) / 2 ** 0.5, b)
                        for i, b in enumerate((0.0, 0.5, 1.0, 1.5))], 1)
    dec = torch.zeros(8, 4)
    for f in range(8):
        dec[f, f // 2] = 2 ** -0.5
    pre = 3.0 * u - 1.0  # a feature's scale and offset must not matter
    rep = _report(acts, pre, dec)
    split = rep["summary"]["copies_vs_splits"]
    assert split["n_neurons_split"] == 4
    assert split["frac_more_selective_split"] == 1.0
    for row in rep["neurons"]:
        assert {f["feature"] for f in row["features"]} == {2 * row["neuron"],
                                                            2 * row["neuron"] + 1}
        for f in row["features"]:  # both scored at the neuron's own firing rate
            assert f["matched_rate"] == pytest.approx(row["rate"])
    # The unmatched score, kept for comparison, calls the splits less selective.
    assert rep["summary"]["unmatched"]["mean_frac_own_features_more_selective"] <= 0.25
    # The exemplar score agrees: a vector's embedding shows which causes are present, so a
    # two-cause neuron's top exemplars are of two kinds and each feature's of one.
    g = torch.Generator().manual_seed(3)
    sparse = u.clamp_min(0) * (u > 3)  # the strong, rare part of each cause
    emb = sparse @ torch.randn(8, 24, generator=g) + 0.3 * torch.randn(len(u), 24, generator=g)
    codes = (pre - 2.5).clamp_min(0.0)
    ex = P.polysemantic_report(acts, codes, pre, codes @ dec, dec,
                               exemplars={"emb": emb, "n_top": 32, "layer": "toy"})
    assert ex["summary"]["exemplars"]["mean_frac_own_features_more_coherent"] == 1.0
    assert ex["summary"]["copies_vs_splits"]["frac_more_coherent_split"] == 1.0
    assert all(f["coherence"] > row["coherence"] for row in ex["neurons"]
               for f in row["features"])


def test_a_copy_of_a_rectified_neuron_ties_and_a_mixing_feature_loses():
    """The nulls for splits. Copies: a feature that reads a one-cause neuron's own pre-ReLU
    value (any scale and offset) is exactly as selective as the neuron, so the pair ties (0.5),
    where the unmatched score called every copy less selective. And a feature that mixes two
    one-cause neurons is really less selective than either: the fair score must say so, so it
    does not favour features that read two channels either."""
    u = _causes(4, seed=1)
    biases = (0.0, 0.7, 1.4, 2.0)
    acts = torch.stack([_rectified(u[:, d], b) for d, b in enumerate(biases)], 1)
    copies = _report(acts, 2.0 * u + 0.5, torch.eye(4))
    cs = copies["summary"]
    assert cs["copies_vs_splits"]["n_neurons_single"] == 4
    assert cs["mean_frac_own_features_more_selective"] == 0.5
    assert cs["unmatched"]["mean_frac_own_features_more_selective"] == 0.0
    mix = torch.stack([u[:, 0] + u[:, 1], u[:, 2] + u[:, 3]], 1) / 2 ** 0.5
    dec = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]) / 2 ** 0.5
    mixed = _report(acts, mix, dec)["summary"]
    assert mixed["n_neurons_scored"] == 4
    assert mixed["mean_frac_own_features_more_selective"] == 0.0


def test_matched_kurtosis_of_a_post_relu_channel_is_that_of_its_pre_relu_value():
    """The neuron side needs no pre-ReLU tap: at its own rate or below, the post-ReLU channel
    rectified at the matched threshold is the pre-ReLU value rectified there."""
    z = _causes(3, n=20_000, seed=2)
    post = _rectified(z, 0.5)
    rate = P.firing_rate(post) * torch.tensor([1.0, 0.5, 0.1])
    assert torch.allclose(P.matched_kurtosis(post, rate), P.matched_kurtosis(z, rate), rtol=1e-5)
    # At the channel's own rate that is the channel itself (up to its one smallest response).
    assert torch.allclose(P.matched_kurtosis(z, P.firing_rate(post)), P.kurtosis(post),
                          rtol=1e-3)


def test_random_dictionary_is_matched_on_the_sae_firing_rates():
    x, _, _ = _rotated_sparse_sources(n=4000, d=16, seed=4)
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))  # no ties
    rates = torch.linspace(0.005, 0.2, 48)
    b = P.random_dictionary_baseline(x, rates, seed=0)
    assert b["n_pairs"] > 0
    for (d, _), (_, _, q) in b["pairs"].items():  # compared at the neuron's own rate
        assert q == pytest.approx(float(P.firing_rate(x)[d]))
    # Each random feature's code fires at its SAE feature's rate.
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(48, 16, generator=g, dtype=torch.float64),
                                         dim=1).float()
    pre = (x - x.mean(0)) @ dirs.T
    fired = P.firing_rate(pre - P.rate_threshold(pre, rates))
    assert torch.allclose(fired, rates, atol=1.5 / len(x))
    # A rate of 0 (a dead SAE feature) gives a random feature that never fires and owns nothing.
    dead = P.random_dictionary_baseline(x, torch.zeros(8), seed=0)
    assert dead["n_pairs"] == 0 and dead["mean_frac_more_selective"] is None


def test_exemplar_coherence_sees_two_kinds_whatever_the_activation_shape():
    """Vectors of 6 kinds, embedded as the kind's prototype plus noise. A unit answering one
    kind is coherent; one answering two kinds about half as coherent; and a ReLU at any bias
    under the top exemplars, or a rescaling, changes nothing (the score reads rankings only)."""
    g = torch.Generator().manual_seed(7)
    n = 6000
    kind = torch.randint(0, 6, (n,), generator=g)
    emb = 3 * torch.randn(6, 32, generator=g)[kind] + torch.randn(n, 32, generator=g)
    strength = torch.rand(n, generator=g)
    mono = torch.where(kind == 0, 1 + strength, strength)  # top responses: kind 0 only
    poly = torch.where((kind == 1) | (kind == 2), 1 + strength, strength)
    resp = torch.stack([mono, poly], 1)
    coh = P.exemplar_coherence(resp, emb, n_top=32)
    assert coh[0] > 0.8 and 0.25 < coh[1] < 0.6 and coh[0] > 1.6 * coh[1]
    rectified = 5 * (resp - 0.9).clamp_min(0)
    assert torch.allclose(P.exemplar_coherence(rectified, emb, n_top=32), coh)
    with pytest.raises(ValueError, match="n_top"):
        P.exemplar_coherence(resp, emb, n_top=1)


def test_exemplar_coherence_takes_one_exemplar_per_image_when_asked():
    """Neighbouring positions of one photo look alike: with groups, a unit whose top responses
    all sit in one image has one exemplar there, and its other exemplars come from elsewhere."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [-1.0, 0.0], [0.0, 1.0],
                        [0.0, -1.0]])
    resp = torch.tensor([[9.0], [8.0], [7.0], [1.0], [2.0], [0.5]])
    groups = torch.tensor([0, 0, 0, 1, 2, 3])
    loose = P.exemplar_coherence(resp, emb, n_top=3)
    strict = P.exemplar_coherence(resp, emb, n_top=3, groups_N=groups)  # rows 0, 4, 3
    assert loose[0] > 0.99 and strict[0] < 0.0
    e = torch.nn.functional.normalize(emb - emb.mean(0), dim=1)[[0, 4, 3]].double()
    want = ((e.sum(0) ** 2).sum() - 3) / 6
    assert float(strict[0]) == pytest.approx(float(want), rel=1e-5)
