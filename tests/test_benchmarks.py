"""The benchmark harness runs end to end at toy sizes and reports every ratio (not timings)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is a top-level package of the checkout, not part of the installed sae_vision.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# A plain importorskip would import overcomplete 0.3.0, which fails under matplotlib >= 3.9
# unless benchmarks.training.import_overcomplete patches matplotlib first.
needs_peer = pytest.mark.skipif(importlib.util.find_spec("overcomplete") is None,
                                reason="the bench extra: pip install -e '.[bench]'")


def test_fvu_at_l0_interpolates_in_log_l0():
    from benchmarks.training import fvu_at_l0

    runs = [{"l0": 10.0, "fvu": 0.4}, {"l0": 40.0, "fvu": 0.2}]
    assert fvu_at_l0(runs, 20.0) == pytest.approx(0.3)  # log-midpoint of 10 and 40
    assert fvu_at_l0(runs, 10.0) == pytest.approx(0.4)
    assert fvu_at_l0(runs[:1], 20.0) is None
    # Outside the bracket a line in log L0 can fall below 0 (it did: a ratio of -6.4); the
    # caller then uses the nearest run instead.
    assert fvu_at_l0(runs, 400.0) is None and fvu_at_l0(runs, 2.0) is None


def test_step_clock_times_each_step_after_warmup():
    from benchmarks.common import StepClock

    clock = StepClock(iter(range(5)), warmup=1)
    assert [next(clock) for _ in range(5)] == list(range(5))
    clock.finish()
    assert len(clock.step_times()) == 4  # five steps, the first is warm-up
    assert clock.rate(batch_size=8)["samples_per_s"] > 0


def test_lockstep_parties_take_turns_one_step_each():
    from benchmarks.common import StepClock, run_parties

    order: list[str] = []
    lock = threading.Lock()

    def party(name: str, n_steps: int):
        def run(clock_kw: dict):
            clock = StepClock(range(n_steps), warmup=0, **clock_kw)
            try:
                for step in clock:
                    with lock:
                        order.append(f"{name}{step}")
            finally:
                clock.finish()
            return clock.step_times()
        return run

    times = run_parties({"a": party("a", 3), "b": party("b", 2)}, lockstep=True)
    assert order == ["a0", "b0", "a1", "b1", "a2"]  # b finished early; a runs on alone
    assert len(times["a"]) == 3 and len(times["b"]) == 2


def _synthetic_cache(cache_dir: Path, n_vectors: int = 3072, dim: int = 64) -> Path:
    from sae_vision.activations.shards import write_cache

    gen = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(n_vectors, dim, generator=gen))

    def chunks():
        for i, part in enumerate(acts.split(512)):
            pos = np.zeros((len(part), 3), np.int32)
            pos[:, 0] = i
            yield part, pos, {i: f"synthetic-{i}"}

    write_cache(cache_dir, chunks(), {"layer": "conv2d0", "dim": dim, "dtype": "float16",
                                      "model": "googlenet_bvlc", "key": "synthetic"})
    return cache_dir


def test_shard_check_cost_is_measured_against_reading_and_training_an_epoch(tmp_path):
    from benchmarks.loader import verify_cost

    cache = _synthetic_cache(tmp_path / "cache")
    names = sorted(p.name for p in cache.glob("shard-*.tar"))
    v = verify_cost(cache, names, trainer_samples_per_s=1e5)
    assert v["shards"] == len(names) and v["vectors"] > 0
    assert v["verify_s"] > 0 and v["read_epoch_s"] > 0
    assert v["verify_vs_train_epoch"] == pytest.approx(v["verify_s"] / (v["vectors"] / 1e5))


@needs_peer
def test_bench_on_a_given_cache_reports_training_and_loader_ratios(tmp_path, capsys):
    from benchmarks.run import main

    cache = _synthetic_cache(tmp_path / "cache")
    out = tmp_path / "bench"
    assert main(["--quick", "--parts", "train,loader,scaling", "--train-cache", str(cache),
                 "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())["runs"]["cpu"]
    want = {"topk_vs_peer_throughput", "topk_fvu_peer_over_ours", "relu_l1_vs_peer_throughput",
            "relu_l1_fvu_peer_over_ours", "topk_vs_roofline", "topk_vs_encoder_bound",
            "relu_l1_vs_roofline", "relu_l1_trained_vs_peer_throughput",
            "loader_stream_headroom", "loader_memory_headroom",
            "verify_vs_read_epoch", "verify_vs_train_epoch"}
    assert want <= set(run["ratios"]), want - set(run["ratios"])
    assert all(math.isfinite(v) and v > 0 for v in run["ratios"].values()), run["ratios"]
    assert run["train"]["topk"]["peer"]["l0"] == pytest.approx(8.0, abs=0.5)  # k=8 in quick
    assert (out / "scaling-cpu.png").stat().st_size > 0
    assert "overcomplete 0.3.0" in capsys.readouterr().out


def test_planted_part_prints_a_row_per_arch_with_recovery_scores(tmp_path, capsys):
    from benchmarks.run import main

    out = tmp_path / "bench"
    assert main(["--quick", "--parts", "planted", "--out", str(out)]) == 0
    run = json.loads((out / "results.json").read_text())["runs"]["cpu"]
    rows = run["planted"]["rows"]
    assert [r["arch"] for r in rows[:4]] == ["topk", "batchtopk", "relu_l1", "jumprelu"]
    for r in rows:
        assert 0 < r["mmcs"] <= 1 and 0 <= r["recovered_frac"] <= 1 and r["samples_per_s"] > 0
        assert r["n_steps"] * r["batch_size"] == run["planted"]["samples_seen"]  # equal samples
    assert "planted_relu_l1_mmcs_within" in run["ratios"]
    # More than one planted seed: each party's row is the mean over the seeds, with its range.
    per_seed = run["planted"]["per_seed"]
    assert run["planted"]["seeds"] == [0, 1] and [p["spec"]["seed"] for p in per_seed] == [0, 1]
    assert per_seed[0]["rows"][0]["mmcs"] != per_seed[1]["rows"][0]["mmcs"]  # two dictionaries
    for i, r in enumerate(rows):
        vals = [p["rows"][i]["mmcs"] for p in per_seed]
        assert r["mmcs"] == pytest.approx(sum(vals) / 2)
        assert (r["mmcs_min"], r["mmcs_max"]) == (min(vals), max(vals))
    text = capsys.readouterr().out
    assert "Planted dictionary:" in text and "| sae-vision | jumprelu |" in text
    assert "mean over 2 planted seed(s) [0, 1]" in text


def test_the_peer_trains_under_our_learning_rate_schedule():
    from benchmarks.planted import ScheduledAdam
    from sae_vision.sae.loop import lr_factor

    w = torch.nn.Parameter(torch.ones(3))
    opt = ScheduledAdam([w], lr=4e-3, n_steps=10, warmup_steps=3, decay_frac=0.2)
    seen = []
    for _ in range(10):
        w.grad = torch.ones(3)
        opt.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == [4e-3 * lr_factor(s, 10, 3, 0.2) for s in range(10)]
    assert seen[0] < seen[5] and seen[-1] < seen[5]  # warm-up and decay, not a constant rate


def test_the_peer_is_clipped_on_our_scale():
    from benchmarks.training import GRAD_CLIP, peer_grad_clip

    # Our loss sums over D coordinates, the peer's averages them: the same data gives the
    # peer 1/D of our gradient, so the same clip is 1/D of ours.
    d_in, x = 480, torch.randn(64, 480)
    w = torch.nn.Parameter(torch.randn(480, 480) / 30)
    ours = (x @ w - x).pow(2).sum(1).mean()
    g_ours = torch.autograd.grad(ours, w)[0].norm()
    peer = (x @ w - x).square().mean()
    g_peer = torch.autograd.grad(peer, w)[0].norm()
    assert float(g_peer / peer_grad_clip(d_in)) == pytest.approx(float(g_ours / GRAD_CLIP),
                                                                 rel=1e-5)


def test_the_topk_goal_is_on_its_encoder_bound_not_the_dense_roofline():
    from benchmarks.run import GOALS

    assert GOALS["topk_vs_encoder_bound"][1] == "ge" and GOALS["topk_vs_roofline"][1] == "info"


@pytest.mark.slow
@needs_peer
def test_quick_bench_writes_results_with_every_ratio(tmp_path, weights_dir):
    from benchmarks.run import RATIO_KEYS

    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    run = results["runs"]["cpu"]
    assert set(RATIO_KEYS) <= set(run["ratios"]), set(RATIO_KEYS) - set(run["ratios"])
    assert all(math.isfinite(v) and v > 0 for v in run["ratios"].values()), run["ratios"]
    assert set(run["goals"]) == set(run["ratios"])
    assert run["machine"]["peer"] == "0.3.0"
    assert (out / "scaling-cpu.png").stat().st_size > 0
    assert "| 2a | TopK" in proc.stdout and "overcomplete 0.3.0" in proc.stdout


def test_the_peer_trains_with_overcompletes_amp_loop_on_cuda(tmp_path, monkeypatch):
    from benchmarks.training import peer_train_loop

    fake = importlib.util.find_spec("overcomplete") is None
    if fake:  # overcomplete 0.3.0's layout: train_sae_amp is not re-exported by overcomplete.sae
        pkg = tmp_path / "overcomplete" / "sae"
        pkg.mkdir(parents=True)
        (pkg.parent / "__init__.py").write_text("")
        (pkg / "__init__.py").write_text("from .train import train_sae\n")
        (pkg / "train.py").write_text("def train_sae():\n    pass\n\n\n"
                                      "def train_sae_amp():\n    pass\n")
        monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert peer_train_loop("cuda").__name__ == "train_sae_amp"
        assert peer_train_loop("cuda:0").__name__ == "train_sae_amp"
        assert peer_train_loop("cpu").__name__ == "train_sae"
    finally:
        if fake:
            for name in [m for m in sys.modules if m.split(".")[0] == "overcomplete"]:
                del sys.modules[name]


@pytest.mark.parametrize("device,synced", [("cuda", True), ("cuda:1", True), ("cpu", False)])
def test_step_clock_synchronises_at_every_step_on_cuda_only(monkeypatch, device, synced):
    import torch

    from benchmarks.common import StepClock

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    clock = StepClock(iter(range(5)), warmup=1, device=device)
    for _ in range(5):
        next(clock)
        n_before = len(calls)
    clock.finish()
    # Each of the five step boundaries and the close wait for the GPU: six synchronises.
    assert len(calls) == (6 if synced else 0) and n_before == (5 if synced else 0)
