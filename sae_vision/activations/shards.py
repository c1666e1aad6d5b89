"""Activation caches on disk: sharded webdataset tars of vector chunks, plus metadata.json.

Layout of a cache folder:
    shard-000000.tar   records of chunks: acts.npy [N, D], pos.npy [N, 3] int32 (image, y, x),
                       src.json {image_idx: source}
    shard-000000.json  per-shard sidecar (counts, sums for mean/std, sha256), written after the tar
    metadata.json      merged description, written last: its presence means "complete"

Records hold whole chunks because webdataset reads large records at hundreds of MB/s but tiny
ones at a few MB/s; individual vectors are shuffled in memory instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from sae_vision.core import PendingWrite, write_json

METADATA = "metadata.json"
FORMAT_VERSION = 1
# The command that checks every shard of a cache and rewrites the damaged ones.
REPAIR_HINT = ("rerun the same `python run.py stage=cache ...` command with cache.verify=true "
               "to check every shard and rewrite the damaged ones")


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupt, or not the one the caller asked for."""


# --------------------------------------------------------------------------------------------
# Encoding


def to_storage(acts_ND: torch.Tensor, dtype: str) -> np.ndarray:
    """Tensor to the numpy array stored on disk (bfloat16 kept as its uint16 bit pattern)."""
    if dtype == "bfloat16":
        return acts_ND.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return acts_ND.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy array back to a float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.float()


def shard_name(i: int) -> str:
    """File name of shard i."""
    return f"shard-{i:06d}.tar"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes one shard atomically and accumulates the statistics its sidecar records."""

    def __init__(self, cache_dir: str | os.PathLike, index: int, dim: int, dtype: str):
        self.dir = Path(cache_dir)
        self.index, self.dim, self.dtype = index, dim, dtype
        self.path = self.dir / shard_name(index)
        self._pending = PendingWrite(self.path)
        self.tmp = self._pending.tmp
        self._stream = open(self.tmp, "wb")
        # A fixed mtime makes the tar a pure function of its records: a rewritten shard is
        # byte-identical to the original, so its recorded sha256 still holds.
        self._tar = wds.TarWriter(self._stream, mtime=0.0)
        self.n_records = self.n_vectors = 0
        self.images: set[int] = set()
        self.sum_D = np.zeros(dim, np.float64)
        self.sumsq_D = np.zeros(dim, np.float64)
        self.norm_sum = 0.0

    def add(self, acts_ND: torch.Tensor, pos_N3: np.ndarray, sources: dict[int, str]) -> None:
        """Append a chunk of vectors with their (image_idx, y, x) provenance."""
        if acts_ND.shape[1] != self.dim:
            raise ValueError(f"chunk has dim {acts_ND.shape[1]}, cache expects {self.dim}")
        stored = to_storage(acts_ND, self.dtype)
        # Statistics from the stored values, so normalisation matches what readers will see.
        x = from_storage(stored, self.dtype).double()
        self.sum_D += x.sum(0).numpy()
        self.sumsq_D += (x * x).sum(0).numpy()
        self.norm_sum += float(x.norm(dim=1).sum())
        self._tar.write({
            "__key__": f"{self.index:06d}-{self.n_records:05d}",
            "acts.npy": stored,
            "pos.npy": np.asarray(pos_N3, dtype=np.int32),
            "src.json": {str(k): v for k, v in sources.items()},
        })
        self.n_records += 1
        self.n_vectors += len(stored)
        self.images.update(int(i) for i in np.unique(pos_N3[:, 0])) if len(pos_N3) else None

    def finish(self, image_range: tuple[int, int], n_images: int, skipped: list[dict]) -> dict:
        """Close, fsync and publish the tar, then its sidecar; returns the sidecar dict."""
        self._tar.close()  # also closes the underlying stream
        info = {
            "name": self.path.name,
            "index": self.index,
            "n_vectors": self.n_vectors,
            "n_images": n_images,
            "image_range": list(image_range),
            "bytes": self.tmp.stat().st_size,
            "sha256": sha256_file(self.tmp),
            "sum": self.sum_D.tolist(),
            "sumsq": self.sumsq_D.tolist(),
            "norm_sum": self.norm_sum,
            "skipped": skipped,
        }
        self._pending.commit()
        write_json(self.path.with_suffix(".json"), info, strict=False)
        return info

    def abort(self) -> None:
        """Drop the temporary file (used when the writer fails half way)."""
        try:
            self._tar.close()
        except Exception:  # noqa: BLE001 - best effort on an already-failing path
            pass
        self._pending.abort()


def read_json_file(path: str | os.PathLike):
    """A JSON file's content; a FIFO or device in its place is a ValueError, never a read that
    blocks or never ends."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise ValueError(f"{p} is not a regular file")
    return json.loads(p.read_text())


def shard_complete(cache_dir: str | os.PathLike, index: int) -> bool:
    """A shard counts only when its sidecar exists and the tar has the recorded size."""
    d = Path(cache_dir)
    side = d / shard_name(index).replace(".tar", ".json")
    tar = d / shard_name(index)
    if not side.exists() or not tar.exists():
        return False
    try:
        info = read_json_file(side)
    except (ValueError, OSError):
        return False
    return tar.stat().st_size == info.get("bytes")


def finalize_cache(cache_dir: str | os.PathLike, n_shards: int, meta_extra: dict) -> dict:
    """Merge the shard sidecars into metadata.json (written last). All shards must be complete."""
    d = Path(cache_dir)
    missing = [i for i in range(n_shards) if not shard_complete(d, i)]
    if missing:
        raise CacheError(f"cannot finalise {d}: shards {missing[:10]} are not complete yet")
    infos = [json.loads((d / shard_name(i).replace(".tar", ".json")).read_text())
             for i in range(n_shards)]
    dim = int(meta_extra["dim"])
    total = sum(i["n_vectors"] for i in infos)
    sum_D = np.sum([i["sum"] for i in infos], axis=0) if infos else np.zeros(dim)
    sumsq_D = np.sum([i["sumsq"] for i in infos], axis=0) if infos else np.zeros(dim)
    mean = sum_D / max(total, 1)
    var = np.maximum(sumsq_D / max(total, 1) - mean**2, 0.0)
    skipped = [s for i in infos for s in i["skipped"]]
    meta = {
        "format_version": FORMAT_VERSION,
        **meta_extra,
        "n_vectors": total,
        "n_images": sum(i["n_images"] for i in infos),
        "n_skipped": len(skipped),
        "skipped": skipped,
        "mean": mean.tolist(),
        "std": np.sqrt(var).tolist(),
        "mean_norm": sum(i["norm_sum"] for i in infos) / max(total, 1),
        "mean_sq_norm": float(sumsq_D.sum() / max(total, 1)),
        "shards": [{k: i[k] for k in ("name", "n_vectors", "n_images", "image_range", "bytes",
                                      "sha256")} for i in infos],
    }
    write_json(d / METADATA, meta, strict=False)
    return meta


def write_cache(cache_dir: str | os.PathLike, chunks: Iterable[tuple], meta_extra: dict,
                chunks_per_shard: int = 1) -> dict:
    """Write (acts_ND, pos_N3, sources) chunks as a complete cache (tests, synthetic data)."""
    d = Path(cache_dir)
    d.mkdir(parents=True, exist_ok=True)
    dim, dtype = int(meta_extra["dim"]), meta_extra.get("dtype", "float32")
    meta_extra = {"dtype": dtype, **meta_extra}
    writer, n_shards, in_shard = None, 0, 0
    for acts, pos, src in chunks:
        if writer is None:
            writer, in_shard = ShardWriter(d, n_shards, dim, dtype), 0
        writer.add(torch.as_tensor(acts), np.asarray(pos), src)
        in_shard += 1
        if in_shard == chunks_per_shard:
            _finish_simple(writer)
            writer, n_shards = None, n_shards + 1
    if writer is not None:
        _finish_simple(writer)
        n_shards += 1
    return finalize_cache(d, n_shards, meta_extra)


def _finish_simple(writer: ShardWriter) -> None:
    lo, hi = (min(writer.images), max(writer.images) + 1) if writer.images else (0, 0)
    writer.finish((lo, hi), len(writer.images), [])


# --------------------------------------------------------------------------------------------
# Reading

# The only members a shard may hold, and how each is decoded. webdataset's default decode step
# would unpickle .pyd/.pkl/.pickle and torch.load .pth members: a shard from a colleague or a
# shared filesystem could run code. Nothing else is ever decoded.
MEMBERS = ("acts.npy", "pos.npy", "src.json")


def decode_record(sample: dict, shard: str | os.PathLike) -> dict:
    """Decode one raw webdataset sample of our own member types; anything else is a CacheError."""
    out = {}
    for key, raw in sample.items():
        if key.startswith("__"):  # webdataset bookkeeping (__key__, __url__, __local_path__)
            out[key] = raw
        elif key.endswith(".npy") and key in MEMBERS:
            out[key] = np.load(io.BytesIO(raw), allow_pickle=False)
        elif key.endswith(".json") and key in MEMBERS:
            out[key] = json.loads(raw)
        else:
            raise CacheError(
                f"shard {shard} holds a member {sample.get('__key__', '?')}.{key} that this cache "
                f"never writes (only {', '.join(MEMBERS)}); it was not decoded. The cache was "
                f"altered: {REPAIR_HINT}")
    missing = [m for m in MEMBERS if m not in out]
    if missing:
        raise CacheError(f"shard {shard} record {sample.get('__key__', '?')} lacks {missing}; "
                         f"{REPAIR_HINT}")
    return out


def read_shard(path: str | os.PathLike) -> Iterator[dict]:
    """Records of one shard, decoded by decode_record (never by webdataset's default handlers)."""
    # Ranks already read disjoint slices upstream; webdataset must not split shards again.
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False,
                        nodesplitter=None, workersplitter=None)
    for sample in ds:
        yield decode_record(sample, path)


def load_cache_meta(cache_dir: str | os.PathLike, expect: dict | None = None) -> dict:
    """Read metadata.json, refusing a missing/incomplete cache or one for another layer/model/dim."""
    d = Path(cache_dir)
    path = d / METADATA
    if not path.exists():
        partial = sorted(p.name for p in d.glob("shard-*.tar")) if d.exists() else []
        hint = (f"it holds {len(partial)} shard(s) but no metadata.json: the caching run did not "
                "finish; rerun the same `python run.py stage=cache ...` command to resume it"
                if partial else "run `python run.py stage=cache` with the same model/layer/data "
                "settings first")
        raise CacheError(f"no complete activation cache at {d}: {hint}")
    if not path.is_file():
        raise CacheError(f"{path} is not a regular file (a FIFO, device or folder); delete it "
                         "and rerun stage=cache")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); delete it and rerun stage=cache") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise CacheError(f"{path} holds {json.dumps(meta)[:40]}, not a cache's metadata (an "
                         "object with a shards list); delete it and rerun stage=cache")
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if want is not None and have != want:
            raise CacheError(
                f"cache {d} was built for {key}={have!r} but this run needs {key}={want!r}; "
                f"point cache.dir at a cache built for {want!r} or rerun stage=cache"
            )
    return meta


def split_shards(meta: dict, holdout_frac: float) -> tuple[list[str], list[str]]:
    """Deterministic train/held-out split by shard (the last shards are held out)."""
    names = [s["name"] for s in meta["shards"]]
    n_hold = int(round(len(names) * holdout_frac))
    if holdout_frac > 0 and n_hold == 0:
        n_hold = 1
    if n_hold >= len(names) and names:
        raise CacheError(
            f"cache has {len(names)} shard(s): too few to hold out {holdout_frac:.0%} for "
            "evaluation; cache more images or lower cache.images_per_shard"
        )
    return names[: len(names) - n_hold], names[len(names) - n_hold:]


def shard_problem(cache_dir: str | os.PathLike, entry: dict, full: bool = True) -> str | None:
    """What is wrong with one shard against its recorded entry (None when nothing is).

    `entry` is the shard's line in metadata.json (or its sidecar): name, bytes, sha256. The cheap
    checks (present, size, sidecar agrees) always run; `full` adds the sha256 of the bytes."""
    p = Path(cache_dir) / entry["name"]
    if not p.exists():
        return "missing"
    if not p.is_file():  # a FIFO or a link to a device would block or never end a read
        return "not a regular file"
    size, want = p.stat().st_size, entry["bytes"]
    if size != want:
        return f"{'truncated' if size < want else 'grown'} ({size} bytes, {want} recorded)"
    side = p.with_suffix(".json")
    try:
        info = read_json_file(side)
    except (OSError, ValueError):
        return f"without a readable sidecar {side.name}"
    if info.get("sha256") != entry["sha256"] or info.get("bytes") != want:
        return f"at odds with its sidecar {side.name}"
    if full and sha256_file(p) != entry["sha256"]:
        return "corrupt (its sha256 is not the recorded one)"
    if full:
        return foreign_member(p)
    return None


def foreign_member(path: str | os.PathLike) -> str | None:
    """What a shard holds that this cache never writes (a member other than MEMBERS, or a link
    or folder), or None. Reads the tar headers only: nothing is decoded."""
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                ext = m.name.rsplit("/", 1)[-1].split(".", 1)[-1]
                if not m.isfile() or ext not in MEMBERS:
                    return (f"holding a member {m.name} that this cache never writes "
                            f"(only {', '.join(MEMBERS)})")
    except (tarfile.TarError, OSError) as e:
        return f"not a readable tar ({type(e).__name__}: {e})"
    return None


# Shards whose sha256 this process has checked, by path -> (inode, size, mtime, sha256):
# each shard is hashed once per process, on first open, and again only if its file changes.
_VERIFIED: dict[str, tuple] = {}


def verify_shard(cache_dir: str | os.PathLike, entry: dict) -> None:
    """Raise CacheError naming the shard and the repair command unless its bytes are the recorded
    ones (sha256 and size, against metadata.json and the sidecar); memoised per process."""
    p = Path(cache_dir) / entry["name"]
    try:
        st = p.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, entry["sha256"])
    except FileNotFoundError:
        stamp = None
    key = str(p.resolve())
    if stamp is not None and _VERIFIED.get(key) == stamp:
        return
    problem = shard_problem(cache_dir, entry, full=True)
    if problem:
        raise CacheError(f"shard {p} is {problem}; {REPAIR_HINT}")
    _VERIFIED[key] = stamp


def _entries(d: Path, meta: dict, names: Sequence[str]) -> list[dict]:
    """metadata.json entries of `names`; a name the cache does not hold is an error."""
    by_name = {s["name"]: s for s in meta["shards"]}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise CacheError(f"cache {d} has no shard(s) {unknown[:5]}; its metadata.json lists "
                         f"{len(by_name)} shards")
    entries = [by_name[n] for n in names]
    # Cheap checks for every shard up front, so a missing or cut shard fails before any work.
    for e in entries:
        problem = shard_problem(d, e, full=False)
        if problem:
            raise CacheError(f"shard {d / e['name']} is {problem}; {REPAIR_HINT}")
    return entries


def iter_chunks(cache_dir: str | os.PathLike, shards: Sequence[str] | None = None,
                with_pos: bool = False, shuffle_shards: bool = False,
                seed: int = 0) -> Iterator[tuple]:
    """Yield (acts_ND float32, pos_N3 or None, sources or None) chunk by chunk with webdataset.

    Each shard's sha256 is checked when this process first opens it."""
    d = Path(cache_dir)
    meta = load_cache_meta(d)
    entries = _entries(d, meta, list(shards) if shards is not None else
                       [s["name"] for s in meta["shards"]])
    if shuffle_shards:
        random.Random(seed).shuffle(entries)
    dtype = meta["dtype"]
    for entry in entries:
        verify_shard(d, entry)
        path = d / entry["name"]
        try:
            for rec in read_shard(path):
                acts = from_storage(rec["acts.npy"], dtype)
                if with_pos:
                    yield acts, rec["pos.npy"], rec.get("src.json")
                else:
                    yield acts, None, None
        except (tarfile.TarError, OSError, ValueError, KeyError) as e:
            raise CacheError(f"shard {path} is corrupt ({type(e).__name__}: {e}); "
                             f"{REPAIR_HINT}") from e


def load_vectors(cache_dir: str | os.PathLike, shards: Sequence[str] | None = None,
                 max_vectors: int | None = None, with_pos: bool = False):
    """Load (up to max_vectors of) the chosen shards into one float32 [N, D] tensor."""
    acts, pos, n = [], [], 0
    for a, p, _ in iter_chunks(cache_dir, shards, with_pos=with_pos):
        if max_vectors is not None and n + len(a) > max_vectors:
            a = a[: max_vectors - n]
            p = p[: len(a)] if p is not None else None
        acts.append(a)
        pos.append(p)
        n += len(a)
        if max_vectors is not None and n >= max_vectors:
            break
    if not acts:
        raise CacheError(f"no vectors found in {cache_dir} (shards={shards})")
    acts_ND = torch.cat(acts)
    if with_pos:
        return acts_ND, np.concatenate(pos).astype(np.int64)
    return acts_ND


def load_sources(cache_dir: str | os.PathLike, shards: Sequence[str] | None = None) -> dict:
    """image_idx -> source string, over the chosen shards."""
    out: dict[int, str] = {}
    for _, _, src in iter_chunks(cache_dir, shards, with_pos=True):
        out.update({int(k): v for k, v in (src or {}).items()})
    return out


def stream_vectors(cache_dir: str | os.PathLike, shards: Sequence[str] | None, batch_size: int,
                   shuffle_buffer: int = 262_144, seed: int = 0,
                   epochs: int | None = None) -> Iterator[torch.Tensor]:
    """Endless (or `epochs`) stream of shuffled [batch, D] float32 batches in bounded memory.

    Shards are shuffled per epoch. Vectors pass through a preallocated reservoir of
    `shuffle_buffer` rows: each incoming row takes a random slot and evicts its occupant, so the
    work per chunk is O(chunk), not O(buffer). Every vector is emitted once per epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    buf: torch.Tensor | None = None
    n_buf, epoch = 0, 0
    carry = None  # emitted rows not yet forming a whole batch

    def emit(rows: torch.Tensor) -> Iterator[torch.Tensor]:
        nonlocal carry
        rows = rows if carry is None else torch.cat([carry, rows])
        n_full = len(rows) // batch_size * batch_size
        if n_full:  # split() of an empty tensor would yield one empty batch
            yield from rows[:n_full].split(batch_size)
        carry = rows[n_full:] if n_full < len(rows) else None

    while epochs is None or epoch < epochs:
        for acts, _, _ in iter_chunks(cache_dir, shards, shuffle_shards=True, seed=seed + epoch):
            if buf is None:
                buf = torch.empty(max(shuffle_buffer, 1), acts.shape[1])
            take = min(len(acts), len(buf) - n_buf)
            buf[n_buf:n_buf + take] = acts[:take]
            n_buf += take
            for rest in (acts[take:].split(len(buf)) if take < len(acts) else ()):
                slots = torch.randperm(len(buf), generator=gen)[: len(rest)]
                out = buf[slots]  # advanced indexing copies the evicted rows
                buf[slots] = rest
                yield from emit(out)
        epoch += 1
    if n_buf:
        yield from emit(buf[:n_buf][torch.randperm(n_buf, generator=gen)])
