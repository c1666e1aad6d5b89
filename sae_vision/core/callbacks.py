"""Hydra callbacks (the edge of the app, like run.py): checks that run before a stage starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def file_in_the_way(path: str | os.PathLike | None) -> str | None:
    """`path`, or the nearest path above it that exists, when that is a file and not a folder."""
    if not path:
        return None
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return f"{p} is a file where a folder is expected" if p.exists() and not p.is_dir() else None


def unwritable(path: str) -> str | None:
    """Why `path` (or the nearest folder above it that exists) cannot be written, or None."""
    if file_in_the_way(path):
        return file_in_the_way(path)
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return None if os.access(p, os.W_OK) else f"{p} is not writable (read-only or no permission)"


class CheckOutputDir(Callback):
    """Refuses an unwritable run folder before Hydra tries to create it (with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(out_dir: str) -> None:
        why = unwritable(out_dir)
        if why:
            print(f"error: cannot create the run folder {out_dir}: {why}; move it away or make "
                  "it writable, or point paths.root (or hydra.run.dir) elsewhere", file=sys.stderr)
            sys.exit(2)


def schema_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the Config schema, sections included (`sae`, `sae.k`, ...)."""
    import dataclasses

    from .config import Config

    out = []
    for f in dataclasses.fields(schema or Config):
        key = f"{prefix}{f.name}"
        out.append(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            out += schema_keys(type(default), key + ".")
    return out


def unknown_override(argv: list[str], conf_dir: str | Path) -> str | None:
    """An error message for the first command-line override of a key the schema lacks.

    Hydra refuses `sae.l1_coef=3` but suggests `+sae.l1_coef=3`, which adds a key nothing reads;
    both are refused here, naming the closest valid key."""
    import difflib

    keys = schema_keys()
    groups = {p.name for p in Path(conf_dir).iterdir() if p.is_dir()}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if not key or "/" in key or "@" in key or key.split(".")[0] in ("hydra",):
            continue
        if key in groups or key in keys:
            continue
        near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        section = key.rsplit(".", 1)[0] if "." in key else ""
        if near:
            hint = f"did you mean {near[0]}?"
        elif section in keys:
            hint = f"valid keys: {', '.join(k for k in keys if k.startswith(section + '.'))}"
        else:
            hint = f"valid sections: {', '.join(sorted(groups | _tops(keys)))}"
        if arg[0] in "+~":
            hint += " (adding a key with + is refused too: nothing would read it)"
        return f"unknown config key {key!r} in {arg!r}: {hint}"
    return None


def _tops(keys: list[str]) -> set[str]:
    return {k for k in keys if "." not in k}
