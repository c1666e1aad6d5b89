"""`make gpu-check` cannot rot: its smoke mode (GPU_CHECK_SMOKE=1: the CPU, toy sizes) runs every
step end to end here, and `make gpu-bundle`'s pieces are checked on real photos and weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import gpu_bundle
from benchmarks.gpu_check import TIMEOUTS, markdown, unpack_wheels

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "imagenet-sample"


def test_gpu_check_smoke_runs_every_step_on_the_cpu(tmp_path, weights_dir):
    env = dict(os.environ, GPU_CHECK_SMOKE="1", SAE_VISION_WEIGHTS_DIR=str(weights_dir))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", f"--out={out}",
                        f"--bundle={tmp_path / 'no-bundle'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200)
    res = json.loads((out / "results.json").read_text())
    steps = res["steps"]
    assert list(steps) == list(TIMEOUTS), p.stderr[-2000:]  # every step ran, in order
    assert res["smoke"] is True
    env_fig = steps["env"]["figures"]
    assert steps["env"]["ok"] and env_fig["cuda_available"] is False and env_fig["gemm_tflops"] > 0
    assert steps["gpu_tests"]["ok"] and steps["gpu_tests"]["figures"].get("skipped", 0) >= 1
    study = steps["study"]
    assert study["ok"], study["tail"]
    assert set(study["figures"]["stage_s"]) == {"cache", "train", "evaluate"}
    assert 0 <= study["figures"]["fvu"] < 1.5 and study["figures"]["l0"] > 0
    assert steps["syncs"]["ok"] and math.isfinite(steps["syncs"]["figures"]["host_syncs_per_step"])
    assert steps["caching"]["ok"] and steps["caching"]["figures"]["caching_vs_forward"] > 0
    assert steps["compile"]["ok"], steps["compile"]["tail"]
    bench = steps["bench_train"]  # needs the bench extra (overcomplete); skipped without it
    assert bench["ok"] or (bench["ok"] is None and "overcomplete" in bench["skipped"])
    table = (out / "results.md").read_text()
    assert table == markdown(res) and all(f"| {name} |" in table for name in TIMEOUTS)
    assert p.returncode == 0, p.stderr[-2000:]


def test_wheels_unpack_without_pip(tmp_path):
    import zipfile

    whl = tmp_path / "w" / "toy_pkg-1.0-py3-none-any.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("toy_pkg/__init__.py", "VALUE = 42\n")
    assert unpack_wheels(whl.parent, tmp_path / "site") == [whl.name]
    out = subprocess.run([sys.executable, "-c", "import toy_pkg; print(toy_pkg.VALUE)"],
                         env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True,
                         text=True)
    assert out.stdout.strip() == "42"


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="no ../shared/data/imagenet-sample")
def test_bundle_photos_are_224px_on_the_shorter_side(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(PHOTOS.glob("*.JPEG"))[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    assert gpu_bundle.copy_photos(src, tmp_path / "photos") == 3
    for f in (tmp_path / "photos").iterdir():
        with Image.open(f) as im:
            assert min(im.size) == gpu_bundle.PHOTO_SIDE
    assert gpu_bundle.folder_bytes(tmp_path / "photos") < 3 * 60_000


def test_bundle_names_a_missing_source(tmp_path, capsys):
    assert gpu_bundle.main(["--out", str(tmp_path / "b"), "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no weights at") and "--weights" in err[0]


def test_peer_imports_without_opencv_or_sklearn(tmp_path):
    """On a bare GPU machine overcomplete's package __init__ fails (it imports OpenCV and
    scikit-learn); the harness then loads only its SAE training modules. A stand-in package
    with the same layout, whose __init__ fails the same way, shows the fallback loads them."""
    root = tmp_path / "overcomplete"
    (root / "sae").mkdir(parents=True)
    (root / "__init__.py").write_text("import cv2_not_here\n")
    (root / "sae" / "__init__.py").write_text("raise ImportError('the package init ran')\n")
    (root / "sae" / "base.py").write_text("class SAE:\n    pass\n")
    (root / "sae" / "topk_sae.py").write_text(
        "from overcomplete.sae.base import SAE\n\nclass TopKSAE(SAE):\n    pass\n")
    (root / "sae" / "losses.py").write_text("def mse_l1():\n    return 'mse_l1'\n")
    (root / "sae" / "train.py").write_text(
        "def train_sae():\n    return 1\n\ndef train_sae_amp():\n    return 2\n")
    code = ("from benchmarks.training import import_overcomplete\n"
            "oc = import_overcomplete()\n"
            "assert issubclass(oc.TopKSAE, oc.SAE) and oc.mse_l1() == 'mse_l1'\n"
            "print(oc.train_sae(), oc.train_sae_amp())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}"))
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.split() == ["1", "2"]
