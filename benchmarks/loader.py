"""Benchmark 4: how many vectors/s the shard loaders deliver, against what the trainer eats."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import sync
from benchmarks.training import TrainData


def stream_rate(cache_dir: Path, shards: list[str], batch_size: int, shuffle_buffer: int,
                min_vectors: int, max_seconds: float) -> dict:
    """Vectors/s of shards.stream_vectors (decode, shuffle buffer, batching), fill included."""
    from sae_vision.activations.shards import stream_vectors

    it = stream_vectors(cache_dir, shards, batch_size, shuffle_buffer=shuffle_buffer, seed=0)
    n = 0
    t0 = time.perf_counter()
    try:
        for batch in it:
            n += len(batch)
            elapsed = time.perf_counter() - t0
            if n >= min_vectors or elapsed > max_seconds:
                break
    finally:
        it.close()
    elapsed = time.perf_counter() - t0
    return {"vectors": n, "seconds": elapsed, "vectors_per_s": n / elapsed,
            "shuffle_buffer": shuffle_buffer, "batch_size": batch_size}


def memory_rate(data: TrainData, batch_size: int, device: str, n_batches: int) -> dict:
    """Vectors/s of the trainer's in-memory loader (train.MemoryBatches: permuted gathers)."""
    from sae_vision.activations import pick_device
    from sae_vision.sae.loader import MemoryBatches

    batches = MemoryBatches(data.train_ND, batch_size, seed=0, device=pick_device(device))
    next(batches)  # first permutation built outside the timing, as in a long run
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    sync(device)  # the gathers queued on a GPU have finished
    elapsed = time.perf_counter() - t0
    return {"vectors": n_batches * batch_size, "seconds": elapsed,
            "vectors_per_s": n_batches * batch_size / elapsed, "batch_size": batch_size}


def verify_cost(cache_dir: Path, shards: list[str], trainer_samples_per_s: float) -> dict:
    """Seconds to sha256 the shards (the check on first open) against reading them once
    (decode, no shuffle) and against training one epoch over them."""
    from sae_vision.activations.shards import load_cache_meta, read_shard, sha256_file

    by_name = {s["name"]: s for s in load_cache_meta(cache_dir)["shards"]}
    for name in shards:  # warm the page cache, so both timings read from memory alike
        sha256_file(cache_dir / name)
    t0 = time.perf_counter()
    for name in shards:
        assert sha256_file(cache_dir / name) == by_name[name]["sha256"], name
    verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = sum(len(rec["acts.npy"]) for name in shards for rec in read_shard(cache_dir / name))
    read_s = time.perf_counter() - t0
    train_s = n / trainer_samples_per_s
    n_bytes = sum(by_name[s]["bytes"] for s in shards)
    return {"shards": len(shards), "bytes": n_bytes, "vectors": n, "verify_s": verify_s,
            "read_epoch_s": read_s, "train_epoch_s": train_s,
            "verify_mb_per_s": n_bytes / 2**20 / verify_s,
            "verify_vs_read_epoch": verify_s / read_s, "verify_vs_train_epoch": verify_s / train_s}


def bench_loader(cache_dir: Path, meta: dict, data: TrainData, batch_size: int, device: str,
                 trainer_samples_per_s: float, max_seconds: float, progress,
                 shuffle_buffer: int | None = None) -> dict:
    """Stream (default shuffle buffer) and in-memory loaders vs our TopK trainer's consumption."""
    from sae_vision.activations.shards import split_shards
    from sae_vision.core.config import TrainConfig

    train_shards, _ = split_shards(meta, 0.1)
    n_train = len(data.train_ND)
    buffer = shuffle_buffer or TrainConfig().shuffle_buffer
    progress(f"loader: stream_vectors, shuffle buffer {buffer}")
    # The buffer fill plus two passes' worth, so the one-off fill is partly amortised (it is
    # included: a long run would see a slightly higher rate).
    stream = stream_rate(cache_dir, train_shards, batch_size, buffer, 2 * n_train + buffer,
                         max_seconds)
    progress("loader: in-memory batches")
    memory = memory_rate(data, batch_size, device, n_batches=max(8, 2 * n_train // batch_size))
    load = {"vectors": n_train, "seconds": data.load_s,
            "vectors_per_s": n_train / max(data.load_s, 1e-9)}
    progress("loader: sha256 of every training shard vs reading and training an epoch")
    verify = verify_cost(Path(cache_dir), train_shards, trainer_samples_per_s)
    return {"stream": stream, "memory": memory, "load_vectors": load, "verify": verify,
            "trainer_samples_per_s": trainer_samples_per_s,
            "stream_headroom": stream["vectors_per_s"] / trainer_samples_per_s,
            "memory_headroom": memory["vectors_per_s"] / trainer_samples_per_s,
            "load_headroom": load["vectors_per_s"] / trainer_samples_per_s}
