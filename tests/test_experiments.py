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


def _make_var(text: str, name: str) -> list[str]:
    """A `NAME := ...` Makefile variable (with continuation lines) as shell words."""
    import re
    import shlex

    body = re.search(rf"^{name} [:?]?= ((?:.*\\\n)*.*)$", text, re.M).group(1)
    return shlex.split(body.replace("\\\n", " ").replace("$(STUDY_DATA)", ""))


def test_study_scale_recipes_compose_validate_and_keep_their_caches_apart(tmp_path):
    """`make study-scale`: every scale's cache, train and evaluate overrides compose and pass
    check_config; the three caches have three keys, and the views scale keeps each photo's views
    in one shard and streams its training vectors."""
    import re
    import shlex

    from sae_vision.core import paths

    text = (REPO / "Makefile").read_text()
    base, train_args = _make_var(text, "SCALE_ARGS"), _make_var(text, "SCALE_TRAIN")
    ev_args = _make_var(text, "SCALE_EVAL")
    scales = re.findall(r'^\s+(p\S+)\) d="([^"]*)";(?:;|\s*\\\n\s*tr="([^"]*)";;)', text, re.M)
    assert [s[0] for s in scales] == _make_var(text, "SCALES")[:3] == [
        "p300-u256", "p900-all", "p900x8-all"]
    train_args = [a.replace("topk,relu_l1", "topk") for a in train_args if "hydra." not in a]
    keys, steps = set(), set()
    for name, data, tr in scales:
        common = [*base, f"paths.root={tmp_path / name}", "data.root=/photos", *shlex.split(data)]
        c = compose_cfg(["stage=cache", *common])
        t = compose_cfg(["stage=train", *common, *shlex.split(tr), *train_args])
        e = compose_cfg(["stage=evaluate", *common, *ev_args])
        keys.add(paths.cache_key(c, "mixed3b"))
        assert paths.cache_key(t, "mixed3b") == paths.cache_key(e, "mixed3b") == paths.cache_key(
            c, "mixed3b")
        steps.add((t.train.n_steps * t.train.batch_size, t.sae.expansion, t.sae.k))
        assert t.sae.l0_control and e.eval.held_out_sample == "spread" and e.eval.polysemantic
        assert c.cache.images_per_shard % c.data.views == 0
        if c.data.views > 1:
            assert (c.data.views, c.cache.sampling, t.train.loader) == (8, "all", "stream")
    assert len(keys) == 3 and len(steps) == 1  # one budget of vectors for every scale
