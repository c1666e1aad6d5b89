"""Stage `report`: everything the study produced, in one static folder that opens from file://.

`python run.py stage=report` reads every SAE run under artifacts/sae (or those chosen by
`sae.run`), the evaluation outputs beside them, and the activation caches they were trained on,
and writes artifacts/report/:

    index.html          summary table, frontier figures, curve census + coverage, polysemantic
                        neurons, and a feature browser (card per feature; search, sort, pages)
    assets/             report.js / report.css (copied from sae_vision/report_assets)
    data/report.js      the page's index of browsers (window.REPORT)
    data/browser-*.js   one per SAE run and one per layer of neurons; loaded on demand with a
                        <script> tag, because fetch() is refused on file:// pages
    figures/            copies of the evaluation figures
    crops/<cache key>/  receptive-field thumbnails of dataset examples, one per distinct position
    featurevis/<id>/    Lucent feature visualisations (report.featurevis=true)

It also writes artifacts/reproduce.json, the manifest of what was run and where it landed.
Dataset examples for every run of a layer and for its neurons come from ONE pass over the cache.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_vision import paths, runs
from sae_vision.config import Config, to_plain, uses_l1_coeff
from sae_vision.findings import findings_markdown, findings_rows, write_findings
from sae_vision.io import copy_file, to_json, write_json, write_text
from sae_vision.pages import (
    BROWSER_HTML,
    html_census,
    html_figures,
    html_page,
    html_poly,
    html_summary,
)
from sae_vision.progress import Progress, track
from sae_vision.records import (
    RunRecord,
    census_groups,
    curve_files,
    curve_units,
    dig,
    find_runs,
    group_fdr,
    load_runs,
    poly_rows,
    slugify,
    tuning_angles,
)
from sae_vision.tracker import Tracker, disabled

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).with_name("report_assets")
PAGE_SIZE = 48  # cards per browser page
N_CHIPS = 4  # neurons listed on a feature card (and features on a neuron card)


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
# Units: choosing which get example crops, and their card data


def spread_pick(order: list[int], n: int) -> list[int]:
    """n items evenly spaced over `order` (a ranking), so every part of it is represented."""
    if n >= len(order):
        return list(order)
    if n <= 0:
        return []
    idx = np.linspace(0, len(order) - 1, n).round().astype(int)
    return [order[i] for i in dict.fromkeys(idx.tolist())]


def pick_units(ex, priority: list[int], n: int) -> list[int]:
    """Units that get crops: `priority` first, then alive units spread over the density ranking."""
    alive = [int(i) for i in torch.nonzero(ex.n_active_F > 0).flatten().tolist()]
    chosen = list(dict.fromkeys(u for u in priority if 0 <= u < len(ex.n_active_F)
                                and ex.n_active_F[u] > 0))[:n]
    rest = sorted((u for u in alive if u not in set(chosen)), key=lambda u: -float(ex.n_active_F[u]))
    return chosen + spread_pick(rest, n - len(chosen))


def decoder_atoms(sae) -> torch.Tensor:
    """[F, D] each feature's decoded direction in raw activation units (decode is affine)."""
    with torch.no_grad():
        dev = sae.W_dec.device
        base = sae.decode(torch.zeros(1, sae.n_features, device=dev))
        rows = [sae.decode(torch.eye(sae.n_features, device=dev)[lo: lo + 1024]) - base
                for lo in range(0, sae.n_features, 1024)]
        return torch.cat(rows).float().cpu()


def _sig(v, digits: int = 4):
    """A float rounded to a few significant digits (the browser data stays small)."""
    if v is None or not isinstance(v, float) or not math.isfinite(v) or v == 0:
        return v
    return round(v, digits - 1 - int(math.floor(math.log10(abs(v)))))


def unit_records(ex, crops: dict, chosen: set[int], curve: dict[int, dict], fv: set[int],
                 chips: list | None, chip_key: str) -> tuple[list[dict], list[list]]:
    """Card data per unit, plus the de-duplicated crop table [[file, clipped], ...]."""
    table: list[list] = []
    index: dict[tuple, int] = {}

    def crop_refs(rows):
        refs = []
        for act, img, y, x in rows:
            info = crops.get((img, y, x))
            if not info or "file" not in info:
                continue
            key = (img, y, x)
            if key not in index:
                index[key] = len(table)
                table.append([info["file"], int(info["clipped"])])
            refs.append([index[key], _sig(act)])
        return refs

    units = []
    n = max(ex.n_vectors, 1)
    for u in range(len(ex.n_active_F)):
        n_act = int(ex.n_active_F[u])
        c = curve.get(u, {})
        top_val = ex.top_val_FK[u]
        mx = float(top_val[0]) if len(top_val) else math.nan
        rec = {"i": u, "d": _sig(n_act / n), "n_active": n_act,
               "mx": _sig(mx) if math.isfinite(mx) else None,
               "mu": _sig(float(ex.sum_F[u]) / n_act) if n_act else 0.0}
        if c:
            rec.update(cv=c.get("cv"), cd=int(bool(c.get("cd"))), o=c.get("o"),
                       ps=c.get("ps"), w=c.get("w"))
            if c.get("cd") and c.get("tc") is not None:
                rec["tc"] = [_sig(float(v), 3) for v in c["tc"]]
        if u in chosen:
            rec["top"] = crop_refs(ex.examples(u, "top"))
            rec["rnd"] = crop_refs(ex.examples(u, "random"))
        if u in fv:
            rec["fv"] = 1
        if chips is not None:
            rec[chip_key] = chips[u]
        units.append(rec)
    return units, table


# --------------------------------------------------------------------------------------------
# Writing files


def write_js(path: Path, var: str, key: str | None, obj) -> Path:
    """A data script: window.VAR = obj, or window.VAR[key] = obj (loadable from file://)."""
    blob = json.dumps(to_json(obj), separators=(",", ":"), allow_nan=False)
    if key is None:
        text = f"window.{var}={blob};\n"
    else:
        text = f"window.{var}=window.{var}||{{}};window.{var}[{json.dumps(key)}]={blob};\n"
    return write_text(path, text)


def copy_figure(src: str | Path | None, fig_dir: Path, name: str) -> str | None:
    """Copy a figure into the report; returns its path relative to the report folder."""
    if not src or not Path(src).is_file():
        return None
    fig_dir.mkdir(parents=True, exist_ok=True)
    dst = fig_dir / f"{slugify(name)}{Path(src).suffix}"
    copy_file(src, dst)
    return f"{fig_dir.name}/{dst.name}"


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


# --------------------------------------------------------------------------------------------
# The stage


def _device(cfg: Config) -> torch.device:
    name = cfg.model.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _geometry(cfg: Config, cache_meta: dict, layer: str):
    """Receptive-field geometry of the layer the cache was built from (no weights for Lucid nets)."""
    from sae_vision.models import load_model, lucid_geometry

    mc = runs.model_config(cfg, cache_meta)
    size = int(cache_meta.get("image_size") or cfg.data.image_size)
    if mc.family != "timm":
        return lucid_geometry(layer, size)
    return load_model(mc).geometry(layer)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _layer_browsers(cfg: Config, cache_dir: str, cache_meta: dict, recs: list[RunRecord],
                    neuron_id: str, out: Path, device: torch.device, model_cache: dict
                    ) -> list[dict]:
    """Browser data for one cache: its neurons and every run trained on it.

    One pass over the cache collects the examples of all of them; crops are written once per
    distinct position; feature visualisations are rendered when report.featurevis is on.
    """
    from sae_vision.examples import collect_examples, iter_images, save_crops
    from sae_vision.shards import iter_chunks

    rc = cfg.report
    layer, d_in = recs[0].info.layer, int(cache_meta["dim"])
    encoders: dict[str, Any] = {neuron_id: lambda x: x}
    n_units = {neuron_id: d_in}
    for r in recs:
        r.sae.to(device)
        encoders[r.slug] = r.sae.encode
        n_units[r.slug] = int(r.sae.n_features)
    logger.info(f"[report] {layer}: one pass over {cache_dir} for the neurons and {len(recs)} run(s)")
    max_vectors = rc.max_example_vectors if rc.max_example_vectors > 0 else None
    n_scan = min(int(cache_meta.get("n_vectors") or 0), max_vectors or math.inf) or None
    ex, sources = collect_examples(
        track(iter_chunks(cache_dir, with_pos=True), "report examples", n_scan, "vec",
              size=lambda c: len(c[0])), encoders, n_units, rc.n_examples,
        rc.n_random_examples, seed=cfg.seed, device=device, max_vectors=max_vectors)

    # Which units get crops: curve detectors and polysemantic decompositions first.
    chosen: dict[str, list[int]] = {}
    neuron_prio: list[int] = []
    for r in recs:
        cu, cn = curve_units(r.curves, "features"), curve_units(r.curves, "neurons")
        prio = sorted(cu, key=lambda u: -(cu[u]["cv"] or 0))
        neuron_prio += sorted(cn, key=lambda u: -(cn[u]["cv"] or 0))
        for n in poly_rows(r.poly)[:12]:
            neuron_prio.append(int(n["neuron"]))
            prio += [int(f["feature"]) for f in (n.get("features") or [])[:8]]
        chosen[r.slug] = pick_units(ex[r.slug], prio, rc.max_cards)
    chosen[neuron_id] = pick_units(ex[neuron_id], neuron_prio, rc.max_cards)

    positions = {(i, y, x) for name, units in chosen.items() for u in units
                 for which in ("top", "random") for _, i, y, x in ex[name].examples(u, which)}
    crop_sub = f"crops/{slugify(cache_meta.get('key') or Path(cache_dir).name)}/"
    data_cfg = runs.data_config(cache_meta, cfg.data)
    try:
        images = {p[0] for p in positions}
        crops = save_crops(positions, track(iter_images(data_cfg, images), "report crops",
                                            len(images), "img"),
                           _geometry(cfg, cache_meta, layer), out / crop_sub, rc.thumb_px, sources)
    except FileNotFoundError as e:  # the images the cache came from are gone or moved
        logger.info(f"[report] no dataset examples for {layer}: {e}")
        crops = {}
    bad = [v["error"] for v in crops.values() if "error" in v]
    if bad:
        logger.info(f"[report] {len(bad)} of {len(crops)} crops unavailable, e.g. {bad[0]}")

    fv: dict[str, set[int]] = {}
    if rc.featurevis:
        fv = _featurevis(cfg, cache_meta, layer, recs, neuron_id, chosen, out, model_cache)

    # Cross links: a feature's top decoder channels; a neuron's largest mean contributors.
    atoms = {r.slug: decoder_atoms(r.sae) for r in recs}
    first = recs[0].slug
    mean_code_F = ex[first].sum_F.float() / max(ex[first].n_vectors, 1)
    contrib_FD = atoms[first] * mean_code_F[:, None]
    top_f = contrib_FD.topk(min(N_CHIPS, contrib_FD.shape[0]), dim=0)
    neuron_chips = [[[int(f), _sig(float(v), 3), first] for f, v in zip(fi, vi) if v > 0]
                    for fi, vi in zip(top_f.indices.T.tolist(), top_f.values.T.tolist())]
    neuron_curves: dict[int, dict] = {}
    for r in recs:
        neuron_curves.update(curve_units(r.curves, "neurons"))
    angles = next((a for r in recs if (a := tuning_angles(r.curves))), None)

    out_data = []
    for rec in [None, *recs]:
        name = neuron_id if rec is None else rec.slug
        if rec is None:
            curve, chips, chip_key = neuron_curves, neuron_chips, "fs"
            label = f"neurons · {layer} ({d_in})"
        else:
            curve, chip_key = curve_units(rec.curves, "features"), "nb"
            top_c = atoms[name].topk(min(N_CHIPS, d_in), dim=1)
            chips = [[[int(c), _sig(float(v), 3)] for c, v in zip(ci, vi) if v > 0]
                     for ci, vi in zip(top_c.indices.tolist(), top_c.values.tolist())]
            label = f"{rec.name} · {layer} · {rec.info.arch} · {rec.info.n_features} features"
        units, table = unit_records(ex[name], crops, set(chosen[name]), curve,
                                    fv.get(name, set()), chips, chip_key)
        out_data.append({"id": name, "kind": "neurons" if rec is None else "sae",
                         "layer": layer, "label": label, "run": rec.name if rec else None,
                         "n_vectors": ex[name].n_vectors, "crop_dir": crop_sub,
                         "fv_dir": f"featurevis/{name}/", "neuron_browser": neuron_id,
                         "angles": angles, "crops": table, "units": units})
    for r in recs:
        r.sae.to("cpu")
    return out_data


def _static_sections(records: list[RunRecord], rows: list[dict], thumbs: dict[str, dict],
                     neuron_browser: dict[str, str], fig_dir: Path
                     ) -> tuple[list[tuple], list[str], list[dict]]:
    """The page's sections, the figures they show (relative paths) and the census table rows."""
    from sae_vision import evaluate, plots

    metric_rows = [evaluate.summary_row(r.metrics) for r in records if r.metrics]
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


def run(cfg: Config, tracker: Tracker | None = None) -> ReportResult:
    """Build artifacts/report/ (index.html + data) and artifacts/reproduce.json."""
    from sae_vision.shards import load_cache_meta

    tracker = tracker or disabled()
    t0 = time.perf_counter()
    run_dirs = find_runs(cfg)
    out = paths.report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "figures", "assets"):  # regenerated every time; crops are content-keyed
        shutil.rmtree(out / sub, ignore_errors=True)
    shutil.copytree(ASSETS_DIR, out / "assets")
    fig_dir = out / "figures"
    fig_dir.mkdir()
    device = _device(cfg)
    records = sorted(load_runs(run_dirs, cfg), key=_order)
    logger.info(f"[report] {len(records)} run(s): {', '.join(r.name for r in records)}")

    by_cache: dict[str, list[RunRecord]] = {}
    for r in records:
        by_cache.setdefault(str(r.info.cache_dir), []).append(r)

    browsers: list[dict] = []
    caches_manifest: list[dict] = []
    thumbs: dict[str, dict[int, str]] = {}  # browser id -> unit -> a top-example crop path
    neuron_browser: dict[str, str] = {}  # cache dir -> id of its neuron browser
    model_cache: dict[str, Any] = {}
    layers = [rs[0].info.layer for rs in by_cache.values()]
    for cache_dir, recs in by_cache.items():
        cache_meta = load_cache_meta(cache_dir)
        layer = recs[0].info.layer
        key = cache_meta.get("key") or Path(cache_dir).name
        caches_manifest.append({"dir": cache_dir, "key": key, "layer": layer,
                                "n_vectors": cache_meta.get("n_vectors"),
                                "n_images": cache_meta.get("n_images"),
                                "model": cache_meta.get("model"),
                                "weights_sha256": cache_meta.get("weights_sha256")})
        # Two caches of one layer (e.g. different data) each get their own neuron browser.
        neuron_id = slugify(f"neurons-{layer}" + (f"-{key}" if layers.count(layer) > 1 else ""))
        neuron_browser[cache_dir] = neuron_id
        layer_browsers = _layer_browsers(cfg, cache_dir, cache_meta, recs, neuron_id, out,
                                         device, model_cache)
        for data in layer_browsers:
            write_js(out / "data" / f"browser-{data['id']}.js", "REPORT_DATA", data["id"], data)
            browsers.append({"id": data["id"], "label": data["label"], "kind": data["kind"],
                             "file": f"data/browser-{data['id']}.js",
                             "n_units": len(data["units"])})
            thumbs[data["id"]] = {u["i"]: data["crop_dir"] + data["crops"][u["top"][0][0]][0]
                                  for u in data["units"] if u.get("top")}
    n_cards = sum(b["n_units"] for b in browsers)

    rows = summary_rows(records)
    sections, figures, census_rows = _static_sections(records, rows, thumbs, neuron_browser,
                                                      fig_dir)
    generated = time.strftime("%Y-%m-%d %H:%M")
    title = f"sae-vision report{' · ' + cfg.experiment if cfg.experiment else ''}"
    write_js(out / "data" / "report.js", "REPORT", None, {
        "generated": generated, "page_size": PAGE_SIZE, "browsers": browsers,
        "runs": [{k: v for k, v in row.items()} for row in rows]})
    index = out / "index.html"
    write_text(index, html_page(title, generated, sections))

    # Tracker: the tables and the figures.
    tracker.log_table("report/summary", [to_json(r) for r in rows])
    if census_rows:
        tracker.log_table("report/curve_census", to_json(census_rows))
    for rel in figures:
        tracker.log_image(f"report/{Path(rel).stem}", out / rel)

    manifest_path = write_manifest(cfg, records, caches_manifest, out, index)
    tracker.summary({"report/n_runs": len(records), "report/n_cards": n_cards})
    findings = write_findings(records, out)
    if findings:
        tracker.log_table("report/findings", to_json(findings_rows(records)))
        logger.info(findings_markdown(findings_rows(records)))
    written = [index, out / "data" / "report.js", manifest_path, *findings]
    for p in written:
        logger.info(f"[report] wrote {p}")
    logger.info(f"[report] {len(browsers)} browsers, {n_cards} cards, "
          f"{time.perf_counter() - t0:.1f} s; open {index.resolve().as_uri()}")
    return ReportResult(report_dir=str(out), index_path=str(index),
                        manifest_path=str(manifest_path), runs=tuple(r.name for r in records),
                        n_cards=n_cards, files=tuple(str(p) for p in written))


def _natural(name: str) -> list:
    """Sort key that puts k8 before k32."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _order(r: RunRecord) -> tuple:
    """Runs in table order: layer, architecture, then sparsity (L0 when evaluated)."""
    l0 = dig(r.metrics, "reconstruction", "l0")
    return (r.info.layer, r.info.arch, l0 if l0 is not None else math.inf, _natural(r.name))


def _featurevis(cfg: Config, cache_meta: dict, layer: str, recs: list[RunRecord], neuron_id: str,
                chosen: dict[str, list[int]], out: Path, model_cache: dict) -> dict[str, set[int]]:
    """Render (or reuse) visualisations of the first featurevis_max chosen units per dictionary."""
    from sae_vision import featurevis
    from sae_vision.models import load_model
    from sae_vision.shards import sha256_file

    rc = cfg.report
    mc = runs.model_config(cfg, cache_meta)
    mkey = json.dumps(to_plain(mc), sort_keys=True)
    if mkey not in model_cache:
        model_cache.clear()
        model_cache[mkey] = load_model(mc)
    model = model_cache[mkey]
    runs.check_weights(model, cache_meta, recs[0].info)
    cache_root = Path(cfg.paths.root) / "featurevis"
    done: dict[str, set[int]] = {}
    jobs = [(neuron_id, None, "neurons")] + [
        (r.slug, r.sae, f"{r.name}:{sha256_file(r.run_dir / runs.WEIGHTS_FILE)[:16]}")
        for r in recs]
    bar = Progress("report feature vis", sum(len(chosen[n][: rc.featurevis_max]) for n, _, _ in jobs),
                   "unit")
    for name, sae, run_id in jobs:
        ids = chosen[name][: rc.featurevis_max]
        t = time.perf_counter()
        bar.set({"dictionary": name})
        pngs = featurevis.visualise(model, layer, ids, cache_root, run_id, sae=sae,
                                    steps=rc.featurevis_steps, size=rc.featurevis_size,
                                    batch_size=rc.featurevis_batch)
        bar.update(len(ids))
        dst = out / "featurevis" / name
        dst.mkdir(parents=True, exist_ok=True)
        for u, p in pngs.items():
            copy_file(p, dst / f"u{u}.png")
        done[name] = set(pngs)
        logger.info(f"[report] feature vis: {len(ids)} units of {name} "
                    f"({time.perf_counter() - t:.1f} s)")
    bar.close()
    return done


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
