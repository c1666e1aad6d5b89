"""Files that are either whole or absent: atomic writes, JSON, figures, and the one lock protocol.

Every writer in the package goes through `atomic_write`: the bytes go to a temporary name in the
same folder, `.<name>.<pid>.tmp`, are fsynced, then renamed over the target, so a reader never
sees half a file and a killed writer leaves at most a temporary behind. `drop_stale_tmp` knows
that one pattern (files and staging folders alike) and removes the temporaries of dead writers.

Locks are `flock`s on a lock file (`try_lock` / `hold_lock`): the kernel releases them when their
holder dies, even by SIGKILL, so a killed run never leaves a stale lock that blocks the next one,
and pid reuse cannot make a dead holder look alive. The file also names its holder for messages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# `.<name>.<pid>.tmp`: the one temporary-name pattern; group 1 is the writer's pid.
# OS errors that mean the disk (or the user's quota, or the file size limit) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
TMP_PATTERN = re.compile(r"^\..+\.(\d+)\.tmp$")


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name this process writes `path` under before renaming it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (used to tell live writers from dead ones)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                _fsync(child)
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class PendingWrite:
    """A write in progress at `tmp`; `commit` fsyncs it and renames it over `path`, `abort`
    removes it. For writers that fill a file over many calls (a cache shard); everything else
    uses the `atomic_write` block."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)
        if self.tmp.exists() or self.tmp.is_symlink():  # left by an earlier process with our pid
            _remove(self.tmp)

    def commit(self) -> Path:
        """fsync the temporary (every file of a staged folder) and rename it into place."""
        _fsync(self.tmp)
        if self.tmp.is_dir() and self.path.is_dir():  # a folder cannot replace a non-empty one
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the temporary; never raises (on a read-only or full disk the write's own
        error is the one to see)."""
        with contextlib.suppress(OSError):
            _remove(self.tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it over `path`.

    The temporary may be a file or a folder (a checkpoint staged whole). On any error it is
    removed and the error propagates; the target is never touched."""
    pending = PendingWrite(path)
    try:
        yield pending.tmp
        pending.commit()
    except BaseException:
        pending.abort()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike, link: bool = False) -> Path:
    """Copy src to dst atomically; with `link`, hard-link it instead where the filesystem can."""
    with atomic_write(dst) as tmp:
        try:
            if not link:
                raise OSError
            os.link(src, tmp)
        except OSError:  # no hard links here (or not asked for)
            shutil.copyfile(src, tmp)
    return Path(dst)


def to_json(obj, strict: bool = True):
    """JSON-able copy: tensors, numpy values, tuples and sets become lists and numbers; paths and
    anything else unknown become their str(). With `strict`, NaN/Inf become null."""
    if isinstance(obj, dict):
        return {str(k): to_json(v, strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json(v, strict) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) or not strict else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist(), strict)
    if isinstance(obj, np.generic):
        return to_json(obj.item(), strict)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # a torch tensor, without importing torch
        return to_json(obj.tolist(), strict)
    return str(obj)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1, sort_keys: bool = False,
               strict: bool = True) -> Path:
    """Write `obj` as JSON atomically (values converted by to_json).

    `strict` (the default) writes standard JSON, NaN/Inf as null, for every reader. Files only
    this package reads back pass strict=False to keep Python's NaN/Infinity tokens: a cache's
    statistics must still say NaN, so training can refuse an overflowed cache by name."""
    text = json.dumps(to_json(obj, strict), indent=indent, sort_keys=sort_keys,
                      allow_nan=not strict)
    return write_text(path, text)


def save_fig(fig, path: str | os.PathLike, dpi: int = 110, tight: bool = True) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return Path(path)


def drop_stale_tmp(folder: str | os.PathLike, recursive: bool = False, any_pid: bool = False,
                   name: str = "*") -> list[Path]:
    """Remove the temporaries (files or folders named `.<name>.<pid>.tmp`) of dead writers.

    With `any_pid` every temporary goes, whoever wrote it: for a caller that holds the folder's
    lock, so no other live writer can be using it; `name` limits it to the temporaries of the
    files matching that glob (a cache shard's). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{name}.*.tmp"
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    removed = []
    for tmp in sorted(found, key=lambda p: len(p.parts), reverse=True):
        m = TMP_PATTERN.match(tmp.name)
        if m and (any_pid or not pid_alive(int(m.group(1)))):
            _remove(tmp)
            removed.append(tmp)
    return removed


# --------------------------------------------------------------------------------------------
# The lock protocol


class LockHeld(RuntimeError):
    """Another live process holds the lock; `holder` says who, as its lock file records."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'an unknown process'}")
        self.path, self.holder = path, holder


class Lock:
    """A held flock on a lock file; `release` unlinks the file (while still holding it)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def holder_of(path: str | os.PathLike) -> str:
    """What a lock file says about its holder ('' when unreadable)."""
    with contextlib.suppress(OSError):
        return Path(path).read_text().strip()
    return ""


def try_lock(path: str | os.PathLike) -> Lock | None:
    """Take the lock at `path` without waiting; None when another live process holds it.

    The file is re-checked after locking: a holder that released (unlinked) it between our open
    and our flock leaves us holding an orphan inode, so we retry on the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        return Lock(path, fd)


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike,
              busy: Callable[[str], Exception] | None = None) -> Iterator[Lock]:
    """Hold the lock at `path` for the block. When another live process has it: `busy(holder)`
    (the holder as its lock file names it, or 'unknown process') is raised, else LockHeld."""
    lock = try_lock(path)
    if lock is None:
        holder = holder_of(path)
        if busy is not None:
            raise busy(holder or "unknown process")
        raise LockHeld(Path(path), holder)
    try:
        yield lock
    finally:
        lock.release()


def lock_held(path: str | os.PathLike) -> bool:
    """True when some live process holds the lock at `path` (a leftover file is not a holder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we just took
    return False
