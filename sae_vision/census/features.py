"""The SAE features' part of the curve census: their evidence beside the random-direction null
(c), detections at the neurons' calibrated thresholds, and which are copies of one neuron and
which are new detectors (`sae_vision.census.novelty`). `census.run_census` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import novelty as N
from .curves import calibrate_held_out, criterion, detections, evidence, tuning_curves
from .novelty import feature_novelty
from .parts import NeuronCensus
from .responses import RandomDirections, feature_responses, feature_stats


@dataclass
class FeatureInputs:
    """The SAE whose features the census scores, and where their natural statistics come from.

    By default (the evaluate stage) the features' σ comes from the neurons' σ sample: the SAE
    applied to the real network's activations at every position of the census photos
    (`parts.ReferenceImages.vectors`), so neurons, nulls and features share one σ unit.
    `vectors` (raw activation vectors) or `mean`/`std` (per-feature stats of
    curves.feature_response) replace it (toy tests). The random-direction null always takes
    its stats from the same vectors as the features.
    """

    sae: Any
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    vectors: torch.Tensor | None = None


def sae_directions(sae) -> tuple[np.ndarray, np.ndarray | None]:
    """Decoder rows [F, D] and encoder columns as rows [F, D] (None when the SAE has no
    separate encoder, e.g. a tied or random dictionary)."""
    dec = sae.W_dec.detach().float().cpu().numpy()
    enc = getattr(sae, "W_enc", None)
    enc = None if enc is None else enc.detach().float().cpu().numpy().T
    return dec, enc


def _feature_evidence(model, layer: str, ccfg, part: NeuronCensus, features: FeatureInputs,
                      n_seeds: int) -> dict:
    """Evidence of every SAE feature and of the random-direction null (c), through the same
    path with the same vectors."""
    sae, real = features.sae, part.real
    key = ccfg.feature_response
    if key not in ("pre_acts", "encode"):
        raise ValueError(f"curves.feature_response={key!r} is not valid; "
                         "choose pre_acts or encode")
    was_training = getattr(sae, "training", False)
    if isinstance(sae, nn.Module):
        sae.eval()  # batchtopk encodes with its learned threshold, not per batch
    feats = feature_responses(sae, real["acts"])
    vectors = features.vectors
    sigma = "given vectors"
    if vectors is None:  # the neurons' σ sample (the same photos, every position)
        vectors, sigma = part.reference_images.vectors(model, layer), "photos"
    stats = feature_stats(sae, vectors)
    if isinstance(sae, nn.Module):
        sae.train(was_training)
    if features.std is not None and features.mean is not None:
        stats[key] = (torch.as_tensor(features.mean).float(),
                      torch.as_tensor(features.std).float())
        sigma = f"given mean/std ({key}); the other response and random directions: {sigma}"
    f_mean, f_std = stats[key]
    f_ev = evidence(feats[key].numpy(), part.table, ccfg, f_mean.numpy(), f_std.numpy())
    # Both responses are recorded: the other one's peak and orientation ride along.
    other = "encode" if key == "pre_acts" else "pre_acts"
    o_ev = evidence(feats[other].numpy(), part.table, ccfg, stats[other][0].numpy(),
                    stats[other][1].numpy())
    f_ev[f"{other}_peak_sigma"] = o_ev["peak_sigma"]
    f_ev[f"{other}_preferred_orientation"] = o_ev["preferred_orientation"]
    rnd_evs, rnd_curves, rnd_nov = [], [], []
    n_dirs = int(ccfg.n_random_directions or feats[key].shape[1])
    centre = vectors.mean(0)
    for seed in range(n_seeds):
        rd = RandomDirections(real["acts"].shape[1], n_dirs, seed, centre)
        r_both = feature_responses(rd, real["acts"], which=tuple({"pre_acts", key}))
        r_feats = r_both[key]
        # Functionally new: no channel correlates >= copy_min_rho over the battery.
        r_new = N.response_correlation(r_both["pre_acts"].numpy(), real["acts"].numpy())[
            "rho_max"] < ccfg.copy_min_rho
        r_mean, r_std = feature_stats(rd, vectors, which=(key,))[key]
        e = evidence(r_feats.numpy(), part.table, ccfg, r_mean.numpy(), r_std.numpy())
        rnd_evs.append(e)
        rnd_curves.append((e, tuning_curves(r_feats.numpy(), part.table, ccfg), r_mean, r_std))
        rnd_nov.append((e, N.axis_alignment(rd.W_dec.numpy()), r_new))
    return {"key": key, "resp": feats[key], "pre": feats["pre_acts"], "mean": f_mean,
            "std": f_std, "ev": f_ev,
            "nulls": {"random_directions": rnd_evs} if rnd_evs else {},
            "null_curves": rnd_curves, "rnd_nov": rnd_nov, "n_dirs": n_dirs, "sigma": sigma}


def _new_feature_records(feat_det: list[dict], new_units: set, f_tc: dict, dec: np.ndarray,
                         n_deg: dict, tc_real: dict) -> list[dict]:
    """Each new detector with its top decoder neurons and their σ tuning at its radius."""
    records = []
    for d in feat_det:
        if d["unit"] not in new_units:
            continue
        ri = list(f_tc["radii"]).index(float(d["preferred_radius"]))
        rec = d["novelty"]
        neurons = []
        for n, sh in zip(rec["decoder"]["top_neurons"], rec["decoder"]["top_shares"]):
            neurons.append({"neuron": int(n), "share": sh,
                            "cos": float(dec[d["unit"], n] / max(np.linalg.norm(
                                dec[d["unit"]]), 1e-30)),
                            "is_detector": int(n) in n_deg,
                            "orientation": n_deg.get(int(n)),
                            "tuning_sigma": np.round(tc_real["sigma"][n, ri], 3).tolist()})
        records.append({"feature": d["unit"],
                        "preferred_orientation": d["preferred_orientation"],
                        "preferred_radius": d["preferred_radius"],
                        "tuning_sigma": d["tuning_sigma"], "neurons": neurons})
    return records


def _label_features(fe: dict, part: NeuronCensus, ccfg, feat_det: list[dict], dec_al: dict,
                    enc_al: dict | None) -> tuple[list[dict], np.ndarray]:
    """Both rules' labels in each detected feature's `novelty` record (functional: `class`,
    weight shares: `weight_class`), the functional records, and the [F] mask of features that
    no channel's battery responses correlate with >= copy_min_rho (functionally new)."""
    n_deg = {d["unit"]: d["preferred_orientation"] for d in part.neuron_det}
    units = [d["unit"] for d in feat_det]
    nov_recs = N.novelty_records(units, dec_al, enc_al, n_deg, ccfg.copy_min_share)
    real_ev, f_ev = part.real["evidence"], fe["ev"]
    pre, acts = fe["pre"].numpy(), part.real["acts"].numpy()
    func = N.functional_novelty(
        pre, acts, f_ev["preferred_orientation"], real_ev["preferred_orientation"], units,
        list(n_deg), N.curve_tuned(real_ev, part.thr), real_ev["tuning_width_deg"],
        (enc_al or dec_al)["top1_neuron"], min_rho=ccfg.copy_min_rho,
        max_dtheta_deg=ccfg.copy_max_dtheta_deg, min_gap_deg=ccfg.min_gap_deg,
        min_sep_deg=ccfg.gap_min_separation_deg)
    for d, rec, fr in zip(feat_det, nov_recs, func):
        d["passes_in_null"] = None  # random directions have no counterpart of a feature
        d["novelty"] = {**rec, **fr}
    return func, N.response_correlation(pre, acts)["rho_max"] < ccfg.copy_min_rho


def _rule_counts(ccfg, func: list[dict], f_deg: dict, neuron_deg: list, by_weight: dict) -> dict:
    """The functional rule's extra counts and gaps, and the weight rule's counts beside them."""
    return {"rule": "functional (census/novelty.py): copies include shifted copies",
            "n_shifted_copies": sum(r["class"] == "shifted copy" for r in func),
            "n_fills_gap": sum(r["fills_gap"] for r in func),
            "functional": N.functional_summary(func, f_deg, neuron_deg),
            "copy_min_rho": ccfg.copy_min_rho, "copy_max_dtheta_deg": ccfg.copy_max_dtheta_deg,
            "n_weight_copies": by_weight["n_copies"], "n_weight_new": by_weight["n_new"]}


def feature_census(model, layer: str, ccfg, part: NeuronCensus, features: FeatureInputs,
                   n_seeds: int) -> dict:
    """The SAE part of the census: detected features at the neurons' calibrated thresholds
    (tightened by the random-direction null if need be), copies and new detectors.

    Returns {"result": the `features` entry of curves.json, "new_deg", "copy_deg", "figs",
    "band_args": the feature keyword arguments of `band_summary`, "sigma": where the features'
    σ came from}. New and copy follow the functional rule; the weight-share counts ride along
    (`n_weight_*`, `by_copy_threshold`).
    """
    fe = _feature_evidence(model, layer, ccfg, part, features, n_seeds)
    f_ev, f_nulls, thr = fe["ev"], fe["nulls"], part.thr
    # The feature census starts from the neurons' calibrated thresholds (same criterion); its
    # own null's calibration seeds may tighten them, never loosen them (`calibrate_held_out`).
    f_cal = calibrate_held_out(f_ev, f_nulls, ccfg, base=thr)
    f_thr = f_cal["thresholds"]
    f_null_pass = {k: [criterion(e, f_thr)["detected"] for e in v] for k, v in f_nulls.items()}
    f_tc = tuning_curves(fe["resp"].numpy(), part.table, ccfg, fe["mean"], fe["std"])
    feat_det = detections(f_ev, f_thr, tuning_sigma=f_tc["sigma"], tuning_radii=f_tc["radii"])
    # Novelty: is each detected feature a copy of one neuron, or a new detector? Both rules:
    # the functional one (`class`, the counts) and the weight shares (`weight_class`).
    dec, enc = sae_directions(features.sae)
    dec_al, enc_al = N.axis_alignment(dec), N.axis_alignment(enc) if enc is not None else None
    n_deg = {d["unit"]: d["preferred_orientation"] for d in part.neuron_det}
    real_ev, tol = part.real["evidence"], ccfg.cover_tolerance_deg
    rnd_nov = [fe["rnd_nov"][s] for s in f_cal["seeds"]["report"]]  # new-detector FDR, band
    func, new_mask = _label_features(fe, part, ccfg, feat_det, dec_al, enc_al)
    nov = feature_novelty(f_ev, f_thr, real_ev, thr, dec_al, enc_al, ccfg.copy_min_share,
                          ccfg.min_gap_deg, rnd_nov, tol, new_mask)
    by_weight = feature_novelty(f_ev, f_thr, real_ev, thr, dec_al, enc_al,
                                ccfg.copy_min_share, ccfg.min_gap_deg, rnd_nov, tol)
    f_deg = {d["unit"]: d["preferred_orientation"] for d in feat_det}
    by_share = {f"{s:g}": {k: v for k, v in feature_novelty(
        f_ev, f_thr, real_ev, thr, dec_al, enc_al, s, ccfg.min_gap_deg, rnd_nov, tol).items()
        if k not in ("new", "new_in_neuron_gaps_deg", "new_in_gaps_covered_by")}
        for s in ccfg.copy_share_grid}
    new_units = set(nov["new"])
    new_records = _new_feature_records(feat_det, new_units, f_tc, dec, n_deg, part.tc_real)
    result = {
        "n_units": int(fe["resp"].shape[1]),
        "response": fe["key"],
        "n_detected": len(feat_det),
        "n_copies": nov["n_copies"], "n_new": nov["n_new"],
        **_rule_counts(ccfg, func, f_deg, list(n_deg.values()), by_weight),
        "copy_min_share": ccfg.copy_min_share,
        "new_fdr_random_directions": nov["new_fdr"],
        "new_fdr_random_directions_upper95": nov["new_fdr_upper95"],
        "n_new_in_gaps_uncovered": nov["n_new_in_gaps_uncovered"],
        "new_in_gaps_covered_by": nov["new_in_gaps_covered_by"],
        "largest_gap_neurons_plus_uncovered_new_deg":
            nov["largest_gap_neurons_plus_uncovered_new_deg"],
        "n_curve_tuned_neurons": nov["n_curve_tuned_neurons"],
        "largest_gap_curve_tuned_neurons_deg": nov["largest_gap_curve_tuned_neurons_deg"],
        "random_directions_new": nov["random_directions_new"],
        "by_copy_threshold": by_share,
        "alignment": N.alignment_summary(dec_al, enc_al),
        "thresholds": f_thr,
        "tightened_beyond_neurons": f_cal["tightened"],
        "fdr": f_cal["table"], "fdr_calibration": f_cal["calibration_table"],  # seeds: below
        "fdr_target_met": f_cal["met"], "random_directions_seeds": f_cal["seeds"],
        "n_random_directions": fe["n_dirs"],
        "null_pass_counts": {k: [int(m.sum()) for m in v] for k, v in f_null_pass.items()},
        "detected": feat_det,
        "new_features": new_records,
    }
    figs: dict[str, Any] = {
        "tuning_features": (f_ev, f_tc, fe["mean"], fe["std"], [d["unit"] for d in feat_det],
                            {"random_directions": fe["null_curves"]}, "feature",
                            ccfg.n_tuning_figures),
        "evidence_features": (f_ev, f_nulls, f_thr)}
    if new_records:
        figs["new_features"] = (new_records, part.result["tuning_orientations"],
                                ccfg.n_new_figures)
    return {"result": result, "figs": figs, "sigma": fe["sigma"],
            "new_deg": [d["preferred_orientation"] for d in feat_det if d["unit"] in new_units],
            "copy_deg": [d["preferred_orientation"] for d in feat_det
                         if d["unit"] not in new_units],
            "band_args": {"f_ev": f_ev, "dec_al": dec_al, "enc_al": enc_al,
                          "max_share": ccfg.copy_min_share, "rnd": rnd_nov,
                          "new_mask": new_mask}}
