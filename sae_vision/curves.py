"""Curve detectors among neurons and SAE features, with null controls (Gorton 2024; Distill 2020).

What it measures
----------------
A *unit* is a channel of a layer (a neuron) or an SAE feature. Its response to a stimulus is the
channel value (neuron) or the encoder output (feature; `CurvesConfig.feature_response`) at the
**centre position** of the layer, with every stimulus anchored on that position's receptive-field
centre (`model.geometry`). The stimuli come from `sae_vision.stimuli` (orientation convention
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

Nulls (same code path, `census_of_model`; README "Nulls" says which are kept and why):
(a) `permuted_input_null`: the input channels of the convolutions that read the layer's input are
permuted (the input block, with its own curve units, is intact: this null asks whether the layer
is more than a recombination of them); (b) `reinit_null`: every convolution above the stem is
redrawn from a Gaussian with each filter's own mean and std; (d) `spatial_null`: every kernel
above the stem keeps its taps per (filter, input channel) in a random spatial order, so channel
statistics survive and the spatial assembly of edges into curves does not; (c) for SAE features,
`RandomDirections`: random unit directions in activation space scored as features.
`input_block_check` counts curve detectors in the layer's input block of the real network and of
each null (seed 0), which shows what each null destroys. The estimated false-discovery rate of a
null is mean(null count) / real count at the same thresholds; `calibrate` tightens the
thresholds on a grid until every null's FDR <= max_fdr, and `threshold_grid` / `band_summary`
report detections, FDR, the largest neuron gap and gap filling at every grid point, so no
conclusion rests on one threshold.

Copies and new detectors (`sae_vision.novelty`): a census feature whose decoder or encoder
direction has >= copy_min_share of its squared norm on one channel is a copy of that neuron;
only the others are new, and only new ones count as filling neuron gaps.

Cost (2-core CPU, BVLC mixed3b): stimuli are rendered on the smallest canvas that contains the
centre unit's whole receptive field (96 px instead of 224; exact, since nothing outside the RF can
reach the unit; `test_small_canvas_gives_exactly_the_full_size_response`), ~100-150 stimuli/s
unloaded. The default battery is 2,453 stimuli: ~15 s for the real network (with its
natural-image σ from 32 demo crops), ~13-26 s per null network, ~4 minutes for the real network
plus 3 permuted and 3 re-initialised nulls (measured 222-236 s), several times that on a
loaded machine. SAE features and random directions reuse the real network's activations (no
extra passes; ~2 s for 1,920 features and 3 x 1,920 random directions).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from sae_vision import novelty as N
from sae_vision import stimuli as S
from sae_vision.config import CurvesConfig

logger = logging.getLogger(__name__)

# Progress hook: on_batch(n_stimuli_in_this_batch, n_stimuli_in_the_battery) per forward pass.
BatchFn = Callable[[int, int], None]

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


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Where the stimulus goes


@dataclass(frozen=True)
class Probe:
    """The centre position of `layer` on a stimulus canvas of side `size`."""

    layer: str
    size: int  # canvas side, px
    pos: int  # the probed position is (pos, pos) in the layer's output
    centre: float  # its receptive-field centre, pixel index (row = col)
    stride: int
    rf_size: int


def make_probe(model, layer: str, canvas_size: int = 0) -> Probe:
    """Pick the canvas and centre position; 0 = smallest canvas holding the centre unit's RF.

    The canvas side is a multiple of the layer stride so TF-SAME padding matches the full-size
    input, and the whole receptive field lies inside it, so the centre unit computes exactly what
    it computes on a full-size image with the same background.
    """
    g = model.geometry(layer)
    full = int(getattr(model, "input_size", 224))
    half = (g.rf_size - 1) / 2

    def fits(size: int) -> Probe | None:
        n = math.ceil(size / g.stride)
        pos = int(round(((size - 1) / 2 - g.offset) / g.stride))
        pos = min(max(pos, 0), n - 1)
        c = g.offset + g.stride * pos
        if c - half >= 0 and c + half <= size - 1:
            return Probe(layer, size, pos, float(c), g.stride, g.rf_size)
        return None

    if canvas_size and canvas_size > 0:
        p = fits(int(canvas_size))
        if p is None:  # an explicit canvas too small for the RF still works, just not exactly
            n = math.ceil(canvas_size / g.stride)
            pos = n // 2
            p = Probe(layer, int(canvas_size), pos, float(g.offset + g.stride * pos), g.stride,
                      g.rf_size)
        return p
    if getattr(model, "family", "") != "timm":
        for size in range(g.stride, full + 1, g.stride):
            p = fits(size)
            if p is not None:
                return p
    pos = g.size // 2
    return Probe(layer, full, pos, float(g.offset + g.stride * pos), g.stride, g.rf_size)


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
# Running a network on the battery


@torch.no_grad()
def centre_activations(model, layer: str, table: S.StimulusTable, probe: Probe,
                       batch_size: int = 128, on_batch: BatchFn | None = None) -> torch.Tensor:
    """Activation vectors [N, D] at the probed position, one chunked forward pass."""
    dev = _device(model)
    out = []
    for _, imgs in S.iter_chunks(table, batch_size):
        acts = model.activations(imgs.to(dev), [layer])[layer]
        out.append(acts[:, :, probe.pos, probe.pos].float().cpu())
        if on_batch is not None:
            on_batch(len(imgs), len(table))
    return torch.cat(out)


def make_reference_images(n: int = 32, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Random crops of the embedded demo photographs [n, 3, size, size] (the σ reference)."""
    from sae_vision.config import DataConfig
    from sae_vision.data import DemoImages

    ds = DemoImages(DataConfig(name="demo", n_images=n, image_size=size, seed=seed,
                               min_scale=0.08, max_scale=1.0))
    return torch.stack([ds[i].image for i in range(n)])


@torch.no_grad()
def layer_vectors(model, layer: str, images: torch.Tensor, batch_size: int = 16,
                  border: int = 0) -> torch.Tensor:
    """Activation vectors [B*H*W, D] of `layer` at every position (minus `border`) of `images`."""
    dev = _device(model)
    out = []
    for i in range(0, len(images), batch_size):
        a = model.activations(images[i:i + batch_size].to(dev), [layer])[layer].float()
        if border:
            a = a[:, :, border:-border, border:-border]
        out.append(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).cpu())
    return torch.cat(out)


def unit_stats(acts_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit mean and std [D] over activation vectors."""
    acts_ND = acts_ND.double()
    return acts_ND.mean(0).float(), acts_ND.std(0).float()


@torch.no_grad()
def feature_responses(sae, acts_ND: torch.Tensor, batch_size: int = 4096,
                      which: Sequence[str] = ("pre_acts", "encode")) -> dict[str, torch.Tensor]:
    """`pre_acts` and/or `encode` of an SAE (or anything with those methods) on vectors [N, D]."""
    dev = _device(sae) if isinstance(sae, nn.Module) else torch.device("cpu")
    out: dict[str, list] = {k: [] for k in which}
    for i in range(0, len(acts_ND), batch_size):
        x = acts_ND[i:i + batch_size].to(dev)
        for k in which:
            out[k].append(getattr(sae, k)(x).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def feature_stats(sae, acts_ND: torch.Tensor, batch_size: int = 2048,
                  which: Sequence[str] = ("pre_acts", "encode")) -> dict[str, tuple]:
    """Per-feature (mean, std) of each response over vectors, accumulated batch by batch."""
    sums: dict[str, list] = {}
    n = 0
    for i in range(0, len(acts_ND), batch_size):
        resp = feature_responses(sae, acts_ND[i:i + batch_size], batch_size, which)
        n += len(acts_ND[i:i + batch_size])
        for k, v in resp.items():
            v = v.double()
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] = acc[0] + v.sum(0)
            acc[1] = acc[1] + (v * v).sum(0)
    out = {}
    for k, (s1, s2) in sums.items():
        mean = s1 / n
        var = (s2 - n * mean * mean).clamp_min(0.0) / max(n - 1, 1)
        out[k] = (mean.float(), var.sqrt().float())
    return out


class RandomDirections(nn.Module):
    """Null (c): random unit directions in activation space, scored like SAE features.

    pre_acts(x) = (x - centre) · u for unit vectors u; encode = relu(pre_acts). Centring on the
    dataset mean keeps the responses from being dominated by the mean activation.
    """

    def __init__(self, d_in: int, n: int, seed: int = 0, centre: torch.Tensor | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        dirs = torch.randn(n, d_in, generator=g)
        self.register_buffer("W_dec", dirs / dirs.norm(dim=1, keepdim=True))
        self.register_buffer("centre", torch.zeros(d_in) if centre is None else centre.float())

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Projection of the centred vectors on every direction [B, n]."""
        return (x_BD.float() - self.centre) @ self.W_dec.T

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """ReLU of the projections."""
        return torch.relu(self.pre_acts(x_BD))


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


def _circ_diff(a, b) -> np.ndarray:
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

    # Orientation tuning at the preferred radius, rectified relative to the blank.
    f_UT = np.clip(G[ri, :, np.arange(U)], 0.0, None)
    ang = np.deg2rad(thetas)
    tot = f_UT.sum(1)
    vec = (f_UT * np.exp(1j * ang)).sum(1) / np.maximum(tot, 1e-30)
    ev["circular_variance"] = np.where(tot > 0, 1.0 - np.abs(vec), 1.0)
    ev["opposite_ratio"] = f_UT[np.arange(U), (ti + T // 2) % T] / np.maximum(peak, 1e-30)
    far = _circ_diff(thetas[None, :], pref[:, None]) > 90.0  # outside the main lobe's half-circle
    ev["secondary_peak_ratio"] = np.where(far, f_UT, 0.0).max(1) / np.maximum(peak, 1e-30)
    half = f_UT >= 0.5 * np.maximum(peak, 1e-30)[:, None]
    steps = np.arange(1, T // 2 + 1)
    right = np.cumprod(half[np.arange(U)[:, None], (ti[:, None] + steps) % T], axis=1).sum(1)
    left = np.cumprod(half[np.arange(U)[:, None], (ti[:, None] - steps) % T], axis=1).sum(1)
    ev["tuning_width_deg"] = (left + right + 1) * cfg.orientation_step / 2  # half width at half max

    # Invariance: preferred orientation, tuning shape and response under each condition.
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
                "dtheta": _circ_diff(inv_thetas[kc % len(inv_thetas)], pref),
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

    # Discriminating stimuli: corners of similar orientation, off-centre straight lines.
    cm = table.condition == "corner"
    if cm.any():
        near = _circ_diff(table.orientation[cm][:, None], pref[None]) <= cfg.orientation_tolerance
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
# Null networks


def _block_of(layer: str) -> str:
    base = layer.removesuffix("_pre_relu")
    return base.split("_")[0] if base.startswith("mixed") else base


def _named_convs(model) -> dict[str, nn.Conv2d]:
    """Conv modules keyed by their path with dots as underscores (Lucent and BVLC agree then)."""
    return {name.replace(".", "_"): m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


def _conv(convs: dict[str, nn.Conv2d], lucid: str) -> nn.Conv2d:
    hits = [m for k, m in convs.items() if k.endswith(f"{lucid}_pre_relu_conv")]
    if len(hits) != 1:
        raise ValueError(f"cannot find the convolution of {lucid!r} (found {len(hits)}); nulls "
                         "need an InceptionV1 model (googlenet_bvlc or inceptionv1)")
    return hits[0]


BRANCH_INPUTS = ("1x1", "3x3_bottleneck", "5x5_bottleneck", "pool_reduce")
BRANCH_CONVS = ("1x1", "3x3_bottleneck", "3x3", "5x5_bottleneck", "5x5", "pool_reduce")


def feeding_convs(model, layer: str) -> list[nn.Conv2d]:
    """The convolutions that read the input of `layer`'s block (a plain conv layer: itself)."""
    convs = _named_convs(model)
    block = _block_of(layer)
    if block.startswith("mixed"):
        return [_conv(convs, f"{block}_{b}") for b in BRANCH_INPUTS]
    return [_conv(convs, block)]


def convs_above_stem(model, layer: str) -> list[nn.Conv2d]:
    """Every convolution from the first block after the stem up to and including `layer`'s."""
    convs = _named_convs(model)
    block = _block_of(layer)
    if not block.startswith("mixed"):
        return [_conv(convs, block)]
    order = [n for n in model.layer_names() if n.startswith("mixed") and "_" not in n]
    blocks = order[: order.index(block) + 1]
    return [_conv(convs, f"{b}_{c}") for b in blocks for c in BRANCH_CONVS]


@torch.no_grad()
def permuted_input_null(model, layer: str, seed: int):
    """Null (a): a copy whose feeding convolutions see their input channels in random order."""
    null = copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed))
    for conv in feeding_convs(null, layer):
        perm = torch.randperm(conv.weight.shape[1], generator=g).to(conv.weight.device)
        conv.weight.copy_(conv.weight[:, perm].clone())
    return null


@torch.no_grad()
def reinit_null(model, layer: str, seed: int):
    """Null (b): a copy whose convolutions above the stem are redrawn with per-filter mean/std."""
    null = copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed) + 10_000)
    for conv in convs_above_stem(null, layer):
        w = conv.weight
        flat = w.reshape(w.shape[0], -1).double()
        mu, sd = flat.mean(1), flat.std(1)
        noise = torch.randn(flat.shape, generator=g, dtype=torch.float64)
        conv.weight.copy_((mu[:, None] + sd[:, None] * noise).reshape(w.shape).to(w.dtype))
    return null


@torch.no_grad()
def spatial_null(model, layer: str, seed: int):
    """Null (d): every convolution above the stem keeps, for each (filter, input channel), its
    own k x k weights but in a random spatial order. Which channels a filter reads, and how
    strongly (the sum of each tap set), are kept; the spatial arrangement that assembles edges
    into curves is destroyed, in the layer's input block as in the layer itself."""
    null = copy.deepcopy(model)
    g = torch.Generator().manual_seed(int(seed) + 20_000)
    for conv in convs_above_stem(null, layer):
        w = conv.weight
        o, i, kh, kw = w.shape
        if kh * kw == 1:
            continue
        flat = w.reshape(o * i, kh * kw)
        order = torch.argsort(torch.rand(o * i, kh * kw, generator=g), dim=1).to(w.device)
        conv.weight.copy_(torch.gather(flat, 1, order).reshape(w.shape))
    return null


NULLS = {"permuted": permuted_input_null, "reinit": reinit_null, "spatial": spatial_null}
# What each null keeps and destroys (README, "Nulls"): checked on the layer's input block by
# `input_block_check` (the permuted null keeps the input block's curve units by design).
NULL_DESTROYS = {
    "permuted": "the channel order the layer reads (its input block is intact)",
    "reinit": "every learned weight above the stem (per-filter mean and std kept)",
    "spatial": "the spatial arrangement of every kernel above the stem (channel weights kept)",
}


def input_block_of(model, layer: str) -> str | None:
    """The block whose output `layer`'s block reads (mixed3b -> mixed3a); None for the stem."""
    block = _block_of(layer)
    if not block.startswith("mixed"):
        return None
    order = [n for n in model.layer_names() if n.startswith("mixed") and "_" not in n]
    i = order.index(block)
    return order[i - 1] if i > 0 else "conv2d2"


# --------------------------------------------------------------------------------------------
# Census of one network, calibration, coverage


def census_of_model(model, layer: str, cfg: CurvesConfig, table: S.StimulusTable, probe: Probe,
                    mean_U=None, std_U=None, images: torch.Tensor | None = None,
                    on_batch: BatchFn | None = None) -> dict:
    """Responses, stats and evidence of every neuron of one network (real or null)."""
    acts_ND = centre_activations(model, layer, table, probe, cfg.batch_size, on_batch)
    if mean_U is None or std_U is None:
        if images is None:
            raise ValueError("census_of_model needs mean_U/std_U or reference images")
        mean_U, std_U = unit_stats(layer_vectors(model, layer, images))
    mean_U = torch.as_tensor(mean_U, dtype=torch.float32)
    std_U = torch.as_tensor(std_U, dtype=torch.float32)
    return {"acts": acts_ND, "mean": mean_U, "std": std_U,
            "evidence": evidence(acts_ND.numpy(), table, cfg, mean_U.numpy(), std_U.numpy())}


def count_detected(ev: dict, thr: dict) -> int:
    """Number of units passing every criterion."""
    return int(criterion(ev, thr)["detected"].sum())


def fdr_table(real_ev: dict, null_evs: dict[str, list[dict]], thr: dict) -> dict:
    """Real count, each null's per-seed counts and mean, and FDR = mean null / real."""
    real = count_detected(real_ev, thr)
    out = {"real": real, "nulls": {}}
    for name, evs in null_evs.items():
        counts = [count_detected(e, thr) for e in evs]
        mean = float(np.mean(counts)) if counts else 0.0
        fdr = mean / real if real else (0.0 if mean == 0 else math.inf)
        out["nulls"][name] = {"counts": counts, "mean": mean, "fdr": fdr,
                              "real_exceeds_every_seed": all(real > c for c in counts)}
    fdrs = [v["fdr"] for v in out["nulls"].values()]
    out["fdr"] = max(fdrs) if fdrs else None
    out["real_exceeds_every_null"] = all(v["real_exceeds_every_seed"]
                                         for v in out["nulls"].values())
    return out


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

    def ok(t: dict) -> bool:
        return (t["real"] > 0 and t["fdr"] is not None and t["fdr"] <= cfg.max_fdr
                and t["real_exceeds_every_null"])

    if not null_evs or ok(table) or not cfg.calibrate:
        return {"thresholds": base, "tightened": False, "met": bool(null_evs) and ok(table),
                "table": table}
    best = None
    for ps in sorted({max(p, base["min_peak_sigma"]) for p in cfg.calib_peak_sigma}):
        for lr in sorted({max(x, base["min_curve_line_ratio"]) for x in cfg.calib_curve_line_ratio}):
            for ic in sorted({max(x, base["min_invariance_corr"])
                              for x in cfg.calib_invariance_corr}):
                thr = {**base, "min_peak_sigma": ps, "min_curve_line_ratio": lr,
                       "min_invariance_corr": ic}
                t = fdr_table(real_ev, null_evs, thr)
                if ok(t) and (best is None or t["real"] > best[1]["real"]):
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


def threshold_grid(real_ev: dict, null_evs: dict[str, list[dict]], cfg: CurvesConfig,
                   base: dict) -> list[dict]:
    """Real detections, per-null counts and FDR at every point of the calibration grid
    (calib_peak_sigma x calib_curve_line_ratio x calib_invariance_corr; the other criteria at
    `base`), looser and stricter than the configured thresholds alike. `in_band`: FDR <=
    max_fdr, at least one detection, and more real detections than every null seed."""
    rows = []
    for ps in sorted(set(cfg.calib_peak_sigma)):
        for lr in sorted(set(cfg.calib_curve_line_ratio)):
            for ic in sorted(set(cfg.calib_invariance_corr)):
                thr = {**base, "min_peak_sigma": float(ps), "min_curve_line_ratio": float(lr),
                       "min_invariance_corr": float(ic)}
                t = fdr_table(real_ev, null_evs, thr)
                rows.append({"min_peak_sigma": float(ps), "min_curve_line_ratio": float(lr),
                             "min_invariance_corr": float(ic), "real": t["real"],
                             "null_means": {k: v["mean"] for k, v in t["nulls"].items()},
                             "fdr": t["fdr"],
                             "in_band": bool(t["real"] > 0 and t["fdr"] is not None
                                             and t["fdr"] <= cfg.max_fdr
                                             and t["real_exceeds_every_null"])})
    return rows


def grid_thresholds(row: dict, base: dict) -> dict:
    """The full threshold dict of one `threshold_grid` row."""
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


# --------------------------------------------------------------------------------------------
# The census of a layer (neurons, nulls, SAE features) and its files


def orientation_curves(ev: dict, tc: dict, mean_U, std_U, units: Sequence[int]) -> np.ndarray:
    """σ-unit tuning at each unit's preferred radius [len(units), T]."""
    radii = list(tc["radii"])
    out = []
    for u in units:
        ri = radii.index(float(ev["preferred_radius"][u]))
        out.append((tc["raw"][u, ri] - float(mean_U[u])) / max(float(std_U[u]), 1e-12))
    return np.array(out).reshape(len(units), -1)


def _plain(cfg) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


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


def neuron_census(model, layer: str, ccfg, n_seeds: int, unit_mean, unit_std, images,
                  say, on_batch: BatchFn | None = None) -> dict:
    """The SAE-independent part of the census: real neurons, network nulls, calibration, the
    threshold grid and the input-block check."""
    import time

    probe = make_probe(model, layer, ccfg.canvas_size)
    table = make_battery(ccfg, probe)
    reference: dict[str, torch.Tensor] = {}

    def reference_images() -> torch.Tensor:  # made once, only when something needs them
        if images is not None:
            return images
        if "images" not in reference:
            reference["images"] = make_reference_images(ccfg.n_reference_images)
        return reference["images"]

    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    real = census_of_model(model, layer, ccfg, table, probe, unit_mean, unit_std,
                           None if unit_std is not None and unit_mean is not None
                           else reference_images(), on_batch=on_batch)
    timings["real_s"] = time.perf_counter() - t0
    say(f"[curves] {layer}: {len(table)} stimuli on a {probe.size}px canvas, "
        f"{timings['real_s']:.1f}s for the real network")

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
            res = census_of_model(null, layer, ccfg, table, probe, images=reference_images(),
                                  on_batch=on_batch)
            del null
            null_evs[kind].append(res["evidence"])
            null_curves[kind].append((res["evidence"], tuning_curves(res["acts"].numpy(), table,
                                                                     ccfg), res["mean"],
                                       res["std"]))
            timings[f"{kind}{seed}_s"] = time.perf_counter() - t0
            say(f"[curves] null {kind} seed {seed}: {count_detected(res['evidence'], thresholds_of(ccfg))} "
                f"detectors at the configured thresholds, {timings[f'{kind}{seed}_s']:.1f}s")

    configured = thresholds_of(ccfg)
    cal = calibrate(real["evidence"], null_evs, ccfg)
    thr = cal["thresholds"]
    grid = threshold_grid(real["evidence"], null_evs, ccfg, configured) if null_evs else []
    null_pass = {k: [criterion(e, thr)["detected"] for e in v] for k, v in null_evs.items()}
    tc_real = tuning_curves(real["acts"].numpy(), table, ccfg, real["mean"], real["std"])
    neuron_det = detections(real["evidence"], thr, null_passes=null_pass,
                            tuning_sigma=tc_real["sigma"], tuning_radii=tc_real["radii"])
    check = {}
    if ccfg.check_input_block and null_evs:
        t0 = time.perf_counter()
        check = input_block_check(model, layer, ccfg, reference_images(),
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
                      "max_fdr": ccfg.max_fdr},
        "nulls": {"kinds": list(null_evs), "n_seeds": n_seeds,
                  "destroys": {k: NULL_DESTROYS[k] for k in null_evs},
                  "input_block_check": check},
        "threshold_grid": grid,
        "neurons": {
            "n_units": int(real["acts"].shape[1]),
            "n_detected": len(neuron_det),
            "fdr": cal["table"],
            "fdr_at_configured": fdr_table(real["evidence"], null_evs, configured),
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
    return {"probe": probe, "table": table, "real": real, "thr": thr, "timings": timings,
            "reference_images": reference_images, "neuron_det": neuron_det, "result": result,
            "figs": figs, "tc_real": tc_real}


def sae_directions(sae) -> tuple[np.ndarray, np.ndarray | None]:
    """Decoder rows [F, D] and encoder columns as rows [F, D] (None when the SAE has no
    separate encoder, e.g. a tied or random dictionary)."""
    dec = sae.W_dec.detach().float().cpu().numpy()
    enc = getattr(sae, "W_enc", None)
    enc = None if enc is None else enc.detach().float().cpu().numpy().T
    return dec, enc


def _neuron_deg(ev: dict, thr: dict) -> dict[int, float]:
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
        if sh >= min_share and tuned[n] and _circ_diff(
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
    neuron_deg = _neuron_deg(real_ev, n_thr)
    units = np.where(criterion(f_ev, f_thr)["detected"])[0].tolist()
    copy = N.is_copy(dec_al, enc_al, max_share)
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
        rnd_new.append(int((~N.is_copy(r_al, None, max_share)[r_units]).sum()))
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
        neuron_deg = list(_neuron_deg(real_ev, thr).values())
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


def run_census(model, layer: str, cfg, unit_std=None, unit_mean=None, sae=None,
               feature_std=None, feature_mean=None, feature_vectors: torch.Tensor | None = None,
               images: torch.Tensor | None = None, cache_dir=None, out_dir=None,
               log: Callable[[dict], None] | None = None, null_seeds: int | None = None,
               verbose: bool = True, memo: dict | None = None, memo_key: str = "",
               extra: dict | None = None, on_batch: BatchFn | None = None) -> dict:
    """Curve-detector census of `layer`'s neurons (and an SAE's features), with nulls and FDR.

    unit_std/unit_mean: natural-image std/mean per channel (computed from `images`, or from
    `cfg.n_reference_images` demo crops, when absent; the null networks always use `images`).
    feature_std/feature_mean: per-feature stats of cfg.feature_response; otherwise computed from
    `feature_vectors` (raw activation vectors, e.g. from the cache), else from up to 20,000
    vectors of `cache_dir`, else from the reference images; the random-direction null always
    takes its stats from those same vectors. `memo`: a dict owned by the caller (an evaluation
    session) in which the SAE-independent neuron census is kept, keyed by `memo_key` (what the
    unit stats and images came from) plus the model's weights, the layer and the settings, so a
    sweep computes it once. `extra` is merged into the result (provenance). Returns a JSON-able
    dict; when `out_dir` is given, writes curves.json and the figures there (`write_census`).
    `on_batch` is called after every forward pass over the battery of the real and null networks
    (progress).
    """
    import time

    ccfg = curves_config(cfg)
    t_start = time.perf_counter()
    say = logger.info if verbose else (lambda *a, **k: None)
    n_seeds = int(ccfg.n_null_seeds if null_seeds is None else null_seeds)
    key = (memo_key, getattr(model, "weights_sha256", None), layer, n_seeds,
           json.dumps(dataclasses.asdict(ccfg) if dataclasses.is_dataclass(ccfg)
                      else _plain(ccfg), sort_keys=True, default=str))
    if memo is not None and key in memo:
        say(f"[curves] {layer}: reusing the neuron census and nulls computed earlier")
        part = memo[key]
    else:
        part = neuron_census(model, layer, ccfg, n_seeds, unit_mean, unit_std, images, say,
                             on_batch)
        if memo is not None:
            memo.clear()  # keep one entry: bounded memory across layers
            memo[key] = part
    table, real, thr = part["table"], part["real"], part["thr"]
    reference_images, neuron_det = part["reference_images"], part["neuron_det"]
    timings = dict(part["timings"])
    result = copy.deepcopy(part["result"])
    figs = dict(part["figs"])
    grid = result["threshold_grid"]
    min_gap = ccfg.min_gap_deg

    new_deg: list[float] = []
    copy_deg: list[float] = []
    band_f = None
    if sae is not None:
        t0 = time.perf_counter()
        key = ccfg.feature_response
        if key not in ("pre_acts", "encode"):
            raise ValueError(f"curves.feature_response={key!r} is not valid; "
                             "choose pre_acts or encode")
        was_training = getattr(sae, "training", False)
        if isinstance(sae, nn.Module):
            sae.eval()  # batchtopk encodes with its learned threshold, not per batch
        feats = feature_responses(sae, real["acts"])
        if feature_vectors is None:
            if cache_dir is not None:
                from sae_vision.shards import load_vectors

                feature_vectors = load_vectors(cache_dir, max_vectors=20_000)
            else:
                feature_vectors = layer_vectors(model, layer, reference_images())
        stats = feature_stats(sae, feature_vectors)
        if isinstance(sae, nn.Module):
            sae.train(was_training)
        if feature_std is not None and feature_mean is not None:
            stats[key] = (torch.as_tensor(feature_mean).float(),
                          torch.as_tensor(feature_std).float())
        f_mean, f_std = stats[key]
        f_ev = evidence(feats[key].numpy(), table, ccfg, f_mean.numpy(), f_std.numpy())
        # Both responses are recorded: the other one's peak and orientation ride along.
        other = "encode" if key == "pre_acts" else "pre_acts"
        o_ev = evidence(feats[other].numpy(), table, ccfg, stats[other][0].numpy(),
                        stats[other][1].numpy())
        f_ev[f"{other}_peak_sigma"] = o_ev["peak_sigma"]
        f_ev[f"{other}_preferred_orientation"] = o_ev["preferred_orientation"]
        # Null (c): random directions, scored through the same path with the same vectors.
        rnd_evs, rnd_curves, rnd_nov = [], [], []
        n_dirs = int(ccfg.n_random_directions or feats[key].shape[1])
        centre = feature_vectors.mean(0)
        for seed in range(n_seeds):
            rd = RandomDirections(real["acts"].shape[1], n_dirs, seed, centre)
            r_feats = feature_responses(rd, real["acts"], which=(key,))[key]
            r_mean, r_std = feature_stats(rd, feature_vectors, which=(key,))[key]
            e = evidence(r_feats.numpy(), table, ccfg, r_mean.numpy(), r_std.numpy())
            rnd_evs.append(e)
            rnd_curves.append((e, tuning_curves(r_feats.numpy(), table, ccfg), r_mean, r_std))
            rnd_nov.append((e, N.axis_alignment(rd.W_dec.numpy())))
        f_nulls = {"random_directions": rnd_evs} if rnd_evs else {}
        # The feature census starts from the neurons' calibrated thresholds (same criterion);
        # its own null may tighten them further, never loosen them.
        f_cal = calibrate(f_ev, f_nulls, ccfg, base=thr)
        f_thr = f_cal["thresholds"]
        f_null_pass = {k: [criterion(e, f_thr)["detected"] for e in v] for k, v in f_nulls.items()}
        f_tc = tuning_curves(feats[key].numpy(), table, ccfg, f_mean, f_std)
        feat_det = detections(f_ev, f_thr, tuning_sigma=f_tc["sigma"],
                              tuning_radii=f_tc["radii"])
        # Novelty: is each detected feature a copy of one neuron, or a new detector?
        dec, enc = sae_directions(sae)
        dec_al = N.axis_alignment(dec)
        enc_al = N.axis_alignment(enc) if enc is not None else None
        n_deg = {d["unit"]: d["preferred_orientation"] for d in neuron_det}
        nov_recs = N.novelty_records([d["unit"] for d in feat_det], dec_al, enc_al, n_deg,
                                     ccfg.copy_min_share)
        for d, rec in zip(feat_det, nov_recs):
            d["passes_in_null"] = None  # random directions have no counterpart of a feature
            d["novelty"] = rec
        nov = feature_novelty(f_ev, f_thr, real["evidence"], thr, dec_al, enc_al,
                              ccfg.copy_min_share, min_gap, rnd_nov, ccfg.cover_tolerance_deg)
        by_share = {f"{s:g}": {k: v for k, v in feature_novelty(
            f_ev, f_thr, real["evidence"], thr, dec_al, enc_al, s, min_gap, rnd_nov,
            ccfg.cover_tolerance_deg).items()
            if k not in ("new", "new_in_neuron_gaps_deg", "new_in_gaps_covered_by")}
            for s in ccfg.copy_share_grid}
        tc_real = part["tc_real"]
        new_units = set(nov["new"])
        new_records = []
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
            new_records.append({"feature": d["unit"],
                                "preferred_orientation": d["preferred_orientation"],
                                "preferred_radius": d["preferred_radius"],
                                "tuning_sigma": d["tuning_sigma"], "neurons": neurons})
        if grid:
            band_f = band_summary(grid, real["evidence"], result["criterion"]["configured"],
                                  min_gap, f_ev, dec_al, enc_al, ccfg.copy_min_share, rnd_nov,
                                  ccfg.cover_tolerance_deg)
        result["features"] = {
            "n_units": int(feats[key].shape[1]),
            "response": key,
            "n_detected": len(feat_det),
            "n_copies": nov["n_copies"],
            "n_new": nov["n_new"],
            "copy_min_share": ccfg.copy_min_share,
            "new_fdr_random_directions": nov["new_fdr"],
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
            "fdr": f_cal["table"],
            "n_random_directions": n_dirs,
            "null_pass_counts": {k: [int(m.sum()) for m in v] for k, v in f_null_pass.items()},
            "detected": feat_det,
            "new_features": new_records,
        }
        new_deg = [d["preferred_orientation"] for d in feat_det if d["unit"] in new_units]
        copy_deg = [d["preferred_orientation"] for d in feat_det if d["unit"] not in new_units]
        figs["tuning_features"] = (f_ev, f_tc, f_mean, f_std, [d["unit"] for d in feat_det],
                                   {"random_directions": rnd_curves}, "feature",
                                   ccfg.n_tuning_figures)
        figs["evidence_features"] = (f_ev, f_nulls, f_thr)
        if new_records:
            figs["new_features"] = (new_records, result["tuning_orientations"],
                                    ccfg.n_new_figures)
        timings["features_s"] = time.perf_counter() - t0
    neuron_deg = [d["preferred_orientation"] for d in neuron_det]
    cov = coverage(neuron_deg, new_deg, min_gap)
    cov["n_copy_detectors"] = len(copy_deg)
    cov["copies_deg"] = [float(x) for x in copy_deg]
    cov["counts_only"] = "new features (copies of a neuron never fill a gap)"
    result["coverage"] = cov
    if grid:
        result["band"] = band_f if band_f is not None else band_summary(
            grid, real["evidence"], result["criterion"]["configured"], min_gap)
        figs["threshold_band"] = (grid, result["band"], ccfg.max_fdr)
    figs["coverage"] = (neuron_deg, new_deg, min_gap, copy_deg)
    timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = timings
    result.update(extra or {})
    say(_headline(result))
    if out_dir is not None:
        result["files"] = write_census(out_dir, result, figs)
    if log is not None:
        log(_scalars(result))
    return result


def _headline(res: dict) -> str:
    n = res["neurons"]
    parts = [f"[curves] {res['layer']}: {n['n_detected']}/{n['n_units']} neurons"]
    for k, v in n["fdr"]["nulls"].items():
        parts.append(f"{k} null {v['counts']} (FDR {v['fdr']:.2f})")
    if "features" in res:
        f = res["features"]
        parts.append(f"{f['n_detected']}/{f['n_units']} features = {f['n_copies']} copies + "
                     f"{f['n_new']} new")
        for k, v in f["fdr"]["nulls"].items():
            parts.append(f"{k} {v['counts']} (FDR {v['fdr']:.2f})")
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
    return out


def write_census(out_dir, result: dict, figs: dict) -> dict[str, str]:
    """Write curves.json and the PNG figures into out_dir; return their paths."""
    from sae_vision.plots import save_census_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = save_census_figures(out, figs)
    result = {**result, "files": {**paths, "json": str(out / "curves.json")}}
    write_json(out / "curves.json", result)
    return result["files"]


def write_json(path, obj) -> None:
    """Write a JSON-able object (numpy/torch values allowed) atomically."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o))
