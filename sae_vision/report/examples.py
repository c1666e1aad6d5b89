"""Dataset examples: the top-k and a random sample of activating patches per unit, in one pass.

A "unit" is an SAE feature or a neuron (a channel of the layer). One streaming pass over an
activation cache folds every chunk into a fixed-size state per unit:
- the top-k activations (a running merge: torch.topk over the k kept plus the chunk's candidates);
- a uniform sample of activating vectors (bottom-r random keys, which is reservoir sampling in a
  form that merges exactly like the top-k);
- activation counts and sums, so the density of every unit comes for free.
Memory is O(units x (k + r)) whatever the size of the cache.

Positions come from the cache's provenance (image_idx, y, x); the patch shown for a position is
exactly its receptive field in the source image, re-created from the data config by image index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_vision.core import atomic_write

# Positions are packed into one int64 so a merge gathers one tensor instead of three.
_Y_BITS = _X_BITS = 16
NO_POS = -1  # code of an empty slot (fewer activating vectors than slots so far)
GREY = 0.5  # fill for the part of a receptive field that lies outside the image


def pack_pos(pos_N3: torch.Tensor) -> torch.Tensor:
    """(image_idx, y, x) rows -> one int64 code per row."""
    pos = pos_N3.long()
    return (pos[:, 0] << (_Y_BITS + _X_BITS)) | (pos[:, 1] << _X_BITS) | pos[:, 2]


def unpack_pos(code: torch.Tensor) -> torch.Tensor:
    """int64 codes -> (..., 3) rows of (image_idx, y, x); empty slots give -1s."""
    img = code >> (_Y_BITS + _X_BITS)
    y = (code >> _X_BITS) & ((1 << _Y_BITS) - 1)
    x = code & ((1 << _X_BITS) - 1)
    out = torch.stack([img, y, x], -1)
    return torch.where((code == NO_POS)[..., None], torch.full_like(out, -1), out)


def merge_topk(key_FK: torch.Tensor, payload: list[torch.Tensor], new_key_FN: torch.Tensor,
               new_payload: list[torch.Tensor], k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Keep the k largest keys per row of [kept | new] candidates, carrying payload tensors along.

    payload[i] is [F, K] (kept); new_payload[i] is [F, N] or [N] (shared by every row).
    """
    n_kept = key_FK.shape[1]
    cand = torch.cat([key_FK, new_key_FN], 1)
    top_key, top_i = cand.topk(min(k, cand.shape[1]), dim=1)
    from_kept = top_i < n_kept
    kept_i, new_i = top_i.clamp(max=max(n_kept - 1, 0)), (top_i - n_kept).clamp(min=0)
    out = []
    for old, new in zip(payload, new_payload):
        new_g = new[new_i] if new.dim() == 1 else new.gather(1, new_i)
        old_g = old.gather(1, kept_i) if n_kept else new_g
        out.append(torch.where(from_kept, old_g, new_g))
    return top_key, out


@dataclass(frozen=True)
class UnitExamples:
    """Top and random activating positions of every unit of one dictionary (CPU tensors)."""

    top_val_FK: torch.Tensor  # float32, descending; -inf in empty slots
    top_pos_FK3: torch.Tensor  # int64 (image_idx, y, x); -1 in empty slots
    rand_val_FR: torch.Tensor  # float32 activations of the random sample; nan in empty slots
    rand_pos_FR3: torch.Tensor  # int64; -1 in empty slots
    n_active_F: torch.Tensor  # int64: vectors with activation > 0
    sum_F: torch.Tensor  # float64: sum of activations (mean activation = sum / n_vectors)
    n_vectors: int  # vectors seen

    @property
    def density_F(self) -> torch.Tensor:
        """Fraction of vectors on which each unit is active."""
        return self.n_active_F.double() / max(self.n_vectors, 1)

    def examples(self, unit: int, which: str = "top") -> list[tuple[float, int, int, int]]:
        """(activation, image_idx, y, x) of one unit's activating examples, best/first first."""
        val, pos = ((self.top_val_FK, self.top_pos_FK3) if which == "top"
                    else (self.rand_val_FR, self.rand_pos_FR3))
        return [(float(v), int(p[0]), int(p[1]), int(p[2]))
                for v, p in zip(val[unit].tolist(), pos[unit]) if p[0] >= 0 and v > 0]


class ExampleCollector:
    """Running top-k and random activating sample per unit, updated chunk by chunk."""

    def __init__(self, n_units: int, k: int, n_random: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.n_units, self.k, self.n_random = n_units, k, n_random
        self.device = torch.device(device)
        f = n_units
        self.top_val = torch.full((f, 0), -math.inf, device=self.device)
        self.top_code = torch.full((f, 0), NO_POS, dtype=torch.long, device=self.device)
        self.rand_key = torch.full((f, 0), -1.0, device=self.device)
        self.rand_val = torch.full((f, 0), math.nan, device=self.device)
        self.rand_code = torch.full((f, 0), NO_POS, dtype=torch.long, device=self.device)
        self.n_active = torch.zeros(f, dtype=torch.long, device=self.device)
        self.sum = torch.zeros(f, dtype=torch.float64, device=self.device)
        self.n_vectors = 0
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def update(self, acts_NF: torch.Tensor, pos_N3: torch.Tensor) -> None:
        """Fold a batch of unit activations with their (image_idx, y, x) positions into the state."""
        acts_FN = acts_NF.to(self.device, torch.float32).T
        code_N = pack_pos(torch.as_tensor(pos_N3, device=self.device))
        active_FN = acts_FN > 0
        self.n_active += active_FN.sum(1)
        self.sum += acts_FN.double().sum(1)
        self.n_vectors += acts_FN.shape[1]
        if self.k:
            self.top_val, (self.top_code,) = merge_topk(
                self.top_val, [self.top_code], acts_FN, [code_N], self.k)
        if self.n_random:
            # A uniform key per (unit, activating vector); keeping the r largest keys is a uniform
            # sample without replacement of the activating vectors seen so far.
            keys_FN = torch.rand(acts_FN.shape, generator=self.gen, device=self.device)
            keys_FN = torch.where(active_FN, keys_FN, torch.full_like(keys_FN, -1.0))
            self.rand_key, (self.rand_val, self.rand_code) = merge_topk(
                self.rand_key, [self.rand_val, self.rand_code], keys_FN, [acts_FN, code_N],
                self.n_random)

    def referenced_images(self) -> set[int]:
        """Image indices that the kept examples point at (to prune provenance bookkeeping)."""
        codes = torch.cat([self.top_code.flatten(), self.rand_code.flatten()])
        codes = codes[codes != NO_POS]
        return set((codes >> (_Y_BITS + _X_BITS)).unique().tolist())

    def result(self) -> UnitExamples:
        """The collected examples as CPU tensors, empty and non-activating slots marked."""
        empty_rand = self.rand_key < 0
        top_pos = unpack_pos(self.top_code)
        top_pos[torch.isinf(self.top_val)] = -1
        rand_pos = unpack_pos(self.rand_code)
        rand_pos[empty_rand] = -1
        rand_val = self.rand_val.masked_fill(empty_rand, math.nan)
        return UnitExamples(self.top_val.cpu(), top_pos.cpu(), rand_val.cpu(), rand_pos.cpu(),
                            self.n_active.cpu(), self.sum.cpu(), self.n_vectors)


def collect_examples(chunks: Iterable[tuple], encoders: Mapping[str, Callable], n_units:
                     Mapping[str, int], k: int, n_random: int, seed: int = 0,
                     device: str | torch.device = "cpu", batch_size: int = 4096,
                     max_vectors: int | None = None) -> tuple[dict[str, UnitExamples], dict]:
    """One pass over (acts_ND, pos_N3, src) chunks feeding every encoder (name -> acts -> units).

    Returns the examples per encoder and {image_idx: source} for every image they reference.
    """
    cols = {name: ExampleCollector(n_units[name], k, n_random, seed + i, device)
            for i, name in enumerate(encoders)}
    sources: dict[int, str] = {}
    seen = 0
    with torch.no_grad():
        for acts_ND, pos_N3, src in chunks:
            if max_vectors is not None and seen >= max_vectors:
                break
            if max_vectors is not None:
                acts_ND, pos_N3 = acts_ND[: max_vectors - seen], pos_N3[: max_vectors - seen]
            seen += len(acts_ND)
            sources.update({int(i): s for i, s in (src or {}).items()})
            pos_N3 = torch.as_tensor(np.asarray(pos_N3), dtype=torch.long)
            for lo in range(0, len(acts_ND), batch_size):
                x_BD = acts_ND[lo: lo + batch_size].to(device)
                for name, enc in encoders.items():
                    cols[name].update(enc(x_BD), pos_N3[lo: lo + batch_size])
            if len(sources) > 65_536:  # provenance of images no example points at can go
                keep = set().union(*(c.referenced_images() for c in cols.values()))
                sources = {i: s for i, s in sources.items() if i in keep}
    keep = set().union(*(c.referenced_images() for c in cols.values()))
    return {name: c.result() for name, c in cols.items()}, {i: s for i, s in sources.items()
                                                             if i in keep}


# --------------------------------------------------------------------------------------------
# Receptive-field crops


@dataclass(frozen=True)
class Crop:
    """The receptive field of one position: pixels plus where it sits in (and off) the image."""

    pixels_3SS: torch.Tensor  # RGB [0, 1]; grey where the field lies outside the image
    top: int  # image row of the crop's first row (may be negative)
    left: int  # image column of the crop's first column (may be negative)
    size: int  # side in input pixels (= rf_size)
    valid: tuple[int, int, int, int]  # (y0, x0, y1, x1) of the in-image part, in crop pixels

    @property
    def clipped(self) -> bool:
        """True when part of the receptive field lies outside the image."""
        return self.valid != (0, 0, self.size, self.size)


def rf_box(geometry, y: int, x: int) -> tuple[int, int, int]:
    """(top, left, side) in input pixels of position (y, x)'s receptive field."""
    half = (geometry.rf_size - 1) / 2  # offset is the index of the centre pixel
    top = math.floor(geometry.offset + geometry.stride * y - half + 0.5)
    left = math.floor(geometry.offset + geometry.stride * x - half + 0.5)
    return top, left, int(geometry.rf_size)


def crop_receptive_field(image_3HW: torch.Tensor, geometry, y: int, x: int,
                         fill: float = GREY) -> Crop:
    """Exactly the receptive field of (y, x), padded with grey where it leaves the image."""
    top, left, side = rf_box(geometry, y, x)
    _, h, w = image_3HW.shape
    out = torch.full((3, side, side), fill, dtype=image_3HW.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, h), min(left + side, w)
    if y1 > y0 and x1 > x0:
        out[:, y0 - top: y1 - top, x0 - left: x1 - left] = image_3HW[:, y0:y1, x0:x1]
    valid = (max(y0 - top, 0), max(x0 - left, 0), max(y1 - top, 0), max(x1 - left, 0))
    return Crop(out, top, left, side, valid)


def iter_images(data_cfg, idxs: Iterable[int]) -> Iterator[object]:
    """data.Item for each requested image index, one at a time, re-created from the data config."""
    from sae_vision.activations import iter_webdataset, make_images

    want = sorted(set(int(i) for i in idxs))
    if not want:
        return
    dataset = make_images(data_cfg)
    if dataset is not None:
        yield from (dataset[i] for i in want if i < len(dataset))
        return
    wanted = set(want)
    for item in iter_webdataset(data_cfg):  # a stream cannot be indexed: read up to the last one
        if item.idx in wanted:
            yield item
        if item.idx >= want[-1]:
            return


def thumbnail(pixels_3SS: torch.Tensor, px: int):
    """A PIL thumbnail of side px: sharp pixels when enlarging, antialiased when shrinking."""
    from PIL import Image

    arr = (pixels_3SS.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr)
    if img.width == px:
        return img
    resample = Image.NEAREST if img.width < px else Image.LANCZOS
    return img.resize((px, px), resample)


def save_crops(positions: Iterable[tuple[int, int, int]], items: Iterable[object], geometry,
               out_dir: str | Path, thumb_px: int = 64, sources: Mapping[int, str] | None = None,
               ) -> dict[tuple[int, int, int], dict]:
    """Write one JPEG thumbnail per distinct (image_idx, y, x); returns position -> info.

    items yields data.Item objects (one image in memory at a time). info is {"file": name inside
    out_dir, "clipped": bool}, or {"error": why} when the image is missing, unreadable, or not
    the image the cache recorded (a provenance mismatch).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[tuple[int, int]]] = {}
    for p in positions:
        by_image.setdefault(int(p[0]), []).append((int(p[1]), int(p[2])))
    out: dict[tuple[int, int, int], dict] = {}
    for item in items:
        idx = int(item.idx)
        if idx not in by_image:
            continue
        yxs = sorted(set(by_image.pop(idx)))
        want_src = (sources or {}).get(idx)
        if item.image is None or (want_src is not None and item.source != want_src):
            why = (f"image {idx} ({item.source}) is unreadable: {item.error}" if item.image is None
                   else f"image {idx} is {item.source!r} but the cache recorded {want_src!r}")
            out.update({(idx, y, x): {"error": why} for y, x in yxs})
            continue
        image = item.image.float().cpu()
        for y, x in yxs:
            crop = crop_receptive_field(image, geometry, y, x)
            name = f"i{idx}_y{y}_x{x}.jpg"
            if not (out_dir / name).exists():  # names are positions, so a crop is written once
                with atomic_write(out_dir / name) as tmp:  # never half a crop, never skipped
                    thumbnail(crop.pixels_3SS, thumb_px).save(tmp, format="JPEG", quality=90)
            out[(idx, y, x)] = {"file": name, "clipped": crop.clipped}
    for idx, yxs in by_image.items():
        out.update({(idx, y, x): {"error": f"image {idx} is not in the data source"} for y, x in yxs})
    return out
