"""The planted positive controls' sensitivity: "the pipeline finds a hidden detector in X of N
plants", per SAE arch, from the `control` records of every run's curves.json under a root
(`make study-controls` writes one folder per plant there).

    python -m sae_vision.report.controls artifacts/controls
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sae_vision.core import write_json, write_text


def control_rows(root: str | Path) -> list[dict]:
    """One row per (plant, SAE run): the plant, whether the neuron census lost the detector,
    the SAE's best census feature for it, and the oracle's label (controls.oracle_record)."""
    rows = []
    for path in sorted(Path(root).glob("*/sae/*/eval/curves.json")):
        res = json.loads(path.read_text())
        ctl = res.get("control")
        if not ctl or ctl.get("kind") != "hidden":
            continue
        metrics = path.parent / "metrics.json"
        m = json.loads(metrics.read_text()) if metrics.exists() else {}
        best, oracle = ctl.get("best_feature") or {}, ctl.get("oracle") or {}
        rows.append({
            "plant": path.parents[3].name, "run": path.parents[1].name, "arch": m.get("arch"),
            "k": (m.get("hparams") or {}).get("k"), "l0": (m.get("reconstruction") or {}).get("l0"),
            "detector": ctl["detector"], "partners": ctl["partners"],
            "orientation_deg": ctl["orientation_deg"],
            "neuron_census_lost": ctl["neuron_census_lost"],
            "gap_at_detector_deg": ctl["gap_at_detector_deg"],
            "found": ctl["found"], "best_feature": best.get("feature"),
            "orientation_diff_deg": best.get("orientation_diff_deg"),
            "corr_battery": best.get("corr_battery"), "class": best.get("class"),
            "weight_class": best.get("weight_class"), "fills_gap": best.get("fills_gap"),
            "found_new_gap_filling": ctl.get("found_new_gap_filling"),
            "best_any_corr": (ctl.get("best_any_feature") or {}).get("corr_battery"),
            # the oracle: the detector's exact direction as one census feature (no SAE)
            "oracle_class": oracle.get("class"), "oracle_fills_gap": oracle.get("fills_gap"),
            "oracle_rho_max": oracle.get("rho_max"),
            "curve_tuned_sep_deg": oracle.get("neighbour_separation_deg"),
        })
    return rows


def regime(row: dict) -> str:
    """A run's SAE and sparsity: "topk k=32" (k: TopK's k, or the L0 that sae.l0_control aims
    at)."""
    return f"{row.get('arch') or '?'}" + (f" k={row['k']}" if row.get("k") is not None else "")


def sensitivity(rows: list[dict]) -> dict:
    """Per regime (arch and k): plants run, plants whose detector the neuron census lost, and of
    those, how many the SAE found (the sensitivity counts only plants that left a real gap);
    `n_oracle`: lost plants whose oracle (the detector's exact direction) the census calls new
    and gap-filling, the most an SAE can score on the verdict; `l0`: the runs' mean measured
    L0."""
    out: dict = {}
    for r in rows:
        s = out.setdefault(regime(r), {"n_plants": 0, "n_lost": 0, "n_found": 0,
                                       "n_found_new_gap_filling": 0, "n_oracle": 0, "l0s": []})
        s["n_plants"] += 1
        if r.get("l0") is not None:
            s["l0s"].append(float(r["l0"]))
        s["n_lost"] += bool(r["neuron_census_lost"])
        s["n_found"] += bool(r["neuron_census_lost"] and r["found"])
        s["n_found_new_gap_filling"] += bool(r["neuron_census_lost"]
                                             and r.get("found_new_gap_filling"))
        s["n_oracle"] += bool(r["neuron_census_lost"] and r.get("oracle_class") == "new"
                              and r.get("oracle_fills_gap"))
    for s in out.values():
        l0s = s.pop("l0s")
        s["l0"] = round(sum(l0s) / len(l0s), 1) if l0s else None
        s["line"] = ((f"at L0 {s['l0']:g}, " if s["l0"] is not None else "")
                     + f"finds a hidden detector in {s['n_found']} of {s['n_lost']} "
                     f"plants the neuron census lost ({s['n_plants']} planted); the census "
                     f"calls it new and gap-filling in {s['n_found_new_gap_filling']} (the "
                     f"oracle, the detector's exact direction: {s['n_oracle']})")
    return out


def _k_of(name: str) -> int:
    try:
        return int(name.split(" k=")[1])
    except (IndexError, ValueError):
        return -1


def rotated_rows(root: str | Path) -> list[dict]:
    """One row per SAE run of a rotated-basis plant: how many of its detected features the weight
    rule and the census's functional class call copies (both against the rotated layer's
    channels, where no feature is axis-aligned), and how many are, by function, copies of an
    original (unrotated) neuron: battery correlation >= controls.FOUND_MIN_CORR."""
    rows = []
    for path in sorted(Path(root).glob("*/sae/*/eval/curves.json")):
        ctl = json.loads(path.read_text()).get("control") or {}
        if ctl.get("kind") != "rotate" or "features" not in ctl:
            continue
        metrics = path.parent / "metrics.json"
        m = json.loads(metrics.read_text()) if metrics.exists() else {}
        rows.append({
            "plant": path.parents[3].name, "run": path.parents[1].name, "arch": m.get("arch"),
            "k": (m.get("hparams") or {}).get("k"),
            "n_features": len(ctl["features"]), "n_weight_copies": ctl["n_weight_copies"],
            "n_census_copies": ctl["n_census_copies"],
            "n_functional_copies": ctl["n_functional_copies"],
            "line": (f"rotated basis: of {len(ctl['features'])} detected features the weight "
                     f"rule calls {ctl['n_weight_copies']} copies; by function "
                     f"{ctl['n_functional_copies']} are copies of an original neuron")})
    return rows


def _markdown(rows: list[dict], sens: dict, rotated: list[dict] = ()) -> str:
    cols = ["plant", "arch", "k", "l0", "detector", "n_channels", "orientation_deg", "neuron_census_lost",
            "curve_tuned_sep_deg", "oracle_rho_max", "oracle_class", "oracle_fills_gap",
            "found", "best_feature", "orientation_diff_deg", "corr_battery", "class",
            "weight_class", "fills_gap", "found_new_gap_filling", "best_any_corr"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("–" if v is None else str(v) for v in (
        {**r, "n_channels": 1 + len(r["partners"])}.get(c) for c in cols)) + " |" for r in rows]
    lines += [""] + [f"- {name}: {s['line']}" for name, s in sorted(
        sens.items(), key=lambda kv: (kv[0].split(" k=")[0], _k_of(kv[0])))]
    lines += [f"- {regime(r)}: {r['line']}" for r in rotated]
    return "\n".join(lines) + "\n"


def write_controls(root: str | Path) -> dict:
    """Write <root>/controls.json and controls.md; return {"rows", "sensitivity", "rotated"}."""
    rows = control_rows(root)
    out = {"rows": rows, "sensitivity": sensitivity(rows), "rotated": rotated_rows(root)}
    write_json(Path(root) / "controls.json", out)
    write_text(Path(root) / "controls.md", _markdown(rows, out["sensitivity"], out["rotated"]))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sae_vision.report.controls ROOT")
    print(_markdown(*write_controls(sys.argv[1]).values()), end="")
