"""Stage `evaluate`: judge trained SAEs on held-out data.

For each selected run (`sae.run`: a run name, `glob(pattern)`, a plain glob or a sweep folder):
  1. reconstruction (MSE, FVU, explained variance, cosine, L2 ratio, L0 distribution), the
     neuron-basis baseline at the same L0 (each vector's top-k channels) and feature health
     (dead / dense counts, log10 density histogram) on the run's held-out cache shards;
  2. the downstream splice: the network with the layer replaced by the SAE's reconstruction at
     every position, on held-out images, against zero- and mean-ablation of the same layer;
  3. optionally cross-seed stability (eval.compare_run), the curve census (eval.curves) and the
     polysemantic-neuron analysis (eval.polysemantic).
Everything lands in `<run_dir>/eval/` and the tracker. Several runs also get a sweep summary
(`<sae_root>/summary/`: CSV, JSON and the sparsity-fidelity frontier plots).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_vision.activations import iter_chunks, load_cache_meta, pick_device, stage_device
from sae_vision.census import NeuronCensusMemo
from sae_vision.core import (
    Config,
    DataConfig,
    ModelConfig,
    Progress,
    Tracker,
    disabled,
    drop_stale_tmp,
    io,
    paths,
    plots,
    to_json,
    track,
    write_json,
)
from sae_vision.sae import (
    EVAL_DIR,
    SUMMARY_DIR,
    WEIGHTS_FILE,
    RunInfo,
    RunLocked,
    check_dims,
    check_weights,
    model_config,
    resolve_runs,
    run_info,
)

from . import metrics as M
from .exemplars import exemplar_inputs, held_out_with_pos
from .fidelity import (
    baseline_logits,
    batches_of,
    load_images,
    neuron_baseline,
    reconstruction_metrics,
    splice_image_ids,
    splice_metrics,
)
from .summary import flatten, summary_row, training_summary, write_summary

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
# The stage


class _Session:
    """Things shared by the runs of one evaluation: loaded models and splice baselines."""

    def __init__(self):
        self.models: dict[str, Any] = {}
        self.baselines: dict[tuple, dict] = {}
        self.images: dict[tuple, tuple] = {}
        # the neuron census of one (model, layer, data), reused across the runs of a sweep
        self.census_memo = NeuronCensusMemo()
        self.data_overrides: list[str] = []  # the command line's data overrides (other_data)
        self.exemplars: dict[tuple, torch.Tensor] = {}  # exemplar embeddings, shared by runs

    def images_of(self, data_cfg: DataConfig, ids: list[int]) -> tuple[tuple, torch.Tensor,
                                                                         list[int]]:
        """The images with these ids from this data, loaded once per session (the splice and
        the census of every run share them); returns (key, images, the ids that loaded)."""
        key = (json.dumps(dataclasses.asdict(data_cfg), sort_keys=True), tuple(ids))
        if key not in self.images:
            self.images[key] = load_images(data_cfg, ids)
        return (key, *self.images[key])

    def model(self, mc: ModelConfig):
        key = json.dumps(dataclasses.asdict(mc), sort_keys=True)
        if key not in self.models:
            from sae_vision.activations import load_model

            self.models = {key: load_model(mc)}  # one network in memory at a time
        return self.models[key]


def _open_run(run_dir: Path, cfg: Config, session: _Session, name: str | None,
              requested_layer: str | None) -> tuple:
    """Load the run and choose its data; every check that can fail runs here, before real work.

    Returns (sae, meta, info, cache_meta, other, n_train): `other` is other_data's answer (None
    for the run's own held-out shards) and n_train the size of the run's own training set."""
    from sae_vision.sae import load_sae

    sae, meta = load_sae(run_dir)
    logger.info(f"[evaluate] loading {run_dir / WEIGHTS_FILE} (step {meta.get('step')} of "
                f"{meta.get('n_steps')})")
    info0 = run_info(run_dir, sae, meta, cfg)
    cache_meta = load_cache_meta(info0.cache_dir)
    info = dataclasses.replace(run_info(run_dir, sae, meta, cfg, cache_meta),
                               name=name or run_dir.name)
    check_dims(info, cache_meta, requested_layer)
    if not info.holdout_shards:
        raise ValueError(f"run {info.name} has no held-out shards; retrain with "
                         "train.holdout_frac > 0 so evaluation never sees training data")
    if meta.get("finished") is False:
        logger.info(f"[evaluate] note: {info.name} is a mid-training checkpoint (step "
                    f"{meta.get('step')} of {meta.get('n_steps')})")
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
    return sae, meta, info, cache_meta, other, n_train


def _reconstruction(sae, info: RunInfo, cache_meta: dict, ev, device, out_dir: Path
                    ) -> tuple[dict, dict[str, Path]]:
    """Reconstruction and feature health on the held-out shards, with their histograms written
    (JSON and PNG). Returns (metrics, files)."""
    held = (a for a, _, _ in iter_chunks(info.cache_dir, info.holdout_shards))
    topup = batches_of((a for a, _, _ in iter_chunks(info.cache_dir, info.train_shards)),
                       ev.batch_size) if info.train_shards else None
    n_held = sum(s["n_vectors"] for s in cache_meta["shards"] if s["name"] in info.holdout_shards)
    held_batches = track(batches_of(held, ev.batch_size, ev.n_vectors),
                         "evaluate reconstruction", min(n_held, ev.n_vectors), "vec", size=len)
    rec, density = reconstruction_metrics(sae, held_batches, device, ev.dense_threshold,
                                          topup, ev.dead_min_vectors)
    rec["neuron_baseline"] = neuron_baseline(
        batches_of((a for a, _, _ in iter_chunks(info.cache_dir, info.holdout_shards)),
                   ev.batch_size, ev.n_vectors), rec["reconstruction"]["l0"],
        torch.tensor(cache_meta["mean"], dtype=torch.float64), rec["reconstruction"]["fvu"])
    l0_hist = rec.pop("l0_hist")
    l0_max = int(rec["reconstruction"]["l0_max"])
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
    return rec, files


def _skipped(ev, info: RunInfo, cache_meta: dict) -> dict[str, str]:
    """What cannot run on this data, each with a note in the log: splice and census need the
    images behind the cache (an imported array has none). On another image folder both run, on
    its images (the images are known: its cache records them)."""
    skipped: dict[str, str] = {}
    if cache_meta.get("source") == "array":  # imported arrays: no images behind them
        wanted = [n for n, on in (("splice", ev.splice), ("curve census", ev.curves)) if on]
        if wanted:
            logger.info(f"[evaluate] note: {info.name}'s cache {info.cache_dir} was imported from "
                        f"arrays (data=array), so there are no images: skipping the "
                        f"{' and the '.join(wanted)}")
        skipped.update({n: "no images behind an imported array cache" for n in wanted})
    return skipped


def _splice(cfg: Config, session: _Session, mc: ModelConfig, sae, info: RunInfo,
            cache_meta: dict) -> dict:
    """The downstream splice on held-out images; images and ablation baselines are shared by the
    runs of the session that splice at the same layer of the same data."""
    ev = cfg.eval
    model = session.model(mc)
    check_weights(model, cache_meta, info)
    data_cfg, want, how = splice_image_ids(cache_meta, info, ev.n_splice_images, cfg.data)
    # Layers cached from the same images share them; each layer has its own baselines.
    img_key, images, ids = session.images_of(data_cfg, want)
    base_key = (json.dumps(dataclasses.asdict(mc), sort_keys=True), info.layer,
                str(info.cache_dir), img_key)
    mean_C = torch.tensor(cache_meta["mean"], dtype=torch.float32)
    if base_key not in session.baselines:
        session.baselines[base_key] = baseline_logits(model, info.layer, images, mean_C,
                                                      ev.splice_batch_size)
    spl = splice_metrics(model, sae, info.layer, images, mean_C, ev.splice_batch_size,
                         session.baselines[base_key])
    return {**spl, "images": how, "image_ids": ids}


@contextmanager
def evaluating(run_dir: Path) -> Iterator[None]:
    """Hold the run's evaluation lock (eval.lock beside eval/): a second evaluation of the same
    run at once is refused, naming the live one, so neither overwrites the other's files."""
    def busy(holder: str) -> RunLocked:
        return RunLocked(f"run {run_dir} is being evaluated by another live process ({holder}); "
                         "wait for it to finish and read its results in eval/, or rerun then")

    with io.hold_lock(run_dir / "eval.lock", busy):
        yield


def evaluate_run(run_dir: Path, cfg: Config, tracker: Tracker, session: _Session,
                 name: str | None = None, requested_layer: str | None = None,
                 prefix: str = "eval/") -> dict:
    """Full evaluation of one run; writes <run_dir>/eval/ and returns its metrics dict."""

    def log(metrics: dict) -> None:  # the science stages log under this run's prefix
        tracker.log({f"{prefix}{k}": v for k, v in metrics.items()})

    t0 = time.perf_counter()
    sae, meta, info, cache_meta, other, n_train = _open_run(run_dir, cfg, session, name,
                                                            requested_layer)
    ev = cfg.eval
    mc = model_config(cfg, cache_meta)
    device = pick_device(mc.device, "model.device")
    sae = sae.to(device).eval()
    logger.info(f"[evaluate] {info.name}: layer {info.layer}, {info.arch}, d_in={info.d_in}, "
                f"F={info.n_features}, held-out shards {list(info.holdout_shards)}")
    out_dir = run_dir / EVAL_DIR if other is None else run_dir / EVAL_DIR / other[2]
    out_dir.mkdir(parents=True, exist_ok=True)
    drop_stale_tmp(out_dir)
    rec, files = _reconstruction(sae, info, cache_meta, ev, device, out_dir)
    m: dict = {
        "run": info.name, "run_dir": str(run_dir), "layer": info.layer, "arch": info.arch,
        "d_in": info.d_in, "n_features": info.n_features, "hparams": info.hparams,
        "cache_dir": str(info.cache_dir), "holdout_shards": list(info.holdout_shards),
        "step": meta.get("step"), "finished": meta.get("finished"), **rec,
        "eval_data": {"cache_dir": str(info.cache_dir), "key": cache_meta.get("key"),
                      "in_distribution": other is None},
    }
    m["training"] = training_summary(run_dir, n_train)
    skipped = _skipped(ev, info, cache_meta)
    if skipped:
        m["skipped"] = skipped
    if ev.splice and "splice" not in skipped:
        m["splice"] = _splice(cfg, session, mc, sae, info, cache_meta)
    if ev.compare_run:
        m["stability"] = _stability(cfg, sae, run_dir, ev.compare_run)
    want_curves = ev.curves and "curve census" not in skipped and (
        not ev.curves_layers or info.layer in ev.curves_layers)
    held_ND = held_pos = None
    if ev.polysemantic:  # held-out vectors: the decomposition
        held_ND, held_pos = held_out_with_pos(info, ev.polysemantic_vectors,
                                              ev.held_out_sample == "spread")
    if want_curves:
        model = session.model(mc)
        check_weights(model, cache_meta, info)
        m["curves"] = _curves(cfg, sae, info, model, out_dir, log,
                              census_inputs(cfg, info, cache_meta, session),
                              session.census_memo)
        files["curves_json"] = Path(m["curves"]["path"])
        files.update({k: Path(v) for k, v in m["curves"].pop("figures").items()})
    if ev.polysemantic:
        ex = exemplar_inputs(cfg, session, mc, info, cache_meta, held_pos)
        m["polysemantic"] = _polysemantic(cfg, sae, info, device, out_dir, log, held_ND, ex)
        files["polysemantic_json"] = Path(m["polysemantic"]["path"])
    m["eval_seconds"] = time.perf_counter() - t0
    metrics_path = out_dir / "metrics.json"
    m["files"] = {k: str(v) for k, v in files.items()}
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
    from sae_vision.sae import load_sae

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
    """What the census measures against, from the data being studied: one σ sample,
    `cfg.curves.n_reference_images` held-out photos of the same data at every position, for
    the neurons, the null networks, the SAE features and the input-block check alike."""
    data_cfg, ids, how = splice_image_ids(cache_meta, info, cfg.curves.n_reference_images,
                                          cfg.data)
    _, images, got = session.images_of(data_cfg, ids)
    return {"images": images,
            "memo_key": f"{info.cache_dir}|{how}|{','.join(map(str, got))}",
            "photos": f"held-out photos of cache {info.cache_dir} ({how}: image ids "
                      f"{got[0]}-{got[-1]})" if got else f"no photos of cache {info.cache_dir}"}


def _curves(cfg: Config, sae, info: RunInfo, model, out_dir: Path, log, inputs: dict,
            memo: NeuronCensusMemo) -> dict:
    """Curve-detector census of the layer's neurons and this SAE's features -> eval/curves.json."""
    from sae_vision.census import CensusInputs, FeatureInputs, run_census

    # Forward passes over the stimulus battery: the real network, then every null network.
    n_networks = 1 + len(cfg.curves.nulls) * int(cfg.curves.n_null_seeds)
    with Progress("evaluate census", unit="stim") as bar:
        def on_batch(n_done: int, n_stimuli: int) -> None:
            if bar.total is None:
                bar.set_total(n_networks * n_stimuli)
            bar.update(n_done)

        res = run_census(
            model, info.layer, cfg,
            CensusInputs(images=inputs["images"], photos=inputs["photos"],
                         source=inputs["memo_key"]),
            FeatureInputs(sae), memo=memo, out_dir=out_dir, log=log, on_batch=on_batch)
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


def _polysemantic(cfg: Config, sae, info: RunInfo, device, out_dir: Path, log,
                  acts_ND: torch.Tensor, exemplars: dict | None = None) -> dict:
    """decompose_run on the held-out vectors, its scalars logged under polysemantic/."""
    from sae_vision.census import decompose_run

    out = decompose_run(sae, acts_ND, cfg.curves, cfg.eval.batch_size, device,
                        out_dir / "polysemantic.json", {"run": info.name, "layer": info.layer},
                        exemplars)
    log({f"polysemantic/{k}": v for k, v in out.items() if isinstance(v, (int, float))})
    return out


def _print_headline(m: dict) -> None:
    """One line per run with the numbers a researcher looks at first."""
    r, f, s = m["reconstruction"], m["features"], m.get("splice") or {}
    line = (f"[evaluate] {m['run']}: FVU {r['fvu']:.4f}  L0 {r['l0']:.1f}  cos {r['cosine']:.3f}  "
            f"dead {f['n_dead']}/{f['n_features']}  dense {f['n_dense']}")
    nb = m.get("neuron_baseline") or {}
    if nb:
        line += (f"  top-{nb['k']} neurons FVU {nb['fvu_zero']:.4f} (mean-filled "
                 f"{nb['fvu_mean']:.4f}, SAE gain x{nb['gain']:.2f})")
    if s:
        line += (f"  KL {s['kl_sae']:.4g} (zero {s['kl_zero']:.4g}, mean {s['kl_mean']:.4g})  "
                 f"agree {s['agreement_sae']:.2f}")
    logger.info(line)


def _log_run(tracker: Tracker, m: dict, prefix: str) -> None:
    """Scalars, the two figures and the density table of one run."""
    # (curves/ and polysemantic/ scalars were logged as they were computed)
    tracker.log(flatten({k: m[k] for k in ("reconstruction", "neuron_baseline", "features",
                                           "splice", "stability") if k in m}, prefix))
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
    stage_device("evaluate", cfg.model.device, "model.device")
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
        with evaluating(run_dir):
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
        tracker.summary(flatten({k: only[k] for k in ("reconstruction", "neuron_baseline",
                                                      "features", "splice") if k in only},
                                "eval/"))
    for p in written:
        logger.info(f"[evaluate] wrote {p}")
    return EvalResult(
        run_dirs=tuple(str(p) for p in run_dirs), metrics_paths=tuple(metric_paths),
        metrics=results, summary_csv_path=str(csv_path) if csv_path else None,
        summary_json_path=str(json_path) if json_path else None,
        frontier_paths=tuple(str(p) for p in figs))
