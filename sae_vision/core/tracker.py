"""The one place that talks to W&B: init, log, finish (in a `finally`).

Stages receive a Tracker; library code only ever sees its `log` callable. Every stage also writes
its metrics as JSON beside its artifacts, so nothing depends on reading W&B back.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import LoggerConfig

# Bounds, in seconds, on each network step of an online run: the probe (one HTTP request), init,
# each log call and finish. Past one, the run carries on offline (its local files are kept for
# `wandb sync`).
PROBE_TIMEOUT_S = 5.0
INIT_TIMEOUT_S = 10.0  # W&B's own WANDB_INIT_TIMEOUT, when set, replaces it
LOG_TIMEOUT_S = 10.0
FINISH_TIMEOUT_S = 15.0


def bounded(fn, timeout_s: float) -> bool:
    """Run fn() in a daemon thread; False when it did not return within timeout_s (it is then
    abandoned); its exception, if any, is raised here."""
    done, errors = threading.Event(), []

    def work():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=work, daemon=True, name="wandb-bounded").start()
    if not done.wait(timeout_s):
        return False
    if errors:
        raise errors[0]
    return True


def sync_hint(run) -> str:
    """The command that uploads a run's local files later."""
    return f"`wandb sync {Path(run.dir).parent}`"


class Tracker:
    """A thin wrapper around a W&B run; mode offline, online or disabled. An online run's calls
    are bounded (LOG_TIMEOUT_S): one that stalls detaches the run, which stays on disk."""

    def __init__(self, run=None, online: bool = False):
        self._run = run
        self._online = online

    def _call(self, fn) -> None:
        """fn(), bounded when online; a stalled call stops all further W&B calls of the run."""
        if not self._online:
            fn()
            return
        if not bounded(fn, LOG_TIMEOUT_S):
            print(f"warning: W&B did not answer within {LOG_TIMEOUT_S:.0f} s; the run goes on "
                  f"without it (its metrics are in the stage's JSON files); upload what W&B "
                  f"holds with {sync_hint(self._run)} once online", file=sys.stderr)
            self._run = None

    @property
    def enabled(self) -> bool:
        """True when a real W&B run is attached (online or offline)."""
        return self._run is not None

    @property
    def run_dir(self) -> str | None:
        """Folder of the W&B run (offline runs can be synced later with `wandb sync`)."""
        return getattr(self._run, "dir", None) if self._run is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log scalar metrics (and W&B objects) at a step; a numpy array becomes a histogram."""
        if self._run is not None:
            import numpy as np

            if any(isinstance(v, np.ndarray) for v in metrics.values()):
                import wandb

                metrics = {k: wandb.Histogram(v) if isinstance(v, np.ndarray) else v
                           for k, v in metrics.items()}
            run = self._run
            self._call(lambda: run.log(metrics, step=step))

    def log_image(self, key: str, png_path: str | os.PathLike, step: int | None = None) -> None:
        """Log a PNG written elsewhere (figures are always written to disk first)."""
        if self._run is not None:
            import wandb

            run, image = self._run, wandb.Image(str(png_path))
            self._call(lambda: run.log({key: image}, step=step))

    def log_table(self, key: str, rows: list[dict], step: int | None = None) -> None:
        """Log a list of flat dicts as a W&B table."""
        if self._run is not None and rows:
            import wandb

            columns = list(rows[0].keys())
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            run = self._run
            self._call(lambda: run.log({key: table}, step=step))

    def summary(self, metrics: dict[str, Any]) -> None:
        """Set run-summary values (final metrics)."""
        if self._run is not None:
            run = self._run
            self._call(lambda: [run.summary.__setitem__(k, v) for k, v in metrics.items()])


def disabled() -> Tracker:
    """A tracker that records nothing (for library use and tests)."""
    return Tracker(None)


MODES = ("online", "offline", "disabled")
# W&B's own aliases for WANDB_MODE.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def resolve_mode(config_mode: str) -> str:
    """The W&B mode to use: WANDB_MODE from the environment wins over logger.mode, with a note
    when the two differ (so neither is overridden silently)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return config_mode
    mode = _MODE_ALIASES.get(env, env)
    if mode not in MODES:
        raise ValueError(f"WANDB_MODE={env!r} in the environment; use one of {', '.join(MODES)} "
                         "or unset it")
    if mode != config_mode:
        print(f"note: WANDB_MODE={env} from the environment overrides logger.mode={config_mode}; "
              "unset WANDB_MODE to use the config", file=sys.stderr)
    return mode


def base_url() -> str:
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def has_credentials(base_url: str) -> bool:
    """True when WANDB_API_KEY is set or the netrc file (as `wandb login` writes) has this host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        return netrc.netrc(path).authenticators(urlsplit(base_url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when the W&B server answers an HTTP request (any status) within timeout_s, DNS
    included; a server that accepts the connection and stays silent does not count."""
    import urllib.error
    import urllib.request

    ok = threading.Event()

    def connect():
        try:
            urllib.request.urlopen(base_url, timeout=timeout_s).close()
            ok.set()
        except urllib.error.HTTPError:  # an answer, if not a welcome one
            ok.set()
        except (OSError, ValueError):  # no answer (timeouts and refusals are OSErrors)
            pass

    # A thread, because name resolution ignores the socket timeout and can block for minutes.
    threading.Thread(target=connect, daemon=True, name="wandb-probe").start()
    ok.wait(timeout_s)
    return ok.is_set()


@contextlib.contextmanager
def open_tracker(
    cfg: LoggerConfig, run_dir: str | os.PathLike, config: dict, name: str | None = None,
    job_type: str | None = None,
) -> Iterator[Tracker]:
    """Open a W&B run in `run_dir` (offline by default) and always finish it.

    Online mode never hangs: missing credentials are a ValueError, and an unreachable server
    falls back to offline with a warning that says how to `wandb sync` the run later."""
    mode = resolve_mode(cfg.mode)
    if mode == "disabled" or _rank() != 0:
        yield Tracker(None)
        return
    import wandb

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # Silence W&B's console chatter; never let it read or print keys into our logs.
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    fell_back = False
    if mode == "online":
        url = base_url()
        if not has_credentials(url):
            raise ValueError(f"logger.mode=online needs W&B credentials for {url}: run "
                             "`wandb login` or set WANDB_API_KEY, or log offline with "
                             "logger=wandb_offline")
        if not reachable(url):
            print(f"warning: W&B at {url} cannot be reached; logging offline instead (no answer "
                  f"within {PROBE_TIMEOUT_S:.0f} s)", file=sys.stderr)
            mode, fell_back = "offline", True

    init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)

    def init(mode: str):
        settings = wandb.Settings(init_timeout=init_timeout) if mode == "online" else None
        return wandb.init(
            project=cfg.project, entity=cfg.entity, tags=list(cfg.tags or []), group=cfg.group,
            mode=mode, dir=str(run_dir), config=config, name=name, job_type=job_type,
            reinit="create_new", settings=settings)

    try:
        run = init(mode)
    except (wandb.errors.Error, TimeoutError) as e:
        if mode != "online" or "time" not in str(e).lower() or isinstance(
                e, wandb.errors.AuthenticationError):
            raise ValueError(f"W&B could not start a {mode} run ({e}); check `wandb login`, or "
                             "use logger=wandb_offline or logger=disabled") from e
        print(f"warning: W&B at {url} did not start the run within {init_timeout:.0f} s; "
              "logging offline instead", file=sys.stderr)
        mode, fell_back = "offline", True
        run = init(mode)
    tracker = Tracker(run, online=mode == "online")
    try:
        yield tracker
    finally:
        finished = bounded(run.finish, FINISH_TIMEOUT_S) if mode == "online" else run.finish()
        if fell_back or finished is False or (mode == "online" and tracker._run is None):
            print(f"warning: the W&B run was logged offline or did not finish uploading; upload "
                  f"it with {sync_hint(run)} once online", file=sys.stderr)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))
