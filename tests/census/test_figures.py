"""sae_vision/census/figures.py: the census figures are saved under their part's name."""

from __future__ import annotations

from sae_vision.census import figures as census_figures
from tests.core.test_plots import _png


def test_census_figures_are_named_after_their_part(tmp_path):
    figs = {"coverage": ([10.0, 100.0, 250.0], [170.0], 30.0, [12.0])}
    paths = census_figures.save_census_figures(tmp_path, figs)
    assert paths == {"coverage": str(tmp_path / "curves_coverage.png")}
    assert _png(tmp_path / "curves_coverage.png")


def test_threshold_band_figure_draws_every_criterion_band_point(tmp_path):
    import numpy as np

    from sae_vision.census import curves as C
    from sae_vision.census import novelty as N
    from tests.census.test_curves import fake_evidence

    rng = np.random.default_rng(0)
    real = fake_evidence({"peak_sigma": rng.uniform(2, 40, 200),
                          "preferred_orientation": rng.choice(np.arange(0, 360, 5), 200)}, 200)
    nulls = {"permuted": [fake_evidence({"peak_sigma": rng.uniform(0, 5.5, 200)}, 200)] * 2}
    cfg = C.CurvesConfig(band_n_random=8)
    base = C.thresholds_of(cfg)
    grid = C.threshold_grid(real, nulls, cfg, base)
    band = N.band_summary(grid, real, base, 30.0)
    assert 0 < band["n_points"] < len(grid)
    assert all(len(p["label"]) == len(C.CRITERIA) for p in band["points"])
    assert band["fdr_upper95_range"]["max"] >= band["fdr_range"]["max"]
    paths = census_figures.save_census_figures(tmp_path, {"threshold_band": (grid, band, 0.1)})
    assert _png(tmp_path / "curves_threshold_band.png") and "threshold_band" in paths
