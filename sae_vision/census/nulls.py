"""Null networks for the curve census: InceptionV1 with one kind of structure destroyed.

(a) `permuted_input_null` permutes the input channels of the convolutions that read the layer's
input; (b) `reinit_null` redraws every convolution above the stem; (d) `spatial_null` scrambles
each kernel's taps in space. `NULL_DESTROYS` says what each keeps and destroys (README, "Nulls").
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def _block_of(layer: str) -> str:
    base = layer.removesuffix("_pre_relu")
    return base.split("_")[0] if base.startswith("mixed") else base


def _named_convs(model) -> dict[str, nn.Conv2d]:
    """Conv modules keyed by their path with dots as underscores (Lucent and BVLC agree then)."""
    return {name.replace(".", "_"): m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


def _conv(convs: dict[str, nn.Conv2d], lucid: str) -> nn.Conv2d:
    hits = [m for k, m in convs.items() if k.endswith(f"{lucid}_pre_relu_conv")]
    if len(hits) != 1:
        raise ValueError(f"cannot find the convolution of {lucid!r} (found {len(hits)}); nulls "
                         "need an InceptionV1 model (googlenet_bvlc or inceptionv1)")
    return hits[0]


BRANCH_INPUTS = ("1x1", "3x3_bottleneck", "5x5_bottleneck", "pool_reduce")


BRANCH_CONVS = ("1x1", "3x3_bottleneck", "3x3", "5x5_bottleneck", "5x5", "pool_reduce")


def feeding_convs(model, layer: str) -> list[nn.Conv2d]:
    """The convolutions that read the input of `layer`'s block (a plain conv layer: itself)."""
    convs = _named_convs(model)
    block = _block_of(layer)
    if block.startswith("mixed"):
        return [_conv(convs, f"{block}_{b}") for b in BRANCH_INPUTS]
    return [_conv(convs, block)]


def convs_above_stem(model, layer: str) -> list[nn.Conv2d]:
    """Every convolution from the first block after the stem up to and including `layer`'s."""
    convs = _named_convs(model)
    block = _block_of(layer)
    if not block.startswith("mixed"):
        return [_conv(convs, block)]
    order = [n for n in model.layer_names() if n.startswith("mixed") and "_" not in n]
    blocks = order[: order.index(block) + 1]
    return [_conv(convs, f"{b}_{c}") for b in blocks for c in BRANCH_CONVS]


@torch.no_grad()
def permuted_input_null(model, layer: str, seed: int):
    """Null (a): a copy whose feeding convolutions see their input channels in random order."""
    null = copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed))
    for conv in feeding_convs(null, layer):
        perm = torch.randperm(conv.weight.shape[1], generator=g).to(conv.weight.device)
        conv.weight.copy_(conv.weight[:, perm].clone())
    return null


@torch.no_grad()
def reinit_null(model, layer: str, seed: int):
    """Null (b): a copy whose convolutions above the stem are redrawn with per-filter mean/std."""
    null = copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed) + 10_000)
    for conv in convs_above_stem(null, layer):
        w = conv.weight
        flat = w.reshape(w.shape[0], -1).double()
        mu, sd = flat.mean(1), flat.std(1)
        # Drawn on the CPU (the same noise on every device), then moved to the weights.
        noise = torch.randn(flat.shape, generator=g, dtype=torch.float64).to(w.device)
        conv.weight.copy_((mu[:, None] + sd[:, None] * noise).reshape(w.shape).to(w.dtype))
    return null


@torch.no_grad()
def spatial_null(model, layer: str, seed: int):
    """Null (d): every convolution above the stem keeps, for each (filter, input channel), its
    own k x k weights but in a random spatial order. Which channels a filter reads, and how
    strongly (the sum of each tap set), are kept; the spatial arrangement that assembles edges
    into curves is destroyed, in the layer's input block as in the layer itself."""
    null = copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed) + 20_000)
    for conv in convs_above_stem(null, layer):
        w = conv.weight
        o, i, kh, kw = w.shape
        if kh * kw == 1:
            continue
        flat = w.reshape(o * i, kh * kw)
        order = torch.argsort(torch.rand(o * i, kh * kw, generator=g), dim=1).to(w.device)
        conv.weight.copy_(torch.gather(flat, 1, order).reshape(w.shape))
    return null


NULLS = {"permuted": permuted_input_null, "reinit": reinit_null, "spatial": spatial_null}


# What each null keeps and destroys (README, "Nulls"): checked on the layer's input block by
# `input_block_check` (the permuted null keeps the input block's curve units by design).
NULL_DESTROYS = {
    "permuted": "the channel order the layer reads (its input block is intact)",
    "reinit": "every learned weight above the stem (per-filter mean and std kept)",
    "spatial": "the spatial arrangement of every kernel above the stem (channel weights kept)",
}


def input_block_of(model, layer: str) -> str | None:
    """The block whose output `layer`'s block reads (mixed3b -> mixed3a); None for the stem."""
    block = _block_of(layer)
    if not block.startswith("mixed"):
        return None
    order = [n for n in model.layer_names() if n.startswith("mixed") and "_" not in n]
    i = order.index(block)
    return order[i - 1] if i > 0 else "conv2d2"
