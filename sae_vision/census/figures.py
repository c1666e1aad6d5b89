"""The curve-detector census's figures: coverage, threshold band, new features, tuning curves
and evidence. Each `figure_*` returns a Figure; `save_census_figures` draws and saves them in the
pipeline's one style (`plots.pyplot`, `plots.save_fig`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sae_vision.core import pyplot, save_fig

from . import curves as C


def figure_coverage(neuron_deg: Sequence[float], feature_deg: Sequence[float],
                    min_gap_deg: float = 30.0, copy_deg: Sequence[float] = ()):
    """Polar plot: neuron detectors (long red spokes), copies of a neuron (short grey spokes),
    new feature detectors (blue, with a dot); only the neuron gaps of >= min_gap_deg are shaded,
    each exactly over its own arc and labelled with its width."""
    plt = pyplot()
    fig = plt.figure(figsize=(5.2, 5.2))
    ax = fig.add_subplot(projection="polar")
    gaps = [g for g in C.orientation_gaps(neuron_deg) if g[1] >= min_gap_deg] if len(
        neuron_deg) else []
    for i, (s, w) in enumerate(gaps):
        mid = np.deg2rad(s + w / 2)
        ax.bar(mid, 1.05, width=np.deg2rad(w), bottom=0.0, zorder=0, align="center",
               color="#fdd0a2" if i == 0 else "#feedde", edgecolor="none",
               label=f"neuron gaps >= {min_gap_deg:g}°" if i == 0 else None)
        ax.text(mid, 1.12, f"{w:.0f}°", ha="center", va="center", fontsize=7, color="#a63603")
    for i, a in enumerate(neuron_deg):
        ax.plot([np.deg2rad(a)] * 2, [0, 1.0], color="C3", lw=2,
                label="neurons" if i == 0 else None)
    for i, a in enumerate(copy_deg):
        ax.plot([np.deg2rad(a)] * 2, [0, 0.55], color="0.55", lw=1.0,
                label="SAE copies of a neuron" if i == 0 else None)
    for i, a in enumerate(feature_deg):
        ax.plot([np.deg2rad(a)] * 2, [0, 0.8], color="C0", lw=1.4)
        ax.plot([np.deg2rad(a)], [0.8], "o", color="C0", ms=5,
                label="new SAE detectors" if i == 0 else None)
    ax.set_ylim(0, 1.2)
    ax.set_yticks([])
    ax.set_title(f"curve-detector orientations: {len(neuron_deg)} neurons, "
                 f"{len(copy_deg)} copies, {len(feature_deg)} new", fontsize=9)
    if len(neuron_deg) or len(feature_deg) or len(copy_deg):
        ax.legend(loc="lower left", fontsize=7, bbox_to_anchor=(-0.12, -0.14))
    return fig


def figure_threshold_band(grid: list[dict], band: dict, max_fdr: float):
    """Left: real detections vs estimated FDR at every threshold-band point (in-band points
    filled). Right: the largest neuron gap, and new detectors in it, across the band."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    fdr = np.array([min(g["fdr"], 1.0) if g["fdr"] is not None else np.nan for g in grid])
    real = np.array([g["real"] for g in grid])
    inb = np.array([g["in_band"] for g in grid], bool)
    a.scatter(real[~inb], fdr[~inb], s=14, facecolors="none", edgecolors="0.5", label="outside band")
    a.scatter(real[inb], fdr[inb], s=16, color="C3", label=f"FDR <= {max_fdr:g} (band)")
    a.axhline(max_fdr, color="C3", lw=0.8, ls="--")
    a.set_xlabel("real neuron detectors")
    a.set_ylabel("estimated FDR (max over nulls, capped at 1)")
    a.legend(fontsize=7)
    pts = band.get("points") or []
    x = np.arange(len(pts))
    if pts:
        b.plot(x, [p["largest_gap_neurons_deg"] for p in pts], "o-", color="C3", ms=3,
               label="largest neuron gap (°)")
        if "largest_gap_neurons_plus_new_deg" in pts[0]:
            b.plot(x, [p["largest_gap_neurons_plus_new_deg"] for p in pts], "s-", color="C0",
                   ms=3, label="with new SAE detectors (°)")
            b2 = b.twinx()
            b2.bar(x, [p["n_new_in_neuron_gaps"] for p in pts], color="C0", alpha=0.25)
            b2.set_ylabel("new detectors in neuron gaps", fontsize=8)
        b.set_xticks(x)
        b.set_xticklabels([p.get("label") or f"{p['min_peak_sigma']:g}/"
                           f"{p['min_curve_line_ratio']:g}/{p['min_invariance_corr']:g}"
                           for p in pts], rotation=90, fontsize=5, family="monospace")
        b.set_xlabel("band point: each criterion - looser, 0 as used, + stricter", fontsize=8)
        b.legend(fontsize=7, loc="upper left")
    else:
        b.text(0.5, 0.5, "no grid point reaches the FDR target", ha="center", va="center")
    fig.tight_layout()
    return fig


def figure_new_features(records: list[dict], orientations: Sequence[float], n_max: int = 12):
    """Each new feature's σ tuning (black) beside its top decoder neurons' σ tuning at the same
    radius (coloured; dashed when the neuron is not itself a census detector)."""
    plt = pyplot()
    recs = list(records)[:n_max]
    cols = min(4, max(len(recs), 1))
    rows = math.ceil(max(len(recs), 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.5 * rows), squeeze=False)
    th = np.asarray(orientations)
    for ax, r in zip(axes.flat, recs):
        ax.plot(th, r["tuning_sigma"], color="k", lw=1.8, label=f"feature {r['feature']}")
        for i, n in enumerate(r["neurons"]):
            ax.plot(th, n["tuning_sigma"], color=f"C{i}", lw=1.0, ls="-" if n["is_detector"]
                    else "--", label=f"n{n['neuron']} share {n['share']:.2f}")
        ax.set_title(f"feature {r['feature']}: θ*={r['preferred_orientation']:.0f}° "
                     f"r*={r['preferred_radius']:g}", fontsize=8)
        ax.set_xticks([0, 90, 180, 270, 360])
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(recs):]:
        ax.axis("off")
    fig.suptitle("new SAE curve detectors (black) and the neurons they are made of (σ tuning "
                 "at the feature's preferred radius)", fontsize=8)
    fig.tight_layout()
    return fig


def figure_tuning(ev: dict, tc: dict, mean_U, std_U, units: Sequence[int], nulls: dict,
                  what: str = "neuron", n_max: int = 16):
    """Real σ tuning curves of detected units beside the null distribution.

    Grey band: 10-90th percentile (line: median) of the σ tuning of each null network's 20 units
    with the highest peak σ, every curve rolled so its peak sits at the real unit's preferred
    orientation (the best tuning a null produces); a neuron panel also shows the same channel in
    each null network (dashed: orange permuted, green re-initialised).
    """
    plt = pyplot()
    units = list(units)[:n_max]
    n = max(len(units), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    th = tc["orientations"]
    null_shapes = []
    for entries in nulls.values():
        for e, ntc, nm, ns in entries:
            top = np.argsort(-np.nan_to_num(e["peak_sigma"], nan=-np.inf))[:20]
            for c in C.orientation_curves(e, ntc, nm, ns, top.tolist()):
                null_shapes.append(np.roll(c, -int(np.argmax(c))))
    shapes = np.array(null_shapes) if null_shapes else np.zeros((0, len(th)))
    for ax, u in zip(axes.flat, units):
        curve = C.orientation_curves(ev, tc, mean_U, std_U, [u])[0]
        shift = int(np.argmax(curve))
        top = float(curve.max())
        if len(shapes):
            lo, mid, hi = (np.roll(np.percentile(shapes, q, axis=0), shift) for q in (10, 50, 90))
            ax.fill_between(th, lo, hi, color="0.85", lw=0, label="null 10-90%")
            ax.plot(th, mid, color="0.6", lw=0.8)
            top = max(top, float(hi.max()))
        if what == "neuron":
            for kind, entries in nulls.items():
                for e, ntc, nm, ns in entries:
                    same = C.orientation_curves(e, ntc, nm, ns, [u])[0]
                    ax.plot(th, same, ls="--", lw=0.8, color="C1" if kind == "permuted" else "C2")
        ax.set_ylim(min(-1.0, float(curve.min()) - 1), 1.2 * top + 1)
        ax.plot(th, curve, color="k", lw=1.5)
        ax.set_title(f"{what} {u}: θ*={ev['preferred_orientation'][u]:.0f}° "
                     f"r*={ev['preferred_radius'][u]:g}", fontsize=8)
        ax.set_xticks([0, 90, 180, 270, 360])
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(units):]:
        ax.axis("off")
    if not units:
        axes.flat[0].text(0.5, 0.5, f"no {what} detected", ha="center", va="center")
    fig.suptitle(f"{what} tuning (σ) vs orientation at the preferred radius\n"
                 "grey: strongest null units, aligned (10-90%, median)", fontsize=8)
    fig.tight_layout()
    return fig


def figure_evidence(ev: dict, nulls: dict[str, list[dict]], thr: dict, what: str = "neuron"):
    """Scatter of peak σ vs tuning-shape invariance for real and null units, with thresholds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    colours = {"permuted": "C1", "reinit": "C2", "random_directions": "C0"}
    for kind, evs in nulls.items():
        for i, e in enumerate(evs):
            ax.scatter(np.clip(e["peak_sigma"], -5, 100), e["invariance_corr"], s=4, alpha=0.4,
                       color=colours.get(kind, "0.5"), label=f"{kind} null" if i == 0 else None)
    det = C.criterion(ev, thr)["detected"]
    ax.scatter(np.clip(ev["peak_sigma"], -5, 100), ev["invariance_corr"], s=6, color="k",
               label=f"real {what}s")
    ax.scatter(np.clip(ev["peak_sigma"][det], -5, 100), ev["invariance_corr"][det], s=30,
               facecolors="none", edgecolors="C3", label="detected")
    ax.axvline(thr["min_peak_sigma"], color="C3", lw=0.8)
    ax.axhline(thr["min_invariance_corr"], color="C3", lw=0.8)
    ax.set_xlabel("peak response (σ)")
    ax.set_ylabel("min tuning correlation across invariance conditions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_census_figures(out_dir: Path, figs: dict) -> dict[str, str]:
    """Draw and save the census figures named in `figs` (name -> arguments) as curves_<name>.png."""
    makers = {
        "coverage": lambda a: figure_coverage(*a),
        "tuning_neurons": lambda a: figure_tuning(*a),
        "tuning_features": lambda a: figure_tuning(*a),
        "evidence_neurons": lambda a: figure_evidence(*a, what="neuron"),
        "evidence_features": lambda a: figure_evidence(*a, what="feature"),
        "threshold_band": lambda a: figure_threshold_band(*a),
        "new_features": lambda a: figure_new_features(*a),
    }
    return {name: str(save_fig(makers[name](args), Path(out_dir) / f"curves_{name}.png"))
            for name, args in figs.items()}
