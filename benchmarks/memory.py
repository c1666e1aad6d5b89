"""Benchmark 5: peak RSS of streaming training and of caching, each in a fresh subprocess.

`python -m benchmarks.memory train|cache ...` runs one stage and prints one JSON line with
its peak RSS (ru_maxrss), so two sizes can be compared without one run's memory leaking into
the other's figure. The parent (benchmarks.run) builds the caches and launches the children.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Child, peak_rss_mb, ru_maxrss_mb, run_children, setup_torch

CHUNK = 4096  # vectors per tar record in the subset caches (a typical chunk size)


def write_subset_cache(train_ND: torch.Tensor, layer: str, n_vectors: int, cache_dir: Path,
                       chunk: int, chunks_per_shard: int) -> dict:
    """A real shard cache of n_vectors cached vectors, repeating them if needed (reused if there).

    Repeats are fine here: only the size matters to a memory test.
    """
    from sae_vision.activations.shards import METADATA, load_cache_meta, write_cache

    if (cache_dir / METADATA).exists():
        meta = load_cache_meta(cache_dir)
        if meta["n_vectors"] == n_vectors and \
                len(meta["shards"]) == math.ceil(n_vectors / chunk / chunks_per_shard):
            return meta
    shutil.rmtree(cache_dir, ignore_errors=True)
    reps = -(-n_vectors // len(train_ND))
    acts = (train_ND.repeat(reps, 1) if reps > 1 else train_ND)[:n_vectors]

    def chunks():
        for i, part in enumerate(acts.split(chunk)):
            pos = np.zeros((len(part), 3), np.int32)
            pos[:, 0] = i  # one pseudo-image per chunk keeps the provenance columns valid
            yield part, pos, {i: f"bench-chunk-{i}"}

    return write_cache(cache_dir, chunks(), {
        "layer": layer, "dim": int(acts.shape[1]), "dtype": "float16",
        "model": "googlenet_bvlc", "key": f"bench-mem-{n_vectors}"}, chunks_per_shard)


def bench_memory(train_ND: torch.Tensor, layer: str, work_dir: Path, small_vectors: int,
                 batch_size: int,
                 shuffle_buffer: int, cache_images: tuple[int, int], image_size: int,
                 cache_batch: int, images_per_shard: int, device: str, parallel: bool,
                 progress, expansion: int = 8, k: int = 32) -> dict:
    """Streaming training at 1x and 4x cache size; caching at 1x and 4x images."""
    large_vectors = 4 * small_vectors
    chunk = min(CHUNK, max(1, small_vectors // 8))  # >= 4 shards of 2 chunks in the small cache
    progress(f"memory: writing {small_vectors} and {large_vectors}-vector caches")
    caches = {}
    for n in (small_vectors, large_vectors):
        d = work_dir / f"mem-cache-{n}"
        caches[n] = (d, write_subset_cache(train_ND, layer, n, d, chunk, chunks_per_shard=2))
    # Enough steps to stream the whole large cache once; the small one wraps around.
    n_steps = math.ceil(large_vectors / batch_size) + 2
    children = [Child(["train", "--cache-dir", str(d), "--root", str(work_dir / "mem-runs"),
                       "--steps", str(n_steps), "--batch", str(batch_size),
                       "--shuffle-buffer", str(shuffle_buffer), "--device", device,
                       "--expansion", str(expansion), "--k", str(k), "--tag", str(n)],
                      device, work_dir / f"mem-train-{n}.log")
                for n, (d, _) in caches.items()]
    children += [Child(["cache", "--n-images", str(n), "--image-size", str(image_size),
                        "--batch", str(cache_batch), "--images-per-shard", str(images_per_shard),
                        "--root", str(work_dir / "mem-caches"), "--device", device],
                       device, work_dir / f"mem-cache-{n}.log")
                 for n in cache_images]
    progress("memory: streaming-training subprocesses "
             f"({'in parallel' if parallel else 'one at a time'}), then caching subprocesses "
             "(in parallel: only their RSS is used)")
    t_small, t_large = run_children(children[:2], parallel)
    c_small, c_large = run_children(children[2:], parallel=True)
    return {
        "train": {"small": t_small | {"cache_vectors": small_vectors},
                  "large": t_large | {"cache_vectors": large_vectors},
                  "n_steps": n_steps, "batch_size": batch_size, "shuffle_buffer": shuffle_buffer,
                  # what the RSS would grow by if the loader held the whole cache in float32
                  "cache_growth_mb_if_held": (large_vectors - small_vectors)
                  * train_ND.shape[1] * 4 / 2**20,
                  "rss_growth": t_large["peak_rss_mb"] / t_small["peak_rss_mb"]},
        "cache": {"small": c_small, "large": c_large, "images_per_shard": images_per_shard,
                  # what the RSS would grow by if the stage held its decoded images
                  "images_growth_mb_if_held": (cache_images[1] - cache_images[0])
                  * 3 * image_size**2 * 4 / 2**20,
                  "rss_growth": c_large["peak_rss_mb"] / c_small["peak_rss_mb"]},
    }


# --------------------------------------------------------------------------------------------
# Child processes


def _child_train(args) -> dict:
    """train.run streaming from args.cache_dir (loader=stream); returns peak RSS and speed."""
    from sae_vision.activations.shards import load_cache_meta
    from sae_vision.core.config import Config, LayerConfig, SAEConfig, TrainConfig
    from sae_vision.sae import train

    meta = load_cache_meta(args.cache_dir)
    cfg = Config()
    cfg.stage.name = "train"
    cfg.paths.root = args.root
    cfg.layer = LayerConfig(name=meta["layer"], dim=int(meta["dim"]))
    cfg.cache.dir = args.cache_dir
    cfg.logger.mode = "disabled"
    cfg.sae = SAEConfig(arch="topk", expansion=args.expansion, k=args.k)
    run_name = f"mem-{args.tag}"
    cfg.train = TrainConfig(n_steps=args.steps, batch_size=args.batch, warmup_steps=0,
                            loader="stream", shuffle_buffer=args.shuffle_buffer,
                            log_every=args.steps, ckpt_every=args.steps, holdout_frac=0.1,
                            device=args.device, run_name=run_name)
    shutil.rmtree(Path(args.root) / "sae" / run_name, ignore_errors=True)
    t0 = time.perf_counter()
    result = train.run(cfg)
    return {"peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb(),
            "wall_s": time.perf_counter() - t0,
            "samples_per_s": result.metrics.get("samples_per_s_mean"),
            "n_steps": args.steps}


def _child_cache(args) -> dict:
    """cache.run on args.n_images demo images into a fresh folder; returns peak RSS and speed."""
    from benchmarks.caching import cache_config
    from sae_vision.activations import cache

    cache_dir = Path(args.root) / f"n{args.n_images}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cfg = cache_config(Path(args.root), args.n_images, args.image_size, args.batch,
                       "norm_weighted", args.device, images_per_shard=args.images_per_shard,
                       cache_dir=cache_dir)
    t0 = time.perf_counter()
    result = cache.run(cfg)
    out = {"peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": ru_maxrss_mb(),
           "wall_s": time.perf_counter() - t0,
           "images_per_s": result.images_per_s, "n_images": args.n_images}
    shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse the child command, run it with stage output on stderr, print one JSON line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="streaming training from a cache")
    t.add_argument("--cache-dir", required=True)
    t.add_argument("--root", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--batch", type=int, default=4096)
    t.add_argument("--shuffle-buffer", type=int, default=16384)
    t.add_argument("--device", default="cpu")
    t.add_argument("--expansion", type=int, default=8)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--tag", default="run")
    c = sub.add_parser("cache", help="the cache stage on demo images")
    c.add_argument("--n-images", type=int, required=True)
    c.add_argument("--image-size", type=int, default=224)
    c.add_argument("--batch", type=int, default=32)
    c.add_argument("--images-per-shard", type=int, default=64)
    c.add_argument("--root", required=True)
    c.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    setup_torch(args.device)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON result alone
        out = _child_train(args) if args.cmd == "train" else _child_cache(args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
