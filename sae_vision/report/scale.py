"""The data-scale curve: the study's count (new census features, new gap-filling detectors, the
fraction of features more selective than their neuron) at several data scales, one folder per
scale under a root (`make study-scale` writes them), so that the table shows which way the
answer moves with more data.

    python -m sae_vision.report.scale artifacts/study-scale

Each row is one evaluated SAE run: `<root>/<scale>/sae/<run>/eval/{metrics,curves,
polysemantic}.json`, with the size of the data from the run's cache (`<root>/<scale>/cache/
<key>/metadata.json`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sae_vision.core import write_json, write_text

# (key, column label) of scale.md, in order; scale.json holds every key of a row.
SCALE_COLUMNS = (
    ("scale", "scale"), ("arch", "arch"), ("n_features", "F"), ("n_photos", "photos"),
    ("views", "views"), ("positions", "positions / image"), ("n_vectors", "vectors"),
    ("n_train_vectors", "training vectors"), ("epochs", "epochs"), ("l0", "L0"), ("fvu", "FVU"),
    ("n_neuron_detectors", "census neurons"), ("curve_features", "census features"),
    ("copies", "copies"), ("new", "new"), ("fills_gap", "new, gap-filling"),
    ("frac_more_selective", "more selective than their neuron"),
    ("frac_more_selective_random", "same, random dictionary"),
)
# The counts whose direction with data the trend lines give.
TREND_KEYS = (("new", "new"), ("fills_gap", "new gap-filling"),
              ("frac_more_selective", "more selective"))


def _read(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _cache_meta(scale_dir: Path, metrics: dict) -> dict:
    """The run's cache metadata, found by its key inside the scale folder (the recorded
    cache_dir may be relative to where the run was started)."""
    key = _get(metrics, "eval_data", "key") or Path(str(metrics.get("cache_dir") or "")).name
    if key:
        meta = _read(scale_dir / "cache" / key / "metadata.json")
        if meta:
            return meta
    metas = [_read(p) for p in sorted(scale_dir.glob("cache/*/metadata.json"))]
    return metas[0] if len(metas) == 1 else {}


def _data_size(meta: dict, holdout: list) -> dict:
    """Photos, views, positions per image and vectors (all, and the training shards') of a
    cache."""
    data = meta.get("data") or {}
    views = int(data.get("views") or 1)
    shards = meta.get("shards") or []
    n_img = meta.get("n_images")
    return {"n_images": n_img, "views": views,
            "n_photos": n_img // views if isinstance(n_img, int) else None,
            "sampling": meta.get("sampling"),
            "positions": ("all" if meta.get("sampling") == "all" else meta.get("n_per_image")),
            "n_vectors": meta.get("n_vectors"),
            "n_train_vectors": (sum(s.get("n_vectors", 0) for s in shards
                                    if s.get("name") not in set(holdout or []))
                                if shards else None)}


def scale_row(scale_dir: Path, eval_dir: Path) -> dict:
    """One row: the run's arch, size of its data, and the study's count from its eval files."""
    m = _read(eval_dir / "metrics.json")
    curves, poly = _read(eval_dir / "curves.json"), _read(eval_dir / "polysemantic.json")
    feats, summary = curves.get("features") or {}, poly.get("summary") or {}
    row = {"scale": scale_dir.name, "run": eval_dir.parent.name, "arch": m.get("arch"),
           "n_features": m.get("n_features"), "l0": _get(m, "reconstruction", "l0"),
           "fvu": _get(m, "reconstruction", "fvu"),
           "vectors_seen": _get(m, "training", "n_vectors_seen"),
           "epochs": _get(m, "training", "epochs")}
    row.update(_data_size(_cache_meta(scale_dir, m), m.get("holdout_shards") or []))
    more = summary.get("mean_frac_own_features_more_selective",
                       _get(m, "polysemantic", "frac_more_selective"))
    rnd = _get(summary, "random_dictionary", "mean_frac_own_features_more_selective")
    row.update({
        "n_neuron_detectors": _get(curves, "neurons", "n_detected"),
        "curve_features": feats.get("n_detected"), "copies": feats.get("n_copies"),
        "new": feats.get("n_new"), "fills_gap": feats.get("n_fills_gap"),
        "fills_gap_features": _get(feats, "functional", "fills_gap"),
        "frac_more_selective": more,
        "frac_more_selective_random": (rnd if rnd is not None else
                                       _get(m, "polysemantic", "frac_more_selective_random")),
    })
    return row


def scale_rows(root: str | Path) -> list[dict]:
    """Every evaluated run under <root>/<scale>/sae/, smallest data first (training vectors,
    then photos), then by arch."""
    rows = [scale_row(p.parents[3], p.parent)
            for p in sorted(Path(root).glob("*/sae/*/eval/metrics.json"))]
    return sorted(rows, key=lambda r: (r["n_train_vectors"] or 0, r["n_photos"] or 0,
                                       r["scale"], str(r["arch"]), r["n_features"] or 0))


def trends(rows: list[dict]) -> dict:
    """Per arch: each count over the scales in the rows' order (smallest data first), and a
    line saying which way it moves."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["arch"] or "?", []).append(r)
    lines = {}
    for arch, rs in out.items():
        parts = []
        for key, label in TREND_KEYS:
            vals = [r.get(key) for r in rs]
            parts.append(f"{label} {' → '.join(_cell(key, v) for v in vals)} "
                         f"({direction(vals)})")
        scales = " → ".join(f"{r['scale']} ({_cell('n_train_vectors', r['n_train_vectors'])})"
                            for r in rs)
        lines[arch] = {"scales": [r["scale"] for r in rs],
                       **{key: [r.get(key) for r in rs] for key, _ in TREND_KEYS},
                       "line": f"{scales}: " + "; ".join(parts)}
    return lines


def direction(values: list) -> str:
    """up, down or flat from the first to the last known value; "–" with fewer than two."""
    known = [v for v in values if v is not None]
    if len(known) < 2:
        return "–"
    return "up" if known[-1] > known[0] else "down" if known[-1] < known[0] else "flat"


def _cell(key: str, v) -> str:
    if v is None:
        return "–"
    if key.startswith("frac_"):
        return f"{100 * v:.1f}%"
    if key in ("n_vectors", "n_train_vectors") and isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.1f}" if key in ("l0", "epochs") else f"{v:.3g}"
    return str(v)


def scale_markdown(rows: list[dict], trend: dict) -> str:
    """The rows as a Markdown table, then one trend line per arch."""
    lines = ["| " + " | ".join(label for _, label in SCALE_COLUMNS) + " |",
             "|" + "---|" * len(SCALE_COLUMNS)]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in SCALE_COLUMNS) + " |"
              for r in rows]
    lines += [""] + [f"- {arch}: {t['line']}" for arch, t in sorted(trend.items())]
    return "\n".join(lines) + "\n"


def write_scale(root: str | Path) -> dict:
    """Write <root>/scale.json and scale.md; return {"columns", "rows", "trends"}."""
    rows = scale_rows(root)
    if not rows:
        raise FileNotFoundError(f"no evaluated runs under {root}/*/sae/*/eval/: run "
                                "`make study-scale` (or its cache, train and evaluate stages)")
    out = {"columns": [k for k, _ in SCALE_COLUMNS], "rows": rows, "trends": trends(rows)}
    write_json(Path(root) / "scale.json", out)
    write_text(Path(root) / "scale.md", scale_markdown(rows, out["trends"]))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sae_vision.report.scale ROOT")
    try:
        res = write_scale(sys.argv[1])
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(scale_markdown(res["rows"], res["trends"]), end="")
