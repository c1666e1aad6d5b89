"""Training-step throughput of the sparse TopK SAE kernels against a dense autograd reference.

Usage: python -m benchmarks.kernels_check [--arch topk] [--batch 4096] [--bf16] [--dead-frac 0.5]
Both variants run the same math (see sae_vision.sae.forward_reference) from the same init, in
alternating rounds within one process, so the numbers are comparable on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_vision.core.config import SAEConfig
from sae_vision.sae.architectures import forward_reference, make_sae


def synthetic_batches(n_batches: int, batch: int, d_in: int, seed: int = 0) -> list[torch.Tensor]:
    """Sparse non-negative mixtures of random directions, scaled so E||x|| = sqrt(d_in)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(8 * d_in, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    out = []
    for _ in range(n_batches):
        idx = torch.randint(0, dirs.shape[0], (batch, 24), generator=g)
        mags = torch.empty(batch, 24).exponential_(generator=g)
        x = torch.einsum("bk,bkd->bd", mags, dirs[idx]) + 0.05 * torch.randn(
            batch, d_in, generator=g
        )
        out.append(x)
    scale = d_in**0.5 / torch.cat(out).norm(dim=1).mean()
    return [x * scale for x in out]


def make_step(sae, opt, reference: bool, dead_mask, bf16: bool = False):
    """One full training step: forward, backward, Adam, decoder renormalisation."""

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward_reference(sae, x, dead_mask) if reference else sae(x, dead_mask=dead_mask)
        out.losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        return out.losses["mse"]

    return step


def main() -> None:
    """Parse arguments, run alternating timing rounds, print samples/s for each variant."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="topk", choices=["topk", "batchtopk"])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=480)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--dead-frac", type=float, default=0.0, help="fraction of features marked dead (AuxK)"
    )
    ap.add_argument("--no-fused", action="store_true", help="foreach Adam instead of fused")
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="also time the sparse step under CPU bf16 autocast (bf16 encoder GEMM)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SAEConfig(arch=args.arch, expansion=args.expansion, k=args.k)
    batches = synthetic_batches(4, args.batch, args.d_in)
    dead = None
    if args.dead_frac > 0:
        n_feat = args.expansion * args.d_in
        dead = torch.zeros(n_feat, dtype=torch.bool)
        dead[: int(args.dead_frac * n_feat)] = True

    variants = {}
    for name in ("sparse", "dense") + (("sparse-bf16",) if args.bf16 else ()):
        torch.manual_seed(0)
        sae = make_sae(cfg, args.d_in, mean=torch.cat(batches).mean(0)).train()
        opt = torch.optim.Adam(
            sae.parameters(), lr=4e-4, fused=not args.no_fused, foreach=args.no_fused or None
        )
        variants[name] = make_step(sae, opt, name == "dense", dead, bf16=name.endswith("bf16"))

    # Same init and data: the two variants must follow the same loss curve.
    curves = {
        name: [float(step(batches[i % 4])) for i in range(6)] for name, step in variants.items()
    }
    for name, curve in curves.items():
        print(f"mse per step ({name}):".ljust(26), " ".join(f"{v:.4f}" for v in curve))

    # Wall time is what counts; process CPU time / threads is printed too because it is less
    # sensitive to other jobs on a shared machine.
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            for i in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                step(batches[i % 4])
                times[name].append(time.perf_counter() - t0)
                cpu[name].append((time.process_time() - c0) / args.threads)
    print(
        f"arch={args.arch} D={args.d_in} F={args.expansion * args.d_in} k={args.k} "
        f"batch={args.batch} threads={args.threads} dead_frac={args.dead_frac} "
        f"adam={'foreach' if args.no_fused else 'fused'}"
    )
    res = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = args.batch / med
        print(
            f"  {name:11s} median step {med * 1e3:7.1f} ms  -> {res[name]:7.0f} samples/s "
            f"(p10 {args.batch / sorted(ts)[len(ts) // 10]:.0f}, best {args.batch / min(ts):.0f}; "
            "by CPU time/threads "
            f"{args.batch / statistics.median(cpu[name]):.0f})"
        )
    print(f"  speed-up sparse/dense {res['sparse'] / res['dense']:.2f}x")


if __name__ == "__main__":
    main()
