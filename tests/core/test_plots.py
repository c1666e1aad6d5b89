"""sae_vision/core/plots.py: every figure draws from plain data and is saved whole, in one style."""

from __future__ import annotations

import numpy as np

from sae_vision.core import plots


def _png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_figures_are_saved_as_pngs_without_temp_files(tmp_path):
    hist = {"edges": np.linspace(-6, 0, 13).tolist(), "counts": list(range(12)), "n_live": 66,
            "n_dead": 3}
    assert _png(plots.plot_density(hist, "density", tmp_path / "d.png"))
    assert _png(plots.plot_l0([0, 3, 5, 2], 1.9, "l0", tmp_path / "l0.png"))
    rows = [{"layer": "mixed3b", "arch": "topk", "l0": l0, "fvu": 1 / l0} for l0 in (8, 32, 64)]
    assert _png(plots.plot_frontier(rows, "fvu", "FVU", tmp_path / "f.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "f.png", "l0.png"]


def test_frontier_without_finite_points_draws_nothing(tmp_path):
    rows = [{"layer": "a", "arch": "topk", "l0": None, "fvu": 0.1},
            {"layer": "a", "arch": "topk", "l0": 4.0, "fvu": float("nan")}]
    assert plots.plot_frontier(rows, "fvu", "FVU", tmp_path / "f.png") is None
    assert not list(tmp_path.iterdir())


def test_the_shared_style_is_applied():
    plt = plots.pyplot()
    assert plt.get_backend().lower() == "agg"
    assert plt.rcParams["savefig.dpi"] == plots.DPI
