"""report.controls: the planted controls' sensitivity from the runs' curves.json files."""

import json

from sae_vision.report.controls import write_controls


def _run(root, plant, run, arch, lost, found, corr, oracle=None, k=32):
    d = root / plant / "sae" / run / "eval"
    d.mkdir(parents=True)
    ctl = {"kind": "hidden", "detector": 324, "partners": [41], "orientation_deg": 230.0,
           "neuron_census_lost": lost, "gap_at_detector_deg": 90.0 if lost else 0.0,
           "found": found,
           "best_feature": {"feature": 7, "orientation_diff_deg": 0.0, "corr_battery": corr,
                            "weight_class": "new"} if corr is not None else None,
           "best_any_feature": {"feature": 7, "corr_battery": corr or 0.1}}
    if oracle is not None:
        ctl["oracle"] = oracle
    (d / "curves.json").write_text(json.dumps({"control": ctl}))
    (d / "metrics.json").write_text(json.dumps({"arch": arch, "hparams": {"k": k},
                                                "reconstruction": {"l0": k + 0.5}}))


def test_sensitivity_counts_found_plants_among_those_the_neuron_census_lost(tmp_path):
    yes = {"class": "new", "fills_gap": True, "rho_max": 0.56,
           "neighbour_separation_deg": [25.0, 20.0]}
    _run(tmp_path, "324-41", "a", "topk", True, True, 0.97, yes)
    _run(tmp_path, "66-114", "b", "topk", True, False, 0.5, {**yes, "class": "copy"})
    _run(tmp_path, "408-85", "c", "topk", False, True, 0.99)  # not lost: no power to show
    _run(tmp_path, "324-41", "d", "relu_l1", True, True, 0.96)
    _run(tmp_path, "324-41", "f", "relu_l1", True, False, 0.3, k=8)  # another L0: its own row
    (tmp_path / "rot" / "sae" / "e" / "eval").mkdir(parents=True)
    feats = [{"feature": i, "neuron": i, "corr_battery": c, "class": "new",
              "weight_class": "new"} for i, c in enumerate((0.99, 0.95, 0.5))]
    (tmp_path / "rot" / "sae" / "e" / "eval" / "curves.json").write_text(json.dumps(
        {"control": {"kind": "rotate", "features": feats, "n_functional_copies": 2,
                     "n_weight_copies": 0, "n_census_copies": 0}}))
    (tmp_path / "rot" / "sae" / "e" / "eval" / "metrics.json").write_text(
        json.dumps({"arch": "topk", "hparams": {"k": 32}}))
    out = write_controls(tmp_path)
    assert len(out["rows"]) == 5
    s = out["sensitivity"]
    assert set(s) == {"topk k=32", "relu_l1 k=32", "relu_l1 k=8"}
    t, r = s["topk k=32"], s["relu_l1 k=32"]
    assert (t["n_plants"], t["n_lost"], t["n_found"]) == (3, 2, 1)
    assert (r["n_lost"], r["n_found"]) == (1, 1)
    assert (s["relu_l1 k=8"]["n_lost"], s["relu_l1 k=8"]["n_found"]) == (1, 0)
    assert t["line"].startswith("at L0 32.5, finds a hidden detector in 1 of 2 plants")
    assert (t["n_oracle"], r["n_oracle"]) == (1, 0)  # 66-114's is a copy
    md = (tmp_path / "controls.md").read_text()
    assert "324-41" in md and "finds a hidden detector in 1 of 1" in md
    assert ("| 324-41 | topk | 32 | 32.5 | 324 | 2 | 230.0 | True | [25.0, 20.0] | 0.56 | new "
            "| True |") in md
    assert md.index("- relu_l1 k=8:") < md.index("- relu_l1 k=32:") < md.index("- topk k=32:")
    assert json.loads((tmp_path / "controls.json").read_text())["sensitivity"] == s
    (rot,) = out["rotated"]
    assert (rot["arch"], rot["n_features"], rot["n_weight_copies"],
            rot["n_functional_copies"]) == ("topk", 3, 0, 2)
    assert ("- topk k=32: rotated basis: of 3 detected features the weight rule calls 0 copies; "
            "by function 2 are copies of an original neuron") in md
