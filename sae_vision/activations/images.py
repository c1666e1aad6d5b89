"""Image sources: the embedded demo photographs, ImageNet-style folders and webdataset tars.

Every source yields `(image_idx, source, image_3HW)` with the image as RGB float in [0, 1] at
`image_size`, or `None` in place of the image when it cannot be decoded, so the caller can skip
and name it without stopping the run. Model-specific normalisation happens inside the model.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sae_vision.core import DataConfig

# Natural photographs that ship inside scikit-image and scikit-learn: the offline demo data.
DEMO_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "stereo_motorcycle", "china", "flower",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
# Decompression-bomb guard: larger images are downscaled before decoding fully.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Item:
    """One image: its global index, a human-readable source, and the pixels (None = unreadable)."""

    idx: int
    source: str
    image: torch.Tensor | None
    error: str | None = None


def load_demo_photos() -> dict[str, np.ndarray]:
    """The embedded photographs as HxWx3 uint8 arrays (no download)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {}
    sk = load_sample_images()
    sklearn_photos = {Path(f).stem: im for f, im in zip(sk.filenames, sk.images)}
    for name in DEMO_PHOTOS:
        if name in sklearn_photos:
            im = sklearn_photos[name]
        else:
            im = getattr(skimage.data, name)()
            if isinstance(im, tuple):  # stereo_motorcycle -> (left, right, disparity)
                im = im[0]
        photos[name] = np.array(im[..., :3])  # writable copy
    return photos


def to_rgb_float(img: Image.Image) -> torch.Tensor:
    """Any PIL image (greyscale, CMYK, palette, 16-bit, alpha) as RGB float [0, 1] 3xHxW."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        arr = (arr / hi * 255.0).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return TF.to_tensor(img)


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Decode bytes or a path with PIL, refusing empty and truncated files."""
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            img.draft("RGB", (4096, 4096))  # JPEG-only fast downscale; others load then shrink
        img.load()  # forces a full decode, so truncation is caught here, not later
    if img.width * img.height > MAX_PIXELS:
        img.thumbnail((4096, 4096))
    return img


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to size*8/7 and centre-crop to size (the ImageNet convention)."""
    img = TF.resize(img, int(round(size * 8 / 7)), antialias=True)
    return TF.center_crop(img, [size, size]).clamp(0, 1)


def random_resized_crop(img: torch.Tensor, rng: np.random.Generator, min_scale: float,
                        max_scale: float, size: int) -> tuple[torch.Tensor, str]:
    """A random-resized crop of img (3xHxW) at size x size with a random horizontal flip, drawn
    from rng by torchvision's RandomResizedCrop rule (area fraction in [min_scale, max_scale],
    aspect ratio in [3/4, 4/3], ten tries, then the centred square); returns (crop, "crop=top,
    left,h,w:flip=0|1")."""
    _, h, w = img.shape
    for _ in range(10):
        area = h * w * rng.uniform(min_scale, max_scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        ch = cw = min(h, w)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    flip = bool(rng.integers(0, 2))
    crop = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True).clamp(0, 1)
    if flip:
        crop = TF.hflip(crop)
    return crop, f"crop={top},{left},{ch},{cw}:flip={int(flip)}"


class DemoImages(torch.utils.data.Dataset):
    """Random-resized crops with flips of the embedded photos, deterministic per (seed, idx)."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.names = list(DEMO_PHOTOS)
        self.photos = [TF.to_tensor(p) for p in load_demo_photos().values()]
        self.n = cfg.n_images if cfg.n_images > 0 else 1024

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> Item:
        rng = np.random.default_rng([self.cfg.seed, idx])
        photo_i = idx % len(self.photos)
        crop, where = random_resized_crop(self.photos[photo_i], rng, self.cfg.min_scale,
                                          self.cfg.max_scale, self.cfg.image_size)
        return Item(idx, f"demo:{self.names[photo_i]}:{where}", crop)


DATA_ENV = "SAE_VISION_DATA_DIR"
# The 900-photo ImageNet sample of this workplace, beside the checkout (never committed).
SHARED_SAMPLE = Path(__file__).resolve().parents[3] / "shared/data/imagenet-sample"


def resolve_data_root(root: str | None) -> str | None:
    """ImageFolder root: an explicit data.root, then $SAE_VISION_DATA_DIR, then
    ../shared/data/imagenet-sample beside the checkout; None when none of them exists."""
    if root:
        return root
    env = os.environ.get(DATA_ENV)
    if env:
        return env
    return str(SHARED_SAMPLE) if SHARED_SAMPLE.is_dir() else None


def stratified_subset(files: list[Path], root: Path, n_images: int, seed: int) -> list[Path]:
    """`n_images` of `files` (all when <= 0), the same number from every class folder (the first
    folder under `root`), drawn and then shuffled with `seed` so that every shard, the held-out
    ones included, mixes the classes. When n_images is not a multiple of the class count, the
    remainder goes one image each to classes drawn at random; a class with fewer images than
    its share gives all it has."""
    by_class: dict[str, list[Path]] = {}
    for f in files:
        parts = f.relative_to(root).parts
        by_class.setdefault(parts[0] if len(parts) > 1 else "", []).append(f)
    rng = np.random.default_rng([int(seed), 0x5EB5E7])
    names = sorted(by_class)
    if n_images > 0:
        share = np.full(len(names), n_images // len(names))
        share[rng.choice(len(names), n_images % len(names), replace=False)] += 1
    else:
        share = np.array([len(by_class[c]) for c in names])
    picked = []
    for name, n in zip(names, share):
        members = by_class[name]
        take = rng.choice(len(members), min(int(n), len(members)), replace=False)
        picked += [members[i] for i in sorted(take)]
    return [picked[i] for i in rng.permutation(len(picked))]


class FolderImages(torch.utils.data.Dataset):
    """ImageNet-style class folders (or any tree of images), sorted for a stable order; with
    data.subset=stratified, a seeded class-balanced sample (`stratified_subset`).

    With data.views = V > 1 every photo gives V items, photo-major (item i is view i % V of
    photo i // V, so a shard of a multiple of V items never splits a photo): view 0 is the
    plain centre crop, views 1.. are random-resized crops with a random horizontal flip
    (`random_resized_crop`, scale range data.min_scale..max_scale), deterministic per
    (data.seed, photo, view). Each item's source names the photo, the view, its crop and flip."""

    def __init__(self, cfg: DataConfig):
        root = Path(cfg.root or "")
        if not root.is_dir():
            raise FileNotFoundError(
                f"data.root={cfg.root!r} is not a folder; point it at ImageNet's train/ or val/ "
                "folder (one sub-folder per class), or use data=demo"
            )
        self.root = root
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        if cfg.subset == "stratified":
            self.files = stratified_subset(self.files, root, cfg.n_images, cfg.seed)
        elif cfg.n_images > 0:
            self.files = self.files[: cfg.n_images]
        self.size = cfg.image_size
        self.cfg = cfg
        self.views = int(getattr(cfg, "views", 1))
        self._last: tuple[int, torch.Tensor] | None = None  # (photo, decoded) when views > 1

    def __len__(self) -> int:
        return len(self.files) * self.views

    def _decoded(self, photo: int) -> torch.Tensor:
        """The photo as RGB float; with views, the last one decoded is kept (items come
        photo-major, so a photo's views decode it once)."""
        if self.views == 1:
            return to_rgb_float(decode_image(self.files[photo]))
        if self._last is None or self._last[0] != photo:
            self._last = None  # a failed decode must not leave the previous photo behind
            self._last = (photo, to_rgb_float(decode_image(self.files[photo])))
        return self._last[1]

    def __getitem__(self, idx: int) -> Item:
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        photo, view = divmod(idx, self.views)
        path = self.files[photo]
        source = str(path.relative_to(self.root))
        if self.views > 1:
            source += f":view={view}:crop=centre:flip=0" if view == 0 else f":view={view}"
        try:
            img = self._decoded(photo)
            if view == 0:
                return Item(idx, source, center_crop(img, self.size))
            rng = np.random.default_rng([int(self.cfg.seed), photo, view])
            crop, where = random_resized_crop(img, rng, self.cfg.min_scale, self.cfg.max_scale,
                                              self.size)
            return Item(idx, f"{source}:{where}", crop)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip and name it"
            return Item(idx, source, None, f"{type(e).__name__}: {e}")


def iter_webdataset(cfg: DataConfig) -> Iterator[Item]:
    """Stream images from webdataset tars (local paths, brace patterns, pipe: or URLs)."""
    import webdataset as wds

    ds = wds.WebDataset(cfg.urls, shardshuffle=False, empty_check=False)
    n = 0
    for sample in ds:
        if 0 < cfg.n_images <= n:
            return
        key = f"{sample.get('__url__', '')}#{sample['__key__']}"
        blob = next((sample[k] for k in ("jpg", "jpeg", "png", "webp", "ppm") if k in sample), None)
        try:
            if blob is None:
                raise ValueError("record has no image (jpg/jpeg/png/webp/ppm)")
            img = center_crop(to_rgb_float(decode_image(blob)), cfg.image_size)
            yield Item(n, key, img)
        except Exception as e:  # noqa: BLE001
            yield Item(n, key, None, f"{type(e).__name__}: {e}")
        n += 1


def make_images(cfg: DataConfig):
    """A map-style dataset (demo, imagefolder) or an iterator factory (webdataset)."""
    if cfg.name == "demo":
        return DemoImages(cfg)
    if cfg.name == "imagefolder":
        return FolderImages(cfg)
    if cfg.name == "webdataset":
        return None
    raise ValueError(f"data.name={cfg.name!r} has no image source; use demo, imagefolder or webdataset")


def collate_items(items: list[Item]) -> list[Item]:
    """Keep Items as a list: skipped images stay visible to the caller."""
    return items
