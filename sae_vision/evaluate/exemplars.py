"""The embedding behind polysemantic.json's exemplar score: each held-out vector's position seen
by a later layer of the same network (curves.exemplar_layer), so that a unit's top exemplars can
be compared by what they are, not by the shape of the unit's activation.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from sae_vision.activations import iter_chunks, load_cache_meta, lucid_geometry, model_device
from sae_vision.core import Config, ModelConfig, track
from sae_vision.sae import RunInfo, check_weights, data_config

logger = logging.getLogger(__name__)

# InceptionV1's blocks in forward order (both families name their modules so); the layers
# above mixed3b are not cache layers, so the embedding hooks the network's module directly.
BLOCKS = ("conv2d0", "conv2d1", "conv2d2", "mixed3a", "mixed3b", "mixed4a", "mixed4b",
          "mixed4c", "mixed4d", "mixed4e", "mixed5a", "mixed5b")


class _Done(Exception):
    """Raised by the hook once the later block is computed: the rest of the net is not needed."""


def held_out_with_pos(info: RunInfo, limit: int, spread: bool = False,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` held-out vectors [N, D] and their (image, y, x) positions [N, 3]; with
    `spread` (eval.held_out_sample=spread), `limit` of them drawn without replacement from every
    held-out vector (seeded, kept in shard order), so that a cache with many vectors per photo
    (sampling=all, data.views) still gives every held-out photo its share."""
    if spread:
        shards = set(info.holdout_shards)
        n_held = sum(s["n_vectors"] for s in load_cache_meta(info.cache_dir)["shards"]
                     if s["name"] in shards)
        keep = np.sort(np.random.default_rng([seed, 0x5B7EAD]).choice(
            n_held, min(limit, n_held), replace=False))
    acts, pos, n = [], [], 0
    for a, p, _ in iter_chunks(info.cache_dir, info.holdout_shards, with_pos=True):
        a, p = torch.as_tensor(a), torch.as_tensor(np.asarray(p, dtype=np.int64))
        if spread:
            rows = torch.as_tensor(keep[(keep >= n) & (keep < n + len(a))] - n)
            n += len(a)
            acts.append(a[rows])
            pos.append(p[rows])
            continue
        acts.append(a[: limit - n])
        pos.append(p[: limit - n])
        n += len(acts[-1])
        if n >= limit:
            break
    return torch.cat(acts), torch.cat(pos)


def skip_reason(layer: str, later: str, family: str, source: str | None) -> str | None:
    """Why the exemplar score cannot run here (None when it can)."""
    if not later:
        return "curves.exemplar_layer is empty"
    if source == "array":
        return "no images behind an imported array cache"
    if family not in ("googlenet_bvlc", "inceptionv1"):
        return f"model family {family} has no Lucid layer names"
    block = layer.removesuffix("_pre_relu").split("_")[0]
    if later not in BLOCKS or block not in BLOCKS or BLOCKS.index(later) <= BLOCKS.index(block):
        return f"curves.exemplar_layer={later} is not a block after {layer} ({', '.join(BLOCKS)})"
    return None


@torch.no_grad()
def embed_positions(model, images_B3HW: torch.Tensor, ids: list[int], pos_N3: torch.Tensor,
                    layer: str, later: str, batch_size: int = 16) -> torch.Tensor:
    """[N, E]: the `later` block's vector at each position (image id, y, x on `layer`'s grid),
    its grid scaled onto the later block's (the later block sees the same spot, wider)."""
    row = {int(i): r for r, i in enumerate(ids)}
    img = torch.tensor([row[int(i)] for i in pos_N3[:, 0].tolist()])
    h1 = lucid_geometry(layer, images_B3HW.shape[-1]).size
    device = model_device(model)
    grab: dict[str, torch.Tensor] = {}

    def capture(_m, _i, out):
        grab["out"] = out
        raise _Done

    hook = model.net.get_submodule(later).register_forward_hook(capture)
    out: torch.Tensor | None = None
    try:
        for b0 in track(range(0, len(ids), batch_size), "evaluate exemplars",
                        (len(ids) + batch_size - 1) // batch_size, "batch"):
            try:
                model(images_B3HW[b0:b0 + batch_size].to(device))
            except _Done:
                pass
            big = grab.pop("out").float().cpu()
            h2 = big.shape[-1]
            if out is None:
                out = torch.zeros(len(pos_N3), big.shape[1])
            sel = ((img >= b0) & (img < b0 + len(big))).nonzero().flatten()
            ys, xs = pos_N3[sel, 1] * h2 // h1, pos_N3[sel, 2] * h2 // h1
            out[sel] = big[img[sel] - b0, :, ys, xs]
    finally:
        hook.remove()
    return out if out is not None else torch.zeros(len(pos_N3), 0)


def exemplar_inputs(cfg: Config, session, mc: ModelConfig, info: RunInfo, cache_meta: dict,
                    pos_N3: torch.Tensor) -> dict | None:
    """polysemantic_report's `exemplars`: the later block at each held-out vector's position
    and its image (one exemplar per image). None, with a note, where it cannot run. `session`
    is the evaluate stage's (images_of, model, and the embeddings shared by a sweep's runs)."""
    later = cfg.curves.exemplar_layer
    why = skip_reason(info.layer, later, mc.family, cache_meta.get("source"))
    ids = sorted({int(i) for i in pos_N3[:, 0].tolist()})
    if why is None:
        _, images, got = session.images_of(data_config(cache_meta, cfg.data), ids)
        why = None if got == ids else f"{len(ids) - len(got)} held-out images did not load"
    if why is not None:
        logger.info(f"[evaluate] note: {info.name}: no exemplar score ({why})")
        return None
    model = session.model(mc)
    check_weights(model, cache_meta, info)
    key = (str(info.cache_dir), info.layer, later, len(pos_N3), tuple(ids))
    if key not in session.exemplars:
        session.exemplars[key] = embed_positions(model, images, ids, pos_N3, info.layer, later,
                                                 cfg.eval.splice_batch_size)
    return {"emb": session.exemplars[key], "groups": pos_N3[:, 0].clone(),
            "n_top": cfg.curves.exemplar_top, "layer": later}
