"""checkpoint: save_sae/load_sae round trips, the train state, checkpoint commit, the run lock."""

from __future__ import annotations

import json

import pytest
import torch

from sae_vision.core.config import ARCHS, SAEConfig
from sae_vision.sae.architectures import make_sae
from sae_vision.sae.checkpoint import (
    RunLocked,
    TrainState,
    latest_checkpoint,
    load_sae,
    load_train_state,
    restore_final,
    run_lock,
    save_sae,
    save_train_state,
    write_checkpoint,
)
from sae_vision.sae.loop import make_optimizer
from sae_vision.sae.runs import CKPT_FILES
from tests.sae.test_kernels import randomised


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(arch, tmp_path):
    torch.manual_seed(0)
    sae = randomised(
        make_sae(
            SAEConfig(arch=arch, n_features=48, k=4), 12, input_scale=2.5, mean=torch.randn(12)
        )
    )
    x = torch.randn(20, 12)
    sae.train()(x)  # batchtopk learns its threshold here
    save_sae(sae, tmp_path, {"step": 7, "layer": "mixed3b"})
    loaded, meta = load_sae(tmp_path)
    assert meta == {"step": 7, "layer": "mixed3b"}
    assert loaded.arch == arch and not loaded.training
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.W_enc.stride() == sae.W_enc.stride()
    sae.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["d_in"] == 12 and config["n_features"] == 48 and config["sae"]["arch"] == arch


def test_checkpoint_is_safetensors_and_loads_without_hydra(tmp_path, monkeypatch):
    import sys

    from safetensors import safe_open

    save_sae(make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4), tmp_path, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "sae.safetensors"]
    raw = (tmp_path / "sae.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])["W_enc"]["shape"] == [4, 16]
    assert not raw.startswith((b"\x80", b"PK"))  # neither pickle nor a torch zip archive
    with safe_open(str(tmp_path / "sae.safetensors"), "pt") as f:
        assert set(f.keys()) == {"W_enc", "b_enc", "W_dec", "b_dec", "input_scale", "mean"}
    for mod in ("hydra", "omegaconf"):
        monkeypatch.setitem(sys.modules, mod, None)  # any import of them now fails
    load_sae(tmp_path)


def test_load_refuses_missing_files(tmp_path):
    with pytest.raises(ValueError, match="missing sae.safetensors, config.json"):
        load_sae(tmp_path)
    save_sae(make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4), tmp_path, {})
    (tmp_path / "sae.safetensors").unlink()
    with pytest.raises(ValueError, match="missing sae.safetensors"):
        load_sae(tmp_path)


def test_load_refuses_config_that_does_not_match_the_weights(tmp_path):
    save_sae(make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4), tmp_path, {})
    path = tmp_path / "config.json"
    good = json.loads(path.read_text())

    bad = {**good, "d_in": 5, "sae": {**good["sae"], "n_features": 16}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"W_enc has shape \(4, 16\) but .*needs \(5, 16\)"):
        load_sae(tmp_path)

    bad = {**good, "n_features": 16, "sae": {**good["sae"], "n_features": 20}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="n_features=16 but the sae config gives 20"):
        load_sae(tmp_path)

    bad = {**good, "sae": {**good["sae"], "arch": "jumprelu"}}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="do not match arch 'jumprelu'"):
        load_sae(tmp_path)

    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid SAE config"):
        load_sae(tmp_path)


def _state_after_one_step(sae) -> TrainState:
    opt = make_optimizer(sae, 1e-3)
    sae.train()(torch.randn(8, sae.d_in)).losses["loss"].backward()
    opt.step()
    return TrainState(step=3, optimizer=opt.state_dict(),
                      since_fired_F=torch.arange(sae.n_features),
                      window_tensors={"window.fire_F": torch.ones(sae.n_features, dtype=torch.float64),
                                      "window.grad_norm": torch.tensor(0.5),
                                      "window.loss.mse": torch.tensor(2.0)},
                      window_info={"n_steps": 1, "n_vectors": 8}, total_vectors=24,
                      train_time=1.5, last_metrics={"loss": float("nan"), "l0": 2.0}, seed=7)


def test_train_state_round_trips_through_safetensors_and_json(tmp_path):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4)
    state = _state_after_one_step(sae)
    save_train_state(tmp_path, state)
    back = load_train_state(tmp_path)
    assert (back.step, back.total_vectors, back.train_time, back.seed) == (3, 24, 1.5, 7)
    assert back.window_info == state.window_info
    assert back.last_metrics["l0"] == 2.0 and back.last_metrics["loss"] != back.last_metrics["loss"]
    assert torch.equal(back.since_fired_F, state.since_fired_F)
    assert set(back.window_tensors) == set(state.window_tensors)
    for pid, st in state.optimizer["state"].items():
        for name, v in st.items():
            assert torch.equal(back.optimizer["state"][pid][name], v), (pid, name)
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_commit_keeps_only_the_newest_complete_step(tmp_path):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4)
    state = _state_after_one_step(sae)
    assert latest_checkpoint(tmp_path) is None
    write_checkpoint(tmp_path, sae, 2, {"step": 2}, state)
    final = write_checkpoint(tmp_path, sae, 4, {"step": 4}, state)
    assert latest_checkpoint(tmp_path) == final == tmp_path / "checkpoints" / "step-0000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004"]
    for f in CKPT_FILES:  # the top level mirrors the newest checkpoint
        assert (tmp_path / f).read_bytes() == (final / f).read_bytes(), f
    assert load_sae(tmp_path)[1] == {"step": 4}
    # A staged folder without all its files (a killed commit) is not a checkpoint.
    (tmp_path / "checkpoints" / "step-0000009").mkdir()
    assert latest_checkpoint(tmp_path) == final


def flip_tensor_byte(path) -> None:
    """Flip one byte inside the tensor data (past the header): the file still parses."""
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01
    path.write_bytes(bytes(blob))


def test_weights_record_their_sha256_and_damage_inside_the_tensor_data_is_refused(tmp_path):
    from sae_vision.activations import sha256_file

    save_sae(make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4), tmp_path, {})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["weights_sha256"] == sha256_file(tmp_path / "sae.safetensors")
    load_sae(tmp_path)
    flip_tensor_byte(tmp_path / "sae.safetensors")
    with pytest.raises(ValueError, match=r"sae.safetensors is damaged \(its sha256 .*rerun the "
                                         r"train command"):
        load_sae(tmp_path)


def test_non_finite_weights_are_refused_by_tensor_name_even_with_a_matching_sha256(tmp_path):
    from safetensors.torch import load_file, save_file

    from sae_vision.activations import sha256_file

    save_sae(make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4), tmp_path, {})
    weights = tmp_path / "sae.safetensors"
    tensors = load_file(str(weights))
    tensors["W_dec"][0, 0] = float("nan")
    save_file(tensors, str(weights))
    config = json.loads((tmp_path / "config.json").read_text())
    config["weights_sha256"] = sha256_file(weights)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tensor\\(s\\) W_dec hold NaN or Inf"):
        load_sae(tmp_path)


def test_train_state_records_its_sha256_and_a_damaged_one_is_refused(tmp_path):
    sae = make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4)
    save_train_state(tmp_path, _state_after_one_step(sae))
    flip_tensor_byte(tmp_path / "train_state.safetensors")
    with pytest.raises(ValueError, match="train_state.safetensors is damaged"):
        load_train_state(tmp_path)


def test_final_files_are_copies_and_are_restored_from_the_newest_intact_checkpoint(tmp_path):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", n_features=16, k=2), 4)
    final = write_checkpoint(tmp_path, sae, 4, {"step": 4}, _state_after_one_step(sae))
    top = tmp_path / "sae.safetensors"
    assert top.stat().st_nlink == 1 and top.stat().st_ino != (final / top.name).stat().st_ino
    assert restore_final(tmp_path) is None  # nothing to do
    clean = top.read_bytes()
    flip_tensor_byte(top)
    assert load_sae(final)[1] == {"step": 4}  # damage in place never reaches the checkpoint
    assert restore_final(tmp_path) == (final, "sae.safetensors damaged (its sha256 is not the "
                                              "recorded one)")
    assert top.read_bytes() == clean
    top.unlink()
    assert restore_final(tmp_path) == (final, "missing sae.safetensors")
    assert load_sae(tmp_path)[1] == {"step": 4}
    # With the checkpoint damaged too, nothing is restored and the error names the way out.
    top.unlink()
    flip_tensor_byte(final / "sae.safetensors")
    with pytest.raises(ValueError, match="no intact checkpoint is left"):
        restore_final(tmp_path)


def test_run_lock_refuses_a_second_writer_and_clears_a_killed_runs_leftovers(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".step-0000002.999999999.tmp").mkdir(parents=True)
    (run_dir / ".config.json.999999999.tmp").write_text("half")
    with run_lock(run_dir):
        assert not list(run_dir.rglob(".*.tmp"))
        with pytest.raises(RunLocked, match="another live run"):
            with run_lock(run_dir):
                pass
    with run_lock(run_dir):  # released on exit
        pass


def test_relu_l1_format_1_checkpoint_loads_as_the_same_map(tmp_path):
    # Format 1 encoded x rather than x - b_dec; load_sae folds b_dec W_enc into b_enc.
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="relu_l1", n_features=16), 4)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(8, 4)
    old_codes = torch.relu(x @ sae.W_enc + sae.b_enc).detach()  # what format 1 computed
    save_sae(sae, tmp_path, {})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format_version"] == 2
    config["format_version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_sae(tmp_path)
    torch.testing.assert_close(loaded.encode(x), old_codes, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sae.encode(x), old_codes)  # the conversion is not a no-op here
