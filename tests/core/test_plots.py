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


def test_frontier_draws_the_neuron_basis_beside_the_saes(tmp_path):
    rows = [{"layer": "mixed3b", "arch": a, "l0": l0, "fvu": 1 / l0, "fvu_neuron_topk": 3 / l0}
            for a, l0 in (("topk", 8.0), ("topk", 32.0), ("relu_l1", 16.0))]
    rows.append({"layer": "mixed3b", "arch": "relu_l1", "l0": 64.0, "fvu": 0.01,
                 "fvu_neuron_topk": None})  # evaluated before the baseline existed
    assert plots.neuron_baseline_points(rows, "fvu") == {
        "mixed3b": [(8.0, 3 / 8), (16.0, 3 / 16), (32.0, 3 / 32)]}
    assert plots.neuron_baseline_points(rows, "kl_sae") == {}  # no such baseline: no line
    with_base = plots.plot_frontier(rows, "fvu", "FVU", tmp_path / "with.png")
    bare = [{k: v for k, v in r.items() if k != "fvu_neuron_topk"} for r in rows]
    without = plots.plot_frontier(bare, "fvu", "FVU", tmp_path / "without.png")
    assert _png(with_base) and with_base.read_bytes() != without.read_bytes()
