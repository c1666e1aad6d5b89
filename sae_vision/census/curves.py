"""Curve detectors among neurons and SAE features: the pure part (Gorton 2024; Distill 2020).

This module holds the stimulus battery, the evidence, the criterion, calibration against nulls
and coverage: numpy functions of response matrices, no networks. Running the networks and the
SAE on the battery is `sae_vision.census.responses`, the null networks are `sae_vision.census.nulls`, and the
census of a layer that puts them together (with its memo and files) is `sae_vision.census`.

What it measures
----------------
A *unit* is a channel of a layer (a neuron) or an SAE feature. Its response to a stimulus is the
channel value (neuron) or the encoder output (feature; `CurvesConfig.feature_response`) at the
**centre position** of the layer, with every stimulus anchored on that position's receptive-field
centre (`model.geometry`). The stimuli come from `sae_vision.census.stimuli` (orientation convention
there: θ is the direction the arc bulges towards, 0-360°).

The battery (one batched, chunked forward pass per model):
- `base`: arcs over orientation (cfg.orientation_step) x radius (cfg.radii; radii >=
  cfg.line_radius are straight), plus straight lines through the anchor and a blank;
- invariance sweeps (cfg.invariance_step, cfg.invariance_radii): colour (cfg.colour_pairs,
  including white-on-black), position jitter of ±cfg.jitter_px along x and y, arc length
  (cfg.arc_conditions);
- discriminating stimuli after Distill: corners of the same orientation (cfg.corner_angles_deg)
  and straight lines shifted off-centre (cfg.line_shifts_px).
All responses are taken relative to the blank of the same background.

The census criterion (`evidence` computes every value, `criterion` applies the thresholds):
1. `peak_sigma` >= min_peak_sigma: the best arc drives the unit this many natural-image standard
   deviations above its natural-image mean;
2. `curve_line_ratio` >= min_curve_line_ratio: best arc / best straight line through the anchor;
3. `circular_variance` <= max_circular_variance and `secondary_peak_ratio` (best response more
   than 90° from the preferred orientation / peak) <= max_secondary_peak_ratio: unimodal, bounded
   orientation tuning at the preferred radius;
4. invariance: under every colour, jitter and arc-length condition the preferred orientation moves
   by at most orientation_tolerance degrees (`invariance_dtheta`), the orientation tuning curve
   keeps its shape (`invariance_corr` >= min_invariance_corr, Pearson correlation with the base
   curve) and the unit still responds (`invariance_retention` >= min_invariance_retention);
5. discrimination: best arc / best corner of similar orientation (`corner_ratio`) and best arc /
   best off-centre straight line (`shifted_line_ratio`) above their minima.

Why the thresholds are what they are (BVLC mixed3b; σ from 32 demo crops; 6 permuted-input and
3 re-initialised networks; counts real | permuted per seed | re-initialised per seed):
- criteria 1-3 only: 73 | 104, 110, 106, 137, 96, 109 | 43, 46, 30. mixed3a already holds
  curve-selective units, so random recombinations of them pass as often as the real layer;
- + preferred orientation invariant within 30°: 44 | 26-42 | 1-4;
- + corners, off-centre lines, retention >= 0.3: 32 | 11-20 | 1;
- + tuning-shape correlation >= 0.8: 27 | 7-13 | 0; >= 0.9: 19 | 2-5 | 0;
- >= 0.95: 15 | 1, 1, 0, 1, 1, 0 | 0, 0, 0. 0.95 was chosen on seeds 0-2; seeds 3-5 played no
  part and agree;
- + unimodality (the defaults): 14 | 1, 1, 0, 1, 1, 0 | 0, 0, 0, i.e. FDR 0.05.
What separates learned detectors from chance recombinations is the *shape* of the tuning curve
under colour, jitter and arc-length changes. The permuted-null detections sit in the 1x1 branch
(pointwise mixtures of mixed3a); the real ones mostly in the 3x3 and 5x5 branches, as Distill
found for InceptionV1's curve detectors.

Nulls (same code path, `responses.census_of_model`; in `sae_vision.census.nulls`; README "Nulls" says which are kept and why):
(a) `permuted_input_null`: the input channels of the convolutions that read the layer's input are
permuted (the input block, with its own curve units, is intact: this null asks whether the layer
is more than a recombination of them); (b) `reinit_null`: every convolution above the stem is
redrawn from a Gaussian with each filter's own mean and std; (d) `spatial_null`: every kernel
above the stem keeps its taps per (filter, input channel) in a random spatial order, so channel
statistics survive and the spatial assembly of edges into curves does not; (c) for SAE features,
`RandomDirections`: random unit directions in activation space scored as features.
`input_block_check` counts curve detectors in the layer's input block of the real network and of
each null (seed 0), which shows what each null destroys. The estimated false-discovery rate of a
null is mean(null count) / real count at the same thresholds (None for 0/0, printed "–"), and
`fdr_upper95` its one-sided 95% upper bound: the null counts of independent seeds are rare
events among hundreds of units, so their sum over n seeds is Poisson; the exact (Garwood) upper
bound on its mean, gammaincinv(sum + 1, 0.95), divided by n and by the real count, bounds the
FDR (`fdr_upper_bound`; null counts 1, 1, 0, 1, 1, 0 against 14 real detections: FDR 0.05, bound
0.11). `calibrate` tightens the thresholds on a grid until every null's FDR <= max_fdr, and
`threshold_grid` / `band_summary` report detections, FDR, the largest neuron gap and gap filling
over a band that moves EVERY criterion one relative step (`band_step`) looser and stricter
around the thresholds used, one at a time, all together, and in `band_n_random` random
combinations (`band_points`), so no conclusion rests on one threshold. The thresholds are
chosen on one half of each null's seeds and every reported FDR (table, bound, band) is counted
on the other (`seed_split`, `calibrate_held_out`), so the choice does not flatter the FDR.

σ units: every unit's natural-image mean/std comes from one sample, the census photos at every
position (`parts.ReferenceImages`): the real neurons and the SAE features from the real
network's activations on them, each null network from its own pass over them.

Copies and new detectors (`sae_vision.census.novelty`): a census feature whose decoder or encoder
direction has >= copy_min_share of its squared norm on one channel is a copy of that neuron;
only the others are new, and only new ones count as filling neuron gaps.

Cost (2-core CPU, BVLC mixed3b): stimuli are rendered on the smallest canvas that contains the
centre unit's whole receptive field (96 px instead of 224; exact, since nothing outside the RF can
reach the unit; `test_small_canvas_gives_exactly_the_full_size_response`), ~100-150 stimuli/s
unloaded. The default battery is 2,453 stimuli: ~15 s for the real network (with its
natural-image σ from 32 photos), ~13-26 s per null network, ~4 minutes for the real network
plus 3 permuted and 3 re-initialised nulls (measured 222-236 s), several times that on a
loaded machine. SAE features and random directions reuse the real network's activations (no
extra passes; ~2 s for 1,920 features and 3 x 1,920 random directions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae_vision.core import CurvesConfig

from . import stimuli as S

# long: the docstring above is the census's specification (about 100 lines); the code is about
# 510 lines of one concern, the pure evidence -> criterion -> calibration -> coverage chain.

# Evidence columns that the criterion thresholds, with the direction a detection needs.
CRITERIA = {
    "peak_sigma": ("min_peak_sigma", ">="),
    "curve_line_ratio": ("min_curve_line_ratio", ">="),
    "circular_variance": ("max_circular_variance", "<="),
    "secondary_peak_ratio": ("max_secondary_peak_ratio", "<="),
    "invariance_dtheta": ("orientation_tolerance", "<="),
    "invariance_corr": ("min_invariance_corr", ">="),
    "invariance_retention": ("min_invariance_retention", ">="),
    "corner_ratio": ("min_corner_ratio", ">="),
    "shifted_line_ratio": ("min_shifted_line_ratio", ">="),
}
RATIO_CAP = 1000.0  # ratios whose denominator is ~0 are reported as this


def curves_config(cfg: Any) -> CurvesConfig:
    """The CurvesConfig inside a full Config (or the CurvesConfig itself)."""
    return cfg.curves if hasattr(cfg, "curves") else cfg


@dataclass(frozen=True)
class Probe:
    """The centre position of `layer` on a stimulus canvas of side `size`."""

    layer: str
    size: int  # canvas side, px
    pos: int  # the probed position is (pos, pos) in the layer's output
    centre: float  # its receptive-field centre, pixel index (row = col)
    stride: int
    rf_size: int


# --------------------------------------------------------------------------------------------
# The stimulus battery


def _colour_name(fg: Sequence[float], bg: Sequence[float]) -> str:
    f = lambda c: "".join(f"{round(255 * v):02x}" for v in c)  # noqa: E731
    return f"colour:{f(fg)}on{f(bg)}"


def make_battery(cfg: CurvesConfig, probe: Probe) -> S.StimulusTable:
    """Every stimulus the census needs, with a `condition` label per row (see module docstring)."""
    size, centre = probe.size, (probe.centre, probe.centre)
    fg, bg, w = tuple(cfg.fg), tuple(cfg.bg), float(cfg.line_width)
    thetas = S.orientations(cfg.orientation_step)
    inv_thetas = S.orientations(cfg.invariance_step)
    inv_radii = [float(r) for r in cfg.invariance_radii]
    arc = dict(arc_length_deg=cfg.arc_length_deg, max_arc_px=cfg.max_arc_px, width=w)
    line_len = float(cfg.max_arc_px)
    tables = [
        S.curve_sweep(thetas, [float(r) for r in cfg.radii], size=size, centre=centre, fg=fg,
                      bg=bg, condition="base", **arc),
        S.make_table("line", thetas, size=size, centre=centre, length_px=line_len, width=w,
                     fg=fg, bg=bg, condition="line"),
        S.blank_table(size=size, centre=centre, bg=bg, condition="blank"),
    ]
    for pair in cfg.colour_pairs:
        cfg_fg, cfg_bg = tuple(pair[:3]), tuple(pair[3:6])
        name = _colour_name(cfg_fg, cfg_bg)
        tables.append(S.curve_sweep(inv_thetas, inv_radii, size=size, centre=centre, fg=cfg_fg,
                                    bg=cfg_bg, condition=name, **arc))
    j = float(cfg.jitter_px)
    for dx, dy in ((j, 0.0), (-j, 0.0), (0.0, j), (0.0, -j)):
        tables.append(S.curve_sweep(inv_thetas, inv_radii, size=size, centre=centre, fg=fg, bg=bg,
                                    jitter=(dx, dy), condition=f"jitter:{dx:+g},{dy:+g}", **arc))
    for deg, cap in cfg.arc_conditions:
        tables.append(S.curve_sweep(inv_thetas, inv_radii, size=size, centre=centre, fg=fg, bg=bg,
                                    arc_length_deg=float(deg), max_arc_px=float(cap), width=w,
                                    condition=f"arc:{deg:g}deg,{cap:g}px"))
    corner_len = float(cfg.max_arc_px)
    tables.append(S.corner_sweep(inv_thetas, cfg.corner_angles_deg, size=size, centre=centre,
                                 length_px=corner_len, width=w, fg=fg, bg=bg))
    tables.append(S.shifted_line_sweep(inv_thetas, cfg.line_shifts_px, size=size, centre=centre,
                                       length_px=line_len, width=w, fg=fg, bg=bg))
    table = S.concat_tables(tables)
    # One blank per extra background, for the blank-relative responses of colour conditions.
    extra_bgs = {tuple(p[3:6]) for p in cfg.colour_pairs} - {bg}
    blanks = [S.blank_table(size=size, centre=centre, bg=b, condition="blank") for b in
              sorted(extra_bgs)]
    return S.concat_tables([table, *blanks])


def invariance_groups(cfg: CurvesConfig) -> dict[str, list[str]]:
    """Condition labels of each invariance family: colour, jitter, arc length."""
    j = float(cfg.jitter_px)
    return {
        "colour": [_colour_name(p[:3], p[3:6]) for p in cfg.colour_pairs],
        "jitter": [f"jitter:{dx:+g},{dy:+g}" for dx, dy in ((j, 0.0), (-j, 0.0), (0.0, j),
                                                             (0.0, -j))],
        "arc": [f"arc:{deg:g}deg,{cap:g}px" for deg, cap in cfg.arc_conditions],
    }


# --------------------------------------------------------------------------------------------
# Evidence: pure functions of a response matrix


def _rows(table: S.StimulusTable, condition: str, radius: float | None, thetas) -> np.ndarray:
    """Row indices [len(thetas)] of one (condition, radius) sweep, ordered like `thetas`."""
    m = table.condition == condition
    if radius is not None:
        m &= table.radius == radius
    idx = np.where(m)[0]
    order = {round(float(t) * 1000): i for i, t in zip(idx, table.orientation[idx])}
    try:
        return np.array([order[round(float(t) * 1000)] for t in thetas])
    except KeyError as e:
        raise ValueError(f"battery has no {condition!r} row at radius {radius}, θ={e}") from e


def _blank_of(table: S.StimulusTable, resp_NU: np.ndarray, bg) -> np.ndarray:
    m = (table.kind == "blank") & np.all(np.isclose(table.bg, np.asarray(bg, float)), axis=1)
    if not m.any():
        return np.zeros(resp_NU.shape[1], dtype=resp_NU.dtype)
    return resp_NU[np.where(m)[0][0]]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den for blank-relative responses: capped, 0 when num <= 0."""
    safe = np.maximum(den, np.abs(num) / RATIO_CAP + 1e-12)
    return np.where(num > 0, np.minimum(num / safe, RATIO_CAP), 0.0)


def circ_diff(a, b) -> np.ndarray:
    """Angular distance in degrees (0-180) between orientations on the 0-360° circle."""
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def _corr_rows(a_UT: np.ndarray, b_UT: np.ndarray) -> np.ndarray:
    a = a_UT - a_UT.mean(1, keepdims=True)
    b = b_UT - b_UT.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 0.0)


def tuning_curves(resp_NU, table: S.StimulusTable, cfg: CurvesConfig, mean_U=None, std_U=None,
                  condition: str = "base") -> dict[str, np.ndarray]:
    """Responses of a sweep as `raw` [U, n_radii, n_orientations] (+ `sigma` given mean/std)."""
    r = np.asarray(resp_NU, dtype=np.float64)
    radii = [float(x) for x in (cfg.radii if condition == "base" else cfg.invariance_radii)]
    thetas = S.orientations(cfg.orientation_step if condition == "base" else cfg.invariance_step)
    grid = np.stack([r[_rows(table, condition, rad, thetas)] for rad in radii])  # R, T, U
    out = {"raw": grid.transpose(2, 0, 1), "orientations": thetas, "radii": np.array(radii)}
    if mean_U is not None and std_U is not None:
        m = np.asarray(mean_U, dtype=np.float64).reshape(-1, 1, 1)
        sd = np.maximum(np.asarray(std_U, dtype=np.float64).reshape(-1, 1, 1), 1e-12)
        out["sigma"] = (out["raw"] - m) / sd
    return out


def evidence(resp_NU, table: S.StimulusTable, cfg: CurvesConfig, mean_U, std_U) -> dict:
    """Every criterion value per unit (arrays [U]); see the module docstring for definitions."""
    r = np.asarray(resp_NU, dtype=np.float64)
    U = r.shape[1]
    mean_U = np.asarray(mean_U, dtype=np.float64).reshape(U)
    std_U = np.maximum(np.asarray(std_U, dtype=np.float64).reshape(U), 1e-12)
    blank = _blank_of(table, r, cfg.bg)

    thetas = S.orientations(cfg.orientation_step)
    T = len(thetas)
    curve_radii = [float(x) for x in cfg.radii if float(x) < cfg.line_radius]
    line_radii = [float(x) for x in cfg.radii if float(x) >= cfg.line_radius]
    if not curve_radii:
        raise ValueError(f"curves.radii={list(cfg.radii)} has no radius below line_radius "
                         f"{cfg.line_radius}")
    G = np.stack([r[_rows(table, "base", rad, thetas)] for rad in curve_radii]) - blank  # R,T,U
    flat = G.reshape(-1, U)
    k = flat.argmax(0)
    ri, ti = np.divmod(k, T)
    peak = flat[k, np.arange(U)]
    pref = thetas[ti]
    ev: dict[str, np.ndarray] = {
        "preferred_orientation": pref,
        "preferred_radius": np.array(curve_radii)[ri],
        "peak_raw": peak + blank,
        "blank_raw": blank,
        "peak_sigma": (peak + blank - mean_U) / std_U,
    }
    lines = [r[table.condition == "line"] - blank]
    lines += [r[_rows(table, "base", rad, thetas)] - blank for rad in line_radii]
    line_max = np.concatenate(lines).max(0)
    ev["line_sigma"] = (line_max + blank - mean_U) / std_U
    ev["curve_line_ratio"] = _ratio(peak, line_max)

    ev.update(_tuning_shape(G[ri, :, np.arange(U)], ti, pref, peak, thetas, cfg))
    ev.update(_invariance(r, table, cfg, thetas, blank, pref, peak))
    ev.update(_discrimination(r, table, cfg, blank, pref, peak))
    return ev


def _tuning_shape(g_UT, ti, pref, peak, thetas, cfg: CurvesConfig) -> dict[str, np.ndarray]:
    """Orientation tuning at the preferred radius, rectified relative to the blank (g_UT: the
    blank-subtracted responses [U, T]): circular variance, opposite and secondary peaks, width."""
    f_UT = np.clip(g_UT, 0.0, None)
    U, T = f_UT.shape
    ev: dict[str, np.ndarray] = {}
    ang = np.deg2rad(thetas)
    tot = f_UT.sum(1)
    vec = (f_UT * np.exp(1j * ang)).sum(1) / np.maximum(tot, 1e-30)
    ev["circular_variance"] = np.where(tot > 0, 1.0 - np.abs(vec), 1.0)
    ev["opposite_ratio"] = f_UT[np.arange(U), (ti + T // 2) % T] / np.maximum(peak, 1e-30)
    far = circ_diff(thetas[None, :], pref[:, None]) > 90.0  # outside the main lobe's half-circle
    ev["secondary_peak_ratio"] = np.where(far, f_UT, 0.0).max(1) / np.maximum(peak, 1e-30)
    half = f_UT >= 0.5 * np.maximum(peak, 1e-30)[:, None]
    steps = np.arange(1, T // 2 + 1)
    right = np.cumprod(half[np.arange(U)[:, None], (ti[:, None] + steps) % T], axis=1).sum(1)
    left = np.cumprod(half[np.arange(U)[:, None], (ti[:, None] - steps) % T], axis=1).sum(1)
    ev["tuning_width_deg"] = (left + right + 1) * cfg.orientation_step / 2  # half width at half max
    return ev


def _invariance(r, table: S.StimulusTable, cfg: CurvesConfig, thetas, blank, pref, peak
                ) -> dict[str, np.ndarray]:
    """Preferred orientation, tuning shape and response under each invariance condition, per
    group and worst over groups."""
    T = len(thetas)
    U = r.shape[1]
    ev: dict[str, np.ndarray] = {}
    inv_thetas = S.orientations(cfg.invariance_step)
    inv_radii = [float(x) for x in cfg.invariance_radii]
    base_rows = np.searchsorted(thetas, inv_thetas)
    if not np.allclose(thetas[np.clip(base_rows, 0, T - 1)], inv_thetas):
        raise ValueError("curves.invariance_step must be a multiple of curves.orientation_step")
    env_base = np.stack([r[_rows(table, "base", rad, thetas)] for rad in inv_radii])[:, base_rows]
    env_base = (env_base - blank).max(0).T  # U, Ti
    worst = {"dtheta": np.zeros(U), "corr": np.ones(U), "retention": np.full(U, np.inf)}
    for group, conds in invariance_groups(cfg).items():
        g_worst = {"dtheta": np.zeros(U), "corr": np.ones(U), "retention": np.full(U, np.inf)}
        for c in conds:
            sel = table.condition == c
            if not sel.any():
                continue
            b = _blank_of(table, r, table.bg[np.where(sel)[0][0]])
            Gc = np.stack([r[_rows(table, c, rad, inv_thetas)] for rad in inv_radii]) - b
            kc = Gc.reshape(-1, U).argmax(0)
            pk = Gc.reshape(-1, U)[kc, np.arange(U)]
            vals = {
                "dtheta": circ_diff(inv_thetas[kc % len(inv_thetas)], pref),
                "corr": _corr_rows(env_base, Gc.max(0).T),
                "retention": pk / np.maximum(peak, 1e-30),
            }
            g_worst["dtheta"] = np.maximum(g_worst["dtheta"], vals["dtheta"])
            g_worst["corr"] = np.minimum(g_worst["corr"], vals["corr"])
            g_worst["retention"] = np.minimum(g_worst["retention"], vals["retention"])
        for key, v in g_worst.items():
            v = np.where(np.isinf(v), 1.0, v)
            ev[f"{group}_{key}"] = v
            worst[key] = np.maximum(worst[key], v) if key == "dtheta" else np.minimum(worst[key], v)
    ev["invariance_dtheta"] = worst["dtheta"]
    ev["invariance_corr"] = worst["corr"]
    ev["invariance_retention"] = np.where(np.isinf(worst["retention"]), 1.0, worst["retention"])
    return ev


def _discrimination(r, table: S.StimulusTable, cfg: CurvesConfig, blank, pref, peak
                    ) -> dict[str, np.ndarray]:
    """Discriminating stimuli: corners of similar orientation, off-centre straight lines."""
    U = r.shape[1]
    ev: dict[str, np.ndarray] = {}
    cm = table.condition == "corner"
    if cm.any():
        near = circ_diff(table.orientation[cm][:, None], pref[None]) <= cfg.orientation_tolerance
        corner = np.where(near, r[cm] - blank, -np.inf).max(0)
        ev["corner_ratio"] = _ratio(peak, corner)
    else:
        ev["corner_ratio"] = np.full(U, RATIO_CAP)
    sm = table.condition == "shifted_line"
    ev["shifted_line_ratio"] = _ratio(peak, (r[sm] - blank).max(0)) if sm.any() else np.full(
        U, RATIO_CAP)
    return ev


def thresholds_of(cfg: CurvesConfig, **override) -> dict[str, float]:
    """The criterion thresholds from the config (plus overrides)."""
    thr = {name: float(getattr(cfg, name)) for name, _ in CRITERIA.values()}
    thr.update({k: float(v) for k, v in override.items()})
    return thr


def criterion(ev: dict, thr: dict) -> dict[str, np.ndarray]:
    """Per-criterion pass masks [U] and their conjunction under `detected`."""
    out = {}
    for col, (name, op) in CRITERIA.items():
        v = np.nan_to_num(ev[col], nan=-np.inf if op == ">=" else np.inf)
        out[col] = v >= thr[name] if op == ">=" else v <= thr[name]
    out["detected"] = np.logical_and.reduce([out[c] for c in CRITERIA])
    return out


# --------------------------------------------------------------------------------------------
# Calibration and coverage


def count_detected(ev: dict, thr: dict) -> int:
    """Number of units passing every criterion."""
    return int(criterion(ev, thr)["detected"].sum())


def fdr_upper_bound(counts: Sequence[int], real: int, conf: float = 0.95) -> float | None:
    """One-sided `conf` upper bound of mean(counts) / real: the exact Poisson (Garwood) bound on
    the sum of the null counts over seeds, per seed and per real detection (module docstring).
    None without seeds or real detections."""
    from scipy.special import gammaincinv

    if not len(counts) or real <= 0:
        return None
    return float(gammaincinv(int(sum(counts)) + 1, conf)) / len(counts) / real


def fdr_table(real_ev: dict, null_evs: dict[str, list[dict]], thr: dict) -> dict:
    """Real count, each null's per-seed counts and mean, FDR = mean null / real (None for 0/0)
    and its 95% upper bound (`fdr_upper_bound`); `fdr` and `fdr_upper95` are the worst null's."""
    real = count_detected(real_ev, thr)
    out = {"real": real, "nulls": {}}
    for name, evs in null_evs.items():
        counts = [count_detected(e, thr) for e in evs]
        mean = float(np.mean(counts)) if counts else 0.0
        fdr = mean / real if real else (None if mean == 0 else math.inf)
        out["nulls"][name] = {"counts": counts, "mean": mean, "fdr": fdr,
                              "fdr_upper95": fdr_upper_bound(counts, real),
                              "real_exceeds_every_seed": all(real > c for c in counts)}
    fdrs = [v["fdr"] for v in out["nulls"].values() if v["fdr"] is not None]
    out["fdr"] = max(fdrs) if fdrs else None
    ups = [v["fdr_upper95"] for v in out["nulls"].values() if v["fdr_upper95"] is not None]
    out["fdr_upper95"] = max(ups) if ups else None
    out["real_exceeds_every_null"] = all(v["real_exceeds_every_seed"]
                                         for v in out["nulls"].values())
    return out


def fdr_ok(t: dict, cfg: CurvesConfig) -> bool:
    """Does an `fdr_table` meet the target: detections, FDR <= max_fdr, and more real
    detections than every null seed?"""
    return (t["real"] > 0 and t["fdr"] is not None and t["fdr"] <= cfg.max_fdr
            and t["real_exceeds_every_null"])


def calibrate(real_ev: dict, null_evs: dict[str, list[dict]], cfg: CurvesConfig,
              base: dict | None = None) -> dict:
    """Thresholds with FDR <= max_fdr and real > every null seed, tightening only as needed.

    Starts from the configured thresholds; if they fail, searches the grid of
    (calib_peak_sigma x calib_curve_line_ratio x calib_invariance_corr), never loosening a
    configured threshold, and keeps the passing setting with the most real detections (ties:
    the loosest). `base` replaces the configured thresholds as the starting point. Returns the
    thresholds used and the FDR table at them.
    """
    base = dict(base) if base is not None else thresholds_of(cfg)
    table = fdr_table(real_ev, null_evs, base)
    if not null_evs or fdr_ok(table, cfg) or not cfg.calibrate:
        return {"thresholds": base, "tightened": False,
                "met": bool(null_evs) and fdr_ok(table, cfg), "table": table}
    best = None
    for ps in sorted({max(p, base["min_peak_sigma"]) for p in cfg.calib_peak_sigma}):
        for lr in sorted({max(x, base["min_curve_line_ratio"]) for x in cfg.calib_curve_line_ratio}):
            for ic in sorted({max(x, base["min_invariance_corr"])
                              for x in cfg.calib_invariance_corr}):
                thr = {**base, "min_peak_sigma": ps, "min_curve_line_ratio": lr,
                       "min_invariance_corr": ic}
                t = fdr_table(real_ev, null_evs, thr)
                if fdr_ok(t, cfg) and (best is None or t["real"] > best[1]["real"]):
                    best = (thr, t)
    if best is None:  # nothing on the grid meets the target: report the strictest point
        thr = {**base, "min_peak_sigma": max(max(cfg.calib_peak_sigma), base["min_peak_sigma"]),
               "min_curve_line_ratio": max(max(cfg.calib_curve_line_ratio),
                                           base["min_curve_line_ratio"]),
               "min_invariance_corr": max(max(cfg.calib_invariance_corr),
                                          base["min_invariance_corr"])}
        return {"thresholds": thr, "tightened": True, "met": False,
                "table": fdr_table(real_ev, null_evs, thr)}
    return {"thresholds": best[0], "tightened": True, "met": True, "table": best[1]}


def seed_split(n_seeds: int) -> dict:
    """Which null seeds choose the thresholds and which report the FDR (`calibrate_held_out`):
    the first half of each null's seeds, 0 .. n//2 - 1, calibrates; the second half reports.
    With fewer than 2 seeds there is nothing to hold out: both are every seed (optimistic)."""
    seeds = list(range(int(n_seeds)))
    if len(seeds) < 2:
        return {"calibration": seeds, "report": seeds, "held_out": False,
                "rule": f"{len(seeds)} seed(s) per null: thresholds calibrated and FDR reported "
                        "on the same seeds (no held-out FDR; it is optimistic)"}
    half = len(seeds) // 2
    return {"calibration": seeds[:half], "report": seeds[half:], "held_out": True,
            "rule": "the first half of each null's seeds calibrates the thresholds; every "
                    "reported FDR, its bound and the threshold band use the second half"}


def select_seeds(null_evs: dict[str, list], seeds: Sequence[int]) -> dict[str, list]:
    """Each null's entries at these seed indices."""
    return {k: [v[s] for s in seeds] for k, v in null_evs.items()}


def calibrate_held_out(real_ev: dict, null_evs: dict[str, list[dict]], cfg: CurvesConfig,
                       base: dict | None = None) -> dict:
    """`calibrate` on the calibration seeds of every null (`seed_split`), the FDR reported on
    the held-out report seeds, so choosing the thresholds does not flatter the FDR.

    Returns `calibrate`'s thresholds and `tightened`; `table` (the reported FDR) and `met` on
    the report seeds; `calibration_table` and `calibration_met` on the calibration seeds;
    `seeds` the split (`seed_split`). Callers compute every other reported FDR (threshold
    band, configured thresholds) on `select_seeds(null_evs, seeds["report"])`."""
    split = seed_split(min((len(v) for v in null_evs.values()), default=0))
    cal = calibrate(real_ev, select_seeds(null_evs, split["calibration"]), cfg, base)
    table = fdr_table(real_ev, select_seeds(null_evs, split["report"]), cal["thresholds"])
    return {"thresholds": cal["thresholds"], "tightened": cal["tightened"],
            "met": bool(null_evs) and fdr_ok(table, cfg), "table": table,
            "calibration_met": cal["met"], "calibration_table": cal["table"], "seeds": split}


def band_points(n_criteria: int, n_random: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Steps per criterion (-1 looser, 0 as used, +1 stricter): the used point, each criterion
    alone either way, all looser, all stricter, and `n_random` random combinations (fixed
    seed), without repeats."""
    pts = [(0,) * n_criteria]
    for i in range(n_criteria):
        for d in (-1, 1):
            pts.append(tuple(d if j == i else 0 for j in range(n_criteria)))
    pts += [(-1,) * n_criteria, (1,) * n_criteria]
    rng = np.random.default_rng(seed)
    pts += [tuple(int(x) for x in rng.integers(-1, 2, n_criteria)) for _ in range(n_random)]
    return list(dict.fromkeys(pts))


# Thresholds with an upper bound move by a relative step of their distance to it.
_THRESHOLD_BOUND = {"min_invariance_corr": 1.0}


def stepped_thresholds(base: dict, steps: Sequence[int], rel_step: float) -> dict:
    """`base` with each criterion (CRITERIA order) moved `steps` relative steps stricter (+) or
    looser (-)."""
    thr = dict(base)
    for (name, op), k in zip(CRITERIA.values(), steps):
        v = float(base[name])
        if name in _THRESHOLD_BOUND:
            bound = _THRESHOLD_BOUND[name]
            thr[name] = bound - (bound - v) * (1.0 - rel_step) ** k
        else:
            thr[name] = v * (1.0 + rel_step) ** (k if op == ">=" else -k)
    return thr


def threshold_grid(real_ev: dict, null_evs: dict[str, list[dict]], cfg: CurvesConfig,
                   base: dict) -> list[dict]:
    """Real detections, per-null counts, FDR and its upper bound at every point of the
    threshold band around `base` (the thresholds used): every criterion one `band_step` looser
    and stricter (`band_points`). `in_band`: FDR <= max_fdr, at least one detection, and more
    real detections than every null seed."""
    rows = []
    names = [name for name, _ in CRITERIA.values()]
    for steps in band_points(len(names), int(cfg.band_n_random)):
        thr = stepped_thresholds(base, steps, float(cfg.band_step))
        t = fdr_table(real_ev, null_evs, thr)
        rows.append({"steps": dict(zip(names, steps)),
                     "label": "".join("-0+"[k + 1] for k in steps), "thresholds": thr,
                     **{k: thr[k] for k in ("min_peak_sigma", "min_curve_line_ratio",
                                            "min_invariance_corr")},
                     "real": t["real"],
                     "null_means": {k: v["mean"] for k, v in t["nulls"].items()},
                     "fdr": t["fdr"], "fdr_upper95": t["fdr_upper95"],
                     "in_band": fdr_ok(t, cfg)})
    return rows


def grid_thresholds(row: dict, base: dict) -> dict:
    """The full threshold dict of one `threshold_grid` row."""
    if "thresholds" in row:
        return dict(row["thresholds"])
    return {**base, **{k: row[k] for k in ("min_peak_sigma", "min_curve_line_ratio",
                                            "min_invariance_corr")}}


def detections(ev: dict, thr: dict, names: Sequence | None = None,
               null_passes: dict[str, list[np.ndarray]] | None = None,
               tuning_sigma: np.ndarray | None = None,
               tuning_radii: Sequence[float] = ()) -> list[dict]:
    """One JSON-able record per detected unit: its evidence, per null whether the same unit
    passes there, and given [U, R, T] σ curves (radius x orientation, `tuning_radii` order) its
    `tuning_sigma` at the preferred radius and its whole `tuning_surface_sigma`."""
    crit = criterion(ev, thr)
    out = []
    for u in np.where(crit["detected"])[0].tolist():
        rec = {"unit": int(u) if names is None else names[u]}
        rec.update({k: _num(v[u]) for k, v in ev.items()})
        if null_passes:
            rec["passes_in_null"] = {k: [bool(m[u]) for m in v] for k, v in null_passes.items()}
        if tuning_sigma is not None:
            ri = list(tuning_radii).index(float(ev["preferred_radius"][u]))
            rec["tuning_sigma"] = np.round(tuning_sigma[u, ri], 3).tolist()
            rec["tuning_surface_sigma"] = np.round(tuning_sigma[u], 3).tolist()
        out.append(rec)
    return out


def _num(v):
    f = float(v)
    return f if math.isfinite(f) else None


def orientation_gaps(angles_deg: Sequence[float]) -> list[tuple[float, float]]:
    """Empty arcs (start, width) between sorted orientations on the circle, widest first."""
    a = np.sort(np.mod(np.asarray(angles_deg, dtype=np.float64), 360.0))
    if len(a) == 0:
        return [(0.0, 360.0)]
    nxt = np.concatenate([a[1:], a[:1] + 360.0])
    gaps = [(float(s), float(e - s)) for s, e in zip(a, nxt)]
    return sorted(gaps, key=lambda g: -g[1])


def _in_arc(x: float, start: float, width: float) -> bool:
    d = (x - start) % 360.0
    return 0.0 < d < width


def coverage(neuron_deg: Sequence[float], feature_deg: Sequence[float],
             min_gap_deg: float = 30.0) -> dict:
    """Largest orientation gap of neurons alone and with features; features inside neuron gaps.

    A neuron gap is an empty arc of at least `min_gap_deg` between neighbouring neuron
    detectors' preferred orientations (the whole circle when there are none).
    """
    n_gaps = orientation_gaps(neuron_deg)
    both = list(neuron_deg) + list(feature_deg)
    wide = [g for g in n_gaps if g[1] >= min_gap_deg]
    in_gap = [f for f in feature_deg if any(_in_arc(f, s, w) for s, w in wide)] if len(
        neuron_deg) else list(feature_deg)
    return {
        "n_neuron_detectors": len(neuron_deg),
        "n_feature_detectors": len(feature_deg),
        "largest_gap_neurons_deg": n_gaps[0][1],
        "largest_gap_neurons_at_deg": n_gaps[0][0],
        "largest_gap_combined_deg": orientation_gaps(both)[0][1],
        "neuron_gaps": [{"start_deg": s, "width_deg": w} for s, w in wide],
        "n_features_in_neuron_gaps": len(in_gap),
        "features_in_neuron_gaps_deg": [float(f) for f in in_gap],
    }


def orientation_curves(ev: dict, tc: dict, mean_U, std_U, units: Sequence[int]) -> np.ndarray:
    """σ-unit tuning at each unit's preferred radius [len(units), T]."""
    radii = list(tc["radii"])
    out = []
    for u in units:
        ri = radii.index(float(ev["preferred_radius"][u]))
        out.append((tc["raw"][u, ri] - float(mean_U[u])) / max(float(std_U[u]), 1e-12))
    return np.array(out).reshape(len(units), -1)
