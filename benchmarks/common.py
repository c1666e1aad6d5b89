"""Shared benchmark plumbing: process settings, step clocks, machine description, child runs.

Absolute times drift on a shared machine, so every benchmark reports ratios of figures taken
side by side; the helpers here keep both sides of a ratio measured the same way.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# glibc malloc: keep large temporaries mapped instead of returning them to the kernel and
# re-faulting them every step (the gain is unmeasured in any recorded run; see the Makefile).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
REEXEC_FLAG = "SAE_BENCH_REEXEC"


def n_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def malloc_settings_active() -> bool:
    """True when both glibc malloc variables were set before this process started."""
    return all(k in os.environ for k in MALLOC_ENV)


def reexec_with_malloc_settings(module: str, argv: list[str]) -> None:
    """Restart this module with the malloc variables set: glibc reads them only at start-up."""
    if malloc_settings_active() or os.environ.get(REEXEC_FLAG):
        return
    env = child_env()
    env[REEXEC_FLAG] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def child_env(device: str = "cpu") -> dict[str, str]:
    """Environment for benchmark subprocesses: malloc settings, weights folder, thread count."""
    env = dict(os.environ)
    for k, v in MALLOC_ENV.items():
        env.setdefault(k, v)
    shared = REPO_ROOT.parent / "shared" / "weights"
    if not env.get("SAE_VISION_WEIGHTS_DIR") and (shared / "bvlc_googlenet.npz").is_file():
        env["SAE_VISION_WEIGHTS_DIR"] = str(shared)
    env.setdefault("OMP_NUM_THREADS", str(n_cores()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU figure must not touch a GPU that happens to exist
    return env


def setup_torch(device: str) -> None:
    """One thread per core (the default may count SMT siblings) and deterministic-enough seeds."""
    import torch

    torch.set_num_threads(n_cores())
    torch.manual_seed(0)
    if device == "cuda":
        from sae_vision.activations import enable_tf32

        enable_tf32()  # the stages' setting, so the harness's figures describe them


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it exec'd, in MiB.

    Linux carries ru_maxrss across execve, so a child forked from a big parent would report
    the parent's size as its floor; VmHWM (the high-water mark of this address space) does not.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    """getrusage's ru_maxrss in MiB (Linux reports KiB, macOS bytes)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def sync(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (any CUDA device, indexed or
    not; nothing to wait for elsewhere)."""
    if str(device).split(":")[0] == "cuda":
        import torch

        torch.cuda.synchronize()


class Lockstep:
    """Round-robin baton for several training loops running in threads: one step each in turn.

    A shared machine's load comes and goes in bursts of seconds; when our step, the peer's
    step and the bare GEMMs of a step alternate, every burst lands on all of them alike, so
    their ratio holds even when absolute times do not. Only one party computes at a time.
    """

    def __init__(self, names: list[str]):
        self.order, self.turn, self.done = list(names), 0, set()
        self.cond = threading.Condition()

    def _advance(self) -> None:
        n = len(self.order)
        for j in range(1, n + 1):
            if self.order[(self.turn + j) % n] not in self.done:
                self.turn = (self.turn + j) % n
                break
        self.cond.notify_all()

    def wait(self, name: str) -> None:
        """Block until it is `name`'s turn."""
        with self.cond:
            while self.order[self.turn] != name and name not in self.done:
                self.cond.wait()

    def pass_on(self, name: str) -> None:
        """`name` finished a step: hand the baton to the next party still running."""
        with self.cond:
            if self.order[self.turn] == name:
                self._advance()

    def finish(self, name: str) -> None:
        """`name` is done for good; the others stop waiting for it."""
        with self.cond:
            self.done.add(name)
            if self.order[self.turn] == name:
                self._advance()


class StepClock:
    """Wraps a batch iterator (or iterable) and times each training step between fetches.

    A step runs from the moment its batch is handed out until the loop asks for the next
    batch (so it includes fetching that next batch), measured identically for our trainer
    and the peer's. With a Lockstep the clock waits for its turn before handing out a batch
    and the wait is not counted. On CUDA it synchronises at every step boundary, so each timed
    step covers its own finished GPU work (kernels queued by the host, not the host's queueing).
    """

    def __init__(self, batches: Iterable, warmup: int = 1, device: str = "cpu",
                 limit: int | None = None, lockstep: Lockstep | None = None, name: str = ""):
        self.batches, self.warmup, self.device, self.limit = batches, warmup, device, limit
        self.lockstep, self.name = lockstep, name
        self.starts: list[float] = []
        self.ends: list[float] = []
        self._it: Iterator | None = None

    def _stamp(self) -> None:
        sync(self.device)  # a step's GPU work finishes inside its own interval (and turn)
        now = time.perf_counter()
        if self.starts:
            self.ends.append(now)
        if self.lockstep is not None:
            if self.starts:
                self.lockstep.pass_on(self.name)
            self.lockstep.wait(self.name)
            now = time.perf_counter()
        self.starts.append(now)

    def __iter__(self):
        # Used by the peer's `for batch in dataloader`: a fresh pass over the iterable.
        for i, batch in enumerate(self.batches):
            if self.limit is not None and i >= self.limit:
                return
            self._stamp()
            yield batch

    def __next__(self):
        # Used by our trainer's `next(batches)`.
        if self._it is None:
            self._it = iter(self.batches)
        batch = next(self._it)
        self._stamp()
        return batch

    def finish(self) -> None:
        """Close the last step (call when the training function returns, or fails)."""
        sync(self.device)
        if len(self.ends) < len(self.starts):
            self.ends.append(time.perf_counter())
        if self.lockstep is not None:
            self.lockstep.finish(self.name)

    def step_times(self) -> list[float]:
        """Seconds per step after the warm-up steps."""
        return [e - s for s, e in zip(self.starts, self.ends)][self.warmup:]

    def rate(self, batch_size: int) -> dict:
        """Samples/s: from the median step (robust to other jobs' bursts) and from the window."""
        times = self.step_times()
        if not times:
            raise RuntimeError("StepClock: no timed steps (raise the step count above warm-up)")
        window = sum(times)
        return {
            "samples_per_s": batch_size / statistics.median(times),
            "samples_per_s_window": batch_size * len(times) / window,
            "step_s_median": statistics.median(times),
            "n_timed_steps": len(times),
            "step_s": [round(t, 5) for t in times],
        }


def run_parties(parties: dict, lockstep: bool) -> dict:
    """Run {name: fn(clock_kwargs) -> result} one after another, or in lockstep threads.

    Each fn builds its StepClock with the given extra kwargs (lockstep, name). Exceptions in a
    thread are re-raised here after every thread has stopped.
    """
    if not lockstep:
        return {name: fn({}) for name, fn in parties.items()}
    baton = Lockstep(list(parties))
    results: dict = {}
    errors: dict = {}

    def work(name, fn):
        try:
            results[name] = fn({"lockstep": baton, "name": name})
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors[name] = e
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=work, args=(n, f), name=f"bench-{n}")
               for n, f in parties.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"benchmark party {name!r} failed: {err!r}") from err
    return results


def machine_info(device: str) -> dict:
    """CPU model, cores, memory, library versions and (on CUDA) the GPU's name."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": _lscpu_model(),
        "cores": n_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkl": bool(torch.backends.mkl.is_available()),
        "malloc_settings": {k: os.environ.get(k) for k in MALLOC_ENV},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_avg_start": list(os.getloadavg()),
        "git_commit": _git_commit(),
        "peer": peer_version(),
        "device": device,
    }
    try:
        info["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                     / 2**30, 1)
    except (ValueError, OSError):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def peer_version() -> str | None:
    """Installed overcomplete version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("overcomplete")
    except PackageNotFoundError:
        return None


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"{head}{'+dirty' if dirty else ''}" if head else None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Child:
    """A benchmark subprocess (`python -m benchmarks.memory ...`) whose last stdout line is JSON."""

    args: list[str]
    device: str = "cpu"
    log_path: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Child:
        """Launch it (returns at once)."""
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.memory", *self.args],
                                     cwd=REPO_ROOT, env=child_env(self.device),
                                     stdout=subprocess.PIPE, stderr=log, text=True)
        return self

    def result(self, timeout: float = 900) -> dict:
        """Wait for it and parse its JSON result line.

        A child that printed its result and then died at interpreter exit still counts; its
        exit code is kept in the result (and reported) rather than hidden.
        """
        out, _ = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        where = f" (stderr in {self.log_path})" if self.log_path else ""
        if not lines:
            raise RuntimeError(f"benchmark child {' '.join(self.args)} failed with exit code "
                               f"{self.proc.returncode}{where}:\n{out[-2000:]}")
        result = json.loads(lines[-1])
        if self.proc.returncode != 0:
            print(f"warning: benchmark child {' '.join(self.args[:1])} exited with code "
                  f"{self.proc.returncode} after reporting its result{where}", file=sys.stderr)
            result["exit_code"] = self.proc.returncode
        return result


def run_children(children: list[Child], parallel: bool) -> list[dict]:
    """Run children one after another (clean timings) or all at once (only RSS is wanted)."""
    if parallel:
        for c in children:
            c.start()
        return [c.result() for c in children]
    return [c.start().result() for c in children]
