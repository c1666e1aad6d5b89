"""Stage `evaluate`: judge trained SAEs on held-out data.

For each selected run (`sae.run`: a run name, `glob(pattern)`, a plain glob or a sweep folder):
  1. reconstruction (MSE, FVU, explained variance, cosine, L2 ratio, L0 distribution) and feature
     health (dead / dense counts, log10 density histogram) on the run's held-out cache shards;
  2. the downstream splice: the network with the layer replaced by the SAE's reconstruction at
     every position, on held-out images, against zero- and mean-ablation of the same layer;
  3. optionally cross-seed stability (eval.compare_run), the curve census (eval.curves) and the
     polysemantic-neuron analysis (eval.polysemantic).
Everything lands in `<run_dir>/eval/` and the tracker. Several runs also get a sweep summary
(`<sae_root>/summary/`: CSV, JSON and the sparsity-fidelity frontier plots).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_vision import metrics as M
from sae_vision import paths, plots
from sae_vision.census import NeuronCensusMemo
from sae_vision.config import (
    Config,
    DataConfig,
    ModelConfig,
    uses_l1_coeff,
)
from sae_vision.io import atomic_write, drop_stale_tmp, to_json, write_json
from sae_vision.progress import Progress, track
from sae_vision.runs import (
    CONFIG_FILE,
    EVAL_DIR,
    SUMMARY_DIR,
    TRAIN_LOG,
    RunInfo,
    check_dims,
    check_weights,
    data_config,
    model_config,
    resolve_runs,
    run_info,
)
from sae_vision.shards import iter_chunks, load_cache_meta
from sae_vision.tracker import Tracker, disabled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """What evaluation wrote, and the headline metrics per run (keyed by run name)."""

    run_dirs: tuple[str, ...]
    metrics_paths: tuple[str, ...]
    metrics: dict[str, dict] = field(default_factory=dict)
    summary_csv_path: str | None = None
    summary_json_path: str | None = None
    frontier_paths: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Reconstruction and feature health


def batches_of(chunks: Iterable[torch.Tensor], batch_size: int,
               limit: int | None = None) -> Iterator[torch.Tensor]:
    """Re-batch [N, D] chunks into [batch_size, D] batches, stopping after `limit` rows."""
    buf: list[torch.Tensor] = []
    n_buf = n_out = 0
    for chunk in chunks:
        if limit is not None and n_out + n_buf + len(chunk) > limit:
            chunk = chunk[: limit - n_out - n_buf]
        buf.append(chunk)
        n_buf += len(chunk)
        if n_buf >= batch_size:
            cat = torch.cat(buf)
            n_full = n_buf // batch_size * batch_size
            yield from cat[:n_full].split(batch_size)
            n_out += n_full
            buf, n_buf = [cat[n_full:]], n_buf - n_full
        if limit is not None and n_out + n_buf >= limit:
            break
    if n_buf:
        yield torch.cat(buf)


def reconstruct(sae, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂, codes) through the SAE's public encode/decode (raw activation units)."""
    codes_BF = sae.encode(x_BD)
    return sae.decode(codes_BF), codes_BF


@torch.no_grad()
def reconstruction_metrics(sae, batches: Iterable[torch.Tensor], device: torch.device | str,
                           dense_threshold: float,
                           topup_batches: Iterable[torch.Tensor] | None = None,
                           dead_min_vectors: int = 0) -> tuple[dict, M.SparsityStats]:
    """Reconstruction, L0 and feature health over held-out batches, in bounded memory.

    Dead/dense counts need many vectors to mean anything, so when the held-out set has fewer than
    `dead_min_vectors` the firing counts continue over `topup_batches` (training vectors: firing
    is a property of the dictionary, not a generalisation measure). Returns (metrics, density).
    """
    d_in, n_feat = int(sae.d_in), int(sae.n_features)
    rec = M.ReconstructionStats(d_in)
    sparse = M.SparsityStats(n_feat)  # L0 over held-out vectors only
    dens = M.SparsityStats(n_feat)  # firing counts: held-out, then top-up
    for x in batches:
        x_hat, codes = reconstruct(sae, x.to(device, non_blocking=True))
        rec.update(x, x_hat)
        sparse.update(codes)
        dens.update(codes)
    if rec.n == 0:
        raise ValueError("no held-out vectors to evaluate on; check train.holdout_frac and the "
                         "cache's shards")
    if topup_batches is not None and dens.n < dead_min_vectors:
        for x in topup_batches:
            dens.update(sae.encode(x[: dead_min_vectors - dens.n].to(device)))
            if dens.n >= dead_min_vectors:
                break
    health = dens.health(dense_threshold)
    health["includes_train_vectors"] = dens.n > sparse.n
    return {"reconstruction": {**rec.compute(), **sparse.l0_summary()},
            "features": health, "l0_hist": sparse.l0_hist}, dens


# --------------------------------------------------------------------------------------------
# Downstream splice


def sae_splice_fn(sae, stats: M.ReconstructionStats | None = None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(acts_BCHW) -> the SAE reconstruction at every spatial position (for model.splice)."""

    def fn(a_BCHW: torch.Tensor) -> torch.Tensor:
        b, c, h, w = a_BCHW.shape
        x_ND = a_BCHW.permute(0, 2, 3, 1).reshape(-1, c).float()
        x_hat_ND, _ = reconstruct(sae, x_ND)
        if stats is not None:
            stats.update(x_ND, x_hat_ND)
        return x_hat_ND.reshape(b, h, w, c).permute(0, 3, 1, 2).to(a_BCHW.dtype).contiguous()

    return fn


def zero_fn(a_BCHW: torch.Tensor) -> torch.Tensor:
    """Zero-ablation of a layer."""
    return torch.zeros_like(a_BCHW)


def mean_fn(mean_C: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Mean-ablation: every position replaced by the cache's channel mean."""

    def fn(a_BCHW: torch.Tensor) -> torch.Tensor:
        m = mean_C.to(a_BCHW.device, a_BCHW.dtype).view(1, -1, 1, 1)
        return m.expand_as(a_BCHW).contiguous()

    return fn


@torch.no_grad()
def baseline_logits(model, layer: str, images_B3HW: torch.Tensor, mean_C: torch.Tensor,
                    batch_size: int) -> dict[str, torch.Tensor]:
    """Logits of the original network and of the zero- and mean-ablated layer (reused per layer)."""
    device = _model_device(model)
    out: dict[str, list[torch.Tensor]] = {"orig": [], "zero": [], "mean": []}
    for x in track(images_B3HW.split(batch_size), "evaluate splice baselines",
                   len(images_B3HW), "img", size=len):
        x = x.to(device)
        out["orig"].append(model(x).double().cpu())
        with model.splice(layer, zero_fn):
            out["zero"].append(model(x).double().cpu())
        with model.splice(layer, mean_fn(mean_C)):
            out["mean"].append(model(x).double().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def splice_metrics(model, sae, layer: str, images_B3HW: torch.Tensor, mean_C: torch.Tensor,
                   batch_size: int = 16, baselines: dict | None = None) -> dict:
    """Mean KL(original || spliced), top-1 agreement, and the KL gap recovered vs ablations."""
    if baselines is None:
        baselines = baseline_logits(model, layer, images_B3HW, mean_C, batch_size)
    device = _model_device(model)
    rec = M.ReconstructionStats(int(sae.d_in))
    spliced = []
    with model.splice(layer, sae_splice_fn(sae, rec)):
        for x in track(images_B3HW.split(batch_size), "evaluate splice", len(images_B3HW), "img",
                       size=len):
            spliced.append(model(x.to(device)).double().cpu())
    stats = M.SpliceStats()
    stats.update(baselines["orig"], {"sae": torch.cat(spliced), "zero": baselines["zero"],
                                     "mean": baselines["mean"]})
    out = stats.compute("sae")
    # Reconstruction at every position of the held-out images, not just the cache's samples.
    out["fvu_all_positions"] = rec.compute()["fvu"]
    return out


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def holdout_image_ids(cache_meta: dict, holdout_shards: Iterable[str],
                      train_shards: Iterable[str] = ()) -> list[int]:
    """Image indices covered by the held-out shards (never those of a training shard)."""
    by_name = {s["name"]: s for s in cache_meta["shards"]}
    ids: set[int] = set()
    for name in holdout_shards:
        rng = by_name.get(name, {}).get("image_range")
        if rng is not None:
            ids.update(range(int(rng[0]), int(rng[1])))
    for name in train_shards:
        rng = by_name.get(name, {}).get("image_range")
        if rng is not None:
            ids.difference_update(range(int(rng[0]), int(rng[1])))
    skipped = {int(s["idx"]) for s in cache_meta.get("skipped", []) if "idx" in s}
    return sorted(ids - skipped)


def pick_evenly(ids: list[int], n: int) -> list[int]:
    """n ids spread evenly over the list (deterministic), so several shards contribute."""
    if n >= len(ids):
        return list(ids)
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, n).round()]


def load_images(data_cfg: DataConfig, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The images with these indices from the recreated image source, as [B, 3, H, W] in [0, 1]."""
    from sae_vision.data import iter_webdataset, make_images

    dataset = make_images(data_cfg)
    items = []
    if dataset is not None:
        items = [dataset[i] for i in ids if i < len(dataset)]
    else:
        want = set(ids)
        for it in iter_webdataset(data_cfg):
            if it.idx in want:
                items.append(it)
                want.discard(it.idx)
            if not want:
                break
    good = [it for it in items if it.image is not None]
    if not good:
        raise ValueError(f"none of the held-out images {ids[:8]}... could be loaded from "
                         f"data.name={data_cfg.name!r}")
    return torch.stack([it.image for it in good]), [it.idx for it in good]


def splice_image_ids(cache_meta: dict, info: RunInfo, n_images: int, fallback: DataConfig
                     ) -> tuple[DataConfig, list[int], str]:
    """Which held-out images to splice: those of the held-out shards, else images past the cache.

    Returns (data config to load them with, ids, how) where `how` names the rule that chose them.
    """
    data_cfg = data_config(cache_meta, fallback)
    ids = holdout_image_ids(cache_meta, info.holdout_shards, info.train_shards)
    if ids:
        return data_cfg, pick_evenly(ids, n_images), "holdout_shards"
    # No held-out shard records its images: use images the cache never saw (indices past it).
    if data_cfg.name == "webdataset" or data_cfg.n_images <= 0:
        raise ValueError(
            f"cannot find held-out images for run {info.name}: its held-out shards record no "
            "image_range and the whole dataset was cached; set train.holdout_frac > 0 and "
            "retrain, or set eval.splice=false")
    n_cached = int(cache_meta.get("n_images_requested") or data_cfg.n_images)
    wider = dataclasses.replace(data_cfg, n_images=n_cached + n_images)
    return wider, list(range(n_cached, n_cached + n_images)), "past_cached_range"


def splice_images(cache_meta: dict, info: RunInfo, n_images: int, fallback: DataConfig
                  ) -> tuple[torch.Tensor, list[int], str]:
    """The held-out images themselves: (images [B, 3, H, W], ids, how)."""
    data_cfg, ids, how = splice_image_ids(cache_meta, info, n_images, fallback)
    images, got = load_images(data_cfg, ids)
    return images, got, how


# --------------------------------------------------------------------------------------------
# Figures and files




def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a/b': 1}, keeping scalars only (for tracker.log)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)):
            out[key] = v
    return out


SUMMARY_COLUMNS = (
    "run", "layer", "arch", "n_features", "expansion", "l1_coeff", "k", "seed", "l0", "fvu",
    "explained_variance", "mse", "cosine", "l2_ratio", "dead_frac", "dense_frac", "kl_sae",
    "kl_zero", "kl_mean", "agreement_sae", "frac_recovered_zero", "frac_recovered_mean",
    "n_vectors", "n_splice_images", "loss_flatness", "loss_decay_gain", "curve_features",
    "copies", "new", "new_in_neuron_gaps", "new_in_gaps_uncovered", "largest_gap_neurons_deg",
    "largest_gap_with_new_deg", "largest_gap_curve_tuned_deg", "new_fdr",
    "frac_more_selective", "frac_more_selective_random",
)


def training_summary(run_dir: Path, n_train_vectors: int | None) -> dict:
    """How far training got: vectors seen, epochs, and how flat the loss and FVU curves are at
    the end. The schedule ends with a linear learning-rate decay to 0 (`train.decay_frac`), and
    a decaying step flattens any curve by construction, so flatness is read before it:
    `loss_flatness` is the relative drop of the mean loss from 55-65% of the constant-rate phase
    to its last 10% (a few percent or less: the curve has levelled off at that rate), and
    `loss_decay_gain` the further drop from there to the last 5% of all steps (what the decay
    adds). The same two for the FVU."""
    path = Path(run_dir) / TRAIN_LOG
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    cfg_json = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        cfg_json = json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    tcfg = (cfg_json.get("meta", {}).get("config") or {}).get("train") or {}
    n_steps, batch = tcfg.get("n_steps"), tcfg.get("batch_size")
    out: dict = {"n_steps": n_steps, "batch_size": batch}
    if n_steps and batch:
        out["n_vectors_seen"] = int(n_steps) * int(batch)
        if n_train_vectors:
            out["epochs"] = out["n_vectors_seen"] / n_train_vectors
    rows = [r for r in rows if isinstance(r.get("step"), (int, float))]
    if len(rows) >= 8:
        last = rows[-1]["step"]

        def window(key: str, lo: float, hi: float) -> float | None:
            v = [r[key] for r in rows if key in r and lo * last < r["step"] <= hi * last]
            return float(np.mean(v)) if v else None

        decay_frac = float(tcfg.get("decay_frac", 0.2) or 0.0)
        flat_end = 1.0 - decay_frac  # the decay starts here (fraction of the last logged step)
        for key in ("loss", "fvu"):
            a, b = window(key, 0.55 * flat_end, 0.65 * flat_end), window(key, 0.9 * flat_end,
                                                                           flat_end)
            c = window(key, 0.95, 1.0)
            if a is not None and b is not None and b > 0:
                out[f"{key}_flatness"] = (a - b) / b
            if b is not None and c is not None and c > 0 and decay_frac > 0:
                out[f"{key}_decay_gain"] = (b - c) / c
    return out


def summary_row(m: dict) -> dict:
    """One sweep-table row from a run's metrics.json content."""
    rec, feat, spl = m.get("reconstruction", {}), m.get("features", {}), m.get("splice") or {}
    hp = m.get("hparams", {})
    arch = m.get("arch")
    # Show only the sparsity knob the architecture actually uses.
    uses_l1 = uses_l1_coeff(arch)
    row = {
        "run": m.get("run"), "layer": m.get("layer"), "arch": arch,
        "n_features": m.get("n_features"), "expansion": hp.get("expansion"),
        "l1_coeff": hp.get("l1_coeff") if uses_l1 else None,
        "k": hp.get("k") if not uses_l1 else None, "seed": hp.get("seed"),
        "l0": rec.get("l0"), "fvu": rec.get("fvu"),
        "explained_variance": rec.get("explained_variance"), "mse": rec.get("mse"),
        "cosine": rec.get("cosine"), "l2_ratio": rec.get("l2_ratio"),
        "dead_frac": feat.get("dead_frac"), "dense_frac": feat.get("dense_frac"),
        "kl_sae": spl.get("kl_sae"), "kl_zero": spl.get("kl_zero"), "kl_mean": spl.get("kl_mean"),
        "agreement_sae": spl.get("agreement_sae"),
        "frac_recovered_zero": spl.get("frac_recovered_zero"),
        "frac_recovered_mean": spl.get("frac_recovered_mean"),
        "n_vectors": rec.get("n_vectors"), "n_splice_images": spl.get("n_images"),
        "loss_flatness": (m.get("training") or {}).get("loss_flatness"),
        "loss_decay_gain": (m.get("training") or {}).get("loss_decay_gain"),
    }
    cur, poly = m.get("curves") or {}, m.get("polysemantic") or {}
    row.update({"curve_features": cur.get("n_feature_detectors"), "copies": cur.get("n_copies"),
                "new": cur.get("n_new"), "new_in_neuron_gaps": cur.get("n_features_in_neuron_gaps"),
                "largest_gap_neurons_deg": cur.get("largest_gap_neurons_deg"),
                "largest_gap_with_new_deg": cur.get("largest_gap_combined_deg"),
                "new_in_gaps_uncovered": cur.get("n_new_in_gaps_uncovered"),
                "largest_gap_curve_tuned_deg": cur.get("largest_gap_curve_tuned_neurons_deg"),
                "new_fdr": cur.get("new_fdr"),
                "frac_more_selective": poly.get("frac_more_selective"),
                "frac_more_selective_random": poly.get("frac_more_selective_random")})
    return row


def write_summary(rows: list[dict], out_dir: Path) -> tuple[Path, Path, list[Path]]:
    """Sweep table as CSV + JSON, and the L0-vs-FVU and L0-vs-KL frontier plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drop_stale_tmp(out_dir)
    rows = sorted(rows, key=lambda r: (str(r["layer"]), str(r["arch"]), r["l0"] or 0))
    csv_path, json_path = out_dir / "summary.csv", out_dir / "summary.json"
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    write_json(json_path, {"columns": list(SUMMARY_COLUMNS), "rows": rows})
    figs = [plots.plot_frontier(rows, "fvu", "FVU", out_dir / "frontier_l0_fvu.png"),
            plots.plot_frontier(rows, "kl_sae", "splice KL (nats)", out_dir / "frontier_l0_kl.png")]
    return csv_path, json_path, [p for p in figs if p is not None]


# --------------------------------------------------------------------------------------------
# The stage


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Session:
    """Things shared by the runs of one evaluation: loaded models and splice baselines."""

    def __init__(self):
        self.models: dict[str, Any] = {}
        self.baselines: dict[tuple, dict] = {}
        self.images: dict[tuple, tuple] = {}
        # the neuron census of one (model, layer, data), reused across the runs of a sweep
        self.census_memo = NeuronCensusMemo()
        self.data_overrides: list[str] = []  # the command line's data overrides (other_data)

    def model(self, mc: ModelConfig):
        key = json.dumps(dataclasses.asdict(mc), sort_keys=True)
        if key not in self.models:
            from sae_vision.models import load_model

            self.models = {key: load_model(mc)}  # one network in memory at a time
        return self.models[key]


def evaluate_run(run_dir: Path, cfg: Config, tracker: Tracker, session: _Session,
                 name: str | None = None, requested_layer: str | None = None,
                 prefix: str = "eval/") -> dict:
    """Full evaluation of one run; writes <run_dir>/eval/ and returns its metrics dict."""
    from sae_vision.checkpoint import load_sae

    def log(metrics: dict) -> None:  # the science stages log under this run's prefix
        tracker.log({f"{prefix}{k}": v for k, v in metrics.items()})

    t0 = time.perf_counter()
    sae, meta = load_sae(run_dir)
    info0 = run_info(run_dir, sae, meta, cfg)
    cache_meta = load_cache_meta(info0.cache_dir)
    info = dataclasses.replace(run_info(run_dir, sae, meta, cfg, cache_meta),
                               name=name or run_dir.name)
    check_dims(info, cache_meta, requested_layer)  # before any real work
    if not info.holdout_shards:
        raise ValueError(f"run {info.name} has no held-out shards; retrain with "
                         "train.holdout_frac > 0 so evaluation never sees training data")
    if meta.get("finished") is False:
        logger.info(f"[evaluate] note: {info.name} is a mid-training checkpoint (step "
              f"{meta.get('step')} of {meta.get('n_steps')})")
    ev = cfg.eval
    other = other_data(cfg, info, session.data_overrides)
    n_train = sum(s["n_vectors"] for s in cache_meta["shards"]
                  if s["name"] in set(info.train_shards))  # the run's own training set
    if other is not None:  # another dataset: every vector of its cache, results in their folder
        o_dir, o_meta, tag = other
        info = dataclasses.replace(info, cache_dir=o_dir, train_shards=(),
                                   holdout_shards=tuple(s["name"] for s in o_meta["shards"]))
        check_dims(info, o_meta)
        cache_meta = o_meta
        logger.info(f"[evaluate] {info.name}: on other data, cache {o_dir} ({o_meta['n_vectors']} "
                    f"vectors); results go to eval/{tag}/, the in-distribution ones stay as they are")
    mc = model_config(cfg, cache_meta)
    device = _device(mc.device)
    sae = sae.to(device).eval()
    logger.info(f"[evaluate] {info.name}: layer {info.layer}, {info.arch}, d_in={info.d_in}, "
          f"F={info.n_features}, held-out shards {list(info.holdout_shards)}")

    out_dir = run_dir / EVAL_DIR if other is None else run_dir / EVAL_DIR / other[2]
    out_dir.mkdir(parents=True, exist_ok=True)
    drop_stale_tmp(out_dir)
    held = (a for a, _, _ in iter_chunks(info.cache_dir, info.holdout_shards))
    topup = batches_of((a for a, _, _ in iter_chunks(info.cache_dir, info.train_shards)),
                       ev.batch_size) if info.train_shards else None
    n_held = sum(s["n_vectors"] for s in cache_meta["shards"] if s["name"] in info.holdout_shards)
    held_batches = track(batches_of(held, ev.batch_size, ev.n_vectors),
                         "evaluate reconstruction", min(n_held, ev.n_vectors), "vec", size=len)
    rec, density = reconstruction_metrics(sae, held_batches, device, ev.dense_threshold,
                                          topup, ev.dead_min_vectors)
    l0_hist = rec.pop("l0_hist")
    l0_max = int(rec["reconstruction"]["l0_max"])
    m: dict = {
        "run": info.name, "run_dir": str(run_dir), "layer": info.layer, "arch": info.arch,
        "d_in": info.d_in, "n_features": info.n_features, "hparams": info.hparams,
        "cache_dir": str(info.cache_dir), "holdout_shards": list(info.holdout_shards),
        "step": meta.get("step"), "finished": meta.get("finished"), **rec,
        "eval_data": {"cache_dir": str(info.cache_dir), "key": cache_meta.get("key"),
                      "in_distribution": other is None},
    }
    m["training"] = training_summary(run_dir, n_train)
    files: dict[str, Path] = {}
    hist = M.log_density_histogram(density.density(), density.n)
    write_json(out_dir / "density_hist.json", {**hist, "density": density.density().tolist()})
    files["density_hist_json"] = out_dir / "density_hist.json"
    files["density_hist_png"] = plots.plot_density(
        hist, f"{info.name}: log10 feature density", out_dir / "density_hist.png")
    l0_counts = l0_hist[: l0_max + 1].tolist()
    write_json(out_dir / "l0_hist.json", {"counts": l0_counts,
                                          **rec["reconstruction"]["l0_quantiles"]})
    files["l0_hist_json"] = out_dir / "l0_hist.json"
    files["l0_hist_png"] = plots.plot_l0(l0_counts, rec["reconstruction"]["l0"],
                                   f"{info.name}: L0 distribution", out_dir / "l0_hist.png")

    no_images = cache_meta.get("source") == "array"  # imported arrays: no images behind them
    if no_images and (ev.splice or ev.curves):
        skipped = [n for n, on in (("splice", ev.splice), ("curve census", ev.curves)) if on]
        logger.info(f"[evaluate] note: {info.name}'s cache {info.cache_dir} was imported from arrays "
                    f"(data=array), so there are no images: skipping the {' and the '.join(skipped)}")
        m["skipped"] = {n: "no images behind an imported array cache" for n in skipped}
    if ev.splice and other is not None and not no_images:
        logger.info(f"[evaluate] note: the splice runs on the run's own held-out images only; "
                    f"skipping it on {info.cache_dir}")
        m.setdefault("skipped", {})["splice"] = "not run on other data"
    if ev.splice and not no_images and other is None:
        model = session.model(mc)
        check_weights(model, cache_meta, info)
        data_cfg, want, how = splice_image_ids(cache_meta, info, ev.n_splice_images, cfg.data)
        # Layers cached from the same images share them; each layer has its own baselines.
        img_key = (json.dumps(dataclasses.asdict(data_cfg), sort_keys=True), tuple(want))
        if img_key not in session.images:
            session.images[img_key] = load_images(data_cfg, want)
        images, ids = session.images[img_key]
        base_key = (json.dumps(dataclasses.asdict(mc), sort_keys=True), info.layer,
                    str(info.cache_dir), img_key)
        mean_C = torch.tensor(cache_meta["mean"], dtype=torch.float32)
        if base_key not in session.baselines:
            session.baselines[base_key] = baseline_logits(model, info.layer, images, mean_C,
                                                          ev.splice_batch_size)
        spl = splice_metrics(model, sae, info.layer, images, mean_C, ev.splice_batch_size,
                             session.baselines[base_key])
        m["splice"] = {**spl, "images": how, "image_ids": ids}
    if ev.compare_run:
        m["stability"] = _stability(cfg, sae, run_dir, ev.compare_run)
    want_curves = ev.curves and not no_images and (not ev.curves_layers
                                                   or info.layer in ev.curves_layers)
    held_ND = None
    if want_curves or ev.polysemantic:  # held-out vectors: feature σ and the decomposition
        held_ND = torch.cat(list(batches_of(
            (a for a, _, _ in iter_chunks(info.cache_dir, info.holdout_shards)),
            ev.batch_size, ev.polysemantic_vectors)))
    if want_curves:
        model = session.model(mc)
        check_weights(model, cache_meta, info)
        m["curves"] = _curves(cfg, sae, info, model, out_dir, log,
                              census_inputs(cfg, info, cache_meta, session), held_ND,
                              session.census_memo)
        files["curves_json"] = Path(m["curves"]["path"])
        files.update({k: Path(v) for k, v in m["curves"].pop("figures").items()})
    if ev.polysemantic:
        m["polysemantic"] = _polysemantic(cfg, sae, info, device, out_dir, log, held_ND)
        files["polysemantic_json"] = Path(m["polysemantic"]["path"])
    m["eval_seconds"] = time.perf_counter() - t0
    m["files"] = {k: str(v) for k, v in files.items()}
    metrics_path = out_dir / "metrics.json"
    write_json(metrics_path, m)
    files["metrics"] = metrics_path
    m["files"] = {k: str(v) for k, v in files.items()}
    _print_headline(m)
    return to_json(m)


def data_overrides(overrides: Sequence[str]) -> list[str]:
    """The data.*/data= overrides among a command line's overrides."""
    return [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] == "data"]


def other_data(cfg: Config, info: RunInfo, overrides: Sequence[str] = ()
               ) -> tuple[Path, dict, str] | None:
    """(cache dir, its metadata, a folder name) of the data to evaluate on, if not the run's own.

    `eval.cache` names it (a cache key under paths.root/cache, or a folder); otherwise data
    overrides on the command line (e.g. `data=imagefolder data.root=...`) name the cache that
    `stage=cache` builds for them at the run's layer. Results go under eval/on-<key>/.
    `overrides` are the command line's data overrides (see data_overrides).
    """
    if cfg.eval.cache:
        spec = str(cfg.eval.cache)
        d = Path(spec) if Path(spec).is_dir() else Path(cfg.paths.root) / "cache" / spec
        if not (d / "metadata.json").exists():
            raise ValueError(f"eval.cache={spec} is not a complete activation cache (neither a "
                             f"folder nor a key under {Path(cfg.paths.root) / 'cache'}); build "
                             "it with stage=cache first")
    elif overrides:
        d = paths.cache_dir(dataclasses.replace(cfg, cache=dataclasses.replace(
            cfg.cache, dir=None, layers=None)), info.layer)
        if d.resolve() == Path(info.cache_dir).resolve():
            return None
        if not (d / "metadata.json").exists():
            raise ValueError(
                f"evaluating {info.name} on {' '.join(overrides)} needs their activations at "
                f"layer {info.layer} first: python run.py stage=cache layer={info.layer} "
                f"{' '.join(overrides)} (or name an existing cache with eval.cache=<key or dir>)")
    else:
        return None
    if d.resolve() == Path(info.cache_dir).resolve():
        return None
    meta = load_cache_meta(d)
    return d, meta, f"on-{meta.get('key') or d.name}"


def _stability(cfg: Config, sae, run_dir: Path, compare: str) -> dict:
    """Hungarian matching of this run's decoder atoms against another run's (another seed)."""
    from sae_vision.checkpoint import load_sae

    others, _ = resolve_runs(cfg, compare)
    if len(others) != 1:
        raise ValueError(f"eval.compare_run={compare!r} must name exactly one run "
                         f"(it matches {len(others)})")
    other, _ = load_sae(others[0])
    if int(other.d_in) != int(sae.d_in):
        raise ValueError(f"eval.compare_run={compare!r} has d_in={other.d_in}, this run has "
                         f"d_in={sae.d_in}: compare runs trained on the same layer")
    res = M.match_dictionaries(sae.W_dec.detach(), other.W_dec.detach())
    return {"compare_run": str(others[0]), "mean_cosine": res["mean_cosine"],
            "frac_above_0.9": res["frac_above"], "n_matched": res["n_matched"],
            "same_run": others[0].resolve() == run_dir.resolve()}


def census_inputs(cfg: Config, info: RunInfo, cache_meta: dict, session: _Session) -> dict:
    """What the census measures against, from the data being studied: σ units from the cache's
    own per-channel mean/std when its positions were sampled without bias (`all`, `uniform`);
    otherwise from every position of the reference photos. The null networks' σ and the
    input-block check use `cfg.curves.n_reference_images` held-out photos of the same data."""
    data_cfg, ids, how = splice_image_ids(cache_meta, info, cfg.curves.n_reference_images,
                                          cfg.data)
    img_key = (json.dumps(dataclasses.asdict(data_cfg), sort_keys=True), tuple(ids))
    if img_key not in session.images:
        session.images[img_key] = load_images(data_cfg, ids)
    images, got = session.images[img_key]
    sampling = cache_meta.get("sampling")
    unbiased = sampling in ("all", "uniform") and "mean" in cache_meta and "std" in cache_meta
    out = {"images": images,
           "memo_key": f"{info.cache_dir}|{how}|{','.join(map(str, got))}|{unbiased}",
           "sigma_source": (f"cache {info.cache_dir} ({cache_meta.get('n_vectors')} vectors, "
                            f"sampling={sampling})" if unbiased else
                            f"{len(got)} held-out photos, every position (the cache's "
                            f"sampling={sampling} is biased towards large activations)"),
           "reference_images": {"n": len(got), "how": how}}
    if unbiased:
        out["unit_mean"] = torch.tensor(cache_meta["mean"], dtype=torch.float32)
        out["unit_std"] = torch.tensor(cache_meta["std"], dtype=torch.float32)
    return out


def _curves(cfg: Config, sae, info: RunInfo, model, out_dir: Path, log, inputs: dict,
            held_ND: torch.Tensor, memo: NeuronCensusMemo) -> dict:
    """Curve-detector census of the layer's neurons and this SAE's features -> eval/curves.json."""
    from sae_vision import census

    # Forward passes over the stimulus battery: the real network, then every null network.
    n_networks = 1 + len(cfg.curves.nulls) * int(cfg.curves.n_null_seeds)
    with Progress("evaluate census", unit="stim") as bar:
        def on_batch(n_done: int, n_stimuli: int) -> None:
            if bar.total is None:
                bar.set_total(n_networks * n_stimuli)
            bar.update(n_done)

        res = census.run_census(
            model, info.layer, cfg,
            census.CensusInputs(unit_mean=inputs.get("unit_mean"),
                                unit_std=inputs.get("unit_std"), images=inputs["images"],
                                source=inputs["memo_key"]),
            census.FeatureInputs(sae, vectors=held_ND), memo=memo, out_dir=out_dir, log=log,
            extra={"sigma_source": inputs["sigma_source"],
                   "reference_images": inputs["reference_images"]},
            on_batch=on_batch)
    path = out_dir / "curves.json"
    feats = res.get("features") or {}
    figures = {f"curves_{k}_png": v for k, v in (res.get("files") or {}).items()
               if str(v).endswith(".png")}
    band = res.get("band") or {}
    return {"path": str(path), "figures": figures, "n_neuron_detectors": res["neurons"]["n_detected"],
            "n_feature_detectors": feats.get("n_detected"), "n_copies": feats.get("n_copies"),
            "n_new": feats.get("n_new"), "new_fdr": feats.get("new_fdr_random_directions"),
            "n_new_in_gaps_uncovered": feats.get("n_new_in_gaps_uncovered"),
            "largest_gap_uncovered_new_deg": feats.get(
                "largest_gap_neurons_plus_uncovered_new_deg"),
            "largest_gap_curve_tuned_neurons_deg": feats.get(
                "largest_gap_curve_tuned_neurons_deg"),
            "band": {k: v for k, v in band.items() if k.endswith("_range") or k == "n_points"},
            **{k: res["coverage"].get(k) for k in ("largest_gap_neurons_deg",
                                                   "largest_gap_combined_deg",
                                                   "n_features_in_neuron_gaps")}}


@torch.no_grad()
def _polysemantic(cfg: Config, sae, info: RunInfo, device, out_dir: Path, log,
                  acts_ND: torch.Tensor) -> dict:
    """Neurons decomposed into SAE features, and neuron vs feature selectivity (with a random
    dictionary's score beside it), on held-out vectors -> eval/polysemantic.json."""
    from sae_vision import polysemantic as P

    codes, pre, recon = [], [], []
    for x in track(acts_ND.split(cfg.eval.batch_size), "evaluate polysemantic", len(acts_ND),
                   "vec", size=len):
        x = x.to(device)
        c = sae.encode(x)
        codes.append(c.cpu())
        pre.append(sae.pre_acts(x).cpu())
        recon.append(sae.decode(c).cpu())
    codes_NF, pre_NF, recon_ND = torch.cat(codes), torch.cat(pre), torch.cat(recon)
    l0 = float((codes_NF > 0).sum(1).float().mean())
    ccfg = cfg.curves
    base = P.random_dictionary_baseline(acts_ND, codes_NF.shape[1], round(l0))
    res = P.polysemantic_report(acts_ND, codes_NF, pre_NF, recon_ND, sae.W_dec.detach().cpu(),
                                scale=float(getattr(sae, "input_scale", 1.0)),
                                min_share=ccfg.polysemantic_min_share,
                                top_frac=ccfg.selectivity_top_frac, baseline=base)
    res = {"run": info.name, "layer": info.layer, "n_vectors": len(acts_ND), **res}
    path = out_dir / "polysemantic.json"
    write_json(path, res)
    s = res["summary"]
    out = {"path": str(path), "n_vectors": len(acts_ND),
           "frac_more_selective": s["mean_frac_own_features_more_selective"],
           "frac_more_selective_random": s["random_dictionary"][
               "mean_frac_own_features_more_selective"],
           "excess_over_random": s["excess_over_random"],
           "median_kurtosis_neurons": s["kurtosis"]["neurons"].get("p50"),
           "median_kurtosis_features": s["kurtosis"]["features"].get("p50")}
    log({f"polysemantic/{k}": v for k, v in out.items() if isinstance(v, (int, float))})
    return out


def _print_headline(m: dict) -> None:
    """One line per run with the numbers a researcher looks at first."""
    r, f, s = m["reconstruction"], m["features"], m.get("splice") or {}
    line = (f"[evaluate] {m['run']}: FVU {r['fvu']:.4f}  L0 {r['l0']:.1f}  cos {r['cosine']:.3f}  "
            f"dead {f['n_dead']}/{f['n_features']}  dense {f['n_dense']}")
    if s:
        line += (f"  KL {s['kl_sae']:.4g} (zero {s['kl_zero']:.4g}, mean {s['kl_mean']:.4g})  "
                 f"agree {s['agreement_sae']:.2f}")
    logger.info(line)


def _log_run(tracker: Tracker, m: dict, prefix: str) -> None:
    """Scalars, the two figures and the density table of one run."""
    # (curves/ and polysemantic/ scalars were logged as they were computed)
    tracker.log(flatten({k: m[k] for k in ("reconstruction", "features", "splice", "stability")
                         if k in m}, prefix))
    for key, path in m["files"].items():
        if key.endswith("_png"):
            tracker.log_image(f"{prefix}{key.removesuffix('_png')}", path)
    hist = json.loads(Path(m["files"]["density_hist_json"]).read_text())
    edges = hist["edges"]
    tracker.log_table(f"{prefix}density_hist", [
        {"log10_density_lo": edges[i], "log10_density_hi": edges[i + 1], "n_features": c}
        for i, c in enumerate(hist["counts"])])


def run(cfg: Config, tracker: Tracker | None = None,
        overrides: Sequence[str] = ()) -> EvalResult:
    """Evaluate the run(s) selected by cfg.sae.run; write eval/ folders and a sweep summary.

    `overrides` are the command line's (run.py passes them): data overrides there select other
    data to evaluate on (see other_data)."""
    tracker = tracker or disabled()
    run_dirs, is_set = resolve_runs(cfg)
    session = _Session()
    session.data_overrides = data_overrides(overrides)
    results: dict[str, dict] = {}
    metric_paths = []
    single = len(run_dirs) == 1 and not is_set
    root = paths.sae_root(cfg).resolve()
    for run_dir in run_dirs:
        # Runs are named by their path under sae_root, so nested sweeps never collide.
        key = str(run_dir.resolve().relative_to(root)) if run_dir.resolve().is_relative_to(
            root) else run_dir.name
        prefix = "eval/" if single else f"eval/{key}/"
        m = evaluate_run(run_dir, cfg, tracker, session, key,
                         requested_layer=cfg.layer.name if single else None, prefix=prefix)
        results[key] = m
        metric_paths.append(m["files"]["metrics"])
        _log_run(tracker, m, prefix)
    written = list(metric_paths)
    for m in results.values():
        written += [p for k, p in m["files"].items() if k != "metrics"]
    csv_path = json_path = None
    figs: list[Path] = []
    if len(run_dirs) > 1 or is_set:
        rows = [summary_row(m) for m in results.values()]
        csv_path, json_path, figs = write_summary(rows, paths.sae_root(cfg) / SUMMARY_DIR)
        tracker.log_table("eval/summary", [to_json(r) for r in rows])
        for p in figs:
            tracker.log_image(f"eval/{p.stem}", p)
        written += [str(csv_path), str(json_path)] + [str(p) for p in figs]
    if single:
        only = next(iter(results.values()))
        tracker.summary(flatten({k: only[k] for k in ("reconstruction", "features", "splice")
                                 if k in only}, "eval/"))
    for p in written:
        logger.info(f"[evaluate] wrote {p}")
    return EvalResult(
        run_dirs=tuple(str(p) for p in run_dirs), metrics_paths=tuple(metric_paths),
        metrics=results, summary_csv_path=str(csv_path) if csv_path else None,
        summary_json_path=str(json_path) if json_path else None,
        frontier_paths=tuple(str(p) for p in figs))
