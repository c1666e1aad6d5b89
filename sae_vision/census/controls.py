"""The planted positive controls' outcome (`control` in curves.json): did the neuron census lose
the planted detector, and does the SAE have a census feature that is it?

A model carrying a plant (`model.plant`, see sae_vision.activations.plant) exposes it as
`model.plant`: the rotated channels, the orthogonal map R and, for a hidden detector, the
detector's direction in the rotated layer, u = R e_d, whose dot product with the layer is the
detector's original response. Everything here is measured on the census's own stimulus battery
(the same responses the census scores), so "found" means found by the census, not by weights.
"""

from __future__ import annotations

import numpy as np
import torch

from .curves import circ_diff, criterion, evidence, orientation_gaps
from .novelty import curve_tuned, functional_novelty, pearson_columns
from .parts import NeuronCensus
from .responses import feature_responses

# A feature is the planted detector when the census detects it within curves.cover_tolerance_deg
# of the detector's orientation AND its battery responses correlate with the detector's at
# >= this. Orientation alone is no rule (a copy's measured orientation can drift 5-20°; a
# neighbouring neuron's copy may sit within 15°); the correlation ties it to the planted unit.
FOUND_MIN_CORR = 0.8


def _corr_cols(a_NF: np.ndarray, b_N: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of a with b ([F]; 0 for a constant column)."""
    return pearson_columns(a_NF, np.asarray(b_N)[:, None])[:, 0]


def _gap_containing(neuron_deg: list[float], theta: float) -> float:
    """Width of the neuron orientation gap that `theta` lies in (0 if a neuron sits on it)."""
    for start, width in orientation_gaps(neuron_deg):
        d = (theta - start) % 360.0
        if 0.0 < d < width:
            return float(width)
    return 0.0


def oracle_record(resp_N: np.ndarray, theta: float, acts_NU: np.ndarray, ev: dict,
                  detected: list[int], tuned_U: np.ndarray, ccfg) -> dict:
    """The planted detector itself (its exact direction u; `resp_N` = u · y on the battery) as
    one census feature at `theta`, labelled by the study's functional and gap rules
    (novelty.functional_novelty) against the planted layer's channels (`acts_NU`, their
    evidence `ev`, the census-detected channels and the curve-tuned mask): what an SAE that
    recovers it exactly would be called."""
    rec = functional_novelty(
        np.asarray(resp_N, dtype=np.float64)[:, None], acts_NU, np.array([theta]),
        ev["preferred_orientation"], [0], detected, tuned_U, ev["tuning_width_deg"],
        min_rho=ccfg.copy_min_rho, max_dtheta_deg=ccfg.copy_max_dtheta_deg,
        min_gap_deg=ccfg.min_gap_deg, min_sep_deg=ccfg.gap_min_separation_deg)[0]
    keys = ("class", "fills_gap", "rho_max", "rho_channel", "nearest_curve_tuned",
            "dtheta_nearest_curve_tuned_deg", "neighbour_separation_deg",
            "required_separation_deg", "gap_width_deg")
    return {k: rec[k] for k in keys}


def hidden_record(plant, ccfg, table, acts_NU: np.ndarray, ev: dict, thr: dict,
                  vectors_MD: np.ndarray) -> dict:
    """The planted detector as the census of the planted layer sees it (battery `table`, its
    responses `acts_NU` and their evidence `ev` at thresholds `thr`; natural vectors for the
    detector's σ): orientation, whether the neuron census lost it (no rotated channel detected,
    a gap at its place), the rotated channels still curve-tuned (criteria 1-3) and where, and
    the oracle (`oracle_record`). Returns {"resp", "nat", "record"}."""
    u = plant.hidden_direction().numpy()
    resp, nat = acts_NU @ u, vectors_MD @ u
    d_ev = evidence(resp[:, None], table, ccfg, np.array([nat.mean()]), np.array([nat.std()]))
    theta = float(d_ev["preferred_orientation"][0])
    deg = ev["preferred_orientation"]
    det_units = {int(i): float(deg[i]) for i in np.where(criterion(ev, thr)["detected"])[0]}
    tuned = curve_tuned(ev, thr)
    in_group = [c for c in plant.channels if c in det_units]
    near = [u_ for u_, d in det_units.items()
            if float(circ_diff(d, theta)) <= ccfg.cover_tolerance_deg]
    gap = _gap_containing(list(det_units.values()), theta)
    return {
        "resp": resp, "nat": nat,
        "record": {
            "detector": plant.detector, "partners": plant.channels[1:],
            "orientation_deg": theta,
            "peak_sigma": float(d_ev["peak_sigma"][0]),
            "passes_census_unrotated": bool(criterion(d_ev, thr)["detected"][0]),
            "rotated_channels_detected": in_group,
            "rotated_channels_curve_tuned": {int(c): float(deg[c]) for c in plant.channels
                                             if tuned[c]},
            "neurons_within_tolerance": near,
            "gap_at_detector_deg": gap,
            "neuron_census_lost": not in_group and gap >= ccfg.min_gap_deg,
            "oracle": oracle_record(resp, theta, acts_NU, ev, list(det_units), tuned, ccfg),
        },
    }


def hidden_detector(plant, ccfg, part: NeuronCensus, vectors_ND: torch.Tensor) -> dict:
    """`hidden_record` on the census's own battery responses, evidence and thresholds."""
    return hidden_record(plant, ccfg, part.table, part.real["acts"].double().numpy(),
                         part.real["evidence"], part.thr, vectors_ND.double().numpy())


def _best(detected: list[dict], corr: np.ndarray, theta: float, tol: float) -> dict | None:
    """The detected feature most correlated with the hidden detector, with its class."""
    if not detected:
        return None
    d = max(detected, key=lambda r: corr[r["unit"]])
    nov = d.get("novelty") or {}
    dtheta = float(circ_diff(d["preferred_orientation"], theta))
    found = bool(dtheta <= tol and corr[d["unit"]] >= FOUND_MIN_CORR)
    return {"feature": int(d["unit"]), "orientation_deg": d["preferred_orientation"],
            "orientation_diff_deg": dtheta, "corr_battery": round(float(corr[d["unit"]]), 4),
            "class": nov.get("class"), "weight_class": nov.get("weight_class"),
            "fills_gap": nov.get("fills_gap"),
            "decoder_top_neurons": (nov.get("decoder") or {}).get("top_neurons"),
            "decoder_top_shares": (nov.get("decoder") or {}).get("top_shares"),
            "found": found,
            # what the study's verdict needs: found, and the census calls it a new detector
            # that fills a gap (the functional rule of census/novelty.py)
            "found_new_gap_filling": bool(found and nov.get("class") == "new"
                                          and nov.get("fills_gap"))}


def control_vectors(model, layer: str, part: NeuronCensus, features) -> torch.Tensor:
    """Natural vectors of the (rotated) layer for the hidden detector's σ: the features'
    vectors when given, else the census's σ sample (the photos at every position), the one
    the neurons and features take their σ from."""
    if features is not None and features.vectors is not None:
        return features.vectors
    return part.reference_images.vectors(model, layer)


def plant_control(model, layer: str, ccfg, part: NeuronCensus, features,
                  features_result: dict | None) -> dict | None:
    """The `control` entry of curves.json for a planted model (None without a plant on `layer`).

    hidden: the detector, its orientation, whether the neuron census lost it, and the SAE's
    best census feature (most correlated on the battery), its orientation difference, weight
    class, and `found`. rotate: per detected feature, its best battery correlation with any
    unrotated channel (a functional copy test the weight rule cannot make in a rotated basis).
    """
    plant = getattr(model, "plant", None)
    if plant is None or plant.layer != layer:
        return None
    sae, response = (features.sae if features else None), ccfg.feature_response
    out: dict = {"kind": plant.kind, "plant_id": plant.plant_id, "layer": layer,
                 "found_rule": f"a detected feature within {ccfg.cover_tolerance_deg:g}° of the "
                               f"detector with battery correlation >= {FOUND_MIN_CORR}"}
    acts = part.real["acts"]
    f_resp = None
    if sae is not None:
        f_resp = feature_responses(sae, acts, which=(response,))[response].double().numpy()
    if plant.kind == "hidden":
        hd = hidden_detector(plant, ccfg, part, control_vectors(model, layer, part, features))
        out.update(hd["record"])
        out["found"] = False
        if f_resp is not None and features_result is not None:
            corr = _corr_cols(f_resp, hd["resp"])
            best_any = int(np.argmax(corr))
            out["best_feature"] = _best(features_result["detected"], corr,
                                        out["orientation_deg"], ccfg.cover_tolerance_deg)
            out["best_any_feature"] = {"feature": best_any,
                                       "corr_battery": round(float(corr[best_any]), 4)}
            out["found"] = bool(out["best_feature"] and out["best_feature"]["found"])
            out["found_new_gap_filling"] = bool(out["best_feature"]
                                                and out["best_feature"]["found_new_gap_filling"])
        return out
    if f_resp is not None and features_result is not None:
        h = acts.double().numpy() @ plant.matrix().numpy()  # h = R^T y, row-wise
        rows = []
        for d in features_result["detected"]:
            c = _corr_cols(h, f_resp[:, d["unit"]])
            n = int(np.argmax(c))
            rows.append({"feature": int(d["unit"]), "neuron": n, "corr_battery": round(float(
                c[n]), 4), "class": (d.get("novelty") or {}).get("class"),
                "weight_class": (d.get("novelty") or {}).get("weight_class")})
        out["features"] = rows
        out["n_functional_copies"] = sum(r["corr_battery"] >= FOUND_MIN_CORR for r in rows)
        out["n_weight_copies"] = sum(r["weight_class"] == "copy" for r in rows)
        out["n_census_copies"] = sum(r["class"] in ("copy", "shifted copy") for r in rows)
    return out
