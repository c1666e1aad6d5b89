"""`python3 -m benchmarks.gpu_check` (`make gpu-check`): prove the CUDA path and measure it, in at
most 8 minutes on one GPU, on a machine with no network that has only PyTorch, timm,
scikit-image and matplotlib. `make gpu-bundle` builds the folder it reads (gpu-bundle/: wheels,
weights, 224-px photos); the wheels are unpacked into a temporary folder first.

Steps, in order, each with its own timeout, carrying on after a failure:
1. env: CUDA usable, bf16, the driver, and the measured bf16 GEMM rate (the peak the training
   step is compared with);
2. gpu_tests: the CUDA kernel tests (`pytest -m gpu`);
3. study: `make study`'s cache, train (one TopK SAE) and evaluate on the bundled photos, on the
   GPU, with the default loader and the default nulls;
4. bench_train: our trainer beside overcomplete on the same GPU and precision (TopK and ReLU-L1,
   F = 3,840 and 7,680, bf16 and fp32+TF32, through `benchmarks.run --dtype --expansion`), and
   each step's rate against the dense roofline that the harness measures on the same device;
5. syncs: host syncs (`.item()`, `nonzero`) per non-logging TopK training step, counted with a
   dispatch mode;
6. caching: the cache stage against a bare forward on the same decoded images;
7. compile: `train.compile=true`, if time remains.

Writes <out>/results.json and <out>/results.md after every step, so a killed check keeps what it
measured. GPU_CHECK_SMOKE=1 runs the same steps on the CPU at toy sizes (`make test` does, so the
script cannot rot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the whole check: 8 minutes
# step -> its timeout in seconds (GPU); smoke mode runs on a CPU at toy sizes.
TIMEOUTS = {"env": 45, "gpu_tests": 60, "study": 200, "bench_train": 150, "syncs": 30,
            "caching": 60, "compile": 60}
SMOKE_TIMEOUTS = {"env": 60, "gpu_tests": 120, "study": 400, "bench_train": 240, "syncs": 120,
                  "caching": 120, "compile": 200}
BENCH_VARIANTS = [(8, "bf16"), (16, "bf16"), (8, "fp32"), (16, "fp32")]  # F = 3,840 and 7,680

ENV_SNIPPET = r"""
import json, subprocess, time, torch
out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
       "cuda_build": torch.version.cuda}
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
    out["device_name"] = torch.cuda.get_device_name(0)
    out["capability"] = list(torch.cuda.get_device_capability(0))
    out["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
            "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception as e:
        out["driver"] = f"unknown ({e})"
n, dtype = (8192, torch.bfloat16) if dev == "cuda" else (256, torch.float32)
a = torch.randn(n, n, device=dev, dtype=dtype); b = torch.randn(n, n, device=dev, dtype=dtype)
for _ in range(3): a @ b
if dev == "cuda": torch.cuda.synchronize()
reps = 20 if dev == "cuda" else 3
t = time.perf_counter()
for _ in range(reps): a @ b
if dev == "cuda": torch.cuda.synchronize()
out["gemm_tflops"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
out["gemm_dtype"] = str(dtype).removeprefix("torch.")
print("RESULT " + json.dumps(out))
"""

SYNC_SNIPPET = r"""
import json, torch
from torch.utils._python_dispatch import TorchDispatchMode
from sae_vision.core import SAEConfig, TrainConfig
from sae_vision.sae import MemoryBatches, make_optimizer, make_sae, train_loop
SYNCS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}
class Count(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in SYNCS: Count.n += 1
        return func(*args, **(kwargs or {}))
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.relu(torch.randn(8192, 480, device=dev))
cfg = SAEConfig(arch="topk", expansion=8, k=32)
sae = make_sae(cfg, 480, input_scale=1.0, mean=x.mean(0)).to(dev)
tcfg = TrainConfig(n_steps=6, batch_size=1024, device=dev, log_every=1000, warmup_steps=1)
opt = make_optimizer(sae, tcfg.lr)
train_loop(sae, MemoryBatches(x, tcfg.batch_size, seed=0), tcfg, cfg, log=lambda m, s: None, optimizer=opt)
tcfg = TrainConfig(n_steps=4, batch_size=1024, device=dev, log_every=1000, warmup_steps=1)
with Count():
    train_loop(sae, MemoryBatches(x, tcfg.batch_size, seed=1), tcfg, cfg, log=lambda m, s: None,
               optimizer=opt)
print("RESULT " + json.dumps({"host_syncs_per_step": Count.n / tcfg.n_steps}))
"""


def unpack_wheels(wheels: Path, site: Path) -> list[str]:
    """Unpack pure-Python wheels into `site` (no pip, no network); returns their file names."""
    names = []
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        names.append(whl.name)
    return names


class Check:
    """Runs the steps as subprocesses and writes the results after each one."""

    def __init__(self, out: Path, bundle: Path, smoke: bool):
        self.out, self.bundle, self.smoke = out, bundle, smoke
        self.t0 = time.monotonic()
        self.results: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "smoke": smoke, "steps": {}}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.device = "cpu" if smoke else "cuda"

    # -- environment ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """Wheels from the bundle on the path (when the packages are missing), weights, W&B off."""
        path = [str(REPO)]
        if (self.bundle / "wheels").is_dir():
            site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
            self.results["wheels"] = unpack_wheels(self.bundle / "wheels", site)
            path.append(str(site))
        self.env["PYTHONPATH"] = os.pathsep.join(
            [*path, *filter(None, [os.environ.get("PYTHONPATH")])])
        if (self.bundle / "weights" / "bvlc_googlenet.npz").is_file():
            self.env["SAE_VISION_WEIGHTS_DIR"] = str((self.bundle / "weights").resolve())
        self.env["WANDB_MODE"] = "disabled"

    def left_s(self) -> float:
        return BUDGET_S - (time.monotonic() - self.t0)

    def sh(self, args: list[str], timeout: float) -> tuple[int, str, float]:
        """Run one command; (exit code, last 3,000 characters of its output, seconds)."""
        t = time.monotonic()
        try:
            p = subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True,
                               timeout=max(timeout, 1))
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc = 124
            text = ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            text += f"\n[timed out after {timeout:.0f} s]"
        return rc, text[-3000:], time.monotonic() - t

    def py(self, code: str, timeout: float) -> tuple[int, str, float, dict]:
        rc, text, s = self.sh([sys.executable, "-c", code], timeout)
        m = re.search(r"^RESULT (.*)$", text, re.M)
        return rc, text, s, (json.loads(m.group(1)) if m else {})

    def run_py(self, overrides: list[str], timeout: float) -> tuple[int, str, float]:
        return self.sh([sys.executable, "run.py", *overrides], timeout)

    # -- steps ---------------------------------------------------------------------------------
    def step_env(self, timeout: float) -> dict:
        rc, text, s, res = self.py(ENV_SNIPPET, timeout)
        self.results["peak_gemm_tflops"] = res.get("gemm_tflops")
        ok = rc == 0 and (self.smoke or (res.get("cuda_available") and res.get("bf16_supported")))
        return {"ok": bool(ok), "rc": rc, "wall_s": s, "figures": res, "tail": text}

    def step_gpu_tests(self, timeout: float) -> dict:
        rc, text, s = self.sh([sys.executable, "-m", "pytest", "-m", "gpu", "-q",
                               "-p", "no:cacheprovider", "tests/sae/test_kernels.py"], timeout)
        counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                          text))
        ok = rc == 0 and (self.smoke or counts.get("passed", 0) > 0)
        return {"ok": ok, "rc": rc, "wall_s": s, "figures": counts, "tail": text}

    def study_args(self) -> list[str]:
        root = self.out / "study"
        if self.smoke:
            return ["experiment=demo", "debug=tiny", "logger=disabled", f"paths.root={root}",
                    "model.device=cpu", "train.device=cpu"]
        return ["experiment=imagenet_sample", f"data.root={(self.bundle / 'photos').resolve()}",
                "logger=disabled", f"paths.root={root}", "model.device=cuda",
                "train.device=cuda", "sae=topk", "sae.expansion=8"]

    def step_study(self, timeout: float) -> dict:
        base, walls, t_end = self.study_args(), {}, time.monotonic() + timeout
        for stage in ("cache", "train", "evaluate"):
            extra = ["sae.run=glob(*)"] if stage == "evaluate" else []
            rc, text, s = self.run_py([*base, f"stage={stage}", *extra], t_end - time.monotonic())
            walls[stage] = round(s, 1)
            if rc != 0:
                return {"ok": False, "rc": rc, "wall_s": sum(walls.values()),
                        "figures": {"stage_s": walls, "failed_stage": stage}, "tail": text}
        figures: dict = {"stage_s": walls}
        for path in sorted((self.out / "study").rglob("metrics.json")):
            m = json.loads(path.read_text())
            rec = m.get("reconstruction", {})
            figures.update({k: rec.get(k) for k in ("fvu", "l0") if k in rec})
            figures["dead_frac"] = m.get("features", {}).get("dead_frac")
            break
        return {"ok": True, "rc": 0, "wall_s": sum(walls.values()), "figures": figures,
                "tail": text}

    def bench(self, parts: str, extra: list[str], timeout: float) -> tuple[int, str, float, dict]:
        out = self.out / f"bench-{parts}-{'-'.join(extra).replace('--', '')}"
        args = [sys.executable, "-m", "benchmarks.run", f"--parts={parts}", f"--out={out}",
                *(["--quick"] if self.smoke else ["--gpu"]), *extra]
        rc, text, s = self.sh(args, timeout)
        ratios: dict = {}
        path = out / "results.json"
        if path.exists():
            runs = json.loads(path.read_text()).get("runs", {})
            for run in runs.values():
                ratios = {k: v for k, v in run.get("ratios", {}).items()
                          if isinstance(v, (int, float))}
                ratios.update({k: v for k, v in run.get("train", {}).items()
                               if isinstance(v, (int, float))})
        return rc, text, s, ratios

    def step_bench_train(self, timeout: float) -> dict:
        figures, ok, tail, wall = {}, True, "", 0.0
        variants = BENCH_VARIANTS[:1] if self.smoke else BENCH_VARIANTS
        for expansion, dtype in variants:
            budget = min(timeout - wall, timeout / len(variants) + 20)
            rc, text, s, ratios = self.bench(
                "train", [f"--expansion={expansion}", f"--dtype={dtype}"], budget)
            wall += s
            if "peer library is missing" in text:  # the bench extra (overcomplete) is absent
                return {"ok": None, "skipped": "overcomplete is not installed", "rc": rc,
                        "wall_s": wall, "figures": {}, "tail": text}
            figures[f"F{480 * expansion}_{dtype}"] = ratios | {"rc": rc}
            ok &= rc == 0
            tail = text
        return {"ok": ok, "rc": rc, "wall_s": wall, "figures": figures, "tail": tail}

    def step_syncs(self, timeout: float) -> dict:
        rc, text, s, res = self.py(SYNC_SNIPPET, timeout)
        return {"ok": rc == 0, "rc": rc, "wall_s": s, "figures": res, "tail": text}

    def step_caching(self, timeout: float) -> dict:
        rc, text, s, ratios = self.bench("caching", [], timeout)
        return {"ok": rc == 0, "rc": rc, "wall_s": s,
                "figures": {k: v for k, v in ratios.items() if "cach" in k}, "tail": text}

    def step_compile(self, timeout: float) -> dict:
        rc, text, s = self.run_py([*self.study_args(), "stage=train", "train.compile=true",
                                   "train.n_steps=60", "sae.expansion=4"], timeout)
        return {"ok": rc == 0, "rc": rc, "wall_s": s, "figures": {}, "tail": text}

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> dict:
        self.prepare()
        timeouts = SMOKE_TIMEOUTS if self.smoke else TIMEOUTS
        for name, timeout in timeouts.items():
            left = timeout if self.smoke else min(timeout, self.left_s())
            if left < 15:
                self.results["steps"][name] = {"ok": None, "skipped": "no time left"}
                continue
            print(f"gpu-check: {name} (timeout {left:.0f} s)", file=sys.stderr, flush=True)
            try:
                res = getattr(self, f"step_{name}")(left)
            except Exception as e:  # a broken step must not stop the others
                res = {"ok": False, "rc": None, "wall_s": 0.0, "figures": {}, "tail": repr(e)}
            res["wall_s"] = round(res.get("wall_s", 0.0), 1)
            self.results["steps"][name] = res
            state = {True: "ok", False: "FAILED", None: f"skipped ({res.get('skipped')})"}
            print(f"gpu-check: {name} {state[res['ok']]} in {res['wall_s']} s", file=sys.stderr,
                  flush=True)
            self.write()
        self.results["total_s"] = round(time.monotonic() - self.t0, 1)
        self.write()
        return self.results

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(markdown(self.results))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items() if x is not None)
    return str(v)


def markdown(results: dict) -> str:
    """The results as a Markdown table: one row per step."""
    env = results["steps"].get("env", {}).get("figures", {})
    head = (f"GPU check, {results['date']}, {env.get('device_name', 'no GPU')} "
            f"(torch {env.get('torch', '?')}, CUDA {env.get('cuda_build', '?')}, driver "
            f"{env.get('driver', '?')}){' — SMOKE (CPU, toy sizes)' if results['smoke'] else ''}")
    rows = ["| step | result | seconds | figures |", "| --- | --- | --- | --- |"]
    for name, r in results["steps"].items():
        state = (f"skipped: {r.get('skipped')}" if r.get("ok") is None
                 else "ok" if r["ok"] else f"FAILED (rc {r.get('rc')})")
        rows.append(f"| {name} | {state} | {r.get('wall_s', '')} | {_fmt(r.get('figures', {}))} |")
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "artifacts" / "gpu-check"))
    p.add_argument("--bundle", default=str(REPO / "gpu-bundle"))
    args = p.parse_args(argv)
    smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
    results = Check(Path(args.out), Path(args.bundle), smoke).run()
    print(markdown(results))
    return 0 if all(r.get("ok") is not False for r in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
