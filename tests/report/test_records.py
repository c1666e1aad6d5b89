"""The runs a report covers: ids, and reading curves.json / polysemantic.json tolerantly."""

from pathlib import Path

import pytest

from sae_vision.core.config import Config
from sae_vision.report import records
from sae_vision.report.records import RunRecord


def record(run_dir: Path, curves: dict | None = None, poly: dict | None = None) -> RunRecord:
    """A RunRecord carrying only what the readers look at (no checkpoint)."""
    return RunRecord(run_dir=run_dir, name=run_dir.name, slug=records.slugify(run_dir.name),
                     sae=None, meta={}, info=None, metrics=None, curves=curves, poly=poly)


def test_slugify_keeps_file_name_safe_characters_only():
    assert records.slugify("mixed3a-topk-f512-k8") == "mixed3a-topk-f512-k8"
    assert records.slugify("a/b c:d.e") == "a_b_c_d.e"
    assert records.slugify("//") == "run"


def test_dig_walks_nested_dicts_and_tolerates_missing_levels():
    d = {"a": {"b": {"c": 3}}, "x": [1]}
    assert records.dig(d, "a", "b", "c") == 3
    assert records.dig(d, "a", "z", default="none") == "none"
    assert records.dig(d, "x", "y") is None  # a list is not walked into
    assert records.dig(None, "a", default={}) == {}


def test_census_groups_and_their_fdr():
    curves = {"neurons": {"n_detected": 2, "fdr": {"fdr": 0.05}}, "features": {"fdr": 0.1},
              "layer": "mixed3a"}
    groups = records.census_groups(curves)
    assert set(groups) == {"neurons", "features"}
    assert records.group_fdr(groups["neurons"]) == 0.05
    assert records.group_fdr(groups["features"]) == 0.1  # an older census: the number itself
    assert records.group_fdr({}) is None
    assert records.census_groups(None) == {}
    assert records.census_groups({"neurons": [1, 2]}) == {}


def test_curve_units_reads_detected_units_and_their_tuning():
    curves = {"features": {"detected": [
        {"unit": 5, "preferred_orientation": 150.0, "curve_line_ratio": 8.0, "peak_sigma": 7.5,
         "tuning_width_deg": 35.0, "tuning_sigma": [1.0, 2.0]},
        {"unit": 6.0, "tuning": [3.0]},  # older census: tuning, not tuning_sigma
        {"unit": "bad"}]}}
    units = records.curve_units(curves, "features")
    assert units == {5: {"o": 150.0, "cv": 8.0, "cd": True, "ps": 7.5, "w": 35.0, "tc": [1.0, 2.0]},
                     6: {"o": None, "cv": None, "cd": True, "ps": None, "w": None, "tc": [3.0]}}
    assert records.curve_units(curves, "neurons") == {}
    assert records.curve_units(None, "features") == {}


def test_tuning_angles_prefer_the_tuning_grid():
    assert records.tuning_angles({"tuning_orientations": [0, 30], "orientations": [0]}) == [0, 30]
    assert records.tuning_angles({"orientations": [0, 45]}) == [0, 45]
    assert records.tuning_angles(None) is None


def test_poly_rows_are_the_most_polysemantic_neurons():
    rows = [{"neuron": 3}, {"neuron": 1}]
    assert records.poly_rows({"most_polysemantic": rows}) == rows
    assert records.poly_rows({}) == [] and records.poly_rows(None) == []


def test_curve_files_finds_moved_figures_beside_curves_json(tmp_path):
    ev = tmp_path / "run" / "eval"
    ev.mkdir(parents=True)
    (ev / "curves_coverage.png").write_bytes(b"png")
    here = tmp_path / "tuning.png"
    here.write_bytes(b"png")
    curves = {"files": {"coverage": "/gone/elsewhere/curves_coverage.png", "tuning": str(here),
                        "json": str(ev / "curves.json"), "missing": "/gone/x.png", "n": 3}}
    files = records.curve_files(record(tmp_path / "run", curves))
    assert files == {"coverage": ev / "curves_coverage.png", "tuning": here}
    assert records.curve_files(record(tmp_path / "run")) == {}


def test_load_runs_skips_unreadable_runs_and_fails_when_none_is_left(tmp_path, capsys):
    broken = tmp_path / "sae" / "broken"
    broken.mkdir(parents=True)
    with pytest.raises(ValueError, match="none of the 1 run"):
        records.load_runs([broken], Config())
    assert f"warning: skipping run {broken}" in capsys.readouterr().err
