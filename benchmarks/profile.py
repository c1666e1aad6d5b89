"""`--profile`: where the time goes when a goal is missed (torch.profiler and cProfile tables)."""

from __future__ import annotations

import cProfile
import io
import pstats
import shutil
from pathlib import Path

from benchmarks.training import TrainData, our_config


def profile_training(data: TrainData, arch: str, n_features: int, batch_size: int, k: int,
                     device: str, n_steps: int, path: Path) -> Path:
    """torch.profiler over n_steps of train_loop (after one warm-up run); op table to path."""
    from torch.profiler import ProfilerActivity, profile

    from sae_vision.activations import pick_device
    from sae_vision.sae.architectures import make_sae
    from sae_vision.sae.loader import MemoryBatches
    from sae_vision.sae.loop import make_optimizer, train_loop

    sae_cfg, train_cfg = our_config(arch, n_features, k, 5.0, batch_size, n_steps, device)
    sae = make_sae(sae_cfg, data.d_in, input_scale=data.input_scale, mean=data.mean_D).to(device)
    batches = MemoryBatches(data.train_ND, batch_size, seed=0, device=pick_device(device))
    train_loop(sae, batches, train_cfg, sae_cfg, log=lambda m, s: None,  # warm-up
               optimizer=make_optimizer(sae, train_cfg.lr))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        train_loop(sae, batches, train_cfg, sae_cfg, log=lambda m, s: None,
                   optimizer=make_optimizer(sae, train_cfg.lr))
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    path.write_text(f"train_loop, arch={arch}, F={n_features}, batch={batch_size}, "
                    f"{n_steps} steps, device={device}\n\n"
                    + prof.key_averages().table(sort_by=sort, row_limit=30))
    return path


def profile_caching(work_dir: Path, n_images: int, image_size: int, batch_size: int,
                    device: str, path: Path) -> Path:
    """cProfile of cache.run (Python-level: decode, forward, sampling, shard writing)."""
    from benchmarks.caching import cache_config
    from sae_vision.activations import cache

    cache_dir = work_dir / "caching-profile"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = cache_config(work_dir, n_images, image_size, batch_size, "norm_weighted", device,
                       cache_dir=cache_dir)
    prof = cProfile.Profile()
    prof.enable()
    cache.run(cfg)
    prof.disable()
    shutil.rmtree(cache_dir, ignore_errors=True)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
    path.write_text(f"cache.run, {n_images} images at {image_size}px, batch {batch_size}, "
                    f"device={device}\n\n{buf.getvalue()}")
    return path
