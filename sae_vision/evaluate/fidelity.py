"""How faithful one SAE is, on held-out data: reconstruction and feature health over cached
vectors, and the downstream splice (the network with the layer replaced by the SAE's
reconstruction, against zero- and mean-ablation) on held-out images, with the rule that picks
those images. The evaluate stage calls these per run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from sae_vision.activations import model_device
from sae_vision.core import DataConfig, track
from sae_vision.sae import RunInfo, data_config

from . import metrics as M


def batches_of(chunks: Iterable[torch.Tensor], batch_size: int,
               limit: int | None = None) -> Iterator[torch.Tensor]:
    """Re-batch [N, D] chunks into [batch_size, D] batches, stopping after `limit` rows."""
    buf: list[torch.Tensor] = []
    n_buf = n_out = 0
    for chunk in chunks:
        if limit is not None and n_out + n_buf + len(chunk) > limit:
            chunk = chunk[: limit - n_out - n_buf]
        buf.append(chunk)
        n_buf += len(chunk)
        if n_buf >= batch_size:
            cat = torch.cat(buf)
            n_full = n_buf // batch_size * batch_size
            yield from cat[:n_full].split(batch_size)
            n_out += n_full
            buf, n_buf = [cat[n_full:]], n_buf - n_full
        if limit is not None and n_out + n_buf >= limit:
            break
    if n_buf:
        yield torch.cat(buf)


def reconstruct(sae, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, codes) through the SAE's public encode/decode (raw activation units)."""
    codes_BF = sae.encode(x_BD)
    return sae.decode(codes_BF), codes_BF


@torch.no_grad()
def reconstruction_metrics(sae, batches: Iterable[torch.Tensor], device: torch.device | str,
                           dense_threshold: float,
                           topup_batches: Iterable[torch.Tensor] | None = None,
                           dead_min_vectors: int = 0) -> tuple[dict, M.SparsityStats]:
    """Reconstruction, L0 and feature health over held-out batches, in bounded memory.

    Dead/dense counts need many vectors to mean anything, so when the held-out set has fewer than
    `dead_min_vectors` the firing counts continue over `topup_batches` (training vectors: firing
    is a property of the dictionary, not a generalisation measure). Returns (metrics, density).
    """
    d_in, n_feat = int(sae.d_in), int(sae.n_features)
    rec = M.ReconstructionStats(d_in)
    sparse = M.SparsityStats(n_feat)  # L0 over held-out vectors only
    dens = M.SparsityStats(n_feat)  # firing counts: held-out, then top-up
    for x in batches:
        x_hat, codes = reconstruct(sae, x.to(device, non_blocking=True))
        rec.update(x, x_hat)
        sparse.update(codes)
        dens.update(codes)
    if rec.n == 0:
        raise ValueError("no held-out vectors to evaluate on; check train.holdout_frac and the "
                         "cache's shards")
    if topup_batches is not None and dens.n < dead_min_vectors:
        for x in topup_batches:
            dens.update(sae.encode(x[: dead_min_vectors - dens.n].to(device)))
            if dens.n >= dead_min_vectors:
                break
    health = dens.health(dense_threshold)
    health["includes_train_vectors"] = dens.n > sparse.n
    return {"reconstruction": {**rec.compute(), **sparse.l0_summary()},
            "features": health, "l0_hist": sparse.l0_hist}, dens


def neuron_baseline(batches: Iterable[torch.Tensor], l0: float, mean_D: torch.Tensor,
                    fvu_sae: float) -> dict:
    """The neuron basis at the SAE's sparsity, on the same held-out vectors: the FVU of keeping
    each vector's k = round(L0) most active channels, the others zeroed (`fvu_zero`) or set to
    the cache's channel mean (`fvu_mean`), and the SAE's gain over each (fvu_neuron / fvu_sae).
    An SAE has a reason to learn non-neuron directions only where that gain is well above 1."""
    k = max(int(round(l0)), 0)
    zero, mean = M.ReconstructionStats(len(mean_D)), M.ReconstructionStats(len(mean_D))
    for x in batches:
        zero.update(x, M.topk_channels(x, k))
        mean.update(x, M.topk_channels(x, k, mean_D))
    fz, fm = zero.compute()["fvu"], mean.compute()["fvu"]
    return {"k": k, "n_vectors": zero.n, "fvu_zero": fz, "fvu_mean": fm,
            "gain_zero": M.neuron_gain(fz, fvu_sae), "gain_mean": M.neuron_gain(fm, fvu_sae),
            "gain": M.neuron_gain(min(fz, fm), fvu_sae)}


# --------------------------------------------------------------------------------------------
# Downstream splice


def sae_splice_fn(sae, stats: M.ReconstructionStats | None = None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(acts_BCHW) -> the SAE reconstruction at every spatial position (for model.splice)."""

    def fn(a_BCHW: torch.Tensor) -> torch.Tensor:
        b, c, h, w = a_BCHW.shape
        x_ND = a_BCHW.permute(0, 2, 3, 1).reshape(-1, c).float()
        x_hat_ND, _ = reconstruct(sae, x_ND)
        if stats is not None:
            stats.update(x_ND, x_hat_ND)
        return x_hat_ND.reshape(b, h, w, c).permute(0, 3, 1, 2).to(a_BCHW.dtype).contiguous()

    return fn


def zero_fn(a_BCHW: torch.Tensor) -> torch.Tensor:
    """Zero-ablation of a layer."""
    return torch.zeros_like(a_BCHW)


def mean_fn(mean_C: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Mean-ablation: every position replaced by the cache's channel mean."""

    def fn(a_BCHW: torch.Tensor) -> torch.Tensor:
        m = mean_C.to(a_BCHW.device, a_BCHW.dtype).view(1, -1, 1, 1)
        return m.expand_as(a_BCHW).contiguous()

    return fn


@torch.no_grad()
def baseline_logits(model, layer: str, images_B3HW: torch.Tensor, mean_C: torch.Tensor,
                    batch_size: int) -> dict[str, torch.Tensor]:
    """Logits of the original network and of the zero- and mean-ablated layer (reused per layer)."""
    device = model_device(model)
    out: dict[str, list[torch.Tensor]] = {"orig": [], "zero": [], "mean": []}
    for x in track(images_B3HW.split(batch_size), "evaluate splice baselines",
                   len(images_B3HW), "img", size=len):
        x = x.to(device)
        out["orig"].append(model(x).double().cpu())
        with model.splice(layer, zero_fn):
            out["zero"].append(model(x).double().cpu())
        with model.splice(layer, mean_fn(mean_C)):
            out["mean"].append(model(x).double().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def splice_metrics(model, sae, layer: str, images_B3HW: torch.Tensor, mean_C: torch.Tensor,
                   batch_size: int = 16, baselines: dict | None = None) -> dict:
    """Mean KL(original || spliced), top-1 agreement, and the KL gap recovered vs ablations."""
    if baselines is None:
        baselines = baseline_logits(model, layer, images_B3HW, mean_C, batch_size)
    device = model_device(model)
    rec = M.ReconstructionStats(int(sae.d_in))
    spliced = []
    with model.splice(layer, sae_splice_fn(sae, rec)):
        for x in track(images_B3HW.split(batch_size), "evaluate splice", len(images_B3HW), "img",
                       size=len):
            spliced.append(model(x.to(device)).double().cpu())
    stats = M.SpliceStats()
    stats.update(baselines["orig"], {"sae": torch.cat(spliced), "zero": baselines["zero"],
                                     "mean": baselines["mean"]})
    out = stats.compute("sae")
    # Reconstruction at every position of the held-out images, not just the cache's samples.
    out["fvu_all_positions"] = rec.compute()["fvu"]
    return out


def holdout_image_ids(cache_meta: dict, holdout_shards: Iterable[str],
                      train_shards: Iterable[str] = ()) -> list[int]:
    """Image indices covered by the held-out shards (never those of a training shard)."""
    by_name = {s["name"]: s for s in cache_meta["shards"]}
    ids: set[int] = set()
    for name in holdout_shards:
        rng = by_name.get(name, {}).get("image_range")
        if rng is not None:
            ids.update(range(int(rng[0]), int(rng[1])))
    for name in train_shards:
        rng = by_name.get(name, {}).get("image_range")
        if rng is not None:
            ids.difference_update(range(int(rng[0]), int(rng[1])))
    skipped = {int(s["idx"]) for s in cache_meta.get("skipped", []) if "idx" in s}
    return sorted(ids - skipped)


def pick_evenly(ids: list[int], n: int) -> list[int]:
    """n ids spread evenly over the list (deterministic), so several shards contribute."""
    if n >= len(ids):
        return list(ids)
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, n).round()]


def load_images(data_cfg: DataConfig, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The images with these indices from the recreated image source, as [B, 3, H, W] in [0, 1]."""
    from sae_vision.activations import iter_webdataset, make_images

    dataset = make_images(data_cfg)
    items = []
    if dataset is not None:
        items = [dataset[i] for i in ids if i < len(dataset)]
    else:
        want = set(ids)
        for it in iter_webdataset(data_cfg):
            if it.idx in want:
                items.append(it)
                want.discard(it.idx)
            if not want:
                break
    good = [it for it in items if it.image is not None]
    if not good:
        raise ValueError(f"none of the held-out images {ids[:8]}... could be loaded from "
                         f"data.name={data_cfg.name!r}")
    return torch.stack([it.image for it in good]), [it.idx for it in good]


def splice_image_ids(cache_meta: dict, info: RunInfo, n_images: int, fallback: DataConfig
                     ) -> tuple[DataConfig, list[int], str]:
    """Which held-out images to splice: those of the held-out shards, else images past the cache.

    Returns (data config to load them with, ids, how) where `how` names the rule that chose them.
    """
    data_cfg = data_config(cache_meta, fallback)
    ids = holdout_image_ids(cache_meta, info.holdout_shards, info.train_shards)
    if ids:
        return data_cfg, pick_evenly(ids, n_images), "holdout_shards"
    # No held-out shard records its images: use images the cache never saw (indices past it).
    if data_cfg.name == "webdataset" or data_cfg.n_images <= 0:
        raise ValueError(
            f"cannot find held-out images for run {info.name}: its held-out shards record no "
            "image_range and the whole dataset was cached; set train.holdout_frac > 0 and "
            "retrain, or set eval.splice=false")
    views = max(int(getattr(data_cfg, "views", 1)), 1)  # n_images counts photos, ids items
    n_cached = int(cache_meta.get("n_images_requested") or data_cfg.n_images * views)
    wider = dataclasses.replace(data_cfg, n_images=-(-(n_cached + n_images) // views))
    return wider, list(range(n_cached, n_cached + n_images)), "past_cached_range"


def splice_images(cache_meta: dict, info: RunInfo, n_images: int, fallback: DataConfig
                  ) -> tuple[torch.Tensor, list[int], str]:
    """The held-out images themselves: (images [B, 3, H, W], ids, how)."""
    data_cfg, ids, how = splice_image_ids(cache_meta, info, n_images, fallback)
    images, got = load_images(data_cfg, ids)
    return images, got, how
