"""`python -m benchmarks.gpu_bundle [--out gpu-bundle]`: everything `make gpu-check` needs on a
GPU machine that has no network and only PyTorch, timm, scikit-image and matplotlib, in one
ignored folder of at most 60 MiB:

- wheels/: the pure-Python packages missing there (Hydra, OmegaConf and its ANTLR runtime,
  webdataset, overcomplete and einops for the side-by-side benchmark, pytest for the CUDA kernel
  tests). W&B does not fit (its wheel alone is ~20 MiB), so the check runs with
  `logger=disabled`; Lucent is left out because no step of the check draws feature
  visualisations.
- weights/: the BVLC GoogLeNet weights and their reference outputs.
- photos/: a 224-px (shorter side) JPEG copy of the ImageNet sample, the study's photos.

Wheels come from the package registry (pip download); the one sdist-only package (the ANTLR
runtime) is built into a wheel here. Nothing is downloaded at check time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from sae_vision.core import progress as P

MAX_BYTES = 60 * 2**20
# name==version pins, as the project's own install resolves them (pyproject, constraints.txt).
WHEELS = [
    "hydra-core==1.3.2", "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3",
    "webdataset", "braceexpand", "overcomplete==0.3.0", "einops",
    "pytest", "pluggy", "iniconfig",
]
PHOTO_SIDE = 224  # the pipeline's input size: the cache resizes to it anyway
SHARED = Path(__file__).resolve().parents[2] / "shared"


def folder_bytes(path: Path) -> int:
    """Bytes of every file below `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fetch_wheels(out: Path) -> None:
    """Download the pinned wheels; build the ones only published as sources."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    for spec in WHEELS:
        name = spec.split("==")[0].replace("-", "_").lower()
        if any(f.name.lower().startswith(name) for f in out.glob("*.whl")):
            continue
        got = subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "-d",
                              str(out), spec], capture_output=True, text=True)
        if got.returncode != 0:  # an sdist-only package: build its (pure-Python) wheel
            subprocess.run([*pip, "wheel", "--no-deps", "-w", str(out), spec], check=True)


def copy_photos(src: Path, out: Path) -> int:
    """A 224-px (shorter side) JPEG copy of every photo in `src`; returns how many."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(f for f in src.iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png"))
    for f in P.track(files, "gpu-bundle photos", unit="photo"):
        dst = out / (f.stem + ".JPEG")
        if dst.exists():
            continue
        with Image.open(f) as im:
            im = im.convert("RGB")
            scale = PHOTO_SIDE / min(im.size)
            im = im.resize((max(PHOTO_SIDE, round(im.width * scale)),
                            max(PHOTO_SIDE, round(im.height * scale))), Image.BICUBIC)
            im.save(dst, quality=90)
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """Build the bundle; exit 2 with one error line when a source is missing or it is too big."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-bundle")
    p.add_argument("--weights", default=str(SHARED / "weights"))
    p.add_argument("--photos", default=str(SHARED / "data" / "imagenet-sample"))
    args = p.parse_args(argv)
    out, weights, photos = Path(args.out), Path(args.weights), Path(args.photos)
    for what, path in (("weights", weights / "bvlc_googlenet.npz"), ("photos", photos)):
        if not path.exists():
            print(f"error: no {what} at {path}; pass --{what} <path>", file=sys.stderr)
            return 2
    fetch_wheels(out / "wheels")
    (out / "weights").mkdir(parents=True, exist_ok=True)
    for f in weights.iterdir():
        if f.is_file() and f.suffix in (".npz", ".json", ".npy", ".sha256"):
            shutil.copy2(f, out / "weights" / f.name)
    n = copy_photos(photos, out / "photos")
    size = folder_bytes(out)
    print(f"gpu-bundle: {out} holds {len(list((out / 'wheels').glob('*.whl')))} wheels, the "
          f"weights and {n} photos: {size / 2**20:.1f} MiB (limit {MAX_BYTES / 2**20:.0f})")
    if size > MAX_BYTES:
        print(f"error: {out} is {size / 2**20:.1f} MiB, over {MAX_BYTES / 2**20:.0f} MiB; "
              "delete it and rebuild with fewer photos (--photos <a smaller folder>)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
