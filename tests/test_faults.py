"""Faults across stages: a full disk while caching, then a clean resume with nothing lost."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

REPO = Path(__file__).resolve().parents[1]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path):
    """A 192 KiB tmpfs: a real ENOSPC part-way through a cache run (needs root, as in CI)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "192k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _cmd(root):
    return [sys.executable, "run.py", "stage=cache", "logger=disabled", f"paths.root={root}",
            "data.n_images=24", "cache.images_per_shard=4", "cache.batch_size=4",
            "cache.n_per_image=16", "layer=mixed3a", "cache.dtype=float32", "model.device=cpu"]


def test_full_disk_while_writing_a_shard_leaves_the_cache_resumable(tiny_disk):
    # Each shard is ~4*16*256*4 B = 64 KiB: the third one cannot fit in 192 KiB.
    out = subprocess.run(_cmd(tiny_disk), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no space left" in out.stderr and "rerun the same command" in out.stderr
    (d,) = list((tiny_disk / "cache").glob("mixed3a-*"))
    assert not list(d.glob(".*tmp")), "half-written shard left behind"
    assert not (d / "metadata.json").exists()
    kept = sorted(p.name for p in d.glob("shard-*.json"))
    assert kept, "complete shards were lost"
    # Free space, rerun: it resumes after the kept shards and ends complete and exact.
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_disk)], check=True)
    out = subprocess.run(_cmd(tiny_disk), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{len(kept)} done" in out.stdout
    pos = np.concatenate([r["pos.npy"] for r in wds.WebDataset(
        sorted(str(p) for p in d.glob("shard-*.tar")), shardshuffle=False).decode()])
    ids, counts = np.unique(pos[:, 0], return_counts=True)
    assert ids.tolist() == list(range(24)) and (counts == 16).all()
