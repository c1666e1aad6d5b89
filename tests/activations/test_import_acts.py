"""data=array: your own activations from .npy / .safetensors files into a cache every stage takes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae_vision.activations import cache
from sae_vision.activations.shards import load_cache_meta, load_vectors
from sae_vision.core.config import Config, check_config, register_configs
from sae_vision.evaluate import stage as evaluate
from sae_vision.sae import train

REPO = Path(__file__).resolve().parents[2]


def compose_cfg(overrides) -> Config:
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    check_config(cfg)
    return cfg


def _acts(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(0.3, 1.0, size=(n, d)), 0).astype(np.float32)


def test_array_round_trips_through_a_cache_and_trains_and_evaluates(tmp_path):
    acts = _acts(3000, 20)
    np.save(tmp_path / "acts.npy", acts)
    common = ["data=array", f"data.path={tmp_path / 'acts.npy'}", f"paths.root={tmp_path / 'a'}",
              "logger=disabled"]
    res = cache.run(compose_cfg(["stage=cache", *common]))
    cache_dir = Path(res.cache_dirs["array"])
    meta = load_cache_meta(cache_dir)
    assert meta["dim"] == 20 and meta["n_vectors"] == 3000 and meta["source"] == "array"
    assert len(meta["shards"]) >= 2  # enough shards for a held-out split
    back = load_vectors(cache_dir)
    assert torch.equal(back, torch.from_numpy(acts))  # the same vectors, in the same order
    assert cache.run(compose_cfg(["stage=cache", *common])).reused

    tcfg = compose_cfg(["stage=train", *common, "train.n_steps=30", "train.batch_size=128",
                        "sae.k=4", "sae.expansion=2", "train.ckpt_every=30"])
    out = train.run(tcfg)
    assert out.metrics["n_steps"] == 30 and out.metrics["d_in"] == 20
    assert np.isfinite(out.metrics["fvu"]) and out.metrics["fvu"] < 1.5

    ecfg = compose_cfg(["stage=evaluate", *common, "train.n_steps=30", "train.batch_size=128",
                        "sae.k=4", "sae.expansion=2", "train.ckpt_every=30",
                        f"sae.run={out.run_dir.name}", "eval.n_vectors=500"])
    ev = evaluate.run(ecfg)
    m = next(iter(ev.metrics.values()))
    assert "splice" not in m and "splice" in m["skipped"]  # no images behind an array
    assert m["reconstruction"]["fvu"] < 1.5


def test_a_folder_of_safetensors_and_npy_files_is_one_cache(tmp_path):
    from safetensors.numpy import save_file

    a, b = _acts(700, 12, 1), _acts(500, 12, 2).reshape(5, 10, 10, 12)  # [N, H, W, C] too
    src = tmp_path / "src"
    src.mkdir()
    save_file({"acts": a, "other": np.zeros(3, np.float32)}, str(src / "a.safetensors"))
    np.save(src / "b.npy", b)
    cfg = compose_cfg(["stage=cache", "data=array", f"data.path={src}",
                       f"paths.root={tmp_path / 'a'}", "logger=disabled"])
    res = cache.run(cfg)
    back = load_vectors(res.cache_dirs["array"])
    torch.testing.assert_close(back, torch.from_numpy(np.concatenate([a, b.reshape(-1, 12)])))


def test_pickled_arrays_are_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    cfg = compose_cfg(["stage=cache", "data=array", f"data.path={tmp_path}/obj.npy",
                       f"paths.root={tmp_path}/a"])
    with pytest.raises(ValueError, match="without pickle"):  # run.py prints it as one line
        cache.run(cfg)
    assert not list((tmp_path / "a").rglob("*.tar"))


@pytest.mark.parametrize("path, needle", [(None, "data.path"), ("nope.npy", "does not exist")])
def test_missing_or_wrong_array_path_names_the_fix(tmp_path, path, needle):
    over = ["stage=cache", "data=array", f"paths.root={tmp_path}"]
    if path:
        over.append(f"data.path={tmp_path / path}")
    with pytest.raises(ValueError, match=needle):
        cfg = compose_cfg(over)
        cache.run(cfg)


def _train_on(tmp_path, acts: np.ndarray, name: str):
    np.save(tmp_path / f"{name}.npy", acts)
    common = ["data=array", f"data.path={tmp_path / f'{name}.npy'}",
              f"paths.root={tmp_path / 'a'}", "logger=disabled"]
    cache.run(compose_cfg(["stage=cache", *common]))
    return common


def test_evaluate_on_another_cache_writes_beside_the_in_distribution_metrics(tmp_path):
    common = _train_on(tmp_path, _acts(2000, 16), "a")
    hp = ["train.n_steps=20", "train.batch_size=128", "sae.k=4", "sae.expansion=2",
          "train.ckpt_every=20", "eval.n_vectors=400"]
    run_dir = train.run(compose_cfg(["stage=train", *common, *hp])).run_dir
    own = evaluate.run(compose_cfg(["stage=evaluate", *common, *hp, f"sae.run={run_dir.name}"]))
    own_path = run_dir / "eval" / "metrics.json"
    before = own_path.read_bytes()
    assert next(iter(own.metrics.values()))["eval_data"]["in_distribution"]

    other = _acts(1500, 16, seed=7) * 3.0  # another distribution of the same width
    other_common = _train_on(tmp_path, other, "b")
    other_key = load_cache_meta(Path(cache.run(compose_cfg(
        ["stage=cache", *other_common])).cache_dirs["array"]))["key"]
    ev = evaluate.run(compose_cfg(["stage=evaluate", *common, *hp, f"sae.run={run_dir.name}",
                                   f"eval.cache={other_key}", "eval.n_vectors=100000"]))
    m = next(iter(ev.metrics.values()))
    assert own_path.read_bytes() == before  # the in-distribution metrics are untouched
    out_path = Path(m["files"]["metrics"])
    assert out_path == run_dir / "eval" / f"on-{other_key}" / "metrics.json" and out_path.exists()
    assert m["eval_data"] == {"cache_dir": m["eval_data"]["cache_dir"], "key": other_key,
                              "in_distribution": False}
    assert m["reconstruction"]["n_vectors"] == 1500  # every vector of the other data
    own_fvu = next(iter(own.metrics.values()))["reconstruction"]["fvu"]
    assert m["reconstruction"]["fvu"] != pytest.approx(own_fvu)


@pytest.mark.slow  # two run.py processes
def test_evaluate_honours_data_overrides_and_warns_about_unused_ones(tmp_path):
    common = _train_on(tmp_path, _acts(2000, 16), "a")
    hp = ["train.n_steps=20", "train.batch_size=128", "sae.k=4", "sae.expansion=2",
          "train.ckpt_every=20", "eval.n_vectors=400", "eval.splice=false"]
    run_dir = train.run(compose_cfg(["stage=train", *common, *hp])).run_dir
    np.save(tmp_path / "new.npy", _acts(900, 16, seed=3))
    args = ["stage=evaluate", "data=array", f"data.path={tmp_path / 'new.npy'}",
            f"paths.root={tmp_path / 'a'}", "logger=disabled", f"sae.run={run_dir.name}",
            "eval.n_vectors=400", "report.n_examples=3"]
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 2 and "stage=cache" in proc.stderr  # not cached yet: says how
    assert "warning: stage=evaluate does not use report.n_examples=3" in proc.stderr
    cache.run(compose_cfg(["stage=cache", "data=array", f"data.path={tmp_path / 'new.npy'}",
                           f"paths.root={tmp_path / 'a'}"]))
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    written = list((run_dir / "eval").glob("on-array-*/metrics.json"))
    assert len(written) == 1 and not (run_dir / "eval" / "metrics.json").exists()
