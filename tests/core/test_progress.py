"""Progress of long stages: the off-terminal line, and what `run.py stage=train` writes to a
redirected log (while it runs) and to Hydra's run.log."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_vision.activations.shards import write_cache
from sae_vision.core import progress

REPO = Path(__file__).resolve().parents[2]
LAYER, DIM = "conv2d0", 64
# `train: 120/300 step (40%) [00:03<00:04, 41.2 step/s, samples/s=5.3e+03, loss=0.5, ...]`
PROGRESS_LINE = re.compile(r"train: (\d+)/(\d+) step \(\d+%\) \[[\d:]+<[\d:?]+, .*step/s, "
                           r".*loss=.*fvu=.*l0=.*dead=.*lr=")
RUN_LOG_PREFIX = re.compile(r"^\[[^\]]+\]\[[^\]]+\]\[[A-Z]+\] - ")


# --------------------------------------------------------------------------------------------
# The helper


@pytest.fixture
def clock(monkeypatch):
    """A settable clock in place of time.monotonic inside the progress module."""
    now = [1000.0]
    monkeypatch.setattr(progress, "_now", lambda: now[0])
    return now


def test_off_terminal_line_carries_stage_position_rate_eta_and_numbers(clock, caplog):
    caplog.set_level(logging.INFO, logger="sae_vision")
    p = progress.Progress("train", total=100, unit="step", interval_s=30, terminal=False)
    clock[0] += 10
    p.set({"loss": 0.123456, "fvu": 0.25, "l0": 8.0, "lr": 4e-4})
    p.update(20)
    assert caplog.records == []  # 10 s < 30 s: nothing yet
    clock[0] += 20
    p.update(20)  # 40 steps in 30 s: 1.33 step/s, 60 to go -> 45 s
    (rec,) = caplog.records
    assert rec.name == "sae_vision.core.progress" and rec.levelno == logging.INFO
    assert rec.getMessage() == ("train: 40/100 step (40%) [00:30<00:45, 1.33 step/s, "
                                "loss=0.123, fvu=0.25, l0=8, lr=0.0004]")
    p.close()
    assert caplog.records[-1].getMessage() == (
        "train: done 40 step in 00:30 (1.33 step/s), loss=0.123, fvu=0.25, l0=8, lr=0.0004")


def test_off_terminal_lines_come_every_interval_and_not_between(clock, caplog):
    caplog.set_level(logging.INFO, logger="sae_vision")
    p = progress.Progress("cache", total=None, unit="img", interval_s=5, terminal=False)
    times = []
    for _ in range(60):  # one update per second for a minute
        clock[0] += 1
        n = len(caplog.records)
        p.update(2)
        if len(caplog.records) > n:
            times.append(clock[0] - 1000)
    assert times == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    assert caplog.records[0].getMessage() == "cache: 10 img [00:05, 2 img/s]"
    p.close(done=False)
    assert caplog.records[-1].getMessage() == "cache: stopped at 120 img after 01:00"


def test_interval_zero_writes_a_line_at_every_update_and_track_counts_items(clock, caplog):
    caplog.set_level(logging.INFO, logger="sae_vision")
    progress.configure(0)
    try:
        batches = [torch.zeros(3, 2), torch.zeros(5, 2)]
        seen = list(progress.track(batches, "evaluate reconstruction", 8, "vec", size=len))
    finally:
        progress.configure(progress.DEFAULT_INTERVAL_S)
    assert len(seen) == 2
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith("evaluate reconstruction: 3/8 vec (38%)")
    assert msgs[1].startswith("evaluate reconstruction: 8/8 vec (100%)")
    assert msgs[2].startswith("evaluate reconstruction: done 8 vec")
    with pytest.raises(ValueError, match="progress_every_s"):
        progress.configure(-1)


# --------------------------------------------------------------------------------------------
# The train stage through run.py, output redirected to a file


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    """A real cache (webdataset tars + metadata) of random 64-d vectors in 3 shards."""
    cache_dir = tmp_path_factory.mktemp("progress") / "cache"
    acts_ND = torch.from_numpy(np.random.default_rng(0).gamma(1.0, size=(6000, DIM))).float()
    chunks = []
    for i in range(0, len(acts_ND), 1000):
        idx = np.arange(i, i + 1000)
        pos = np.stack([idx // 16, idx % 16 // 4, idx % 4], 1).astype(np.int32)
        chunks.append((acts_ND[i:i + 1000], pos,
                       {int(j): f"synthetic:{j}" for j in np.unique(idx // 16)}))
    write_cache(cache_dir, chunks, {"layer": LAYER, "dim": DIM, "dtype": "float32",
                                    "key": "progress"}, chunks_per_shard=2)
    return cache_dir


def _train_cmd(root: Path, cache_dir: Path, n_steps: int, *extra: str) -> list[str]:
    return [sys.executable, "run.py", "stage=train", "debug=tiny", f"layer={LAYER}",
            f"cache.dir={cache_dir}", f"paths.root={root}", f"train.n_steps={n_steps}",
            "train.log_every=5", "train.device=cpu", "logger=disabled",
            "logger.progress_every_s=0", *extra]


def test_redirected_train_log_shows_loss_fvu_and_l0_while_the_run_is_going(tmp_path,
                                                                           synthetic_cache):
    log_path = tmp_path / "train.log"
    n_steps = 1_000_000  # far more than it will get to: the test stops it once it has seen lines
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_train_cmd(tmp_path, synthetic_cache, n_steps), cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # generous: a loaded 2-core machine
        seen: list[str] = []
        while not seen:
            assert proc.poll() is None, "exited early:\n" + log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no progress line:\n" + log_path.read_text()[-3000:]
            time.sleep(0.2)
            seen = [x for x in log_path.read_text().splitlines() if PROGRESS_LINE.search(x)]
        # Read from the file while the process is still training: the lines were flushed as
        # they happened, not at exit.
        assert proc.poll() is None
        step, total = map(int, PROGRESS_LINE.search(seen[-1]).groups())
        assert 5 <= step < total == n_steps
        numbers = dict(kv.split("=") for kv in seen[-1].split("[", 1)[1].rstrip("]").split(", ")
                       if "=" in kv)
        assert 0 <= float(numbers["fvu"]) and 0 < float(numbers["l0"]) <= 8  # debug=tiny k=8
    finally:
        proc.kill()
        proc.wait()


def test_hydra_run_log_holds_the_same_lines_as_the_console(tmp_path, synthetic_cache):
    run_dir = tmp_path / "hydra-run"
    proc = subprocess.run(_train_cmd(tmp_path, synthetic_cache, 30, f"hydra.run.dir={run_dir}"),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    console = [x for x in proc.stdout.splitlines() if x.strip()]
    logged = [RUN_LOG_PREFIX.sub("", x) for x in (run_dir / "run.log").read_text().splitlines()]
    assert console and console == [x for x in logged if x.strip()]
    text = "\n".join(logged)
    assert sum(bool(PROGRESS_LINE.search(x)) for x in logged) >= 5
    assert re.search(r"train: done 30 step in [\d:]+ \(.*step/s\), .*loss=.*fvu=", text)
    assert re.search(r"train: summary of conv2d0-topk-f128-k8-\S+: loss \S+, train-batch FVU "
                     r"\S+, held-out FVU not measured yet, L0 \S+, dead \d+/128 features, "
                     r"wall \S+ s", text)
    run_name = re.search(r"summary of (\S+):", text).group(1)
    assert f"train: run folder {tmp_path / 'sae' / run_name}" in text
    assert (f"train: evaluate it with: python run.py stage=evaluate debug=tiny layer={LAYER} "
            f"cache.dir={synthetic_cache} paths.root={tmp_path} logger=disabled "
            f"logger.progress_every_s=0 sae.run={run_name}") in text
