"""The neuron census's result, which the SAE features' census reads: a type below both
`census` (which makes it) and `feature_census` (which uses it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import stimuli as S
from .responses import make_reference_images


class ReferenceImages:
    """The natural images the census needs: the given ones, or demo crops made on first use."""

    def __init__(self, images: torch.Tensor | None, n_crops: int):
        self._images, self._n_crops = images, n_crops

    def get(self) -> torch.Tensor:
        """The images (made once, only when something needs them)."""
        if self._images is None:
            self._images = make_reference_images(self._n_crops)
        return self._images


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
