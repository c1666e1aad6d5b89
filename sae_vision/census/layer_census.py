"""The curve-detector census of a layer: neurons, null networks, calibration, SAE features,
copies and new detectors, and its files (curves.json and the figures).

Pure evidence and criteria are `sae_vision.census.curves`; running networks is `sae_vision.census.responses`;
the null networks are `sae_vision.census.nulls`; the figures are `sae_vision.core.plots`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_vision.core import to_plain, write_json

from . import stimuli as S
from .controls import plant_control
from .curves import (
    calibrate_held_out,
    count_detected,
    coverage,
    criterion,
    curves_config,
    detections,
    fdr_table,
    make_battery,
    select_seeds,
    threshold_grid,
    thresholds_of,
    tuning_curves,
)
from .features import FeatureInputs, feature_census
from .novelty import band_summary, curve_tuned
from .nulls import NULL_DESTROYS, NULLS, input_block_of
from .parts import NeuronCensus, ReferenceImages
from .responses import BatchFn, census_of_model, make_probe, unit_stats

logger = logging.getLogger(__name__)


@dataclass
class CensusInputs:
    """What a layer's census measures the neurons against, besides the network and config.

    σ units (natural-image mean/std per unit) come from one sample, every position of the
    photos `images`: the real neurons and the SAE features from the real network's activations
    on them, each null network from its own forward pass over them (`parts.ReferenceImages`).
    `unit_mean`/`unit_std` replace the neurons' σ only (toy tests with known statistics)."""

    unit_mean: torch.Tensor | None = None  # natural-image mean per channel; else from `images`
    unit_std: torch.Tensor | None = None  # natural-image std per channel; else from `images`
    images: torch.Tensor | None = None  # the σ photos; None: curves.n_reference_images demo crops
    photos: str = ""  # what the photos are, for curves.json's sigma_source
    source: str = ""  # what the photos came from: part of the memo key
    null_seeds: int | None = None  # seeds per null network; None: curves.n_null_seeds


class NeuronCensusMemo:
    """The neuron census an evaluation session keeps, so a sweep of SAEs on one layer runs the
    real and null networks once. It holds one entry (bounded memory across layers), keyed by
    everything the neuron census depends on (`key_of`)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._census: NeuronCensus | None = None

    @staticmethod
    def key_of(model, layer: str, ccfg, n_seeds: int, source: str,
               sigma: str = "") -> tuple:
        """What the neuron census depends on: the data behind the unit stats (`source`) and a
        digest of the σ sample (`sigma_key`), the network's weights, the layer, the number of
        null seeds and every curves setting."""
        settings = to_plain(ccfg)
        return (source, sigma, getattr(model, "weights_sha256", None),
                getattr(model, "plant_id", None), layer, n_seeds,
                json.dumps(settings, sort_keys=True, default=str))

    def get(self, key: tuple) -> NeuronCensus | None:
        """The census kept under `key`, or None."""
        return self._census if self._key == key else None

    def put(self, key: tuple, census: NeuronCensus) -> None:
        """Keep `census` under `key`, dropping whatever was kept before."""
        self._key, self._census = key, census


def sigma_key(inputs: CensusInputs) -> str:
    """A digest of the σ sample: the given photos (none: the configured demo crops) and any
    given unit mean/std."""
    h = hashlib.sha1()
    for t in (inputs.images, inputs.unit_mean, inputs.unit_std):
        h.update(b"-" if t is None else torch.as_tensor(t).detach().cpu().contiguous()
                 .numpy().tobytes())
    return h.hexdigest()


def input_block_check(model, layer: str, ccfg, images: torch.Tensor, probe_of, say) -> dict:
    """Does each null destroy what it should? Curve detectors of the layer's *input block* in the
    real network and in each null (seed 0), at the configured thresholds: curve-tuned (criteria
    1-3: peak, curve/line ratio, unimodality) and full census."""
    block = input_block_of(model, layer)
    if block is None:
        return {}
    probe = probe_of(block)
    table = make_battery(ccfg, probe)
    thr = thresholds_of(ccfg)
    tuned_keys = ("peak_sigma", "curve_line_ratio", "circular_variance", "secondary_peak_ratio")

    def counts(net) -> dict:
        ev = census_of_model(net, block, ccfg, table, probe, images=images)["evidence"]
        crit = criterion(ev, thr)
        return {"curve_tuned": int(np.logical_and.reduce([crit[k] for k in tuned_keys]).sum()),
                "detected": int(crit["detected"].sum())}

    out = {"block": block, "real": counts(model)}
    for kind in ccfg.nulls:
        null = NULLS[kind](model, layer, 0)
        out[kind] = counts(null)
        del null
    say(f"[curves] input block {block}: curve detectors real {out['real']['detected']}, " +
        ", ".join(f"{k} {out[k]['detected']}" for k in ccfg.nulls))
    return out


def _null_censuses(model, layer: str, ccfg, n_seeds: int, table, probe,
                   reference_images: ReferenceImages, say, on_batch: BatchFn | None,
                   timings: dict[str, float]) -> tuple[dict[str, list[dict]], dict[str, list]]:
    """The census of every null network (ccfg.nulls x n_seeds seeds) on the reference images:
    (evidence per kind, (evidence, tuning curves, mean, std) per kind). Adds each one's time to
    `timings`."""
    import time

    null_evs: dict[str, list[dict]] = {}
    null_curves: dict[str, list] = {}
    for kind in (ccfg.nulls if n_seeds > 0 else []):
        if kind not in NULLS:
            raise ValueError(f"curves.nulls entry {kind!r} is not valid; choose from {list(NULLS)}")
        null_evs[kind] = []
        null_curves[kind] = []
        for seed in range(n_seeds):
            t0 = time.perf_counter()
            null = NULLS[kind](model, layer, seed)
            res = census_of_model(null, layer, ccfg, table, probe, images=reference_images.get(),
                                  on_batch=on_batch)
            del null
            null_evs[kind].append(res["evidence"])
            null_curves[kind].append((res["evidence"], tuning_curves(res["acts"].numpy(), table,
                                                                     ccfg), res["mean"],
                                       res["std"]))
            timings[f"{kind}{seed}_s"] = time.perf_counter() - t0
            say(f"[curves] null {kind} seed {seed}: {count_detected(res['evidence'], thresholds_of(ccfg))} "
                f"detectors at the configured thresholds, {timings[f'{kind}{seed}_s']:.1f}s")

    return null_evs, null_curves


def _neuron_sigma(model, layer: str, inputs: CensusInputs, ref: ReferenceImages) -> tuple:
    """The real neurons' natural-image (mean, std, where from): the given ones, else the σ
    sample's (the photos at every position; the SAE features reuse its vectors)."""
    if inputs.unit_mean is not None and inputs.unit_std is not None:
        return inputs.unit_mean, inputs.unit_std, "given mean/std"
    return (*unit_stats(ref.vectors(model, layer)), "photos")


def neuron_census(model, layer: str, ccfg, n_seeds: int, inputs: CensusInputs,
                  say, on_batch: BatchFn | None = None) -> NeuronCensus:
    """The SAE-independent part of the census: real neurons, network nulls, calibration (on
    the calibration seeds; FDR, threshold grid on the held-out report seeds: `calibrate_held_out`)
    and the input-block check."""
    import time

    probe = make_probe(model, layer, ccfg.canvas_size)
    table = make_battery(ccfg, probe)
    reference_images = ReferenceImages(inputs.images, ccfg.n_reference_images, inputs.photos)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    unit_mean, unit_std, neuron_sigma = _neuron_sigma(model, layer, inputs, reference_images)
    real = census_of_model(model, layer, ccfg, table, probe, unit_mean, unit_std,
                           on_batch=on_batch)
    timings["real_s"] = time.perf_counter() - t0
    say(f"[curves] {layer}: {len(table)} stimuli on a {probe.size}px canvas, "
        f"{timings['real_s']:.1f}s for the real network")

    null_evs, null_curves = _null_censuses(model, layer, ccfg, n_seeds, table, probe,
                                           reference_images, say, on_batch, timings)

    configured = thresholds_of(ccfg)
    cal = calibrate_held_out(real["evidence"], null_evs, ccfg)
    thr = cal["thresholds"]
    report_evs = select_seeds(null_evs, cal["seeds"]["report"])  # every reported FDR
    # The band moves every criterion around the thresholds used (calibrated), both ways.
    grid = threshold_grid(real["evidence"], report_evs, ccfg, thr) if null_evs else []
    null_pass = {k: [criterion(e, thr)["detected"] for e in v] for k, v in null_evs.items()}
    tc_real = tuning_curves(real["acts"].numpy(), table, ccfg, real["mean"], real["std"])
    neuron_det = detections(real["evidence"], thr, null_passes=null_pass,
                            tuning_sigma=tc_real["sigma"], tuning_radii=tc_real["radii"])
    check = {}
    if ccfg.check_input_block and null_evs:
        t0 = time.perf_counter()
        check = input_block_check(model, layer, ccfg, reference_images.get(),
                                  lambda b: make_probe(model, b, ccfg.canvas_size), say)
        timings["input_block_s"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "layer": layer,
        "probe": {"canvas_size": probe.size, "position": [probe.pos, probe.pos],
                  "centre_px": probe.centre, "stride": probe.stride, "rf_size": probe.rf_size},
        "n_stimuli": len(table),
        "tuning_orientations": S.orientations(ccfg.orientation_step).tolist(),
        "tuning_radii": [float(r) for r in ccfg.radii],
        "criterion": {"configured": configured, "used": thr,
                      "tightened": cal["tightened"], "fdr_target_met": cal["met"],
                      "fdr_target_met_calibration": cal["calibration_met"],
                      "max_fdr": ccfg.max_fdr},
        "nulls": {"kinds": list(null_evs), "n_seeds": n_seeds, "seeds": cal["seeds"],
                  "destroys": {k: NULL_DESTROYS[k] for k in null_evs},
                  "input_block_check": check},
        "sigma_source": {"neurons": neuron_sigma, "nulls": "photos" if null_evs else None},
        "threshold_grid": grid,
        "neurons": {
            "n_units": int(real["acts"].shape[1]),
            "n_detected": len(neuron_det),
            "fdr": cal["table"],  # on the report seeds; `fdr_calibration` on the others
            "fdr_calibration": cal["calibration_table"],
            "fdr_at_configured": fdr_table(real["evidence"], report_evs, configured),
            "criterion_pass_counts": {k: int(v.sum()) for k, v in
                                      criterion(real["evidence"], thr).items()},
            "detected": neuron_det,
            # Every neuron, compactly: enough to re-check gap filling from this file alone.
            "all": {"preferred_orientation": real["evidence"]["preferred_orientation"].tolist(),
                    "peak_sigma": np.round(real["evidence"]["peak_sigma"], 3).tolist(),
                    "curve_tuned": curve_tuned(real["evidence"], thr).tolist()},
        },
    }
    figs: dict[str, Any] = {}
    det_units = [d["unit"] for d in neuron_det]
    figs["tuning_neurons"] = (real["evidence"], tc_real, real["mean"], real["std"], det_units,
                              null_curves, "neuron", ccfg.n_tuning_figures)
    figs["evidence_neurons"] = (real["evidence"], null_evs, thr)
    return NeuronCensus(probe=probe, table=table, real=real, thr=thr, tc_real=tc_real,
                        neuron_det=neuron_det, result=result, figs=figs, timings=timings,
                        reference_images=reference_images)


def run_census(model, layer: str, cfg, inputs: CensusInputs | None = None,
               features: FeatureInputs | None = None, *, memo: NeuronCensusMemo | None = None,
               out_dir=None, log: Callable[[dict], None] | None = None,
               on_batch: BatchFn | None = None, extra: dict | None = None,
               verbose: bool = True) -> dict:
    """Curve-detector census of `layer`'s neurons (and an SAE's features), with nulls and FDR.

    `inputs` says what the neurons are measured against, `features` which SAE is scored (none:
    neurons only). `memo` (owned by the caller, e.g. an evaluation session) keeps the neuron
    census, so a sweep computes it once. `extra` is merged into the result (provenance).
    Returns a JSON-able dict; with `out_dir`, writes curves.json and the figures there
    (`write_census`). `on_batch` is called after every forward pass over the battery of the
    real and null networks (progress); `log` gets the headline scalars.
    """
    import time

    inputs = inputs or CensusInputs()
    ccfg = curves_config(cfg)
    t_start = time.perf_counter()
    say = logger.info if verbose else (lambda *a, **k: None)
    n_seeds = int(ccfg.n_null_seeds if inputs.null_seeds is None else inputs.null_seeds)
    key = NeuronCensusMemo.key_of(model, layer, ccfg, n_seeds, inputs.source,
                                  sigma_key(inputs))
    part = memo.get(key) if memo is not None else None
    if part is not None:
        say(f"[curves] {layer}: reusing the neuron census and nulls computed earlier")
    else:
        part = neuron_census(model, layer, ccfg, n_seeds, inputs, say, on_batch)
        if memo is not None:
            memo.put(key, part)
    timings = dict(part.timings)
    result = copy.deepcopy(part.result)
    figs = dict(part.figs)
    grid = result["threshold_grid"]
    new_deg: list[float] = []
    copy_deg: list[float] = []
    band_f = None
    if features is not None:
        t0 = time.perf_counter()
        fc = feature_census(model, layer, ccfg, part, features, n_seeds)
        result["features"], new_deg, copy_deg = fc["result"], fc["new_deg"], fc["copy_deg"]
        result["sigma_source"]["features"] = fc["sigma"]
        figs.update(fc["figs"])
        if grid:
            band_f = band_summary(grid, part.real["evidence"],
                                  result["criterion"]["used"], ccfg.min_gap_deg,
                                  tol=ccfg.cover_tolerance_deg, **fc["band_args"])
        timings["features_s"] = time.perf_counter() - t0
    control = plant_control(model, layer, ccfg, part, features, result.get("features"))
    if control is not None:  # a planted positive control (model.plant)
        result["control"] = control
        say(f"[curves] control {control['kind']}: " + ", ".join(
            f"{k} {control[k]}" for k in ("detector", "orientation_deg", "neuron_census_lost",
                                          "found", "n_functional_copies") if k in control))
    neuron_deg = [d["preferred_orientation"] for d in part.neuron_det]
    cov = coverage(neuron_deg, new_deg, ccfg.min_gap_deg)
    cov["n_copy_detectors"] = len(copy_deg)
    cov["copies_deg"] = [float(x) for x in copy_deg]
    cov["counts_only"] = "new features (copies of a neuron never fill a gap)"
    result["coverage"] = cov
    if grid:
        result["band"] = band_f if band_f is not None else band_summary(
            grid, part.real["evidence"], result["criterion"]["used"], ccfg.min_gap_deg)
        figs["threshold_band"] = (grid, result["band"], ccfg.max_fdr)
    figs["coverage"] = (neuron_deg, new_deg, ccfg.min_gap_deg, copy_deg)
    # The σ sample as it was used (the features and the control may have read it too).
    result["sigma_source"] = {**part.reference_images.record(), **result["sigma_source"]}
    timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = timings
    result.update(extra or {})
    say(_headline(result))
    if out_dir is not None:
        result["files"] = write_census(out_dir, result, figs)
    if log is not None:
        log(_scalars(result))
    return result


def fdr_text(v: dict) -> str:
    """'FDR 0.05 (95% bound 0.11)' of one null's fdr_table entry; '–' for 0/0."""
    def num(x) -> str:
        return "–" if x is None else f"{x:.2f}"

    return f"FDR {num(v.get('fdr'))} (95% bound {num(v.get('fdr_upper95'))})"


def _headline(res: dict) -> str:
    n = res["neurons"]
    parts = [f"[curves] {res['layer']}: {n['n_detected']}/{n['n_units']} neurons"]
    for k, v in n["fdr"]["nulls"].items():
        parts.append(f"{k} null {v['counts']} ({fdr_text(v)})")
    if "features" in res:
        f = res["features"]
        parts.append(f"{f['n_detected']}/{f['n_units']} features = {f['n_copies']} copies "
                     f"({f.get('n_shifted_copies', 0)} shifted) + {f['n_new']} new "
                     f"({f.get('n_fills_gap', 0)} fill a gap; weight rule: "
                     f"{f.get('n_weight_copies')} copies)")
        for k, v in f["fdr"]["nulls"].items():
            parts.append(f"{k} {v['counts']} ({fdr_text(v)})")
    c = res["coverage"]
    parts.append(f"largest gap {c['largest_gap_neurons_deg']:.0f}° -> "
                 f"{c['largest_gap_combined_deg']:.0f}° with new features "
                 f"({c['n_features_in_neuron_gaps']} new in gaps)")
    band = res.get("band")
    if band and band.get("n_points"):
        r = band["largest_gap_neurons_deg_range"]
        parts.append(f"over {band['n_points']} thresholds with FDR <= "
                     f"{res['criterion']['max_fdr']}: neuron gap {r['min']:.0f}-{r['max']:.0f}°")
        g = band.get("n_new_in_neuron_gaps_range")
        if g:
            parts.append(f"new in gaps {g['min']:.0f}-{g['max']:.0f}")
    return "; ".join(parts)


def _scalars(res: dict) -> dict:
    n = res["neurons"]
    out = {"curves/n_neuron_detectors": n["n_detected"],
           "curves/neuron_fdr": n["fdr"]["fdr"],
           "curves/neuron_fdr_upper95": n["fdr"].get("fdr_upper95"),
           "curves/largest_gap_neurons_deg": res["coverage"]["largest_gap_neurons_deg"],
           "curves/largest_gap_combined_deg": res["coverage"]["largest_gap_combined_deg"],
           "curves/n_features_in_neuron_gaps": res["coverage"]["n_features_in_neuron_gaps"]}
    for k, v in n["fdr"]["nulls"].items():
        out[f"curves/null_{k}_mean"] = v["mean"]
    if "features" in res:
        f = res["features"]
        out["curves/n_feature_detectors"] = f["n_detected"]
        out["curves/n_copies"] = f["n_copies"]
        out["curves/n_new"] = f["n_new"]
        out["curves/feature_fdr"] = f["fdr"]["fdr"]
        out["curves/n_shifted_copies"] = f.get("n_shifted_copies")
        out["curves/n_fills_gap"] = f.get("n_fills_gap")
        out["curves/n_weight_copies"] = f.get("n_weight_copies")
    return {k: v for k, v in out.items() if v is not None}  # 0/0 FDRs are not logged


def write_census(out_dir, result: dict, figs: dict) -> dict[str, str]:
    """Write curves.json and the PNG figures into out_dir; return their paths."""
    from .figures import save_census_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = save_census_figures(out, figs)
    result = {**result, "files": {**paths, "json": str(out / "curves.json")}}
    write_json(out / "curves.json", result)
    return result["files"]
