"""Image sources: the demo crops are deterministic, and every kind of bad image is handled."""

import io

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
