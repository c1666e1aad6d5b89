"""Progress of the long stages: a tqdm bar on a terminal, a plain log line every N s off one.

A stage wraps its loop in `Progress` (or iterates `track(...)`) and hands it live numbers with
`set(...)`. On a terminal that is tqdm's bar with the numbers after it. Off a terminal (nohup,
SLURM, any redirect) a bar is one line rewritten with carriage returns that a log file never
shows in time, so instead a `logging` record is written every `interval_s` seconds, in tqdm's own
format: stage, position, elapsed<ETA, rate, numbers. Hydra's handlers send it to the console and
to the run folder's run.log. Either way one `done` line sums the stage up at the end.

The cost of `update` is one clock read (off a terminal) or tqdm's own `update` (on one), so it
can be called every training step; the numbers are only formatted when a line is written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from time import monotonic as _now
from typing import Any, TypeVar

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0
_interval_s = DEFAULT_INTERVAL_S

_LINE = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {speed}{postfix}]"
_LINE_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {speed}{postfix}]"
_DONE = "{desc}: done {n_fmt} {unit} in {elapsed} ({speed}){postfix}"
_STOPPED = "{desc}: stopped at {n_fmt} {unit} after {elapsed}{postfix}"


def configure(interval_s: float) -> None:
    """Seconds between progress lines off a terminal, for every later `Progress` (run.py)."""
    global _interval_s
    if interval_s < 0:
        raise ValueError(f"logger.progress_every_s={interval_s} must be >= 0")
    _interval_s = float(interval_s)


def on_terminal() -> bool:
    """True when both stdout and stderr are terminals: a person is watching a live bar."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def format_metrics(metrics: dict[str, Any]) -> str:
    """`k=v, k=v` in tqdm's number format (3 significant digits), whole numbers below 1e7 plain."""
    def num(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v
        return f"{v:.0f}" if 1000 <= abs(v) < 1e7 else tqdm.format_num(v)

    return ", ".join(f"{k}={num(v)}" for k, v in metrics.items() if v is not None)


class Progress:
    """Position, rate, ETA and live numbers of one stage; a tqdm bar or periodic log lines."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", initial: int = 0,
                 interval_s: float | None = None, terminal: bool | None = None,
                 logger: logging.Logger | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = self.initial = int(initial)
        self.metrics: dict[str, Any] = {}
        self.interval_s = _interval_s if interval_s is None else float(interval_s)
        self.terminal = on_terminal() if terminal is None else terminal
        self.logger = logger or log
        self._t0 = self._last = _now()
        self._bar = self._redirect = None
        self._closed = False
        if self.terminal:
            # Log records are printed above the bar instead of through it while it is shown.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        """Advance by n; off a terminal, write a line when interval_s has passed since the last."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = _now()
        if now - self._last >= self.interval_s:
            self._last = now
            self.logger.info(self.line(now))

    def set(self, metrics: dict[str, Any]) -> None:
        """Replace the live numbers shown after the position (shown at the next line/refresh)."""
        self.metrics.update(metrics)
        if self._bar is not None:
            self._bar.set_postfix_str(format_metrics(self.metrics), refresh=False)

    def set_total(self, total: int | None) -> None:
        """Set the total once it is known (e.g. after the first batch tells the batch count)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def line(self, now: float | None = None, fmt: str | None = None) -> str:
        """The plain progress line as tqdm formats it: stage, position, elapsed<ETA, rate, numbers."""
        elapsed = (now if now is not None else _now()) - self._t0
        total = self.total if self.total and self.total >= self.n else None
        fmt = fmt or (_LINE if total else _LINE_NO_TOTAL)
        # tqdm's own rate_fmt pads the number and glues the unit on ("  1.33step/s").
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        speed = ("? " + self.unit + "/s" if rate <= 0 else f"{tqdm.format_num(rate)} {self.unit}/s"
                 if rate >= 1 else f"{tqdm.format_num(1 / rate)} s/{self.unit}")
        return tqdm.format_meter(self.n, total, elapsed, prefix=self.desc, unit=self.unit,
                                 postfix=format_metrics(self.metrics) or None, bar_format=fmt,
                                 initial=self.initial, speed=speed)

    def close(self, done: bool = True) -> None:
        """Remove the bar and log one summary line (`done`, or where it stopped)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
        self.logger.info(self.line(fmt=_DONE if done else _STOPPED))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(done=exc_type is None or exc_type is GeneratorExit)


def track(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
          size: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate with a `Progress`; `size(item)` is how far one item advances it (default 1)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(desc, total, unit) as p:
        for item in iterable:
            yield item
            p.update(size(item) if size else 1)
