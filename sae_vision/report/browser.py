"""The feature and neuron browser's data: which units get cards, their dataset examples, crops,
cross links and feature visualisations, written as data scripts (data/browser-<id>.js) that
assets/report.js loads on demand from a file:// page.

stage=report (sae_vision.report) calls layer_browsers once per activation cache: one pass over
the cache collects the examples of its neurons and of every run trained on it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_vision.core import Config, Progress, copy_file, to_json, to_plain, track, write_text
from sae_vision.sae import runs

from .records import RunRecord, curve_units, poly_rows, slugify, tuning_angles

# The stage's logger: these are lines of stage=report, named as they were before this module
# was split out of sae_vision.report.
logger = logging.getLogger("sae_vision.report")

N_CHIPS = 4  # neurons listed on a feature card (and features on a neuron card)


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


def write_js(path: Path, var: str, key: str | None, obj) -> Path:
    """A data script: window.VAR = obj, or window.VAR[key] = obj (loadable from file://)."""
    blob = json.dumps(to_json(obj), separators=(",", ":"), allow_nan=False)
    if key is None:
        text = f"window.{var}={blob};\n"
    else:
        text = f"window.{var}=window.{var}||{{}};window.{var}[{json.dumps(key)}]={blob};\n"
    return write_text(path, text)


# --------------------------------------------------------------------------------------------
# One layer's browsers


def layer_browsers(cfg: Config, cache_dir: str, cache_meta: dict, recs: list[RunRecord],
                   neuron_id: str, out: Path, device: torch.device, model_cache: dict
                   ) -> list[dict]:
    """Browser data for one cache: its neurons and every run trained on it.

    One pass over the cache collects the examples of all of them; crops are written once per
    distinct position; feature visualisations are rendered when report.featurevis is on.
    """
    layer, d_in = recs[0].info.layer, int(cache_meta["dim"])
    ex, sources = _collect_examples(cfg, cache_dir, cache_meta, recs, neuron_id, device)
    chosen = _choose_units(recs, ex, neuron_id, cfg.report.max_cards)
    crop_sub, crops = _write_crops(cfg, cache_dir, cache_meta, layer, ex, chosen, sources, out)
    fv: dict[str, set[int]] = {}
    if cfg.report.featurevis:
        fv = _featurevis(cfg, cache_meta, layer, recs, neuron_id, chosen, out, model_cache)

    # Cross links: a feature's top decoder channels; a neuron's largest mean contributors.
    atoms = {r.slug: decoder_atoms(r.sae) for r in recs}
    neuron_curves: dict[int, dict] = {}
    for r in recs:
        neuron_curves.update(curve_units(r.curves, "neurons"))
    angles = next((a for r in recs if (a := tuning_angles(r.curves))), None)

    out_data = []
    for rec in [None, *recs]:
        name = neuron_id if rec is None else rec.slug
        if rec is None:
            curve, chips, chip_key = neuron_curves, _neuron_chips(recs, ex, atoms), "fs"
            label = f"neurons · {layer} ({d_in})"
        else:
            curve, chip_key = curve_units(rec.curves, "features"), "nb"
            chips = _feature_chips(atoms[name], d_in)
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


def _collect_examples(cfg: Config, cache_dir: str, cache_meta: dict, recs: list[RunRecord],
                      neuron_id: str, device: torch.device) -> tuple[dict, dict]:
    """One pass over the cache: examples of its neurons and of every run's features.

    The runs' SAEs are moved to `device` (layer_browsers moves them back).
    """
    from sae_vision.activations import iter_chunks

    from .examples import collect_examples

    rc = cfg.report
    encoders: dict[str, Any] = {neuron_id: lambda x: x}
    n_units = {neuron_id: int(cache_meta["dim"])}
    for r in recs:
        r.sae.to(device)
        encoders[r.slug] = r.sae.encode
        n_units[r.slug] = int(r.sae.n_features)
    logger.info(f"[report] {recs[0].info.layer}: one pass over {cache_dir} for the neurons and "
                f"{len(recs)} run(s)")
    max_vectors = rc.max_example_vectors if rc.max_example_vectors > 0 else None
    n_scan = min(int(cache_meta.get("n_vectors") or 0), max_vectors or math.inf) or None
    return collect_examples(
        track(iter_chunks(cache_dir, with_pos=True), "report examples", n_scan, "vec",
              size=lambda c: len(c[0])), encoders, n_units, rc.n_examples,
        rc.n_random_examples, seed=cfg.seed, device=device, max_vectors=max_vectors)


def _choose_units(recs: list[RunRecord], ex: dict, neuron_id: str, max_cards: int
                  ) -> dict[str, list[int]]:
    """Which units get crops: curve detectors and polysemantic decompositions first."""
    chosen: dict[str, list[int]] = {}
    neuron_prio: list[int] = []
    for r in recs:
        cu, cn = curve_units(r.curves, "features"), curve_units(r.curves, "neurons")
        prio = sorted(cu, key=lambda u: -(cu[u]["cv"] or 0))
        neuron_prio += sorted(cn, key=lambda u: -(cn[u]["cv"] or 0))
        for n in poly_rows(r.poly)[:12]:
            neuron_prio.append(int(n["neuron"]))
            prio += [int(f["feature"]) for f in (n.get("features") or [])[:8]]
        chosen[r.slug] = pick_units(ex[r.slug], prio, max_cards)
    chosen[neuron_id] = pick_units(ex[neuron_id], neuron_prio, max_cards)
    return chosen


def _write_crops(cfg: Config, cache_dir: str, cache_meta: dict, layer: str, ex: dict,
                 chosen: dict[str, list[int]], sources, out: Path) -> tuple[str, dict]:
    """Receptive-field crops of every position the chosen units' examples show, each written once.

    Returns the crops' folder relative to the report (crops/<cache key>/) and
    {(image, y, x): crop info}; none when the source images are gone.
    """
    from .examples import iter_images, save_crops

    rc = cfg.report
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
    return crop_sub, crops


def _neuron_chips(recs: list[RunRecord], ex: dict, atoms: dict[str, torch.Tensor]) -> list:
    """Per neuron, the features of the first run that contribute most to it on average."""
    first = recs[0].slug
    mean_code_F = ex[first].sum_F.float() / max(ex[first].n_vectors, 1)
    contrib_FD = atoms[first] * mean_code_F[:, None]
    top_f = contrib_FD.topk(min(N_CHIPS, contrib_FD.shape[0]), dim=0)
    return [[[int(f), _sig(float(v), 3), first] for f, v in zip(fi, vi) if v > 0]
            for fi, vi in zip(top_f.indices.T.tolist(), top_f.values.T.tolist())]


def _feature_chips(atoms_FD: torch.Tensor, d_in: int) -> list:
    """Per feature, the neurons (channels) its decoder direction loads on most."""
    top_c = atoms_FD.topk(min(N_CHIPS, d_in), dim=1)
    return [[[int(c), _sig(float(v), 3)] for c, v in zip(ci, vi) if v > 0]
            for ci, vi in zip(top_c.indices.tolist(), top_c.values.tolist())]


def _geometry(cfg: Config, cache_meta: dict, layer: str):
    """Receptive-field geometry of the layer the cache was built from (no weights for Lucid nets)."""
    from sae_vision.activations import load_model, lucid_geometry

    mc = runs.model_config(cfg, cache_meta)
    size = int(cache_meta.get("image_size") or cfg.data.image_size)
    if mc.family != "timm":
        return lucid_geometry(layer, size)
    return load_model(mc).geometry(layer)


def _featurevis(cfg: Config, cache_meta: dict, layer: str, recs: list[RunRecord], neuron_id: str,
                chosen: dict[str, list[int]], out: Path, model_cache: dict) -> dict[str, set[int]]:
    """Render (or reuse) visualisations of the first featurevis_max chosen units per dictionary."""
    from sae_vision.activations import load_model, sha256_file

    from . import featurevis

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
