"""Batches for the trainer: from a preloaded tensor (`MemoryBatches`, a pure function of (seed,
step), so a resumed run sees the same batches) or streamed from the cache's shards in bounded
memory; `make_batches` chooses between them and positions the stream at a step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from sae_vision.activations import (
    CacheError,
    canonical_device,
    load_cache_meta,
    load_vectors,
    same_device,
    stream_vectors,
)
from sae_vision.core import TrainConfig


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0] >> 1)


class MemoryBatches:
    """Endless batches from a preloaded [N, D] tensor; batch `step` depends only on (seed, step).

    The stream is the concatenation of per-epoch permutations (epoch e shuffled by a generator
    seeded from (seed, e)), cut into global batches; rank r of `world` takes rows
    [r*B/world, (r+1)*B/world) of each. Gathering indexes a preloaded tensor (no Python per row).
    """

    def __init__(self, acts_ND: torch.Tensor, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1, device: torch.device | None = None):
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of "
                             f"processes ({world})")
        self.device = canonical_device(device or "cpu")
        self.n, self.batch_size, self.seed = len(acts_ND), batch_size, seed
        self.step, self.rank, self.world = start_step, rank, world
        self.local = batch_size // world
        # Data already on the device is used where it sits (no copy, ever); else the whole
        # dataset goes onto the GPU when it fits (no host->device copy per step); else each
        # batch is gathered where the data lives and copied over, from two alternating buffers
        # (pinned when the target is a GPU, so the copies are non-blocking).
        if (not same_device(acts_ND.device, self.device) and self.device.type == "cuda"
                and _fits_on_gpu(acts_ND, self.device)):
            acts_ND = acts_ND.to(self.device)
        self.acts_ND = acts_ND
        self.copy = not same_device(acts_ND.device, self.device)
        pin = self.copy and self.device.type == "cuda" and acts_ND.device.type == "cpu"
        D = acts_ND.shape[1]
        # Gathers into reused buffers avoid a fresh allocation (and its page faults) every step;
        # on a GPU the caching allocator already does that.
        self._bufs = ([torch.empty(self.local, D, dtype=acts_ND.dtype, device=acts_ND.device,
                                   pin_memory=pin) for _ in range(2)]
                      if acts_ND.device.type == "cpu" else [])
        self._events: list = [None, None]
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            perm = torch.randperm(self.n, generator=gen)
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k >= epoch - 1}
            self._perm_cache[epoch] = perm.to(self.acts_ND.device)
        return self._perm_cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Row indices of this rank's slice of global batch `step`."""
        start = step * self.batch_size + self.rank * self.local
        parts, need, pos = [], self.local, start
        while need > 0:
            epoch, off = divmod(pos, self.n)
            take = min(need, self.n - off)
            parts.append(self._perm(epoch)[off:off + take])
            need, pos = need - take, pos + take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __iter__(self) -> MemoryBatches:
        return self

    def __next__(self) -> torch.Tensor:
        idx = self.indices(self.step)
        slot = self.step % 2
        self.step += 1
        if not self._bufs:
            batch = self.acts_ND.index_select(0, idx)
            return batch.to(self.device) if self.copy else batch
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last read this buffer is done
        torch.index_select(self.acts_ND, 0, idx, out=self._bufs[slot])
        if not self.copy:
            return self._bufs[slot]
        out = self._bufs[slot].to(self.device, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._events[slot] = torch.cuda.Event()
            self._events[slot].record()
        return out


def _fits_on_gpu(acts_ND: torch.Tensor, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return acts_ND.numel() * acts_ND.element_size() < 0.25 * free


def _prefetch(it: Iterator[torch.Tensor], depth: int = 3) -> Iterator[torch.Tensor]:
    """Run a batch iterator in a background thread so shard decoding overlaps training."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for item in it:
                if not put(item):
                    return  # the consumer went away
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
        put(done)

    thread = threading.Thread(target=worker, daemon=True, name="sae-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # A daemon thread still decoding at interpreter exit aborts the process in C++.
        thread.join(timeout=30)


def _stream_batches(cache_dir, shards, cfg: TrainConfig, rank: int, world: int, start_step: int,
                    device: torch.device) -> Iterator[torch.Tensor]:
    local = cfg.batch_size // world
    it = stream_vectors(cache_dir, shards, cfg.batch_size, cfg.shuffle_buffer, cfg.seed)
    # Slicing and pinning happen in the prefetch thread, off the training step's critical path.
    it = (b[rank * local:(rank + 1) * local] for b in it)
    if device.type == "cuda":
        it = (b.pin_memory() for b in it)
    for step, part in enumerate(_prefetch(it)):
        if step < start_step:  # a streamed resume replays the stream up to where it stopped
            continue
        yield part.to(device, non_blocking=device.type == "cuda")


def choose_loader(meta: dict, shards: list[str], cfg: TrainConfig) -> str:
    """memory or stream: `auto` loads the training shards into memory below memory_limit_gb."""
    if cfg.loader != "auto":
        return cfg.loader
    by_name = {s["name"]: s for s in meta["shards"]}
    n_bytes = sum(by_name[s]["n_vectors"] for s in shards) * int(meta["dim"]) * 4
    return "memory" if n_bytes <= cfg.memory_limit_gb * 2**30 else "stream"


def make_batches(cache_dir, train_shards: list[str], cfg: TrainConfig, d_in: int, rank: int = 0,
                 world: int = 1, start_step: int = 0, device: torch.device | None = None,
                 meta: dict | None = None) -> Iterator[torch.Tensor]:
    """Endless [batch/world, d_in] float32 batches for this rank, positioned at `start_step`."""
    if cfg.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    device = canonical_device(device or "cpu")
    meta = meta or load_cache_meta(cache_dir)
    if choose_loader(meta, train_shards, cfg) == "memory":
        acts_ND = load_vectors(cache_dir, train_shards)
        if acts_ND.shape[1] != d_in:
            raise CacheError(f"cache {cache_dir} holds {acts_ND.shape[1]}-d vectors, need {d_in}")
        return MemoryBatches(acts_ND, cfg.batch_size, cfg.seed, start_step, rank, world, device)
    return _stream_batches(cache_dir, train_shards, cfg, rank, world, start_step, device)
