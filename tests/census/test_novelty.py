"""A copy of a neuron is never counted as a new curve detector; a genuine mixture is, and only
new detectors fill orientation gaps."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_vision.census import curves as C
from sae_vision.census import layer_census as CS
from sae_vision.census import novelty as N
from sae_vision.census import responses as R
from tests.census.test_curves import TOY_ORIENTATIONS, K, ToyNet, template, toy_cfg


class BroadToyNet(ToyNet):
    """ToyNet whose eight curve units (0°, 45°, ... 315°) are broadly tuned like real curve
    detectors: each pools matched filters every 15° with a Gaussian weight (σ = 20°) around its
    own orientation. Units 8-9: ToyNet's line and colour-flip units."""

    def __init__(self):
        super().__init__()
        grid = torch.arange(0.0, 360.0, 15.0)
        t = torch.stack([template("curve", float(a)) for a in grid])[:, None]
        self.fine = nn.Conv2d(1, len(grid), K, padding=K // 2, bias=False)
        self.fine.weight.data = t / t.flatten(1).sum(1).view(-1, 1, 1, 1)
        d = (grid[None, :] - torch.tensor(TOY_ORIENTATIONS)[:, None] + 180) % 360 - 180
        w = torch.exp(-d ** 2 / (2 * 20.0 ** 2))
        self.register_buffer("pool", w / w.sum(1, keepdim=True))

    def activations(self, x, layers):
        grey = x.mean(1, keepdim=True)
        signed = grey[:, :, :1, :1] - grey
        signed = signed / signed.abs().amax((2, 3), keepdim=True).clamp_min(1e-6)
        signed = F.conv2d(signed, self.blur, padding=3)
        fine = F.relu(self.fine(signed.abs()) - self.threshold)
        curves = torch.einsum("uk,bkhw->buhw", self.pool, fine)
        rest = super().activations(x, layers)["toy"][:, 8:]
        return {"toy": torch.cat([curves, rest], 1)}


class DirectionSAE(nn.Module):
    """A fake SAE with given decoder rows and encoder columns (both unit-normalised)."""

    def __init__(self, dec_FD: torch.Tensor, enc_FD: torch.Tensor | None = None):
        super().__init__()
        dec = dec_FD / dec_FD.norm(dim=1, keepdim=True)
        enc = dec if enc_FD is None else enc_FD / enc_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(dec)
        self.W_enc = nn.Parameter(enc.T.contiguous())

    def pre_acts(self, x):
        return x @ self.W_enc

    def encode(self, x):
        return torch.relu(self.pre_acts(x))


def test_axis_alignment_and_copy_rule_on_constructed_directions():
    dec = np.array([[0.0, 1.0, 0.0, 0.0],            # exactly neuron 1
                    [0.7071, 0.7071, 0.0, 0.0],      # half neuron 0, half neuron 1
                    [0.1, 0.2, 0.95, 0.2]])          # mostly neuron 2
    al = N.axis_alignment(dec)
    assert al["top1_neuron"].tolist() == [1, 0, 2] or al["top1_neuron"][1] in (0, 1)
    assert al["top1_share"][0] == pytest.approx(1.0)
    assert al["top1_share"][1] == pytest.approx(0.5, abs=1e-3)
    assert al["top3_share"][1] == pytest.approx(1.0, abs=1e-3)
    assert N.is_copy(al, None, 0.6).tolist() == [True, False, True]
    # An encoder that reads mostly one neuron makes a mixed decoder a copy all the same.
    enc = np.array([[0, 1.0, 0, 0], [0.95, 0.3, 0, 0], [0.1, 0.2, 0.95, 0.2]])
    assert N.is_copy(al, N.axis_alignment(enc), 0.6).tolist() == [True, True, True]


@pytest.fixture(scope="module")
def toy_split():
    """Toy census: feature 0 is neuron 0 exactly; feature 1 mixes the 0° and 45° curve neurons
    with half the decoder norm each; features 2-3 are copies of neurons 2 and 4."""
    net, cfg = BroadToyNet(), toy_cfg(min_gap_deg=30.0, invariance_step=10.0, jitter_px=1)
    eye = torch.eye(10)
    dec = torch.stack([eye[0], (eye[0] + eye[1]) / 2 ** 0.5, eye[2], eye[4]])
    vecs = torch.rand(500, 10) * 0.02
    res = CS.run_census(net, "toy", cfg,
              CS.CensusInputs(unit_mean=torch.zeros(10), unit_std=torch.full((10,), 0.02), null_seeds=0),
              CS.FeatureInputs(DirectionSAE(dec), mean=torch.zeros(4), std=torch.full((4,), 0.02), vectors=vecs),
              verbose=False)
    return res, cfg


def test_a_feature_equal_to_a_neuron_axis_is_a_copy(toy_split):
    res, _ = toy_split
    feats = {d["unit"]: d for d in res["features"]["detected"]}
    assert {0, 2, 3} <= set(feats)
    for f, n in ((0, 0), (2, 2), (3, 4)):
        nov = feats[f]["novelty"]
        assert nov["class"] == "copy"
        assert nov["decoder"]["neuron"] == n and nov["decoder"]["cos"] == pytest.approx(1.0)
        assert nov["decoder"]["neuron_is_detector"]
        assert nov["decoder"]["neuron_orientation"] == pytest.approx(TOY_ORIENTATIONS[n], abs=5)


def test_a_mixture_of_two_curve_neurons_45_degrees_apart_is_new_and_fills_their_gap(toy_split):
    res, cfg = toy_split
    feats = {d["unit"]: d for d in res["features"]["detected"]}
    assert 1 in feats, "the 0°+45° mixture must pass the census"
    mix = feats[1]
    assert mix["novelty"]["class"] == "new"
    assert mix["novelty"]["decoder"]["top1_share"] == pytest.approx(0.5, abs=1e-3)
    assert 0.0 < mix["preferred_orientation"] < 45.0  # between its two neurons' orientations
    assert res["features"]["n_new"] == 1 and res["features"]["n_copies"] == 3
    cov = res["coverage"]
    assert cov["n_features_in_neuron_gaps"] == 1  # only the new one counts
    assert cov["features_in_neuron_gaps_deg"] == [mix["preferred_orientation"]]
    assert cov["n_copy_detectors"] == 3
    new = res["features"]["new_features"][0]
    assert new["feature"] == 1 and {n["neuron"] for n in new["neurons"][:2]} == {0, 1}
    assert len(new["tuning_sigma"]) == len(new["neurons"][0]["tuning_sigma"])
    # Its two neurons are curve-tuned, but 20-25° away: the gap it fills is not covered.
    assert res["features"]["n_new_in_gaps_uncovered"] == 1
    # With the copy rule loosened to 0.5 the mixture becomes a "copy": the grid says so.
    assert res["features"]["by_copy_threshold"]["0.5"]["n_new"] == 0
    assert json.dumps(res)


def test_coverage_figure_and_new_feature_figure_are_written(tmp_path):
    net, cfg = BroadToyNet(), toy_cfg(min_gap_deg=30.0, invariance_step=10.0, jitter_px=1)
    eye = torch.eye(10)
    dec = torch.stack([eye[0], (eye[0] + eye[1]) / 2 ** 0.5])
    CS.run_census(net, "toy", cfg,
        CS.CensusInputs(unit_mean=torch.zeros(10), unit_std=torch.full((10,), 0.02), null_seeds=0),
        CS.FeatureInputs(DirectionSAE(dec), mean=torch.zeros(2), std=torch.full((2,), 0.02), vectors=torch.rand(200, 10) * 0.02),
        verbose=False,
        out_dir=tmp_path)
    assert (tmp_path / "curves_coverage.png").stat().st_size > 1000
    assert (tmp_path / "curves_new_features.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_random_dictionary_on_real_mixed3b_gives_no_new_detectors_beyond_the_fdr(bvlc_model):
    """Random unit directions as an 'SAE' (encoder = decoder): none is a copy, so any census
    pass would be a 'new detector'. There must be none beyond the FDR's allowance."""
    images = R.make_reference_images(8)
    vecs = R.layer_vectors(bvlc_model, "mixed3b", images)
    mean, std = R.unit_stats(vecs)
    g = torch.Generator().manual_seed(0)
    cfg = C.CurvesConfig(n_null_seeds=2, nulls=[], check_input_block=False)
    res = CS.run_census(bvlc_model, "mixed3b", cfg,
              CS.CensusInputs(unit_mean=mean, unit_std=std, images=images),
              CS.FeatureInputs(DirectionSAE(torch.randn(960, 480, generator=g)), vectors=vecs),
              verbose=False)
    n_neurons = res["neurons"]["n_detected"]
    f = res["features"]
    assert n_neurons >= 10
    assert f["n_copies"] == 0  # random directions are never axis-aligned
    assert f["n_new"] <= cfg.max_fdr * n_neurons, f["n_new"]
    assert f["alignment"]["decoder"]["p90"] < 0.1


def test_a_new_feature_next_to_a_curve_tuned_neuron_of_its_own_does_not_fill_a_gap():
    """A feature that is mostly one curve-tuned neuron the strict census rejected (at the same
    orientation) is "new" by the share rule, but the gap it seems to fill is already covered."""
    real_ev = {"preferred_orientation": np.array([0.0, 90.0, 335.0, 180.0]),
               "peak_sigma": np.array([20.0, 20.0, 20.0, 20.0]),
               "curve_line_ratio": np.array([3.0, 3.0, 3.0, 3.0]),
               "circular_variance": np.array([0.3, 0.3, 0.3, 0.3]),
               "secondary_peak_ratio": np.array([0.1, 0.1, 0.1, 0.1]),
               # neuron 2 fails the invariance test: no census detector at 335°
               "invariance_dtheta": np.array([0.0, 0.0, 0.0, 0.0]),
               "invariance_corr": np.array([0.99, 0.99, 0.93, 0.99]),
               "invariance_retention": np.ones(4), "corner_ratio": np.full(4, 3.0),
               "shifted_line_ratio": np.full(4, 3.0)}
    cfg = C.CurvesConfig()
    thr = C.thresholds_of(cfg)
    f_ev = {k: v[[2, 2]].copy() for k, v in real_ev.items()}
    f_ev["invariance_corr"] = np.array([0.99, 0.99])
    f_ev["preferred_orientation"] = np.array([340.0, 300.0])
    dec = np.array([[0.0, 0.0, 0.75, 0.66], [0.66, 0.0, 0.0, 0.75]])  # both under 0.6 share
    nov = N.feature_novelty(f_ev, thr, real_ev, thr, N.axis_alignment(dec), None, 0.6, 30.0)
    assert nov["n_new"] == 2 and nov["n_new_in_neuron_gaps"] == 2
    assert nov["new_in_gaps_covered_by"] == {0: [2], 1: []}
    assert nov["n_new_in_gaps_uncovered"] == 1
    assert nov["largest_gap_curve_tuned_neurons_deg"] < nov["largest_gap_neurons_deg"]

