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
# Four shards of six images, so one repair run can meet four kinds of damage at once.
TINY = ["debug=tiny", "logger=disabled", "model.device=cpu", "layer=mixed3a",
        "cache.images_per_shard=6", "cache.batch_size=6"]


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
    """paths.root holding one finished tiny cache built by the real stage (4 shards)."""
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


# --------------------------------------------------------------------------------------------
# 2. Damaged shards are named with the repair command, and the repair is byte-exact


def damage(d: Path) -> None:
    """Truncate shard 0, delete shard 1, grow shard 2 by an appended member, flip bytes in 3."""
    tar = d / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:6000])
    (d / "shard-000001.tar").unlink()
    plant_member(d / "shard-000002.tar", "000002-00000.txt", b"appended" * 4000)
    tar = d / "shard-000003.tar"
    blob = bytearray(tar.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 8] = bytes(b ^ 0xFF for b in blob[mid:mid + 8])
    tar.write_bytes(bytes(blob))


def test_cache_verify_rewrites_exactly_the_damaged_shards_byte_for_byte(clean_cache, root):
    d, clean = cache_dir_of(root), cache_dir_of(clean_cache)
    damage(d)
    out = cli("stage=train", f"paths.root={root}", *TINY)
    assert_user_error(out, "shard-000000.tar is truncated", "cache.verify=true")
    untouched = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    out = cli("stage=cache", "cache.verify=true", f"paths.root={root}", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    for i, problem in enumerate(["truncated", "missing", "grown", "corrupt"]):
        assert f"shard-00000{i}.tar is {problem}" in out.stdout, out.stdout
    want = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in d.iterdir()) == want  # no temporaries or locks left behind
    for name in want:
        assert (d / name).read_bytes() == (clean / name).read_bytes(), name
    assert (d / "metadata.json").stat().st_mtime_ns == untouched["metadata.json"]
    # Verifying a sound cache rewrites nothing.
    out = cli("stage=cache", "cache.verify=true", f"paths.root={root}", *TINY)
    assert out.returncode == 0 and "verified 4 shard(s)" in out.stdout, out.stdout
    assert "rewriting" not in out.stdout


# --------------------------------------------------------------------------------------------
# 3. A cache with no vectors is an error


def test_image_folder_where_nothing_is_readable_ends_with_exit_2_and_the_list(tmp_path):
    images = tmp_path / "images" / "class0"
    images.mkdir(parents=True)
    for i in range(5):
        (images / f"broken-{i}.jpg").write_bytes(b"not a jpeg " * (i + 1))
    out = cli("stage=cache", "data=imagefolder", f"data.root={tmp_path / 'images'}",
              "data.num_workers=0", f"paths.root={tmp_path}", *TINY)
    assert_user_error(out, "holds no vectors", "5 image(s) tried, 5 unreadable",
                      "class0/broken-0.jpg", "`skipped` in", "metadata.json")
    # Rerunning does not reuse the empty cache silently.
    out = cli("stage=cache", "data=imagefolder", f"data.root={tmp_path / 'images'}",
              "data.num_workers=0", f"paths.root={tmp_path}", *TINY)
    assert_user_error(out, "holds no vectors")
