"""Train stage: fit a sparse autoencoder on a cached layer; resumable, sweepable, DDP-aware.

`run(cfg, tracker, overrides)` holds the side effects: it finds the cache, builds the SAE, its
optimizer and the module each step calls, owns the run folder (lock, checkpoints, metrics JSON;
see runs.py and checkpoint.py) and hands a `log` callable and a checkpoint callback to
`loop.train_loop`, which takes built objects and returns metrics. Batches are a pure function of
(seed, step) when the cache fits in memory (loader.py), so a killed run resumes to the same final
loss as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_vision.activations import CacheError, load_cache_meta, sha256_file, split_shards
from sae_vision.core import Config, Progress, check_layer, content_hash, io, paths, to_plain

from . import distributed
from .architectures import make_sae
from .checkpoint import (
    RunLocked,
    TrainState,
    latest_checkpoint,
    load_sae,
    load_train_state,
    restore_final,
    run_lock,
    write_checkpoint,
)
from .loader import MemoryBatches, make_batches
from .loop import LogFn, TrainingDiverged, make_optimizer, train_loop
from .runs import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EVAL_DIR,
    TRAIN_LOG,
    TRAIN_METRICS,
    TRAIN_STATE_FILE,
    TRAIN_STATE_JSON,
    WEIGHTS_FILE,
)

# benchmarks/ import the loop and the in-memory loader from the train stage.
__all__ = ["LIVE_METRICS", "MemoryBatches", "TrainJob", "TrainResult", "run", "train_loop"]

logger = logging.getLogger(__name__)

# What the progress bar/line shows of the logged metrics, under the names a reader expects.
LIVE_METRICS = {"samples_per_s": "samples/s", "loss": "loss", "mse": "mse", "fvu": "fvu",
                "l0": "l0", "dead_frac": "dead", "lr": "lr"}


@dataclass(frozen=True)
class TrainResult:
    """What the train stage produced."""

    run_dir: Path
    checkpoint_path: Path
    metrics: dict


@dataclass(frozen=True)
class TrainJob:
    """What one training session works on: the config, its cache, its run folder, and this
    process's place in the process group."""

    cfg: Config
    cache: Path
    meta: dict  # the cache's metadata.json
    d_in: int
    train_shards: list[str]
    holdout_shards: list[str]
    run_dir: Path
    name: str
    settings_hash: str
    overrides: Sequence[str] | None = None  # the command line's, for the commands we print
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world: int = 1


# --------------------------------------------------------------------------------------------
# Commands a user is told to run next


def _cache_command(cfg, overrides: Sequence[str] | None) -> str:
    """The `python run.py stage=cache ...` command that builds the cache this run needs."""
    if overrides is not None:
        keep = [o for o in overrides if not o.split("=")[0].lstrip("+~").startswith(
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


def _evaluate_command(cfg, run_name: str, overrides: Sequence[str] | None) -> str:
    """The `python run.py stage=evaluate ...` command that evaluates this run."""
    keep = [o for o in overrides or () if not o.split("=")[0].lstrip("+~").startswith(
        ("stage", "sae", "train", "hydra"))]
    if not keep:
        keep = [f"layer={cfg.layer.name}"]
        if getattr(cfg.paths, "root", "artifacts") != "artifacts":
            keep.append(f"paths.root={cfg.paths.root}")
    return " ".join(["python run.py stage=evaluate", *map(shlex.quote, keep),
                     shlex.quote(f"sae.run={run_name}")])


# --------------------------------------------------------------------------------------------
# The stage


def settings_hash(cfg, cache_key: str) -> str:
    """Hash of the settings that define a training run (what a resume must agree on)."""
    return content_hash({"sae": {**to_plain(cfg.sae), "run": None}, "train": to_plain(cfg.train),
                         "cache": cache_key})


def _open_cache(cfg, overrides: Sequence[str] | None) -> tuple[Path, dict, int]:
    cache = paths.cache_dir(cfg)
    # layer.dim is checked against the layer name by check_config; timm layers may leave it 0.
    d_expect = int(cfg.layer.dim) or check_layer(cfg.layer.name, cfg.model.family)
    d_expect = d_expect if d_expect > 0 else None
    if not (cache / "metadata.json").exists():
        try:
            load_cache_meta(cache)
        except CacheError as e:
            raise CacheError(f"{e}\nBuild the cache for layer {cfg.layer.name!r} first:\n    "
                             f"{_cache_command(cfg, overrides)}") from None
    meta = load_cache_meta(cache, expect={"layer": cfg.layer.name, "dim": d_expect})
    _check_network(cfg, cache, meta)
    stats = np.asarray([*meta["mean"], meta["mean_norm"]], dtype=np.float64)
    if not np.isfinite(stats).all() or float(meta["mean_norm"]) <= 0:
        raise CacheError(f"cache {cache} has non-finite or zero statistics (mean_norm="
                         f"{meta['mean_norm']}): its activations hold NaN/Inf (e.g. a float16 "
                         "overflow); rebuild it with cache.dtype=float32 or bfloat16")
    return cache, meta, int(meta["dim"])


def _check_network(cfg, cache: Path, meta: dict) -> None:
    """Refuse a cache of another network: its activations mean nothing to this model."""
    if meta.get("model") is None:  # imported arrays: no network
        return
    def network(family: str, name: str | None) -> str:  # a timm model is named, others not
        return f"model={family}" + (f" model.name={name}" if family == "timm" else "")

    have = network(meta["model"], meta.get("model_name"))
    want = network(cfg.model.family, cfg.model.name)
    if have != want:
        raise CacheError(
            f"cache {cache} holds activations of {have}, but this run is for {want}; pass "
            f"{have} to train on that cache, or build one for this network with "
            f"`python run.py stage=cache {want}` (without cache.dir)")
    recorded = meta.get("weights_sha256")
    if cfg.model.weights_path and recorded:
        have_sha = sha256_file(cfg.model.weights_path)
        if have_sha != recorded:
            raise CacheError(
                f"cache {cache} was built with weights of sha256 {recorded[:12]}, but "
                f"model.weights_path={cfg.model.weights_path} has sha256 {have_sha[:12]}; drop "
                "model.weights_path or build a cache with these weights (stage=cache)")


def make_job(cfg, overrides: Sequence[str] | None = None) -> TrainJob:
    """The cache, split and run folder this config trains on (the cache must exist)."""
    cache, meta, d_in = _open_cache(cfg, overrides)
    train_shards, holdout_shards = split_shards(meta, cfg.train.holdout_frac)
    name = paths.run_name(cfg, d_in)
    return TrainJob(cfg=cfg, cache=cache, meta=meta, d_in=d_in, train_shards=train_shards,
                    holdout_shards=holdout_shards, run_dir=paths.sae_root(cfg) / name, name=name,
                    settings_hash=settings_hash(cfg, meta.get("key", str(cache))),
                    overrides=overrides)


def _tracker_log(tracker) -> LogFn:
    """The loop's `log` for the tracker (the density array becomes a W&B histogram there)."""
    if tracker is None or not getattr(tracker, "enabled", False):
        return lambda metrics, step: None
    return lambda metrics, step: tracker.log(metrics, step=step)


def run(cfg, tracker=None, overrides: Sequence[str] | None = None) -> TrainResult:
    """Train (or resume, or reuse) the SAE this config describes; returns paths and metrics.

    `overrides` are the command line's (run.py passes them), used only to print the exact
    commands that build the cache or evaluate the run."""
    job = make_job(cfg, overrides)
    _restore(job.run_dir)
    finished = _finished_result(job.run_dir, job.settings_hash, int(cfg.train.n_steps))
    if finished is not None:
        logger.info(f"train: reusing finished run {job.run_dir}")
        _print_paths(finished)
        _print_summary(cfg, finished, None, overrides)
        return finished

    with distributed.process_group(cfg.train.device) as (device, rank, world):
        job = dataclasses.replace(job, device=device, rank=rank, world=world)
        with _run_folder_lock(job):
            result = train(job, _tracker_log(tracker))
    if rank == 0 and tracker is not None and getattr(tracker, "enabled", False):
        tracker.summary({k: v for k, v in result.metrics.items()
                         if isinstance(v, (int, float, str))})
    return result


@contextlib.contextmanager
def _run_folder_lock(job: TrainJob) -> Iterator[None]:
    """Rank 0 alone writes the run folder, so it alone holds the lock; every rank learns whether
    it got it, so none waits forever."""
    with contextlib.ExitStack() as stack:
        locked: Exception | None = None
        if job.rank == 0:
            try:
                stack.enter_context(run_lock(job.run_dir))
            except RunLocked as e:
                locked = e
        if distributed.any_rank(locked is not None, job.device) and locked is None:
            locked = RunLocked(f"run folder {job.run_dir} is locked by another live run")
        if locked is not None:
            raise locked
        yield


def _restore(run_dir: Path) -> None:
    """Put back a missing or damaged sae.safetensors (and its companions) from the newest intact
    checkpoint, and say so; a folder another live run is writing is left to that run."""
    if not (run_dir / CHECKPOINTS_DIR).is_dir() or os.environ.get("RANK", "0") != "0":
        return
    with contextlib.suppress(RunLocked), run_lock(run_dir):
        restored = restore_final(run_dir)
        if restored is not None:
            ckpt, problem = restored
            logger.info(f"train: restored the run folder's files from the checkpoint {ckpt} "
                        f"({run_dir} was {problem})")


def _finished_result(run_dir: Path, s_hash: str, n_steps: int) -> TrainResult | None:
    metrics_path = run_dir / TRAIN_METRICS
    if not metrics_path.exists() or not (run_dir / WEIGHTS_FILE).exists():
        return None
    cfg_json = json.loads((run_dir / CONFIG_FILE).read_text())
    info = cfg_json.get("meta", {})
    if info.get("settings_hash") != s_hash:
        raise ValueError(f"run folder {run_dir} holds a run with different settings; choose "
                           "another train.run_name or delete the folder")
    if info.get("step") != n_steps:
        return None
    return TrainResult(run_dir, run_dir / WEIGHTS_FILE, json.loads(metrics_path.read_text()))


def _input_scale(job: TrainJob) -> float:
    """Makes E||x|| = sqrt(D) inside the SAE (sae.normalize_inputs), from the cache's mean norm."""
    if not job.cfg.sae.normalize_inputs:
        return 1.0
    return math.sqrt(job.d_in) / float(job.meta["mean_norm"])


def _build_sae(job: TrainJob) -> tuple[torch.nn.Module, TrainState | None]:
    """The SAE (on job.device), from its latest checkpoint when there is one, and its state."""
    mean_D = torch.tensor(job.meta["mean"], dtype=torch.float32)
    torch.manual_seed(job.cfg.train.seed)
    sae = make_sae(job.cfg.sae, job.d_in, input_scale=_input_scale(job), mean=mean_D)
    state, ckpt = None, latest_checkpoint(job.run_dir)
    if ckpt is not None:
        prev = json.loads((ckpt / CONFIG_FILE).read_text())
        if prev.get("meta", {}).get("settings_hash") != job.settings_hash:
            raise ValueError(f"run folder {job.run_dir} holds a run with different settings; "
                               "choose another train.run_name or delete the folder")
        loaded, _ = load_sae(ckpt)
        sae.load_state_dict(loaded.state_dict())
        state = load_train_state(ckpt)
        if job.rank == 0:
            logger.info(f"train: resuming {job.run_dir} from step {state.step}")
    return sae.to(job.device), state


def _under_root(cache: Path, cfg) -> str | None:
    """The cache's path relative to paths.root (None when it lies elsewhere)."""
    try:
        return str(Path(cache).resolve().relative_to(Path(cfg.paths.root).resolve()))
    except ValueError:
        return None


def _base_meta(job: TrainJob, sae) -> dict:
    """What every checkpoint's config.json records about the run (besides its step)."""
    return {
        "run_name": job.name,
        "layer": job.cfg.layer.name,
        "d_in": job.d_in,
        "n_features": int(sae.n_features),
        "arch": job.cfg.sae.arch,
        "input_scale": _input_scale(job),
        "cache_dir": str(job.cache),
        "cache_rel": _under_root(job.cache, job.cfg),
        "cache_key": job.meta.get("key"),
        "train_shards": job.train_shards,
        "holdout_shards": job.holdout_shards,
        "settings_hash": job.settings_hash,
        "world_size": job.world,
        "config": to_plain(job.cfg),
    }


def train(job: TrainJob, log: LogFn) -> TrainResult:
    """Train (or resume) the job's SAE in its run folder; the caller holds the folder's lock."""
    cfg, tcfg, scfg, run_dir = job.cfg, job.cfg.train, job.cfg.sae, job.run_dir
    sae, state = _build_sae(job)
    start = state.step if state else 0
    batches = make_batches(job.cache, job.train_shards, tcfg, job.d_in, job.rank, job.world,
                           start, job.device, job.meta)
    base_meta, log_path = _base_meta(job, sae), run_dir / TRAIN_LOG
    if job.rank == 0:
        _truncate_log(log_path, start)
        logger.info(f"train: {job.name}: {scfg.arch}, {int(sae.n_features)} features on "
                    f"{job.d_in}-d {cfg.layer.name}, {int(tcfg.n_steps)} steps of "
                    f"{int(tcfg.batch_size)} on {job.device}"
                    f"{f' x{job.world}' if job.world > 1 else ''}")
    bar = Progress("train", total=int(tcfg.n_steps), unit="step", initial=start) \
        if job.rank == 0 else None
    t_wall = time.perf_counter()

    def log_all(metrics: dict, step: int) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        log(metrics, step)
        # The numbers the tracker just got; shown from the next progress update on.
        bar.set({show: metrics[k] for k, show in LIVE_METRICS.items() if k in metrics})

    def on_checkpoint(step: int, state: TrainState) -> None:
        if job.rank == 0:
            meta_now = {**base_meta, "step": step, "n_steps": int(tcfg.n_steps),
                        "finished": step == int(tcfg.n_steps), "metrics": state.last_metrics}
            write_checkpoint(run_dir, sae, step, meta_now, state)
        distributed.barrier()

    # The model each step calls: DDP under a process group, compiled when asked.
    model = distributed.wrap_ddp(sae)
    model = torch.compile(model) if tcfg.compile else model
    trained = False
    try:
        metrics = train_loop(sae, batches, tcfg, scfg, log_all if job.rank == 0 else log,
                             on_checkpoint, state, on_step=(lambda _: bar.update()) if bar else None,
                             optimizer=make_optimizer(sae, tcfg.lr), model=model)
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
    return _finish(job, sae, metrics, time.perf_counter() - t_wall)


def _finish(job: TrainJob, sae, metrics: dict, wall_s: float) -> TrainResult:
    """Write train_metrics.json (rank 0) and tell the user what came out and what to run next."""
    metrics = {**metrics, "run_name": job.name, "layer": job.cfg.layer.name,
               "arch": job.cfg.sae.arch, "n_features": int(sae.n_features), "d_in": job.d_in}
    result = TrainResult(job.run_dir, job.run_dir / WEIGHTS_FILE, metrics)
    if job.rank == 0:
        io.write_json(job.run_dir / TRAIN_METRICS, metrics)
        _print_paths(result)
        _print_summary(job.cfg, result, wall_s, job.overrides)
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


def _print_summary(cfg, result: TrainResult, wall_s: float | None,
                   overrides: Sequence[str] | None) -> None:
    """What a person wants once training ends: the numbers, where the run is, what to run next."""
    m, d = result.metrics, result.run_dir
    n_feat = int(m.get("n_features") or 0)
    dead = m.get("dead_frac")
    held = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        ev = json.loads((d / EVAL_DIR / "metrics.json").read_text())
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
    logger.info(f"train: evaluate it with: {_evaluate_command(cfg, name, overrides)}")


def _print_paths(result: TrainResult) -> None:
    d = result.run_dir
    for f in (WEIGHTS_FILE, CONFIG_FILE, TRAIN_STATE_FILE, TRAIN_STATE_JSON, TRAIN_LOG,
              TRAIN_METRICS):
        if (d / f).exists():
            logger.info(f"train: wrote {d / f}")
