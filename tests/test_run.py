"""run.py and conf/: the real Hydra composition, the CLI's messages, every experiment composes."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae_vision.activations.images import resolve_data_root
from sae_vision.core.config import ALL_LAYER_DIMS, Config, check_config, register_configs

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def compose_cfg(overrides) -> Config:
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=overrides)
    return OmegaConf.to_object(dcfg)


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("stage", ["cache", "train", "evaluate", "report"])
def test_every_experiment_composes_and_validates(experiment, stage):
    overrides = [f"experiment={experiment}", f"stage={stage}"]
    if experiment == "paper":
        overrides.append("data.root=/data/imagenet/train")
    cfg = compose_cfg(overrides)
    # Every value the preset sets survives composition (no group default overrides it).
    preset = OmegaConf.load(REPO / "conf" / "experiment" / f"{experiment}.yaml")
    preset.pop("hydra", None)
    composed = OmegaConf.structured(cfg)
    for key, value in _leaves(OmegaConf.to_container(preset)):
        assert OmegaConf.select(composed, key) == value, key
    if cfg.data.name == "imagefolder":  # as run.py does before validating
        cfg.data.root = resolve_data_root(cfg.data.root)
    check_config(cfg)


def _leaves(tree, prefix=""):
    """(dotted key, value) of every leaf of a nested dict; lists are leaves."""
    if not isinstance(tree, dict):
        return [(prefix, tree)]
    return [kv for k, v in tree.items() for kv in _leaves(v, f"{prefix}{k}" if not prefix
                                                             else f"{prefix}.{k}")]


def test_study_data_root_resolves_explicit_then_env_then_shared_sample(monkeypatch, tmp_path):
    from sae_vision.activations import images as data

    monkeypatch.delenv(data.DATA_ENV, raising=False)
    shared = data.resolve_data_root(None)
    if data.SHARED_SAMPLE.is_dir():  # this workplace: ../shared/data/imagenet-sample
        assert shared == str(data.SHARED_SAMPLE)
    else:
        assert shared is None
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.resolve_data_root(None) == str(tmp_path)
    assert data.resolve_data_root("/explicit") == "/explicit"
    cfg = compose_cfg(["experiment=imagenet_sample", "stage=cache"])
    assert cfg.data.name == "imagefolder" and cfg.paths.root == "artifacts/study"


@pytest.mark.parametrize("group,option,field,value", [
    ("sae", "relu_l1", "arch", "relu_l1"), ("sae", "jumprelu", "arch", "jumprelu"),
    ("sae", "batchtopk", "arch", "batchtopk"), ("model", "inceptionv1", "family", "inceptionv1"),
    ("logger", "disabled", "mode", "disabled"), ("layer", "mixed3a_5x5", "name", "mixed3a_5x5"),
])
def test_config_groups_swap_their_section(group, option, field, value):
    cfg = compose_cfg(["stage=train", f"{group}={option}"])
    assert getattr(getattr(cfg, group), field) == value
    check_config(cfg)


def test_layer_option_sets_every_table_layer_and_its_dim():
    from hydra.core.config_store import ConfigStore

    register_configs()
    options = {n.removesuffix(".yaml") for n in ConfigStore.instance().list("layer")}
    assert options == set(ALL_LAYER_DIMS)
    for name in ("conv2d0", "mixed3a_5x5", "mixed3b_pool_reduce_pre_relu"):
        cfg = compose_cfg(["stage=train", f"layer={name}"])
        assert (cfg.layer.name, cfg.layer.dim) == (name, ALL_LAYER_DIMS[name])
    assert compose_cfg(["stage=train", "layer=timm"]).layer.dim == 0  # conf/layer/timm.yaml


def test_help_lists_stages_and_examples():
    out = cli("--help")
    assert out.returncode == 0
    for word in ("stage: cache, evaluate, report, train", "layer:", "python run.py stage=train"):
        assert word in out.stdout, word


def test_missing_stage_and_unknown_layer_and_typo_fail_with_useful_messages():
    out = cli()
    assert out.returncode != 0 and "You must specify 'stage'" in out.stderr + out.stdout
    out = cli("stage=cache", "layer=nope")
    # Hydra's own error, as one error: line naming the choices (issue 23)
    assert out.returncode == 2 and "layer=nope is not a choice" in out.stderr
    assert "mixed3b" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = cli("stage=cache", "train.n_stepz=3")
    assert out.returncode != 0 and "n_stepz" in out.stderr
    out = cli("stage=cache", "cache.sampling=foo", "logger=disabled")
    assert out.returncode == 2 and "choose one of" in out.stderr
    out = cli("stage=cache", "cache.layers=[mixed3b,mixed9z]", "logger=disabled")
    assert out.returncode == 2 and "mixed9z" in out.stderr and "valid layers" in out.stderr


def test_tiny_cache_through_hydra_writes_a_wandb_offline_run(tmp_path):
    out = cli("stage=cache", "debug=tiny", f"paths.root={tmp_path}", "data.n_images=8",
              timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[cache] wrote" in out.stdout
    assert list((tmp_path / "cache").glob("mixed3b-*/metadata.json"))
    assert list((tmp_path / "runs" / "cache").glob("*/wandb/offline-run-*/run-*.wandb"))
