"""The pipeline's one figure style and saver, and the run and sweep plots.

`plot_*` functions draw and save in one call and return the path; the census's figures
(`census_figures`) use the same `pyplot` and `save_fig`. Figures are drawn off-screen (Agg).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import io

DPI = 110  # every PNG of the pipeline
# The shared style: small type, so that a figure reads at the width of a report column.
STYLE = {"axes.titlesize": 9, "legend.fontsize": 7, "savefig.dpi": DPI}


def pyplot():
    """matplotlib.pyplot on the off-screen Agg backend, with the shared style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def save_fig(fig, path: Path) -> Path:
    """Save at the shared DPI through io's one atomic writer, and close the figure."""
    return io.save_fig(fig, path, dpi=DPI, tight=True)


def finite(v) -> bool:
    """A real, finite number (not None, NaN or inf)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


# --------------------------------------------------------------------------------------------
# Evaluation of one run, and sweeps


def plot_density(hist: dict, title: str, path: Path) -> Path:
    """Bar chart of the log10 feature-density histogram, with the dead count in the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.asarray(hist["edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#4c72b0",
           edgecolor="white", label=f"live ({hist['n_live']})")
    ax.plot([], [], " ", label=f"dead ({hist['n_dead']}, not shown)")
    ax.set_xlabel("log10 feature density (fraction of vectors active)")
    ax.set_ylabel("features")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_fig(fig, path)


def plot_l0(l0_hist: list[int], mean_l0: float, title: str, path: Path) -> Path:
    """Histogram of active features per vector."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(len(l0_hist)), l0_hist, width=1.0, color="#55a868")
    ax.axvline(mean_l0, color="k", lw=1, ls="--", label=f"mean L0 = {mean_l0:.1f}")
    ax.set_xlabel("L0 (active features per vector)")
    ax.set_ylabel("vectors")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_fig(fig, path)


def neuron_baseline_points(rows: list[dict], y_key: str) -> dict[str, list[tuple[float, float]]]:
    """Per layer, the (L0, `<y_key>_neuron_topk`) points of the rows that carry them, by L0:
    the neuron basis at each run's sparsity (one point per L0, since neurons know no arch)."""
    layers: dict[str, dict[float, float]] = {}
    for r in rows:
        if finite(r.get("l0")) and finite(r.get(f"{y_key}_neuron_topk")):
            layers.setdefault(r["layer"], {})[float(r["l0"])] = float(r[f"{y_key}_neuron_topk"])
    return {layer: sorted(by_l0.items()) for layer, by_l0 in layers.items()}


def plot_frontier(rows: list[dict], y_key: str, y_label: str, path: Path) -> Path | None:
    """Sparsity-fidelity frontier: L0 against y_key, one line per (layer, arch). Where the rows
    carry `<y_key>_neuron_topk` (the neuron basis at the run's L0: each vector's top-k
    channels), it is drawn beside, dashed with hollow markers, one line per layer."""
    pts = [r for r in rows if finite(r.get("l0")) and finite(r.get(y_key))]
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in pts:
        groups.setdefault((r["layer"], r["arch"]), []).append(r)
    markers = "osD^v<>pP*X"
    for i, ((layer, arch), rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in rs], [r[y_key] for r in rs], marker=markers[i % len(markers)],
                label=f"{layer} / {arch}")
    for i, (layer, xy) in enumerate(sorted(neuron_baseline_points(pts, y_key).items())):
        ax.plot([x for x, _ in xy], [y for _, y in xy], ls="--", color="0.45", lw=1,
                marker=markers[i % len(markers)], mfc="none",
                label=f"{layer} / neuron basis (top-k channels)")
    l0s = [r["l0"] for r in pts]
    if min(l0s) > 0 and max(l0s) / min(l0s) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active features per vector)")
    ax.set_ylabel(y_label)
    ax.set_title(f"Sparsity-fidelity frontier: L0 vs {y_label}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_fig(fig, path)
