"""report.controls: the planted controls' sensitivity from the runs' curves.json files."""

import json

from sae_vision.report.controls import write_controls


def _run(root, plant, run, arch, lost, found, corr):
    d = root / plant / "sae" / run / "eval"
    d.mkdir(parents=True)
    ctl = {"kind": "hidden", "detector": 324, "partners": [41], "orientation_deg": 230.0,
           "neuron_census_lost": lost, "gap_at_detector_deg": 90.0 if lost else 0.0,
           "found": found,
           "best_feature": {"feature": 7, "orientation_diff_deg": 0.0, "corr_battery": corr,
                            "weight_class": "new"} if corr is not None else None,
           "best_any_feature": {"feature": 7, "corr_battery": corr or 0.1}}
    (d / "curves.json").write_text(json.dumps({"control": ctl}))
    (d / "metrics.json").write_text(json.dumps({"arch": arch}))


def test_sensitivity_counts_found_plants_among_those_the_neuron_census_lost(tmp_path):
    _run(tmp_path, "324-41", "a", "topk", True, True, 0.97)
    _run(tmp_path, "66-114", "b", "topk", True, False, 0.5)
    _run(tmp_path, "408-85", "c", "topk", False, True, 0.99)  # not lost: no power to show
    _run(tmp_path, "324-41", "d", "relu_l1", True, True, 0.96)
    (tmp_path / "rot" / "sae" / "e" / "eval").mkdir(parents=True)
    (tmp_path / "rot" / "sae" / "e" / "eval" / "curves.json").write_text(
        json.dumps({"control": {"kind": "rotate"}}))
    out = write_controls(tmp_path)
    assert len(out["rows"]) == 4
    s = out["sensitivity"]
    assert (s["topk"]["n_plants"], s["topk"]["n_lost"], s["topk"]["n_found"]) == (3, 2, 1)
    assert (s["relu_l1"]["n_lost"], s["relu_l1"]["n_found"]) == (1, 1)
    assert "1 of 2 plants" in s["topk"]["line"]
    md = (tmp_path / "controls.md").read_text()
    assert "324-41" in md and "finds a hidden two-channel detector in 1 of 1" in md
    assert json.loads((tmp_path / "controls.json").read_text())["sensitivity"] == s
