"""Every experiment preset in conf/experiment/ composes and trains for one step on tiny data.

The presets' own data (ImageNet, the demo photos) is swapped for a small array cache
(`data=array`), so each preset runs its real train settings (arch, expansion, k, λ, lr, batch,
schedule, loader) for one step in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sae_vision.activations import cache
from sae_vision.sae import train
from tests.activations.test_import_acts import compose_cfg

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
D_IN = 16


@pytest.fixture(scope="module")
def tiny_array(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    rng = np.random.default_rng(0)
    np.save(path, np.maximum(rng.normal(0.3, 1.0, size=(8192, D_IN)), 0).astype(np.float32))
    return path


def test_there_are_presets_to_run():
    assert {"demo", "paper"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_trains_one_step_on_tiny_data(experiment, tiny_array, tmp_path):
    tiny = [f"experiment={experiment}", "data=array", "data.name=array",
            f"data.path={tiny_array}", "layer.name=array", "layer.dim=0", "cache.layers=null",
            f"paths.root={tmp_path}", "logger=disabled", "model.device=cpu", "train.device=cpu",
            "train.n_steps=1"]
    # The preset as run.py would see it; data.root stands in for ImageNet, which it never reads.
    preset = compose_cfg([tiny[0], "stage=train", "data.root=/data/imagenet/train"])
    cache.run(compose_cfg(["stage=cache", *tiny]))
    cfg = compose_cfg(["stage=train", *tiny])
    # Only the data and the step count differ from the preset: its SAE and recipe are what runs.
    assert cfg.sae == preset.sae
    assert {**vars(cfg.train), "n_steps": 0, "device": ""} == {
        **vars(preset.train), "n_steps": 0, "device": ""}
    out = train.run(cfg)
    assert out.metrics["n_steps"] == 1 and out.metrics["d_in"] == D_IN
    assert out.metrics["arch"] == preset.sae.arch
    assert np.isfinite(out.metrics["loss"])
    assert (out.run_dir / "sae.safetensors").is_file()
