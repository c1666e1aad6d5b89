"""The curve-detector census: tuning curves, criterion, nulls, calibration, coverage, polysemanticity.

Fast tests use a tiny stand-in network of matched-filter "curve detectors"; the `slow` ones run
the census on the real BVLC mixed3b weights (../shared/weights).
"""

import json
import math
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_vision.census import curves as C
from sae_vision.census import layer_census as CS
from sae_vision.census import responses as R
from sae_vision.census import stimuli as S
from sae_vision.core.config import CurvesConfig

Geometry = namedtuple("Geometry", "stride rf_size offset size")
K = 31  # toy kernel side
TOY_ORIENTATIONS = [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]


def template(kind: str, theta: float, radius: float = 7.0) -> torch.Tensor:
    c = (K - 1) / 2
    if kind == "curve":
        t = S.curve_sweep([theta], [radius], size=K, centre=(c, c), arc_length_deg=150,
                          max_arc_px=20, width=2.0)
    else:
        t = S.make_table("line", [theta], size=K, centre=(c, c), length_px=20, width=2.0)
    return 1 - S.render(t)[0, 0]  # ink coverage


class ToyNet(nn.Module):
    """Stand-in for VisionModel: one stride-1 layer "toy" of matched filters on the ink map.

    Units 0-7: curve detectors at TOY_ORIENTATIONS (contrast-polarity invariant: they see
    |background - grey|); unit 8: a straight-line detector; unit 9: a unit that prefers θ=0 for
    dark-on-light curves but θ=180 for light-on-dark ones (it sees the signed contrast).
    """

    family = "toy"
    input_size = 64

    def __init__(self):
        super().__init__()
        temps = [template("curve", t) for t in TOY_ORIENTATIONS] + [template("line", 90.0)]
        w = torch.stack(temps)[:, None]
        self.conv = nn.Conv2d(1, len(temps), K, padding=K // 2, bias=False)
        self.conv.weight.data = w / w.flatten(1).sum(1).view(-1, 1, 1, 1)
        self.flip = nn.Conv2d(1, 2, K, padding=K // 2, bias=False)
        f = torch.stack([template("curve", 0.0), template("curve", 180.0)])[:, None]
        self.flip.weight.data = f / f.flatten(1).sum(1).view(-1, 1, 1, 1)
        self.register_buffer("threshold", torch.tensor(0.2))
        g = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / (2 * 1.5**2))
        self.register_buffer("blur", (g[:, None] * g[None]).div(g.sum() ** 2)[None, None])

    def layer_names(self):
        return ["toy"]

    def geometry(self, layer):
        return Geometry(1, K, 0.0, self.input_size)

    def signed_contrast(self, x):
        """[B, 1, H, W]: grey against the corner (dark ink on a light background is positive),
        contrast-normalised and blurred, so colour pairs and small shifts keep the tuning."""
        grey = x.mean(1, keepdim=True)
        signed = grey[:, :, :1, :1] - grey
        signed = signed / signed.abs().amax((2, 3), keepdim=True).clamp_min(1e-6)
        return F.conv2d(signed, self.blur, padding=3)

    def activations(self, x, layers):
        signed = self.signed_contrast(x)
        a = F.relu(self.conv(signed.abs()) - self.threshold)
        fl = self.flip(signed)
        flip = F.relu(fl[:, :1] - self.threshold) + F.relu(-fl[:, 1:] - self.threshold)
        return {"toy": torch.cat([a, flip], 1)}


def toy_cfg(**kw) -> CurvesConfig:
    base = dict(radii=[4.0, 7.0, 10.0, 1000.0], invariance_radii=[4.0, 7.0, 10.0],
                max_arc_px=20.0, arc_length_deg=150.0, line_width=2.0, canvas_size=48,
                line_shifts_px=[-6.0, -3.0, 3.0, 6.0], arc_conditions=[[150.0, 14.0]],
                corner_angles_deg=[90.0, 120.0], orientation_step=10.0, invariance_step=30.0,
                min_invariance_corr=0.7, n_null_seeds=0, nulls=[], calibrate=False)
    base.update(kw)
    return CurvesConfig(**base)


@pytest.fixture(scope="module")
def toy_census():
    net = ToyNet()
    cfg = toy_cfg()
    probe = R.make_probe(net, "toy", cfg.canvas_size)
    table = C.make_battery(cfg, probe)
    acts = R.centre_activations(net, "toy", table, probe)
    mean, std = torch.zeros(acts.shape[1]), torch.full((acts.shape[1],), 0.02)
    ev = C.evidence(acts.numpy(), table, cfg, mean.numpy(), std.numpy())
    return net, cfg, probe, table, acts, ev


# --------------------------------------------------------------------------------------------
# Fast: stand-in network and pure functions


def test_probe_picks_a_canvas_holding_the_whole_receptive_field():
    g = Geometry(8, 91, 7.0, 28)
    model = type("M", (), {"geometry": lambda self, layer: g, "input_size": 224})()
    p = R.make_probe(model, "mixed3b")
    assert p.size % 8 == 0 and p.size < 224
    assert p.centre - 45 >= 0 and p.centre + 45 <= p.size - 1
    assert p.centre == 7.0 + 8 * p.pos


def test_toy_curve_detectors_are_found_at_their_orientations(toy_census):
    _, cfg, _, _, _, ev = toy_census
    crit = C.criterion(ev, C.thresholds_of(cfg))
    for u, theta in enumerate(TOY_ORIENTATIONS):
        assert crit["detected"][u], {k: v[u] for k, v in ev.items()}
        assert C.circ_diff(ev["preferred_orientation"][u], theta) <= 5.0
    assert not crit["detected"][8] and not crit["curve_line_ratio"][8]  # the line detector


def test_invariance_rejects_a_unit_whose_preference_flips_with_colour(toy_census):
    _, cfg, _, _, _, ev = toy_census
    crit = C.criterion(ev, C.thresholds_of(cfg))
    u = 9
    assert ev["preferred_orientation"][u] == 0.0
    assert ev["peak_sigma"][u] > cfg.min_peak_sigma  # strong and curve-selective on the base...
    assert crit["curve_line_ratio"][u] and crit["circular_variance"][u]
    assert ev["colour_dtheta"][u] >= 150  # ...but white-on-black flips it to θ = 180
    assert not crit["invariance_dtheta"][u] and not crit["detected"][u]


def test_detected_toy_unit_prefers_its_curve_to_the_opposite_and_to_lines(toy_census):
    _, cfg, _, table, acts, ev = toy_census
    tc = C.tuning_curves(acts.numpy(), table, cfg)
    u = 2
    ri = list(tc["radii"]).index(ev["preferred_radius"][u])
    curve = tc["raw"][u, ri]
    ti = int(np.argmax(curve))
    assert curve[ti] > 5 * max(curve[(ti + len(curve) // 2) % len(curve)], 1e-6)
    assert ev["curve_line_ratio"][u] > 2 and ev["opposite_ratio"][u] < 0.2
    assert tc["raw"].shape == (10, 4, 36)  # radii incl. the straight one x orientations


class OneHotSAE(nn.Module):
    """A fake SAE whose features are neuron directions (W_dec rows are one-hot), plus noise ones."""

    def __init__(self, d_in: int, channels, n_noise: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dirs = [F.one_hot(torch.tensor(c), d_in).float() for c in channels]
        noise = torch.randn(n_noise, d_in, generator=g)
        self.W_dec = nn.Parameter(torch.cat([torch.stack(dirs), noise / noise.norm(dim=1, keepdim=True)]))

    def pre_acts(self, x):
        return x @ self.W_dec.T

    def encode(self, x):
        return F.relu(self.pre_acts(x))


def test_planted_feature_on_the_toy_net_is_found_with_its_neurons_orientation():
    net, cfg = ToyNet(), toy_cfg()
    std = torch.full((10,), 0.02)
    sae = OneHotSAE(10, [3])
    res = CS.run_census(net, "toy", cfg,
              CS.CensusInputs(unit_mean=torch.zeros(10), unit_std=std, null_seeds=0),
              CS.FeatureInputs(sae, vectors=torch.rand(500, 10) * 0.02),
              verbose=False)
    neurons = {d["unit"]: d for d in res["neurons"]["detected"]}
    feats = {d["unit"]: d for d in res["features"]["detected"]}
    assert 0 in feats and feats[0]["preferred_orientation"] == neurons[3]["preferred_orientation"]
    assert json.dumps(res)  # JSON-able


def test_calibration_tightens_until_fdr_is_met():
    rng = np.random.default_rng(0)

    def fake(n_strong, n_weak, n=200):
        ev = {k: np.zeros(n) for k in C.CRITERIA}
        ev.update(curve_line_ratio=np.full(n, 10.0), invariance_corr=np.full(n, 0.99),
                  invariance_retention=np.ones(n), corner_ratio=np.full(n, 5.0),
                  shifted_line_ratio=np.full(n, 5.0), circular_variance=np.full(n, 0.1))
        ev["peak_sigma"] = np.concatenate([rng.uniform(20, 40, n_strong), rng.uniform(6, 9, n_weak),
                                           rng.uniform(0, 3, n - n_strong - n_weak)])
        return ev

    cfg = CurvesConfig(min_peak_sigma=5.0, max_fdr=0.1)
    real = fake(30, 20)
    nulls = {"permuted": [fake(0, 15), fake(1, 12), fake(0, 14)]}
    before = C.fdr_table(real, nulls, C.thresholds_of(cfg))
    assert before["real"] == 50 and before["fdr"] > 0.1
    cal = C.calibrate(real, nulls, cfg)
    assert cal["tightened"] and cal["met"]
    assert cal["table"]["fdr"] <= 0.1 and cal["table"]["real_exceeds_every_null"]
    assert cal["thresholds"]["min_peak_sigma"] >= 10.0 and cal["table"]["real"] >= 30


def fake_evidence(values: dict, n: int) -> dict:
    """Evidence of n units that pass every default criterion, with some columns replaced."""
    ev = {"peak_sigma": np.full(n, 30.0), "curve_line_ratio": np.full(n, 10.0),
          "circular_variance": np.full(n, 0.1), "secondary_peak_ratio": np.full(n, 0.1),
          "invariance_dtheta": np.zeros(n), "invariance_corr": np.full(n, 0.99),
          "invariance_retention": np.ones(n), "corner_ratio": np.full(n, 5.0),
          "shifted_line_ratio": np.full(n, 5.0)}
    ev.update({k: np.asarray(v, dtype=float) for k, v in values.items()})
    return ev


def test_thresholds_come_from_the_calibration_seeds_and_the_fdr_from_the_report_seeds():
    cfg = CurvesConfig(min_peak_sigma=5.0, max_fdr=0.1)
    n = 200

    def units(strong: int, weak: int) -> dict:  # peaks 30σ (strong), 8σ (weak), 1σ (the rest)
        return fake_evidence({"peak_sigma": [30.0] * strong + [8.0] * weak
                              + [1.0] * (n - strong - weak)}, n)

    real = units(30, 20)
    # Seeds 0-1 calibrate (weak units only: the grid tightens min_peak_sigma past 8σ);
    # seeds 2-3 report (strong units, which no grid point removes).
    nulls = {"permuted": [units(0, 15), units(0, 12), units(3, 0), units(1, 0)],
             "reinit": [units(0, 0), units(0, 1), units(0, 0), units(0, 0)]}
    split = C.seed_split(4)
    assert split["calibration"] == [0, 1] and split["report"] == [2, 3] and split["held_out"]
    cal = C.calibrate_held_out(real, nulls, cfg)
    assert cal["seeds"] == split and cal["tightened"]
    assert cal["thresholds"] == C.calibrate(real, C.select_seeds(nulls, [0, 1]), cfg)["thresholds"]
    assert cal["thresholds"]["min_peak_sigma"] > 8.0
    # Reported on seeds 2-3, at those thresholds: 2 of 30 per seed; the calibration seeds say 0.
    assert cal["calibration_table"]["fdr"] == 0.0 and cal["calibration_met"]
    assert cal["table"]["nulls"]["permuted"]["counts"] == [3, 1]
    assert cal["table"]["fdr"] == pytest.approx(2 / 30) and cal["met"]
    assert cal["table"] == C.fdr_table(real, C.select_seeds(nulls, [2, 3]), cal["thresholds"])
    # Other report-seed evidence: the same thresholds, another reported FDR.
    worse = {k: v[:2] + [units(12, 0), units(10, 0)] for k, v in nulls.items()}
    cal2 = C.calibrate_held_out(real, worse, cfg)
    assert cal2["thresholds"] == cal["thresholds"]
    assert cal2["table"]["fdr"] == pytest.approx(11 / 30) and not cal2["met"]
    assert cal2["calibration_table"] == cal["calibration_table"]
    # Other calibration-seed evidence that leads to the same thresholds: the same report.
    other = {k: [units(0, 14), units(0, 14)] + v[2:] for k, v in nulls.items()}
    cal3 = C.calibrate_held_out(real, other, cfg)
    assert cal3["thresholds"] == cal["thresholds"] and cal3["table"] == cal["table"]
    # One seed: nothing to hold out, today's calibration on that seed, and the record says so.
    one = C.calibrate_held_out(real, {k: v[:1] for k, v in nulls.items()}, cfg)
    assert one["seeds"]["calibration"] == one["seeds"]["report"] == [0]
    assert not one["seeds"]["held_out"] and "same seeds" in one["seeds"]["rule"]
    same = C.calibrate(real, {k: v[:1] for k, v in nulls.items()}, cfg)
    assert one["thresholds"] == same["thresholds"] and one["table"] == same["table"]


def test_fdr_has_its_95_percent_upper_bound_and_0_over_0_is_no_number():
    cfg = CurvesConfig()
    thr = C.thresholds_of(cfg)
    real = fake_evidence({}, 14)
    null = [fake_evidence({"peak_sigma": [30.0] * c + [0.0] * (14 - c)}, 14)
            for c in (1, 1, 0, 1, 1, 0)]
    t = C.fdr_table(real, {"permuted": null}, thr)
    assert t["nulls"]["permuted"]["counts"] == [1, 1, 0, 1, 1, 0]
    assert t["fdr"] == pytest.approx(4 / 6 / 14)  # 0.048
    # Poisson (Garwood): the sum 4 over 6 seeds has a 95% upper bound of 9.15 on its mean.
    assert t["fdr_upper95"] == pytest.approx(9.1535 / 6 / 14, rel=1e-3)
    assert 0.10 < t["fdr_upper95"] < 0.12
    # The bound shrinks with more seeds at the same rate, and never drops below the estimate.
    assert C.fdr_upper_bound([1, 1, 0, 1, 1, 0] * 4, 14) < t["fdr_upper95"]
    assert C.fdr_upper_bound([0, 0, 0], 10) == pytest.approx(2.9957 / 3 / 10, rel=1e-3)
    # Nothing detected anywhere: 0/0 is not an FDR of 0.
    none = fake_evidence({"peak_sigma": np.zeros(14)}, 14)
    t0 = C.fdr_table(none, {"permuted": [none, none]}, thr)
    assert t0["real"] == 0 and t0["fdr"] is None and t0["fdr_upper95"] is None
    assert t0["nulls"]["permuted"]["fdr"] is None
    assert CS.fdr_text(t0["nulls"]["permuted"]) == "FDR – (95% bound –)"
    assert CS.fdr_text(t["nulls"]["permuted"]) == "FDR 0.05 (95% bound 0.11)"


def test_threshold_band_varies_every_criterion_both_ways_around_the_used_point():
    cfg = CurvesConfig()
    rng = np.random.default_rng(0)
    n = 300
    real = fake_evidence({k: rng.uniform(0.5, 1.5, n) * v for k, v in
                          fake_evidence({}, 1).items()}, n)
    nulls = {"permuted": [fake_evidence({"peak_sigma": rng.uniform(0, 8, n)}, n)]}
    base = {**C.thresholds_of(cfg), "min_peak_sigma": 7.5}  # e.g. calibration tightened it
    grid = C.threshold_grid(real, nulls, cfg, base)
    used = [g for g in grid if set(g["steps"].values()) == {0}]
    assert len(used) == 1 and C.grid_thresholds(used[0], {}) == base
    for name, _ in C.CRITERIA.values():
        vals = sorted({g["thresholds"][name] for g in grid})
        assert vals[0] < base[name] < vals[-1], (name, vals)  # looser and stricter than used
        alone = [g for g in grid if g["steps"][name] != 0
                 and sum(abs(k) for k in g["steps"].values()) == 1]
        assert len(alone) == 2  # moved alone, both ways
    assert len(grid) >= 1 + 2 * len(C.CRITERIA) + 2
    assert any(g["in_band"] for g in grid) and not all(g["in_band"] for g in grid)
    # Stricter never detects more.
    strict = next(g for g in grid if set(g["steps"].values()) == {1})
    loose = next(g for g in grid if set(g["steps"].values()) == {-1})
    assert strict["real"] <= used[0]["real"] <= loose["real"]
    assert C.stepped_thresholds(base, [1] * 9, 0.2)["min_invariance_corr"] < 1.0


def test_coverage_numbers_on_constructed_orientations():
    neurons = [0.0, 20.0, 45.0, 90.0, 100.0, 180.0]
    features = [130.0, 150.0, 260.0, 10.0]
    cov = C.coverage(neurons, features, min_gap_deg=30.0)
    assert cov["largest_gap_neurons_deg"] == 180.0 and cov["largest_gap_neurons_at_deg"] == 180.0
    assert cov["largest_gap_combined_deg"] == 100.0  # 260 -> 360
    assert cov["n_features_in_neuron_gaps"] == 3  # 130 and 150 (gap 100-180) and 260
    assert C.coverage([], [5.0])["largest_gap_neurons_deg"] == 360.0
    assert C.orientation_gaps([350.0, 10.0])[0] == (10.0, 340.0)


def test_random_directions_are_unit_norm_and_centred():
    rd = R.RandomDirections(16, 5, seed=1, centre=torch.ones(16))
    assert torch.allclose(rd.W_dec.norm(dim=1), torch.ones(5))
    assert torch.allclose(rd.pre_acts(torch.ones(3, 16)), torch.zeros(3, 5))
    assert (rd.encode(torch.randn(7, 16)) >= 0).all()


def test_coverage_figure_and_outputs_are_written(tmp_path, toy_census):
    net, cfg, *_ = toy_census
    res = CS.run_census(net, "toy", cfg,
              CS.CensusInputs(unit_mean=torch.zeros(10), unit_std=torch.full((10,), 0.02),
                             null_seeds=0),
              out_dir=tmp_path,
              verbose=False)
    files = res["files"]
    for key in ("coverage", "tuning_neurons", "evidence_neurons", "json"):
        assert (tmp_path / files[key].split("/")[-1]).is_file()
    saved = json.loads((tmp_path / "curves.json").read_text())
    assert saved["neurons"]["n_detected"] == res["neurons"]["n_detected"] == 8
    assert 40.0 <= saved["coverage"]["largest_gap_neurons_deg"] <= 50.0  # 8 detectors, 45° apart
    unit = saved["neurons"]["detected"][0]  # what the report draws: σ tuning at r*, per θ
    assert len(unit["tuning_sigma"]) == len(saved["tuning_orientations"]) == 36
    assert np.array(unit["tuning_surface_sigma"]).shape == (len(saved["tuning_radii"]), 36)


# --------------------------------------------------------------------------------------------
# Real BVLC weights


@pytest.fixture(scope="module")
def reference_stats(bvlc_model):
    """Natural-image mean/std of every mixed3b channel over demo-like crops."""
    images = R.make_reference_images(32)
    mean, std = R.unit_stats(R.layer_vectors(bvlc_model, "mixed3b", images))
    return images, mean, std


@pytest.fixture(scope="module")
def real_census(bvlc_model, reference_stats):
    """Neuron census of real mixed3b without nulls (the nulls have their own slow test)."""
    images, mean, std = reference_stats
    cfg = CurvesConfig(n_null_seeds=0)
    return CS.run_census(bvlc_model, "mixed3b", cfg,
               CS.CensusInputs(unit_mean=mean, unit_std=std, images=images, null_seeds=0),
               verbose=False), cfg


@pytest.mark.slow
def test_real_mixed3b_has_curve_detectors_with_well_defined_orientations(bvlc_model, real_census,
                                                                         reference_stats):
    res, cfg = real_census
    det = res["neurons"]["detected"]
    assert len(det) >= 10
    for d in det:  # unimodal, bounded tuning with nothing at the opposite orientation
        assert d["circular_variance"] <= cfg.max_circular_variance
        assert d["tuning_width_deg"] <= 60 and d["opposite_ratio"] <= 0.1
    assert len({round(d["preferred_orientation"] / 45) % 8 for d in det}) >= 5  # many directions
    # A detected unit responds far more to its preferred curve than to the opposite or a line.
    best = max(det, key=lambda d: d["peak_sigma"])
    u, theta, radius = best["unit"], best["preferred_orientation"], best["preferred_radius"]
    probe = R.make_probe(bvlc_model, "mixed3b")
    kw = dict(size=probe.size, centre=(probe.centre, probe.centre), max_arc_px=cfg.max_arc_px,
              arc_length_deg=cfg.arc_length_deg)
    t = S.concat_tables([S.curve_sweep([theta, theta + 180], [radius], **kw),
                         S.make_table("line", [theta + 90 * k for k in range(4)], length_px=48,
                                      size=probe.size, centre=(probe.centre, probe.centre))])
    r = R.centre_activations(bvlc_model, "mixed3b", t, probe)[:, u]
    _, mean, std = reference_stats
    z = (r - mean[u]) / std[u]
    assert z[0] > 10
    assert r[0] > 5 * max(r[1].item(), 1e-3) and r[0] > 3 * max(r[2:].max().item(), 1e-3)


@pytest.mark.slow
def test_planted_feature_equal_to_a_curve_neuron_is_found_with_its_orientation(
        bvlc_model, real_census, reference_stats):
    res, cfg = real_census
    images, mean, std = reference_stats
    neuron = max(res["neurons"]["detected"], key=lambda d: d["peak_sigma"])
    sae = OneHotSAE(480, [neuron["unit"]], n_noise=8)
    out = CS.run_census(bvlc_model, "mixed3b", CurvesConfig(n_null_seeds=0),
              CS.CensusInputs(unit_mean=mean, unit_std=std, images=images, null_seeds=0),
              CS.FeatureInputs(sae, vectors=R.layer_vectors(bvlc_model, "mixed3b", images[:8])),
              verbose=False)
    feats = {d["unit"]: d for d in out["features"]["detected"]}
    assert 0 in feats
    assert feats[0]["preferred_orientation"] == neuron["preferred_orientation"]
    assert feats[0]["preferred_radius"] == neuron["preferred_radius"]


@pytest.mark.slow
def test_null_calibrated_census_on_real_mixed3b_has_fdr_below_10_percent(
        bvlc_model, reference_stats, tmp_path):
    images, mean, std = reference_stats
    cfg = CurvesConfig()  # the defaults: 3 permuted-input and 3 re-initialised networks
    res = CS.run_census(bvlc_model, "mixed3b", cfg,
              CS.CensusInputs(unit_mean=mean, unit_std=std, images=images),
              out_dir=tmp_path,
              verbose=False)
    fdr = res["neurons"]["fdr"]
    print(json.dumps({k: v for k, v in fdr.items()}, indent=1))
    assert fdr["real"] >= 10
    assert fdr["fdr"] <= cfg.max_fdr
    for kind, v in fdr["nulls"].items():
        assert all(fdr["real"] > c for c in v["counts"]), (kind, v)
    assert (tmp_path / "curves_evidence_neurons.png").is_file()
    assert math.isfinite(res["coverage"]["largest_gap_neurons_deg"])
