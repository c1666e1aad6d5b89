"""The report's static HTML: runs table, figures, curve census, polysemantic neurons, the page."""

from pathlib import Path
from types import SimpleNamespace

from sae_vision.report import pages
from sae_vision.report.records import RunRecord


def record(name: str, curves: dict | None = None, poly: dict | None = None) -> RunRecord:
    return RunRecord(run_dir=Path(name), name=name, slug=f"slug-{name}", sae=None, meta={},
                     info=SimpleNamespace(layer="mixed3a"), metrics=None, curves=curves,
                     poly=poly)


def test_summary_has_one_row_per_run_with_its_sparsity_knob_and_a_browse_link():
    rows = [{"run": "a<b", "browser": "a_b", "evaluated": True, "layer": "mixed3a",
             "arch": "relu", "n_features": 512, "l1_coeff": 0.004, "l0": 12.5, "fvu": 0.15,
             "dead_frac": 0.05, "frac_recovered_zero": 0.9},
            {"run": "k8", "browser": "k8", "evaluated": False, "k": 8},
            {"run": "none", "browser": "none", "evaluated": False}]
    h = pages.html_summary(rows)
    assert h.count("<tr data-run=") == 3
    assert "a&lt;b" in h and "a<b" not in h  # escaped
    assert "<td>L1 0.004</td>" in h and "<td>k 8</td>" in h and "<td>–</td>" in h
    assert "<td>5.0%</td>" in h and "<td>90.0%</td>" in h and "<td>12.5</td>" in h
    assert h.count("not evaluated") == 2
    assert "href='#b=a_b'" in h and "reportGo('k8','')" in h


def test_figures_row_escapes_and_lets_a_figure_override_the_class():
    assert pages.html_figures([], "x") == ""
    h = pages.html_figures([("figures/a.png", "A & B", "alt a"),
                            ("figures/b.png", "B", "alt b", "special")], "plain")
    assert h.startswith("<div class=figures>") and h.count("<figure>") == 2
    assert "class='plain' src='figures/a.png' alt='alt a'" in h
    assert "class='special' src='figures/b.png'" in h
    assert "<figcaption>A &amp; B</figcaption>" in h


CURVES = {
    "criterion": {"used": {"min_peak_sigma": 5.0}, "tightened": True, "fdr_target_met": False,
                  "max_fdr": 0.1},
    "neurons": {"n_units": 256, "n_detected": 2, "fdr": {"fdr": 0.05}},
    "features": {"n_units": 512, "n_detected": 1, "n_copies": 0, "n_new": 1,
                 "fdr": {"fdr": 0.08},
                 "new_features": [{"feature": 5, "preferred_orientation": 150.0, "neurons": [
                     {"neuron": 3, "share": 0.45, "is_detector": True, "orientation": 90.0},
                     {"neuron": 4, "share": 0.2}]}]},
    "coverage": {"largest_gap_neurons_deg": 120.0, "n_features_in_neuron_gaps": 1},
    "band": {"n_points": 7, "real_range": {"min": 2, "max": 9}, "n_new_range": {"min": 1,
                                                                                 "max": 3}},
    "nulls": {"input_block_check": {"block": "conv2d0", "shuffle": {"detected": 0}},
              "seeds": {"calibration": [0, 1, 2], "report": [3, 4, 5], "held_out": True}},
}


def test_census_shows_counts_fdr_coverage_notes_new_features_and_figures():
    figs = {"coverage": "figures/coverage-r.png", "tuning_neurons": "figures/tn-r.png",
            "tuning_features": "figures/tf-r.png", "threshold_band": "figures/band-r.png"}
    h = pages.html_census(record("r", CURVES), figs)
    assert h.startswith("<h3>r <span class=badge>mixed3a</span></h3><div class=census>")
    assert "neuron curve detectors of 256" in h and "FDR≈0.05" in h and "FDR≈0.08" in h
    assert "of them new (not a copy)" in h and "of them copies of one neuron" in h
    assert "120°</span><div class=k>largest orientation gap, neurons alone" in h
    assert "new features in neuron gaps" in h and "neurons + new features" not in h
    assert ("criterion used: min_peak_sigma 5 (tightened to meet the FDR target); FDR ≤ 0.1 "
            "<b>not met</b>") in h
    assert "across the 7 threshold-band points (every criterion moved)" in h and "neuron detectors 2–9" in h
    assert "new SAE detectors 1–3" in h
    assert "input block conv2d0" in h and "shuffle 0" in h
    assert "chosen on null seeds [0, 1, 2]; every FDR reported on the held-out seeds [3, 4, 5]" in h
    assert "<td>f5</td><td>150°</td>" in h
    assert "n3 (0.45, detector at 90°), n4 (0.2)" in h
    assert "class='coverage-figure' src='figures/coverage-r.png'" in h
    assert "src='figures/band-r.png'" in h
    assert "src='figures/tn-r.png'" in h and "src='figures/tf-r.png'" in h


def test_census_without_detections_or_extras_is_just_the_counts():
    curves = {"neurons": {"n_units": 256, "n_detected": 0, "fdr": 0.0}}
    h = pages.html_census(record("r", curves), {"tuning_neurons": "figures/tn.png"})
    assert "neuron curve detectors of 256" in h and "SAE-feature" not in h
    assert "class=note" not in h and "<table" not in h
    assert "figures/tn.png" not in h  # no tuning figure of an empty group


POLY = {"summary": {"mean_frac_own_features_more_selective": 0.8,
                    "random_dictionary": {"mean_frac_own_features_more_selective": 0.3},
                    "kurtosis": {"neurons": {"p50": 2.0}, "features": {"p50": 5.0}}},
        "most_polysemantic": [{"neuron": 3, "n_effective_features": 2.4, "kurtosis": 3.1,
                               "r2": 0.9, "features": [{"feature": 5, "share": 0.6,
                                                        "kurtosis": 9.5},
                                                       {"feature": 9, "share": 1.7}]}]}


def test_poly_shows_neurons_with_their_features_and_links_to_the_browsers():
    h = pages.html_poly(record("r", poly=POLY), {3: "crops/n3.png"}, {5: "crops/f5.png"},
                        "neurons-mixed3a")
    assert "median neuron 2, median SAE feature 5" in h
    assert "in 80.0% of cases (a random dictionary: 30.0%)" in h
    assert "data-goto='neurons-mixed3a' data-q='n3'" in h and "src='crops/n3.png'" in h
    assert "data-goto='slug-r' data-q='f5'" in h and "src='crops/f5.png'" in h
    assert "f9 · share 1.7" in h and "alt='feature 9'" not in h  # no thumbnail
    assert "width:60%" in h and "width:100%" in h  # share bars, clipped at 1
    assert "2.4 effective features · R² 0.9" in h


def test_poly_without_neurons_says_so():
    h = pages.html_poly(record("r", poly={}), {}, {}, "n")
    assert "polysemantic.json lists no neurons" in h and "class=note" not in h


def test_page_has_navigation_sections_and_scripts_in_order():
    h = pages.html_page("report <x>", "2024-01-01 10:00",
                        [("summary", "Runs", "All runs", "<p>t</p>"),
                         ("browser", "Browser", "Feature browser", pages.BROWSER_HTML)])
    assert h.startswith("<!doctype html>")
    assert "<title>report &lt;x&gt;</title>" in h
    assert "<a href='#summary'>Runs</a><a href='#browser'>Browser</a>" in h
    assert "<section id='summary'><h2>All runs</h2><p>t</p></section>" in h
    assert "id=browser-select" in h and "id=search" in h and "id=cards" in h
    assert h.index("data/report.js") < h.index("assets/report.js")
    assert "generated 2024-01-01 10:00" in h
