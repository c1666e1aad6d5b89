"""Benchmarks 2, 3 and 6: our trainer against overcomplete, against the GEMM roofline, and
its throughput as the dictionary and the batch grow.

Both trainers see the same cached mixed3b vectors, scaled so E||x|| = sqrt(D), the same
dictionary size, batch, number of steps, Adam learning rate and gradient clipping on the same
scale (see peer_grad_clip). Step times are taken by the same StepClock around each trainer's
batch iterator.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import StepClock, run_parties

# Adam learning rate for both trainers; constant (no warm-up or decay) because the peer's
# train_sae has no schedule unless one is passed, and a short benchmark run should not spend
# its steps warming up.
LR = 4e-4
GRAD_CLIP = 1.0  # our train.grad_clip default, on our per-sample-sum loss


def peer_grad_clip(d_in: int) -> float:
    """The peer's clip_grad equivalent to our GRAD_CLIP: the same threshold on the same scale.

    Our loss sums the squared error over the D coordinates of a sample (and λ weights a
    per-sample L1); the peer's is a per-element mean (and mse_l1's penalty is λ / (batch x D)),
    so on the same data its loss, hence its gradient, is ours / D. Clipping ours at GRAD_CLIP
    is clipping the peer at GRAD_CLIP / D. (At train_sae's default of 1.0 the peer was never
    clipped: its pre-clip norms were 0.05-1.5 while ours were 27-36 for TopK and 950-1,900 for
    ReLU-L1, always clipped.)"""
    return GRAD_CLIP / d_in


@dataclass
class TrainData:
    """Cached vectors in raw units, split by shard, with the scale that makes E||x|| = sqrt(D)."""

    train_ND: torch.Tensor
    holdout_ND: torch.Tensor
    input_scale: float
    mean_D: torch.Tensor
    load_s: float
    layer: str = "mixed3b"

    @property
    def d_in(self) -> int:
        """Activation dimension."""
        return int(self.train_ND.shape[1])


def load_train_data(cache_dir: Path, meta: dict, holdout_frac: float = 0.1) -> TrainData:
    """The training and held-out shards in memory (the trainer's own split rule)."""
    import time

    from sae_vision.activations.shards import load_vectors, split_shards

    train_shards, holdout_shards = split_shards(meta, holdout_frac)
    t0 = time.perf_counter()
    train_ND = load_vectors(cache_dir, train_shards)
    load_s = time.perf_counter() - t0
    holdout_ND = load_vectors(cache_dir, holdout_shards)
    d_in = int(meta["dim"])
    return TrainData(train_ND, holdout_ND, math.sqrt(d_in) / float(meta["mean_norm"]),
                     torch.tensor(meta["mean"], dtype=torch.float32), load_s,
                     str(meta.get("layer", "?")))


# --------------------------------------------------------------------------------------------
# Held-out reconstruction quality, computed the same way for both libraries


@torch.no_grad()
def heldout_fvu(reconstruct, holdout_ND: torch.Tensor, device: str, chunk: int = 8192) -> dict:
    """FVU against the held-out mean and mean L0; reconstruct(x_raw) -> (x_hat_raw, n_active)."""
    mean_D = holdout_ND.double().mean(0)
    sq_err = total = 0.0
    n_active = 0.0
    for x in holdout_ND.split(chunk):
        x_dev = x.to(device)
        x_hat, active = reconstruct(x_dev)
        xd = x.double()
        sq_err += float((xd - x_hat.double().cpu()).pow(2).sum())
        total += float((xd - mean_D).pow(2).sum())
        n_active += float(active)
    return {"fvu": sq_err / max(total, 1e-30), "l0": n_active / len(holdout_ND)}


def _ours_reconstruct(sae):
    def fn(x):
        out = sae(x)
        return out.x_hat.float(), out.l0 * len(x)
    return fn


def _peer_reconstruct(model, scale: float, mean_D: torch.Tensor):
    def fn(x):
        mean = mean_D.to(x.device)
        _, z, x_hat = model((x - mean) * scale)
        return x_hat.float() / scale + mean, (z > 0).sum()
    return fn


# --------------------------------------------------------------------------------------------
# Our trainer


def our_config(arch: str, n_features: int, k: int, l1_coeff: float, batch_size: int,
               n_steps: int, device: str):
    """SAE and train configs for a benchmark run (constant LR, no sparsity warm-up)."""
    from sae_vision.core.config import SAEConfig, TrainConfig

    sae_cfg = SAEConfig(arch=arch, n_features=n_features, k=k, l1_coeff=l1_coeff,
                        l1_warmup_frac=0.0)
    train_cfg = TrainConfig(n_steps=n_steps, batch_size=batch_size, lr=LR, warmup_steps=0,
                            decay_frac=0.0, grad_clip=GRAD_CLIP, seed=0, device=device,
                            autocast=True, log_every=n_steps, ckpt_every=n_steps)
    return sae_cfg, train_cfg


@dataclass
class Trained:
    """A finished benchmark run: its step rate, and a held-out evaluation to run afterwards
    (never while another party's steps are being timed)."""

    info: dict
    evaluate: Callable[[], dict]
    state: dict | None = None  # our SAE's state_dict after the run (ours_party only)

    def result(self, evaluate: bool = True) -> dict:
        """The info dict, with FVU and L0 on held-out vectors when `evaluate`."""
        return {**self.info, **(self.evaluate() if evaluate else {})}


def ours_party(data: TrainData, arch: str, n_features: int, batch_size: int, n_steps: int,
               device: str, k: int = 32, l1_coeff: float = 5.0, warmup: int = 1,
               progress: bool = True, state: dict | None = None):
    """A party running sae_vision.sae.train_loop with its in-memory loader.

    With `progress` the loop reports every step to the train stage's progress display, as the
    stage does (the off-terminal path: a clock read per step; its log line goes nowhere here).
    `state`: an SAE state_dict to continue from (a dictionary already trained), else a fresh
    initialisation.
    """
    from sae_vision.activations import pick_device
    from sae_vision.core.progress import Progress
    from sae_vision.sae.architectures import make_sae
    from sae_vision.sae.loader import MemoryBatches
    from sae_vision.sae.loop import make_optimizer, train_loop
    from sae_vision.sae.train import LIVE_METRICS

    def run(clock_kw: dict) -> Trained:
        sae_cfg, train_cfg = our_config(arch, n_features, k, l1_coeff, batch_size, n_steps,
                                        device)
        torch.manual_seed(0)
        sae = make_sae(sae_cfg, data.d_in, input_scale=data.input_scale,
                       mean=data.mean_D).to(device)
        if state is not None:
            sae.load_state_dict(state)
        batches = MemoryBatches(data.train_ND, batch_size, seed=0, device=pick_device(device))
        clock = StepClock(batches, warmup=warmup, device=device, **clock_kw)
        bar = Progress("bench train", n_steps, "step", terminal=False) if progress else None

        def log(metrics: dict, step: int) -> None:
            if bar is not None:
                bar.set({show: metrics[k] for k, show in LIVE_METRICS.items() if k in metrics})
        try:
            train_loop(sae, clock, train_cfg, sae_cfg, log=log,
                       optimizer=make_optimizer(sae, train_cfg.lr),
                       on_step=(lambda _: bar.update()) if bar is not None else None)
        finally:
            clock.finish()
            if bar is not None:
                bar.close()
        info = {"library": "sae-vision", "arch": arch, "n_features": n_features,
                "batch_size": batch_size, "n_steps": n_steps, **clock.rate(batch_size)}

        def evaluate() -> dict:
            sae.eval()
            return heldout_fvu(_ours_reconstruct(sae), data.holdout_ND, device)
        return Trained(info, evaluate, state=sae.state_dict())
    return run


def train_ours(data: TrainData, arch: str, n_features: int, batch_size: int, n_steps: int,
               device: str, k: int = 32, l1_coeff: float = 5.0, warmup: int = 1,
               evaluate: bool = True) -> dict:
    """One run of our trainer on its own: step rate, then held-out FVU/L0."""
    run = ours_party(data, arch, n_features, batch_size, n_steps, device, k, l1_coeff, warmup)
    return run({}).result(evaluate)


# --------------------------------------------------------------------------------------------
# The peer: overcomplete (a bench-only extra)


def import_overcomplete():
    """overcomplete.sae, importable under matplotlib >= 3.9 (0.3.0 calls plt.cm.get_cmap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        # Removed in matplotlib 3.9; overcomplete 0.3.0's visualisation module uses it at import.
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    try:
        import overcomplete.sae
    except ImportError as e:  # a bare GPU machine: no OpenCV or scikit-learn
        return _overcomplete_sae_core(e)
    return overcomplete.sae


def _overcomplete_sae_core(why: ImportError):
    """The SAE classes, loss and training loops of overcomplete, without its package __init__,
    which imports its visualisation (OpenCV) and optimisation (scikit-learn) modules: neither is
    on a bare GPU machine (`make gpu-check`), and the training code needs neither."""
    import importlib
    import importlib.machinery
    import importlib.util
    import types

    spec = importlib.util.find_spec("overcomplete")
    if spec is None or not spec.submodule_search_locations:
        raise why
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, folder in (("overcomplete", root), ("overcomplete.sae", root / "sae")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(folder)]
        # a spec, so that importlib.util.find_spec still answers once the stub is in sys.modules
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        stub.__spec__.submodule_search_locations = [str(folder)]
        sys.modules[name] = stub
    sae = sys.modules["overcomplete.sae"]
    sys.modules["overcomplete"].sae = sae  # so a second `import overcomplete.sae` finds it
    sae.SAE = importlib.import_module("overcomplete.sae.base").SAE
    sae.TopKSAE = importlib.import_module("overcomplete.sae.topk_sae").TopKSAE
    sae.mse_l1 = importlib.import_module("overcomplete.sae.losses").mse_l1
    train = importlib.import_module("overcomplete.sae.train")
    sae.train, sae.train_sae, sae.train_sae_amp = train, train.train_sae, train.train_sae_amp
    return sae


def peer_train_loop(device: str):
    """overcomplete's training loop for `device`: its mixed-precision train_sae_amp on CUDA.

    0.3.0 exports only train_sae from overcomplete.sae; train_sae_amp lives in its `train` module.
    """
    import_overcomplete()
    from overcomplete.sae import train as oc_train

    return oc_train.train_sae_amp if torch.device(device).type == "cuda" else oc_train.train_sae


def peer_party(data: TrainData, arch: str, n_features: int, batch_size: int, n_steps: int,
               device: str, k: int = 32, l1_coeff: float = 5.0, warmup: int = 1):
    """A party running overcomplete's TopKSAE (or SAE + mse_l1) with train_sae, as its docs say.

    - inputs centred (the training mean subtracted) and pre-scaled by the same factor as ours:
      it has no decoder bias, so uncentred post-ReLU vectors would make its latents rebuild the
      data mean (its held-out FVU was 0.89 that way, against 0.58 for ours);
    - a shuffled DataLoader over a TensorDataset, drawn in whole batches (a BatchSampler over
      a RandomSampler: one tensor index per batch instead of 4096 per-row fetches and a
      collate, which only helps the peer), exactly n_steps batches in one pass;
    - monitoring=0 (its default of 1 computes metrics every step);
    - clip_grad = GRAD_CLIP / D (peer_grad_clip), our threshold on its loss's scale, rather than
      its default of 1.0, which on its per-element loss never clipped while ours always did;
    - mse_l1's penalty multiplies the batch *sum* of |z| while its MSE is a per-element mean,
      so penalty = lambda / (batch x D) gives the same objective as our per-sample lambda;
    - .eval() before evaluating (its dictionary is renormalised on every training-mode call);
    - on CUDA its own mixed-precision loop, train_sae_amp.
    It has no decoder bias: x_hat = z D (+ the mean we add back).
    """
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    oc = import_overcomplete()

    def run(clock_kw: dict) -> Trained:
        torch.manual_seed(0)
        d_in = data.d_in
        if arch == "topk":
            model = oc.TopKSAE(d_in, nb_concepts=n_features, top_k=k, device=device)

            def criterion(x, x_hat, pre_codes, codes, dictionary):
                return (x - x_hat).square().mean()  # the README's criterion
        elif arch == "relu_l1":
            model = oc.SAE(d_in, nb_concepts=n_features, device=device)
            criterion = partial(oc.mse_l1, penalty=l1_coeff / (batch_size * d_in))
        else:
            raise ValueError(f"no peer configuration for arch={arch!r}")
        x_scaled = ((data.train_ND - data.mean_D) * data.input_scale).to(device)
        gen = torch.Generator().manual_seed(0)
        sampler = BatchSampler(RandomSampler(range(len(x_scaled)),
                                             num_samples=n_steps * batch_size, generator=gen),
                               batch_size, drop_last=True)
        loader = DataLoader(TensorDataset(x_scaled), sampler=sampler, batch_size=None)
        clock = StepClock(loader, warmup=warmup, device=device, **clock_kw)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        loop = peer_train_loop(device)
        try:
            loop(model, clock, criterion, optimizer, nb_epochs=1, clip_grad=peer_grad_clip(d_in),
                 monitoring=0, device=device)
        finally:
            clock.finish()
        info = {"library": "overcomplete", "arch": arch, "n_features": n_features,
                "batch_size": batch_size, "n_steps": n_steps, "loop": loop.__name__,
                "clip_grad": peer_grad_clip(d_in),
                "l1_coeff": l1_coeff if arch == "relu_l1" else None, **clock.rate(batch_size)}

        def evaluate() -> dict:
            model.eval()
            return heldout_fvu(_peer_reconstruct(model, data.input_scale, data.mean_D),
                               data.holdout_ND, device)
        return Trained(info, evaluate)
    return run


def train_peer(data: TrainData, arch: str, n_features: int, batch_size: int, n_steps: int,
               device: str, k: int = 32, l1_coeff: float = 5.0, warmup: int = 1) -> dict:
    """One run of the peer on its own: step rate, then held-out FVU/L0."""
    return peer_party(data, arch, n_features, batch_size, n_steps, device, k, l1_coeff,
                      warmup)({}).result()


def gemm_party(kind: str, batch_size: int, d_in: int, n_features: int, k: int, n_steps: int,
               device: str, dtype: torch.dtype, warmup: int = 1):
    """A party doing, per step, the bare GEMMs of one training step (see gemm_ops)."""
    def run(clock_kw: dict) -> Trained:
        six, encoder = gemm_ops(batch_size, d_in, n_features, k, device, dtype)
        op = six if kind == "six_gemm" else encoder
        clock = StepClock(range(n_steps), warmup=warmup, device=device, **clock_kw)
        try:
            for _ in clock:
                op()
        finally:
            clock.finish()
        return Trained({"kind": kind, "batch_size": batch_size, "n_features": n_features,
                        **clock.rate(batch_size)}, dict)
    return run


def fvu_at_l0(points: list[dict], l0: float) -> float | None:
    """FVU at L0 by linear interpolation in log L0 between the two runs that bracket it (None if
    fewer than 2 runs or if they do not bracket l0: a straight line extrapolated in log L0 can
    run below 0, and the caller then falls back to the nearest run, flagged as unbracketed)."""
    pts = sorted((p["l0"], p["fvu"]) for p in points if p["l0"] > 0)
    if len(pts) < 2 or not pts[0][0] <= l0 <= pts[-1][0]:
        return None
    lo = max((p for p in pts if p[0] <= l0), key=lambda p: p[0])
    hi = min((p for p in pts if p[0] >= l0), key=lambda p: p[0])
    if hi[0] == lo[0]:
        return lo[1]
    t = (math.log(l0) - math.log(lo[0])) / (math.log(hi[0]) - math.log(lo[0]))
    return lo[1] + t * (hi[1] - lo[1])


def compare_with_peer(data: TrainData, n_features: int, batch_size: int, n_steps: int,
                      device: str, k: int, l1_coeff: float, calibrate: bool, lockstep: bool,
                      dtype: torch.dtype, progress) -> dict:
    """TopK and ReLU-L1: ours, the peer's and the bare GEMMs of a step, in alternating steps.

    The GEMM parties give the roofline (six GEMMs) and the encoder-only bound side by side
    with the trainers.
    """
    d_in = data.d_in

    def gemms(kind: str):
        return gemm_party(kind, batch_size, d_in, n_features, k, n_steps, device, dtype)

    out: dict = {}
    how = "in lockstep" if lockstep else "one after another"
    progress(f"train: TopK — ours, overcomplete, six GEMMs, encoder bound ({n_steps} steps "
             f"each, {how})")
    runs = run_parties({
        "ours": ours_party(data, "topk", n_features, batch_size, n_steps, device, k=k),
        "peer": peer_party(data, "topk", n_features, batch_size, n_steps, device, k=k),
        "six_gemm": gemms("six_gemm"),
        "encoder_topk": gemms("encoder_topk"),
        "square_gemm": square_gemm_party(2048 if batch_size >= 2048 else 256, n_steps, device,
                                         dtype),
    }, lockstep)
    ours, peer = runs["ours"].result(), runs["peer"].result()
    out["topk"] = {"ours": ours, "peer": peer,
                   "six_gemm": runs["six_gemm"].info, "encoder_topk": runs["encoder_topk"].info,
                   "square_gemm": runs["square_gemm"].info,
                   "throughput_ratio": ours["samples_per_s"] / peer["samples_per_s"],
                   "fvu_ratio_peer_over_ours": peer["fvu"] / ours["fvu"],
                   "l0_matched": abs(math.log(max(ours["l0"], 1e-9) / max(peer["l0"], 1e-9)))
                   < math.log(1.05)}

    progress(f"train: ReLU-L1 — ours, overcomplete SAE + mse_l1, six GEMMs ({n_steps} steps "
             f"each, {how})")
    runs = run_parties({
        "ours": ours_party(data, "relu_l1", n_features, batch_size, n_steps, device,
                           l1_coeff=l1_coeff),
        "peer": peer_party(data, "relu_l1", n_features, batch_size, n_steps, device,
                           l1_coeff=l1_coeff),
        "six_gemm": gemms("six_gemm"),
    }, lockstep)
    ours = runs["ours"].result()
    peers = [runs["peer"].result()]
    off = math.log(max(peers[0]["l0"], 1e-9) / max(ours["l0"], 1e-9))
    if calibrate and abs(off) > math.log(1.15) and peers[0]["l0"] > 0 and ours["l0"] > 0:
        # Same lambda, different L0: a second peer run at a lambda moved past our L0 so the FVU
        # can be read there. L0 falls roughly as lambda^-0.8 in short runs; stepping as if it
        # fell as lambda^-0.75 overshoots a little, which brackets our L0.
        lam2 = l1_coeff * (peers[0]["l0"] / ours["l0"]) ** (1 / 0.75)
        progress(f"train: overcomplete SAE + mse_l1 at lambda={lam2:.3g} (FVU at our L0)")
        peers.append(train_peer(data, "relu_l1", n_features, batch_size, n_steps, device,
                                l1_coeff=lam2))
    nearest = min(peers, key=lambda p: abs(math.log(max(p["l0"], 1e-9) / max(ours["l0"], 1e-9))))
    at_l0 = fvu_at_l0(peers, ours["l0"]) if len(peers) > 1 else None
    peer_fvu = at_l0 if at_l0 is not None else nearest["fvu"]
    # Throughput from the lockstep pair only: the calibration run was timed on its own.
    l0s = [p["l0"] for p in peers]
    out["relu_l1"] = {"ours": ours, "peer_runs": peers, "l1_coeff": l1_coeff,
                      "peer_l0_brackets_ours": min(l0s) <= ours["l0"] <= max(l0s),
                      "six_gemm": runs["six_gemm"].info,
                      "peer_samples_per_s": peers[0]["samples_per_s"],
                      "peer_fvu_at_our_l0": at_l0,
                      "peer_fvu_used": peer_fvu,
                      "throughput_ratio": ours["samples_per_s"] / peers[0]["samples_per_s"],
                      "fvu_ratio_peer_over_ours": peer_fvu / ours["fvu"]}
    return out


def relu_l1_at_trained_density(data: TrainData, n_features: int, batch_size: int, n_steps: int,
                               pre_steps: int, device: str, k: int, l1_coeff: float,
                               lockstep: bool, progress) -> dict:
    """ReLU-L1 past its dense start: ours continues from its own dictionary, trained further.

    From initialisation a ReLU-L1 SAE's codes are dense (L0 ~1,400 of 3,840 after 96 steps), and
    a step is GEMM work; once λ has made them sparse (L0 below ~100 after a few hundred steps at
    λ = 5, where a run spends most of its steps), ours trains on the active pairs
    (ReluL1SparseLoss). So first `pre_steps` of ours alone, untimed, at the same fixed λ (the L0
    controller, started at step 0 without the stage's λ warm-up, winds λ up and collapses the
    codes), then ours continuing from that
    dictionary and the peer, n_steps each in alternating steps. The peer's step is dense fp32
    GEMMs and elementwise work, whose cost does not depend on its codes, so it starts from its
    own initialisation (`peer_l0` says where its codes stand).
    """
    progress(f"train: ReLU-L1, ours alone ({pre_steps} steps, untimed)")
    pre = ours_party(data, "relu_l1", n_features, batch_size, pre_steps, device, k=k,
                     l1_coeff=l1_coeff)({})
    start = pre.result()
    progress(f"train: ReLU-L1 at L0 {start['l0']:.0f}: ours (continuing) and overcomplete "
             f"({n_steps} steps each)")
    runs = run_parties({
        "ours": ours_party(data, "relu_l1", n_features, batch_size, n_steps, device, k=k,
                           l1_coeff=l1_coeff, state=pre.state),
        "peer": peer_party(data, "relu_l1", n_features, batch_size, n_steps, device,
                           l1_coeff=l1_coeff),
    }, lockstep)
    ours, peer = runs["ours"].result(), runs["peer"].result()
    return {"pre_steps": pre_steps, "start_l0": start["l0"], "start_fvu": start["fvu"],
            "ours": ours, "peer": peer, "peer_l0": peer["l0"],
            "throughput_ratio": ours["samples_per_s"] / peer["samples_per_s"]}


# --------------------------------------------------------------------------------------------
# The roofline: bare GEMMs at a training step's shapes


def gemm_ops(batch_size: int, d_in: int, n_features: int, k: int, device: str,
             dtype: torch.dtype = torch.float32):
    """(six, encoder): the six dense GEMMs of one step, and the encoder GEMM + top-k alone.

    The six: encoder forward x W_enc; decoder forward z W_dec; decoder backward dL/dz = g W_decᵀ
    and dL/dW_dec = zᵀ g; encoder backward dL/dW_enc = xᵀ dL/dpre and dL/dx = dL/dpre W_encᵀ.
    Outputs are preallocated: the bound is the arithmetic, not the allocator.
    """
    B, D, F = batch_size, d_in, n_features
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, g_BD, w_enc_DF, w_dec_FD, z_BF = rnd(B, D), rnd(B, D), rnd(D, F), rnd(F, D), rnd(B, F)
    b_F = rnd(F)
    o_BF, o_BD, o_BF2, o_FD, o_DF, o_BD2 = (torch.empty(s, device=device, dtype=dtype)
                                            for s in ((B, F), (B, D), (B, F), (F, D), (D, F),
                                                      (B, D)))

    def six():
        torch.mm(x, w_enc_DF, out=o_BF)
        torch.mm(z_BF, w_dec_FD, out=o_BD)
        torch.mm(g_BD, w_dec_FD.t(), out=o_BF2)
        torch.mm(z_BF.t(), g_BD, out=o_FD)
        torch.mm(x.t(), z_BF, out=o_DF)
        torch.mm(z_BF, w_enc_DF.t(), out=o_BD2)

    def encoder():
        torch.addmm(b_F, x, w_enc_DF, out=o_BF)
        o_BF.topk(k, dim=1, sorted=False)

    return six, encoder


def square_gemm_party(n: int, n_steps: int, device: str, dtype: torch.dtype, warmup: int = 1):
    """A party doing one n x n x n GEMM per step: the machine's GEMM rate, for calibration."""
    def run(clock_kw: dict) -> Trained:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        clock = StepClock(range(n_steps), warmup=warmup, device=device, **clock_kw)
        try:
            for _ in clock:
                torch.mm(a, b, out=out)
        finally:
            clock.finish()
        rate = clock.rate(1)
        return Trained({"kind": "square_gemm", "n": n,
                        "gflops_per_s": 2 * n**3 / rate["step_s_median"] / 1e9, **rate}, dict)
    return run


# --------------------------------------------------------------------------------------------
# Scaling curves


def scaling_curves(data: TrainData, expansions: list[int], batch_sizes: list[int],
                   base_expansion: int, base_batch: int, k: int, n_steps: int, device: str,
                   lockstep: bool, dtype: torch.dtype, progress) -> dict:
    """Our TopK samples/s, the 6-GEMM roofline and the encoder bound, vs expansion and batch."""
    done: dict[tuple[int, int], dict] = {}

    def point(expansion: int, batch: int) -> dict:
        if (expansion, batch) in done:  # the shared corner of the two sweeps
            return done[(expansion, batch)]
        n_features = expansion * data.d_in
        runs = run_parties({
            "ours": ours_party(data, "topk", n_features, batch, n_steps, device, k=k),
            **{kind: gemm_party(kind, batch, data.d_in, n_features, k, n_steps, device, dtype)
               for kind in ("six_gemm", "encoder_topk")}}, lockstep)
        ours, six, enc = (runs[n].info["samples_per_s"] for n in ("ours", "six_gemm",
                                                                  "encoder_topk"))
        done[(expansion, batch)] = {
            "expansion": expansion, "n_features": n_features, "batch_size": batch,
            "samples_per_s": ours, "roofline_samples_per_s": six,
            "encoder_bound_samples_per_s": enc, "ratio_vs_roofline": ours / six}
        return done[(expansion, batch)]

    by_expansion = []
    for e in expansions:
        progress(f"scaling: expansion {e} (F={e * data.d_in}), batch {base_batch}")
        by_expansion.append(point(e, base_batch))
    by_batch = []
    for b in batch_sizes:
        progress(f"scaling: batch {b}, expansion {base_expansion}")
        by_batch.append(point(base_expansion, b))
    return {"by_expansion": by_expansion, "by_batch": by_batch, "k": k, "n_steps": n_steps,
            "lockstep": lockstep}


def plot_scaling(curves: dict, path: Path, title: str) -> Path:
    """Two panels (vs expansion, vs batch) of samples/s with the two hardware bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("by_expansion", "expansion", "dictionary expansion (F / D), batch "
               f"{curves['by_expansion'][0]['batch_size'] if curves['by_expansion'] else ''}"),
              ("by_batch", "batch_size", "batch size, expansion "
               f"{curves['by_batch'][0]['expansion'] if curves['by_batch'] else ''}"))
    for ax, (key, x_key, label) in zip(axes, panels):
        pts = curves[key]
        xs = [p[x_key] for p in pts]
        ax.plot(xs, [p["samples_per_s"] for p in pts], "o-", label="sae-vision TopK trainer")
        ax.plot(xs, [p["roofline_samples_per_s"] for p in pts], "s--",
                label="dense roofline (6 GEMMs / step)")
        ax.plot(xs, [p["encoder_bound_samples_per_s"] for p in pts], "^:",
                label="encoder GEMM + top-k only")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("samples / s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
