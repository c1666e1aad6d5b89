"""Stage evaluate: known reconstructions through the real BVLC network and a real cache,
dimension checks before any work, run selection, held-out images, the sweep summary."""

import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_vision.activations import cache, shards
from sae_vision.core.config import Config, LoggerConfig, SAEConfig, to_plain
from sae_vision.core.tracker import open_tracker
from sae_vision.evaluate import fidelity
from sae_vision.evaluate import stage as evaluate
from sae_vision.sae import runs
from sae_vision.sae.architectures import make_sae
from sae_vision.sae.checkpoint import load_sae, save_sae

LAYER = "mixed3b"


def tiny_cfg(root: Path, **over) -> Config:
    """A few small demo images, three shards (one held out), CPU, no W&B."""
    cfg = Config()
    cfg.stage.name = "evaluate"
    cfg.paths.root = str(root)
    cfg.model.device = "cpu"
    cfg.layer.name, cfg.layer.dim = LAYER, 480
    cfg.data.n_images, cfg.data.image_size = 12, 64
    cfg.cache.images_per_shard, cfg.cache.batch_size, cfg.cache.n_per_image = 4, 4, 16
    cfg.train.holdout_frac = 0.34
    cfg.eval.n_splice_images, cfg.eval.splice_batch_size = 3, 3
    cfg.eval.batch_size = 50  # several batches even on a tiny held-out set
    cfg.logger.mode = "disabled"
    for k, v in over.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg


@pytest.fixture(scope="module")
def env(tmp_path_factory, bvlc_model):
    """A real mixed3b cache of 12 demo images (3 shards); returns (cfg, cache_dir, meta)."""
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_cfg(root)
    res = cache.run(cfg)
    cache_dir = Path(res.cache_dirs[LAYER])
    return cfg, cache_dir, shards.load_cache_meta(cache_dir)


def save_run(cfg: Config, cache_dir: Path, meta: dict, name: str, sae, layer: str = LAYER) -> Path:
    """A run folder as stage=train writes it (weights + config.json with the train meta)."""
    train, hold = shards.split_shards(meta, cfg.train.holdout_frac)
    run_dir = Path(cfg.paths.root) / "sae" / name
    save_sae(sae, run_dir, {
        "run_name": name, "layer": layer, "d_in": sae.d_in, "n_features": sae.n_features,
        "arch": sae.arch, "cache_dir": str(cache_dir), "train_shards": train,
        "holdout_shards": hold, "config": to_plain(cfg), "step": 1, "n_steps": 1,
        "finished": True})
    return run_dir


def relu_sae(d: int, n_features: int, W_enc_DF=None, W_dec_FD=None, b_dec_D=None):
    """A real relu_l1 SAE (input_scale 1) with chosen weights."""
    sae = make_sae(SAEConfig(arch="relu_l1", n_features=n_features), d, input_scale=1.0)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        if W_enc_DF is not None:
            sae.W_enc.copy_(W_enc_DF)
        if W_dec_FD is not None:
            sae.W_dec.copy_(W_dec_FD)
        if b_dec_D is not None:
            sae.b_dec.copy_(b_dec_D)
    return sae


def identity_sae(d: int):
    """Dictionary {+e_i, -e_i}: codes relu(x), relu(-x), so the reconstruction is exact."""
    eye = torch.eye(d)
    return relu_sae(d, 2 * d, torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))


def held_out_vectors(cache_dir: Path, meta: dict, cfg: Config) -> torch.Tensor:
    _, hold = shards.split_shards(meta, cfg.train.holdout_frac)
    return shards.load_vectors(cache_dir, hold)


# --------------------------------------------------------------------------------------------
# Known reconstructions through the whole stage


@pytest.fixture(scope="module")
def known(env):
    """One evaluate.run over four SAEs with known answers (shares the splice baselines)."""
    cfg, cache_dir, meta = env
    held_mean = held_out_vectors(cache_dir, meta, cfg).double().mean(0).float()
    cache_mean = torch.tensor(meta["mean"], dtype=torch.float32)
    d = 480
    save_run(cfg, cache_dir, meta, "known-identity", identity_sae(d))
    save_run(cfg, cache_dir, meta, "known-zero", relu_sae(d, 2 * d))
    save_run(cfg, cache_dir, meta, "known-heldmean", relu_sae(d, 2 * d, b_dec_D=held_mean))
    save_run(cfg, cache_dir, meta, "known-cachemean", relu_sae(d, 2 * d, b_dec_D=cache_mean))
    t0 = time.perf_counter()
    wandb_dir = Path(cfg.paths.root) / "wandb-eval"
    with open_tracker(LoggerConfig(mode="offline"), wandb_dir, to_plain(cfg)) as tracker:
        res = evaluate.run(dataclasses.replace(
            cfg, sae=dataclasses.replace(cfg.sae, run="glob(known-*)")), tracker)
    return res, time.perf_counter() - t0, wandb_dir


def test_identity_like_sae_has_zero_fvu_and_a_lossless_splice(known):
    res, _, _ = known
    m = res.metrics["known-identity"]
    r, s = m["reconstruction"], m["splice"]
    assert r["fvu"] < 1e-10 and r["mse"] < 1e-10
    assert r["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert r["cosine"] == pytest.approx(1.0, abs=1e-6) and r["l2_ratio"] == pytest.approx(1.0)
    assert s["kl_sae"] < 1e-8 and s["agreement_sae"] == 1.0 and s["fvu_all_positions"] < 1e-10
    assert s["kl_zero"] > 0.1 and s["kl_mean"] > 0.01  # the ablations really hurt
    assert s["frac_recovered_zero"] == pytest.approx(1.0, abs=1e-6)
    assert s["frac_recovered_mean"] == pytest.approx(1.0, abs=1e-6)


def test_zero_sae_splice_equals_the_zero_ablation_baseline(known):
    res, _, _ = known
    m = res.metrics["known-zero"]
    s = m["splice"]
    assert s["kl_sae"] == pytest.approx(s["kl_zero"], rel=1e-9)
    assert s["agreement_sae"] == s["agreement_zero"]
    assert s["frac_recovered_zero"] == pytest.approx(0.0, abs=1e-9)
    # Zero is worse than the mean-vector baseline for ReLU activations (positive mean): FVU > 1.
    assert m["reconstruction"]["fvu"] > 1.0 and m["reconstruction"]["l0"] == 0
    assert m["features"]["n_dead"] == m["n_features"]


def test_zero_code_sae_at_the_mean_has_fvu_one_and_matches_mean_ablation(known):
    res, _, _ = known
    held = res.metrics["known-heldmean"]["reconstruction"]
    assert held["fvu"] == pytest.approx(1.0, abs=1e-4)
    assert held["explained_variance"] == pytest.approx(0.0, abs=1e-4)
    s = res.metrics["known-cachemean"]["splice"]
    assert s["kl_sae"] == pytest.approx(s["kl_mean"], rel=1e-6)
    assert s["frac_recovered_mean"] == pytest.approx(0.0, abs=1e-6)


def test_metrics_and_summary_carry_the_neuron_basis_at_each_sae_l0(known, env):
    """The neuron basis at the SAE's L0, by known answers: an SAE that codes nothing (L0 0)
    ties with keeping no channel (zeroed: its own FVU; mean-filled: the cache-mean SAE's), and
    for the exact SAE the top-round(L0) channels' FVU is recomputed here by hand."""
    res, _, _ = known
    cfg, cache_dir, meta = env
    zero = res.metrics["known-zero"]
    nb = zero["neuron_baseline"]
    assert nb["k"] == 0 and nb["n_vectors"] == zero["reconstruction"]["n_vectors"]
    assert nb["fvu_zero"] == pytest.approx(zero["reconstruction"]["fvu"], rel=1e-9)
    assert nb["gain_zero"] == pytest.approx(1.0, rel=1e-9)
    cache_mean_fvu = res.metrics["known-cachemean"]["reconstruction"]["fvu"]
    assert nb["fvu_mean"] == pytest.approx(cache_mean_fvu, rel=1e-9)
    ident = res.metrics["known-identity"]
    nb = ident["neuron_baseline"]
    k = round(ident["reconstruction"]["l0"])
    x = held_out_vectors(cache_dir, meta, cfg).double().numpy()
    kept = np.where(x >= -np.sort(-x, axis=1)[:, [k - 1]], x, 0.0)  # no ties among positives
    want = ((x - kept) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert nb["k"] == k and nb["fvu_zero"] == pytest.approx(want, rel=1e-6)
    assert 0 < nb["fvu_zero"] < 1 and ident["reconstruction"]["fvu"] < 1e-10
    # The exact SAE beats the neurons without bound (undefined, null, at FVU 0 exactly).
    assert nb["gain"] is None or nb["gain"] > 1e6
    disk = json.loads(Path(ident["files"]["metrics"]).read_text())["neuron_baseline"]
    assert disk["fvu_zero"] == pytest.approx(nb["fvu_zero"])
    rows = {r["run"]: r for r in csv.DictReader(open(res.summary_csv_path))}
    assert float(rows["known-identity"]["fvu_neuron_topk"]) == pytest.approx(nb["fvu_zero"])
    # The gain is over the better neuron code: here the mean-filled one.
    nb0 = zero["neuron_baseline"]
    assert float(rows["known-zero"]["neuron_gain"]) == pytest.approx(
        min(nb0["fvu_zero"], nb0["fvu_mean"]) / zero["reconstruction"]["fvu"])


def test_evaluation_writes_metrics_figures_and_a_sweep_summary(known):
    res, seconds, wandb_dir = known
    assert len(res.run_dirs) == 4 and len(res.metrics_paths) == 4
    for path in res.metrics_paths:
        m = json.loads(Path(path).read_text())
        eval_dir = Path(path).parent
        for f in ("density_hist.png", "density_hist.json", "l0_hist.png", "l0_hist.json"):
            assert (eval_dir / f).stat().st_size > 0, f
        assert m["splice"]["images"] == "holdout_shards"
        assert m["features"]["includes_train_vectors"]  # tiny held-out set: topped up
    rows = list(csv.DictReader(open(res.summary_csv_path)))
    assert sorted(r["run"] for r in rows) == sorted(res.metrics)
    assert json.loads(Path(res.summary_json_path).read_text())["rows"][0]["layer"] == LAYER
    assert {Path(p).name for p in res.frontier_paths} == {"frontier_l0_fvu.png",
                                                          "frontier_l0_kl.png"}
    # The tracker got the scalars, figures and tables (a real offline W&B run).
    run_files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    blob = run_files[0].read_bytes()
    for key in (b"eval/known-identity/reconstruction/fvu", b"eval/summary",
                b"eval/frontier_l0_fvu", b"eval/known-zero/density_hist"):
        assert key in blob, key
    media = next(wandb_dir.glob("wandb/offline-run-*/files/media"))
    assert len(list(media.rglob("*.png"))) == 4 * 2 + 2  # per-run figures + two frontiers
    assert list(media.rglob("summary_*.table.json"))
    print(f"evaluate.run over 4 runs took {seconds:.1f}s")


def test_splice_uses_held_out_images_only(env):
    cfg, cache_dir, meta = env
    train, hold = shards.split_shards(meta, cfg.train.holdout_frac)
    ids = fidelity.holdout_image_ids(meta, hold, train)
    train_ids = fidelity.holdout_image_ids(meta, train)
    assert ids == [8, 9, 10, 11] and not set(ids) & set(train_ids)
    # The vectors of the held-out shards come from exactly these images.
    _, pos = shards.load_vectors(cache_dir, hold, with_pos=True)
    assert set(pos[:, 0].tolist()) == set(ids)
    assert fidelity.pick_evenly(list(range(10)), 3) == [0, 4, 9]  # spread over shards
    info = runs.RunInfo(Path("x"), "x", LAYER, cache_dir, tuple(hold), tuple(train), "topk",
                            8, 480, {})
    images, got, how = fidelity.splice_images(meta, info, 2, cfg.data)
    assert how == "holdout_shards" and set(got) <= set(ids) and images.shape == (2, 3, 64, 64)
    # The images are the ones the cache saw: their activations reproduce the stored vectors.
    from sae_vision.activations.images import DemoImages

    want = torch.stack([DemoImages(cfg.data)[i].image for i in got])
    assert torch.equal(images, want)


def test_without_held_out_ranges_it_takes_images_the_cache_never_saw(env):
    cfg, cache_dir, meta = env
    bare = {**meta, "shards": [{k: v for k, v in s.items() if k != "image_range"}
                               for s in meta["shards"]]}
    info = runs.RunInfo(Path("x"), "x", LAYER, cache_dir, ("shard-000002.tar",),
                            ("shard-000000.tar", "shard-000001.tar"), "topk", 8, 480, {})
    _, got, how = fidelity.splice_images(bare, info, 2, cfg.data)
    assert how == "past_cached_range" and got == [12, 13]


# --------------------------------------------------------------------------------------------
# Refusals and selection


def test_sae_with_the_wrong_d_in_is_refused_before_any_work(env):
    cfg, cache_dir, meta = env
    run_dir = save_run(cfg, cache_dir, meta, "wrong-dim", relu_sae(256, 512), layer=LAYER)
    with pytest.raises(ValueError) as e:
        evaluate.run(dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, run="wrong-dim")))
    msg = str(e.value)
    assert "d_in=256" in msg and "480" in msg and "mixed3a" in msg  # names the fix
    assert not (run_dir / "eval").exists()


def test_run_trained_on_another_layer_is_refused_with_the_fix(env):
    cfg, cache_dir, meta = env
    save_run(cfg, cache_dir, meta, "other-layer", relu_sae(480, 960), layer=LAYER)
    other = dataclasses.replace(cfg, layer=dataclasses.replace(cfg.layer, name="mixed3a", dim=256),
                                sae=dataclasses.replace(cfg.sae, run="other-layer"))
    with pytest.raises(ValueError, match="pass layer=mixed3b"):
        evaluate.run(other)


# --------------------------------------------------------------------------------------------
# Pieces


# --------------------------------------------------------------------------------------------
# Cross-seed stability through the stage


def test_compare_run_reports_stability_of_a_permuted_copy(env):
    cfg, cache_dir, meta = env
    torch.manual_seed(0)
    a = make_sae(SAEConfig(arch="topk", n_features=96, k=8), 480)
    b = make_sae(SAEConfig(arch="topk", n_features=96, k=8), 480)
    perm = torch.randperm(96)
    with torch.no_grad():
        b.load_state_dict(a.state_dict())
        b.W_dec.copy_(a.W_dec[perm])
        b.W_enc.copy_(a.W_enc[:, perm])
        b.b_enc.copy_(a.b_enc[perm])
    save_run(cfg, cache_dir, meta, "seed-a", a)
    save_run(cfg, cache_dir, meta, "seed-b", b)
    c = make_sae(SAEConfig(arch="topk", n_features=96, k=8), 480)  # fresh random init
    save_run(cfg, cache_dir, meta, "seed-c", c)
    ev = dataclasses.replace(cfg.eval, splice=False, compare_run="seed-b")
    res = evaluate.run(dataclasses.replace(cfg, eval=ev,
                                           sae=dataclasses.replace(cfg.sae, run="seed-a")))
    st = json.loads(Path(res.metrics_paths[0]).read_text())["stability"]
    assert st["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and st["frac_above_0.9"] == 1.0
    # The permuted copy also reconstructs identically.
    a_m = res.metrics["seed-a"]["reconstruction"]
    b_res = evaluate.run(dataclasses.replace(cfg, eval=dataclasses.replace(ev, compare_run="seed-c"),
                                             sae=dataclasses.replace(cfg.sae, run="seed-b")))
    assert b_res.metrics["seed-b"]["reconstruction"]["fvu"] == pytest.approx(a_m["fvu"], rel=1e-5)
    assert b_res.metrics["seed-b"]["stability"]["mean_cosine"] < 0.5
    loaded, _ = load_sae(Path(res.run_dirs[0]))
    assert torch.equal(loaded.W_dec, a.W_dec)
    assert np.isfinite(a_m["fvu"])


# --------------------------------------------------------------------------------------------
# End to end through run.py: demo cache, two tiny trained SAEs, evaluate the sweep


@pytest.mark.slow
def test_demo_cache_trained_saes_beat_zero_ablation_and_trace_the_frontier(tmp_path, weights_dir):
    """`python run.py` for cache, a 2-point k sweep (Hydra multirun) and evaluate over the glob.

    Held-out FVU is well below 1, the splice KL is below zero-ablation's, and more sparsity
    (smaller k) means more error on the frontier.
    """
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    common = [f"paths.root={tmp_path}", "debug=tiny", "logger=disabled", "model.device=cpu",
              "data.n_images=40", "data.image_size=96", "cache.sampling=all",
              "cache.images_per_shard=8", "train.holdout_frac=0.2", "train.n_steps=300",
              "train.batch_size=256", "train.lr=1e-3", "train.warmup_steps=10",
              "train.ckpt_every=300", "train.device=cpu", "sae.expansion=2",
              "eval.n_splice_images=3"]

    def cli(*args):
        out = subprocess.run([sys.executable, "run.py", *args, *common], cwd=repo,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    cli("stage=cache")
    cli("-m", "stage=train", "sae.k=4,32", f"hydra.sweep.dir={tmp_path}/multirun")
    # Hydra reads an unquoted glob(...) as its own sweep syntax: quote it (or use a plain glob).
    out = cli("stage=evaluate", 'sae.run="glob(*)"')
    summary_dir = tmp_path / "sae" / "summary"
    assert f"wrote {summary_dir / 'summary.csv'}" in out
    rows = {int(r["k"]): r for r in csv.DictReader(open(summary_dir / "summary.csv"))}
    assert set(rows) == {4, 32}
    for r in rows.values():
        assert float(r["fvu"]) < 0.7
        assert float(r["kl_sae"]) < float(r["kl_zero"])
        assert float(r["frac_recovered_zero"]) > 0
    assert float(rows[4]["l0"]) < float(rows[32]["l0"])
    assert float(rows[4]["fvu"]) > float(rows[32]["fvu"])  # more sparsity, more error
    for name in ("frontier_l0_fvu.png", "frontier_l0_kl.png"):
        assert (summary_dir / name).stat().st_size > 5000
    for r in rows.values():
        m = json.loads((tmp_path / "sae" / r["run"] / "eval" / "metrics.json").read_text())
        assert m["splice"]["images"] == "holdout_shards"
        assert not set(m["splice"]["image_ids"]) & set(range(32))  # 4 of 5 shards trained on


# --------------------------------------------------------------------------------------------
# The science hooks: polysemantic decomposition (fast) and the curve census (slow)


def _science_run(env, name: str):
    cfg, cache_dir, meta = env
    torch.manual_seed(0)
    save_run(cfg, cache_dir, meta, name, make_sae(SAEConfig(arch="topk", n_features=960, k=8), 480))
    return cfg


def test_polysemantic_analysis_writes_its_json_beside_the_metrics(env):
    cfg = _science_run(env, "poly")
    ev = dataclasses.replace(cfg.eval, splice=False, polysemantic=True)
    res = evaluate.run(dataclasses.replace(cfg, eval=ev,
                                           sae=dataclasses.replace(cfg.sae, run="poly")))
    m = res.metrics["poly"]
    poly = json.loads(Path(m["polysemantic"]["path"]).read_text())
    assert Path(m["polysemantic"]["path"]) == Path(res.run_dirs[0]) / "eval" / "polysemantic.json"
    assert poly["layer"] == LAYER and len(poly["neurons"]) == 480
    assert poly["n_vectors"] == m["reconstruction"]["n_vectors"]  # held-out vectors only
    assert 0.0 <= m["polysemantic"]["frac_more_selective"] <= 1.0
    assert 0.0 <= m["polysemantic"]["frac_more_selective_random"] <= 1.0
    for row in poly["neurons"]:  # shares of a neuron lie in [0, 1] and sum to at most 1
        assert all(0.0 <= f["share"] <= 1.0 for f in row["features"])
        assert row["share_sum"] <= 1.0 + 1e-3
    # The exemplar score: mixed4c at the held-out positions, one exemplar per image.
    ex = poly["summary"]["exemplars"]
    assert ex["layer"] == "mixed4c" and ex["n_top"] == 16
    assert 0.0 <= m["polysemantic"]["frac_more_coherent"] <= 1.0
    coh = [r["coherence"] for r in poly["neurons"] if r["coherence"] is not None]
    assert len(coh) == 480 and all(-1.0 <= c <= 1.0 for c in coh)
    # The selectivity is compared at the neuron's own firing rate, the old score kept beside.
    row = next(r for r in poly["neurons"] if r["features"])
    assert row["features"][0]["matched_rate"] == pytest.approx(row["rate"])
    assert "unmatched" in poly["summary"]


@pytest.mark.slow
def test_curve_census_writes_curves_json_and_coverage_into_the_metrics(env):
    cfg = _science_run(env, "census")
    cfg = dataclasses.replace(cfg, curves=dataclasses.replace(
        cfg.curves, orientation_step=15.0, invariance_step=30.0, radii=[8.0, 16.0, 1000.0],
        invariance_radii=[8.0, 16.0], n_null_seeds=0))
    ev = dataclasses.replace(cfg.eval, splice=False, curves=True)
    res = evaluate.run(dataclasses.replace(cfg, eval=ev,
                                           sae=dataclasses.replace(cfg.sae, run="census")))
    m = res.metrics["census"]
    eval_dir = Path(res.run_dirs[0]) / "eval"
    census = json.loads((eval_dir / "curves.json").read_text())
    assert census["layer"] == LAYER and census["features"]["n_units"] == 960
    assert m["curves"]["n_neuron_detectors"] == census["neurons"]["n_detected"]
    assert "largest_gap_neurons_deg" in m["curves"]
    # One σ sample: the held-out photos, every position, for neurons and features alike.
    sigma = census["sigma_source"]
    assert sigma["photos"].startswith("held-out photos of cache")
    assert sigma["neurons"] == sigma["features"] == "photos"
    assert 1 <= sigma["count"] <= cfg.curves.n_reference_images
    assert sigma["n_vectors"] % sigma["count"] == 0 and sigma["n_vectors"] > sigma["count"]
    assert Path(m["files"]["curves_coverage_png"]).is_file()


def test_evaluation_on_another_image_folder_splices_its_photos(env, tmp_path):
    """Generalisation on photos the cache never saw: the other folder's images are known, so the
    splice runs there too (it was skipped as "not run on other data"), on its own images."""
    photos = Path(__file__).resolve().parents[3] / "shared" / "data" / "imagenet-sample"
    if not photos.is_dir():
        pytest.skip("no ../shared/data/imagenet-sample")
    cfg, cache_dir, meta = env
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in sorted(photos.glob("*.JPEG"))[::150][:6]:  # 6 real photos of 6 classes
        (folder / f.name).write_bytes(f.read_bytes())
    other_cfg = dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, name="cache"),
                                    data=dataclasses.replace(cfg.data, name="imagefolder",
                                                             root=str(folder), n_images=6),
                                    cache=dataclasses.replace(cfg.cache, images_per_shard=3))
    other_dir = Path(cache.run(other_cfg).cache_dirs[LAYER])
    run_dir = save_run(cfg, cache_dir, meta, "other-identity", identity_sae(480))
    ev = dataclasses.replace(cfg.eval, cache=str(other_dir), curves=False, polysemantic=False)
    res = evaluate.run(dataclasses.replace(
        cfg, eval=ev, sae=dataclasses.replace(cfg.sae, run="other-identity")))
    m = res.metrics["other-identity"]
    assert m["eval_data"]["in_distribution"] is False
    assert "splice" not in m.get("skipped", {})
    s = m["splice"]
    assert set(s["image_ids"]) <= set(range(6)) and len(s["image_ids"]) == 3  # its own photos
    assert s["kl_sae"] < 1e-8 and s["kl_zero"] > 0.1  # a lossless SAE splices losslessly there
    out = run_dir / "eval" / f"on-{shards.load_cache_meta(other_dir)['key']}" / "metrics.json"
    assert json.loads(out.read_text())["splice"]["image_ids"] == s["image_ids"]
