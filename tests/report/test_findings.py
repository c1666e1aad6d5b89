"""The study's findings table: rows from evaluated runs, its Markdown, and the two files."""

import json
from pathlib import Path

from sae_vision.report import findings
from sae_vision.report.records import RunRecord


def metrics(name: str, arch: str, n_features: int, **curves) -> dict:
    """metrics.json content in the shape stage=evaluate writes."""
    return {"run": name, "layer": "mixed3a", "arch": arch, "n_features": n_features,
            "hparams": {"k": 8, "expansion": 2, "seed": 0},
            "reconstruction": {"l0": 8.0, "fvu": 0.15, "mse": 0.15, "cosine": 0.9},
            "features": {"dead_frac": 0.0, "dense_frac": 0.0},
            "splice": {"kl_sae": 0.1, "kl_zero": 2.0, "frac_recovered_zero": 0.95},
            "training": {"epochs": 3, "loss_flatness": 0.01, "loss_decay_gain": 0.2},
            "curves": {"n_feature_detectors": 4, "n_copies": 3, "n_new": 1,
                       "largest_gap_neurons_deg": 120.0, "largest_gap_combined_deg": 60.0,
                       "band": {"n_points": 7, "n_new_range": {"min": 1, "max": 3}}, **curves}}


def record(name: str, m: dict | None, poly: dict | None = None) -> RunRecord:
    return RunRecord(run_dir=Path(name), name=name, slug=name, sae=None, meta={}, info=None,
                     metrics=m, curves=None, poly=poly)


POLY = {"neurons": [
    {"features": [{"feature": 1}, {"feature": 2}], "frac_features_more_selective": 0.5},
    {"features": [{"feature": 3}], "frac_features_more_selective": 1.0}]}


def test_rows_cover_evaluated_runs_sorted_by_arch_and_size():
    recs = [record("t2", metrics("t2", "topk", 1024)), record("skip", None),
            record("r", metrics("r", "relu", 512)), record("t1", metrics("t1", "topk", 512), POLY)]
    rows = findings.findings_rows(recs)
    assert [r["run"] for r in rows] == ["r", "t1", "t2"]
    t1 = rows[1]
    assert t1["epochs"] == 3 and t1["copies"] == 3 and t1["new"] == 1
    assert t1["largest_gap_with_new_deg"] == 60.0
    assert t1["band_n_new_range"] == {"min": 1, "max": 3} and t1["band_n_points"] == 7
    assert t1["band_largest_gap_neurons_deg_range"] is None
    # Selectivity split into copies (one own feature) and splits (two or more).
    assert t1["n_neurons_split"] == 1 and t1["frac_more_selective_split"] == 0.5
    assert t1["frac_more_selective_single"] == 1.0
    assert "n_neurons_split" not in rows[0]  # no polysemantic.json
    assert t1["fvu_neuron_topk"] is None  # evaluated without the neuron-basis baseline


def test_rows_carry_the_neuron_basis_beside_the_sae():
    m = metrics("t", "topk", 512)
    m["neuron_baseline"] = {"k": 8, "fvu_zero": 0.37, "fvu_mean": 0.4, "gain": 0.37 / 0.15}
    row = findings.findings_rows([record("t", m)])[0]
    assert row["fvu_neuron_topk"] == 0.37 and abs(row["neuron_gain"] - 2.467) < 1e-3
    md = findings.findings_markdown([row])
    assert "FVU, top-L0 neurons" in md and "| 0.37 | 2.47 |" in md


def test_markdown_has_one_column_per_finding_with_units():
    row = {"arch": "topk", "n_features": 512, "l0": 8.04, "fvu": 0.15234,
           "frac_recovered_zero": 0.95, "largest_gap_neurons_deg": 120.0, "copies": 3}
    md = findings.findings_markdown([row]).splitlines()
    assert md[0] == "| " + " | ".join(label for _, label in findings.FINDINGS_COLUMNS) + " |"
    assert md[1] == "|" + "---|" * len(findings.FINDINGS_COLUMNS)
    cells = md[2].strip("| ").split(" | ")
    assert len(cells) == len(findings.FINDINGS_COLUMNS)
    by_key = dict(zip((k for k, _ in findings.FINDINGS_COLUMNS), cells))
    assert by_key["arch"] == "topk" and by_key["n_features"] == "512"
    assert by_key["l0"] == "8.0" and by_key["fvu"] == "0.152"
    assert by_key["frac_recovered_zero"] == "95.0%"
    assert by_key["largest_gap_neurons_deg"] == "120°"
    assert by_key["copies"] == "3" and by_key["new"] == "–"


CURVES = {"neurons": {"fdr": {"fdr": 0.0476, "fdr_upper95": 0.109}},
          "features": {"n_shifted_copies": 1, "n_fills_gap": 0, "n_weight_copies": 4,
                       "n_weight_new": 0, "new_fdr_random_directions_upper95": None,
                       "functional": {"largest_gap_neurons_plus_all_deg": 40.0,
                                      "largest_gap_neurons_plus_copies_deg": 45.0,
                                      "largest_gap_neurons_plus_gap_fillers_deg": 50.0}}}


def test_functional_and_weight_rules_and_the_fdr_bound_sit_side_by_side():
    rec = record("t1", metrics("t1", "topk", 512, n_new=0, new_fdr=None))
    rec.curves = CURVES
    row = findings.findings_rows([rec])[0]
    assert (row["copies"], row["shifted_copies"], row["weight_copies"]) == (3, 1, 4)
    assert row["largest_gap_with_copies_deg"] == 45.0 and row["fills_gap"] == 0
    by_key = dict(zip((k for k, _ in findings.FINDINGS_COLUMNS),
                      findings.findings_markdown([row]).splitlines()[2].strip("| ").split(" | ")))
    assert by_key["neuron_fdr"] == "0.0476" and by_key["neuron_fdr_upper95"] == "0.109"
    assert by_key["new_fdr"] == "–" and by_key["new_fdr_upper95"] == "–"  # 0/0: no FDR
    assert by_key["largest_gap_with_all_deg"] == "40°" and by_key["weight_new"] == "0"
    # A run evaluated before the functional rule: its cells say "–", not 0.
    old = findings.findings_rows([record("t0", metrics("t0", "topk", 512))])[0]
    assert old["shifted_copies"] is None and old["neuron_fdr_upper95"] is None


def test_write_findings_writes_json_and_markdown_beside_the_report(tmp_path):
    recs = [record("t1", metrics("t1", "topk", 512))]
    paths = findings.write_findings(recs, tmp_path)
    assert paths == [tmp_path / "findings.json", tmp_path / "findings.md"]
    data = json.loads(paths[0].read_text())
    assert data["columns"] == [k for k, _ in findings.FINDINGS_COLUMNS]
    assert [r["run"] for r in data["rows"]] == ["t1"]
    assert paths[1].read_text() == findings.findings_markdown(findings.findings_rows(recs))


def test_no_findings_without_an_evaluated_run(tmp_path):
    assert findings.write_findings([record("t1", None)], tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_the_planted_controls_join_the_rows_of_their_arch_and_k(tmp_path):
    # A real controls root, written by report.controls from run folders, as make study-controls
    # leaves them; the findings read its controls.json.
    from sae_vision.report.controls import write_controls

    for plant, found in (("d1-s0", True), ("d2-s1", False)):
        d = tmp_path / "controls" / plant / "sae" / "run" / "eval"
        d.mkdir(parents=True)
        ctl = {"kind": "hidden", "detector": 1, "partners": [2], "orientation_deg": 0.0,
               "neuron_census_lost": True, "gap_at_detector_deg": 60.0, "found": found,
               "found_new_gap_filling": found, "best_feature": None}
        (d / "curves.json").write_text(json.dumps({"control": ctl}))
        (d / "metrics.json").write_text(json.dumps(
            {"arch": "topk", "hparams": {"k": 8}, "reconstruction": {"l0": 8.0}}))
    write_controls(tmp_path / "controls")
    controls = findings.load_controls(tmp_path / "controls")
    assert findings.load_controls(tmp_path / "nowhere") is None
    recs = [record("t8", metrics("t8", "topk", 512)), record("r", metrics("r", "relu_l1", 512))]
    rows = findings.findings_rows(recs, controls)
    by = {r["run"]: r for r in rows}
    assert by["t8"]["controls"] == "1/2" and by["r"]["controls"] is None  # no relu_l1 k=8 plants
    md = findings.findings_markdown(rows, controls)
    assert "| 1/2 |" in md
    assert "- topk k=8: at L0 8, finds a hidden detector in 1 of 2 plants" in md
    paths = findings.write_findings(recs, tmp_path / "out", controls)
    assert json.loads(paths[0].read_text())["controls"]["topk k=8"]["n_found"] == 1
