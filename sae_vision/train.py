"""Train stage: fit a sparse autoencoder on a cached layer; resumable, sweepable, DDP-aware.

`run(cfg)` holds the side effects: it finds the cache, builds the SAE, owns the run folder (lock,
checkpoints, metrics JSON) and hands a `log` callable and a checkpoint callback to `train_loop`,
which takes built objects and returns metrics. Batches are a pure function of (seed, step) when the
cache fits in memory, so a killed run resumes to the same final loss as an uninterrupted one.

Run folder `artifacts/sae/<run_name>/`:
    sae.safetensors, config.json          latest checkpoint (what evaluate/report load)
    train_state.safetensors/.json         optimiser + trainer state of that checkpoint
    checkpoints/step-NNNNNNN/             the same four files, committed by one directory rename
    train_log.jsonl                       every logged scalar
    train_metrics.json                    final metrics; its presence means "finished"
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import queue
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from sae_vision import io, paths
from sae_vision.config import (
    SAEConfig,
    TrainConfig,
    check_layer,
    content_hash,
    to_plain,
    warmup_steps_of,
)
from sae_vision.progress import Progress
from sae_vision.shards import (
    CacheError,
    load_cache_meta,
    load_vectors,
    split_shards,
    stream_vectors,
)

LogFn = Callable[[dict, int], None]
CheckpointFn = Callable[[int, dict], None]
StepFn = Callable[[int], None]

logger = logging.getLogger(__name__)

# What the progress bar/line shows of the logged metrics, under the names a reader expects.
LIVE_METRICS = {"samples_per_s": "samples/s", "loss": "loss", "mse": "mse", "fvu": "fvu",
                "l0": "l0", "dead_frac": "dead", "lr": "lr"}

STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainResult:
    """What the train stage produced."""

    run_dir: Path
    checkpoint_path: Path
    metrics: dict


class TrainingDiverged(RuntimeError):
    """A batch or the loss went NaN/Inf; training stopped before saving anything from it."""


class RunLocked(RuntimeError):
    """Another live process is writing the same run folder."""


# --------------------------------------------------------------------------------------------
# Schedules (pure functions of the step, so a resumed run needs no scheduler state)


def lr_factor(step: int, n_steps: int, warmup_steps: int, decay_frac: float) -> float:
    """Learning-rate multiplier at 0-based `step`: linear warm-up, flat, linear decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    n_decay = int(round(n_steps * decay_frac))
    if n_decay > 0 and step >= n_steps - n_decay:
        return max(n_steps - step, 0) / n_decay
    return 1.0


def l1_factor(step: int, n_steps: int, warmup_frac: float) -> float:
    """Sparsity-coefficient multiplier at 0-based `step`: linear ramp over warmup_frac of training."""
    n_warm = int(round(n_steps * warmup_frac))
    return 1.0 if n_warm <= 0 else min((step + 1) / n_warm, 1.0)


# --------------------------------------------------------------------------------------------
# Distributed


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: str) -> tuple[torch.device, bool]:
    """Join the torchrun process group when RANK/WORLD_SIZE say so; returns (device, created)."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return torch.device("cuda" if want_cuda else "cpu"), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dist.is_initialized():
        return dev, False
    dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return dev, True


# --------------------------------------------------------------------------------------------
# Data


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
        self.device = torch.device(device or "cpu")
        self.n, self.batch_size, self.seed = len(acts_ND), batch_size, seed
        self.step, self.rank, self.world = start_step, rank, world
        self.local = batch_size // world
        on_gpu = self.device.type == "cuda" and _fits_on_gpu(acts_ND, self.device)
        # Whole dataset on the GPU when it fits (no host->device copy per step); else pinned host
        # memory with non-blocking copies from two alternating buffers.
        self.acts_ND = acts_ND.to(self.device) if on_gpu else acts_ND
        self.copy = self.device.type == "cuda" and not on_gpu
        pin = self.copy
        D = acts_ND.shape[1]
        self._bufs = [torch.empty(self.local, D, pin_memory=pin) for _ in range(2)]
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
        if self.acts_ND.device == self.device and not self.copy:
            if self.device.type == "cuda":
                return self.acts_ND.index_select(0, idx)
            # Reusing two buffers avoids a fresh allocation (and its page faults) every step.
            return torch.index_select(self.acts_ND, 0, idx, out=self._bufs[slot])
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last read this buffer is done
        torch.index_select(self.acts_ND, 0, idx, out=self._bufs[slot])
        out = self._bufs[slot].to(self.device, non_blocking=True)
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
        yield part.to(device, non_blocking=True) if device.type == "cuda" else part


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
    device = torch.device(device or "cpu")
    meta = meta or load_cache_meta(cache_dir)
    if choose_loader(meta, train_shards, cfg) == "memory":
        acts_ND = load_vectors(cache_dir, train_shards)
        if acts_ND.shape[1] != d_in:
            raise CacheError(f"cache {cache_dir} holds {acts_ND.shape[1]}-d vectors, need {d_in}")
        return MemoryBatches(acts_ND, cfg.batch_size, cfg.seed, start_step, rank, world, device)
    return _stream_batches(cache_dir, train_shards, cfg, rank, world, start_step, device)


# --------------------------------------------------------------------------------------------
# Training loop


def _make_adam(params: list, lr: float, device: torch.device):
    # Fused Adam is one kernel per step on CUDA and ~3x faster than foreach on CPU here.
    for kw in ({"fused": True}, {"foreach": True}, {}):
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), **kw)
        except (RuntimeError, TypeError, ValueError):
            continue
    raise RuntimeError("could not build Adam")


def _match_param_layout(opt: torch.optim.Optimizer) -> None:
    """Give loaded moment tensors their parameter's strides.

    Files hold contiguous tensors, but W_enc is a transposed view; the fused/foreach Adam kernels
    walk parameter and moments as flat memory, so mismatched strides would silently scramble
    the update.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            for name, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][name] = torch.empty_like(p).copy_(v)


def _batch_stats(x_BD: torch.Tensor) -> torch.Tensor:
    """[n_nonfinite, min, max, mean] of a batch, the extremes over its finite values."""
    x = x_BD.detach().float()
    finite = torch.isfinite(x)
    n_bad = (~finite).sum().float()
    n_ok = finite.sum().clamp_min(1).float()
    big = torch.finfo(torch.float32).max
    lo = torch.where(finite, x, big).amin()
    hi = torch.where(finite, x, -big).amax()
    mean = torch.where(finite, x, 0.0).sum() / n_ok
    return torch.stack([n_bad, lo, hi, mean])


def _diverged(step: int, n_steps: int, loss: float, stats: torch.Tensor | None,
              batch_shape) -> TrainingDiverged:
    if stats is None:
        desc = "the batch statistics are not available"
    else:
        n_bad, lo, hi, mean = (float(v) for v in stats)
        count = int(np.prod(batch_shape))
        desc = (f"the batch {list(batch_shape)} holds {int(n_bad)} non-finite value(s) of {count}; "
                f"its finite values span min={lo:.4g} max={hi:.4g} mean={mean:.4g}")
    cause = ("the activation cache holds NaN/Inf: rebuild it with stage=cache"
             if stats is not None and float(stats[0]) > 0 else
             "the optimisation diverged: lower train.lr or raise train.warmup_steps")
    return TrainingDiverged(f"non-finite loss ({loss}) at step {step} of {n_steps}: {desc}; "
                            f"{cause}. Training stopped without saving this step.")


class _Window:
    """Per-log-interval accumulators, kept on the device so steps never wait for the host."""

    def __init__(self, n_features: int, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.fire_F = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.n_steps = 0
        self.n_vectors = 0

    def add(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.grad_norm += grad_norm.detach().float()
        self.n_steps += 1

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"window.loss.{k}": v.cpu() for k, v in self.sums.items()}
        out["window.fire_F"] = self.fire_F.cpu()
        out["window.grad_norm"] = self.grad_norm.cpu()
        return out

    def load(self, tensors: dict[str, torch.Tensor], info: dict, device: torch.device) -> None:
        self.sums = {k[len("window.loss."):]: v.to(device) for k, v in tensors.items()
                     if k.startswith("window.loss.")}
        self.fire_F = tensors["window.fire_F"].to(device)
        self.grad_norm = tensors["window.grad_norm"].to(device)
        self.n_steps, self.n_vectors = int(info["n_steps"]), int(info["n_vectors"])


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if world_info()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def train_loop(sae, batches: Iterator[torch.Tensor], cfg: TrainConfig, sae_cfg: SAEConfig,
               log: LogFn, on_checkpoint: CheckpointFn | None = None,
               state: dict | None = None, on_step: StepFn | None = None) -> dict:
    """Train `sae` for cfg.n_steps on `batches`; logs via `log(metrics, step)`, returns metrics.

    `state` (from a checkpoint's train state) resumes exactly; `on_checkpoint(step, state)` is
    called every cfg.ckpt_every steps and at the end with everything needed to resume. Under an
    initialised process group the SAE is wrapped in DDP, cfg.batch_size is the global batch,
    every counter and metric is reduced, and only rank 0 calls `log`. `log` gets floats plus
    'density_log10' (numpy [F], log10 firing frequency over the interval). `on_step(done)` is
    called after every step (progress display); it must not read tensors.
    """
    device = next(sae.parameters()).device
    rank, world = world_info()
    arch, n_steps, F = sae_cfg.arch, int(cfg.n_steps), int(sae.n_features)
    global_batch = int(cfg.batch_size)
    model = sae
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(sae, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(model) if cfg.compile else model
    groups = sae.param_groups() if hasattr(sae, "param_groups") else [
        {"params": [p for p in sae.parameters() if p.requires_grad], "lr_mult": 1.0}]
    params = [p for g in groups for p in g["params"]]
    opt = _make_adam(groups, cfg.lr, device)
    warmup_steps = warmup_steps_of(cfg)
    use_amp = bool(cfg.autocast) and device.type == "cuda"
    lazy_check = device.type == "cuda"  # on CPU a per-step finiteness check costs nothing

    # Vectors seen since each feature last fired: a feature is dead once this reaches the window.
    since_fired_F = torch.zeros(F, dtype=torch.int64, device=device)
    window = _Window(F, device)
    start, total_vectors, train_time = 0, 0, 0.0
    if state:
        start = int(state["step"])
        opt.load_state_dict(state["optimizer"])
        _match_param_layout(opt)
        since_fired_F = state["since_fired_F"].to(device=device, dtype=torch.int64)
        window.load(state["window_tensors"], state["window_info"], device)
        total_vectors = int(state.get("total_vectors", start * global_batch))
        train_time = float(state.get("train_time", 0.0))

    last_metrics: dict[str, Any] = dict(state.get("last_metrics", {})) if state else {}
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
    resample_every = max(1, math.ceil(cfg.dead_window / global_batch))

    def check_pending(x_BD: torch.Tensor | None = None) -> None:
        if not pending:
            return
        flags = torch.stack([f for _, f, _ in pending]).cpu()
        bad = torch.nonzero(flags[:, 0] > 0)
        if len(bad):
            i = int(bad[0, 0])
            s, f, stats = pending[i]
            if stats is None and x_BD is not None:
                stats = _batch_stats(x_BD)
            raise _diverged(s, n_steps, float(f[1]), stats.cpu() if stats is not None else None,
                            (global_batch // world, sae.d_in))
        pending.clear()

    def state_now(done: int) -> dict:
        return {
            "format": STATE_FORMAT,
            "step": done,
            "seed": int(cfg.seed),  # data order and resampling draws derive from (seed, step)
            "optimizer": opt.state_dict(),
            "since_fired_F": since_fired_F.detach().cpu(),
            "window_tensors": window.to_tensors(),
            "window_info": {"n_steps": window.n_steps, "n_vectors": window.n_vectors},
            "total_vectors": total_vectors,
            "train_time": train_time,
            "last_metrics": last_metrics,
        }

    sae.train()
    t_window, vec_window = time.perf_counter(), 0
    ckpt_time = 0.0
    t_run = time.perf_counter()
    step = start
    for step in range(start, n_steps):
        try:
            x_BD = next(batches)
        except StopIteration:
            raise RuntimeError(f"the batch iterator ran out at step {step}") from None
        for g in opt.param_groups:
            g["lr"] = (cfg.lr * g.get("lr_mult", 1.0)
                       * lr_factor(step, n_steps, warmup_steps, cfg.decay_frac))
        sae.set_l1_scale(l1_factor(step, n_steps, sae_cfg.l1_warmup_frac))
        dead_F = since_fired_F >= cfg.dead_window  # drives AuxK in the TopK family

        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = forward(x_BD, dead_mask=dead_F)
        loss = out.losses["loss"]
        loss_f = loss.detach().float()
        bad = (~torch.isfinite(loss_f)).float()
        fired_F = out.feature_counts().double()  # read from sparse codes: no dense [B, F] pass
        if world > 1:
            # One collective per step carries the firing counts and the divergence flag, so every
            # rank sees the same dead mask and stops at the same step.
            packed = _all_reduce(torch.cat([fired_F, bad.double().reshape(1)]))
            fired_F, bad = packed[:F], packed[F].float()
        pending.append((step + 1, torch.stack([bad, loss_f]),
                        _batch_stats(x_BD) if lazy_check else None))
        if not lazy_check:
            check_pending(x_BD)

        opt.zero_grad(set_to_none=True)
        loss.backward()  # decoder-parallel gradient components are projected out inside sae
        if cfg.grad_clip and cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        else:
            grad_norm = torch.zeros((), device=device)
        opt.step()
        sae.normalize_decoder_()  # unit-norm rows for the constrained archs; no-op for relu_l1
        if l1_factor(step, n_steps, sae_cfg.l1_warmup_frac) >= 1.0 and hasattr(
                sae, "update_l0_control_"):
            # After the λ warm-up only, so the controller does not wind up against the ramp.
            sae.update_l0_control_(fired_F.sum() / global_batch)

        since_fired_F = torch.where(fired_F > 0, 0, since_fired_F + global_batch)
        window.fire_F += fired_F
        window.add(out.losses, grad_norm)
        window.n_vectors += global_batch
        vec_window += global_batch
        total_vectors += global_batch
        done = step + 1

        if arch == "relu_l1" and sae_cfg.resample_dead and done % resample_every == 0 \
                and done <= n_steps // 2:
            n_res = _resample(sae, opt, x_BD, since_fired_F >= cfg.dead_window,
                              seed=cfg.seed * 1_000_003 + done)
            if n_res:
                since_fired_F[since_fired_F >= cfg.dead_window] = 0
                last_metrics["n_resampled"] = last_metrics.get("n_resampled", 0) + n_res

        if done % cfg.log_every == 0 or done == n_steps:
            check_pending()
            metrics = _window_metrics(window, out, x_BD, since_fired_F, cfg, world)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t_window - ckpt_time
            metrics["samples_per_s"] = vec_window / max(elapsed, 1e-9)
            metrics["lr"] = opt.param_groups[0]["lr"]
            metrics["l1_factor"] = l1_factor(step, n_steps, sae_cfg.l1_warmup_frac)
            if hasattr(sae, "l1_log_ctrl"):
                metrics["l1_coeff_now"] = float(sae.l1_coeff_now)
            if hasattr(sae, "log_threshold"):
                metrics["jump_threshold_median"] = float(sae.jump_threshold.detach().median())
            metrics["vectors"] = total_vectors
            train_time += elapsed
            t_window, vec_window, ckpt_time = time.perf_counter(), 0, 0.0
            density = metrics.pop("density_log10")
            last_metrics.update(metrics)
            if rank == 0:
                log({**metrics, "density_log10": density}, done)
            window = _Window(F, device)

        if on_checkpoint is not None and (done % cfg.ckpt_every == 0 or done == n_steps):
            check_pending()
            t0 = time.perf_counter()
            on_checkpoint(done, state_now(done))
            ckpt_time += time.perf_counter() - t0
        if on_step is not None:
            on_step(done)

    check_pending()
    step = n_steps
    result = {k: v for k, v in last_metrics.items()}
    result.update({
        "final_loss": float(last_metrics.get("loss", float("nan"))),
        "n_steps": n_steps,
        "n_vectors": total_vectors,
        "train_time_s": train_time,
        "samples_per_s_mean": total_vectors / max(train_time, 1e-9) if train_time else None,
        "wall_s_this_session": time.perf_counter() - t_run,
    })
    return result


def _window_metrics(window: _Window, out, x_BD: torch.Tensor, since_fired_F: torch.Tensor,
                    cfg: TrainConfig, world: int) -> dict:
    """Reduce the interval's accumulators (across ranks too) into plain numbers."""
    names = sorted(window.sums)
    x = x_BD.detach().float()
    x_hat = out.x_hat.detach().float()
    # FVU of this step's global batch, against the global batch mean.
    n_local = torch.tensor([float(len(x))], device=x.device)
    sum_D = x.sum(0)
    sq_err = (x - x_hat).pow(2).sum()
    packed = torch.cat([torch.stack([window.sums[k] for k in names]) if names else
                        torch.zeros(0, device=x.device), window.grad_norm.reshape(1),
                        sq_err.reshape(1), n_local, sum_D])
    packed = _all_reduce(packed)
    n_names = len(names)
    loss_sums = packed[:n_names] / (window.n_steps * world)
    grad_norm = float(packed[n_names]) / (window.n_steps * world)
    sq_err_total = packed[n_names + 1]
    n_total = packed[n_names + 2]
    mean_D = packed[n_names + 3:] / n_total
    var_total = _all_reduce((x - mean_D).pow(2).sum().reshape(1))[0]
    metrics = {k: float(v) for k, v in zip(names, loss_sums)}
    density_F = (window.fire_F / max(window.n_vectors, 1)).cpu()
    metrics.update({
        "fvu": float(sq_err_total / var_total.clamp_min(1e-30)),
        "l0": float(window.fire_F.sum()) / max(window.n_vectors, 1),
        "dead_frac": float((since_fired_F >= cfg.dead_window).float().mean()),
        "grad_norm": grad_norm,
        "density_log10": np.log10(density_F.numpy() + 1e-10),
    })
    return metrics


# --------------------------------------------------------------------------------------------
# Dead-feature resampling (relu_l1 option)


def _resample(sae, opt, x_BD: torch.Tensor, dead_F: torch.Tensor, seed: int) -> int:
    """sae.resample_dead with a (seed, step) generator, kept identical on every DDP rank."""
    from sae_vision.sae import resample_dead

    gen = torch.Generator(device=x_BD.device).manual_seed(seed)
    idx = resample_dead(sae, dead_F, x_BD, optimizer=opt, generator=gen)
    if world_info()[1] > 1 and idx.numel():
        # Ranks drew from their own batches; rank 0's choice wins. W_enc is a transposed view of
        # [F, D] storage, so broadcast that contiguous storage.
        for t in (sae.W_dec.data, sae.W_enc.data.t(), sae.b_enc.data):
            dist.broadcast(t, src=0)
    return int(idx.numel())


# --------------------------------------------------------------------------------------------
# Train-state files (safetensors + JSON; never pickle)


def save_train_state(dir_path: Path, state: dict) -> None:
    """Write train_state.safetensors + train_state.json (atomic: temp names, then rename)."""
    tensors: dict[str, torch.Tensor] = {"since_fired_F": state["since_fired_F"].contiguous()}
    tensors.update({k: v.contiguous() for k, v in state["window_tensors"].items()})
    opt_sd = state["optimizer"]
    opt_state_keys: dict[str, list[str]] = {}
    for pid, st in opt_sd["state"].items():
        opt_state_keys[str(pid)] = []
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{name}"] = v.detach().cpu().contiguous()
                opt_state_keys[str(pid)].append(name)
    info = {
        "format": state["format"],
        "step": state["step"],
        "total_vectors": state["total_vectors"],
        "train_time": state["train_time"],
        "window_info": state["window_info"],
        "last_metrics": state["last_metrics"],
        "optimizer": {"param_groups": opt_sd["param_groups"], "state_keys": opt_state_keys},
        "rng": {"torch_seed": torch.initial_seed()},
    }
    for extra in ("run", "seed"):
        if extra in state:
            info[extra] = state[extra]
    with io.atomic_write(dir_path / "train_state.safetensors") as tmp:
        save_file(tensors, str(tmp))
    io.write_json(dir_path / "train_state.json", info, strict=False)


def load_train_state(dir_path: Path) -> dict:
    """Inverse of save_train_state."""
    from sae_vision.sae import load_checkpoint_file

    tensors = load_checkpoint_file(dir_path / "train_state.safetensors")
    info = json.loads((dir_path / "train_state.json").read_text())
    if info.get("format") != STATE_FORMAT:
        raise RuntimeError(f"{dir_path}/train_state.json has format {info.get('format')}, "
                           f"this trainer reads {STATE_FORMAT}")
    opt_state = {
        int(pid): {name: tensors[f"optimizer.{pid}.{name}"] for name in names}
        for pid, names in info["optimizer"]["state_keys"].items()
    }
    return {
        "format": info["format"],
        "step": info["step"],
        "optimizer": {"state": opt_state, "param_groups": info["optimizer"]["param_groups"]},
        "since_fired_F": tensors["since_fired_F"],
        "window_tensors": {k: v for k, v in tensors.items() if k.startswith("window.")},
        "window_info": info["window_info"],
        "total_vectors": info["total_vectors"],
        "train_time": info["train_time"],
        "last_metrics": info["last_metrics"],
    }


# --------------------------------------------------------------------------------------------
# Run folder: lock, checkpoints, resume


CKPT_FILES = ("sae.safetensors", "config.json", "train_state.safetensors", "train_state.json")


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder; a second live writer fails fast.

    The lock is io's flock, which the kernel releases when the holder dies (even by SIGKILL),
    so a killed run never leaves a stale lock behind.
    """
    lock_path = run_dir / ".lock"
    lock = io.try_lock(lock_path)
    if lock is None:
        raise RunLocked(f"run folder {run_dir} is being written by another live run "
                        f"({io.holder_of(lock_path) or 'unknown process'}); wait for it to finish "
                        "(this command will then return its result) or set train.run_name")
    try:
        # We hold the lock, so temporaries and staged checkpoints here belong to a killed run.
        for folder in (run_dir, run_dir / "checkpoints"):
            io.drop_stale_tmp(folder, any_pid=True)
        yield
    finally:
        lock.release()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest committed checkpoints/step-N folder (committed = renamed into place, so complete)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return None
    done = [p for p in root.glob("step-*") if p.is_dir() and all((p / f).exists() for f in CKPT_FILES)]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def write_checkpoint(run_dir: Path, sae, step: int, meta: dict, train_state: dict) -> Path:
    """Commit a checkpoint: write into a staging folder, rename it to checkpoints/step-N, then
    point the run folder's top-level files at it and drop older checkpoints."""
    from sae_vision.sae import save_sae

    root = run_dir / "checkpoints"
    final = root / f"step-{step:07d}"
    # Staged whole under a temporary name, fsynced, then renamed: a step-N folder is complete.
    with io.atomic_write(final) as staging:
        staging.mkdir()
        save_sae(sae, staging, meta)
        save_train_state(staging, train_state)
    # The top level follows; sae.safetensors first so a reader never pairs a new config.json
    # with older weights.
    for f in CKPT_FILES:
        io.copy_file(final / f, run_dir / f, link=True)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# The stage


def _cache_command(cfg) -> str:
    """The `python run.py stage=cache ...` command that builds the cache this run needs."""
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
        keep = [o for o in task if not o.split("=")[0].lstrip("+~").startswith(
            ("stage", "sae", "train", "eval", "report", "curves", "hydra"))]
        return " ".join(["python run.py stage=cache", *keep])
    parts = ["python run.py stage=cache", f"layer={cfg.layer.name}"]
    if cfg.model.family != "googlenet_bvlc":
        parts.append(f"model={cfg.model.family}")
    if cfg.data.name != "demo":
        parts.append(f"data={cfg.data.name}")
    for key in ("root", "urls"):
        if getattr(cfg.data, key, None):
            parts.append(f"data.{key}={getattr(cfg.data, key)}")
    if cfg.cache.dir:
        parts.append(f"cache.dir={cfg.cache.dir}")
    if getattr(cfg.paths, "root", "artifacts") != "artifacts":
        parts.append(f"paths.root={cfg.paths.root}")
    return " ".join(parts)


def settings_hash(cfg, cache_key: str) -> str:
    """Hash of the settings that define a training run (what a resume must agree on)."""
    return content_hash({"sae": {**to_plain(cfg.sae), "run": None}, "train": to_plain(cfg.train),
                         "cache": cache_key})


def _open_cache(cfg) -> tuple[Path, dict, int]:
    cache = paths.cache_dir(cfg)
    # layer.dim is checked against the layer name by check_config; timm layers may leave it 0.
    d_expect = int(cfg.layer.dim) or check_layer(cfg.layer.name, cfg.model.family)
    d_expect = d_expect if d_expect > 0 else None
    if not (cache / "metadata.json").exists():
        try:
            load_cache_meta(cache)
        except CacheError as e:
            raise CacheError(f"{e}\nBuild the cache for layer {cfg.layer.name!r} first:\n    "
                             f"{_cache_command(cfg)}") from None
    meta = load_cache_meta(cache, expect={"layer": cfg.layer.name, "dim": d_expect})
    stats = np.asarray([*meta["mean"], meta["mean_norm"]], dtype=np.float64)
    if not np.isfinite(stats).all() or float(meta["mean_norm"]) <= 0:
        raise CacheError(f"cache {cache} has non-finite or zero statistics (mean_norm="
                         f"{meta['mean_norm']}): its activations hold NaN/Inf (e.g. a float16 "
                         "overflow); rebuild it with cache.dtype=float32 or bfloat16")
    return cache, meta, int(meta["dim"])


def _resolve_device(cfg) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto")
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available())
                        else "cpu")


def _histogram_log(tracker) -> LogFn:
    def log(metrics: dict, step: int) -> None:
        if tracker is None or not getattr(tracker, "enabled", False):
            return
        out = dict(metrics)
        hist = out.pop("density_log10", None)
        if hist is not None:
            import wandb  # the stage, not the loop, knows about W&B objects

            out["density_log10"] = wandb.Histogram(np.asarray(hist))
        tracker.log(out, step=step)
    return log


def run(cfg, tracker=None) -> TrainResult:
    """Train (or resume, or reuse) the SAE this config describes; returns paths and metrics."""
    from sae_vision.sae import load_sae, make_sae

    tracker_log = _histogram_log(tracker)
    cache, meta, d_in = _open_cache(cfg)
    train_shards, holdout_shards = split_shards(meta, cfg.train.holdout_frac)
    name = paths.run_name(cfg, d_in)
    run_dir = paths.sae_root(cfg) / name
    s_hash = settings_hash(cfg, meta.get("key", str(cache)))

    finished = _finished_result(run_dir, s_hash, int(cfg.train.n_steps))
    if finished is not None:
        logger.info(f"train: reusing finished run {run_dir}")
        _print_paths(finished)
        _print_summary(cfg, finished, None)
        return finished

    device, created_pg = setup_distributed(cfg.train.device)
    if not created_pg and world_info()[1] == 1:
        device = _resolve_device(cfg)
    rank, world = world_info()
    try:
        with contextlib.ExitStack() as stack:
            locked: Exception | None = None
            if rank == 0:  # rank 0 alone writes the run folder, so it alone holds the lock
                try:
                    stack.enter_context(run_lock(run_dir))
                except RunLocked as e:
                    locked = e
            if world > 1:  # every rank learns whether rank 0 got the lock, so none waits forever
                flag = torch.tensor([float(locked is not None)], device=device)
                dist.all_reduce(flag)
                if flag.item() and locked is None:
                    locked = RunLocked(f"run folder {run_dir} is locked by another live run")
            if locked is not None:
                raise locked
            result = _train(cfg, tracker_log, cache, meta, d_in, train_shards, holdout_shards,
                            run_dir, name, s_hash, device, rank, world, make_sae, load_sae)
    finally:
        if created_pg:
            # The DDP wrapper sits in a reference cycle, so only the cyclic GC frees it, and with
            # it the gloo process group its reducer holds: at any later moment, or at interpreter
            # exit while the peer is already gone (rank 1 aborted with "terminate called without
            # an active exception"). Free it now, while the group and the peer are alive.
            gc.collect()
            # Ranks leave together: tearing gloo down while a peer still talks aborts the process.
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()
    if rank == 0 and tracker is not None and getattr(tracker, "enabled", False):
        tracker.summary({k: v for k, v in result.metrics.items()
                         if isinstance(v, (int, float, str))})
    return result


def _finished_result(run_dir: Path, s_hash: str, n_steps: int) -> TrainResult | None:
    metrics_path = run_dir / "train_metrics.json"
    if not metrics_path.exists() or not (run_dir / "sae.safetensors").exists():
        return None
    cfg_json = json.loads((run_dir / "config.json").read_text())
    info = cfg_json.get("meta", {})
    if info.get("settings_hash") != s_hash:
        raise ValueError(f"run folder {run_dir} holds a run with different settings; choose "
                           "another train.run_name or delete the folder")
    if info.get("step") != n_steps:
        return None
    return TrainResult(run_dir, run_dir / "sae.safetensors", json.loads(metrics_path.read_text()))


def _train(cfg, log: LogFn, cache: Path, meta: dict, d_in: int, train_shards, holdout_shards,
           run_dir: Path, name: str, s_hash: str, device: torch.device, rank: int, world: int,
           make_sae, load_sae) -> TrainResult:
    tcfg, scfg = cfg.train, cfg.sae
    input_scale = math.sqrt(d_in) / float(meta["mean_norm"]) if scfg.normalize_inputs else 1.0
    mean_D = torch.tensor(meta["mean"], dtype=torch.float32)
    torch.manual_seed(tcfg.seed)
    sae = make_sae(scfg, d_in, input_scale=input_scale, mean=mean_D)

    state, ckpt = None, latest_checkpoint(run_dir)
    if ckpt is not None:
        prev = json.loads((ckpt / "config.json").read_text())
        if prev.get("meta", {}).get("settings_hash") != s_hash:
            raise ValueError(f"run folder {run_dir} holds a run with different settings; "
                               "choose another train.run_name or delete the folder")
        loaded, _ = load_sae(ckpt)
        sae.load_state_dict(loaded.state_dict())
        state = load_train_state(ckpt)
        if rank == 0:
            logger.info(f"train: resuming {run_dir} from step {state['step']}")
    sae.to(device)
    start = int(state["step"]) if state else 0
    batches = make_batches(cache, train_shards, tcfg, d_in, rank, world, start, device, meta)

    base_meta = {
        "run_name": name,
        "layer": cfg.layer.name,
        "d_in": d_in,
        "n_features": int(sae.n_features),
        "arch": scfg.arch,
        "input_scale": input_scale,
        "cache_dir": str(cache),
        "cache_key": meta.get("key"),
        "train_shards": train_shards,
        "holdout_shards": holdout_shards,
        "settings_hash": s_hash,
        "world_size": world,
        "config": to_plain(cfg),
    }
    log_path = run_dir / "train_log.jsonl"
    if rank == 0:
        _truncate_log(log_path, start)
        logger.info(f"train: {name}: {scfg.arch}, {int(sae.n_features)} features on {d_in}-d "
                    f"{cfg.layer.name}, {int(tcfg.n_steps)} steps of {int(tcfg.batch_size)} on "
                    f"{device.type}{f' x{world}' if world > 1 else ''}")
    bar = Progress("train", total=int(tcfg.n_steps), unit="step", initial=start) \
        if rank == 0 else None
    t_wall = time.perf_counter()

    def log_all(metrics: dict, step: int) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        log(metrics, step)
        # The numbers the tracker just got; shown from the next progress update on.
        bar.set({show: metrics[k] for k, show in LIVE_METRICS.items() if k in metrics})

    def on_checkpoint(step: int, state: dict) -> None:
        if rank == 0:
            meta_now = {**base_meta, "step": step, "n_steps": int(tcfg.n_steps),
                        "finished": step == int(tcfg.n_steps),
                        "metrics": state.get("last_metrics", {})}
            write_checkpoint(run_dir, sae, step, meta_now, state)
        if world > 1:
            dist.barrier()

    trained = False
    try:
        metrics = train_loop(sae, batches, tcfg, scfg, log_all if rank == 0 else log,
                             on_checkpoint, state, on_step=(lambda _: bar.update()) if bar else None)
        trained = True
    except TrainingDiverged as e:
        last = latest_checkpoint(run_dir)
        where = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
        raise TrainingDiverged(f"{e} ({where}; run folder {run_dir})") from None
    finally:
        if hasattr(batches, "close"):
            batches.close()  # stops and joins the prefetch thread of a streamed run
        if bar is not None:
            bar.close(done=trained)

    metrics = {**metrics, "run_name": name, "layer": cfg.layer.name, "arch": scfg.arch,
               "n_features": int(sae.n_features), "d_in": d_in}
    if rank == 0:
        io.write_json(run_dir / "train_metrics.json", metrics)
    result = TrainResult(run_dir, run_dir / "sae.safetensors", metrics)
    if rank == 0:
        _print_paths(result)
        _print_summary(cfg, result, time.perf_counter() - t_wall)
    return result


def _truncate_log(log_path: Path, start_step: int) -> None:
    """Drop log lines past the step a resumed run restarts from (they will be logged again)."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= start_step:
                keep.append(line)
    io.write_text(log_path, "".join(s + "\n" for s in keep))


def _evaluate_command(cfg, run_name: str) -> str:
    """The `python run.py stage=evaluate ...` command that evaluates this run."""
    keep: list[str] = []
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        keep = [o for o in HydraConfig.get().overrides.task if not o.split("=")[0].lstrip(
            "+~").startswith(("stage", "sae", "train", "hydra"))]
    if not keep:
        keep = [f"layer={cfg.layer.name}"]
        if getattr(cfg.paths, "root", "artifacts") != "artifacts":
            keep.append(f"paths.root={cfg.paths.root}")
    return " ".join(["python run.py stage=evaluate", *map(shlex.quote, keep),
                     shlex.quote(f"sae.run={run_name}")])


def _print_summary(cfg, result: TrainResult, wall_s: float | None) -> None:
    """What a person wants once training ends: the numbers, where the run is, what to run next."""
    m, d = result.metrics, result.run_dir
    n_feat = int(m.get("n_features") or 0)
    dead = m.get("dead_frac")
    held = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        ev = json.loads((d / "eval" / "metrics.json").read_text())
        if ev.get("step") == m.get("n_steps"):  # evaluated at this very checkpoint
            held = float(ev["reconstruction"]["fvu"])
    parts = [f"loss {m['final_loss']:.4g}" if "final_loss" in m else None,
             f"train-batch FVU {m['fvu']:.4f}" if "fvu" in m else None,
             f"held-out FVU {held:.4f}" if held is not None else "held-out FVU not measured yet",
             f"L0 {m['l0']:.1f}" if "l0" in m else None,
             f"dead {round(dead * n_feat)}/{n_feat} features" if dead is not None else None,
             f"wall {wall_s:.1f} s" if wall_s is not None else "already finished",
             f"{m['samples_per_s_mean']:.0f} samples/s" if m.get("samples_per_s_mean") else None]
    name = m.get("run_name") or d.name
    logger.info(f"train: summary of {name}: " + ", ".join(p for p in parts if p))
    logger.info(f"train: run folder {d}")
    logger.info(f"train: evaluate it with: {_evaluate_command(cfg, name)}")


def _print_paths(result: TrainResult) -> None:
    d = result.run_dir
    for f in ("sae.safetensors", "config.json", "train_state.safetensors", "train_state.json",
              "train_log.jsonl", "train_metrics.json"):
        if (d / f).exists():
            logger.info(f"train: wrote {d / f}")
