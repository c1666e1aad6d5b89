"""runs: selecting run folders, what a run recorded, and the model and data of its cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_vision.core.config import Config, DataConfig, SAEConfig
from sae_vision.sae import runs
from sae_vision.sae.architectures import make_sae
from sae_vision.sae.checkpoint import save_sae


def test_run_selection_by_name_glob_and_sweep_folder(tmp_path):
    cfg = Config()
    cfg.paths.root = str(tmp_path)
    root = Path(cfg.paths.root) / "sae"
    sae = make_sae(SAEConfig(arch="relu_l1", n_features=16), 8)
    for name in ("a-k8", "a-k32", "b-k8", "sweep1/x", "sweep1/y"):
        save_sae(sae, root / name, {})
    save_sae(sae, root / "a-k8" / "checkpoints" / "step-0000001", {})  # not a separate run
    (root / runs.SUMMARY_DIR).mkdir()

    def sel(spec):
        found, is_set = runs.resolve_runs(cfg, spec)
        return [str(p.relative_to(root)) for p in found], is_set

    assert sel("a-k8") == (["a-k8"], False)
    assert sel(str(root / "b-k8")) == (["b-k8"], False)
    assert sel("glob(a-*)") == (["a-k32", "a-k8"], True)
    assert sel("*-k8") == (["a-k8", "b-k8"], True)
    assert sel("sweep1") == (["sweep1/x", "sweep1/y"], True)
    assert sel("glob(*)")[0] == ["a-k32", "a-k8", "b-k8", "sweep1/x", "sweep1/y"]
    assert [p.relative_to(root).as_posix() for p in runs.runs_under(root)] == [
        "a-k32", "a-k8", "b-k8", "sweep1/x", "sweep1/y"]
    with pytest.raises(ValueError, match="runs under .*a-k32"):
        sel("nope")
    with pytest.raises(ValueError, match="matches no SAE run"):
        sel("glob(zzz*)")


def test_run_info_prefers_what_the_run_recorded_and_recomputes_a_missing_split(tmp_path):
    cfg = Config()
    sae = make_sae(SAEConfig(arch="topk", n_features=32, k=4), 16)
    meta = {"layer": "mixed3a_5x5_bottleneck", "cache_dir": str(tmp_path / "c"),
            "config": {"sae": {"k": 4, "l1_coeff": 5.0}, "train": {"seed": 3,
                                                                 "holdout_frac": 0.5}}}
    cache_meta = {"shards": [{"name": f"shard-00000{i}.tar"} for i in range(4)]}
    info = runs.run_info(tmp_path / "r", sae, meta, cfg, cache_meta)
    assert (info.name, info.layer, info.cache_dir) == ("r", meta["layer"], tmp_path / "c")
    assert info.train_shards == ("shard-000000.tar", "shard-000001.tar")
    assert info.holdout_shards == ("shard-000002.tar", "shard-000003.tar")
    assert (info.arch, info.n_features, info.d_in) == ("topk", 32, 16)
    assert info.hparams["k"] == 4 and info.hparams["seed"] == 3


def test_model_and_data_config_come_from_the_cache_that_the_run_was_trained_on():
    cfg = Config()
    cache_meta = {"settings": {"model": {"family": "timm", "name": "resnet18"}},
                  "data": {"name": "imagefolder", "root": "/photos", "n_images": 900,
                           "not_a_field": 1}}
    mc = runs.model_config(cfg, cache_meta)
    assert (mc.family, mc.name) == ("timm", "resnet18")
    assert mc.device == cfg.model.device  # everything else from the current config
    dc = runs.data_config(cache_meta, DataConfig())
    assert (dc.name, dc.root, dc.n_images) == ("imagefolder", "/photos", 900)
    assert dc.image_size == DataConfig().image_size
    # data.views: a cache recorded before it existed has one view, whatever the command line says
    assert runs.data_config(cache_meta, DataConfig(views=8)).views == 1
    views = {**cache_meta, "data": {**cache_meta["data"], "views": 8}}
    assert runs.data_config(views, DataConfig()).views == 8


def test_recorded_cache_prefers_the_path_under_paths_root_then_the_key_then_the_absolute(
        tmp_path):
    cfg = Config()
    cfg.paths.root = str(tmp_path / "moved")

    def cache(d: Path) -> Path:
        d.mkdir(parents=True)
        (d / "metadata.json").write_text("{}")
        return d

    meta = {"cache_rel": "cache/L-abc", "cache_key": "L-abc",
            "cache_dir": str(tmp_path / "old" / "cache" / "L-abc")}
    # Nothing exists yet: the run names its cache under the current root.
    assert runs.recorded_cache(meta, cfg, "L") == tmp_path / "moved" / "cache" / "L-abc"
    old = cache(tmp_path / "old" / "cache" / "L-abc")
    assert runs.recorded_cache(meta, cfg, "L") == old  # the absolute path, as a fallback only
    moved = cache(tmp_path / "moved" / "cache" / "L-abc")
    assert runs.recorded_cache(meta, cfg, "L") == moved
    # A run from before cache_rel was recorded: found by its key.
    assert runs.recorded_cache({"cache_key": "L-abc", "cache_dir": str(old)}, cfg, "L") == moved
