"""Damaged and hostile input through the real command line: a pickle planted in a shard never
runs, a damaged cache is named and repaired byte for byte, and every mistake a user can make ends
with one `error:` line and exit code 2, not a traceback."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_shards import _OpenOnUnpickle, plant_member, rehash

REPO = Path(__file__).resolve().parents[1]
TINY = ["debug=tiny", "logger=disabled", "model.device=cpu", "layer=mixed3a"]


def cli(*args, timeout=300, env=None):
    """`python run.py ...` in a subprocess, without HYDRA_FULL_ERROR (a user's shell)."""
    env = {**os.environ, **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_user_error(out, *needles):
    """Exit code 2, exactly one `error:` line containing every needle, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr[-3000:])


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory):
    """paths.root holding one finished tiny cache built by the real stage (3 shards)."""
    root = tmp_path_factory.mktemp("clean")
    out = cli("stage=cache", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.fixture
def root(clean_cache, tmp_path):
    """A private copy of the clean cache to damage."""
    shutil.copytree(clean_cache / "cache", tmp_path / "cache")
    return tmp_path


def cache_dir_of(root: Path) -> Path:
    (d,) = list((root / "cache").glob("mixed3a-*"))
    return d


# --------------------------------------------------------------------------------------------
# 1. A shard cannot run code


def test_planted_pickle_member_never_runs_and_train_names_shard_and_member(root):
    d, marker = cache_dir_of(root), root / "pwned"
    plant_member(d / "shard-000000.tar", "000000-00000.pyd", pickle.dumps(_OpenOnUnpickle(marker)))
    rehash(d, "shard-000000.tar")  # so it is the member check, not the checksum, that stops it
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert not marker.exists(), "stage=train executed a pickle from a shard"
    assert_user_error(out, "shard-000000.tar", "000000-00000.pyd", "cache.verify=true")
