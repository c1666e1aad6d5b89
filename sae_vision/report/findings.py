"""The study's findings table: one row per evaluated run answering its question.

Copies of neurons against new curve detectors (the functional rule of
sae_vision.census.novelty, with the weight-share rule's counts beside it), orientation gaps, the
neurons' FDR with its 95% upper bound, and selectivity of features against their neurons; stage=report writes it beside the report as findings.json and
findings.md (the README table of `make study`) and logs the Markdown.
"""

from __future__ import annotations

from pathlib import Path

from sae_vision.core import write_json, write_text

from .records import RunRecord, dig, novelty_cells

FINDINGS_COLUMNS = (
    ("arch", "arch"), ("n_features", "F"), ("l0", "L0"), ("fvu", "FVU"),
    ("fvu_neuron_topk", "FVU, top-L0 neurons"), ("neuron_gain", "SAE gain over neurons"),
    ("frac_recovered_zero", "splice KL recovered"), ("epochs", "epochs"),
    ("loss_flatness", "loss drop, end of full-lr phase"),
    ("loss_decay_gain", "loss drop, lr decay"), ("curve_features", "curve features"),
    ("neuron_fdr", "neuron FDR"), ("neuron_fdr_upper95", "…95% upper bound"),
    ("copies", "copies (functional)"), ("shifted_copies", "…of them shifted copies"),
    ("new", "new (functional)"), ("weight_copies", "copies, weight-share rule"),
    ("weight_new", "new, weight-share rule"), ("new_fdr", "new: random-dir. FDR"),
    ("new_fdr_upper95", "…95% upper bound"),
    ("new_in_neuron_gaps", "new in neuron gaps"),
    ("new_in_gaps_uncovered", "…not covered by a curve-tuned top neuron"),
    ("fills_gap", "new filling a gap (clear of curve-tuned neurons)"),
    ("largest_gap_neurons_deg", "largest gap, neurons"),
    ("largest_gap_with_all_deg", "largest gap, neurons + all curve features"),
    ("largest_gap_with_copies_deg", "largest gap, neurons + copies"),
    ("largest_gap_with_new_deg", "largest gap, neurons + new"),
    ("largest_gap_with_fillers_deg", "largest gap, neurons + gap fillers"),
    ("largest_gap_curve_tuned_deg", "largest gap, curve-tuned neurons (criteria 1-3)"),
    ("frac_more_selective", "features more selective than their neuron"),
    ("frac_more_selective_random", "same, random dictionary"),
    ("n_neurons_split", "neurons split into ≥ 2 features"),
    ("frac_more_selective_split", "…their features more selective"),
    ("frac_more_selective_single", "…same, neurons with one feature (copies)"),
    ("controls", "planted hidden detectors found new and gap-filling (same arch and k)"),
)


def load_controls(root: str | Path | None) -> dict | None:
    """The planted controls (`make study-controls` writes <root>/controls.json), or None."""
    if not root:
        return None
    path = Path(root) / "controls.json"
    if not path.is_file():
        return None
    import json

    return json.loads(path.read_text())


def _controls_cell(row: dict, controls: dict | None) -> str | None:
    from .controls import regime

    s = ((controls or {}).get("sensitivity") or {}).get(regime(row))
    return None if s is None else f"{s['n_found_new_gap_filling']}/{s['n_lost']}"


def findings_rows(records: list[RunRecord], controls: dict | None = None) -> list[dict]:
    """One row per evaluated run with the study's answer: copies vs new detectors, gaps,
    selectivity (the README table of `make study`), and, given the planted controls
    (`load_controls`), their sensitivity at the run's arch and k."""
    from sae_vision.evaluate import summary_row

    rows = []
    for r in records:
        if not r.metrics:
            continue
        row = summary_row(r.metrics)
        row["epochs"] = (r.metrics.get("training") or {}).get("epochs")
        row["k"] = (r.metrics.get("hparams") or {}).get("k")
        row.update(novelty_cells(r.curves))
        if r.poly and r.poly.get("neurons"):
            from sae_vision.census import split_selectivity

            row.update(split_selectivity(r.poly["neurons"]))
        band = dig(r.metrics, "curves", "band", default={}) or {}
        for k in ("n_new_in_neuron_gaps_range", "largest_gap_neurons_deg_range",
                  "largest_gap_neurons_plus_new_deg_range", "n_new_range"):
            row[f"band_{k}"] = band.get(k)
        row["band_n_points"] = band.get("n_points")
        row["run"] = r.name
        row["controls"] = _controls_cell(row, controls)
        rows.append(row)
    return sorted(rows, key=lambda x: (str(x.get("arch")), x.get("n_features") or 0))


def findings_markdown(rows: list[dict], controls: dict | None = None) -> str:
    """The findings rows as a Markdown table (percentages for fractions; "–" where there is no
    number, e.g. an FDR of 0/0), then the planted controls' sensitivity lines, if given."""
    def cell(key: str, v) -> str:
        if v is None:
            return "–"
        if key in ("frac_recovered_zero", "frac_more_selective", "frac_more_selective_random",
                   "loss_flatness", "loss_decay_gain", "frac_more_selective_split",
                   "frac_more_selective_single"):
            return f"{100 * v:.1f}%"
        if key.endswith("_deg"):
            return f"{v:.0f}°"
        if isinstance(v, float):
            return f"{v:.3g}" if key != "l0" else f"{v:.1f}"
        return str(v)

    head = "| " + " | ".join(label for _, label in FINDINGS_COLUMNS) + " |"
    sep = "|" + "---|" * len(FINDINGS_COLUMNS)
    body = ["| " + " | ".join(cell(k, r.get(k)) for k, _ in FINDINGS_COLUMNS) + " |"
            for r in rows]
    tail = []
    if controls:
        tail = ["", "Planted positive controls (`make study-controls`): the pipeline, run on a "
                "layer where a census detector exists only as a mixture of channels,"]
        tail += [f"- {name}: {s['line']}" for name, s in sorted(
            (controls.get("sensitivity") or {}).items())]
        tail += [f"- {r['arch']} k={r['k']}: {r['line']}" for r in controls.get("rotated") or []]
    return "\n".join([head, sep, *body, *tail]) + "\n"


def write_findings(records: list[RunRecord], out: Path,
                   controls: dict | None = None) -> list[Path]:
    """findings.json and findings.md beside the report (nothing when no run is evaluated)."""
    rows = findings_rows(records, controls)
    if not rows:
        return []
    json_path, md_path = out / "findings.json", out / "findings.md"
    write_json(json_path, {"columns": [k for k, _ in FINDINGS_COLUMNS], "rows": rows,
                           "controls": (controls or {}).get("sensitivity"),
                           "controls_rotated": (controls or {}).get("rotated")})
    write_text(md_path, findings_markdown(rows, controls))
    return [json_path, md_path]
