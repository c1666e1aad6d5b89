"""The training loop: built objects in, metrics out. No files, no tracker, no process-group set-up.

`train_loop` takes a built SAE, the module to call (the SAE, or the SAE in DDP, possibly
compiled), a built optimizer, an iterator of batches and a `log` callback, and returns the final
metrics. Checkpointing is a callback too (`on_checkpoint(step, TrainState)`), so the caller decides
where state goes. Under a process group cfg.batch_size is the global batch, every counter and
metric is reduced across ranks, and only rank 0 calls `log`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from sae_vision.core import SAEConfig, TrainConfig, warmup_steps_of

from .checkpoint import TrainState
from .distributed import all_reduce, broadcast_from_rank0, world_info

LogFn = Callable[[dict, int], None]
CheckpointFn = Callable[[int, TrainState], None]
StepFn = Callable[[int], None]


class TrainingDiverged(RuntimeError):
    """A batch or the loss went NaN/Inf; training stopped before saving anything from it."""


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
# The optimizer


def make_optimizer(sae, lr: float) -> torch.optim.Optimizer:
    """Adam (β = 0.9, 0.999) over the SAE's parameter groups (each with its `lr_mult`)."""
    groups = sae.param_groups() if hasattr(sae, "param_groups") else [
        {"params": [p for p in sae.parameters() if p.requires_grad], "lr_mult": 1.0}]
    # Fused Adam is one kernel per step on CUDA and ~3x faster than foreach on CPU here.
    for kw in ({"fused": True}, {"foreach": True}, {}):
        try:
            return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), **kw)
        except (RuntimeError, TypeError, ValueError):
            continue
    raise RuntimeError("could not build Adam")


# --------------------------------------------------------------------------------------------
# Divergence checks and the log interval's accumulators


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


# --------------------------------------------------------------------------------------------
# The loop


def train_loop(sae, batches: Iterator[torch.Tensor], cfg: TrainConfig, sae_cfg: SAEConfig,
               log: LogFn, on_checkpoint: CheckpointFn | None = None,
               state: TrainState | None = None, on_step: StepFn | None = None, *,
               optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
               sync_free: bool | None = None) -> dict:
    """Train `sae` for cfg.n_steps on `batches`; logs via `log(metrics, step)`, returns metrics.

    `optimizer` is built by the caller: `make_optimizer(sae, cfg.lr)` is the stage's Adam.
    `model` is what each step calls: `sae` itself (the default), or `sae` wrapped by the caller
    (`distributed.wrap_ddp`, `torch.compile`); `sae` is still the one whose decoder is normalised
    and whose counters move. `state` (from a checkpoint) resumes exactly; `on_checkpoint(step,
    state)` is called every cfg.ckpt_every steps and at the end. `log` gets floats plus
    'density_log10' (numpy [F], log10 firing frequency over the interval); `on_step(done)` is
    called after every step (progress display) and must not read tensors. `sync_free`: a step
    that does not log never waits for the device (None: on every device but the CPU, where a
    host read costs nothing and the per-step divergence check and compacted AuxK pairs are
    cheaper).
    """
    loop = _Loop(sae, model if model is not None else sae, optimizer, cfg, sae_cfg, state)
    if sync_free is None:
        return loop.run(batches, log, on_checkpoint, on_step)
    before = getattr(sae, "sync_free", None)
    loop.lazy_check = sae.sync_free = bool(sync_free)
    try:
        return loop.run(batches, log, on_checkpoint, on_step)
    finally:
        sae.sync_free = before


class _Loop:
    """The state of one training session and its steps (train_loop is its only user)."""

    def __init__(self, sae, model, opt, cfg: TrainConfig, sae_cfg: SAEConfig,
                 state: TrainState | None):
        self.sae, self.model, self.opt, self.cfg, self.sae_cfg = sae, model, opt, cfg, sae_cfg
        self.device = device = next(sae.parameters()).device
        self.rank, self.world = world_info()
        self.n_steps, self.F = int(cfg.n_steps), int(sae.n_features)
        self.global_batch = int(cfg.batch_size)
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.warmup_steps = warmup_steps_of(cfg)
        self.use_amp = bool(cfg.autocast) and device.type == "cuda"
        # Off the CPU the divergence flag is read only at log points and checkpoints (nothing
        # from a diverged step is saved); on the CPU every step checks, which costs nothing.
        self.lazy_check = device.type != "cpu"
        # Vectors seen since each feature last fired: a feature is dead once this reaches the window.
        self.since_fired_F = torch.zeros(self.F, dtype=torch.int64, device=device)
        self.window = _Window(self.F, device)
        self.start, self.total_vectors, self.train_time = 0, 0, 0.0
        self.last_metrics: dict[str, Any] = {}
        if state is not None:
            self._resume(state)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self.resample_every = max(1, math.ceil(cfg.dead_window / self.global_batch))
        self.t_window, self.vec_window, self.ckpt_time = time.perf_counter(), 0, 0.0

    def _resume(self, state: TrainState) -> None:
        self.start = int(state.step)
        self.opt.load_state_dict(state.optimizer)
        _match_param_layout(self.opt)
        self.since_fired_F = state.since_fired_F.to(device=self.device, dtype=torch.int64)
        self.window.load(state.window_tensors, state.window_info, self.device)
        self.total_vectors = int(state.total_vectors)
        self.train_time = float(state.train_time)
        self.last_metrics = dict(state.last_metrics)

    def state_now(self, done: int) -> TrainState:
        """Everything needed to resume after `done` steps (tensors on the CPU)."""
        return TrainState(
            step=done, optimizer=self.opt.state_dict(),
            since_fired_F=self.since_fired_F.detach().cpu(),
            window_tensors=self.window.to_tensors(),
            window_info={"n_steps": self.window.n_steps, "n_vectors": self.window.n_vectors},
            total_vectors=self.total_vectors, train_time=self.train_time,
            last_metrics=self.last_metrics, seed=int(self.cfg.seed))

    def check_pending(self, x_BD: torch.Tensor | None = None) -> None:
        """Raise TrainingDiverged for the first queued step whose loss was not finite."""
        if not self.pending:
            return
        flags = torch.stack([f for _, f, _ in self.pending]).cpu()
        bad = torch.nonzero(flags[:, 0] > 0)
        if len(bad):
            s, f, stats = self.pending[int(bad[0, 0])]
            if stats is None and x_BD is not None:
                stats = _batch_stats(x_BD)
            raise _diverged(s, self.n_steps, float(f[1]), stats.cpu() if stats is not None
                            else None, (self.global_batch // self.world, self.sae.d_in))
        self.pending.clear()

    def train_step(self, step: int, x_BD: torch.Tensor):
        """One optimizer step on batch `x_BD`; returns the forward output."""
        cfg, sae, opt, n_steps = self.cfg, self.sae, self.opt, self.n_steps
        for g in opt.param_groups:
            g["lr"] = (cfg.lr * g.get("lr_mult", 1.0)
                       * lr_factor(step, n_steps, self.warmup_steps, cfg.decay_frac))
        l1 = l1_factor(step, n_steps, self.sae_cfg.l1_warmup_frac)
        sae.set_l1_scale(l1)
        dead_F = self.since_fired_F >= cfg.dead_window  # drives AuxK in the TopK family
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=self.use_amp):
            out = self.model(x_BD, dead_mask=dead_F)
        loss = out.losses["loss"]
        loss_f = loss.detach().float()
        bad = (~torch.isfinite(loss_f)).float()
        fired_F = out.feature_counts().double()  # read from sparse codes: no dense [B, F] pass
        if self.world > 1:
            # One collective per step carries the firing counts and the divergence flag, so every
            # rank sees the same dead mask and stops at the same step.
            packed = all_reduce(torch.cat([fired_F, bad.double().reshape(1)]))
            fired_F, bad = packed[:self.F], packed[self.F].float()
        self.pending.append((step + 1, torch.stack([bad, loss_f]),
                             _batch_stats(x_BD) if self.lazy_check else None))
        if not self.lazy_check:
            self.check_pending(x_BD)

        opt.zero_grad(set_to_none=True)
        loss.backward()  # decoder-parallel gradient components are projected out inside sae
        if cfg.grad_clip and cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        else:
            grad_norm = torch.zeros((), device=self.device)
        opt.step()
        sae.normalize_decoder_()  # unit-norm rows for the constrained archs; no-op for relu_l1
        if l1 >= 1.0 and hasattr(sae, "update_l0_control_"):
            # After the λ warm-up only, so the controller does not wind up against the ramp.
            sae.update_l0_control_(fired_F.sum() / self.global_batch)

        self.since_fired_F = torch.where(fired_F > 0, 0, self.since_fired_F + self.global_batch)
        self.window.fire_F += fired_F
        self.window.add(out.losses, grad_norm)
        self.window.n_vectors += self.global_batch
        self.vec_window += self.global_batch
        self.total_vectors += self.global_batch
        return out

    def maybe_resample(self, done: int, x_BD: torch.Tensor) -> None:
        """relu_l1's optional dead-feature resampling, in the first half of training."""
        cfg = self.cfg
        if not (self.sae_cfg.arch == "relu_l1" and self.sae_cfg.resample_dead
                and done % self.resample_every == 0 and done <= self.n_steps // 2):
            return
        dead_F = self.since_fired_F >= cfg.dead_window
        n_res = _resample(self.sae, self.opt, x_BD, dead_F, seed=cfg.seed * 1_000_003 + done)
        if n_res:
            self.since_fired_F[self.since_fired_F >= cfg.dead_window] = 0
            self.last_metrics["n_resampled"] = self.last_metrics.get("n_resampled", 0) + n_res

    def log_point(self, step: int, out, x_BD: torch.Tensor, log: LogFn) -> None:
        """Reduce the interval's numbers, hand them to `log` (rank 0) and start a new interval."""
        sae, done = self.sae, step + 1
        self.check_pending()
        metrics = _window_metrics(self.window, out, x_BD, self.since_fired_F, self.cfg,
                                  self.world)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.t_window - self.ckpt_time
        metrics["samples_per_s"] = self.vec_window / max(elapsed, 1e-9)
        metrics["lr"] = self.opt.param_groups[0]["lr"]
        metrics["l1_factor"] = l1_factor(step, self.n_steps, self.sae_cfg.l1_warmup_frac)
        if hasattr(sae, "l1_log_ctrl"):
            metrics["l1_coeff_now"] = float(sae.l1_coeff_now)
        if hasattr(sae, "log_threshold"):
            metrics["jump_threshold_median"] = float(sae.jump_threshold.detach().median())
        metrics["vectors"] = self.total_vectors
        self.train_time += elapsed
        self.t_window, self.vec_window, self.ckpt_time = time.perf_counter(), 0, 0.0
        density = metrics.pop("density_log10")
        self.last_metrics.update(metrics)
        if self.rank == 0:
            log({**metrics, "density_log10": density}, done)
        self.window = _Window(self.F, self.device)

    def run(self, batches: Iterator[torch.Tensor], log: LogFn,
            on_checkpoint: CheckpointFn | None, on_step: StepFn | None) -> dict:
        """Steps from the resumed step to cfg.n_steps; returns the final metrics."""
        cfg, n_steps = self.cfg, self.n_steps
        self.sae.train()
        self.t_window, self.vec_window = time.perf_counter(), 0
        t_run = time.perf_counter()
        for step in range(self.start, n_steps):
            try:
                x_BD = next(batches)
            except StopIteration:
                raise RuntimeError(f"the batch iterator ran out at step {step}") from None
            out = self.train_step(step, x_BD)
            done = step + 1
            self.maybe_resample(done, x_BD)
            if done % cfg.log_every == 0 or done == n_steps:
                self.log_point(step, out, x_BD, log)
            if on_checkpoint is not None and (done % cfg.ckpt_every == 0 or done == n_steps):
                self.check_pending()
                t0 = time.perf_counter()
                on_checkpoint(done, self.state_now(done))
                self.ckpt_time += time.perf_counter() - t0
            if on_step is not None:
                on_step(done)
        self.check_pending()
        result = dict(self.last_metrics)
        result.update({
            "final_loss": float(self.last_metrics.get("loss", float("nan"))),
            "n_steps": n_steps,
            "n_vectors": self.total_vectors,
            "train_time_s": self.train_time,
            "samples_per_s_mean": self.total_vectors / max(self.train_time, 1e-9)
            if self.train_time else None,
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
    packed = all_reduce(packed)
    n_names = len(names)
    loss_sums = packed[:n_names] / (window.n_steps * world)
    grad_norm = float(packed[n_names]) / (window.n_steps * world)
    sq_err_total = packed[n_names + 1]
    n_total = packed[n_names + 2]
    mean_D = packed[n_names + 3:] / n_total
    var_total = all_reduce((x - mean_D).pow(2).sum().reshape(1))[0]
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
    from .architectures import resample_dead

    gen = torch.Generator(device=x_BD.device).manual_seed(seed)
    idx = resample_dead(sae, dead_F, x_BD, optimizer=opt, generator=gen)
    if idx.numel():
        # Ranks drew from their own batches; rank 0's choice wins. W_enc is a transposed view of
        # [F, D] storage, so broadcast that contiguous storage.
        broadcast_from_rank0((sae.W_dec.data, sae.W_enc.data.t(), sae.b_enc.data))
    return int(idx.numel())
