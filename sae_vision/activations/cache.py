"""Stage `cache`: images -> InceptionV1 activation vectors -> sharded webdataset tars.

One forward pass serves every requested layer; each layer gets its own content-named cache.
A shard (cache.images_per_shard consecutive images) is the unit of resume and of parallelism:
it is claimed with an exclusive lock file, written to a temporary name and renamed when
complete, so a killed or concurrent run never leaves or reads half a shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_vision.core import (
    ARRAY_LAYER,
    Config,
    Progress,
    Tracker,
    check_layer,
    disabled,
    io,
    paths,
    to_plain,
)

from .devices import stage_device
from .host import HostBatch, one_thread, single_threaded
from .images import Item, collate_items, iter_webdataset, make_images
from .shards import (
    METADATA,
    CacheError,
    ShardWriter,
    finalize_cache,
    load_cache_meta,
    read_json_file,
    shard_complete,
    shard_name,
    shard_problem,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheResult:
    """Cache folders per layer, and what this run did."""

    cache_dirs: dict[str, str]
    n_images: int
    n_vectors: dict[str, int]
    images_per_s: float
    reused: bool


# --------------------------------------------------------------------------------------------
# Position sampling (pure)


def valid_mask(size: int, geometry, image_size: int, exclude_border: bool) -> torch.Tensor:
    """[size, size] bool: positions whose receptive field stays inside the image (or all)."""
    if not exclude_border or geometry is None:
        return torch.ones(size, size, dtype=torch.bool)
    c = geometry.offset + geometry.stride * torch.arange(size, dtype=torch.float64)
    half = geometry.rf_size / 2
    ok = (c - half >= 0) & (c + half <= image_size)
    return ok[:, None] & ok[None, :]


def sample_positions(norms_HW: torch.Tensor | None, sampling: str, k: int, mask_HW: torch.Tensor,
                     gen: torch.Generator) -> torch.Tensor:
    """Flat indices of the sampled positions of one image ([n] long, CPU), deterministic under
    gen (a CPU generator).

    norms_HW is the activation-vector norm at each position (used, and needed, only by
    norm_weighted; any device)."""
    flat_mask = mask_HW.flatten()
    idx = flat_mask.nonzero().squeeze(1)
    if sampling == "all" or k >= len(idx):
        return idx
    if sampling == "uniform":
        w = torch.ones(len(idx), dtype=torch.float64)
    elif sampling == "norm_weighted":
        # Norm-weighted sampling favours positions where the layer is active (as in recent
        # InceptionV1 SAE work); a tiny floor keeps all-zero maps sampleable.
        w = norms_HW.flatten().cpu()[idx].double() + 1e-12
    else:
        raise ValueError(f"cache.sampling={sampling!r}; choose all, uniform or norm_weighted")
    pick = torch.multinomial(w, k, replacement=False, generator=gen)
    return idx[pick.sort().values]


def sample_vectors(acts_BCHW: torch.Tensor, image_idx: list[int], sampling: str, k: int,
                   mask_HW: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled vectors of a batch of maps, ([B*n, C] float32 on the CPU, [B*n] flat
    positions), image by image; only these cross to the host, never the maps.

    The norms are computed and the vectors gathered on the maps' device. The draw itself stays
    on the host with one CPU generator per (seed, image): it needs only the [B, H, W] norms
    (norm_weighted; C times smaller than the maps, nothing at all for uniform and all), and it
    keeps sampling independent of batching, ranks and device. On the CPU the result is
    bit-identical to drawing from host copies of the maps; on a GPU a norm that rounds
    differently can, rarely, change a draw."""
    b, c = acts_BCHW.shape[:2]
    norms_BHW = (acts_BCHW.float().norm(dim=1).cpu() if sampling == "norm_weighted"
                 else [None] * b)
    flats = [sample_positions(n_HW, sampling, k, mask_HW,
                              torch.Generator().manual_seed(seed * 1_000_003 + i))
             for n_HW, i in zip(norms_BHW, image_idx)]
    flat_Bn = torch.stack(flats)  # every image shares the mask, so every n is the same
    index = flat_Bn.to(acts_BCHW.device, non_blocking=True)[:, None, :].expand(b, c, -1)
    vecs_BnC = acts_BCHW.flatten(2).gather(2, index).transpose(1, 2)
    return vecs_BnC.reshape(-1, c).float().cpu(), flat_Bn.flatten()


# --------------------------------------------------------------------------------------------
# The stage


def _layers(cfg: Config) -> list[str]:
    layers = list(cfg.cache.layers) if cfg.cache.layers else [cfg.layer.name]
    for layer in layers:
        check_layer(layer, cfg.model.family)
    return layers


def _meta_extra(cfg: Config, layer: str, model, n_shards: int, n_images_total: int) -> dict:
    return {
        "key": paths.cache_key(cfg, layer),
        "settings": paths.cache_settings(cfg, layer),
        "layer": layer,
        "dim": model.layer_dim(layer),
        "dtype": cfg.cache.dtype,
        "model": cfg.model.family,
        "model_name": cfg.model.name,
        "weights_sha256": getattr(model, "weights_sha256", None),
        "sampling": cfg.cache.sampling,
        "n_per_image": cfg.cache.n_per_image,
        "exclude_border": cfg.cache.exclude_border,
        "image_size": cfg.data.image_size,
        "data": to_plain(cfg.data),
        "n_shards": n_shards,
        "n_images_requested": n_images_total,
        "images_per_shard": cfg.cache.images_per_shard,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


class _ShardBatches:
    """Index batches of one shard (the `shard` attribute, set before each pass over a loader)."""

    def __init__(self, cfg: Config, n_total: int):
        self.per, self.bs, self.n_total, self.shard = (cfg.cache.images_per_shard,
                                                       cfg.cache.batch_size, n_total, 0)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.shard * self.per
        hi = min(lo + self.per, self.n_total)
        return (list(range(i, min(i + self.bs, hi))) for i in range(lo, hi, self.bs))

    def __len__(self) -> int:
        lo = self.shard * self.per
        return math.ceil(max(min(lo + self.per, self.n_total) - lo, 0) / self.bs)


def shard_loader(cfg: Config, dataset, todo: list[int], n_total: int
                  ) -> Iterator[tuple[int, Iterator[list[Item]]]]:
    """(shard, its batches of Items) for each shard in todo, decoded by DataLoader workers when
    configured; the workers persist from shard to shard instead of restarting for each."""
    sampler = _ShardBatches(cfg, n_total)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=collate_items, persistent_workers=cfg.data.num_workers > 0,
    )

    def batches(shard: int) -> Iterator[list[Item]]:
        sampler.shard = shard  # read when the pass starts, i.e. at the first batch
        yield from loader

    for s in todo:
        yield s, batches(s)


def _stream_shards(cfg: Config, skip: set[int]) -> Iterator[tuple[int, list[list[Item]]]]:
    """Group a webdataset image stream into shards (it cannot be indexed, so read in order)."""
    per, bs = cfg.cache.images_per_shard, cfg.cache.batch_size
    current, items = None, []
    for item in iter_webdataset(cfg.data):
        s = item.idx // per
        if s != current:
            if current is not None and current not in skip:
                yield current, [items[i:i + bs] for i in range(0, len(items), bs)]
            current, items = s, []
        if s not in skip:
            items.append(item)
    if current is not None and current not in skip and items:
        yield current, [items[i:i + bs] for i in range(0, len(items), bs)]


def run(cfg: Config, tracker: Tracker | None = None) -> CacheResult:
    """Cache activations of cfg.cache.layers (or cfg.layer.name); reuse or resume as needed."""
    from .models import load_model

    if cfg.data.name == "array":  # your own activations: no model, no images
        from .import_acts import import_array

        res = import_array(cfg)
        return CacheResult({ARRAY_LAYER: str(res.cache_dir)}, 0, {ARRAY_LAYER: res.n_vectors},
                           0.0, res.reused)
    tracker = tracker or disabled()
    layers = _layers(cfg)
    dirs = {layer: paths.cache_dir(cfg, layer) if len(layers) == 1 or not cfg.cache.dir
            else Path(cfg.cache.dir) / layer for layer in layers}
    if cfg.cache.verify and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("cache.verify=true runs in one process; run it without torchrun")
    reused = _reuse_or_repair(cfg, dirs)
    if reused is not None:
        return reused

    stage_device("cache", cfg.model.device, "model.device")
    model = load_model(cfg.model)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    dataset = make_images(cfg.data)
    n_total = len(dataset) if dataset is not None else cfg.data.n_images
    if dataset is None and n_total <= 0:
        raise ValueError("data=webdataset needs data.n_images > 0 so shards can be planned")
    n_shards = math.ceil(n_total / cfg.cache.images_per_shard)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine = [s for s in range(n_shards) if s % world == rank]
    done = {s for s in mine if all(shard_complete(d, s) for d in dirs.values())}
    todo = [s for s in mine if s not in done]
    logger.info(f"[cache] {len(layers)} layer(s), {n_total} images in {n_shards} shards; "
          f"rank {rank}/{world}: {len(done)} done, {len(todo)} to write")

    # layer.dim agrees with the layer name (check_config); the model's width is the truth here.
    # Both are computed once: a timm layer's geometry is probed with gradient passes.
    dims = {la: model.layer_dim(la) for la in layers}
    geoms = {la: _geometry(model, la) for la in layers}

    t0, n_img_done = time.perf_counter(), 0
    n_vec = dict.fromkeys(layers, 0)
    bar = Progress("cache", total=len(todo) * cfg.cache.images_per_shard, unit="img")
    host = HostBatch(next(model.parameters()).device)
    shard_iter = (shard_loader(cfg, dataset, todo, n_total) if dataset is not None
                  else _stream_shards(cfg, done | {s for s in range(n_shards) if s % world != rank}))
    for shard, batches in shard_iter:
        n_here = _write_shard(cfg, model, dirs, dims, geoms, shard, batches, n_total, n_vec, bar,
                              n_complete=len(done) + todo.index(shard), host=host)
        if n_here is None:  # another process holds this shard
            continue
        n_img_done += n_here
        tracker.log({"cache/images": n_img_done, "cache/vectors": sum(n_vec.values()),
                     "cache/images_per_s": n_img_done / (time.perf_counter() - t0),
                     "cache/shard": shard})
    bar.close()
    elapsed = time.perf_counter() - t0
    rate = n_img_done / elapsed if elapsed > 0 and n_img_done else 0.0

    metas = _finalize_when_complete(cfg, model, dirs, n_shards, n_total, rank)
    for la, d in dirs.items():
        logger.info(f"[cache] wrote {d} ({metas[la]['n_vectors'] if la in metas else '?'} vectors)")
    for la, m in metas.items():
        _refuse_empty(dirs[la], m)
    result = CacheResult({la: str(d) for la, d in dirs.items()}, n_total,
                         {la: m["n_vectors"] for la, m in metas.items()}, rate, False)
    tracker.summary({"cache/images_per_s": rate, **{f"cache/{la}/n_vectors": v
                                                    for la, v in result.n_vectors.items()}})
    return result


def _reuse_or_repair(cfg: Config, dirs: dict[str, Path]) -> CacheResult | None:
    """The result of a complete, undamaged cache, reused as it is; otherwise None, after removing
    the damaged shards' files (only those: the run rewrites them from the same images)."""
    bad = _damaged_shards(dirs, full=cfg.cache.verify)
    if not bad and all((d / METADATA).exists() for d in dirs.values()):
        metas = {la: load_cache_meta(d) for la, d in dirs.items()}
        for d, m in zip(dirs.values(), metas.values()):
            _refuse_empty(d, m)
        checked = (f" (verified {sum(len(m['shards']) for m in metas.values())} shard(s))"
                   if cfg.cache.verify else "")
        logger.info(f"[cache] reusing complete cache(s){checked}: "
                    f"{', '.join(map(str, dirs.values()))}")
        return CacheResult({la: str(d) for la, d in dirs.items()},
                           next(iter(metas.values()))["n_images"],
                           {la: m["n_vectors"] for la, m in metas.items()}, 0.0, True)
    for path, problem in bad:
        logger.info(f"[cache] {path} is {problem}: rewriting it")
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
    return None


def _write_shard(cfg: Config, model, dirs: dict[str, Path], dims: dict[str, int],
                 geoms: dict, shard: int, batches, n_total: int, n_vec: dict[str, int],
                 bar: Progress, n_complete: int, host: HostBatch) -> int | None:
    """Write one shard of every layer from its image batches, under the shard's lock; returns
    the images done (None when another process holds the shard). `dims` and `geoms` are each
    layer's width and geometry, `n_vec` counts vectors per layer, and `n_complete` (shards
    already complete) goes into the out-of-space message; `host` stacks the batches."""
    layers = list(dirs)
    n_img_done = 0
    # One lock per shard, in the first layer's folder: every layer's shard is written together.
    lock = dirs[layers[0]] / f"{shard_name(shard)}.lock"
    with ExitStack() as stack:
        held = io.try_lock(lock)
        if held is None:
            logger.info(f"[cache] shard {shard} is being written by another process; skipping it")
            return None
        stack.callback(held.release)
        for d in dirs.values():  # we own the shard now: temps left by a killed run are stale
            io.drop_stale_tmp(d, any_pid=True, name=shard_name(shard).replace(".tar", ""))
        writers = {la: ShardWriter(dirs[la], shard, dims[la], cfg.cache.dtype) for la in layers}
        try:
            skipped, seen = [], []
            if cfg.data.num_workers == 0:
                batches = single_threaded(batches)
            for items in batches:
                good = [it for it in items if it.image is not None]
                skipped += [{"idx": it.idx, "source": it.source, "error": it.error}
                            for it in items if it.image is None]
                for it in items:
                    if it.image is None:
                        logger.warning(f"[cache] skipped unreadable image {it.source}: {it.error}")
                seen += [it.idx for it in items]
                if not good:
                    continue
                x = host([it.image for it in good])
                with torch.inference_mode():
                    acts = model.activations(x, layers)
                with one_thread():  # small ops: as for decoding (same bytes either way)
                    for la in layers:
                        n_vec[la] += _write_chunk(writers[la], acts[la], good, cfg, geoms[la])
                n_img_done += len(items)
                bar.set({"shard": shard, "vectors": sum(n_vec.values())})
                bar.update(len(items))
            rng = (shard * cfg.cache.images_per_shard,
                   min((shard + 1) * cfg.cache.images_per_shard, n_total))
            for la in layers:
                writers[la].finish(rng, len(seen) - len(skipped), skipped)
        except BaseException as e:
            for w in writers.values():
                w.abort()
            if isinstance(e, OSError) and e.errno in io.DISK_FULL:
                raise CacheError(
                    f"no space left while writing shard {shard} of {dirs[layers[0]]} ({e}); "
                    f"{n_complete} complete shard(s) are kept: free space "
                    "(or point paths.root elsewhere) and rerun the same command to resume"
                ) from e
            raise
    return n_img_done


def _damaged_shards(dirs: dict[str, Path], full: bool) -> list[tuple[Path, str]]:
    """(tar path, problem) of every damaged shard: against metadata.json in a finished cache,
    against its sidecar in an unfinished one. `full` hashes every shard; otherwise only the
    cheap checks run (present, size, sidecar agrees)."""
    bad = []
    for d in dirs.values():
        distrust = _untrusted_metadata(d) if full and (d / METADATA).exists() else None
        if distrust:  # nothing it records can be relied on: every shard is rebuilt
            bad.append((d / METADATA, distrust))
            bad += [(tar, "listed by an untrusted metadata.json")
                    for tar in sorted(d.glob("shard-*.tar"))]
            continue
        if (d / METADATA).exists():
            entries = load_cache_meta(d)["shards"]
        elif full:  # an unfinished cache: its complete shards are checked against their sidecars
            entries = []
            for side in sorted(d.glob("shard-*.json")):
                try:
                    entries.append(read_json_file(side))
                except (OSError, ValueError):
                    bad.append((side.with_suffix(".tar"), f"without a readable sidecar {side.name}"))
            entries = [e for e in entries if shard_complete(d, e["index"])]
        else:
            continue  # resuming checks sizes already
        if full:
            logger.info(f"[cache] verifying {len(entries)} shard(s) of {d}")
        for entry in entries:
            problem = shard_problem(d, entry, full=full)
            if problem:
                bad.append((d / entry["name"], problem))
    return bad


def _untrusted_metadata(cache_dir: Path) -> str | None:
    """Why a finished cache's metadata.json cannot be trusted (unreadable, or its recorded
    settings do not produce its own key), or None."""
    try:
        meta = load_cache_meta(cache_dir)
        settings, key = meta.get("settings"), meta.get("key")
        if settings is None and key is None:
            return None  # written before caches recorded their settings
        if not isinstance(settings, dict) or paths.key_of_settings(settings) != key:
            return (f"untrusted: its recorded settings do not produce its key {key!r}; "
                    "rebuilding the cache from the images")
    except (CacheError, KeyError, TypeError, ValueError) as e:
        return f"untrusted ({e}); rebuilding the cache from the images"
    return None


def _refuse_empty(cache_dir: Path, meta: dict) -> None:
    """A cache without a single vector is an error, naming what went wrong with the images."""
    if meta["n_vectors"] > 0:
        return
    skipped = meta.get("skipped", [])
    first = "; ".join(f"{s['source']}: {s['error']}" for s in skipped[:3])
    raise CacheError(
        f"the cache {cache_dir} holds no vectors: {meta.get('n_images_requested', '?')} image(s) "
        f"tried, {len(skipped)} unreadable (first: {first or 'none'}); the full list is under "
        f"`skipped` in {cache_dir / METADATA}. Point data.root at readable images, delete "
        f"{cache_dir} and rerun stage=cache")


def _geometry(model, layer):
    try:
        return model.geometry(layer)
    except (NotImplementedError, ValueError, KeyError):
        return None


def _write_chunk(writer: ShardWriter, acts_BCHW: torch.Tensor, items: list[Item], cfg: Config,
                 geom) -> int:
    """Sample positions per image and append them to the shard as one record."""
    _, _, h, w = acts_BCHW.shape
    mask = valid_mask(h, geom, cfg.data.image_size, cfg.cache.exclude_border)
    acts_ND, flat = sample_vectors(acts_BCHW, [it.idx for it in items], cfg.cache.sampling,
                                   cfg.cache.n_per_image, mask, cfg.seed)
    n = len(flat) // max(len(items), 1)
    idx = np.repeat(np.array([it.idx for it in items], dtype=np.int64), n)
    pos = np.stack([idx, (flat // w).numpy(), (flat % w).numpy()], 1)
    writer.add(acts_ND, pos.astype(np.int32), {it.idx: it.source for it in items})
    return len(acts_ND)


def _finalize_when_complete(cfg: Config, model, dirs: dict[str, Path], n_shards: int,
                            n_total: int, rank: int, timeout_s: float = 24 * 3600) -> dict:
    """Rank 0 (or a lone process) waits for every shard, then writes each metadata.json last."""
    metas = {}
    if rank != 0:
        return metas
    t0 = time.time()
    while not all(shard_complete(d, s) for d in dirs.values() for s in range(n_shards)):
        # Another process (a second rank or a concurrent run) holds the missing shards.
        missing = [s for s in range(n_shards) if not all(shard_complete(d, s)
                                                        for d in dirs.values())]
        live = [s for s in missing if any(io.lock_held(d / f"{shard_name(s)}.lock")
                                          for d in dirs.values())]
        if not live:
            raise CacheError(
                f"shards {missing[:10]} of {list(dirs.values())[0]} are missing and nobody is "
                "writing them; rerun the same command to resume")
        if time.time() - t0 > timeout_s:
            raise CacheError(f"timed out waiting for shards {missing[:10]}")
        time.sleep(0.5)
    for la, d in dirs.items():
        extra = _meta_extra(cfg, la, model, n_shards, n_total)
        if (d / METADATA).exists():
            metas[la] = json.loads((d / METADATA).read_text())
            sides = [json.loads((d / shard_name(s)).with_suffix(".json").read_text())
                     for s in range(n_shards)]
            if all(e["sha256"] == si["sha256"] and e["bytes"] == si["bytes"]
                   for e, si in zip(metas[la]["shards"], sides)):
                continue  # a repaired shard came out byte-identical: metadata.json stays as is
            # Not deterministic here (e.g. another GPU): record the rewritten shards' bytes.
            logger.warning(f"[cache] rewritten shard(s) of {d} differ from the recorded bytes; "
                  "rewriting metadata.json")
            extra["created"] = metas[la].get("created", extra["created"])
        metas[la] = finalize_cache(d, n_shards, extra)
    return metas
