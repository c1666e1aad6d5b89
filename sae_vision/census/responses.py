"""Running networks and SAEs on the curve stimuli: where the stimulus goes (`make_probe`), the
centre-position responses to the battery, natural-image statistics, and random directions.

`census_of_model` is one network's census evidence; it is the same code path for the real network
and every null network (`sae_vision.census.nulls`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from sae_vision.activations import model_device
from sae_vision.core import CurvesConfig

from . import stimuli as S
from .curves import Probe, evidence

# Progress hook: on_batch(n_stimuli_in_this_batch, n_stimuli_in_the_battery) per forward pass.
BatchFn = Callable[[int, int], None]


def make_probe(model, layer: str, canvas_size: int = 0) -> Probe:
    """Pick the canvas and centre position; 0 = smallest canvas holding the centre unit's RF.

    The canvas side is a multiple of the layer stride so TF-SAME padding matches the full-size
    input, and the whole receptive field lies inside it, so the centre unit computes exactly what
    it computes on a full-size image with the same background.
    """
    g = model.geometry(layer)
    full = int(getattr(model, "input_size", 224))
    half = (g.rf_size - 1) / 2

    def fits(size: int) -> Probe | None:
        n = math.ceil(size / g.stride)
        pos = int(round(((size - 1) / 2 - g.offset) / g.stride))
        pos = min(max(pos, 0), n - 1)
        c = g.offset + g.stride * pos
        if c - half >= 0 and c + half <= size - 1:
            return Probe(layer, size, pos, float(c), g.stride, g.rf_size)
        return None

    if canvas_size and canvas_size > 0:
        p = fits(int(canvas_size))
        if p is None:  # an explicit canvas too small for the RF still works, just not exactly
            n = math.ceil(canvas_size / g.stride)
            pos = n // 2
            p = Probe(layer, int(canvas_size), pos, float(g.offset + g.stride * pos), g.stride,
                      g.rf_size)
        return p
    if getattr(model, "family", "") != "timm":
        for size in range(g.stride, full + 1, g.stride):
            p = fits(size)
            if p is not None:
                return p
    pos = g.size // 2
    return Probe(layer, full, pos, float(g.offset + g.stride * pos), g.stride, g.rf_size)


@torch.no_grad()
def centre_activations(model, layer: str, table: S.StimulusTable, probe: Probe,
                       batch_size: int = 128, on_batch: BatchFn | None = None) -> torch.Tensor:
    """Activation vectors [N, D] at the probed position, one chunked forward pass."""
    dev = model_device(model)
    out = []
    for _, imgs in S.iter_chunks(table, batch_size):
        acts = model.activations(imgs.to(dev), [layer])[layer]
        out.append(acts[:, :, probe.pos, probe.pos].float().cpu())
        if on_batch is not None:
            on_batch(len(imgs), len(table))
    return torch.cat(out)


def make_reference_images(n: int = 32, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Random crops of the embedded demo photographs [n, 3, size, size] (the σ reference)."""
    from sae_vision.activations import DemoImages
    from sae_vision.core import DataConfig

    ds = DemoImages(DataConfig(name="demo", n_images=n, image_size=size, seed=seed,
                               min_scale=0.08, max_scale=1.0))
    return torch.stack([ds[i].image for i in range(n)])


@torch.no_grad()
def layer_vectors(model, layer: str, images: torch.Tensor, batch_size: int = 16,
                  border: int = 0) -> torch.Tensor:
    """Activation vectors [B*H*W, D] of `layer` at every position (minus `border`) of `images`."""
    dev = model_device(model)
    out = []
    for i in range(0, len(images), batch_size):
        a = model.activations(images[i:i + batch_size].to(dev), [layer])[layer].float()
        if border:
            a = a[:, :, border:-border, border:-border]
        out.append(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).cpu())
    return torch.cat(out)


def unit_stats(acts_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and std [D] over activation vectors."""
    acts_ND = acts_ND.double()
    return acts_ND.mean(0).float(), acts_ND.std(0).float()


@torch.no_grad()
def feature_responses(sae, acts_ND: torch.Tensor, batch_size: int = 4096,
                      which: Sequence[str] = ("pre_acts", "encode")) -> dict[str, torch.Tensor]:
    """`pre_acts` and/or `encode` of an SAE (or anything with those methods) on vectors [N, D]."""
    dev = model_device(sae) if isinstance(sae, nn.Module) else torch.device("cpu")
    out: dict[str, list] = {k: [] for k in which}
    for i in range(0, len(acts_ND), batch_size):
        x = acts_ND[i:i + batch_size].to(dev)
        for k in which:
            out[k].append(getattr(sae, k)(x).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def feature_stats(sae, acts_ND: torch.Tensor, batch_size: int = 2048,
                  which: Sequence[str] = ("pre_acts", "encode")) -> dict[str, tuple]:
    """Per-feature (mean, std) of each response over vectors, accumulated batch by batch."""
    sums: dict[str, list] = {}
    n = 0
    for i in range(0, len(acts_ND), batch_size):
        resp = feature_responses(sae, acts_ND[i:i + batch_size], batch_size, which)
        n += len(acts_ND[i:i + batch_size])
        for k, v in resp.items():
            v = v.double()
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] = acc[0] + v.sum(0)
            acc[1] = acc[1] + (v * v).sum(0)
    out = {}
    for k, (s1, s2) in sums.items():
        mean = s1 / n
        var = (s2 - n * mean * mean).clamp_min(0.0) / max(n - 1, 1)
        out[k] = (mean.float(), var.sqrt().float())
    return out


class RandomDirections(nn.Module):
    """Null (c): random unit directions in activation space, scored like SAE features.

    pre_acts(x) = (x - centre) · u for unit vectors u; encode = relu(pre_acts). Centring on the
    dataset mean keeps the responses from being dominated by the mean activation.
    """

    def __init__(self, d_in: int, n: int, seed: int = 0, centre: torch.Tensor | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        dirs = torch.randn(n, d_in, generator=g)
        self.register_buffer("W_dec", dirs / dirs.norm(dim=1, keepdim=True))
        self.register_buffer("centre", torch.zeros(d_in) if centre is None else centre.float())

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Projection of the centred vectors on every direction [B, n]."""
        return (x_BD.float() - self.centre) @ self.W_dec.T

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """ReLU of the projections."""
        return torch.relu(self.pre_acts(x_BD))


def census_of_model(model, layer: str, cfg: CurvesConfig, table: S.StimulusTable, probe: Probe,
                    mean_U=None, std_U=None, images: torch.Tensor | None = None,
                    on_batch: BatchFn | None = None) -> dict:
    """Responses, stats and evidence of every neuron of one network (real or null)."""
    acts_ND = centre_activations(model, layer, table, probe, cfg.batch_size, on_batch)
    if mean_U is None or std_U is None:
        if images is None:
            raise ValueError("census_of_model needs mean_U/std_U or reference images")
        mean_U, std_U = unit_stats(layer_vectors(model, layer, images))
    mean_U = torch.as_tensor(mean_U, dtype=torch.float32)
    std_U = torch.as_tensor(std_U, dtype=torch.float32)
    return {"acts": acts_ND, "mean": mean_U, "std": std_U,
            "evidence": evidence(acts_ND.numpy(), table, cfg, mean_U.numpy(), std_U.numpy())}
