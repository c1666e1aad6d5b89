"""Stage cache: real weights, vectors checked against a fresh forward pass, kill and resume,
two processes, several layers in one pass, bad images skipped and named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils._python_dispatch import TorchDispatchMode

from sae_vision.activations import cache, shards
from sae_vision.activations.images import DemoImages
from sae_vision.core.config import Config

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(root, **over) -> Config:
    cfg = Config()
    cfg.stage.name = "cache"
    cfg.paths.root = str(root)
    cfg.model.device = "cpu"
    cfg.data.n_images = over.pop("n_images", 12)
    cfg.cache.images_per_shard = over.pop("images_per_shard", 4)
    cfg.cache.batch_size = over.pop("batch_size", 4)
    cfg.cache.n_per_image = over.pop("n_per_image", 8)
    for k, v in over.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg


def read_plain(cache_dir: Path):
    """Every (pos, vector) in the cache through plain webdataset calls (not our loader)."""
    meta = json.loads((cache_dir / "metadata.json").read_text())
    pos, vecs = [], []
    urls = [str(cache_dir / s["name"]) for s in meta["shards"]]
    for rec in wds.WebDataset(urls, shardshuffle=False).decode():
        pos.append(rec["pos.npy"])
        vecs.append(rec["acts.npy"].astype(np.float32))
    return meta, np.concatenate(pos), np.concatenate(vecs)


def test_cached_vectors_equal_a_fresh_forward_pass(tmp_path, bvlc_model):
    cfg = tiny_cfg(tmp_path, n_images=8)
    res = cache.run(cfg)
    meta, pos, vecs = read_plain(Path(res.cache_dirs["mixed3b"]))
    assert meta["dim"] == 480 and meta["n_images"] == 8 and meta["n_vectors"] == 8 * 8
    assert meta["weights_sha256"] == bvlc_model.weights_sha256
    assert sorted(set(pos[:, 0].tolist())) == list(range(8))
    images = DemoImages(cfg.data)
    x = torch.stack([images[i].image for i in range(8)])
    with torch.no_grad():
        fresh = bvlc_model.activations(x, ["mixed3b"])["mixed3b"]
    want = fresh[pos[:, 0], :, pos[:, 1], pos[:, 2]].numpy()
    np.testing.assert_allclose(vecs, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # Statistics in the metadata describe exactly the stored vectors.
    np.testing.assert_allclose(meta["mean"], vecs.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)


def test_norm_weighted_sampling_prefers_active_positions_and_is_deterministic():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    acts = torch.zeros(4, 10, 10)
    acts[:, 2, 3] = 100.0  # one very active position
    mask = torch.ones(10, 10, dtype=torch.bool)
    a = cache.sample_positions(acts.norm(dim=0), "norm_weighted", 5, mask, g1)
    b = cache.sample_positions(acts.norm(dim=0), "norm_weighted", 5, mask, g2)
    assert torch.equal(a, b) and len(a) == 5 and len(set(a.tolist())) == 5
    assert 23 in a.tolist()
    assert len(cache.sample_positions(acts.norm(dim=0), "all", 5, mask, g1)) == 100


def test_exclude_border_keeps_receptive_fields_inside_the_image(tmp_path, bvlc_model):
    cfg = tiny_cfg(tmp_path, n_images=4, cache__exclude_border=True, cache__sampling="all",
                   layer__name="conv2d2", layer__dim=192)
    res = cache.run(cfg)
    _, pos, _ = read_plain(Path(res.cache_dirs["conv2d2"]))
    g = bvlc_model.geometry("conv2d2")
    centre = g.offset + g.stride * pos[:, 1:]
    assert (centre - g.rf_size / 2 >= 0).all() and (centre + g.rf_size / 2 <= 224).all()
    assert 0 < len(np.unique(pos[:, 1])) < g.size


def test_several_layers_share_one_forward_pass_with_one_cache_each(tmp_path, bvlc_model,
                                                                   monkeypatch):
    calls = []
    orig = type(bvlc_model).activations

    def counting(self, x, layers):
        calls.append(tuple(layers))
        return orig(self, x, layers)

    monkeypatch.setattr(type(bvlc_model), "activations", counting)
    cfg = tiny_cfg(tmp_path, n_images=4, cache__layers=["conv2d0", "mixed3a"])
    res = cache.run(cfg)
    assert set(res.cache_dirs) == {"conv2d0", "mixed3a"}
    assert len({Path(d) for d in res.cache_dirs.values()}) == 2
    assert all(c == ("conv2d0", "mixed3a") for c in calls if len(c) == 2)
    assert sum(len(c) == 2 for c in calls) == 1  # 4 images, batch 4: one pass for both layers
    dims = {la: json.loads((Path(d) / "metadata.json").read_text())["dim"]
            for la, d in res.cache_dirs.items()}
    assert dims == {"conv2d0": 64, "mixed3a": 256}


def test_complete_cache_is_reused_not_rebuilt(tmp_path):
    cfg = tiny_cfg(tmp_path, n_images=4)
    first = cache.run(cfg)
    mtime = (Path(first.cache_dirs["mixed3b"]) / "shard-000000.tar").stat().st_mtime_ns
    again = cache.run(cfg)
    assert again.reused and again.cache_dirs == first.cache_dirs
    assert (Path(first.cache_dirs["mixed3b"]) / "shard-000000.tar").stat().st_mtime_ns == mtime


def test_unreadable_images_are_skipped_counted_and_named(tmp_path):
    root = tmp_path / "imgs" / "c"
    root.mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (60, 50), (40 * i, 90, 200)).save(root / f"ok{i}.png")
    (root / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = tiny_cfg(tmp_path / "art", n_images=0, data__name="imagefolder",
                   data__root=str(tmp_path / "imgs"))
    res = cache.run(cfg)
    meta = json.loads((Path(res.cache_dirs["mixed3b"]) / "metadata.json").read_text())
    assert meta["n_skipped"] == 1 and meta["skipped"][0]["source"].endswith("zz_broken.jpg")
    assert meta["n_images"] == 3 and meta["n_vectors"] == 3 * 8


def test_unknown_layer_fails_with_the_valid_names(tmp_path):
    cfg = tiny_cfg(tmp_path, cache__layers=["mixed3b", "mixed9z"])
    with pytest.raises(ValueError, match="mixed9z.*valid layers are.*conv2d0"):
        cache.run(cfg)


def _cache_cmd(root, n_images, extra=()):
    return [sys.executable, "run.py", "stage=cache", "logger=disabled", f"paths.root={root}",
            f"data.n_images={n_images}", "cache.images_per_shard=4", "cache.batch_size=4",
            "cache.n_per_image=4", "layer=mixed3a", "model.device=cpu", *extra]


def _image_ids(cache_dir: Path) -> list[int]:
    _, pos, _ = read_plain(cache_dir)
    # One entry per (image, position); collapse to images via the sampled count per image.
    ids, counts = np.unique(pos[:, 0], return_counts=True)
    assert (counts == 4).all(), "an image was written twice or partially"
    assert len(np.unique(pos, axis=0)) == len(pos), "duplicate vectors"
    return ids.tolist()


def test_cache_resumes_after_kill_without_duplicate_or_missing_images(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cache_cmd(tmp_path, 40), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    cache_dirs = []
    while time.time() < deadline:
        cache_dirs = list((tmp_path / "cache").glob("mixed3a-*"))
        if cache_dirs and len(list(cache_dirs[0].glob("shard-*.json"))) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cache_dirs, "cache run never started writing"
    d = cache_dirs[0]
    assert not (d / "metadata.json").exists()
    n_done = len(list(d.glob("shard-*.json")))
    assert 3 <= n_done < 10
    out = subprocess.run(_cache_cmd(tmp_path, 40), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{n_done} done" in out.stdout or f"{n_done + 1} done" in out.stdout
    assert _image_ids(d) == list(range(40))
    assert not list(d.glob(".*tmp")) and not list(d.glob("*.lock"))


@pytest.mark.slow
def test_two_process_torchrun_caches_the_same_vectors_as_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    out = subprocess.run(_cache_cmd(one, 16), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29533",
                          *_cache_cmd(two, 16)[1:]], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (d1,), (d2,) = list((one / "cache").glob("*")), list((two / "cache").glob("*"))
    assert d1.name == d2.name
    m1, p1, v1 = read_plain(d1)
    m2, p2, v2 = read_plain(d2)
    o1, o2 = np.lexsort(p1.T[::-1]), np.lexsort(p2.T[::-1])
    assert np.array_equal(p1[o1], p2[o2])
    np.testing.assert_allclose(v1[o1], v2[o2], rtol=1e-3, atol=1e-2)
    assert m1["n_vectors"] == m2["n_vectors"] and len(m2["shards"]) == 4


@pytest.mark.slow
def test_two_concurrent_runs_on_one_cache_key_do_not_corrupt_it(tmp_path):
    procs = [subprocess.Popen(_cache_cmd(tmp_path, 32), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    (d,) = list((tmp_path / "cache").glob("*"))
    assert _image_ids(d) == list(range(32))
    shards.load_cache_meta(d)


class _HostCopies(TorchDispatchMode):
    """Stands in for a GPU: maps live on the `meta` device, and each copy from there to the
    host is recorded (shape) and answered with zeros of that shape."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func.overloadpacket.__name__ in ("_to_copy", "copy_") and args[0].is_meta
                and torch.device(kwargs.get("device", "meta")).type == "cpu"):
            self.shapes.append(tuple(args[0].shape))
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


@pytest.mark.parametrize("sampling", ["norm_weighted", "uniform"])
def test_only_the_sampled_vectors_leave_the_models_device(sampling):
    b, c, h, k = 3, 480, 28, 8
    acts = torch.empty(b, c, h, h, device="meta")
    mask = torch.ones(h, h, dtype=torch.bool)
    with _HostCopies() as copies:
        vecs, flat = cache.sample_vectors(acts, [5, 6, 7], sampling, k, mask, seed=0)
    assert vecs.device.type == "cpu" and vecs.shape == (b * k, c) and flat.shape == (b * k,)
    # The vectors come back, and the [B, H, W] norms when the draw needs them; never the maps.
    want = [(b * k, c)] + ([(b, h, h)] if sampling == "norm_weighted" else [])
    assert sorted(copies.shapes) == sorted(want)


def test_sampled_vectors_on_the_cpu_are_the_maps_at_the_sampled_positions():
    acts = torch.randn(2, 16, 9, 9)
    mask = cache.valid_mask(9, None, 224, exclude_border=False)
    vecs, flat = cache.sample_vectors(acts, [3, 4], "norm_weighted", 5, mask, seed=1)
    for i, (a, idx) in enumerate(zip(acts, [3, 4])):
        gen = torch.Generator().manual_seed(1 * 1_000_003 + idx)
        want = cache.sample_positions(a.norm(dim=0), "norm_weighted", 5, mask, gen)
        assert torch.equal(flat[i * 5:(i + 1) * 5], want)
        assert torch.equal(vecs[i * 5:(i + 1) * 5], a.flatten(1)[:, want].T)


class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i, os.getpid()


def test_decoding_workers_persist_from_shard_to_shard(tmp_path):
    cfg = tiny_cfg(tmp_path, n_images=12, images_per_shard=4, batch_size=3, data__num_workers=1)
    got = {s: [x for batch in batches for x in batch]
           for s, batches in cache.shard_loader(cfg, _Pids(), [0, 2], 12)}
    assert [i for i, _ in got[0]] == [0, 1, 2, 3] and [i for i, _ in got[2]] == [8, 9, 10, 11]
    pids = {pid for items in got.values() for _, pid in items}
    assert len(pids) == 1 and pids != {os.getpid()}


def test_shards_match_plain_batches_written_on_the_default_threads(tmp_path, bvlc_model):
    """The stage's host-side shortcuts (one input buffer reused from batch to batch, one thread
    for stacking, sampling and encoding) change no byte: its shards and their statistics equal
    those written from freshly stacked batches with every op on two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # Batches of 3 and 1 per 4-image shard: a short batch reuses the buffer, then a full one.
        cfg = tiny_cfg(tmp_path, n_images=8, batch_size=3)
        got = Path(cache.run(cfg).cache_dirs["mixed3b"])
        ref, images = tmp_path / "ref", DemoImages(cfg.data)
        ref.mkdir()
        mask = cache.valid_mask(28, bvlc_model.geometry("mixed3b"), cfg.data.image_size,
                                cfg.cache.exclude_border)
        for shard in (0, 1):
            writer = shards.ShardWriter(ref, shard, 480, cfg.cache.dtype)
            for lo in (4 * shard, 4 * shard + 3):
                idx = list(range(lo, min(lo + 3, 4 * shard + 4)))
                x = torch.stack([images[i].image for i in idx])
                with torch.inference_mode():
                    acts = bvlc_model.activations(x, ["mixed3b"])["mixed3b"]
                vecs, flat = cache.sample_vectors(acts, idx, cfg.cache.sampling,
                                                  cfg.cache.n_per_image, mask, cfg.seed)
                pos = np.stack([np.repeat(idx, cfg.cache.n_per_image), (flat // 28).numpy(),
                                (flat % 28).numpy()], 1)
                writer.add(vecs, pos.astype(np.int32), {i: images[i].source for i in idx})
            want = writer.finish((4 * shard, 4 * shard + 4), 4, [])
            side = json.loads((got / shards.shard_name(shard)).with_suffix(".json").read_text())
            assert {k: side[k] for k in want} == want
            assert (got / side["name"]).read_bytes() == (ref / want["name"]).read_bytes()
    finally:
        torch.set_num_threads(before)


def test_a_views_cache_keeps_each_photo_in_one_shard_and_view_0_is_the_plain_crop(tmp_path):
    from sae_vision.activations.images import SHARED_SAMPLE

    if not SHARED_SAMPLE.is_dir():
        pytest.skip(f"needs the ImageNet sample at {SHARED_SAMPLE}")
    over = dict(n_images=2, batch_size=3, data__name="imagefolder", data__root=str(SHARED_SAMPLE),
                data__image_size=96, cache__sampling="all")
    views = cache.run(tiny_cfg(tmp_path, images_per_shard=3, data__views=3, **over))
    plain = cache.run(tiny_cfg(tmp_path, images_per_shard=1, **over))
    vdir, pdir = Path(views.cache_dirs["mixed3b"]), Path(plain.cache_dirs["mixed3b"])
    assert vdir != pdir  # the views cache never reuses the plain one
    meta, pos, vecs = read_plain(vdir)
    _, ppos, pvecs = read_plain(pdir)
    assert meta["n_images"] == 6 and meta["data"]["views"] == 3
    assert [s["image_range"] for s in meta["shards"]] == [[0, 3], [3, 6]]
    src = shards.load_sources(vdir)
    photos = sorted({s.split(":")[0] for s in src.values()})
    assert len(photos) == 2
    for i, s in src.items():  # photo-major: shard k holds exactly photo k's three views
        assert s.startswith(f"{photos[i // 3]}:view={i % 3}:crop=")
    train, held = shards.split_shards(meta, 0.34)
    assert (train, held) == (["shard-000000.tar"], ["shard-000001.tar"])
    n = 12 * 12  # mixed3b at 96 px: every position
    assert len(vecs) == 6 * n and (pos[:, 0] == np.repeat(np.arange(6), n)).all()
    for photo in range(2):  # view 0 is the plain centre crop: the same vectors (to one float16
        # step: the two caches batch their forward passes differently)
        np.testing.assert_allclose(vecs[pos[:, 0] == 3 * photo], pvecs[ppos[:, 0] == photo],
                                   rtol=2e-3, atol=1e-3)
    assert not np.array_equal(vecs[pos[:, 0] == 0], vecs[pos[:, 0] == 1])
