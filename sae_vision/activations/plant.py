"""Planted positive controls: an orthogonal change of basis of one layer, inside the network.

`model.plant.kind=hidden` rotates a census detector's channel with partner channels (a 45°
Givens rotation for one partner, a seeded random orthogonal map for more), so the detector
exists only as a mixture of "neurons"; `kind=rotate` rotates the whole layer by a seeded random
orthogonal matrix, so no direction of it is axis-aligned. The layer's output is y = R h, what
the cache, the splice and the census read; the next module receives R^T y, so the network's
function is unchanged. A rotation of post-ReLU channels makes negative values possible: it is a
linear map of the layer, as intended.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from sae_vision.core import PlantConfig, content_hash, to_plain


def plant_group(plant: PlantConfig, dim: int) -> tuple[list[int], torch.Tensor]:
    """(the rotated channels, their orthogonal map [G, G] in float64) for `plant` on a layer of
    `dim` channels; the first channel of a hidden plant is the planted detector."""
    if plant.kind == "rotate":
        channels = list(range(dim))
    elif plant.kind == "hidden":
        channels = [int(c) for c in plant.channels]
        bad = [c for c in channels if not 0 <= c < dim]
        if bad:
            raise ValueError(f"model.plant.channels={channels} has channels outside the layer's "
                             f"0..{dim - 1}: {bad}")
    else:
        raise ValueError(f"model.plant.kind={plant.kind!r} plants nothing; choose hidden or "
                         "rotate")
    if plant.kind == "hidden" and len(channels) == 2:
        a = math.radians(plant.angle_deg)
        # columns are where each channel's old axis goes: R e_detector = (cos a, sin a)
        rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                           dtype=torch.float64)
    else:
        rot = random_orthogonal(len(channels), plant.seed)
    return channels, rot


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [n, n] matrix (float64): QR of a Gaussian, signs fixed."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def plant_id(plant: PlantConfig) -> str:
    """A short hash naming the plant (the census memo key)."""
    return content_hash(to_plain(plant))


class LayerRotation(nn.Module):
    """y = R h on a group of channels of a BCHW layer; `unrotate` maps y back to h."""

    def __init__(self, plant: PlantConfig, dim: int):
        super().__init__()
        channels, rot = plant_group(plant, dim)
        self.kind, self.dim, self.layer = plant.kind, dim, plant.layer
        self.channels = channels
        self.detector = channels[0] if plant.kind == "hidden" else None
        self.plant_id = plant_id(plant)
        self.register_buffer("rot_GG", rot, persistent=False)  # float64: exact R^T R = I
        self.register_buffer("index", torch.tensor(channels), persistent=False)

    def matrix(self) -> torch.Tensor:
        """The full [D, D] orthogonal map (float64): identity outside the rotated channels."""
        full = torch.eye(self.dim, dtype=torch.float64)
        idx = torch.tensor(self.channels)
        full[idx.unsqueeze(1), idx.unsqueeze(0)] = self.rot_GG.cpu()
        return full

    def hidden_direction(self) -> torch.Tensor:
        """The planted detector's direction in the rotated layer, R e_detector [D] (float64):
        its dot product with y is the detector's original response."""
        if self.detector is None:
            raise ValueError("a rotate plant hides no detector")
        return self.matrix()[:, self.detector]

    def _map(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        group = x.index_select(1, self.index)
        out[:, self.index] = torch.einsum("gh,bh...->bg...", rot.to(x.dtype), group)
        return out

    def rotate(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """y = R h."""
        return self._map(x_BCHW, self.rot_GG)

    def unrotate(self, y_BCHW: torch.Tensor) -> torch.Tensor:
        """h = R^T y."""
        return self._map(y_BCHW, self.rot_GG.T)

    def output_hook(self, _module, _inputs, output):
        """Forward hook on the layer: the world reads R h."""
        return self.rotate(output)

    def input_pre_hook(self, _module, inputs):
        """Forward pre-hook on the next module: it receives R^T y, so the net is unchanged."""
        return (self.unrotate(inputs[0]), *inputs[1:])
