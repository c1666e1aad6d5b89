"""The static HTML of the report's index.html: page frame, runs table, figures, curve census and
polysemantic neurons, and the feature browser's controls (assets/report.js renders its
cards from the data scripts sae_vision.report.browser builds).
"""

from __future__ import annotations

import html
import math
from typing import Any

from .records import RunRecord, census_groups, dig, group_fdr, poly_rows

# --------------------------------------------------------------------------------------------
# Formatting


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.2e}"
    if abs(v) >= 10 ** digits:
        return f"{v:.0f}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


# --------------------------------------------------------------------------------------------
# Sections


def html_summary(rows: list[dict]) -> str:
    """The runs table."""
    head = ("<tr><th class=l>run</th><th class=l>layer</th><th class=l>arch</th><th>features</th>"
            "<th>L1 / k</th><th>L0</th><th>FVU</th><th>dead</th><th>splice KL</th>"
            "<th>KL zero-abl.</th><th>KL recovered</th><th class=l></th></tr>")
    body = []
    for r in rows:
        sparsity = (f"L1 {_fmt(r['l1_coeff'])}" if r.get("l1_coeff") is not None
                    else f"k {r['k']}" if r.get("k") is not None else "–")
        note = "" if r["evaluated"] else " <span class=badge>not evaluated</span>"
        body.append(
            f"<tr data-run='{_e(r['run'])}'><td class=l>{_e(r['run'])}{note}</td>"
            f"<td class=l>{_e(r.get('layer'))}</td><td class=l>{_e(r.get('arch'))}</td>"
            f"<td>{_fmt(r.get('n_features'))}</td><td>{sparsity}</td><td>{_fmt(r.get('l0'))}</td>"
            f"<td>{_fmt(r.get('fvu'))}</td><td>{_pct(r.get('dead_frac'))}</td>"
            f"<td>{_fmt(r.get('kl_sae'))}</td><td>{_fmt(r.get('kl_zero'))}</td>"
            f"<td>{_pct(r.get('frac_recovered_zero'))}</td>"
            f"<td class=l><a href='#b={_e(r['browser'])}' "
            f"onclick=\"reportGo('{_e(r['browser'])}','');return false\">browse</a></td></tr>")
    return (f"<div class=scroll><table class=data id=summary-table>{head}{''.join(body)}</table>"
            "</div>")


def html_figures(figs: list[tuple], cls: str) -> str:
    """A row of figures: (relative path, caption, alt[, class overriding cls])."""
    if not figs:
        return ""
    return "<div class=figures>" + "".join(
        f"<figure><img class='{_e(f[3] if len(f) > 3 else cls)}' src='{_e(f[0])}' "
        f"alt='{_e(f[2])}'><figcaption>{_e(f[1])}</figcaption></figure>" for f in figs) + "</div>"


def html_census(r: RunRecord, figs: dict[str, str]) -> str:
    """Curve-detector counts with their estimated FDR, coverage numbers and figures, for one run."""
    groups = census_groups(r.curves)
    feats = groups.get("features") or {}
    cells = _census_stats(groups, dig(r.curves, "coverage", default={}) or {})
    note = _census_notes(r.curves) + _new_features_table(feats.get("new_features") or [])
    return (f"<h3>{_e(r.name)} <span class=badge>{_e(r.info.layer)}</span></h3>"
            f"<div class=census>{''.join(cells)}</div>{note}"
            f"{html_figures(_census_figures(r, figs, groups), 'tuning-figure')}")


def _census_stats(groups: dict[str, dict], cov: dict) -> list[str]:
    """Stat cells: detections with their FDR, copies and new ones, orientation coverage."""
    cells = []
    for kind, label in (("neurons", "neuron curve detectors"),
                        ("features", "SAE-feature curve detectors")):
        g = groups.get(kind)
        if g is None:
            continue
        cells.append(f"<div class=stat><span class=v>{_e(_fmt(g.get('n_detected')))}</span>"
                     f"<span class=fdr title='estimated false discovery rate: detections in null "
                     f"models over real detections (worst null)'>FDR≈{_e(_fmt(group_fdr(g), 2))}"
                     f"</span><div class=k>{label} of {_e(_fmt(g.get('n_units')))}</div></div>")
    feats = groups.get("features") or {}
    for key, label in (("n_copies", "of them copies of one neuron"),
                       ("n_new", "of them new (not a copy)")):
        if feats.get(key) is not None:
            cells.append(f"<div class=stat><span class=v>{_e(_fmt(feats[key]))}</span>"
                         f"<div class=k>{label}</div></div>")
    for key, label in (("largest_gap_neurons_deg", "largest orientation gap, neurons alone"),
                       ("largest_gap_combined_deg", "largest gap, neurons + new features"),
                       ("n_features_in_neuron_gaps", "new features in neuron gaps")):
        if cov.get(key) is not None:
            unit = "°" if key.endswith("_deg") else ""
            cells.append(f"<div class=stat><span class=v>{_e(_fmt(cov[key]))}{unit}</span>"
                         f"<div class=k>{label}</div></div>")
    return cells


def _census_notes(curves: dict | None) -> str:
    """Notes on the census: the criterion used, the FDR band, the input-block check of nulls."""
    crit = dig(curves, "criterion", default={}) or {}
    note = ""
    if crit.get("used"):
        used = ", ".join(f"{k} {_fmt(v)}" for k, v in crit["used"].items())
        met = crit.get("fdr_target_met")
        note = (f"<p class=note>criterion used: {_e(used)}"
                + (" (tightened to meet the FDR target)" if crit.get("tightened") else "")
                + ("" if met is None else f"; FDR ≤ {_e(_fmt(crit.get('max_fdr'), 2))} "
                   f"{'met' if met else '<b>not met</b>'}") + "</p>")
    seeds = dig(curves, "nulls", "seeds", default={}) or {}
    if seeds.get("held_out"):
        note += (f"<p class=note>thresholds chosen on null seeds {_e(seeds['calibration'])}; "
                 f"every FDR reported on the held-out seeds {_e(seeds['report'])}</p>")
    elif seeds.get("rule"):
        note += f"<p class=note>{_e(seeds['rule'])}</p>"
    band = dig(curves, "band", default={}) or {}
    if band.get("n_points"):
        def rng(k: str) -> str:
            v = band.get(f"{k}_range") or {}
            return f"{_fmt(v.get('min'))}–{_fmt(v.get('max'))}" if v else "–"
        note += (f"<p class=note>across the {band['n_points']} threshold-band points (every "
                 f"criterion moved) with FDR ≤ {_e(_fmt(crit.get('max_fdr'), 2))}: neuron detectors {rng('real')}, "
                 f"largest neuron gap {rng('largest_gap_neurons_deg')}°"
                 + (f", new SAE detectors {rng('n_new')}, new ones in neuron gaps "
                    f"{rng('n_new_in_neuron_gaps')}" if band.get("n_new_range") else "")
                 + "</p>")
    check = dig(curves, "nulls", "input_block_check", default={}) or {}
    if check.get("block"):
        parts = [f"{k} {_fmt(v.get('detected'))}" for k, v in check.items()
                 if isinstance(v, dict)]
        note += (f"<p class=note>curve detectors in the input block {_e(check['block'])} "
                 f"(does each null destroy what it should?): {_e(', '.join(parts))}</p>")
    return note


def _new_features_table(new_recs: list[dict]) -> str:
    """The new (not a copy) feature detectors beside their top decoder neurons; first 24."""
    if not new_recs:
        return ""
    rows_html = "".join(
        f"<tr><td>f{_e(n['feature'])}</td><td>{_e(_fmt(n['preferred_orientation']))}°</td>"
        "<td class=l>" + ", ".join(
            f"n{_e(x['neuron'])} ({_e(_fmt(x['share'], 2))}"
            + (f", detector at {_e(_fmt(x['orientation']))}°" if x.get("is_detector") else "")
            + ")" for x in n["neurons"]) + "</td></tr>" for n in new_recs[:24])
    return ("<div class=scroll><table class=data><tr><th>new feature</th><th>θ*</th>"
            "<th class=l>top decoder neurons (share of norm²)</th></tr>"
            f"{rows_html}</table></div>")


def _census_figures(r: RunRecord, figs: dict[str, str], groups: dict[str, dict]) -> list[tuple]:
    """The census figures of one run that exist, for html_figures."""
    shown = [(figs["coverage"], f"{r.name}: preferred orientations of curve detectors "
              "(neurons red, copies of a neuron grey, new SAE detectors blue; only the neuron "
              "gaps are shaded)", "orientation coverage", "coverage-figure")] \
        if "coverage" in figs else []
    shown += [(figs[k], caption, alt) for k, caption, alt in (
        ("new_features", f"{r.name}: each new feature's σ tuning beside its top neurons'",
         "new features and their neurons"),
        ("threshold_band", f"{r.name}: detections and FDR over the threshold band; gaps "
         "across the FDR band", "threshold band")) if k in figs]
    shown += [(figs[k], f"{r.name}: σ tuning curves of detected {what}", what)
              for k, kind, what in (("tuning_neurons", "neurons", "neurons"),
                                    ("tuning_features", "features", "SAE features"))
              if k in figs and (groups.get(kind) or {}).get("n_detected")]
    return shown


def html_poly(r: RunRecord, neuron_thumbs: dict[int, str], feature_thumbs: dict[int, str],
              neuron_browser: str, limit: int = 12) -> str:
    """The most polysemantic neurons with the SAE features that make them up."""
    out = [f"<h3>{_e(r.name)} <span class=badge>{_e(r.info.layer)}</span></h3>"]
    summ = dig(r.poly, "summary", default={}) or {}
    kt = summ.get("kurtosis") or {}
    if kt:
        rnd = (summ.get("random_dictionary") or {}).get("mean_frac_own_features_more_selective")
        out.append(
            "<p class=note>selectivity = excess kurtosis of what a unit reads (a neuron its "
            "channel, a feature its encoder pre-activation): median neuron "
            f"{_e(_fmt(dig(kt, 'neurons', 'p50'), 3))}, median SAE feature "
            f"{_e(_fmt(dig(kt, 'features', 'p50'), 3))}"
            + (f"; rectified at the neuron's own firing rate, a neuron's own features are "
               f"more selective than it in "
               f"{_pct(summ['mean_frac_own_features_more_selective'])} of cases"
               if summ.get("mean_frac_own_features_more_selective") is not None else "")
            + (f" (a random dictionary: {_pct(rnd)})" if rnd is not None else "")
            + "</p>")
    items = poly_rows(r.poly)[:limit]
    for n in items:
        nid = int(n["neuron"])
        img = neuron_thumbs.get(nid)
        parts = []
        for f in (n.get("features") or [])[:8]:
            fid = int(f["feature"])
            share = f.get("share")
            fimg = feature_thumbs.get(fid)
            bar = (f"<div class=share style='width:{min(max(float(share), 0), 1) * 100:.0f}%'>"
                   "</div>" if isinstance(share, (int, float)) else "")
            parts.append(
                f"<div class=part data-goto='{_e(r.slug)}' data-q='f{fid}' title='open feature "
                f"{fid}'>" + (f"<img src='{_e(fimg)}' alt='feature {fid}'>" if fimg else "")
                + f"<div>f{fid} · share {_e(_fmt(share, 2))}</div>{bar}"
                + f"<div class=note>kurtosis {_e(_fmt(f.get('kurtosis'), 2))}</div></div>")
        out.append(
            f"<div class=poly><div class=neuron data-goto='{_e(neuron_browser)}' data-q='n{nid}' "
            f"title='open neuron {nid}'>" + (f"<img src='{_e(img)}' alt='neuron {nid}'>" if img
                                             else "")
            + f"<div><b>neuron {nid}</b></div><div class=note>kurtosis "
            f"{_e(_fmt(n.get('kurtosis'), 2))} · {_e(_fmt(n.get('n_effective_features'), 2))} "
            f"effective features · R² {_e(_fmt(n.get('r2'), 2))}</div>"
            + f"</div><div class=parts>{''.join(parts) or '<span class=empty>no features</span>'}"
            "</div></div>")
    if not items:
        out.append("<p class=empty>polysemantic.json lists no neurons</p>")
    return "".join(out)


def html_page(title: str, generated: str, sections: list[tuple[str, str, str, str]]) -> str:
    """The whole index.html: static sections plus the browser, whose cards report.js renders.

    sections: (id, short name for the navigation bar, heading, inner HTML).
    """
    nav = "".join(f"<a href='#{sid}'>{_e(short)}</a>" for sid, short, _, _ in sections)
    body = "".join(f"<section id='{sid}'><h2>{_e(name)}</h2>{content}</section>"
                   for sid, _, name, content in sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="assets/report.css">
</head><body>
<header class="top"><h1>{_e(title)}</h1>{nav}<span class="meta">generated {_e(generated)}</span></header>
<main>{body}</main>
<script src="data/report.js"></script>
<script src="assets/report.js"></script>
</body></html>
"""


BROWSER_HTML = """<p class=note>One card per unit: its top-activating dataset patches (exactly the
receptive field of the activating position; a dashed outline means the field was clipped at the
image border and padded grey), a random sample of activating patches, its density, its feature
visualisation and its tuning curve when it is a curve detector. Search by id (<code>12</code>,
<code>f12</code>, <code>n7</code> for features whose decoder loads on neuron 7), or by
<code>curve</code>, <code>dead</code>, <code>ori90</code>.</p>
<div class=controls>
  <select id=browser-select aria-label="dictionary"></select>
  <input id=search type=search placeholder="search: id, curve, n12, dead..." aria-label="search">
  <label>sort <select id=sort>
    <option value=interest>most interesting</option>
    <option value=curve>curve-ness</option>
    <option value=density_desc>density (high first)</option>
    <option value=density_asc>density (low first)</option>
    <option value=max_desc>max activation</option>
    <option value=id>id</option>
  </select></label>
  <span class=count id=count></span>
</div>
<div class=pager id=pager-top></div>
<div class=cards id=cards><p class=empty>loading…</p></div>
<div class=pager id=pager-bottom></div>
"""
