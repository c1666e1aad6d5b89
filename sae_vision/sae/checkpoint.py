"""Checkpoints and the train state on disk: safetensors plus JSON, reloadable without Hydra and
without pickle; a checkpoint is committed whole by one folder rename; one writer per run folder.

    save_sae / load_sae        an SAE's weights and config (what evaluate, report and users load)
    TrainState                 what the trainer needs to resume exactly (optimizer, counters, ...)
    write_checkpoint           both, staged and renamed to checkpoints/step-N, then the top level
    latest_checkpoint          the newest committed step-N folder
    restore_final              the top-level files back from the newest intact checkpoint
    run_lock                   the run folder's lock (io's protocol)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sae_vision.activations import sha256_file
from sae_vision.core import io

from .architectures import as_sae_config, make_sae
from .runs import (
    CHECKPOINTS_DIR,
    CKPT_FILES,
    CONFIG_FILE,
    LOCK_FILE,
    TRAIN_STATE_FILE,
    TRAIN_STATE_JSON,
    WEIGHTS_FILE,
)

FORMAT_VERSION = 2  # of sae.safetensors + config.json; 2: relu_l1 encodes x - b_dec
STATE_FORMAT = 1  # of train_state.safetensors + train_state.json


# What a damaged weights file's error advises.
RESTORE_HINT = ("rerun the train command that wrote it (it restores the run's files from the "
                "newest intact checkpoint), or delete the run folder and train again")
SHA_KEY = "weights_sha256"  # config.json's record of sae.safetensors (train_state.json: sha256)


class RunLocked(RuntimeError):
    """Another live process is writing the same run folder."""


# Files whose sha256 this process has checked, by path -> (inode, size, mtime, sha256): the same
# rule as the cache's shards (each file hashed once per process, again only when it changes).
_VERIFIED: dict[str, tuple] = {}


def file_problem(path: Path, want: str | None) -> str | None:
    """Why `path` is not the file whose sha256 is `want` (None when it is, or nothing is recorded)."""
    if not path.is_file():
        return "missing"
    if not want:
        return None
    st = path.stat()
    key, stamp = str(path.resolve()), (st.st_ino, st.st_size, st.st_mtime_ns, want)
    if _VERIFIED.get(key) == stamp:
        return None
    if sha256_file(path) != want:
        return "damaged (its sha256 is not the recorded one)"
    _VERIFIED[key] = stamp
    return None


def _read_json(path: Path) -> dict:
    """A JSON object file; anything else is a ValueError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({err}); {RESTORE_HINT}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object; {RESTORE_HINT}")
    return data


# --------------------------------------------------------------------------------------------
# The SAE


def write_tensors(tensors: dict, tmp: Path, final: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (disk full above all) as the OSError they
    are, naming `final`: safetensors reports them as a SafetensorError with the OS's code."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        n = int(code.group(1))
        raise OSError(n, os.strerror(n), str(final)) from e


def save_sae(sae, run_dir: str | os.PathLike, meta: dict) -> None:
    """Write run_dir/sae.safetensors, then run_dir/config.json, each atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "arch": sae.arch,
        "d_in": sae.d_in,
        "n_features": sae.n_features,
        "sae": asdict(sae.cfg),
        "meta": meta,
    }
    # Weights first, so a reader never pairs a new config.json with older weights.
    with io.atomic_write(run_dir / WEIGHTS_FILE) as tmp:
        write_tensors(tensors, tmp, run_dir / WEIGHTS_FILE,
                      metadata={"format_version": str(FORMAT_VERSION)})
        config[SHA_KEY] = sha256_file(tmp)
    io.write_json(run_dir / CONFIG_FILE, config, indent=2, sort_keys=True)


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a damaged file is a ValueError naming it and the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is damaged and cannot be read ({err}); delete it (or its checkpoint folder) "
            "and rerun the stage that wrote it"
        ) from err


def load_sae(run_dir: str | os.PathLike, device: str | torch.device = "cpu"
             ) -> tuple[torch.nn.Module, dict]:
    """Read a run folder written by save_sae; returns (sae in eval mode, meta)."""
    run_dir = Path(run_dir)
    weights_path, config_path = run_dir / WEIGHTS_FILE, run_dir / CONFIG_FILE
    missing = [p.name for p in (weights_path, config_path) if not p.is_file()]
    if missing:
        raise ValueError(
            f"{run_dir} is not an SAE run folder: missing {', '.join(missing)} "
            f"(save_sae writes {WEIGHTS_FILE} and {CONFIG_FILE})"
        )
    try:
        config = json.loads(config_path.read_text())
        problem = file_problem(weights_path, config.get(SHA_KEY))
        cfg = as_sae_config(dict(config["sae"]))  # keys of other versions are ignored
        d_in = int(config["d_in"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_path} is not a valid SAE config: {err!r}") from err
    if problem:
        raise ValueError(f"{weights_path} is {problem}; {RESTORE_HINT}")
    with torch.random.fork_rng(devices=[]):  # loading must not move the caller's RNG stream
        sae = make_sae(cfg, d_in)
    if "n_features" in config and int(config["n_features"]) != sae.n_features:
        raise ValueError(
            f"{config_path}: n_features={config['n_features']} but the sae config "
            f"gives {sae.n_features}"
        )
    tensors = load_checkpoint_file(weights_path)
    expected = sae.state_dict()
    for name in ("jump_bandwidth", "l1_log_ctrl"):  # buffers newer than some checkpoints
        if name in expected and name not in tensors:
            tensors[name] = expected[name].clone()
    bad = [n for n, t in sorted(tensors.items()) if t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{weights_path}: tensor(s) {', '.join(bad)} hold NaN or Inf, so the "
                         f"weights are damaged; {RESTORE_HINT}")
    if set(tensors) != set(expected):
        raise ValueError(
            f"{weights_path}: tensors {sorted(tensors)} do not match arch "
            f"{cfg.arch!r}, which needs {sorted(expected)}"
        )
    for name, want in expected.items():
        if tuple(tensors[name].shape) != tuple(want.shape):
            raise ValueError(
                f"{weights_path}: {name} has shape {tuple(tensors[name].shape)} but "
                f"the config (d_in={d_in}, n_features={sae.n_features}) needs "
                f"{tuple(want.shape)}"
            )
    if cfg.arch == "relu_l1" and int(config.get("format_version", 1)) < 2:
        # Format 1 encoded x, not x - b_dec: the same map with b_enc + b_dec W_enc.
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    with torch.no_grad():
        for name, tensor in sae.state_dict().items():
            tensor.copy_(tensors[name])  # copy_ keeps W_enc's [F, D]-major layout
    return sae.to(device).eval(), config.get("meta", {})


# --------------------------------------------------------------------------------------------
# The train state


@dataclass
class TrainState:
    """Everything `train_loop` needs to resume exactly where a checkpoint was taken."""

    step: int  # steps done
    optimizer: dict  # torch optimizer state_dict
    since_fired_F: torch.Tensor  # vectors since each feature last fired (int64 [F])
    window_tensors: dict[str, torch.Tensor]  # the current log interval's accumulators
    window_info: dict  # and its counters: n_steps, n_vectors
    total_vectors: int = 0
    train_time: float = 0.0
    last_metrics: dict = field(default_factory=dict)
    seed: int | None = None  # data order and resampling draws derive from (seed, step)
    format: int = STATE_FORMAT


def save_train_state(dir_path: Path, state: TrainState) -> None:
    """Write train_state.safetensors + train_state.json (each atomically)."""
    tensors: dict[str, torch.Tensor] = {"since_fired_F": state.since_fired_F.contiguous()}
    tensors.update({k: v.contiguous() for k, v in state.window_tensors.items()})
    opt_state_keys: dict[str, list[str]] = {}
    for pid, st in state.optimizer["state"].items():
        opt_state_keys[str(pid)] = []
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{pid}.{name}"] = v.detach().cpu().contiguous()
                opt_state_keys[str(pid)].append(name)
    info = {
        "format": state.format,
        "step": state.step,
        "total_vectors": state.total_vectors,
        "train_time": state.train_time,
        "window_info": state.window_info,
        "last_metrics": state.last_metrics,
        "optimizer": {"param_groups": state.optimizer["param_groups"],
                      "state_keys": opt_state_keys},
        "rng": {"torch_seed": torch.initial_seed()},
        "seed": state.seed,
    }
    with io.atomic_write(dir_path / TRAIN_STATE_FILE) as tmp:
        write_tensors(tensors, tmp, dir_path / TRAIN_STATE_FILE)
        info["sha256"] = sha256_file(tmp)
    # Read back only by us, and a resumed run must see exactly the metrics it saved (NaN too).
    io.write_json(dir_path / TRAIN_STATE_JSON, info, strict=False)


def load_train_state(dir_path: Path) -> TrainState:
    """Inverse of save_train_state."""
    info = _read_json(dir_path / TRAIN_STATE_JSON)
    problem = file_problem(dir_path / TRAIN_STATE_FILE, info.get("sha256"))
    if problem:
        raise ValueError(f"{dir_path / TRAIN_STATE_FILE} is {problem}; delete its checkpoint "
                         "folder and rerun the train command")
    tensors = load_checkpoint_file(dir_path / TRAIN_STATE_FILE)
    if info.get("format") != STATE_FORMAT:
        raise RuntimeError(f"{dir_path}/{TRAIN_STATE_JSON} has format {info.get('format')}, "
                           f"this trainer reads {STATE_FORMAT}")
    opt_state = {
        int(pid): {name: tensors[f"optimizer.{pid}.{name}"] for name in names}
        for pid, names in info["optimizer"]["state_keys"].items()
    }
    return TrainState(
        step=int(info["step"]),
        optimizer={"state": opt_state, "param_groups": info["optimizer"]["param_groups"]},
        since_fired_F=tensors["since_fired_F"],
        window_tensors={k: v for k, v in tensors.items() if k.startswith("window.")},
        window_info=info["window_info"],
        total_vectors=int(info["total_vectors"]),
        train_time=float(info["train_time"]),
        last_metrics=info["last_metrics"],
        seed=info.get("seed"),
        format=info["format"],
    )


# --------------------------------------------------------------------------------------------
# The run folder: lock and checkpoint commit


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run folder; a second live writer fails fast (RunLocked).

    The lock is io's flock, which the kernel releases when the holder dies (even by SIGKILL),
    so a killed run never leaves a stale lock behind.
    """
    def busy(holder: str) -> RunLocked:
        return RunLocked(f"run folder {run_dir} is being written by another live run ({holder}); "
                         "wait for it to finish (this command will then return its result) or "
                         "set train.run_name")

    with io.hold_lock(run_dir / LOCK_FILE, busy):
        # We hold the lock, so temporaries and staged checkpoints here belong to a killed run.
        for folder in (run_dir, run_dir / CHECKPOINTS_DIR):
            io.drop_stale_tmp(folder, any_pid=True)
        yield


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest committed checkpoints/step-N folder (committed = renamed into place, so complete)."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.exists():
        return None
    done = [p for p in root.glob("step-*") if p.is_dir() and all((p / f).exists() for f in CKPT_FILES)]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def write_checkpoint(run_dir: Path, sae, step: int, meta: dict, state: TrainState) -> Path:
    """Commit a checkpoint: stage it whole, rename it to checkpoints/step-N, then point the run
    folder's top-level files at it and drop older checkpoints."""
    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:07d}"
    # Staged under a temporary name, fsynced, then renamed: a step-N folder is always complete.
    with io.atomic_write(final) as staging:
        staging.mkdir()
        save_sae(sae, staging, meta)
        save_train_state(staging, state)
    # The top level follows; sae.safetensors first so a reader never pairs a new config.json
    # with older weights.
    # Copies, not hard links: damage to one never reaches the other.
    for f in CKPT_FILES:
        io.copy_file(final / f, run_dir / f)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint (or run top level) in `folder` cannot be trusted (None when it can)."""
    for f in CKPT_FILES:
        if not (folder / f).is_file():
            return f"missing {f}"
    try:
        config, state = _read_json(folder / CONFIG_FILE), _read_json(folder / TRAIN_STATE_JSON)
    except ValueError:
        return "with an unreadable JSON file"
    for f, want in ((WEIGHTS_FILE, config.get(SHA_KEY)), (TRAIN_STATE_FILE, state.get("sha256"))):
        problem = file_problem(folder / f, want)
        if problem:
            return f"{f} {problem}"
    return None


def restore_final(run_dir: Path) -> tuple[Path, str] | None:
    """When the run folder's top-level files are missing or damaged, copy them back from the
    newest intact checkpoint; returns (that checkpoint, what was wrong), or None if all was well.
    The caller holds the run lock."""
    problem = checkpoint_problem(run_dir)
    if problem is None:
        return None
    found = sorted((run_dir / CHECKPOINTS_DIR).glob("step-*"), reverse=True)
    for ckpt in found:
        if ckpt.is_dir() and checkpoint_problem(ckpt) is None:
            for f in CKPT_FILES:
                io.copy_file(ckpt / f, run_dir / f)
            return ckpt, problem
    raise ValueError(f"run folder {run_dir} is {problem} and no intact checkpoint is left under "
                     f"{run_dir / CHECKPOINTS_DIR} to restore it from; delete {run_dir} and "
                     "rerun the train command")
