"""Tests for sae_vision/activations/weights.py: where weights are looked for, the offline message, and the
checksummed caffejs download (served from a local file:// tree rebuilt from the real weights)."""

import numpy as np
import pytest
import torch

from sae_vision.activations import weights
from sae_vision.activations.models import load_model
from sae_vision.activations.weights import find_weights
from sae_vision.core.config import ModelConfig


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An environment where no weights can be found anywhere (empty env dir, cache, hub)."""
    monkeypatch.delenv("SAE_VISION_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_weights_resolution_order_is_path_then_dirs_then_user_cache(no_weights, monkeypatch):
    fname = "bvlc_googlenet.npz"
    explicit = no_weights / "mine.npz"
    cfg_dir, env_dir = no_weights / "cfg_dir", no_weights / "env_dir"
    cache = no_weights / "xdg" / "sae_vision" / "weights"
    for path in (explicit, cfg_dir / fname, env_dir / fname, cache / fname):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stub")
    monkeypatch.setenv("SAE_VISION_WEIGHTS_DIR", str(env_dir))
    cfg = ModelConfig(weights_path=str(explicit), weights_dir=str(cfg_dir), allow_download=False)
    assert find_weights(cfg) == explicit
    cfg.weights_path = None
    assert find_weights(cfg) == cfg_dir / fname
    cfg.weights_dir = None
    assert find_weights(cfg) == env_dir / fname
    monkeypatch.delenv("SAE_VISION_WEIGHTS_DIR")
    assert find_weights(cfg) == cache / fname
    (cache / fname).unlink()
    with pytest.raises(FileNotFoundError):
        find_weights(cfg)
    with pytest.raises(FileNotFoundError, match="model.weights_path"):
        find_weights(ModelConfig(weights_path=str(no_weights / "missing.npz")))


@pytest.mark.parametrize("family", ["googlenet_bvlc", "inceptionv1"])
def test_offline_without_weights_says_which_file_goes_where(no_weights, family):
    fname = weights.WEIGHT_FILES[family]
    with pytest.raises(FileNotFoundError) as err:
        load_model(ModelConfig(family=family, allow_download=False, device="cpu"))
    msg = str(err.value)
    assert fname in msg and "SAE_VISION_WEIGHTS_DIR" in msg and "allow_download" in msg
    assert str(no_weights / "xdg" / "sae_vision" / "weights") in msg


def _write_caffejs_tree(root, npz_path, only_first=False):
    """The public caffejs layout (filters as (out, kh, kw, in) float32) rebuilt from the npz."""
    with np.load(npz_path) as npz:
        for key in npz.files:
            layer, kind = key.rsplit(".", 1)
            a = npz[key].transpose(0, 2, 3, 1) if npz[key].ndim == 4 else npz[key]
            path = root / f"{layer}_{'filter' if kind == 'weight' else 'bias'}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(np.ascontiguousarray(a, dtype="<f4").tobytes())
            if only_first:
                return path


def test_download_verifies_checksums_and_packs_the_caffejs_files(
    no_weights, monkeypatch, weights_dir, bvlc_model
):
    _write_caffejs_tree(no_weights / "caffejs", weights_dir / "bvlc_googlenet.npz")
    monkeypatch.setattr(weights, "CAFFEJS_URL", (no_weights / "caffejs").as_uri())
    fetched = load_model(ModelConfig(device="cpu"))
    assert fetched.weights_path == str(
        no_weights / "xdg" / "sae_vision" / "weights" / "bvlc_googlenet.npz"
    )
    for (name, got), want in zip(fetched.state_dict().items(), bvlc_model.state_dict().values()):
        assert torch.equal(got, want), name


def test_download_rejects_a_file_with_the_wrong_checksum(no_weights, monkeypatch, weights_dir):
    first = _write_caffejs_tree(
        no_weights / "caffejs", weights_dir / "bvlc_googlenet.npz", only_first=True
    )
    first.write_bytes(first.read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.setattr(weights, "CAFFEJS_URL", (no_weights / "caffejs").as_uri())
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_model(ModelConfig(device="cpu"))
    assert not list((no_weights / "xdg").rglob("*.npz"))  # nothing half-written is left behind


def test_failed_download_explains_where_to_put_the_weights(no_weights, monkeypatch):
    monkeypatch.setattr(weights, "CAFFEJS_URL", (no_weights / "nowhere").as_uri())
    with pytest.raises(FileNotFoundError, match="bvlc_googlenet.npz.*Download failed"):
        load_model(ModelConfig(device="cpu"))
