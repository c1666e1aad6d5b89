"""Shard format: plain webdataset can read it; readers refuse truncated or foreign caches."""

import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from sae_vision.activations import shards as S


def _chunks(n_chunks=6, n=50, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    for c in range(n_chunks):
        acts = torch.randn(n, d, generator=g).abs() * (c + 1)
        img = np.arange(n) // 5 + c * 10
        pos = np.stack([img, np.arange(n) % 5, np.zeros(n)], 1).astype(np.int32)
        yield acts, pos, {int(i): f"img-{i}" for i in np.unique(img)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_roundtrip_with_plain_webdataset_and_exact_statistics(tmp_path, dtype):
    chunks = list(_chunks())
    meta = S.write_cache(tmp_path, chunks, {"dim": 8, "dtype": dtype, "layer": "x"},
                         chunks_per_shard=2)
    assert meta["n_vectors"] == 300 and len(meta["shards"]) == 3 and meta["n_images"] == 60
    want = torch.cat([S.from_storage(S.to_storage(a, dtype), dtype) for a, _, _ in chunks])
    got = []
    for s in meta["shards"]:
        for rec in wds.WebDataset(str(tmp_path / s["name"]), shardshuffle=False).decode():
            got.append(S.from_storage(rec["acts.npy"], dtype))
            assert rec["pos.npy"].shape[1] == 3
    assert torch.equal(torch.cat(got), want)
    assert np.allclose(meta["mean"], want.double().mean(0).numpy(), atol=1e-9)
    assert np.allclose(meta["std"], want.double().std(0, unbiased=False).numpy(), atol=1e-6)
    assert meta["mean_norm"] == pytest.approx(float(want.double().norm(dim=1).mean()), rel=1e-9)
    for s in meta["shards"]:
        assert s["sha256"] == S.sha256_file(tmp_path / s["name"])


def test_stream_covers_every_vector_once_per_epoch_in_shuffled_order(tmp_path):
    chunks = list(_chunks(n_chunks=4, n=64, d=4))
    S.write_cache(tmp_path, chunks, {"dim": 4, "dtype": "float32"}, chunks_per_shard=1)
    batches = list(S.stream_vectors(tmp_path, None, batch_size=32, shuffle_buffer=64, epochs=1))
    got = torch.cat(batches)
    want = torch.cat([a for a, _, _ in chunks])
    assert len(got) == len(want)
    assert torch.equal(got[got[:, 0].argsort()], want[want[:, 0].argsort()])
    assert not torch.equal(got, want)  # shuffled


def test_truncated_shard_is_named_with_the_repair_command(tmp_path):
    S.write_cache(tmp_path, _chunks(), {"dim": 8, "dtype": "float16"}, chunks_per_shard=2)
    bad = tmp_path / "shard-000001.tar"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(S.CacheError, match="shard-000001.tar is truncated.*cache.verify=true"):
        S.load_vectors(tmp_path)


def test_corrupt_shard_of_the_right_size_is_named(tmp_path):
    S.write_cache(tmp_path, _chunks(), {"dim": 8, "dtype": "float16"}, chunks_per_shard=2)
    bad = tmp_path / "shard-000002.tar"
    blob = bytearray(bad.read_bytes())
    blob[0:512] = b"\x00" * 100 + b"garbage" * 58 + b"\x01" * 6  # destroy the first tar header
    bad.write_bytes(bytes(blob))
    with pytest.raises(S.CacheError, match="shard-000002.tar"):
        S.load_vectors(tmp_path)


def test_missing_metadata_and_foreign_cache_are_refused_with_the_fix(tmp_path):
    with pytest.raises(S.CacheError, match="stage=cache"):
        S.load_cache_meta(tmp_path)
    S.write_cache(tmp_path, _chunks(), {"dim": 8, "dtype": "float16", "layer": "mixed3a",
                                        "model": "googlenet_bvlc"})
    with pytest.raises(S.CacheError, match="layer='mixed3a'.*layer='mixed3b'"):
        S.load_cache_meta(tmp_path, expect={"layer": "mixed3b"})
    with pytest.raises(S.CacheError, match="dim=8.*dim=480"):
        S.load_cache_meta(tmp_path, expect={"dim": 480})
    (tmp_path / "metadata.json").unlink()
    with pytest.raises(S.CacheError, match="did not finish.*resume"):
        S.load_cache_meta(tmp_path)


def test_sidecar_without_matching_tar_size_is_not_complete(tmp_path):
    S.write_cache(tmp_path, _chunks(n_chunks=2), {"dim": 8, "dtype": "float16"})
    assert S.shard_complete(tmp_path, 0)
    info = json.loads((tmp_path / "shard-000000.json").read_text())
    tar = tmp_path / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[: info["bytes"] // 2])
    assert not S.shard_complete(tmp_path, 0)
    assert not S.shard_complete(tmp_path, 7)


def test_holdout_split_is_deterministic_and_refuses_too_few_shards(tmp_path):
    meta = S.write_cache(tmp_path, _chunks(), {"dim": 8, "dtype": "float16"})
    train, hold = S.split_shards(meta, 0.34)
    assert hold == ["shard-000004.tar", "shard-000005.tar"] and len(train) == 4
    one = {"shards": [{"name": "shard-000000.tar"}]}
    with pytest.raises(S.CacheError, match="too few"):
        S.split_shards(one, 0.1)


def test_stream_never_yields_an_empty_or_partial_batch(tmp_path):
    S.write_cache(tmp_path, _chunks(n_chunks=3, n=50, d=4), {"dim": 4, "dtype": "float32"})
    for buffer in (16, 128, 1000):
        sizes = [len(b) for b in S.stream_vectors(tmp_path, None, batch_size=64,
                                                  shuffle_buffer=buffer, epochs=2)]
        assert sizes and set(sizes) == {64}
        assert sum(sizes) == 300 // 64 * 64


class _OpenOnUnpickle:
    """Unpickling this creates the file `path`: the payload a hostile shard would carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_member(tar_path, member: str, payload: bytes) -> None:
    """Append a member to a finished shard, as someone altering a shared cache would."""
    import io
    import tarfile

    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def rehash(cache_dir, name: str) -> None:
    """Make the sidecar and metadata.json agree with the altered tar (a thorough attacker)."""
    tar = cache_dir / name
    digest, size = S.sha256_file(tar), tar.stat().st_size
    side = tar.with_suffix(".json")
    info = json.loads(side.read_text())
    info.update(sha256=digest, bytes=size)
    side.write_text(json.dumps(info))
    meta = json.loads((cache_dir / "metadata.json").read_text())
    for s in meta["shards"]:
        if s["name"] == name:
            s.update(sha256=digest, bytes=size)
    (cache_dir / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("ext", ["pyd", "pkl", "pickle", "pth"])
def test_pickle_member_in_a_shard_is_refused_by_name_and_never_unpickled(tmp_path, ext):
    import pickle

    cache_dir, marker = tmp_path / "cache", tmp_path / "pwned"
    S.write_cache(cache_dir, _chunks(), {"dim": 8, "dtype": "float16"}, chunks_per_shard=2)
    plant_member(cache_dir / "shard-000001.tar", f"000001-00000.{ext}",
                 pickle.dumps(_OpenOnUnpickle(marker)))
    rehash(cache_dir, "shard-000001.tar")
    for read in (lambda: S.load_vectors(cache_dir),
                 lambda: list(S.stream_vectors(cache_dir, None, 64, epochs=1)),
                 lambda: S.load_sources(cache_dir)):
        with pytest.raises(S.CacheError, match=rf"shard-000001\.tar.*000001-00000\.{ext}"):
            read()
        assert not marker.exists(), "a pickle inside a shard was executed"


def test_object_array_in_a_shard_is_not_unpickled(tmp_path):
    import io
    import tarfile

    cache_dir, marker = tmp_path / "cache", tmp_path / "pwned"
    S.write_cache(cache_dir, _chunks(n_chunks=1), {"dim": 8, "dtype": "float32"})
    # Replace acts.npy by an object array whose element unpickles to the payload.
    buf = io.BytesIO()
    np.save(buf, np.array([_OpenOnUnpickle(marker)], dtype=object), allow_pickle=True)
    tar_path = cache_dir / "shard-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for m, blob in members:
            blob = buf.getvalue() if m.name.endswith("acts.npy") else blob
            m.size = len(blob)
            tar.addfile(m, io.BytesIO(blob))
    rehash(cache_dir, "shard-000000.tar")
    with pytest.raises(S.CacheError, match="shard-000000.tar"):
        S.load_vectors(cache_dir)
    assert not marker.exists()


@pytest.mark.parametrize("damage, problem", [
    ("truncate", "truncated"), ("delete", "missing"), ("grow", "grown"), ("flip", "corrupt"),
    ("sidecar", "at odds with its sidecar"),
])
def test_every_kind_of_damaged_shard_is_named_with_the_repair_command(tmp_path, damage, problem):
    S.write_cache(tmp_path, _chunks(), {"dim": 8, "dtype": "float16"}, chunks_per_shard=2)
    assert len(S.load_vectors(tmp_path)) == 300  # checked once, clean
    tar = tmp_path / "shard-000001.tar"
    blob = tar.read_bytes()
    if damage == "truncate":
        tar.write_bytes(blob[:3000])
    elif damage == "delete":
        tar.unlink()
    elif damage == "grow":
        plant_member(tar, "000001-00000.txt", b"x" * 20_000)
    elif damage == "flip":  # same size, a few bytes in the middle of the vectors
        mid = len(blob) // 2
        tar.write_bytes(blob[:mid] + bytes(b ^ 0xFF for b in blob[mid:mid + 4]) + blob[mid + 4:])
    else:
        side = tar.with_suffix(".json")
        side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": "0" * 64}))
    assert S.shard_problem(tmp_path, S.load_cache_meta(tmp_path)["shards"][1]).startswith(problem)
    with pytest.raises(S.CacheError, match=rf"shard-000001.tar is {problem}.*cache.verify=true"):
        S.load_vectors(tmp_path)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
@pytest.mark.parametrize("target", ["shard-000001.tar", "shard-000001.json", "metadata.json"])
def test_a_fifo_or_dev_zero_in_place_of_a_cache_file_is_named_and_never_hangs(tmp_path, kind,
                                                                             target):
    import signal

    cache_dir = tmp_path / "cache"
    S.write_cache(cache_dir, _chunks(), {"dim": 8, "dtype": "float16"}, chunks_per_shard=2)
    (cache_dir / target).unlink()
    if kind == "fifo":
        os.mkfifo(cache_dir / target)  # a read would block until a writer opens it: forever
    else:
        (cache_dir / target).symlink_to("/dev/zero")  # a read would never end

    def hung(*_):
        raise TimeoutError(f"reading a cache with {target} as {kind} hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with pytest.raises(S.CacheError) as err:
            S.load_vectors(cache_dir)
        assert target in str(err.value)
        assert "not a regular file" in str(err.value) or "readable sidecar" in str(err.value)
        assert not S.shard_complete(cache_dir, 1) or target == "metadata.json"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
