"""The neuron census's result, which the SAE features' census reads: a type below both
`census` (which makes it) and `feature_census` (which uses it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import stimuli as S
from .responses import layer_vectors, make_reference_images


class ReferenceImages:
    """The census's one σ sample: natural photos (the given ones, or demo crops made on first
    use), every position of them. The real network's neurons and the SAE features take their
    natural-image mean/std from the same activation vectors (`vectors`), each null network
    from its own forward pass over the same photos."""

    def __init__(self, images: torch.Tensor | None, n_crops: int, photos: str = ""):
        self._images, self._n_crops = images, n_crops
        self.photos = photos or ("the given photos" if images is not None else
                                 f"{n_crops} demo crops (no photos given)")
        self._vectors: tuple[tuple, torch.Tensor] | None = None

    def get(self) -> torch.Tensor:
        """The images (made once, only when something needs them)."""
        if self._images is None:
            self._images = make_reference_images(self._n_crops)
        return self._images

    def vectors(self, model, layer: str) -> torch.Tensor:
        """`model`'s `layer` activation vectors at every position of the photos [B*H*W, D],
        computed once (for the last model and layer asked)."""
        key = (id(model), layer)
        if self._vectors is None or self._vectors[0] != key:
            self._vectors = (key, layer_vectors(model, layer, self.get()))
        return self._vectors[1]

    def record(self) -> dict:
        """What the σ sample was, for curves.json's `sigma_source` (count: None if unused)."""
        out = {"photos": self.photos, "count": None if self._images is None else len(
            self._images), "positions": "every position"}
        if self._vectors is not None:
            out["n_vectors"] = len(self._vectors[1])
        return out


@dataclass
class NeuronCensus:
    """The SAE-independent part of a layer's census: what every SAE of a sweep shares."""

    probe: Any  # curves.Probe: where the stimuli go
    table: S.StimulusTable  # the stimulus battery
    real: dict  # census_of_model of the real network: evidence, acts, mean, std
    thr: dict[str, float]  # the calibrated thresholds
    tc_real: dict  # the real neurons' tuning curves
    neuron_det: list[dict]  # the detected neurons
    result: dict  # the JSON part (curves.json before the features are added)
    figs: dict  # figure name -> arguments (census_figures.save_census_figures)
    timings: dict[str, float]
    reference_images: ReferenceImages
