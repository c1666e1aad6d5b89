"""The run folder: what a trained SAE's folder holds, finding runs, and what a run recorded.

A run folder (`artifacts/sae/<run_name>/`) holds
    sae.safetensors, config.json          the latest checkpoint (what evaluate and report load)
    train_state.safetensors/.json         optimiser and trainer state of that checkpoint
    checkpoints/step-NNNNNNN/             the same four files, committed by one folder rename
    train_log.jsonl                       every logged scalar
    train_metrics.json                    final metrics; its presence means "finished"
    eval/                                 what stage=evaluate wrote (metrics.json, figures, ...)
Evaluate and report both select runs and rebuild a run's model and data settings from here.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_vision.activations import split_shards
from sae_vision.core import (
    ALL_LAYER_DIMS,
    Config,
    DataConfig,
    ModelConfig,
    PlantConfig,
    paths,
    to_plain,
)

# The file names of a run folder: declared here once.
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
# What one checkpoint is; the run folder's top level holds the latest copy of each.
CKPT_FILES = (WEIGHTS_FILE, CONFIG_FILE, TRAIN_STATE_FILE, TRAIN_STATE_JSON)
CHECKPOINTS_DIR = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
TRAIN_METRICS = "train_metrics.json"
EVAL_DIR = "eval"
LOCK_FILE = ".lock"
# The sweep summary folder beside the runs (not a run itself).
SUMMARY_DIR = "summary"


# --------------------------------------------------------------------------------------------
# Selecting runs


def is_run_dir(path: Path) -> bool:
    """A run folder holds a checkpoint and its config.json."""
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def runs_under(folder: Path) -> list[Path]:
    """Run folders below `folder`; a run's own checkpoints/step-N copies are not runs."""
    runs = []
    for dirpath, dirnames, _ in os.walk(folder):
        here = Path(dirpath)
        if is_run_dir(here):
            runs.append(here)
            dirnames.clear()
        else:
            # A run's checkpoints are never taken for runs (evaluate names what it loads).
            dirnames[:] = [d for d in dirnames
                           if not d.startswith(".") and d not in (SUMMARY_DIR, CHECKPOINTS_DIR)]
    return sorted(runs)


def _available(root: Path) -> str:
    names = [str(p.relative_to(root)) for p in runs_under(root)] if root.is_dir() else []
    if not names:
        return f"there are no runs under {root} yet; train one with `python run.py stage=train`"
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"runs under {root}: {shown}"


def resolve_runs(cfg: Config, spec: str | None = None) -> tuple[list[Path], bool]:
    """Run folders selected by cfg.sae.run, and whether the selector names a set (glob/sweep).

    `sae.run` may be: unset (the run that `stage=train` would write for this config), a run name
    under paths.sae_root(cfg) or a path, `glob(pattern)` or a plain glob (relative to sae_root
    unless absolute), or a folder holding several runs (a sweep).
    """
    root = paths.sae_root(cfg)
    spec = cfg.sae.run if spec is None else spec
    derived = spec is None or str(spec).strip() == ""
    if derived:
        d_in = ALL_LAYER_DIMS.get(cfg.layer.name, cfg.layer.dim)
        spec = paths.run_name(cfg, d_in)
    spec = str(spec).strip()
    if spec.startswith("glob(") and spec.endswith(")"):
        pattern, is_glob = spec[5:-1].strip().strip("'\""), True
    else:
        pattern, is_glob = spec, any(c in spec for c in "*?[")
    if is_glob:
        base = "" if os.path.isabs(pattern) else str(root)
        hits = sorted(Path(p) for p in globlib.glob(os.path.join(base, pattern)))
        runs: list[Path] = []
        for hit in hits:
            if is_run_dir(hit):
                runs.append(hit)
            elif hit.is_dir() and hit.name != SUMMARY_DIR:
                runs += runs_under(hit)
        runs = sorted(dict.fromkeys(runs))
        if not runs:
            raise ValueError(f"sae.run={spec!r} matches no SAE run; {_available(root)}")
        return runs, True
    for cand in (root / spec, Path(spec)):
        if is_run_dir(cand):
            return [cand], False
        _refuse_broken_run(cand)
        if cand.is_dir():
            runs = runs_under(cand)
            if runs:
                return runs, True
    if derived:
        raise ValueError(f"sae.run is unset, so evaluate looked for the run that stage=train "
                         f"writes for these settings ({spec}), and it does not exist; pass "
                         f"sae.run=<run name>, a glob such as sae.run='{cfg.layer.name}-*', or a "
                         f"sweep folder; {_available(root)}")
    raise ValueError(f"sae.run={spec!r} is not an SAE run folder (one holding {WEIGHTS_FILE} and "
                     f"{CONFIG_FILE}) nor a folder of runs; {_available(root)}")


def _refuse_broken_run(folder: Path) -> None:
    """A run folder that lost its final weights is an error naming the fix, never a silent
    evaluation of one of its checkpoints."""
    ckpts = sorted((folder / CHECKPOINTS_DIR).glob("step-*")) if folder.is_dir() else []
    if not ckpts and not (folder / CONFIG_FILE).is_file():
        return
    lacks = ", ".join(f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / f).is_file())
    alt = f", or pass sae.run={ckpts[-1]} to evaluate that checkpoint" if ckpts else ""
    raise ValueError(f"run folder {folder} has no {lacks}; rerun the train command that wrote it "
                     f"(python run.py stage=train with the same settings) to restore it from its "
                     f"newest intact checkpoint{alt}")


# --------------------------------------------------------------------------------------------
# Reading what a run recorded


def _lookup(meta: dict, dotted: str, default=None):
    """meta['a']['b'] for 'a.b', else the same under meta['config'] (the run's resolved config)."""
    for base in (meta, meta.get("config")):
        node: Any = base
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return default


@dataclass(frozen=True)
class RunInfo:
    """The facts about one run that evaluation needs, read from its config.json."""

    run_dir: Path
    name: str
    layer: str
    cache_dir: Path
    holdout_shards: tuple[str, ...]
    train_shards: tuple[str, ...]
    arch: str
    n_features: int
    d_in: int
    hparams: dict


def recorded_cache(meta: dict, cfg: Config, layer: str) -> Path:
    """The cache a run was trained on: by its path relative to paths.root (so a moved or copied
    artifacts folder still finds it), then by its key under paths.root, then by the absolute
    path recorded at training time; the config's own cache when the run records none."""
    root, rel, key = Path(cfg.paths.root), meta.get("cache_rel"), meta.get("cache_key")
    found = [root / rel if rel else None, root / "cache" / key if key else None,
             Path(meta["cache_dir"]) if meta.get("cache_dir") else None]
    found = [d for d in found if d is not None]
    for d in found:
        if (d / "metadata.json").is_file():
            return d
    return found[0] if found else paths.cache_dir(cfg, layer)


def run_info(run_dir: Path, sae, meta: dict, cfg: Config, cache_meta: dict | None = None
             ) -> RunInfo:
    """Layer, cache and held-out shards of a run (recorded values first, then the config's)."""
    layer = meta.get("layer") or _lookup(meta, "layer.name") or cfg.layer.name
    cache_dir = Path(cfg.cache.dir) if cfg.cache.dir else recorded_cache(meta, cfg, layer)
    holdout, train = meta.get("holdout_shards"), meta.get("train_shards")
    if holdout is None and cache_meta is not None:
        # A run that did not record its split: recompute train's deterministic one.
        frac = _lookup(meta, "train.holdout_frac", cfg.train.holdout_frac)
        train, holdout = split_shards(cache_meta, float(frac))
    hp = {
        "arch": getattr(sae, "arch", None) or _lookup(meta, "sae.arch"),
        "n_features": int(getattr(sae, "n_features", 0) or _lookup(meta, "n_features", 0)),
        "expansion": _lookup(meta, "sae.expansion"),
        "k": _lookup(meta, "sae.k"),
        "l1_coeff": _lookup(meta, "sae.l1_coeff"),
        "seed": _lookup(meta, "train.seed"),
        "n_steps": _lookup(meta, "train.n_steps"),
    }
    return RunInfo(run_dir=run_dir, name=run_dir.name, layer=str(layer), cache_dir=cache_dir,
                   holdout_shards=tuple(holdout or ()), train_shards=tuple(train or ()),
                   arch=str(hp["arch"]), n_features=hp["n_features"], d_in=int(sae.d_in),
                   hparams=hp)


def check_dims(info: RunInfo, cache_meta: dict, requested_layer: str | None = None) -> None:
    """Refuse, before any work, an SAE whose d_in does not fit the layer or its cache."""
    same = [la for la, d in ALL_LAYER_DIMS.items() if d == info.d_in]
    hint = (f"layers with {info.d_in} channels: {', '.join(same)}" if same
            else f"no InceptionV1 layer has {info.d_in} channels")
    if requested_layer is not None and requested_layer != info.layer:
        raise ValueError(
            f"SAE run {info.name} was trained on layer {info.layer!r} (d_in={info.d_in}) but "
            f"layer={requested_layer!r} ({ALL_LAYER_DIMS.get(requested_layer, '?')} channels) "
            f"was requested; pass layer={info.layer} or choose a run trained on "
            f"{requested_layer}")
    layer_dim = ALL_LAYER_DIMS.get(info.layer)
    if layer_dim is not None and layer_dim != info.d_in:
        raise ValueError(
            f"SAE run {info.name} has d_in={info.d_in} but layer {info.layer!r} has {layer_dim} "
            f"channels; evaluate it at a layer of width {info.d_in} ({hint}) or retrain it "
            f"with layer={info.layer}")
    cache_dim = int(cache_meta["dim"])
    if cache_dim != info.d_in:
        raise ValueError(
            f"SAE run {info.name} has d_in={info.d_in} but the activation cache {info.cache_dir} "
            f"(layer {cache_meta.get('layer')!r}) has dim {cache_dim}; point cache.dir at the "
            f"cache the run was trained on ({hint}) or retrain the SAE on this cache")



# --------------------------------------------------------------------------------------------
# The model and data a run's cache came from


def data_config(cache_meta: dict, fallback: DataConfig) -> DataConfig:
    """The DataConfig that produced the cache (its image indices refer to that source)."""
    rec = cache_meta.get("data")
    base = to_plain(fallback) if not dataclasses.is_dataclass(fallback) else dataclasses.asdict(
        fallback)
    if isinstance(rec, dict):
        base.update({k: v for k, v in rec.items() if k in base})
        if "views" not in rec:  # recorded before data.views existed: one item per photo
            base["views"] = 1
    return DataConfig(**base)


def model_config(cfg: Config, cache_meta: dict) -> ModelConfig:
    """cfg.model with the network identity taken from the cache that the SAE was trained on."""
    plain = to_plain(cfg.model)
    plain["plant"] = PlantConfig(**plain.get("plant") or {})
    mc = ModelConfig(**{k: v for k, v in plain.items()
                        if k in {f.name for f in dataclasses.fields(ModelConfig)}})
    rec = (cache_meta.get("settings") or {}).get("model") or {}
    ident = {k: rec[k] for k in ("family", "name", "pretrained", "weights_path") if k in rec}
    if rec:  # the cache's plant (none when its settings name none), never the command line's
        ident["plant"] = PlantConfig(**rec.get("plant") or {})
    if not ident and cache_meta.get("model") in ("googlenet_bvlc", "inceptionv1", "timm"):
        ident = {"family": cache_meta["model"], "name": cache_meta.get("model_name", mc.name)}
    return dataclasses.replace(mc, **ident)


def check_weights(model, cache_meta: dict, info: RunInfo) -> None:
    """Splicing into a different network than the one cached would be silently wrong."""
    have, want = getattr(model, "weights_sha256", None), cache_meta.get("weights_sha256")
    if have and want and have != want:
        raise ValueError(
            f"the model loaded for the splice (weights sha256 {have[:12]}) is not the one that "
            f"produced the cache {info.cache_dir} ({want[:12]}); set model.weights_path to the "
            "weights used for stage=cache")
