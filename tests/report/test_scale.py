"""report.scale: the data-scale curve's rows from synthetic scale folders (eval files + cache
metadata), smallest data first, with one trend line per arch."""

import json
import subprocess
import sys
from pathlib import Path

from sae_vision.report.scale import write_scale

REPO = Path(__file__).resolve().parents[2]


def _scale(root, name, photos, views, per_image, n_shards, runs):
    """A scale folder: its cache's metadata.json and one evaluated run per (arch, counts)."""
    key = f"mixed3b-{name}"
    n_images = photos * views
    per_shard = n_images * per_image // n_shards
    meta = {"key": key, "n_images": n_images, "n_vectors": n_images * per_image,
            "sampling": "all" if per_image == 784 else "uniform", "n_per_image": per_image,
            "data": {"name": "imagefolder", "views": views, "n_images": photos},
            "shards": [{"name": f"shard-{i:06d}.tar", "n_vectors": per_shard}
                       for i in range(n_shards)]}
    (root / name / "cache" / key).mkdir(parents=True)
    (root / name / "cache" / key / "metadata.json").write_text(json.dumps(meta))
    for arch, new, fills, more in runs:
        ev = root / name / "sae" / f"mixed3b-{arch}-f3840" / "eval"
        ev.mkdir(parents=True)
        (ev / "metrics.json").write_text(json.dumps({
            "arch": arch, "n_features": 3840, "reconstruction": {"l0": 32.0, "fvu": 0.1},
            "training": {"n_vectors_seen": 5_120_000, "epochs": 2.0},
            "cache_dir": f"artifacts/study-scale/{name}/cache/{key}",
            "eval_data": {"key": key}, "holdout_shards": [f"shard-{n_shards - 1:06d}.tar"]}))
        (ev / "curves.json").write_text(json.dumps({
            "neurons": {"n_detected": 14},
            "features": {"n_detected": 20, "n_copies": 20 - new, "n_new": new,
                         "n_fills_gap": fills, "functional": {"fills_gap": list(range(fills))}}}))
        (ev / "polysemantic.json").write_text(json.dumps({"summary": {
            "mean_frac_own_features_more_selective": more,
            "random_dictionary": {"mean_frac_own_features_more_selective": 0.6}}}))


def test_scale_rows_count_vectors_new_gap_fillers_and_selectivity_smallest_data_first(tmp_path):
    _scale(tmp_path, "p900x8-all", 900, 8, 784, 36,
           [("topk", 9, 2, 0.97), ("relu_l1", 4, 1, 0.9)])
    _scale(tmp_path, "p300-u256", 300, 1, 256, 6, [("topk", 3, 0, 0.95), ("relu_l1", 5, 0, 0.8)])
    _scale(tmp_path, "p900-all", 900, 1, 784, 9, [("topk", 5, 1, 0.96)])
    (tmp_path / "p900-all" / "sae" / "unevaluated").mkdir()  # no eval/: no row
    out = write_scale(tmp_path)
    rows = out["rows"]
    assert [(r["scale"], r["arch"]) for r in rows] == [
        ("p300-u256", "relu_l1"), ("p300-u256", "topk"), ("p900-all", "topk"),
        ("p900x8-all", "relu_l1"), ("p900x8-all", "topk")]
    big = rows[-1]
    assert (big["n_photos"], big["views"], big["n_images"], big["positions"]) == (900, 8, 7200,
                                                                                  "all")
    assert big["n_vectors"] == 7200 * 784 == 5_644_800
    assert big["n_train_vectors"] == 7200 * 784 * 35 // 36  # the held-out shard left out
    assert (big["new"], big["fills_gap"], big["frac_more_selective"]) == (9, 2, 0.97)
    assert (big["n_neuron_detectors"], big["frac_more_selective_random"]) == (14, 0.6)
    assert rows[0]["positions"] == 256 and rows[0]["n_vectors"] == 76_800
    t = out["trends"]
    assert t["topk"]["scales"] == ["p300-u256", "p900-all", "p900x8-all"]
    assert (t["topk"]["new"], t["topk"]["fills_gap"]) == ([3, 5, 9], [0, 1, 2])
    assert "new 3 → 5 → 9 (up)" in t["topk"]["line"]
    assert "more selective 80.0% → 90.0% (up)" in t["relu_l1"]["line"]
    assert "new 5 → 4 (down)" in t["relu_l1"]["line"]
    md = (tmp_path / "scale.md").read_text()
    assert "| p900x8-all | topk | 3840 | 900 | 8 | all | 5,644,800 | 5,488,000 | 2.0 |" in md
    assert "- topk: p300-u256 (" in md
    assert json.loads((tmp_path / "scale.json").read_text())["rows"] == rows


def test_scale_report_without_evaluated_runs_is_one_error_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sae_vision.report.scale", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: no evaluated")
