"""Stage `report`: everything the study produced, in one static folder that opens from file://.

`python run.py stage=report` reads every SAE run under artifacts/sae (or those chosen by
`sae.run`), the evaluation outputs beside them, and the activation caches they were trained on,
and writes artifacts/report/:

    index.html          summary table, frontier figures, curve census + coverage, polysemantic
                        neurons, and a feature browser (card per feature; search, sort, pages)
    assets/             report.js / report.css (copied from sae_vision/report/assets)
    data/report.js      the page's index of browsers (window.REPORT)
    data/browser-*.js   one per SAE run and one per layer of neurons; loaded on demand with a
                        <script> tag, because fetch() is refused on file:// pages
    figures/            copies of the evaluation figures
    crops/<cache key>/  receptive-field thumbnails of dataset examples, one per distinct position
    featurevis/<id>/    Lucent feature visualisations (report.featurevis=true)

It also writes artifacts/reproduce.json, the manifest of what was run and where it landed.
Dataset examples for every run of a layer and for its neurons come from ONE pass over the cache.

This module is the stage itself (and the manifest); the runs it reads are sae_vision.report.records,
the browser data sae_vision.report.browser, the HTML sae_vision.report.pages and the findings table
sae_vision.findings.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_vision.activations import stage_device
from sae_vision.core import (
    Config,
    Tracker,
    copy_file,
    disabled,
    io,
    paths,
    to_json,
    to_plain,
    uses_l1_coeff,
    write_json,
    write_text,
)
from sae_vision.sae import runs

from .browser import layer_browsers, write_js
from .findings import findings_markdown, findings_rows, load_controls, write_findings
from .pages import BROWSER_HTML, html_census, html_figures, html_page, html_poly, html_summary
from .records import (
    RunRecord,
    census_groups,
    curve_files,
    dig,
    find_runs,
    group_fdr,
    load_runs,
    skip,
    slugify,
)

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).with_name("assets")
PAGE_SIZE = 48  # cards per browser page


@dataclass(frozen=True)
class ReportResult:
    """Where the report and the manifest are, and what went into them."""

    report_dir: str
    index_path: str
    manifest_path: str
    runs: tuple[str, ...]
    n_cards: int
    files: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# The page's tables and figures


def summary_rows(records: list[RunRecord]) -> list[dict]:
    """One table row per run (evaluation numbers where evaluate has run)."""
    from sae_vision.evaluate import summary_row

    rows = []
    for r in records:
        if r.metrics:
            row = summary_row(r.metrics)
        else:
            hp = r.info.hparams
            uses_l1 = uses_l1_coeff(r.info.arch)
            row = {"run": r.name, "layer": r.info.layer, "arch": r.info.arch,
                   "n_features": r.info.n_features, "l1_coeff": hp.get("l1_coeff") if uses_l1 else None,
                   "k": None if uses_l1 else hp.get("k")}
        row["run"], row["browser"], row["evaluated"] = r.name, r.slug, bool(r.metrics)
        rows.append(row)
    return sorted(rows, key=lambda r: (str(r.get("layer")), str(r.get("arch")),
                                       r.get("l0") if r.get("l0") is not None else math.inf))


def copy_figure(src: str | Path | None, fig_dir: Path, name: str) -> str | None:
    """Copy a figure into the report; returns its path relative to the report folder."""
    if not src or not Path(src).is_file():
        return None
    fig_dir.mkdir(parents=True, exist_ok=True)
    dst = fig_dir / f"{slugify(name)}{Path(src).suffix}"
    copy_file(src, dst)
    return f"{fig_dir.name}/{dst.name}"


def _static_sections(records: list[RunRecord], rows: list[dict], thumbs: dict[str, dict],
                     neuron_browser: dict[str, str], fig_dir: Path
                     ) -> tuple[list[tuple], list[str], list[dict]]:
    """The page's sections, the figures they show (relative paths) and the census table rows."""
    from sae_vision.core import plots
    from sae_vision.evaluate import summary_row

    metric_rows = [summary_row(r.metrics) for r in records if r.metrics]
    frontier = []
    for y_key, label in (("fvu", "FVU"), ("kl_sae", "splice KL (nats)")):
        path = fig_dir / f"frontier_l0_{y_key}.png"
        if metric_rows and plots.plot_frontier(metric_rows, y_key, label, path) is not None:
            frontier.append((f"{fig_dir.name}/{path.name}",
                             f"L0 against {label}, every evaluated run", f"frontier {label}"))
    density = [(rel, f"{r.name}: log10 feature density", "density histogram") for r in records
               if (rel := copy_figure(r.eval_files.get("density_hist.png"), fig_dir,
                                      f"density-{r.slug}"))]
    census_html, census_figs, census_rows = [], [], []
    for r in records:
        if not r.curves:
            continue
        figs = {name: rel for name, p in curve_files(r).items()
                if (rel := copy_figure(p, fig_dir, f"{name}-{r.slug}"))}
        census_figs += list(figs.values())
        census_html.append(html_census(r, figs))
        for kind, g in census_groups(r.curves).items():
            census_rows.append({"run": r.name, "layer": r.info.layer, "units": kind,
                                "n_units": g.get("n_units"), "n_detected": g.get("n_detected"),
                                "fdr": group_fdr(g)})
    poly_html = []
    for r in records:
        if r.poly:
            nb = neuron_browser[str(r.info.cache_dir)]
            poly_html.append(html_poly(r, thumbs.get(nb, {}), thumbs.get(r.slug, {}), nb))
    sections = [
        ("summary", "Runs", "Runs", html_summary(rows) + html_figures(density, "density-figure")),
        ("frontier", "Frontier", "Sparsity–fidelity frontier",
         html_figures(frontier, "frontier-figure")
         or "<p class=empty>no evaluated runs yet: run <code>python run.py stage=evaluate "
         "sae.run='glob(*)'</code></p>"),
        ("curves", "Curve detectors", "Curve detectors: census and orientation coverage",
         "".join(census_html) or "<p class=empty>no curve census yet: run <code>stage=evaluate "
         "eval.curves=true</code></p>"),
        ("polysemantic", "Polysemantic neurons",
         "Polysemantic neurons and the features that split them",
         "".join(poly_html) or "<p class=empty>no decompositions yet: run <code>stage=evaluate "
         "eval.polysemantic=true</code></p>"),
        ("browser", "Feature browser", "Feature browser", BROWSER_HTML),
    ]
    figures = [f[0] for f in frontier + density] + census_figs
    return sections, figures, census_rows


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, tracker: Tracker | None = None) -> ReportResult:
    """Build artifacts/report/ (index.html + data) and artifacts/reproduce.json.

    The new report is written whole into a staging folder beside the old one and only then
    swapped in (see swap_in): a failure at any point, a full disk included, leaves the previous
    report as it was."""
    tracker = tracker or disabled()
    t0 = time.perf_counter()
    run_dirs = find_runs(cfg)
    out = paths.report_dir(cfg)
    device = stage_device("report", cfg.model.device, "model.device")
    if out.is_mount():
        raise ValueError(f"the report folder {out} is a mount point: stage=report builds the new "
                         "report beside it and swaps it in, which needs it on its parent's file "
                         "system; mount its parent instead, or point paths.root elsewhere")
    with io.hold_lock(out.with_name(f"{out.name}.lock"), _busy(out)):
        recover(out)
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
            built = _build(cfg, run_dirs, staging, out, device)
            swap_in(staging, out)
        except BaseException as e:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in io.DISK_FULL:
                raise ValueError(
                    f"no space left while writing the report to {out} ({e}); the previous "
                    "report is kept as it was: free space (or point paths.root elsewhere) and "
                    "rerun stage=report") from e
            raise
    records, rows, browsers, findings = built.records, built.rows, built.browsers, built.findings
    n_cards = sum(b["n_units"] for b in browsers)
    index = out / "index.html"

    # Tracker: the tables and the figures, from the report now in place.
    tracker.log_table("report/summary", [to_json(r) for r in rows])
    if built.census_rows:
        tracker.log_table("report/curve_census", to_json(built.census_rows))
    for rel in built.figures:
        tracker.log_image(f"report/{Path(rel).stem}", out / rel)
    manifest_path = write_manifest(cfg, records, built.caches, out, index)
    tracker.summary({"report/n_runs": len(records), "report/n_cards": n_cards})
    if findings:
        controls = load_controls(cfg.report.controls)
        tracker.log_table("report/findings", to_json(findings_rows(records, controls)))
        logger.info(findings_markdown(findings_rows(records, controls), controls))
    written = [index, out / "data" / "report.js", manifest_path, *(out / f for f in findings)]
    for p in written:
        logger.info(f"[report] wrote {p}")
    logger.info(f"[report] {len(browsers)} browsers, {n_cards} cards, "
                f"{time.perf_counter() - t0:.1f} s; open {index.resolve().as_uri()}")
    return ReportResult(report_dir=str(out), index_path=str(index),
                        manifest_path=str(manifest_path), runs=tuple(r.name for r in records),
                        n_cards=n_cards, files=tuple(str(p) for p in written))


@dataclass
class _Built:
    """What _build wrote into the staging folder (paths relative to it)."""

    records: list[RunRecord]
    rows: list[dict]  # the summary table
    browsers: list[dict]  # data/report.js's index of browsers
    caches: list[dict]  # the caches, for the manifest
    figures: list[str]
    census_rows: list[dict]
    findings: list[Path]


def _build(cfg: Config, run_dirs: list[Path], stage: Path, out: Path,
           device: torch.device) -> _Built:
    """The whole report written into `stage` (which becomes `out`); its paths relative to it."""
    fig_dir = _fresh_folders(stage, out)
    skipped: list[tuple[Path, str]] = []
    records = sorted(load_runs(run_dirs, cfg, skipped), key=_order)
    browsers, caches_manifest, thumbs, neuron_browser = _write_browsers(cfg, records, stage,
                                                                        device, skipped)
    records = [r for r in records if r.run_dir not in {d for d, _ in skipped}]
    if not records:
        raise ValueError(f"none of the {len(run_dirs)} run(s) could be read (see the warnings "
                         "above); retrain them with stage=train, or repair their caches")
    logger.info(f"[report] {len(records)} run(s): {', '.join(r.name for r in records)}")
    rows = summary_rows(records)
    sections, figures, census_rows = _static_sections(records, rows, thumbs, neuron_browser,
                                                      fig_dir)
    if skipped:  # the page says what it left out, and why
        key, nav, title_, body = sections[0]
        sections[0] = (key, nav, title_, body + html_skipped(skipped))
    generated = time.strftime("%Y-%m-%d %H:%M")
    title = f"sae-vision report{' · ' + cfg.experiment if cfg.experiment else ''}"
    write_js(stage / "data" / "report.js", "REPORT", None, {
        "generated": generated, "page_size": PAGE_SIZE, "browsers": browsers,
        "runs": [{k: v for k, v in row.items()} for row in rows]})
    write_text(stage / "index.html", html_page(title, generated, sections))
    controls = load_controls(cfg.report.controls)
    if cfg.report.controls and controls is None:
        logger.warning(f"report.controls={cfg.report.controls}: no controls.json there (make "
                       "study-controls writes it); the findings go without the controls")
    findings = [p.relative_to(stage) for p in write_findings(records, stage, controls)]
    return _Built(records, rows, browsers, caches_manifest, figures, census_rows, findings)


def _busy(out: Path):
    def busy(holder: str) -> ValueError:
        return ValueError(f"the report {out} is being built by another live process ({holder}); "
                          "wait for it to finish, then rerun stage=report")
    return busy


def recover(out: Path) -> None:
    """Clear what a killed report run left beside `out` (called with the report lock held).

    A run killed between swap_in's two renames leaves no `out` and the previous report aside as
    .<name>.old-*: it is put back. Half-built .<name>.partial-* folders are removed."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds and not out.exists():
        olds.pop().rename(out)
        logger.warning(f"[report] put back the previous report {out}, left aside by a run that "
                       "was stopped while swapping in its new one")
    for p in [*olds, *out.parent.glob(f".{out.name}.partial-*")]:
        shutil.rmtree(p, ignore_errors=True)


def swap_in(staging: Path, out: Path) -> None:
    """Replace `out` with the complete report in `staging` (same file system): rename the old one
    aside, rename the new one into place, then delete the old one. At every moment one intact
    report exists: `out`, or (killed between the renames) .<name>.old-*, which recover() puts
    back."""
    old = out.with_name(f".{out.name}.old-{time.time_ns()}")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _fresh_folders(stage: Path, out: Path) -> Path:
    """The staging folder with assets/ copied and figures/ made; returns figures/.

    crops/ and featurevis/ are carried over from the current report `out`, hard-linked where the
    file system allows (their files are content-keyed, and replaced only by a rename)."""
    for sub in ("crops", "featurevis"):
        for f in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else ():
            if f.is_file() and not f.is_symlink():
                dst = stage / f.relative_to(out)
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, dst)
                except OSError:  # no hard links here: a copy
                    shutil.copyfile(f, dst)
    (stage / "assets").mkdir()
    for f in sorted(ASSETS_DIR.iterdir()):  # one by one: copytree would hide a full disk's errno
        shutil.copyfile(f, stage / "assets" / f.name)
    fig_dir = stage / "figures"
    fig_dir.mkdir()
    return fig_dir


def html_skipped(skipped: list[tuple[Path, str]]) -> str:
    """The runs the report could not read, each with the reason."""
    items = "".join(f"<li><code>{html.escape(str(d))}</code>: {html.escape(why)}</li>"
                    for d, why in skipped)
    return f"<div class=skipped><p>Skipped {len(skipped)} run(s) that could not be read:</p>" \
           f"<ul>{items}</ul></div>"


def _write_browsers(cfg: Config, records: list[RunRecord], out: Path, device: torch.device,
                    skipped: list[tuple[Path, str]] | None = None
                    ) -> tuple[list[dict], list[dict], dict[str, dict[int, str]], dict[str, str]]:
    """Every browser's data script, one activation cache at a time (its neurons and its runs).

    Returns the browsers' index for data/report.js, the caches for the manifest, each browser's
    thumbnails (browser id -> unit -> a top-example crop path) and each cache's neuron browser
    (cache dir -> browser id). The runs of a cache that cannot be read are added to `skipped`.
    """
    by_cache: dict[str, list[RunRecord]] = {}
    for r in records:
        by_cache.setdefault(str(r.info.cache_dir), []).append(r)

    browsers: list[dict] = []
    caches_manifest: list[dict] = []
    thumbs: dict[str, dict[int, str]] = {}
    neuron_browser: dict[str, str] = {}
    model_cache: dict[str, Any] = {}
    layers = [rs[0].info.layer for rs in by_cache.values()]
    for cache_dir, recs in by_cache.items():
        try:
            done = _cache_browsers(cfg, cache_dir, recs, out, device, model_cache,
                                   layers.count(recs[0].info.layer) > 1)
        except Exception as e:  # noqa: BLE001 - an unreadable cache skips its runs, not the page
            if isinstance(e, OSError) and e.errno in io.DISK_FULL:
                raise  # the report's own disk is full: no run can be written
            for r in recs:
                skip(r.run_dir, f"its cache {cache_dir} cannot be read ({type(e).__name__}: {e})",
                     skipped)
            continue
        manifest, neuron_id, built = done
        caches_manifest.append(manifest)
        neuron_browser[cache_dir] = neuron_id
        for data in built:
            write_js(out / "data" / f"browser-{data['id']}.js", "REPORT_DATA", data["id"], data)
            browsers.append({"id": data["id"], "label": data["label"], "kind": data["kind"],
                             "file": f"data/browser-{data['id']}.js",
                             "n_units": len(data["units"])})
            thumbs[data["id"]] = {u["i"]: data["crop_dir"] + data["crops"][u["top"][0][0]][0]
                                  for u in data["units"] if u.get("top")}
    return browsers, caches_manifest, thumbs, neuron_browser


def _cache_browsers(cfg: Config, cache_dir: str, recs: list[RunRecord], out: Path,
                    device: torch.device, model_cache: dict, shared_layer: bool
                    ) -> tuple[dict, str, list[dict]]:
    """One cache's manifest entry, neuron browser id and browsers' data (all read before any
    is written, so a cache that fails midway leaves nothing half-listed)."""
    from sae_vision.activations import load_cache_meta

    cache_meta = load_cache_meta(cache_dir)
    layer = recs[0].info.layer
    key = cache_meta.get("key") or Path(cache_dir).name
    manifest = {"dir": cache_dir, "key": key, "layer": layer,
                "n_vectors": cache_meta.get("n_vectors"), "n_images": cache_meta.get("n_images"),
                "model": cache_meta.get("model"), "weights_sha256": cache_meta.get("weights_sha256")}
    # Two caches of one layer (e.g. different data) each get their own neuron browser.
    neuron_id = slugify(f"neurons-{layer}" + (f"-{key}" if shared_layer else ""))
    built = list(layer_browsers(cfg, cache_dir, cache_meta, recs, neuron_id, out, device,
                                model_cache))
    return manifest, neuron_id, built


def _natural(name: str) -> list:
    """Sort key that puts k8 before k32."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _order(r: RunRecord) -> tuple:
    """Runs in table order: layer, architecture, then sparsity (L0 when evaluated)."""
    l0 = dig(r.metrics, "reconstruction", "l0")
    return (r.info.layer, r.info.arch, l0 if l0 is not None else math.inf, _natural(r.name))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(cfg: Config, records: list[RunRecord], caches: list[dict], out: Path,
                   index: Path) -> Path:
    """artifacts/reproduce.json: what was run (experiment, caches, runs, evaluations, report)."""
    root = Path(cfg.paths.root)
    summary = paths.sae_root(cfg) / "summary"
    run_entries = []
    for r in records:
        ev = {name: str(p) for name, p in r.eval_files.items()}
        run_entries.append({
            "name": r.name, "dir": str(r.run_dir), "layer": r.info.layer, "arch": r.info.arch,
            "n_features": r.info.n_features, "hparams": r.info.hparams,
            "cache_dir": str(r.info.cache_dir), "checkpoint": str(r.run_dir / runs.WEIGHTS_FILE),
            "train_metrics": str(r.run_dir / runs.TRAIN_METRICS)
            if (r.run_dir / runs.TRAIN_METRICS).exists() else None,
            "evaluated": r.metrics is not None, "eval_files": ev,
            "headline": {k: evaluate_row.get(k) for k in ("l0", "fvu", "dead_frac", "kl_sae")}
            if (evaluate_row := (summary_rows([r])[0] if r.metrics else None)) else None,
        })
    manifest = {
        "experiment": cfg.experiment, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv), "git_commit": _git_commit(),
        "model": to_plain(cfg.model), "data": to_plain(cfg.data),
        "caches": caches, "runs": run_entries,
        "summary": {"csv": str(summary / "summary.csv") if (summary / "summary.csv").exists()
                    else None,
                    "json": str(summary / "summary.json") if (summary / "summary.json").exists()
                    else None,
                    "frontier": sorted(str(p) for p in summary.glob("frontier*.png"))},
        "report": {"dir": str(out), "index": str(index)},
        "config": to_plain(cfg),
    }
    path = root / "reproduce.json"
    write_json(path, manifest)
    return path
