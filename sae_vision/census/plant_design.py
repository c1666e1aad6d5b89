"""Hidden plants that leave a real gap, designed on the unplanted network's battery responses.

A detector rotated 45° with one partner that is silent on the curve battery is not hidden from
the census: on the battery each rotated channel is 0.707 x the detector, so both stay
curve-tuned at its orientation and a feature equal to the detector is a functional copy of one
of them (rho 1), never new and gap-filling. Neither is it hidden when other curve-tuned neurons
sit at its orientation: the gap rule keeps every curve-tuned neuron max(15°, half width) away.

`propose_hidden` therefore rotates a group: the detector, every curve-tuned neuron within
max(15°, its half width) + 5° of the detector's orientation, and the strongest line-preferring
channels of the battery (not curve-tuned, curve/line ratio < 2), by a seeded random orthogonal
map (`model.plant.seed`). Each rotated channel then mixes curve units with line units, so it is
neither curve-tuned nor a copy of the detector. Every candidate (more line partners, then seeds)
is checked by the census itself on the planted responses (y = R h is linear, so no network run
per candidate): the neuron census must lose the detector, and the oracle, the detector's exact
direction as one feature, must be functionally new and fill the gap (controls.oracle_record).

    python -m sae_vision.census.plant_design 358 335 408 413 324   # Makefile CONTROL_PLANTS
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sae_vision.activations import LayerRotation
from sae_vision.core import CurvesConfig, PlantConfig

from .controls import hidden_record
from .curves import circ_diff, criterion, evidence, thresholds_of
from .novelty import curve_tuned

MAX_LINE_PARTNERS = 12  # line-preferring partners considered, strongest on the battery first
SEEDS = range(6)  # seeds of the random orthogonal map tried per group


def planted_record(plant: PlantConfig, acts_NU: np.ndarray, vectors_MD: np.ndarray, table,
                   ccfg) -> dict:
    """The hidden control record (controls.hidden_record, with its oracle) of `plant` from the
    UNPLANTED layer's battery responses and natural vectors, at the configured thresholds."""
    rot = LayerRotation(plant, acts_NU.shape[1])
    full = rot.matrix().numpy()
    acts, vecs = acts_NU @ full.T, vectors_MD @ full.T  # y = R h, row-wise
    ev = evidence(acts, table, ccfg, vecs.mean(0), vecs.std(0))
    return hidden_record(rot, ccfg, table, acts, ev, thresholds_of(ccfg), vecs)["record"]


def gap_ok(rec: dict) -> bool:
    """The plant leaves the gap the control needs: lost, and the oracle new and gap-filling."""
    return bool(rec["neuron_census_lost"] and rec["oracle"]["class"] == "new"
                and rec["oracle"]["fills_gap"])


def propose_hidden(detector: int, acts_NU: np.ndarray, vectors_MD: np.ndarray, table, ccfg,
                   layer: str = "mixed3b", seeds=SEEDS) -> tuple[PlantConfig, dict] | None:
    """The first hidden plant of `detector` (module docstring: its curve-tuned neighbours and
    line partners, more partners then seeds) that passes `gap_ok`, with its record; None if
    none does."""
    ev = evidence(acts_NU, table, ccfg, vectors_MD.mean(0), vectors_MD.std(0))
    thr = thresholds_of(ccfg)
    if not criterion(ev, thr)["detected"][detector]:
        raise ValueError(f"channel {detector} is not a census detector of the unplanted layer; "
                         "choose one the neuron census detects")
    tuned, deg, width = curve_tuned(ev, thr), ev["preferred_orientation"], ev["tuning_width_deg"]
    near = [int(u) for u in np.where(tuned)[0] if u != detector and float(circ_diff(
        deg[u], deg[detector])) < max(ccfg.gap_min_separation_deg, width[u]) + 5.0]
    lines = [int(u) for u in np.argsort(-ev["peak_sigma"])
             if not tuned[u] and ev["curve_line_ratio"][u] < 2.0][:MAX_LINE_PARTNERS]
    for k in sorted({min(len(near) + 2, len(lines)), min(2 * len(near) + 2, len(lines))}):
        for seed in seeds:
            plant = PlantConfig(kind="hidden", layer=layer, seed=seed,
                                channels=[int(detector)] + near + lines[:k])
            rec = planted_record(plant, acts_NU, vectors_MD, table, ccfg)
            if gap_ok(rec):
                return plant, rec
    return None


def summary(plant: PlantConfig, rec: dict) -> str:
    """One line: the Makefile spec (channels:...@seed) and the numbers that justify it."""
    o = rec["oracle"]
    return (f"{':'.join(map(str, plant.channels))}@{plant.seed}  # detector {rec['detector']} "
            f"at {rec['orientation_deg']:g}°, {len(plant.channels)} channels: lost "
            f"{rec['neuron_census_lost']}, gap {rec['gap_at_detector_deg']:g}°, nearest "
            f"curve-tuned {o['nearest_curve_tuned']} at {o['dtheta_nearest_curve_tuned_deg']:g}° "
            f"(needs {o['required_separation_deg']}), oracle rho_max {o['rho_max']:.3f} "
            f"({o['rho_channel']}) {o['class']}, fills_gap {o['fills_gap']}")


def photo_images(n: int, size: int = 224) -> torch.Tensor | None:
    """The first `n` photos of the ImageNet sample (data.root resolution), else None."""
    from sae_vision.activations import make_images, resolve_data_root
    from sae_vision.core import DataConfig

    root = resolve_data_root(None)
    if root is None:
        return None
    ds = make_images(DataConfig(name="imagefolder", root=root, n_images=n, image_size=size,
                                subset="stratified"))
    return torch.stack([ds[i].image for i in range(len(ds))])


def main(argv: list[str] | None = None) -> None:
    """Propose a gap-leaving hidden plant per detector on the real BVLC layer (σ from photos of
    the ImageNet sample, else the demo crops)."""
    from sae_vision.activations import load_model
    from sae_vision.core import ModelConfig

    from .curves import make_battery
    from .responses import centre_activations, layer_vectors, make_probe, make_reference_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("detectors", type=int, nargs="+")
    ap.add_argument("--layer", default="mixed3b")
    ap.add_argument("--n-images", type=int, default=32, help="photos for the natural σ")
    a = ap.parse_args(argv)
    model = load_model(ModelConfig(family="googlenet_bvlc", device="cpu"))
    ccfg = CurvesConfig()
    probe = make_probe(model, a.layer, ccfg.canvas_size)
    table = make_battery(ccfg, probe)
    acts = centre_activations(model, a.layer, table, probe, ccfg.batch_size).double().numpy()
    images = photo_images(a.n_images)
    if images is None:
        images = make_reference_images(a.n_images)
    vecs = layer_vectors(model, a.layer, images).double().numpy()
    for d in a.detectors:
        got = propose_hidden(d, acts, vecs, table, ccfg, a.layer)
        print(summary(*got) if got else f"# detector {d}: no plant leaves a gap", flush=True)


if __name__ == "__main__":
    main()
