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


# --------------------------------------------------------------------------------------------
# SIGKILL at several points of train and evaluate, then a rerun equal to an uninterrupted run

TINY = ["debug=tiny", "logger=disabled", "model.device=cpu", "train.n_steps=60",
        "train.ckpt_every=10", "data.n_images=24"]


def _run(args, timeout=300):
    out = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _kill_after(args, seconds):
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".staging-") or p.name.endswith(".tmp")
            or ".tmp." in p.name]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    _run(["stage=cache", f"paths.root={root}", *TINY])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kill_s", [4.0, 7.0, 10.0])
def test_train_killed_at_several_points_resumes_to_the_same_checkpoint(tiny_cache, tmp_path,
                                                                       kill_s):
    import shutil

    from safetensors.torch import load_file

    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    for r in (ref_root, root):
        shutil.copytree(tiny_cache / "cache", r / "cache")
    _run(["stage=train", f"paths.root={ref_root}", *TINY])
    _kill_after(["stage=train", f"paths.root={root}", *TINY], kill_s)
    _run(["stage=train", f"paths.root={root}", *TINY])
    (ref_dir,), (run_dir,) = list((ref_root / "sae").glob("*")), list((root / "sae").glob("*"))
    assert ref_dir.name == run_dir.name
    ref, got = load_file(ref_dir / "sae.safetensors"), load_file(run_dir / "sae.safetensors")
    for k in ref:
        assert (ref[k] - got[k]).abs().max() <= 1e-5 * max(1.0, float(ref[k].abs().max())), k
    assert not _leftovers(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kill_s", [5.0, 9.0])
def test_evaluate_killed_at_several_points_reruns_to_the_same_metrics(tiny_cache, tmp_path,
                                                                      kill_s):
    import json
    import shutil

    root = tmp_path / "r"
    shutil.copytree(tiny_cache / "cache", root / "cache")
    _run(["stage=train", f"paths.root={root}", *TINY])
    (run_dir,) = list((root / "sae").glob("*"))
    _run(["stage=evaluate", f"paths.root={root}", *TINY])
    ref = json.loads((run_dir / "eval" / "metrics.json").read_text())
    shutil.rmtree(run_dir / "eval")
    _kill_after(["stage=evaluate", f"paths.root={root}", *TINY], kill_s)
    metrics = run_dir / "eval" / "metrics.json"
    if metrics.exists():  # whatever is there must be complete JSON, never half a file
        json.loads(metrics.read_text())
    _run(["stage=evaluate", f"paths.root={root}", *TINY])
    got = json.loads(metrics.read_text())
    for key in ("fvu", "mse", "l0"):
        assert got["reconstruction"][key] == pytest.approx(ref["reconstruction"][key], rel=1e-6)
    assert got["splice"]["kl_sae"] == pytest.approx(ref["splice"]["kl_sae"], rel=1e-6, abs=1e-9)
    assert not _leftovers(run_dir)
