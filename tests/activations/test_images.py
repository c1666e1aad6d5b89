"""Image sources: the demo crops are deterministic, and every kind of bad image is handled."""

import collections
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sae_vision.activations.images import DemoImages, FolderImages, load_demo_photos
from sae_vision.core.config import DataConfig


def test_demo_photos_load_offline_from_installed_packages():
    photos = load_demo_photos()
    assert len(photos) == 10
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 for p in photos.values())


def test_demo_crops_are_deterministic_under_seed_and_differ_across_seeds():
    a = DemoImages(DataConfig(n_images=6, seed=1))
    b = DemoImages(DataConfig(n_images=6, seed=1))
    c = DemoImages(DataConfig(n_images=6, seed=2))
    for i in range(6):
        assert torch.equal(a[i].image, b[i].image)
        assert a[i].source == b[i].source
    assert any(not torch.equal(a[i].image, c[i].image) for i in range(6))
    assert a[0].image.shape == (3, 224, 224)
    assert 0 <= float(a[0].image.min()) and float(a[0].image.max()) <= 1


def _save(img: Image.Image, path, fmt="PNG", **kw):
    img.save(path, fmt, **kw)
    return path


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "imgs" / "class0"
    root.mkdir(parents=True)
    rgb = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    _save(rgb, root / "a_ok.png")
    _save(rgb.convert("L"), root / "b_grey.png")
    _save(rgb.convert("CMYK"), root / "c_cmyk.jpg", "JPEG")
    arr16 = (np.random.default_rng(1).random((40, 50)) * 65535).astype(np.uint16)
    Image.fromarray(arr16).save(root / "d_16bit.png")
    _save(Image.new("RGB", (5000, 4000), (10, 200, 30)), root / "e_huge.jpg", "JPEG")
    (root / "f_empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG")
    (root / "g_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "h_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png at all")
    _save(rgb.convert("RGBA"), root / "i_alpha.png")
    _save(rgb.convert("P"), root / "j_palette.png")
    return tmp_path / "imgs"


def test_bad_images_are_converted_or_skipped_and_named(messy_folder):
    ds = FolderImages(DataConfig(name="imagefolder", root=str(messy_folder), n_images=0))
    items = {it.source.split("/")[-1]: it for it in (ds[i] for i in range(len(ds)))}
    for ok in ("a_ok.png", "b_grey.png", "c_cmyk.jpg", "d_16bit.png", "e_huge.jpg",
               "i_alpha.png", "j_palette.png"):
        assert items[ok].image is not None, ok
        assert items[ok].image.shape == (3, 224, 224)
    # 16-bit greyscale keeps its contrast instead of clipping to white.
    assert 0.2 < float(items["d_16bit.png"].image.mean()) < 0.8
    for bad in ("f_empty.jpg", "g_truncated.jpg", "h_corrupt.png"):
        assert items[bad].image is None, bad
        assert items[bad].error


def test_missing_imagefolder_root_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        FolderImages(DataConfig(name="imagefolder", root=str(tmp_path / "nope")))


@pytest.fixture
def class_tree(tmp_path):
    """A fake ImageNet train/ tree: 8 class folders of 10 (class 7: 3) tiny PNGs."""
    for c in range(8):
        d = tmp_path / f"n{c:08d}"
        d.mkdir()
        for i in range(10 if c < 7 else 3):
            Image.new("RGB", (4, 4), (c * 30, i * 20, 0)).save(d / f"img{i}.png")
    return tmp_path


def _classes(ds) -> list[str]:
    return [p.parent.name for p in ds.files]


def test_stratified_subset_takes_the_same_number_from_every_class_seeded(class_tree):
    cfg = DataConfig(name="imagefolder", root=str(class_tree), n_images=16, subset="stratified")
    ds = FolderImages(cfg)
    counts = collections.Counter(_classes(ds))
    assert len(ds) == 16 and len(counts) == 8 and set(counts.values()) == {2}
    assert _classes(ds)[:8] != sorted(_classes(ds)[:8])  # shuffled: every shard mixes classes
    assert FolderImages(cfg).files == ds.files  # seeded
    other = FolderImages(dataclasses.replace(cfg, seed=1))
    assert sorted(other.files) != sorted(ds.files)
    # The default keeps the first n of the sorted tree: 16 files from only two classes.
    first = FolderImages(dataclasses.replace(cfg, subset="first"))
    assert len(set(_classes(first))) == 2


def test_stratified_subset_spreads_a_remainder_and_a_short_class_gives_all(class_tree):
    cfg = DataConfig(name="imagefolder", root=str(class_tree), n_images=60, subset="stratified")
    counts = collections.Counter(_classes(FolderImages(cfg)))
    # 60 = 8 x 7 + 4: four classes draw 8, four draw 7; class 7 has only 3 images.
    assert counts["n00000007"] == 3
    assert sorted(v for k, v in counts.items() if k != "n00000007") in (
        [7, 7, 7, 8, 8, 8, 8], [7, 7, 7, 7, 8, 8, 8])
    ds_all = FolderImages(dataclasses.replace(cfg, n_images=0))
    assert sorted(ds_all.files) == sorted(p for p in class_tree.rglob("*.png"))


def test_the_paper_experiment_draws_a_stratified_subset():
    from omegaconf import OmegaConf

    paper = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/experiment/paper.yaml")
    assert paper.data.subset == "stratified" and paper.data.n_images == 200_000


# --------------------------------------------------------------------------------------------
# data.views: augmented views of folder photos


@pytest.fixture
def photo_folder(tmp_path):
    """Four noise photos of assorted sizes in two class folders."""
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(60, 80), (90, 70), (64, 64), (50, 100)]):
        d = tmp_path / f"n0000000{i % 2}"
        d.mkdir(exist_ok=True)
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"p{i}.png")
    return tmp_path


def test_one_view_gives_todays_items_byte_for_byte(photo_folder):
    from sae_vision.activations.images import center_crop, decode_image, to_rgb_float

    ds = FolderImages(DataConfig(name="imagefolder", root=str(photo_folder), n_images=0,
                                 image_size=32))
    assert len(ds) == 4
    for i, path in enumerate(ds.files):
        it = ds[i]
        assert it.idx == i and it.source == str(path.relative_to(photo_folder))
        assert torch.equal(it.image, center_crop(to_rgb_float(decode_image(path)), 32))


def test_three_views_are_photo_major_distinct_and_deterministic(photo_folder):
    cfg = DataConfig(name="imagefolder", root=str(photo_folder), n_images=0, image_size=32,
                     views=3, min_scale=0.2, max_scale=0.6)
    plain = FolderImages(dataclasses.replace(cfg, views=1))
    ds, again = FolderImages(cfg), FolderImages(cfg)
    other_seed = FolderImages(dataclasses.replace(cfg, seed=1))
    assert len(ds) == 12
    for i in range(12):
        photo, view = divmod(i, 3)
        it = ds[i]
        name = str(plain.files[photo].relative_to(photo_folder))
        assert it.idx == i and it.source.startswith(f"{name}:view={view}:crop=")
        assert it.source.endswith((":flip=0", ":flip=1"))
        assert torch.equal(it.image, again[i].image) and it.source == again[i].source
        if view == 0:  # the plain centre crop
            assert torch.equal(it.image, plain[photo].image)
            assert it.source == f"{name}:view=0:crop=centre:flip=0"
        else:
            assert not torch.equal(it.image, ds[i - 1].image)
            assert it.source != other_seed[i].source
    crops = {ds[i].source.split(":crop=")[1] for i in range(12)}
    assert len(crops) == 4 * 2 + 1  # every random view its own crop; the centre crop once
