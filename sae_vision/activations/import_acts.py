"""Your own activations in: an array on disk becomes an activation cache every stage accepts.

    python run.py stage=cache data=array data.path=acts.npy          # or .safetensors, or a folder
    python run.py stage=train data=array data.path=acts.npy sae=topk
    python run.py stage=evaluate data=array data.path=acts.npy

The array is [N, D] (any width D), or [..., D] with the leading axes flattened, e.g. [N, H, W, C]
channels-last maps. A folder is read file by file in sorted name order (every file the same D).
`.npy` files are memory-mapped with `allow_pickle=False` and `.safetensors` read with safetensors,
so nothing in the data is ever executed. A `.safetensors` file with several tensors needs one
named `acts`.

The cache is named by the files' paths, sizes and modification times (`array-<hash>`), and it
records the files as its provenance. Vector i's position record is (i, 0, 0): its row in the
concatenated input. Stages that need the source images (the splice, dataset examples, the curve
census) are skipped on such a cache with a note.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_vision.core import ARRAY_LAYER, Config, array_files, files_identity, paths, to_plain

from .shards import CacheError, ShardWriter, finalize_cache, load_cache_meta, shard_complete

MAX_VECTORS_PER_SHARD = 65_536  # at most this many vectors per shard
MIN_SHARDS = 10  # small arrays still get enough shards for a held-out split
CHUNK = 16_384  # vectors per tar record


@dataclass(frozen=True)
class ArrayResult:
    """What the array import produced."""

    cache_dir: Path
    n_vectors: int
    dim: int
    reused: bool


def open_array(path: Path) -> np.ndarray:
    """A [N, D] view of one file (memory-mapped for .npy); never unpickles anything."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:  # object arrays need pickle: refuse them
            raise ValueError(f"{path} cannot be read without pickle ({e}); save a numeric "
                             "array with np.save") from None
    else:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if len(tensors) == 1:
            arr = next(iter(tensors.values()))
        elif "acts" in tensors:
            arr = tensors["acts"]
        else:
            raise ValueError(f"{path} holds tensors {sorted(tensors)}; name the activations "
                             "'acts' or save one tensor per file")
    if arr.ndim < 2 or arr.dtype.kind not in "fiu":
        raise ValueError(f"{path} holds a {arr.dtype} array of shape {arr.shape}; need a "
                         "numeric [N, D] (or [..., D]) array")
    return arr.reshape(-1, arr.shape[-1])


def _rows(files: list[Path]) -> Iterator[np.ndarray]:
    for f in files:
        arr = open_array(f)
        for lo in range(0, len(arr), CHUNK):
            yield np.asarray(arr[lo:lo + CHUNK])


def import_array(cfg: Config) -> ArrayResult:
    """Write (or reuse) the cache for cfg.data.path; the cache stage's data=array route."""
    if not cfg.data.path:
        raise ValueError("data=array needs data.path=/path/to/acts.npy (a .npy or .safetensors "
                         "file, or a folder of them)")
    files = array_files(cfg.data.path)
    arrays = [open_array(f) for f in files]
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise ValueError(f"data.path={cfg.data.path}: files have different widths {sorted(dims)}")
    dim = dims.pop()
    n_total = sum(len(a) for a in arrays)
    if n_total < 2:
        raise ValueError(f"data.path={cfg.data.path} holds {n_total} vector(s); need at least 2")
    if cfg.layer.dim and cfg.layer.dim != dim:
        raise ValueError(f"layer.dim={cfg.layer.dim} but {cfg.data.path} holds {dim}-d vectors; "
                         "drop the layer.dim override")
    d = paths.cache_dir(cfg, ARRAY_LAYER)
    if (d / "metadata.json").exists():
        meta = load_cache_meta(d)
        print(f"cache: reusing {d} ({meta['n_vectors']} vectors of dim {meta['dim']})")
        return ArrayResult(d, int(meta["n_vectors"]), int(meta["dim"]), True)
    d.mkdir(parents=True, exist_ok=True)
    per_shard = min(MAX_VECTORS_PER_SHARD, math.ceil(n_total / MIN_SHARDS))
    per_shard = math.ceil(per_shard / CHUNK) * CHUNK if per_shard > CHUNK else per_shard
    n_shards = math.ceil(n_total / per_shard)
    t0 = time.perf_counter()
    row = 0
    pending = np.zeros((0, dim), np.float32)
    rows = _rows(files)
    for index in range(n_shards):
        lo, hi = index * per_shard, min((index + 1) * per_shard, n_total)
        while len(pending) < hi - lo:
            pending = np.concatenate([pending, next(rows).astype(np.float32, copy=False)])
        block, pending = pending[:hi - lo], pending[hi - lo:]
        if shard_complete(d, index):  # a killed import resumes at the first missing shard
            row = hi
            continue
        if not np.isfinite(block).all():
            raise CacheError(f"{cfg.data.path} holds NaN/Inf in rows {lo}..{hi - 1}; clean "
                             "the array first")
        writer = ShardWriter(d, index, dim, cfg.cache.dtype)
        try:
            for c in range(0, len(block), CHUNK):
                part = block[c:c + CHUNK]
                pos = np.zeros((len(part), 3), np.int32)
                pos[:, 0] = np.arange(row + c, row + c + len(part))
                writer.add(torch.from_numpy(np.ascontiguousarray(part)), pos, {})
            writer.finish((lo, hi), 0, [])
        except BaseException:
            writer.abort()
            raise
        row = hi
    meta = finalize_cache(d, n_shards, {
        "key": paths.cache_key(cfg, ARRAY_LAYER),
        "settings": paths.cache_settings(cfg, ARRAY_LAYER),
        "layer": ARRAY_LAYER,
        "dim": dim,
        "dtype": cfg.cache.dtype,
        "model": None,
        "source": "array",
        "files": files_identity(cfg.data.path),
        "data": to_plain(cfg.data),
        "n_shards": n_shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    print(f"cache: wrote {d} ({meta['n_vectors']} vectors of dim {dim}, {n_shards} shards, "
          f"{time.perf_counter() - t0:.1f} s)")
    sys.stdout.flush()
    return ArrayResult(d, int(meta["n_vectors"]), dim, False)


def is_array_cache(cache_meta: dict) -> bool:
    """True for a cache imported from arrays (no images behind its vectors)."""
    return cache_meta.get("source") == "array"
