"""Hydra callbacks (the edge of the app, like run.py): checks that run before a stage starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def unwritable(path: str) -> str | None:
    """Why `path` (or the nearest folder above it that exists) cannot be written, or None."""
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
            print(f"error: cannot create the run folder {out_dir}: {why}; make it writable or "
                  "point paths.root (or hydra.run.dir) elsewhere", file=sys.stderr)
            sys.exit(2)
