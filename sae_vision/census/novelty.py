"""Is an SAE curve feature a new detector, or a copy of one neuron? (pure functions)

Also: which new detectors fill a neuron gap that no curve-tuned neuron covers, and how that
holds across the census's FDR band (`feature_novelty`, `band_summary`).

A feature that passes the curve census may simply be one of the layer's own neurons, written
again: its decoder row (what it writes) or its encoder column (what it reads) points along one
channel axis. Such a feature cannot fill a gap that the neurons leave, whatever its measured
preferred orientation (a sharpened copy can prefer an orientation 5-20° away from its neuron's,
because the encoder subtracts a little of the neighbouring curve neurons).

For every feature and for both of its directions (decoder row W_dec[f], encoder column
W_enc[:, f]) this module records:
- `top1_neuron`, `top1_cos`: the channel axis with the largest |cosine| to the direction
  (the signed cosine is kept);
- `top1_share`, `top3_share`: the share of the direction's squared norm on its top-1 and top-3
  channels (top1_share = top1_cos²);
- whether that neuron is itself a census curve detector, and its preferred orientation.

A census feature is a **copy** when max(decoder top1_share, encoder top1_share) >=
`max_share` (`CurvesConfig.copy_min_share`, default 0.6: |cos| >= 0.77 with one axis on either
side); otherwise it is **new**. Only new detectors count as filling orientation gaps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .curves import circ_diff, coverage, criterion, grid_thresholds, orientation_gaps


def axis_alignment(dirs_FD: np.ndarray, top: int = 3) -> dict[str, np.ndarray]:
    """Per direction (rows of [F, D]): nearest channel axis, its signed cosine, top-1/3 shares."""
    w = np.asarray(dirs_FD, dtype=np.float64)
    n2 = np.maximum((w * w).sum(1, keepdims=True), 1e-30)
    share = w * w / n2
    order = np.argsort(-share, axis=1)[:, :top]
    rows = np.arange(len(w))[:, None]
    top_share = share[rows, order]
    top1 = order[:, 0]
    return {
        "top1_neuron": top1,
        "top1_cos": w[np.arange(len(w)), top1] / np.sqrt(n2[:, 0]),
        "top1_share": top_share[:, 0],
        "top3_share": top_share.sum(1),
        "top_neurons": order,
        "top_shares": top_share,
    }


def is_copy(dec_align: Mapping, enc_align: Mapping | None, max_share: float) -> np.ndarray:
    """[F] True where the decoder or the encoder direction is mostly one channel axis."""
    share = np.asarray(dec_align["top1_share"], dtype=np.float64)
    if enc_align is not None:
        share = np.maximum(share, np.asarray(enc_align["top1_share"], dtype=np.float64))
    return share >= float(max_share)


def novelty_records(units: Sequence[int], dec_align: Mapping, enc_align: Mapping | None,
                    neuron_orientation: Mapping[int, float], max_share: float) -> list[dict]:
    """One JSON-able record per feature in `units`: both alignments and its class."""
    copy = is_copy(dec_align, enc_align, max_share)
    out = []
    for f in units:
        rec: dict = {"feature": int(f), "class": "copy" if copy[f] else "new"}
        for side, al in (("decoder", dec_align), ("encoder", enc_align)):
            if al is None:
                continue
            n = int(al["top1_neuron"][f])
            rec[side] = {
                "neuron": n,
                "cos": round(float(al["top1_cos"][f]), 4),
                "top1_share": round(float(al["top1_share"][f]), 4),
                "top3_share": round(float(al["top3_share"][f]), 4),
                "top_neurons": [int(x) for x in al["top_neurons"][f]],
                "top_shares": [round(float(x), 4) for x in al["top_shares"][f]],
                "neuron_is_detector": n in neuron_orientation,
                "neuron_orientation": (float(neuron_orientation[n]) if n in neuron_orientation
                                       else None),
            }
        out.append(rec)
    return out


def split_by_class(records: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(copies, new) feature ids of novelty records."""
    copies = [r["feature"] for r in records if r["class"] == "copy"]
    new = [r["feature"] for r in records if r["class"] == "new"]
    return copies, new


def alignment_summary(dec_align: Mapping, enc_align: Mapping | None) -> dict:
    """Distribution of top-1 shares over every feature of the dictionary (JSON-able)."""
    out = {}
    for side, al in (("decoder", dec_align), ("encoder", enc_align)):
        if al is None:
            continue
        s = np.asarray(al["top1_share"], dtype=np.float64)
        q = np.quantile(s, [0.1, 0.25, 0.5, 0.75, 0.9]) if len(s) else [np.nan] * 5
        out[side] = {"mean_top1_share": float(s.mean()) if len(s) else None,
                     **{f"p{p}": float(v) for p, v in zip((10, 25, 50, 75, 90), q)},
                     "frac_top1_share_ge_0.9": float((s >= 0.9).mean()) if len(s) else None}
    return out


# --------------------------------------------------------------------------------------------
# Copies and new detectors among census features, and across the FDR band


def neuron_orientations(ev: dict, thr: dict) -> dict[int, float]:
    """Preferred orientation of every unit detected at thresholds `thr`."""
    det = criterion(ev, thr)["detected"]
    return {int(u): float(ev["preferred_orientation"][u]) for u in np.where(det)[0]}


TUNING_CRITERIA = ("peak_sigma", "curve_line_ratio", "circular_variance", "secondary_peak_ratio")


def curve_tuned(ev: dict, thr: dict) -> np.ndarray:
    """[U] units that pass criteria 1-3 alone (strong, curve over line, unimodal): curve-tuned,
    whether or not they survive the invariance and discrimination tests of the full census."""
    crit = criterion(ev, thr)
    return np.logical_and.reduce([crit[k] for k in TUNING_CRITERIA])


def covering_neurons(f: int, f_deg: float, dec_al: dict, real_ev: dict, tuned: np.ndarray,
                     tolerance_deg: float, min_share: float = 0.1) -> list[int]:
    """The feature's top decoder neurons (share >= min_share) that are curve-tuned on their own
    at an orientation within tolerance of the feature's: a gap such a feature "fills" is
    already covered by a neuron that only the strict census rejected."""
    out = []
    for n, sh in zip(dec_al["top_neurons"][f], dec_al["top_shares"][f]):
        if sh >= min_share and tuned[n] and circ_diff(
                real_ev["preferred_orientation"][n], f_deg) <= tolerance_deg:
            out.append(int(n))
    return out


def feature_novelty(f_ev: dict, f_thr: dict, real_ev: dict, n_thr: dict, dec_al: dict,
                    enc_al: dict | None, max_share: float, min_gap_deg: float,
                    rnd: list[tuple[dict, dict]] = (), tol: float = 15.0) -> dict:
    """Copies and new detectors among census features at (f_thr, n_thr), the coverage that the
    new ones alone give, the new ones in gaps that no curve-tuned top neuron of their own
    already covers (`n_new_in_gaps_uncovered`), and the random-direction null's count of "new"
    detectors."""
    neuron_deg = neuron_orientations(real_ev, n_thr)
    units = np.where(criterion(f_ev, f_thr)["detected"])[0].tolist()
    copy = is_copy(dec_al, enc_al, max_share)
    new = [u for u in units if not copy[u]]
    new_deg = [float(f_ev["preferred_orientation"][u]) for u in new]
    cov = coverage(list(neuron_deg.values()), new_deg, min_gap_deg)
    tuned = curve_tuned(real_ev, n_thr)
    in_gap = set(cov["features_in_neuron_gaps_deg"])
    covered = {u: covering_neurons(u, d, dec_al, real_ev, tuned, tol)
               for u, d in zip(new, new_deg) if d in in_gap}
    uncovered_deg = [d for u, d in zip(new, new_deg) if u in covered and not covered[u]]
    tuned_deg = [float(real_ev["preferred_orientation"][n]) for n in np.where(tuned)[0]]
    rnd_new = []
    for r_ev, r_al in rnd:
        r_units = np.where(criterion(r_ev, f_thr)["detected"])[0]
        rnd_new.append(int((~is_copy(r_al, None, max_share)[r_units]).sum()))
    mean_rnd = float(np.mean(rnd_new)) if rnd_new else None
    return {"n_detected": len(units), "n_copies": len(units) - len(new), "n_new": len(new),
            "new": new, "n_new_in_neuron_gaps": cov["n_features_in_neuron_gaps"],
            "new_in_neuron_gaps_deg": cov["features_in_neuron_gaps_deg"],
            "largest_gap_neurons_deg": cov["largest_gap_neurons_deg"],
            "largest_gap_neurons_plus_new_deg": cov["largest_gap_combined_deg"],
            "new_in_gaps_covered_by": {int(u): c for u, c in covered.items()},
            "n_new_in_gaps_uncovered": len(uncovered_deg),
            "largest_gap_neurons_plus_uncovered_new_deg": orientation_gaps(
                list(neuron_deg.values()) + uncovered_deg)[0][1],
            "n_curve_tuned_neurons": int(tuned.sum()),
            "largest_gap_curve_tuned_neurons_deg": orientation_gaps(tuned_deg)[0][1],
            "random_directions_new": rnd_new,
            "new_fdr": (mean_rnd / len(new) if new else (0.0 if not mean_rnd else math.inf))
            if mean_rnd is not None else None}


def band_summary(grid: list[dict], real_ev: dict, base: dict, min_gap_deg: float,
                 f_ev: dict | None = None, dec_al=None, enc_al=None, max_share: float = 0.6,
                 rnd=(), tol: float = 15.0) -> dict:
    """Largest neuron gap (and, given features, new detectors and gap filling) at every grid
    point of the FDR band, with min/median/max over the band."""
    rows = []
    for g in grid:
        if not g["in_band"]:
            continue
        thr = grid_thresholds(g, base)
        neuron_deg = list(neuron_orientations(real_ev, thr).values())
        row = {k: g[k] for k in ("min_peak_sigma", "min_curve_line_ratio", "min_invariance_corr",
                                  "real", "fdr")}
        row["largest_gap_neurons_deg"] = orientation_gaps(neuron_deg)[0][1]
        if f_ev is not None:
            nov = feature_novelty(f_ev, thr, real_ev, thr, dec_al, enc_al, max_share,
                                  min_gap_deg, rnd, tol)
            row.update({k: nov[k] for k in ("n_detected", "n_copies", "n_new",
                                            "n_new_in_neuron_gaps", "n_new_in_gaps_uncovered",
                                            "largest_gap_neurons_plus_new_deg",
                                            "random_directions_new")})
        rows.append(row)

    def span(key: str) -> dict | None:
        v = [r[key] for r in rows if r.get(key) is not None]
        return {"min": float(np.min(v)), "median": float(np.median(v)),
                "max": float(np.max(v))} if v else None

    keys = ["real", "largest_gap_neurons_deg"] + (
        ["n_detected", "n_copies", "n_new", "n_new_in_neuron_gaps", "n_new_in_gaps_uncovered",
         "largest_gap_neurons_plus_new_deg"] if f_ev is not None else [])
    return {"n_points": len(rows), "points": rows, **{f"{k}_range": span(k) for k in keys}}
