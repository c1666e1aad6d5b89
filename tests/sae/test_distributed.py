"""distributed: the trainer's device comes from the one device rule (cuda:LOCAL_RANK)."""

from __future__ import annotations

import pytest
import torch

from sae_vision.sae import distributed


@pytest.mark.parametrize("want", ["cuda", "auto"])
def test_the_trainer_takes_the_indexed_gpu_of_its_local_rank(fake_gpus, monkeypatch, want):
    fake_gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group(want) as (device, rank, world):
        assert (device, rank, world) == (torch.device("cuda", 1), 0, 1)


def test_train_device_cuda_without_cuda_is_a_value_error(fake_gpus):
    fake_gpus(0)
    with pytest.raises(ValueError, match="train.device=cuda but CUDA is not available"):
        with distributed.process_group("cuda"):
            pass
