"""io: atomic writes, strict JSON, the temporary-name pattern its cleanup knows, and the lock."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_vision.core import io

REPO = Path(__file__).resolve().parents[2]

# One thread per kind of writer in the package; each stops at its final rename (or, for the
# shard, before finishing) and the process is then killed with SIGKILL.
KILLED_WRITERS = r"""
import os, sys, threading
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from sae_vision.core import io
from sae_vision.core.config import SAEConfig
from sae_vision.sae.checkpoint import save_sae
from sae_vision.sae import make_sae
from sae_vision.activations.shards import ShardWriter

d = Path(sys.argv[1])
(d / "src.png").write_bytes(b"png")
(d / "ckpt").mkdir()
never = threading.Event()
lock = threading.Lock()
started = []

def hang(src, dst):  # every writer reaches its rename, then waits to be killed
    with lock:
        started.append(str(src))
    never.wait()

os.replace = hang

def staged_folder():
    with io.atomic_write(d / "ckpt" / "step-0000005") as tmp:
        tmp.mkdir()
        (tmp / "sae.safetensors").write_bytes(b"weights")

def shard():
    w = ShardWriter(d, 3, 4, "float32")
    w.add(torch.ones(5, 4), torch.zeros(5, 3, dtype=torch.int32).numpy(), {0: "x"})
    with lock:
        started.append(str(w.tmp))
    never.wait()

def figure():
    fig = plt.figure()
    io.save_fig(fig, d / "fig.png")

writers = [
    lambda: io.write_json(d / "metrics.json", {"a": float("nan")}),
    lambda: io.write_text(d / "index.html", "<html>"),
    figure,
    lambda: io.copy_file(d / "src.png", d / "copy.png"),
    lambda: save_sae(make_sae(SAEConfig(arch="topk", n_features=8, k=2), 4), d / "run", {}),
    staged_folder,
    shard,
]
for fn in writers:
    threading.Thread(target=fn, daemon=True).start()
while True:
    with lock:
        if len(started) == len(writers):
            break
print("ready", flush=True)
never.wait()
"""


def test_killed_writers_leave_only_temporaries_that_cleanup_finds(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITERS, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()[-3000:]
        temps = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob(".*.tmp"))
        # While the writers live, their temporaries are theirs: cleanup keeps them.
        assert io.drop_stale_tmp(tmp_path, recursive=True) == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    names = {p.name.split(".")[1] for p in temps}
    assert names >= {"metrics", "index", "fig", "copy", "sae", "step-0000005", "shard-000003"}
    assert all(io.TMP_PATTERN.match(p.name) for p in temps)
    removed = io.drop_stale_tmp(tmp_path, recursive=True)
    assert sorted(p.relative_to(tmp_path) for p in removed) == temps
    assert not list(tmp_path.rglob(".*.tmp"))
    # No target was ever published half-written.
    for name in ("metrics.json", "index.html", "fig.png", "copy.png", "run/sae.safetensors",
                 "ckpt/step-0000005", "shard-000003.tar"):
        assert not (tmp_path / name).exists(), name


def test_cleanup_keeps_live_writers_temporaries_unless_told_the_folder_is_locked(tmp_path):
    dead = tmp_path / ".metrics.json.999999999.tmp"  # no such pid: its writer was killed
    live = tmp_path / f".density_hist.png.{os.getpid()}.tmp"  # a writer still running
    other = tmp_path / "notes.tmp"  # not our pattern: never touched
    for p in (dead, live, other):
        p.write_text("half")
    assert io.drop_stale_tmp(tmp_path) == [dead]
    assert live.exists() and other.exists()
    assert io.drop_stale_tmp(tmp_path, any_pid=True) == [live]
    assert other.exists()


def test_cleanup_limited_to_one_name_leaves_the_other_files_temporaries(tmp_path):
    mine = tmp_path / f".shard-000001.tar.{os.getpid()}.tmp"
    theirs = tmp_path / f".shard-000002.tar.{os.getpid()}.tmp"
    for p in (mine, theirs):
        p.write_text("half")
    io.drop_stale_tmp(tmp_path, any_pid=True, name="shard-000001")
    assert not mine.exists() and theirs.exists()


def test_a_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_staged_folder_replaces_an_existing_one_whole(tmp_path):
    final = tmp_path / "step-1"
    final.mkdir()
    (final / "old").write_text("x")
    with io.atomic_write(final) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_write_json_is_strict_json_with_numpy_torch_and_nan(tmp_path):
    obj = {"nan": float("nan"), "inf": np.float32("inf"), "n": np.int64(3), "t": torch.arange(2),
           "arr": np.ones(2), "tup": (1, 2), "path": tmp_path, 4: np.bool_(True)}
    text = io.write_json(tmp_path / "x.json", obj).read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert back == {"nan": None, "inf": None, "n": 3, "t": [0, 1], "arr": [1.0, 1.0],
                    "tup": [1, 2], "path": str(tmp_path), "4": True}
    loose = json.loads(io.write_json(tmp_path / "y.json", {"m": float("nan")},
                                     strict=False).read_text())
    assert math.isnan(loose["m"])  # files only we read keep NaN (a cache's statistics)


HOLD_LOCK = r"""
import sys, threading
from sae_vision.core import io
lock = io.try_lock(sys.argv[1])
print("held" if lock else "busy", flush=True)
threading.Event().wait()
"""


def test_lock_held_by_a_live_process_then_free_after_it_is_killed(tmp_path):
    path = tmp_path / "run" / ".lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert io.lock_held(path)
        assert io.try_lock(path) is None
        with pytest.raises(io.LockHeld, match=f"pid {proc.pid} "):
            with io.hold_lock(path):
                pass
        # a caller's own error, told who holds it (the run and evaluation locks use this)
        with pytest.raises(KeyError, match=f"busy: pid {proc.pid} "):
            with io.hold_lock(path, lambda holder: KeyError(f"busy: {holder}")):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert path.exists()  # the killed holder left its file behind...
    assert not io.lock_held(path)  # ...but not its lock
    with io.hold_lock(path):
        assert io.lock_held(path)
    assert not path.exists()  # a released lock removes its file


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    first = io.try_lock(tmp_path / "x.lock")
    assert first is not None
    assert io.try_lock(tmp_path / "x.lock") is None
    first.release()
    second = io.try_lock(tmp_path / "x.lock")
    assert second is not None
    second.release()
