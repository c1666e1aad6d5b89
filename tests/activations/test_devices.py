"""devices: one device rule for every stage, tested with CUDA's availability and count
monkeypatched (no GPU here): per-rank indexed devices, the `cuda` error, the `auto` fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from sae_vision.activations import devices as DV


@pytest.mark.parametrize("local_rank", [0, 1, 3])
@pytest.mark.parametrize("name", ["cuda", "auto"])
def test_each_torchrun_rank_gets_the_gpu_of_its_local_rank(fake_gpus, monkeypatch, name,
                                                            local_rank):
    chosen = fake_gpus(4)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    device = DV.pick_device(name)
    assert device == torch.device("cuda", local_rank)  # indexed: tensors report this form
    assert chosen == [local_rank]  # made current, so a bare "cuda" elsewhere lands there too
    assert DV.canonical_device("cuda") == device and DV.same_device("cuda", device)
    assert DV.pick_device("cuda:2") == torch.device("cuda", 2)  # an explicit index is kept


def test_a_rank_beyond_the_visible_gpus_is_an_error_naming_the_field(fake_gpus, monkeypatch):
    fake_gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"model.device=cuda.*LOCAL_RANK=2.*2 GPU"):
        DV.pick_device("cuda", "model.device")


def test_cuda_without_cuda_is_an_error_and_auto_falls_back_saying_why(fake_gpus, caplog):
    fake_gpus(0)
    with pytest.raises(ValueError, match=r"^train.device=cuda but CUDA is not available.*"
                                         r"use train.device=auto"):
        DV.pick_device("cuda", "train.device")
    with caplog.at_level(logging.INFO, logger=DV.logger.name):
        assert DV.stage_device("cache", "auto", "model.device") == torch.device("cpu")
    assert "cache: device cpu, as model.device=auto finds no GPU" in caplog.text
    assert DV.cuda_unavailable_reason() in caplog.text


def test_every_stage_logs_its_device_and_turns_tf32_on(fake_gpus, monkeypatch, caplog):
    fake_gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with caplog.at_level(logging.INFO, logger=DV.logger.name):
            assert DV.stage_device("evaluate", "auto", "model.device") == torch.device("cuda", 1)
        assert "evaluate: device cuda:1 (LOCAL_RANK=1" in caplog.text
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_devices_compare_in_the_form_a_tensor_reports(fake_gpus):
    fake_gpus(1)
    assert torch.device("cuda") != torch.device("cuda", 0)  # why the rule exists
    assert DV.same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert DV.same_device(torch.rand(1).device, torch.device("cpu", 0))
    assert not DV.same_device("cuda:0", "cuda:1") and not DV.same_device("cpu", "meta")
    assert DV.canonical_device("cpu:0") == torch.rand(1).device


def test_the_cache_stages_model_goes_to_the_gpu_of_its_rank(fake_gpus, monkeypatch, weights_dir):
    # torchrun ... stage=cache: the model of the rank with LOCAL_RANK=3 goes to cuda:3, not
    # cuda:0. Module.to only records here: there is no GPU to move to.
    from sae_vision.activations.models import load_model
    from sae_vision.core.config import ModelConfig

    fake_gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    load_model(ModelConfig(family="googlenet_bvlc", weights_dir=str(weights_dir), device="cuda"))
    assert moved == [(torch.device("cuda", 3),)]


def test_the_fallback_reason_names_a_hidden_gpu(monkeypatch):
    if not torch.backends.cuda.is_built():
        pytest.skip("this torch has no CUDA: that is the reason given")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert DV.cuda_unavailable_reason() == "CUDA_VISIBLE_DEVICES hides every GPU"
