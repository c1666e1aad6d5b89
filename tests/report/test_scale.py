"""report.scale: the data-scale curve's rows from synthetic scale folders (eval files + cache
metadata), smallest data first, with one trend line per arch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_a_tiny_views_scale_runs_cache_train_evaluate_and_the_scale_report(tmp_path):
    """The study-scale recipe of the views scale on 4 photos x 2 views through run.py (~45 s):
    a streamed training, the census and decomposition on spread held-out vectors, scale.md."""
    from sae_vision.activations.images import SHARED_SAMPLE

    if not SHARED_SAMPLE.is_dir():
        pytest.skip(f"needs the ImageNet sample at {SHARED_SAMPLE}")
    common = ["debug=tiny", "logger=disabled", "model.device=cpu", "experiment=imagenet_sample",
              f"paths.root={tmp_path / 'p4x2'}", "data.n_images=4", "data.views=2",
              "data.min_scale=0.25", "cache.sampling=all", "cache.images_per_shard=2",
              "cache.batch_size=4"]
    steps = [["stage=cache"],
             ["-m", "stage=train", "sae.arch=topk,relu_l1", "sae.expansion=2", "sae.k=8",
              "sae.l0_control=true", "train.loader=stream", "train.shuffle_buffer=4096", "hydra.sweeper.params={}"],
             ["stage=evaluate", "curves.n_null_seeds=0", "eval.splice=false",
              "eval.polysemantic=true", "eval.held_out_sample=spread", "eval.n_vectors=1000000",
              "eval.polysemantic_vectors=500"]]
    for extra in steps:
        out = subprocess.run([sys.executable, "run.py", *extra[:1], *common, *extra[1:]],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    rows = write_scale(tmp_path)["rows"]
    assert sorted(r["arch"] for r in rows) == ["relu_l1", "topk"]
    for r in rows:
        assert (r["n_photos"], r["views"], r["n_images"], r["positions"]) == (4, 2, 8, "all")
        assert (r["n_vectors"], r["n_train_vectors"]) == (8 * 784, 6 * 784)  # 1 photo held out
        assert r["n_neuron_detectors"] is not None and r["frac_more_selective_random"] is not None
    poly = json.loads(next((tmp_path / "p4x2" / "sae").glob("*/eval/polysemantic.json"))
                      .read_text())
    assert poly["n_vectors"] == 500
