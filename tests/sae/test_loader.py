"""loader: in-memory batches are a pure function of (seed, step); streamed ones resume too."""

from __future__ import annotations

import json

import pytest
import torch

from sae_vision.activations.shards import METADATA, split_shards, write_cache
from sae_vision.core.config import TrainConfig
from sae_vision.sae.loader import MemoryBatches, choose_loader, make_batches

PLANTED_DIM = 8


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A real cache of 5 shards of 1,000 random 8-d vectors; returns (cache_dir, None)."""
    cache_dir = tmp_path_factory.mktemp("loader") / "cache"
    g = torch.Generator().manual_seed(0)
    chunks = []
    for i in range(10):
        acts = torch.rand(500, PLANTED_DIM, generator=g)
        pos = torch.stack([torch.arange(500) // 16 + i * 32, torch.zeros(500, dtype=torch.long),
                           torch.arange(500) % 16], 1).numpy()
        chunks.append((acts, pos, {}))
    write_cache(cache_dir, chunks, {"layer": "conv2d0", "dim": PLANTED_DIM}, chunks_per_shard=2)
    return cache_dir, None


def test_memory_batches_are_a_pure_function_of_seed_and_step_and_ranks_split_them():
    acts_ND = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    full = MemoryBatches(acts_ND, 64, seed=7)
    seq = [next(full).clone() for _ in range(40)]  # 40 x 64 rows: spans several epochs
    resumed = MemoryBatches(acts_ND, 64, seed=7, start_step=33)
    assert torch.equal(next(resumed), seq[33])
    # Each epoch is a permutation: within the first 1000 rows every vector appears once.
    first_epoch = torch.cat(seq)[:1000, 0]
    assert torch.equal(first_epoch.sort().values, torch.arange(1000, dtype=torch.float32))
    ranks = [next(MemoryBatches(acts_ND, 64, 7, start_step=5, rank=r, world=2))
             for r in range(2)]
    assert torch.equal(torch.cat(ranks), seq[5])
    other_seed = MemoryBatches(acts_ND, 64, seed=8)
    assert not torch.equal(next(other_seed), seq[0])


def test_stream_loader_resumes_by_skipping_to_the_same_batches(planted):
    cache_dir, _ = planted
    meta = json.loads((cache_dir / METADATA).read_text())
    shards, _ = split_shards(meta, 0.2)
    cfg = TrainConfig(batch_size=500, loader="stream", shuffle_buffer=3000, seed=3)
    it = make_batches(cache_dir, shards, cfg, PLANTED_DIM)
    seq = [next(it) for _ in range(6)]
    later = make_batches(cache_dir, shards, cfg, PLANTED_DIM, start_step=4)
    assert torch.equal(next(later), seq[4])
    halves = [next(make_batches(cache_dir, shards, cfg, PLANTED_DIM, rank=r, world=2,
                                      start_step=1)) for r in range(2)]
    assert torch.equal(torch.cat(halves), seq[1])
    assert choose_loader(meta, shards, TrainConfig(loader="auto")) == "memory"
    assert choose_loader(meta, shards, TrainConfig(memory_limit_gb=1e-4)) == "stream"


COPIES = ("_to_copy", "copy_", "_copy_from")


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu", 0), "meta"])
def test_memory_batches_never_copy_data_that_already_sits_on_their_device(device, count_ops):
    # A device named in another form than the data's (cpu:0 against a tensor's cpu, as cuda
    # against cuda:0 on a GPU) is still the data's device: no copy of the data, no per-step
    # copy of the batch, and no gather into a buffer on another device.
    acts_ND = torch.rand(64, 4).to(torch.device(device).type)
    batches = MemoryBatches(acts_ND, 16, seed=0, device=torch.device(device))
    assert batches.acts_ND is acts_ND
    for step in range(5):
        with count_ops() as ops:
            batch = next(batches)
        assert not any(ops.float_counts[c] for c in COPIES), ops.float_counts
        assert batch.device == acts_ND.device and batch.shape == (16, 4)
        if acts_ND.device.type == "cpu":
            assert torch.equal(batch, acts_ND[batches.indices(step)])


def test_memory_batches_copy_each_batch_to_another_device():
    # Host data for a `meta` trainer stands in for host data and a GPU too small to hold it.
    acts_ND = torch.rand(64, 4)
    batches = MemoryBatches(acts_ND, 16, seed=0, device=torch.device("meta"))
    assert batches.copy and batches.acts_ND.device.type == "cpu"
    assert all(next(batches).device.type == "meta" for _ in range(3))


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_both_loaders_deliver_batches_on_the_trainers_device(planted, loader):
    # `meta` stands in for a GPU: every batch must arrive there, whichever loader reads the cache.
    cache_dir, _ = planted
    meta = json.loads((cache_dir / METADATA).read_text())
    shards, _ = split_shards(meta, 0.2)
    cfg = TrainConfig(batch_size=500, loader=loader, shuffle_buffer=3000, seed=3)
    it = make_batches(cache_dir, shards, cfg, PLANTED_DIM, device=torch.device("meta"))
    assert all(next(it).device.type == "meta" for _ in range(3))
