"""sae_vision/census/figures.py: the census figures are saved under their part's name."""

from __future__ import annotations

from sae_vision.census import figures as census_figures
from tests.core.test_plots import _png


def test_census_figures_are_named_after_their_part(tmp_path):
    figs = {"coverage": ([10.0, 100.0, 250.0], [170.0], 30.0, [12.0])}
    paths = census_figures.save_census_figures(tmp_path, figs)
    assert paths == {"coverage": str(tmp_path / "curves_coverage.png")}
    assert _png(tmp_path / "curves_coverage.png")
