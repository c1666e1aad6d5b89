"""The SAE runs a report covers: their checkpoints, recorded facts and evaluation outputs.

A RunRecord is one run folder as stage=report reads it (sae_vision.report): the SAE, the facts
sae_vision.sae.runs records, and what stage=evaluate wrote beside it (metrics.json, curves.json,
polysemantic.json, figures). The readers below pull what the report shows out of curves.json and
polysemantic.json, tolerant of missing keys (a run may be evaluated without the census).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_vision.core import Config, paths
from sae_vision.sae import runs


@dataclass
class RunRecord:
    """One SAE run as the report sees it: checkpoint, recorded facts and evaluation outputs."""

    run_dir: Path
    name: str
    slug: str
    sae: Any
    meta: dict
    info: runs.RunInfo
    metrics: dict | None
    curves: dict | None
    poly: dict | None
    eval_files: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Finding and loading runs


def slugify(name: str) -> str:
    """A file-name-safe id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def find_runs(cfg: Config) -> list[Path]:
    """The runs to report: those `sae.run` selects, or every run under sae_root."""
    root = paths.sae_root(cfg)
    if not (root.is_dir() and runs.runs_under(root)):
        raise FileNotFoundError(
            f"no SAE runs under {root}: there is nothing to report yet. Train first, e.g. "
            "`python run.py stage=train` (then `stage=evaluate`), or run the whole demo with "
            "`make demo`")
    if cfg.sae.run:
        return runs.resolve_runs(cfg)[0]
    return runs.runs_under(root)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_run(run_dir: Path, cfg: Config) -> RunRecord:
    """Checkpoint, recorded facts and every evaluation output of one run."""
    from sae_vision.activations import load_cache_meta
    from sae_vision.sae import load_sae

    sae, meta = load_sae(run_dir)
    info = runs.run_info(run_dir, sae, meta, cfg)
    info = runs.run_info(run_dir, sae, meta, cfg, load_cache_meta(info.cache_dir))
    ev = run_dir / runs.EVAL_DIR
    files = {p.name: p for p in sorted(ev.glob("*")) if p.is_file()} if ev.is_dir() else {}
    return RunRecord(run_dir=run_dir, name=run_dir.name, slug=slugify(run_dir.name), sae=sae.eval(),
                     meta=meta, info=info, metrics=_read_json(ev / "metrics.json"),
                     curves=_read_json(ev / "curves.json"), poly=_read_json(ev / "polysemantic.json"),
                     eval_files=files)


def load_runs(run_dirs: list[Path], cfg: Config,
              skipped: list[tuple[Path, str]] | None = None) -> list[RunRecord]:
    """Every readable run; a run that cannot be read, whatever the cause, is skipped with a
    warning (and added to `skipped` as (run folder, why)), not the whole report."""
    records = []
    for d in run_dirs:
        try:
            records.append(load_run(d, cfg))
        except Exception as e:  # noqa: BLE001 - any unreadable run is skipped, never the report
            skip(d, f"{type(e).__name__}: {e}", skipped)
    if not records:
        raise ValueError(f"none of the {len(run_dirs)} run(s) could be read (see the warnings "
                         "above); retrain them with stage=train")
    return records


def skip(run_dir: Path, why: str, skipped: list[tuple[Path, str]] | None) -> None:
    """Warn that a run is left out of the report, and why; remember it for the page."""
    print(f"warning: skipping run {run_dir}: {why}", file=sys.stderr)
    if skipped is not None:
        skipped.append((run_dir, why))


# --------------------------------------------------------------------------------------------
# Reading curves.json and polysemantic.json (written by sae_vision.census.curves through evaluate)


def dig(d: Any, *keys, default=None):
    """d[k1][k2]... or default; tolerant of missing levels."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def census_groups(curves: dict | None) -> dict[str, dict]:
    """{"neurons": group, "features": group} of curves.json (n_units, n_detected, fdr, detected)."""
    return {kind: curves[kind] for kind in ("neurons", "features")
            if isinstance(curves, dict) and isinstance(curves.get(kind), dict)}


def group_fdr(g: dict):
    """The estimated FDR of a census group (its worst null), or None."""
    fdr = g.get("fdr")
    return fdr.get("fdr") if isinstance(fdr, dict) else fdr


def novelty_cells(curves: dict | None) -> dict:
    """The findings table's cells that only curves.json holds: the functional rule's shifted
    copies and gap fillers, the weight rule's counts beside them, the largest gap with all /
    copies / gap-filling features, and the neurons' FDR with its 95% upper bound."""
    f = dig(curves, "features", default={}) or {}
    fn = f.get("functional") or {}
    fdr = dig(curves, "neurons", "fdr", default={}) or {}
    return {"shifted_copies": f.get("n_shifted_copies"), "fills_gap": f.get("n_fills_gap"),
            "weight_copies": f.get("n_weight_copies"), "weight_new": f.get("n_weight_new"),
            "new_fdr_upper95": f.get("new_fdr_random_directions_upper95"),
            "largest_gap_with_all_deg": fn.get("largest_gap_neurons_plus_all_deg"),
            "largest_gap_with_copies_deg": fn.get("largest_gap_neurons_plus_copies_deg"),
            "largest_gap_with_fillers_deg": fn.get("largest_gap_neurons_plus_gap_fillers_deg"),
            "neuron_fdr": fdr.get("fdr"), "neuron_fdr_upper95": fdr.get("fdr_upper95")}


def curve_units(curves: dict | None, kind: str) -> dict[int, dict]:
    """unit -> {o: preferred orientation, cv: curve-ness, cd, ps: peak σ, w: width, tc: tuning}.

    Curve-ness is the curve/line response ratio of a detected unit; the tuning curve (σ units
    over curves.json's `orientations`) is used when the census records one per unit.
    """
    g = census_groups(curves).get(kind) or {}
    out: dict[int, dict] = {}
    for d in g.get("detected") or []:
        uid = d.get("unit")
        if not isinstance(uid, (int, float)):
            continue
        out[int(uid)] = {"o": d.get("preferred_orientation"), "cv": d.get("curve_line_ratio"),
                         "cd": True, "ps": d.get("peak_sigma"), "w": d.get("tuning_width_deg"),
                         "tc": d.get("tuning_sigma", d.get("tuning"))}
    return out


def tuning_angles(curves: dict | None) -> list[float] | None:
    """The orientation grid of per-unit tuning curves, if curves.json records one."""
    return dig(curves, "tuning_orientations") or dig(curves, "orientations")


def curve_files(r: RunRecord) -> dict[str, Path]:
    """Figures the census wrote (coverage, tuning_neurons, tuning_features, ...) that exist."""
    files = dig(r.curves, "files", default={}) or {}
    out = {}
    for name, p in files.items():
        if not isinstance(p, str) or not p.endswith(".png"):
            continue
        path = Path(p)
        if not path.is_file():  # the run folder may have moved: look beside curves.json
            path = r.run_dir / runs.EVAL_DIR / path.name
        if path.is_file():
            out[name] = path
    return out


def poly_rows(poly: dict | None) -> list[dict]:
    """The most polysemantic neurons of polysemantic.json, most polysemantic first."""
    return list(dig(poly, "most_polysemantic") or [])
