"""The one place that talks to W&B: init, log, finish (in a `finally`).

Stages receive a Tracker; library code only ever sees its `log` callable. Every stage also writes
its metrics as JSON beside its artifacts, so nothing depends on reading W&B back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae_vision.config import LoggerConfig


class Tracker:
    """A thin wrapper around a W&B run; mode offline, online or disabled."""

    def __init__(self, run=None):
        self._run = run

    @property
    def enabled(self) -> bool:
        """True when a real W&B run is attached (online or offline)."""
        return self._run is not None

    @property
    def run_dir(self) -> str | None:
        """Folder of the W&B run (offline runs can be synced later with `wandb sync`)."""
        return getattr(self._run, "dir", None) if self._run is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log scalar metrics (and W&B objects) at a step."""
        if self._run is not None:
            self._run.log(metrics, step=step)

    def log_image(self, key: str, png_path: str | os.PathLike, step: int | None = None) -> None:
        """Log a PNG written elsewhere (figures are always written to disk first)."""
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(png_path))}, step=step)

    def log_table(self, key: str, rows: list[dict], step: int | None = None) -> None:
        """Log a list of flat dicts as a W&B table."""
        if self._run is not None and rows:
            import wandb

            columns = list(rows[0].keys())
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self._run.log({key: table}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        """Set run-summary values (final metrics)."""
        if self._run is not None:
            for k, v in metrics.items():
                self._run.summary[k] = v


def disabled() -> Tracker:
    """A tracker that records nothing (for library use and tests)."""
    return Tracker(None)


@contextlib.contextmanager
def open_tracker(
    cfg: LoggerConfig, run_dir: str | os.PathLike, config: dict, name: str | None = None,
    job_type: str | None = None,
) -> Iterator[Tracker]:
    """Open a W&B run in `run_dir` (offline by default) and always finish it."""
    if cfg.mode == "disabled" or _rank() != 0:
        yield Tracker(None)
        return
    import wandb

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # Silence W&B's console chatter; never let it read or print keys into our logs.
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    run = wandb.init(
        project=cfg.project, entity=cfg.entity, tags=list(cfg.tags or []), group=cfg.group,
        mode=cfg.mode, dir=str(run_dir), config=config, name=name, job_type=job_type,
        reinit="create_new",
    )
    try:
        yield Tracker(run)
    finally:
        run.finish()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))
