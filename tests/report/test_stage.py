"""Stage report: a static report folder built from constructed run folders (real caches, real SAE
checkpoints, real evaluation JSON), its manifest, and the error when nothing was trained."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sae_vision.activations import shards
from sae_vision.activations.models import lucid_geometry
from sae_vision.core.config import Config, SAEConfig, to_plain
from sae_vision.core.tracker import Tracker
from sae_vision.report import records
from sae_vision.report import stage as report
from sae_vision.sae.architectures import make_sae
from sae_vision.sae.checkpoint import save_sae

LAYER, D_IN = "mixed3a", 256
N_IMAGES, PER_IMAGE = 12, 16


def synthetic_photos(folder: Path, n: int, seed: int = 0) -> None:
    """n 256x256 PNGs of random coloured shapes; FolderImages centre-crops them to 224."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (256, 256), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.integers(0, 230, 2)
            w, h = rng.integers(10, 90, 2)
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            if rng.random() < 0.5:
                draw.ellipse([x0, y0, x0 + w, y0 + h], outline=colour, width=int(rng.integers(2, 6)))
            else:
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        img.save(folder / f"img{i:03d}.png")


def study_config(root: Path) -> Config:
    """Config of a constructed study: imagefolder data, CPU, no W&B."""
    cfg = Config()
    cfg.stage.name = "report"
    cfg.paths.root = str(root / "artifacts")
    cfg.model.device = "cpu"
    cfg.layer.name, cfg.layer.dim = LAYER, D_IN
    cfg.data.name, cfg.data.root, cfg.data.n_images = "imagefolder", str(root / "photos"), N_IMAGES
    cfg.logger.mode = "disabled"
    cfg.experiment = "constructed"
    cfg.report.n_examples, cfg.report.n_random_examples, cfg.report.max_cards = 4, 2, 40
    return cfg


def _figure(path: Path, colour=(40, 90, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (320, 200), "white")
    ImageDraw.Draw(img).ellipse([60, 20, 260, 180], outline=colour, width=6)
    img.save(path)
    return path


ANGLES = list(range(0, 360, 30))


def detected(unit: int, ori: float, ratio: float) -> dict:
    """A detected curve unit as curves.json records it (with its σ tuning curve)."""
    return {"unit": unit, "preferred_orientation": ori, "curve_line_ratio": ratio,
            "peak_sigma": 7.5, "tuning_width_deg": 35.0, "tuning_sigma": [
                float(6 * np.exp(np.cos(np.deg2rad(a - ori)) * 2 - 2)) for a in ANGLES]}


def build_study(root: Path) -> Config:
    """Photos, a two-shard cache of their (synthetic) mixed3a vectors, and two evaluated runs.

    The runs carry metrics.json, density_hist.png, curves.json (with a coverage figure) and
    polysemantic.json in the shapes that stage=evaluate writes.
    """
    cfg = study_config(root)
    synthetic_photos(root / "photos", N_IMAGES)
    geom = lucid_geometry(LAYER)
    gen = torch.Generator().manual_seed(0)
    chunks = []
    for lo in range(0, N_IMAGES, 4):
        idx = torch.arange(lo, lo + 4).repeat_interleave(PER_IMAGE)
        yx = torch.randint(0, geom.size, (len(idx), 2), generator=gen)
        pos = torch.cat([idx[:, None], yx], 1).numpy().astype(np.int32)
        acts = torch.relu(torch.randn(len(idx), D_IN, generator=gen) * 2 - 1)
        files = sorted((root / "photos").glob("*.png"))
        src = {int(i): files[int(i)].name for i in range(lo, lo + 4)}
        chunks.append((acts, pos, src))
    cache_dir = Path(cfg.paths.root) / "cache" / f"{LAYER}-constructed"
    meta = shards.write_cache(cache_dir, chunks, {
        "key": f"{LAYER}-constructed", "layer": LAYER, "dim": D_IN, "dtype": "float32",
        "model": "googlenet_bvlc", "image_size": 224, "data": to_plain(cfg.data)},
        chunks_per_shard=2)
    train, hold = shards.split_shards(meta, 0.34)
    for i, (k, fvu, kl) in enumerate([(8, 0.4, 0.3), (32, 0.15, 0.1)]):
        torch.manual_seed(i)
        sae = make_sae(SAEConfig(arch="topk", n_features=2 * D_IN, k=k), D_IN)
        name = f"{LAYER}-topk-f{2 * D_IN}-k{k}"
        run_dir = Path(cfg.paths.root) / "sae" / name
        save_sae(sae, run_dir, {"run_name": name, "layer": LAYER, "cache_dir": str(cache_dir),
                                "train_shards": train, "holdout_shards": hold,
                                "config": to_plain(cfg), "finished": True})
        ev = run_dir / "eval"
        ev.mkdir()
        (ev / "metrics.json").write_text(json.dumps({
            "run": name, "layer": LAYER, "arch": "topk", "n_features": 2 * D_IN,
            "hparams": {"k": k, "expansion": 2, "seed": 0},
            "reconstruction": {"l0": float(k), "fvu": fvu, "mse": fvu, "cosine": 0.9},
            "features": {"dead_frac": 0.05 * i, "dense_frac": 0.0},
            "splice": {"kl_sae": kl, "kl_zero": 2.0, "kl_mean": 1.0, "agreement_sae": 0.8,
                       "frac_recovered_zero": 1 - kl / 2}}))
        _figure(ev / "density_hist.png", (200, 60, 60))
        files = {"coverage": str(_figure(ev / "curves_coverage.png")),
                 "tuning_neurons": str(_figure(ev / "curves_tuning_neurons.png", (200, 120, 0))),
                 "json": str(ev / "curves.json")}
        # The shape sae_vision.curves.run_census writes.
        (ev / "curves.json").write_text(json.dumps({
            "layer": LAYER, "tuning_orientations": ANGLES,
            "criterion": {"used": {"min_peak_sigma": 5.0, "min_curve_line_ratio": 1.5},
                          "tightened": False, "fdr_target_met": True, "max_fdr": 0.1},
            "neurons": {"n_units": D_IN, "n_detected": 2, "detected": [
                detected(3, 90.0, 6.5), detected(7, 210.0, 5.1)],
                "fdr": {"real": 2, "fdr": 0.05, "nulls": {}}},
            "features": {"n_units": 2 * D_IN, "n_detected": 1, "n_copies": 0, "n_new": 1,
                         "detected": [detected(5, 150.0, 8.0)],
                         "fdr": {"real": 1, "fdr": 0.08, "nulls": {}},
                         "new_features": [{"feature": 5, "preferred_orientation": 150.0,
                                           "preferred_radius": 16.0, "tuning_sigma": [0.0] * 72,
                                           "neurons": [{"neuron": 3, "share": 0.45,
                                                        "is_detector": True,
                                                        "orientation": 90.0}]}]},
            "coverage": {"largest_gap_neurons_deg": 120.0, "largest_gap_combined_deg": 60.0,
                         "n_features_in_neuron_gaps": 1},
            "band": {"n_points": 7, "real_range": {"min": 2, "max": 9},
                     "largest_gap_neurons_deg_range": {"min": 60.0, "max": 120.0},
                     "n_new_range": {"min": 1, "max": 3},
                     "n_new_in_neuron_gaps_range": {"min": 0, "max": 1}},
            "files": files}))
        # The shape sae_vision.polysemantic.polysemantic_report writes.
        row = {"neuron": 3, "n_effective_features": 2.4, "kurtosis": 3.1, "r2": 0.9,
               "features": [{"feature": 5, "share": 0.6, "kurtosis": 9.5},
                            {"feature": 9, "share": 0.3, "kurtosis": 7.25}]}
        (ev / "polysemantic.json").write_text(json.dumps({
            "summary": {"mean_frac_own_features_more_selective": 0.8,
                        "random_dictionary": {"mean_frac_own_features_more_selective": 0.3},
                        "kurtosis": {"neurons": {"p50": 2.0}, "features": {"p50": 5.0}}},
            "most_polysemantic": [row], "neurons": [row]}))
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A constructed study and its report (built once for the module)."""
    root = tmp_path_factory.mktemp("report")
    cfg = build_study(root)
    tracker = RecordingTracker()
    res = report.run(cfg, tracker)
    return cfg, res, tracker


class RecordingTracker(Tracker):
    """Our Tracker interface, recording what the stage logs (W&B itself is not involved)."""

    def __init__(self):
        super().__init__(None)
        self.images, self.tables = [], []

    def log_image(self, key, png_path, step=None):
        self.images.append((key, str(png_path)))

    def log_table(self, key, rows, step=None):
        self.tables.append((key, rows))


def load_browser(report_dir: Path, name: str) -> dict:
    """The object a browser data script assigns (it is JSON after the assignment)."""
    text = (report_dir / "data" / f"browser-{name}.js").read_text()
    return json.loads(text.split("]=", 1)[1].rstrip().rstrip(";"))


def test_report_has_summary_table_figures_census_and_cards(built):
    cfg, res, _ = built
    out = Path(res.report_dir)
    page = Path(res.index_path).read_text()
    table = re.search(r"<table class=data id=summary-table>.*?</table>", page, re.S).group(0)
    for k in (8, 32):
        assert f"{LAYER}-topk-f512-k{k}" in table
    for col in ("layer", "arch", "features", "L1 / k", "L0", "FVU", "dead", "splice KL"):
        assert f">{col}<" in table
    assert "k 8" in table and "0.15" in table
    for fig in re.findall(r"<img class='(?:frontier|coverage)-figure' src='([^']+)'", page):
        assert (out / fig).is_file()
    assert page.count("frontier-figure") == 2 and "coverage-figure" in page
    assert "FDR≈0.05" in page and "FDR≈0.08" in page  # the estimated FDR beside each count
    assert "neuron 3" in page and "f5 · share 0.6" in page  # the polysemantic decomposition
    assert "more selective than it in 80.0%" in page and "a random dictionary: 30.0%" in page
    assert "kurtosis 9.5" in page and "tuning-figure" in page
    # Copies and new detectors are reported apart; the new one beside its neurons.
    assert "of them new (not a copy)" in page and "n3 (0.45, detector at 90°)" in page
    assert "largest neuron gap 60–120°" in page
    assert "fetch(" not in (out / "assets" / "report.js").read_text()  # works from file://
    idx = json.loads((out / "data" / "report.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    ids = [b["id"] for b in idx["browsers"]]
    assert ids == [f"neurons-{LAYER}", records.slugify(f"{LAYER}-topk-f512-k8"),
                   records.slugify(f"{LAYER}-topk-f512-k32")]


def test_feature_cards_carry_examples_density_curves_and_existing_crops(built):
    _, res, _ = built
    out = Path(res.report_dir)
    b = load_browser(out, records.slugify(f"{LAYER}-topk-f512-k8"))
    assert len(b["units"]) == 512 and b["kind"] == "sae"
    with_examples = [u for u in b["units"] if u.get("top")]
    assert 0 < len(with_examples) <= 40
    for u in with_examples:
        acts = [a for _, a in u["top"]]
        assert acts == sorted(acts, reverse=True) and acts[0] > 0
        for ci, _ in u["top"] + u["rnd"]:
            assert (out / b["crop_dir"] / b["crops"][ci][0]).is_file()
    f5 = b["units"][5]
    assert f5["cd"] == 1 and f5["o"] == 150.0 and len(f5["tc"]) == len(b["angles"])
    assert f5.get("top"), "curve detectors get examples first"
    assert abs(sum(u["d"] for u in b["units"]) / 512 - 8 / 512) < 1e-6  # top-k: L0 = k
    neurons = load_browser(out, f"neurons-{LAYER}")
    assert len(neurons["units"]) == D_IN and neurons["units"][3]["cd"] == 1


def test_report_logs_tables_and_figures_to_the_tracker(built):
    _, _, tracker = built
    keys = [k for k, _ in tracker.tables]
    assert "report/summary" in keys and "report/curve_census" in keys
    logged = [Path(p).name for _, p in tracker.images]
    assert "frontier_l0_fvu.png" in logged and any("coverage" in n for n in logged)
    assert all(Path(p).is_file() for _, p in tracker.images)


def test_manifest_records_experiment_caches_runs_and_report(built):
    cfg, res, _ = built
    m = json.loads(Path(res.manifest_path).read_text())
    assert Path(res.manifest_path) == Path(cfg.paths.root) / "reproduce.json"
    assert m["experiment"] == "constructed"
    assert [c["layer"] for c in m["caches"]] == [LAYER]
    assert len(m["runs"]) == 2 and all(r["evaluated"] for r in m["runs"])
    assert all("curves.json" in r["eval_files"] for r in m["runs"])
    assert m["report"]["index"] == res.index_path


@pytest.mark.parametrize("selector", [None, "glob(*)"])
def test_report_without_runs_says_to_train_first(tmp_path, selector):
    cfg = study_config(tmp_path)
    cfg.sae.run = selector
    with pytest.raises(FileNotFoundError, match="stage=train"):
        report.run(cfg)
    assert not (tmp_path / "artifacts" / "report").exists()


@pytest.mark.slow
def test_report_of_a_real_tiny_study_with_census_and_feature_vis(tmp_path, bvlc_model):
    """Real stages end to end: cache, train, evaluate (curves, polysemantic), report."""
    from sae_vision.activations import cache
    from sae_vision.evaluate import stage as evaluate
    from sae_vision.sae import train

    cfg = Config()
    cfg.paths.root = str(tmp_path / "artifacts")
    cfg.model.device = cfg.train.device = "cpu"
    cfg.logger.mode = "disabled"
    cfg.data.n_images = 24
    cfg.cache.images_per_shard, cfg.cache.batch_size, cfg.cache.n_per_image = 8, 8, 16
    cfg.sae.expansion, cfg.sae.k = 2, 8
    cfg.train.n_steps, cfg.train.batch_size, cfg.train.warmup_steps = 40, 128, 5
    cfg.train.holdout_frac = 0.34
    cfg.eval.n_vectors, cfg.eval.n_splice_images = 2000, 4
    cfg.eval.curves = cfg.eval.polysemantic = True
    cfg.curves.orientation_step = cfg.curves.invariance_step = 30.0
    cfg.curves.radii, cfg.curves.invariance_radii, cfg.curves.n_null_seeds = [8.0, 1000.0], [8.0], 1
    cfg.report.n_examples, cfg.report.n_random_examples, cfg.report.max_cards = 4, 2, 64
    cfg.report.featurevis, cfg.report.featurevis_steps, cfg.report.featurevis_max = True, 4, 2
    for stage in (cache, train, evaluate):
        cfg.stage.name = stage.__name__.rsplit(".", 1)[1]
        stage.run(cfg)
    cfg.stage.name = "report"
    res = report.run(cfg)
    out = Path(res.report_dir)
    page = Path(res.index_path).read_text()
    assert "coverage-figure" in page and "frontier-figure" in page and "FDR≈" in page
    run_id = records.slugify(res.runs[0])
    b = load_browser(out, run_id)
    assert len(b["units"]) == 2 * 480
    shown = [u for u in b["units"] if u.get("top")]
    assert shown and all((out / b["crop_dir"] / b["crops"][ci][0]).is_file()
                         for u in shown for ci, _ in u["top"])
    assert sum(1 for u in b["units"] if u.get("fv")) == 2
    assert len(list((out / "featurevis" / run_id).glob("u*.png"))) == 2
    neurons = load_browser(out, "neurons-mixed3b")
    census = json.loads((Path(cfg.paths.root) / "sae" / res.runs[0] / "eval" /
                         "curves.json").read_text())
    for d in census["neurons"]["detected"]:
        assert neurons["units"][d["unit"]]["cd"] == 1


def test_report_without_the_source_images_still_renders_cards(tmp_path, caplog):
    cfg = build_study(tmp_path)
    for p in (tmp_path / "photos").iterdir():
        p.unlink()
    (tmp_path / "photos").rmdir()
    caplog.set_level("INFO", logger="sae_vision")
    res = report.run(cfg)
    assert "no dataset examples for mixed3a" in caplog.text
    b = load_browser(Path(res.report_dir), records.slugify(f"{LAYER}-topk-f512-k8"))
    assert len(b["units"]) == 512 and not any(u.get("top") for u in b["units"])


def test_runs_whose_cache_cannot_be_read_are_skipped_listed_on_the_page_and_the_rest_built(
        tmp_path, capsys):
    import shutil

    cfg = build_study(tmp_path)
    sae_root, cache = Path(cfg.paths.root) / "sae", Path(cfg.paths.root) / "cache"
    good = f"{LAYER}-topk-f512-k8"
    damaged = {"flipped": "mixed3a-flipped", "listless": "mixed3a-listless"}
    for name, cache_name in damaged.items():
        shutil.copytree(cache / f"{LAYER}-constructed", cache / cache_name)
        shutil.copytree(sae_root / good, sae_root / name)
        config = json.loads((sae_root / name / "config.json").read_text())
        config["meta"]["cache_dir"] = str(cache / cache_name)
        (sae_root / name / "config.json").write_text(json.dumps(config))
    tar = cache / "mixed3a-flipped" / "shard-000000.tar"
    blob = bytearray(tar.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # caught by the shard's sha256 when the browser reads it
    tar.write_bytes(bytes(blob))
    (cache / "mixed3a-listless" / "metadata.json").write_text("[]")
    res = report.run(cfg)
    assert sorted(res.runs) == sorted([good, f"{LAYER}-topk-f512-k32"])
    err = capsys.readouterr().err
    page = Path(res.index_path).read_text()
    assert "Skipped 2 run(s) that could not be read" in page
    for name in damaged:
        assert f"warning: skipping run {sae_root / name}" in err
        assert str(sae_root / name) in page
    assert "shard-000000.tar is corrupt" in page and "not a cache&#x27;s metadata" in page


# --------------------------------------------------------------------------------------------
# Nothing is lost: the new report is built beside the old one and swapped in only when complete


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _beside(out: Path) -> list[str]:
    """Anything a report run left beside the report folder (staging, old copy, lock)."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") or p.name == f"{out.name}.lock")


def test_a_rerun_replaces_the_whole_report_and_leaves_nothing_beside_it(tmp_path):
    cfg = build_study(tmp_path)
    out = Path(report.run(cfg).report_dir)
    crops = _hashes(out / "crops")
    assert crops
    (out / "stale.html").write_text("a page of an older report")
    res = report.run(cfg)
    assert Path(res.report_dir) == out and Path(res.index_path).is_file()
    assert not (out / "stale.html").exists()  # the folder is replaced, not patched
    assert _hashes(out / "crops") == crops  # content-keyed crops carried over, not redrawn
    assert all(Path(f).is_file() for f in res.files)
    assert _beside(out) == []


def test_a_failure_mid_report_leaves_the_previous_report_as_it_was(tmp_path, monkeypatch):
    import shutil

    cfg = build_study(tmp_path)
    out = Path(report.run(cfg).report_dir)
    before = _hashes(out)
    # The next report would differ (one run fewer) and fails after writing its data scripts.
    shutil.rmtree(Path(cfg.paths.root) / "sae" / f"{LAYER}-topk-f512-k32")

    def broken_page(*args, **kwargs):
        raise RuntimeError("the page writer broke")

    monkeypatch.setattr(report, "html_page", broken_page)
    with pytest.raises(RuntimeError, match="the page writer broke"):
        report.run(cfg)
    assert _hashes(out) == before
    assert _beside(out) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs (needs root, as in CI), unmounted afterwards."""
    import os
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
            capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_mid_report_is_one_error_line_and_keeps_the_previous_report(small_disk,
                                                                                tmp_path):
    import os
    import subprocess
    import sys

    cfg = build_study(small_disk)
    out = Path(report.run(cfg).report_dir)
    before = _hashes(out)
    size = sum((out / f).stat().st_size for f in before)
    # Fill the disk so that a little of the new report fits, but not all of it.
    st = os.statvfs(small_disk)
    free = st.f_bavail * st.f_frsize
    room = 64 * 1024
    assert size > 2 * room, size
    with open(small_disk / "filler", "wb") as f:
        for _ in range((free - room) // (1 << 20)):
            f.write(b"\0" * (1 << 20))
        f.write(b"\0" * ((free - room) % (1 << 20)))
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    res = subprocess.run(
        [sys.executable, "run.py", "stage=report", f"paths.root={cfg.paths.root}",
         f"hydra.run.dir={tmp_path / 'hydra'}", "logger=disabled", "model.device=cpu",
         f"layer={LAYER}", "data=imagefolder", f"data.root={small_disk / 'photos'}",
         f"data.n_images={N_IMAGES}", "report.n_examples=4", "report.n_random_examples=2",
         "report.max_cards=40"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
        env=env)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "no space left while writing the report" in lines[0]
    assert "previous report is kept" in lines[0] and "free space" in lines[0]
    assert _hashes(out) == before
    assert _beside(out) == []


def test_a_report_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    # Killed between swap_in's renames: no report folder, the old one aside, the new one staged.
    out = tmp_path / "report"
    old, partial = tmp_path / ".report.old-1", tmp_path / ".report.partial-x"
    for folder, text in ((old, "previous"), (partial, "half")):
        folder.mkdir()
        (folder / "index.html").write_text(text)
    report.recover(out)
    assert (out / "index.html").read_text() == "previous"
    assert _beside(out) == []
