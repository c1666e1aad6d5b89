"""Benchmark 1: the cache stage's images/s against the bare model forward to the same layer."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import sync
from sae_vision.core.config import (
    CacheConfig,
    Config,
    DataConfig,
    LayerConfig,
    ModelConfig,
    check_config,
)

LAYER = "mixed3b"


def cache_config(root: Path, n_images: int, image_size: int, batch_size: int, sampling: str,
                 device: str, images_per_shard: int = 64, cache_dir: Path | None = None,
                 n_per_image: int = 16) -> Config:
    """A cache-stage Config on the embedded demo photos at mixed3b, real BVLC weights."""
    cfg = Config()
    cfg.stage.name = "cache"
    cfg.paths.root = str(root)
    cfg.model = ModelConfig(family="googlenet_bvlc", device=device, allow_download=False)
    cfg.layer = LayerConfig(name=LAYER, dim=480)
    cfg.data = DataConfig(name="demo", n_images=n_images, image_size=image_size, seed=0)
    cfg.cache = CacheConfig(sampling=sampling, n_per_image=n_per_image, dtype="float16",
                            images_per_shard=images_per_shard, batch_size=batch_size,
                            dir=str(cache_dir) if cache_dir else None)
    cfg.logger.mode = "disabled"
    check_config(cfg)
    return cfg


def decoded_images(cfg: Config) -> tuple[torch.Tensor, float]:
    """The exact images the cache stage will see, as [N, 3, H, W], and seconds per decode."""
    from sae_vision.activations.images import make_images

    dataset = make_images(cfg.data)
    t0 = time.perf_counter()
    images = [dataset[i].image for i in range(len(dataset))]
    return torch.stack(images), (time.perf_counter() - t0) / len(images)


def forward_rate(model, images: torch.Tensor, batch_size: int, device: str) -> float:
    """Images/s of model.activations up to LAYER (the pass stops there), batches like the stage."""
    x_all = images.to(device)
    with torch.inference_mode():
        model.activations(x_all[:batch_size], [LAYER])  # warm-up: first-call allocations
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(x_all), batch_size):
            model.activations(x_all[i:i + batch_size], [LAYER])
        sync(device)
    return len(x_all) / (time.perf_counter() - t0)


def run_cache_stage(cfg: Config, log_path: Path) -> tuple[object, float]:
    """cache.run(cfg) with its console output sent to log_path; returns (result, wall seconds)."""
    from sae_vision.activations import cache

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        t0 = time.perf_counter()
        result = cache.run(cfg)
        wall = time.perf_counter() - t0
    return result, wall


def bench_caching(work_dir: Path, n_images: int, image_size: int, batch_size: int, device: str,
                  log_path: Path, rounds: int = 2) -> dict:
    """Cache stage (default sampling) vs bare forward on the same images and batch size.

    `rounds` alternations of bare forward and a fresh cache.run over the same n_images, ending
    with one more bare pass, so load from other jobs falls on both sides alike. The stage's own
    images/s excludes start-up (imports, model load) but includes decoding, sampling and
    writing; its wall-clock rate is recorded too.
    """
    from sae_vision.activations.models import load_model

    cache_dir = work_dir / "caching-bench"
    cfg = cache_config(work_dir, n_images, image_size, batch_size, "norm_weighted", device,
                       cache_dir=cache_dir)
    images, decode_s = decoded_images(cfg)
    model = load_model(cfg.model)
    bare_runs, stage_runs, walls = [], [], []
    for _ in range(rounds):
        bare_runs.append(forward_rate(model, images, batch_size, device))
        shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh cache: the stage must really run
        result, wall = run_cache_stage(cfg, log_path)
        stage_runs.append(result.images_per_s)
        walls.append(wall)
    bare_runs.append(forward_rate(model, images, batch_size, device))
    shutil.rmtree(cache_dir, ignore_errors=True)
    bare = statistics.mean(bare_runs)
    stage = len(stage_runs) / sum(1 / r for r in stage_runs)  # images/s over all stage images
    # Decoding happens inside the stage only; this bound says how much of the gap decoding
    # alone explains if it is not overlapped with the forward (same cores).
    decode_bound = 1.0 / (1.0 / bare + decode_s)
    return {
        "layer": LAYER,
        "n_images": n_images,
        "rounds": rounds,
        "image_size": image_size,
        "batch_size": batch_size,
        "sampling": cfg.cache.sampling,
        "n_per_image": cfg.cache.n_per_image,
        "dtype": cfg.cache.dtype,
        "stage_images_per_s": stage,
        "stage_images_per_s_runs": stage_runs,
        "stage_wall_s_runs": walls,
        "stage_images_per_s_wall": rounds * n_images / sum(walls),
        "forward_images_per_s": bare,
        "forward_images_per_s_runs": bare_runs,
        "decode_ms_per_image": decode_s * 1e3,
        "forward_plus_decode_images_per_s": decode_bound,
        "ratio": stage / bare,
        "ratio_wall": (rounds * n_images / sum(walls)) / bare,
        "ratio_vs_forward_plus_decode": stage / decode_bound,
    }


def build_train_cache(work_dir: Path, n_images: int, image_size: int, images_per_shard: int,
                      device: str, log_path: Path) -> tuple[Path, dict, dict]:
    """Every position of n_images demo images at mixed3b (sampling=all), reused when complete."""
    from sae_vision.activations.shards import load_cache_meta
    from sae_vision.core import paths

    cfg = cache_config(work_dir, n_images, image_size, 32, "all", device,
                       images_per_shard=images_per_shard)
    result, wall = run_cache_stage(cfg, log_path)
    cache_dir = paths.cache_dir(cfg)
    meta = load_cache_meta(cache_dir)
    info = {"cache_dir": str(cache_dir), "n_images": n_images, "n_vectors": meta["n_vectors"],
            "reused": bool(result.reused),
            "stage_images_per_s": None if result.reused else result.images_per_s,
            "stage_wall_s": None if result.reused else wall}
    return cache_dir, meta, info
