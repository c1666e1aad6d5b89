"""Sparse autoencoders applied per spatial position (a 1x1-conv SAE); checkpoints: checkpoint.py.

Four architectures share one module, chosen by `SAEConfig.arch`:
  relu_l1    f = ReLU(x W_enc + b_enc); loss = ||x - x̂||² + λ Σ_i f_i ||W_dec,i||   (Anthropic, Apr 2024)
  topk       f = TopK(ReLU(pre)), pre = (x - b_dec) W_enc + b_enc; + AuxK on dead features (Gao 2024)
  batchtopk  top k·B codes over the whole batch in training; a learned threshold in eval (Bussmann 2024)
  jumprelu   f = pre · H(pre - θ), L0 penalty, straight-through rectangle kernel (Rajamanoharan 2024)

Every public method takes and returns RAW activations; `input_scale` multiplies them internally so the
parameters, codes and losses live in the scaled space where E||x|| ≈ sqrt(d).

Speed: the TopK family never builds dense [B, F] codes in training. The encoder GEMM and the top-k
selection are the only dense work; decoding gathers the k chosen decoder rows (`embedding_bag`) and
the backward pass touches only the chosen (sample, feature) pairs: `sampled_addmm` gives the code
gradient, `embedding_bag` over pairs sorted by feature gives the weight gradients.

Trainer protocol (see `SAE.forward`):
    out = sae(x_BD, dead_mask=dead_F)        # dead_mask feeds AuxK (topk family); others ignore it
    out.losses["loss"].backward()            # decoder-parallel gradients are already projected out
    opt.step(); sae.normalize_decoder_()     # unit-norm decoder rows (no-op for relu_l1)
    fired_F += out.feature_counts()          # dead-feature bookkeeping without dense codes
    sae.set_l1_scale(s)                      # λ warm-up factor in [0, 1] (relu_l1 and jumprelu)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_vision.config import ARCHS, SAEConfig, n_features_of, to_plain

CONSTRAINED_ARCHS = ("topk", "batchtopk", "jumprelu")  # unit-norm decoder rows
THRESHOLD_EMA = 0.05  # batchtopk: weight of each batch's minimum positive code in the threshold EMA
RELU_L1_DEC_NORM = 0.1  # Anthropic (Apr 2024): decoder rows start as random directions of norm 0.1
# JumpReLU's data-driven init: the threshold starts at the pre-activation quantile that leaves
# JUMPRELU_INIT_L0_MULT x k codes active per vector, so the L0 penalty (not the init) sets the final
# sparsity and the threshold has a short way to go; the straight-through window is that threshold
# times JUMPRELU_BANDWIDTH_FRAC (the paper's 0.001 / 0.001 is a ratio of 1).
JUMPRELU_INIT_L0_MULT = 4.0
JUMPRELU_BANDWIDTH_FRAC = 1.0
# Adam moves log θ by at most ~lr per step: at lr 4e-4 that is e^0.8 = 2.2x in 2,000 steps, too
# little for a short run to find its sparsity. The threshold gets this multiple of the lr.
JUMPRELU_THRESHOLD_LR_MULT = 20.0
# sae.l0_control: log λ moves by this times log(L0 / k) per step (an integral controller).
L0_CONTROL_RATE = 0.02


# --------------------------------------------------------------------------------------------
# Sparse codes as CSR pairs and the custom autograd Functions that use them


class _Pairs:
    """Active (sample, feature) pairs in CSR order; the by-feature sort is built once, lazily."""

    def __init__(
        self, crow: Tensor, cols: Tensor, n_rows: int, n_features: int, k: int | None = None
    ):
        # crow [B+1], cols [N]: row-major; column order within a row: see _sort_rows_for_csr
        self.crow, self.cols = crow, cols
        self.n_rows, self.n_features, self.k = n_rows, n_features, k
        self._by_feature: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def n(self) -> int:
        return self.cols.numel()

    def rows(self) -> Tensor:
        """Sample index of every pair."""
        if self.k is not None:  # fixed k per row: no need to expand counts
            return torch.arange(self.n, device=self.cols.device) // self.k
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.cols.device), counts)

    def by_feature(self) -> tuple[Tensor, Tensor, Tensor]:
        """(perm, rows[perm], feature offsets [F+1]) with pairs grouped by feature."""
        if self._by_feature is None:
            perm = _argsort_1d(self.cols)
            rows = self.rows()[perm]
            offsets = torch.zeros(
                self.n_features + 1, dtype=self.cols.dtype, device=self.cols.device
            )
            offsets[1:] = torch.bincount(self.cols, minlength=self.n_features).cumsum(0)
            self._by_feature = (perm, rows, offsets)
        return self._by_feature

    def bag_sum_by_feature(self, weight_BD: Tensor, values_N: Tensor) -> Tensor:
        """out[f] = Σ_{pairs (b, f)} values · weight[b]  -> [F, D], without an [N, D] temporary."""
        perm, rows, offsets = self.by_feature()
        return F.embedding_bag(
            rows,
            weight_BD,
            offsets,
            mode="sum",
            per_sample_weights=values_N[perm],
            include_last_offset=True,
        )

    def bag_sum_by_row(self, weight_FD: Tensor, values_N: Tensor) -> Tensor:
        """out[b] = Σ_{pairs (b, f)} values · weight[f]  -> [B, D]."""
        return F.embedding_bag(
            self.cols,
            weight_FD,
            self.crow,
            mode="sum",
            per_sample_weights=values_N,
            include_last_offset=True,
        )

    def sampled_dot(self, a_BD: Tensor, w_FD: Tensor) -> Tensor:
        """a[b] · w[f] for every pair (b, f) -> [N], computing only those dot products."""
        if self.n == 0:
            return a_BD.new_zeros(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR is beta"
            pattern = torch.sparse_csr_tensor(
                self.crow,
                self.cols,
                a_BD.new_zeros(self.n),
                size=(self.n_rows, self.n_features),
                check_invariants=False,
            )
            return torch.sparse.sampled_addmm(pattern, a_BD, w_FD.t(), beta=0.0).values()

    def flat_index(self) -> Tensor:
        """Index of every pair in the flattened [B, F] matrix."""
        return self.rows() * self.n_features + self.cols

    def dense(self, values_N: Tensor) -> Tensor:
        """Dense [B, F] codes (for inspection, never in the training path)."""
        out = values_N.new_zeros(self.n_rows * self.n_features)
        out.index_put_((self.flat_index(),), values_N)
        return out.view(self.n_rows, self.n_features)


class _SparseEncode(torch.autograd.Function):
    """Identity on the selected pre-activations; the backward builds the sparse encoder gradients.

    The selection itself (GEMM + top-k) runs under no_grad, so autograd never holds [B, F] tensors.
    grad W_enc = x_inᵀ G with G sparse [B, F]: one embedding_bag per pair set, no dense product.
    b_dec enters as x_in = x - b_dec, so its encoder-side gradient is -W_enc Σ_b G_b = -W_enc ∇b_enc.
    """

    @staticmethod
    def forward(ctx, sel_N, sel_aux_M, x_in_BD, x_BD, b_dec_D, W_enc_DF, b_enc_F, pairs, aux_pairs):
        ctx.save_for_backward(x_in_BD, W_enc_DF)
        ctx.pairs, ctx.aux_pairs = pairs, aux_pairs
        return sel_N.clone(), sel_aux_M.clone()

    @staticmethod
    def backward(ctx, g_N, g_aux_M):
        x_in_BD, W_enc_DF = ctx.saved_tensors
        n_feat = W_enc_DF.shape[1]
        sets = [(ctx.pairs, g_N)]
        if ctx.aux_pairs is not None and ctx.aux_pairs.n > 0 and g_aux_M is not None:
            sets.append((ctx.aux_pairs, g_aux_M))
        need = ctx.needs_input_grad
        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = None
        if need[5]:
            grad_FD = None
            for pairs, g in sets:  # [F, D] = Gᵀ x_in, accumulated in place
                part = pairs.bag_sum_by_feature(x_in_BD, g.to(x_in_BD.dtype))
                grad_FD = part if grad_FD is None else grad_FD.add_(part)
            grad_W_enc = grad_FD.t()  # W_enc is stored [F, D]-major, so this matches its layout
        if need[6] or need[4]:
            grad_b_enc = W_enc_DF.new_zeros(n_feat)
            for pairs, g in sets:
                grad_b_enc.index_add_(0, pairs.cols, g.to(grad_b_enc.dtype))
            if need[4]:
                grad_b_dec = -(W_enc_DF @ grad_b_enc)
        if need[3]:
            W_FD = W_enc_DF.t().contiguous()
            grad_x = sum(p.bag_sum_by_row(W_FD, g.to(W_FD.dtype)) for p, g in sets)
        return None, None, None, grad_x, grad_b_dec, grad_W_enc, grad_b_enc, None, None


class _SparseDecode(torch.autograd.Function):
    """x̂[b] = Σ_{(b, f)} v · W_dec[f] touching only the chosen rows, with a sparse backward.

    With `project`, the W_dec gradient leaves with its component along each row removed (the
    unit-norm constraint's projection), fused here so the trainer needs no extra pass.
    """

    @staticmethod
    def forward(ctx, vals_N, W_dec_FD, pairs, project):
        ctx.save_for_backward(vals_N, W_dec_FD)
        ctx.pairs, ctx.project = pairs, project
        return pairs.bag_sum_by_row(W_dec_FD, vals_N.to(W_dec_FD.dtype))

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, W_dec_FD = ctx.saved_tensors
        pairs = ctx.pairs
        g_BD = g_BD.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = pairs.sampled_dot(g_BD, W_dec_FD).to(vals_N.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = pairs.bag_sum_by_feature(g_BD, vals_N.to(g_BD.dtype))
            if ctx.project:
                _project_out_rows_(grad_W, W_dec_FD)
        return grad_vals, grad_W, None, None


class _ProjectRowGrad(torch.autograd.Function):
    """Identity whose backward removes each row's gradient component along that row (dense paths)."""

    @staticmethod
    def forward(ctx, W_FD):
        ctx.save_for_backward(W_FD)
        return W_FD.view_as(W_FD)

    @staticmethod
    def backward(ctx, g_FD):
        (W_FD,) = ctx.saved_tensors
        return _project_out_rows_(g_FD.clone(), W_FD)


def _project_out_rows_(grad_FD: Tensor, W_FD: Tensor) -> Tensor:
    """grad_f -= (grad_f·w_f / ||w_f||²) w_f for every row, in place."""
    coef = (grad_FD * W_FD).sum(1) / (W_FD * W_FD).sum(1).clamp_min(1e-12)
    return grad_FD.sub_(coef[:, None] * W_FD)


class _JumpReLU(torch.autograd.Function):
    """z·H(z-θ); straight-through rectangle-kernel gradient for θ (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, z_BF, theta_F, bandwidth):
        ctx.save_for_backward(z_BF, theta_F)
        ctx.bandwidth = bandwidth
        return z_BF * (z_BF > theta_F)

    @staticmethod
    def backward(ctx, g_BF):
        z, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_z = g_BF * (z > theta)
        window = ((z - theta).abs() < bw / 2).to(g_BF.dtype)
        grad_theta = (-(theta / bw) * window * g_BF).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """H(z-θ) with a zero gradient to z and a rectangle-kernel gradient to θ (the L0 term)."""

    @staticmethod
    def forward(ctx, z_BF, theta_F, bandwidth):
        ctx.save_for_backward(z_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (z_BF > theta_F).to(z_BF.dtype)

    @staticmethod
    def backward(ctx, g_BF):
        z, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        window = ((z - theta).abs() < bw / 2).to(g_BF.dtype)
        return None, (-(1.0 / bw) * window * g_BF).sum(0), None  # None: no gradient to z


# --------------------------------------------------------------------------------------------
# Selection helpers (no autograd)


def _batch_topk_flat(pre_BF: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Exact top-n of a [B, F] matrix as (flat indices ascending, values).

    A full flat topk of B·F values is slow on CPU (~0.2 s at 4096 x 3840), so a threshold from a
    strided sample keeps ~2n candidates; the top n of those is exact whenever at least n survive.
    """
    flat = pre_BF.reshape(-1)
    total = flat.numel()
    if n >= total:
        return torch.arange(total, device=flat.device), flat.clone()
    stride = max(1, total // 65536)
    while math.gcd(stride, pre_BF.shape[1]) != 1:  # coprime with F: the sample spans all features
        stride += 1
    sample = flat[::stride].float()
    for mult in (2.0, 8.0):
        frac = mult * n / total
        if frac >= 1.0:
            break
        rank = max(1, int(sample.numel() * (1.0 - frac)))
        thr = sample.kthvalue(rank).values.to(flat.dtype)
        cand = (flat >= thr).nonzero().squeeze(1)
        if cand.numel() >= n:
            cand_vals = flat[cand]
            # Marking the winners keeps them in ascending order without a sort (a parallel radix
            # sort is cheap alone but stalls on its many thread barriers on a busy machine).
            keep = torch.zeros_like(cand, dtype=torch.bool)
            keep[cand_vals.topk(n, sorted=False).indices] = True
            return cand[keep], cand_vals[keep]
    vals, idx = flat.topk(n, sorted=False)
    idx, order = idx.sort()
    return idx, vals[order]


def _argsort_1d(keys: Tensor) -> Tensor:
    """argsort of a long 1-D integer tensor, single-threaded on CPU.

    ATen sorts such tensors with a parallel radix sort whose many thread barriers each wait out a
    scheduler slice when the other core is busy: 1 ms on a quiet 2-core machine, up to ~180 ms on
    a loaded one. One thread takes ~2 ms either way.
    """
    n_threads = torch.get_num_threads()
    if keys.device.type != "cpu" or n_threads == 1:
        return torch.argsort(keys)
    torch.set_num_threads(1)
    try:
        return torch.argsort(keys)
    finally:
        torch.set_num_threads(n_threads)


def _sort_rows_for_csr(idx_BK: Tensor, vals_BK: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row's column indices (with their values) where the backend needs it.

    PyTorch's CSR invariants ask for sorted columns within a row and cuSPARSE may rely on it; the
    CPU sampled_addmm kernel is a plain per-pair loop that does not, and on CPU the sort of a
    [4096, 256] AuxK block costs more than the sparse products themselves.
    """
    if idx_BK.device.type == "cpu":
        return idx_BK, vals_BK
    idx_BK, order = idx_BK.sort(dim=1)
    return idx_BK, vals_BK.gather(1, order)


def _pairs_from_flat(flat_idx: Tensor, n_rows: int, n_features: int) -> _Pairs:
    """CSR pairs from ascending flat indices into a [B, F] matrix."""
    rows = flat_idx // n_features
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=flat_idx.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return _Pairs(crow, flat_idx % n_features, n_rows, n_features)


# --------------------------------------------------------------------------------------------
# Module


class SAEOutput:
    """forward() result: x_hat (raw units), codes (dense [B, F], built on first access), losses.

    Unpacks like the NamedTuple `(x_hat, codes, losses)`. In the TopK family the codes are held
    sparsely; `feature_counts()` and `l0` read them without densifying.
    """

    __slots__ = ("x_hat", "losses", "_codes", "_pairs", "_vals")

    def __init__(
        self,
        x_hat: Tensor,
        losses: dict[str, Tensor],
        codes: Tensor | None = None,
        pairs: _Pairs | None = None,
        vals: Tensor | None = None,
    ):
        self.x_hat, self.losses = x_hat, losses
        self._codes, self._pairs, self._vals = codes, pairs, vals

    @property
    def codes(self) -> Tensor:
        """Dense codes [B, F] (scaled units); densified and cached on first access."""
        if self._codes is None:
            self._codes = self._pairs.dense(self._vals)
        return self._codes

    @property
    def sparse(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(crow [B+1], feature index [N], value [N]) in CSR order, or None for dense archs."""
        if self._pairs is None:
            return None
        return self._pairs.crow, self._pairs.cols, self._vals

    def feature_counts(self) -> Tensor:
        """Number of samples in which each feature is > 0, as float [F]."""
        if self._pairs is None:
            return (self._codes > 0).sum(0).float()
        active = self._vals.detach() > 0
        return torch.bincount(self._pairs.cols[active], minlength=self._pairs.n_features).float()

    @property
    def l0(self) -> Tensor:
        """Mean number of active features per sample."""
        if self._pairs is None:
            return (self._codes > 0).sum(1).float().mean()
        return (self._vals.detach() > 0).sum().float() / max(1, self._pairs.n_rows)

    def __iter__(self):
        return iter((self.x_hat, self.codes, self.losses))

    def __getitem__(self, i: int):
        return (self.x_hat, self.codes, self.losses)[i]

    def __len__(self) -> int:
        return 3


class SAE(nn.Module):
    """One SAE over D-dim activation vectors; see the module docstring for the architectures."""

    def __init__(
        self, cfg: SAEConfig, d_in: int, input_scale: float = 1.0, mean: Tensor | None = None
    ):
        super().__init__()
        cfg = _as_sae_config(cfg)
        if cfg.arch not in ARCHS:
            raise ValueError(f"sae.arch={cfg.arch!r} is not valid; choose one of {sorted(ARCHS)}")
        n_feat = n_features_of(cfg, d_in)
        if cfg.arch in ("topk", "batchtopk") and not 0 < cfg.k <= n_feat:
            raise ValueError(f"sae.k={cfg.k} must lie in [1, n_features={n_feat}]")
        self.cfg, self.arch, self.d_in, self.n_features = cfg, cfg.arch, int(d_in), n_feat
        self.constrained = cfg.arch in CONSTRAINED_ARCHS
        # W_enc is [D, F] as the contract says, but its memory is [F, D]-major: the sparse backward
        # produces ∇W_enc as [F, D] rows, and this layout takes it without a transpose copy.
        self.W_enc = nn.Parameter(torch.empty(n_feat, d_in).t())
        self.b_enc = nn.Parameter(torch.zeros(n_feat))
        self.W_dec = nn.Parameter(torch.empty(n_feat, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.register_buffer(
            "mean",
            torch.zeros(d_in)
            if mean is None
            else torch.as_tensor(mean, dtype=torch.float32).reshape(d_in).clone(),
        )
        if cfg.arch == "batchtopk":
            # Inference threshold; negative means "not learned yet" (eval falls back to batch top-k).
            self.register_buffer("threshold", torch.tensor(-1.0))
        if cfg.arch == "jumprelu":
            # Without an explicit threshold and bandwidth both are set from the first training
            # batch (see _init_jump_from_data); a negative bandwidth means "not set yet".
            self.log_threshold = nn.Parameter(
                torch.full((n_feat,), math.log(cfg.jumprelu_threshold or 1.0))
            )
            bw = cfg.jumprelu_bandwidth
            if bw is None and cfg.jumprelu_threshold is not None:
                bw = JUMPRELU_BANDWIDTH_FRAC * cfg.jumprelu_threshold
            self.register_buffer("jump_bandwidth", torch.tensor(-1.0 if bw is None else float(bw)))
        if cfg.arch in ("relu_l1", "jumprelu"):
            # log of the L0 controller's factor on λ (see update_l0_control_); 0 = the config's λ.
            self.register_buffer("l1_log_ctrl", torch.zeros(()))
        self.aux_k = default_aux_k(cfg, d_in, n_feat)
        self.l1_scale = 1.0  # λ warm-up factor; set by the trainer through set_l1_scale()
        self._pre_buf: Tensor | None = None  # reused [B, F] pre-activation buffer
        self._aux_buf: Tensor | None = None  # reused [B, n_dead] AuxK candidates
        self.reset_parameters()

    # -- initialisation and constraints -------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows: random directions (norm 0.1 for relu_l1, else 1); W_enc = W_decᵀ."""
        dirs = torch.randn(
            self.n_features,
            self.d_in,
            generator=generator,
            dtype=self.W_dec.dtype,
            device=self.W_dec.device,
        )
        dirs /= dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(dirs * (RELU_L1_DEC_NORM if self.arch == "relu_l1" else 1.0))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.copy_(self.mean * self.input_scale)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (constrained archs; call after each optimiser step)."""
        if self.constrained:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Project decoder-row-parallel components out of W_dec.grad (idempotent).

        Not needed in training: forward() already routes W_dec through a projecting backward for
        constrained archs. Kept for gradients that reach W_dec some other way.
        """
        if self.constrained and self.W_dec.grad is not None:
            _project_out_rows_(self.W_dec.grad, self.W_dec)

    def set_l1_scale(self, scale: float) -> None:
        """Set the sparsity-coefficient warm-up factor (effective λ = l1_coeff * scale)."""
        self.l1_scale = float(scale)

    @torch.no_grad()
    def update_l0_control_(self, l0: Tensor | float) -> None:
        """One step of the L0 controller: λ grows while the mean L0 is above sae.k, else shrinks.

        relu_l1 and jumprelu only, when cfg.l0_control. The factor lives in a buffer, so it is
        checkpointed and a resumed run continues from it. Tensor ops only: no host sync.
        """
        if not (self.cfg.l0_control and hasattr(self, "l1_log_ctrl")):
            return
        l0 = torch.as_tensor(l0, dtype=torch.float32, device=self.l1_log_ctrl.device)
        step = L0_CONTROL_RATE * torch.log(l0.clamp_min(0.1) / float(self.cfg.k))
        self.l1_log_ctrl.add_(step.clamp(-0.2, 0.2)).clamp_(-20.0, 20.0)

    @property
    def l1_coeff_now(self) -> Tensor:
        """Effective sparsity coefficient: l1_coeff x warm-up factor x controller factor."""
        ctrl = self.l1_log_ctrl.exp() if hasattr(self, "l1_log_ctrl") else 1.0
        return self.cfg.l1_coeff * self.l1_scale * ctrl

    def param_groups(self) -> list[dict]:
        """Optimiser groups with an `lr_mult` each (JumpReLU's threshold learns faster)."""
        if self.arch != "jumprelu":
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_mult": 1.0}]
        rest = [p for n, p in self.named_parameters() if n != "log_threshold" and p.requires_grad]
        return [{"params": rest, "lr_mult": 1.0},
                {"params": [self.log_threshold], "lr_mult": JUMPRELU_THRESHOLD_LR_MULT}]

    @torch.no_grad()
    def _init_jump_from_data(self, pre_BF: Tensor) -> None:
        """θ0 = the pre-activation quantile leaving ~4k codes per vector; bandwidth = θ0.

        Pre-activations live in the scaled units (E||x|| = sqrt(D)), about sqrt(D) times larger
        than in the paper's setting, so its absolute 0.001 would leave every positive code on.
        """
        flat = pre_BF.detach().float().reshape(-1)
        stride = max(1, flat.numel() // 1_000_000)
        sample = flat[::stride]
        keep = min(0.5, JUMPRELU_INIT_L0_MULT * self.cfg.k / self.n_features)
        rank = max(1, min(sample.numel(), int(round(sample.numel() * (1.0 - keep)))))
        theta = float(sample.kthvalue(rank).values)
        floor = 1e-3 * float(sample.abs().mean().clamp_min(1e-6))
        theta = max(theta, floor)
        self.log_threshold.fill_(math.log(theta))
        self.jump_bandwidth.fill_(JUMPRELU_BANDWIDTH_FRAC * theta)

    @property
    def jump_threshold(self) -> Tensor:
        """JumpReLU per-feature threshold θ = exp(log θ)."""
        return self.log_threshold.exp()

    # -- public maps (raw units in, raw units out) ---------------------------------------------

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """Encoder pre-activations [B, F] (scaled units)."""
        return self._pre_dense(self._scale_in(x_BD))

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense codes [B, F] (>= 0, scaled units) as the current mode (train/eval) defines them."""
        x_s = self._scale_in(x_BD)
        if self.arch in ("topk", "batchtopk"):
            pairs, sel, x_in, _, aux_sel = self._select(x_s, None)
            if torch.is_grad_enabled():  # differentiable wrt x and the encoder, still sparse
                sel = _SparseEncode.apply(
                    sel, aux_sel, x_in, x_s, self.b_dec, self.W_enc, self.b_enc, pairs, None
                )[0]
            return pairs.dense(F.relu(sel))
        return self._activate_dense(self._pre_dense(x_s))

    def decode(self, codes_BF: Tensor) -> Tensor:
        """Reconstruction [B, D] in raw units from dense codes [B, F]."""
        W_dec = self.W_dec
        if self.constrained and torch.is_grad_enabled() and W_dec.requires_grad:
            W_dec = _ProjectRowGrad.apply(W_dec)
        return self._scale_out(codes_BF.to(W_dec.dtype) @ W_dec + self.b_dec)

    def forward(
        self, x_BD: Tensor, dead_mask: Tensor | None = None, l1_scale: float | None = None
    ) -> SAEOutput:
        """Reconstruct x and compute the losses.

        dead_mask [F] bool: features counted dead by the trainer; the TopK family adds the AuxK
        loss over them (ignored by the other archs). l1_scale overrides `self.l1_scale` (the λ
        warm-up factor) for this call. In training mode batchtopk also updates its threshold EMA.
        losses (scaled units, per-sample sums averaged over the batch): always 'loss' and 'mse';
        'auxk' (topk/batchtopk), 'l1' (relu_l1) or 'l0' (jumprelu). Only 'loss' carries grad.
        """
        x_s = self._scale_in(x_BD)
        scale = self.l1_scale if l1_scale is None else float(l1_scale)
        if self.arch in ("topk", "batchtopk"):
            return self._forward_topk(x_s, dead_mask)
        return self._forward_dense(x_s, scale)

    # -- internals ----------------------------------------------------------------------------

    def _scale_in(self, x_BD: Tensor) -> Tensor:
        return x_BD.to(self.W_dec.dtype) * self.input_scale

    def _scale_out(self, y_BD: Tensor) -> Tensor:
        return y_BD / self.input_scale

    def _encoder_input(self, x_s: Tensor) -> Tensor:
        # The TopK family subtracts the decoder bias first (Gao et al.); the others do not.
        return x_s - self.b_dec if self.arch in ("topk", "batchtopk") else x_s

    def _pre_dense(self, x_s: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, self._encoder_input(x_s), self.W_enc)

    def _activate_dense(self, pre_BF: Tensor) -> Tensor:
        if self.arch == "relu_l1":
            return F.relu(pre_BF)
        if self.arch == "jumprelu":
            return _JumpReLU.apply(pre_BF, self.jump_threshold, self._bandwidth())
        raise AssertionError(self.arch)

    def _bandwidth(self) -> float:
        bw = float(self.jump_bandwidth)
        return bw if bw > 0 else float(self.jump_threshold.detach().median())

    def _gemm_dtype(self, device: torch.device) -> torch.dtype:
        if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.W_enc.dtype

    @torch.no_grad()
    def _pre_into_buffer(self, x_in: Tensor) -> Tensor:
        """pre = x_in W_enc + b_enc, in training into a reused buffer.

        A fresh [4096, 3840] float32 tensor is 60 MB, above glibc's mmap threshold, so every step
        would pay ~20 ms of page faults for it on CPU. Eval (any batch size) allocates afresh.
        """
        dt = self._gemm_dtype(x_in.device)
        buf = self._scratch(
            "_pre_buf", (x_in.shape[0], self.n_features), x_in.new_empty(0, dtype=dt)
        )
        with torch.autocast(x_in.device.type, enabled=False):
            return torch.addmm(self.b_enc.to(dt), x_in.to(dt), self.W_enc.to(dt), out=buf)

    def _scratch(self, name: str, shape: tuple[int, int], like: Tensor) -> Tensor:
        """A reused training buffer of at least `shape` (fresh outside training).

        Large temporaries allocated every step cost page faults on CPU and allocator churn on GPU.
        """
        n = shape[0] * shape[1]
        buf = getattr(self, name)
        if not self.training:
            return like.new_empty(shape)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(n)
            setattr(self, name, buf)
        return buf[:n].view(shape)

    @torch.no_grad()
    def _select(self, x_s: Tensor, dead_mask: Tensor | None):
        """Choose the active pairs (and the AuxK pairs) without autograd.

        Returns (pairs, sel_N, x_in, aux_pairs, aux_sel_M); sel are pre-activations, not ReLU'd.
        """
        x_in = self._encoder_input(x_s).detach()
        pre = self._pre_into_buffer(x_in)
        n_rows = x_s.shape[0]
        k = self.cfg.k
        if self.arch == "batchtopk" and not self.training and float(self.threshold) >= 0:
            flat_idx = (pre > self.threshold.to(pre.dtype)).reshape(-1).nonzero().squeeze(1)
            pairs = _pairs_from_flat(flat_idx, n_rows, self.n_features)
            sel = pre.reshape(-1)[flat_idx]
        elif self.arch == "batchtopk":
            flat_idx, sel = _batch_topk_flat(pre, k * n_rows)
            pairs = _pairs_from_flat(flat_idx, n_rows, self.n_features)
        else:
            sel, idx = pre.topk(k, dim=1, sorted=False)
            idx, sel = _sort_rows_for_csr(idx, sel)
            sel = sel.reshape(-1)
            crow = torch.arange(0, n_rows * k + 1, k, device=pre.device)
            pairs = _Pairs(crow, idx.reshape(-1), n_rows, self.n_features, k=k)
        aux_pairs, aux_sel = None, sel.new_zeros(0)
        if dead_mask is not None and self.aux_k > 0 and self.cfg.aux_coeff > 0:
            dead_idx = dead_mask.to(device=pre.device, dtype=torch.bool).nonzero().squeeze(1)
            if dead_idx.numel() > 0:
                pre_dead = self._scratch("_aux_buf", (n_rows, dead_idx.numel()), pre)
                torch.index_select(pre, 1, dead_idx, out=pre_dead)
                a_vals, a_j = pre_dead.topk(
                    min(self.aux_k, dead_idx.numel()), dim=1, sorted=False
                )
                a_cols, a_vals = _sort_rows_for_csr(dead_idx[a_j], a_vals)
                keep = a_vals > 0  # ReLU'd zeros contribute nothing: drop them from the pairs
                crow = torch.zeros(n_rows + 1, dtype=torch.long, device=pre.device)
                crow[1:] = keep.sum(1).cumsum(0)
                aux_pairs = _Pairs(crow, a_cols[keep], n_rows, self.n_features)
                aux_sel = a_vals[keep]
        if pre.dtype != self.W_enc.dtype:
            # A low-precision GEMM (autocast) only chose the pairs; their values are recomputed
            # in full precision, which costs one sampled dot product per pair.
            with torch.autocast(pre.device.type, enabled=False):
                W_FD, b_enc = self.W_enc.detach().t(), self.b_enc.detach()
                sel = pairs.sampled_dot(x_in, W_FD) + b_enc[pairs.cols]
                if aux_pairs is not None:
                    aux_sel = aux_pairs.sampled_dot(x_in, W_FD) + b_enc[aux_pairs.cols]
        return pairs, sel.to(self.W_dec.dtype), x_in, aux_pairs, aux_sel.to(self.W_dec.dtype)

    def _forward_topk(self, x_s: Tensor, dead_mask: Tensor | None) -> SAEOutput:
        pairs, sel, x_in, aux_pairs, aux_sel = self._select(x_s, dead_mask)
        with torch.autocast(x_s.device.type, enabled=False):
            sel, aux_sel = _SparseEncode.apply(
                sel, aux_sel, x_in, x_s, self.b_dec, self.W_enc, self.b_enc, pairs, aux_pairs
            )
            vals = F.relu(sel)
            x_hat_s = _SparseDecode.apply(vals, self.W_dec, pairs, True) + self.b_dec
            mse = F.mse_loss(x_hat_s, x_s, reduction="sum") / x_s.shape[0]
            losses = {"mse": mse}
            loss = mse
            if aux_pairs is not None:
                residual = (x_s - x_hat_s).detach()
                aux_hat = _SparseDecode.apply(F.relu(aux_sel), self.W_dec, aux_pairs, True)
                variance = (residual - residual.mean(0)).pow(2).sum() / x_s.shape[0]
                aux = F.mse_loss(aux_hat, residual, reduction="sum") / x_s.shape[0]
                aux = aux / variance.clamp_min(1e-12)  # normalised by the residual's variance
                losses["auxk"] = aux
                loss = loss + self.cfg.aux_coeff * aux
            else:
                losses["auxk"] = mse.new_zeros(())
            if self.arch == "batchtopk" and self.training:
                self._update_threshold(vals)
        return SAEOutput(
            self._scale_out(x_hat_s), _finish_losses(loss, losses), pairs=pairs, vals=vals
        )

    @torch.no_grad()
    def _update_threshold(self, vals_N: Tensor) -> None:
        # Tensor ops only: no host sync on CUDA. The first batch sets the threshold outright.
        low = torch.where(vals_N > 0, vals_N, torch.inf).min().to(self.threshold.dtype)
        thr = self.threshold
        new = torch.where(thr < 0, low, thr + THRESHOLD_EMA * (low - thr))
        thr.copy_(torch.where(torch.isfinite(low), new, thr))

    def _forward_dense(self, x_s: Tensor, l1_scale: float) -> SAEOutput:
        pre = self._pre_dense(x_s).float()
        if self.arch == "jumprelu" and self.training and float(self.jump_bandwidth) < 0:
            self._init_jump_from_data(pre)
        W_dec = self.W_dec
        if self.constrained and torch.is_grad_enabled() and W_dec.requires_grad:
            W_dec = _ProjectRowGrad.apply(W_dec)
        codes = self._activate_dense(pre)
        x_hat_s = (codes.to(W_dec.dtype) @ W_dec).float() + self.b_dec
        mse = F.mse_loss(x_hat_s, x_s.float(), reduction="sum") / x_s.shape[0]
        lam = self.cfg.l1_coeff * l1_scale * self.l1_log_ctrl.exp()
        if self.arch == "relu_l1":
            term, name = (codes @ self.W_dec.norm(dim=1)).mean(), "l1"
        else:
            term = _Step.apply(pre, self.jump_threshold, self._bandwidth()).sum(1).mean()
            name = "l0"
        loss = mse + lam * term
        return SAEOutput(
            self._scale_out(x_hat_s), _finish_losses(loss, {"mse": mse, name: term}), codes=codes
        )


def _finish_losses(loss: Tensor, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {"loss": loss}
    out.update({k: v.detach() for k, v in terms.items()})
    return out


def _as_sae_config(cfg: Any) -> SAEConfig:
    """An SAEConfig from a dataclass, an OmegaConf node or a dict (unknown keys ignored)."""
    if isinstance(cfg, SAEConfig):
        return cfg
    plain = dict(cfg) if isinstance(cfg, dict) else to_plain(cfg)
    known = {f.name for f in fields(SAEConfig)}
    return SAEConfig(**{k: v for k, v in plain.items() if k in known})


def default_aux_k(cfg: SAEConfig, d_in: int, n_features: int) -> int:
    """sae.aux_k, or D/2 when unset (Gao et al.: k_aux = d_model / 2), capped by F."""
    aux_k = int(d_in) // 2 if cfg.aux_k is None else int(cfg.aux_k)
    return max(0, min(aux_k, int(n_features)))


def make_sae(
    cfg: SAEConfig, d_in: int, input_scale: float = 1.0, mean: Tensor | None = None
) -> SAE:
    """Build an SAE for `d_in`-dim activations; `mean` (raw units) initialises b_dec."""
    return SAE(cfg, d_in, input_scale=input_scale, mean=mean)


def forward_reference(sae: SAE, x_BD: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
    """TopK-family forward with plain dense autograd: the oracle for tests and benchmarks."""
    if sae.arch not in ("topk", "batchtopk"):
        return sae(x_BD)
    x_s = sae._scale_in(x_BD)
    pre = torch.addmm(sae.b_enc, x_s - sae.b_dec, sae.W_enc)
    n_rows, k = x_s.shape[0], sae.cfg.k
    if sae.arch == "topk":
        vals, idx = pre.topk(k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, idx, F.relu(vals))
    else:
        vals, idx = pre.reshape(-1).topk(k * n_rows)
        codes = torch.zeros_like(pre).reshape(-1).scatter(0, idx, F.relu(vals)).view_as(pre)
    W_dec = _ProjectRowGrad.apply(sae.W_dec) if sae.W_dec.requires_grad else sae.W_dec
    x_hat_s = codes @ W_dec + sae.b_dec
    mse = (x_hat_s - x_s).pow(2).sum(1).mean()
    losses, loss = {"mse": mse}, mse
    if dead_mask is not None and sae.aux_k > 0 and bool(dead_mask.any()):
        n_aux = min(sae.aux_k, int(dead_mask.sum()))
        masked = F.relu(pre).masked_fill(~dead_mask, float("-inf"))
        a_vals, a_idx = masked.topk(n_aux, dim=1)
        aux_codes = torch.zeros_like(pre).scatter(1, a_idx, a_vals)
        residual = (x_s - x_hat_s).detach()
        aux = (aux_codes @ W_dec - residual).pow(2).sum(1).mean()
        aux = aux / (residual - residual.mean(0)).pow(2).sum(1).mean()
        losses["auxk"], loss = aux, loss + sae.cfg.aux_coeff * aux
    return SAEOutput(sae._scale_out(x_hat_s), _finish_losses(loss, losses), codes=codes)


@torch.no_grad()
def resample_dead(
    sae: SAE,
    dead_mask: Tensor,
    x_BD: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Re-initialise dead features toward badly reconstructed inputs; returns their indices.

    As in Towards Monosemanticity: inputs are drawn with probability ∝ loss², the decoder row
    becomes the input's direction (at the mean alive decoder norm), the encoder column the same
    direction at 0.2 x the mean alive encoder norm, b_enc 0. Adam state for them is zeroed.
    """
    dead = dead_mask.to(sae.W_dec.device).nonzero().squeeze(1)
    if dead.numel() == 0:
        return dead
    was_training = sae.training
    sae.eval()
    x_s = sae._scale_in(x_BD)
    x_hat_s = sae._scale_in(sae(x_BD).x_hat)
    sae.train(was_training)
    err_B = (x_s - x_hat_s).pow(2).sum(1)
    probs = err_B.pow(2).double()
    if float(probs.sum()) <= 0:
        probs = torch.ones_like(probs)
    pick = torch.multinomial(
        probs, dead.numel(), replacement=dead.numel() > probs.numel(), generator=generator
    )
    dirs = x_s[pick] - sae.b_dec
    dirs /= dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead_mask.to(sae.W_dec.device)
    dec_norm = sae.W_dec[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    if sae.constrained:
        dec_norm = torch.ones_like(dec_norm)
    sae.W_dec[dead] = dirs * dec_norm
    sae.W_enc[:, dead] = dirs.t() * (0.2 * enc_norm)
    sae.b_enc[dead] = 0.0
    if optimizer is not None:
        for param, index in (
            (sae.W_dec, (dead,)),
            (sae.W_enc, (slice(None), dead)),
            (sae.b_enc, (dead,)),
        ):
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value[index] = 0.0
    return dead
