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

The **weight rule** (`is_copy`, kept as `weight_class` so the two rules can be compared): a
census feature is a copy when max(decoder top1_share, encoder top1_share) >= `max_share`
(`CurvesConfig.copy_min_share`, default 0.6). It never asks what the feature does: a 0.60/0.40
mixture of two curve neurons 45° apart prefers an orientation between them and is a "copy", and
a copy of a neuron written in another basis (a rotated layer) is "new".

The **functional rule** (`functional_novelty`; the feature's `class`, and the counts that the
census and the findings table report) asks what the feature responds to. Over the whole
stimulus battery (every stimulus of `curves.make_battery`, all conditions) it takes the Pearson
correlation between the feature's pre-activation and every channel of the layer; `rho_max` is
the largest, `rho_channel` the channel that gives it. Then, with dθ the circular distance between
the feature's preferred orientation and that channel's (both measured by the census):
- **copy**: rho_max >= `copy_min_rho` and dθ <= `copy_max_dtheta_deg`: the feature responds like
  one channel and prefers what it prefers;
- **shifted copy**: rho_max >= `copy_min_rho` and dθ > `copy_max_dtheta_deg`: it responds like one
  channel, but its measured preferred orientation moved (a sharpened copy can move 5-20°);
  never counted as new;
- **new**: rho_max < `copy_min_rho`: no channel explains rho_max² of its battery variance.
Why 0.9 and 5° (`tests/census/test_novelty.py`, the broadly tuned `BroadToyNet`, 1,373 battery
stimuli; neighbouring curve neurons 45° apart correlate 0.23 over the battery): a one-hot copy has
rho 1; copies sharpened by subtracting 0.2 or 0.3 of both neighbours 0.97 and 0.92 (dθ 0); a copy
in a randomly rotated basis 1.0; the share 0.60/0.40 mixture of the 0° and 45° neurons 0.83 (it
prefers 10°, inside their 50° gap) and the 0.50/0.50 mixture 0.79 (20°). 0.9 (81% of the battery
variance on one channel) separates the copies from the mixtures; 5° is one orientation step of
the default battery. On BVLC mixed3b (2,453 stimuli, 14 detectors; the slow test
`test_on_real_mixed3b_sharpened_copies_are_copies_and_mixtures_never_plain_copies`) the two
overlap: copies of each detector sharpened by 0.2 of its three most correlated channels give
0.92-1.0 (by 0.3: 0.79-0.99), 50/50 and 60/40 mixtures of two detectors >= 15° apart 0.65-0.93.
Every mixture above 0.9 prefers an orientation 10-50° from its channel's, so none is a plain
copy; they are shifted copies, which is why shifted copies are counted apart
(`n_shifted_copies`) rather than hidden among copies or new features. Strongly sharpened copies
below 0.9 are "new" but sit on their neuron's orientation, so the gap test below, not the
label, keeps them from filling a gap. The threshold is a property of the layer's correlations
as much as of the feature: planted controls on the real layer say what a count means.

A feature **fills a gap** only when it is functionally new, lies inside a gap of >= `min_gap_deg`
between census-detected neurons, and lies at least max(`gap_min_separation_deg`, that neuron's
half width at half maximum) from both neighbouring curve-tuned neurons (criteria 1-3 alone,
`curve_tuned`), so that no neuron already tuned near its orientation covers it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .curves import (
    circ_diff,
    coverage,
    criterion,
    fdr_upper_bound,
    grid_thresholds,
    orientation_gaps,
)


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
        rec: dict = {"feature": int(f), "weight_class": "copy" if copy[f] else "new"}
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
    """(copies, new) feature ids of novelty records by their `class` (functional when there is
    one: copies and shifted copies are copies), else by `weight_class`."""
    label = [r.get("class", r.get("weight_class")) for r in records]
    copies = [r["feature"] for r, c in zip(records, label) if c != "new"]
    new = [r["feature"] for r, c in zip(records, label) if c == "new"]
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
# The functional rule: what a feature responds to, not where its weights sit

FUNCTIONAL_CLASSES = ("copy", "shifted copy", "new")


def pearson_columns(a_NF, b_NU) -> np.ndarray:
    """[F, U] Pearson correlation over the N rows of every column of a with every column of b;
    a column constant up to rounding (relative to its own scale) correlates 0 with everything."""

    def z(x: np.ndarray) -> np.ndarray:
        a = x - x.mean(0)
        sd = np.sqrt((a * a).sum(0))
        live = sd > 1e-9 * np.sqrt(len(x)) * np.abs(x).max(0, initial=0.0)
        return np.where(live, a / np.maximum(sd, 1e-300), 0.0)

    return z(np.asarray(a_NF, dtype=np.float64)).T @ z(np.asarray(b_NU, dtype=np.float64))


def response_correlation(f_resp_NF, n_resp_NU) -> dict[str, np.ndarray]:
    """Per feature (columns of [N, F]): the largest Pearson correlation over the N stimuli with
    any channel of [N, U] (`rho_max`, a constant column correlates 0) and that channel."""
    f = np.asarray(f_resp_NF, dtype=np.float64)
    n = np.asarray(n_resp_NU, dtype=np.float64)
    if f.shape[0] != n.shape[0]:
        raise ValueError(f"feature responses have {f.shape[0]} stimuli, channels {n.shape[0]}")
    rho_FU = pearson_columns(f, n)
    best = rho_FU.argmax(1) if rho_FU.size else np.zeros(f.shape[1], dtype=int)
    rho = rho_FU[np.arange(f.shape[1]), best] if rho_FU.size else np.zeros(f.shape[1])
    return {"rho_max": np.clip(rho, -1.0, 1.0), "channel": best}


def functional_class(rho_max: float, dtheta_deg: float, min_rho: float,
                     max_dtheta_deg: float) -> str:
    """copy / shifted copy / new from rho_max and the orientation move to its channel (module
    docstring)."""
    if rho_max < min_rho:
        return "new"
    return "copy" if dtheta_deg <= max_dtheta_deg else "shifted copy"


def _nearest(deg: float, others: dict[int, float]) -> tuple[int | None, float | None]:
    if not others:
        return None, None
    ids = list(others)
    d = circ_diff(np.array([others[i] for i in ids]), deg)
    return int(ids[int(d.argmin())]), float(d.min())


def fills_gap(deg: float, detector_deg: Sequence[float], tuned_deg: Sequence[float],
              tuned_width_deg: Sequence[float], min_gap_deg: float, min_sep_deg: float) -> dict:
    """Does an orientation lie in a gap of >= min_gap_deg between detectors, and at least
    max(min_sep_deg, half width) from both neighbouring curve-tuned neurons?"""
    gaps = [g for g in orientation_gaps(detector_deg) if g[1] >= min_gap_deg]
    in_gap = [w for s, w in gaps if 0.0 < (deg - s) % 360.0 < w] if len(detector_deg) else [360.0]
    seps = []
    if len(tuned_deg):
        t = np.mod(np.asarray(tuned_deg, dtype=np.float64), 360.0)
        ccw, cw = (t - deg) % 360.0, (deg - t) % 360.0  # distance going up / going down
        for j in {int(ccw.argmin()), int(cw.argmin())}:
            need = max(float(min_sep_deg), float(tuned_width_deg[j]))
            seps.append((float(circ_diff(t[j], deg)), need))
    clear = all(d >= need for d, need in seps)
    return {"in_neuron_gap": bool(in_gap), "gap_width_deg": max(in_gap) if in_gap else None,
            "neighbour_separation_deg": [round(d, 2) for d, _ in seps],
            "required_separation_deg": [round(n, 2) for _, n in seps],
            "clear_of_curve_tuned": bool(clear)}


def functional_novelty(f_resp_NF, n_resp_NU, f_deg_F, n_deg_U, units: Sequence[int],
                       detectors: Sequence[int], tuned_U, n_width_U, enc_top_F=None, *,
                       min_rho: float = 0.9, max_dtheta_deg: float = 5.0,
                       min_gap_deg: float = 30.0, min_sep_deg: float = 15.0) -> list[dict]:
    """The functional label of each feature in `units` (module docstring), one JSON-able record
    per feature.

    f_resp_NF / n_resp_NU: feature pre-activations and channel responses to the same stimuli
    (the whole battery); f_deg_F / n_deg_U: their preferred orientations (census evidence);
    detectors: census-detected neurons; tuned_U: curve-tuned mask (criteria 1-3); n_width_U:
    the neurons' half width at half maximum (degrees); enc_top_F: each feature's encoder top
    neuron (or decoder's), for the orientation difference to it.
    """
    corr = response_correlation(np.asarray(f_resp_NF)[:, list(units)], n_resp_NU)
    n_deg = np.asarray(n_deg_U, dtype=np.float64)
    tuned = np.asarray(tuned_U, dtype=bool)
    det = {int(u): float(n_deg[u]) for u in detectors}
    tuned_ids = np.where(tuned)[0]
    tun = {int(u): float(n_deg[u]) for u in tuned_ids}
    width = np.asarray(n_width_U, dtype=np.float64)
    out = []
    for i, f in enumerate(units):
        deg = float(np.asarray(f_deg_F)[f])
        ch = int(corr["channel"][i])
        rho = float(corr["rho_max"][i])
        dth = float(circ_diff(n_deg[ch], deg))
        rec: dict = {"feature": int(f), "rho_max": round(rho, 4), "rho_channel": ch,
                     "rho_channel_orientation": float(n_deg[ch]),
                     "rho_channel_is_detector": ch in det, "dtheta_rho_channel_deg": dth,
                     "class": functional_class(rho, dth, min_rho, max_dtheta_deg)}
        if enc_top_F is not None:
            top = int(np.asarray(enc_top_F)[f])
            rec.update(encoder_top_neuron=top,
                       dtheta_encoder_top_neuron_deg=float(circ_diff(n_deg[top], deg)))
        rec["nearest_detector"], rec["dtheta_nearest_detector_deg"] = _nearest(deg, det)
        rec["nearest_curve_tuned"], rec["dtheta_nearest_curve_tuned_deg"] = _nearest(deg, tun)
        gap = fills_gap(deg, list(det.values()), n_deg[tuned_ids], width[tuned_ids],
                        min_gap_deg, min_sep_deg)
        rec.update(gap)
        rec["fills_gap"] = bool(rec["class"] == "new" and gap["in_neuron_gap"]
                                and gap["clear_of_curve_tuned"])
        out.append(rec)
    return out


def functional_summary(records: Sequence[dict], f_deg: Mapping[int, float],
                       detector_deg: Sequence[float]) -> dict:
    """Counts per functional class, the gap fillers, and the largest orientation gap of the
    census neurons alone and with all census features, copies (and shifted copies) only, new
    features only, and gap fillers only."""
    by = {c: [r["feature"] for r in records if r["class"] == c] for c in FUNCTIONAL_CLASSES}
    fill = [r["feature"] for r in records if r["fills_gap"]]
    n_det = list(detector_deg)

    def gap(feats: Sequence[int]) -> float:
        return orientation_gaps(n_det + [float(f_deg[f]) for f in feats])[0][1]

    return {"n_copy": len(by["copy"]), "n_shifted_copy": len(by["shifted copy"]),
            "n_new": len(by["new"]), "n_fills_gap": len(fill), "fills_gap": fill,
            "largest_gap_neurons_deg": gap([]),
            "largest_gap_neurons_plus_all_deg": gap([r["feature"] for r in records]),
            "largest_gap_neurons_plus_copies_deg": gap(by["copy"] + by["shifted copy"]),
            "largest_gap_neurons_plus_new_deg": gap(by["new"]),
            "largest_gap_neurons_plus_gap_fillers_deg": gap(fill)}


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
                    rnd: Sequence[tuple] = (), tol: float = 15.0,
                    new_mask: np.ndarray | None = None) -> dict:
    """Copies and new detectors among census features at (f_thr, n_thr), the coverage that the
    new ones alone give, the new ones in gaps that no curve-tuned top neuron of their own
    already covers (`n_new_in_gaps_uncovered`), and the random-direction null's count of "new"
    detectors.

    `new_mask` [F] (e.g. functionally new, `functional_novelty`) replaces the weight rule; a
    random-direction entry of `rnd` is (evidence, alignment) or (evidence, alignment, new mask).
    The null's FDR of new detectors is None for 0/0."""
    neuron_deg = neuron_orientations(real_ev, n_thr)
    units = np.where(criterion(f_ev, f_thr)["detected"])[0].tolist()
    copy = (~np.asarray(new_mask, dtype=bool) if new_mask is not None
            else is_copy(dec_al, enc_al, max_share))
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
    for r in rnd:
        r_units = np.where(criterion(r[0], f_thr)["detected"])[0]
        r_new = (np.asarray(r[2], dtype=bool) if new_mask is not None and len(r) > 2
                 else ~is_copy(r[1], None, max_share))
        rnd_new.append(int(r_new[r_units].sum()))
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
            "new_fdr": (mean_rnd / len(new) if new else (None if not mean_rnd else math.inf))
            if mean_rnd is not None else None,
            "new_fdr_upper95": fdr_upper_bound(rnd_new, len(new))}


def band_summary(grid: list[dict], real_ev: dict, base: dict, min_gap_deg: float,
                 f_ev: dict | None = None, dec_al=None, enc_al=None, max_share: float = 0.6,
                 rnd=(), tol: float = 15.0, new_mask: np.ndarray | None = None) -> dict:
    """Largest neuron gap (and, given features, new detectors and gap filling) at every grid
    point of the FDR band, with min/median/max over the band."""
    rows = []
    for g in grid:
        if not g["in_band"]:
            continue
        thr = grid_thresholds(g, base)
        neuron_deg = list(neuron_orientations(real_ev, thr).values())
        row = {k: g.get(k) for k in ("label", "min_peak_sigma", "min_curve_line_ratio",
                                      "min_invariance_corr", "real", "fdr", "fdr_upper95")}
        row["largest_gap_neurons_deg"] = orientation_gaps(neuron_deg)[0][1]
        if f_ev is not None:
            nov = feature_novelty(f_ev, thr, real_ev, thr, dec_al, enc_al, max_share,
                                  min_gap_deg, rnd, tol, new_mask)
            row.update({k: nov[k] for k in ("n_detected", "n_copies", "n_new",
                                            "n_new_in_neuron_gaps", "n_new_in_gaps_uncovered",
                                            "largest_gap_neurons_plus_new_deg",
                                            "random_directions_new")})
        rows.append(row)

    def span(key: str) -> dict | None:
        v = [r[key] for r in rows if r.get(key) is not None]
        return {"min": float(np.min(v)), "median": float(np.median(v)),
                "max": float(np.max(v))} if v else None

    keys = ["real", "fdr", "fdr_upper95", "largest_gap_neurons_deg"] + (
        ["n_detected", "n_copies", "n_new", "n_new_in_neuron_gaps", "n_new_in_gaps_uncovered",
         "largest_gap_neurons_plus_new_deg"] if f_ev is not None else [])
    return {"n_points": len(rows), "points": rows, **{f"{k}_range": span(k) for k in keys}}
