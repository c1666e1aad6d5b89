"""Sparse autoencoders applied per spatial position (a 1x1-conv SAE); checkpoints: checkpoint.py.

One class per architecture, chosen by `SAEConfig.arch` through `make_sae`:
  relu_l1    f = ReLU((x - b_dec) W_enc + b_enc); loss = ||x - x̂||² + λ Σ_i f_i ||W_dec,i||   (Anthropic, Apr 2024)
  topk       f = TopK(ReLU(pre)), pre = (x - b_dec) W_enc + b_enc; + AuxK on dead features (Gao 2024)
  batchtopk  top k·B codes over the whole batch in training; a learned threshold in eval (Bussmann 2024)
  jumprelu   f = pre · H(pre - θ), L0 penalty, straight-through rectangle kernel (Rajamanoharan 2024)

Every public method takes and returns RAW activations; `input_scale` multiplies them internally so the
parameters, codes and losses live in the scaled space where E||x|| ≈ sqrt(d).

The sparse kernels the TopK family trains with (no dense [B, F] codes) live in kernels.py.

Trainer protocol (see `SAE.forward`):
    out = sae(x_BD, dead_mask=dead_F)        # dead_mask feeds AuxK (topk family); others ignore it
    out.losses["loss"].backward()            # decoder-parallel gradients are already projected out
    opt.step(); sae.normalize_decoder_()     # unit-norm decoder rows (no-op for relu_l1)
    fired_F += out.feature_counts()          # dead-feature bookkeeping without dense codes
    sae.set_l1_scale(s)                      # λ warm-up factor in [0, 1] (relu_l1 and jumprelu)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_vision.core import ARCH_TRAITS, SAEConfig, n_features_of, to_plain

from .kernels import (
    JumpReLUFn,
    Pairs,
    ProjectRowGrad,
    ReluL1Loss,
    ReluL1SparseLoss,
    SparseDecode,
    SparseEncode,
    StepFn,
    batch_topk_flat,
    feature_counts,
    pairs_from_flat,
    project_out_rows_,
    relu_l1_encode,
    row_topk_pairs,
    sampled_density,
    sort_rows_for_csr,
    threshold_pairs,
)

THRESHOLD_EMA = 0.05  # batchtopk: weight of each batch's minimum positive code in the threshold EMA
# Anthropic (Apr 2024) start decoder rows at norm 0.1 for runs of ~1e5 steps at lr 5e-5. With W_enc =
# W_decᵀ that makes the initial map ~0.01 x the identity, and Adam, which moves every weight by ~lr
# a step, spends hundreds of steps at lr 4e-3 growing the encoder before directions are learned
# (planted benchmark: MMCS 0.57 vs 0.90 at norm 1, both with the centred encoder input). Unit rows,
# as in the other archs; the L1 term is weighted by the row norms, so the optimum is scale-free.
RELU_L1_DEC_NORM = 1.0
# JumpReLU's data-driven init: the threshold starts at the pre-activation quantile that leaves
# JUMPRELU_INIT_L0_MULT x k codes active per vector, so the L0 penalty (not the init) sets the final
# sparsity and the threshold has a short way to go; the straight-through window is that threshold
# times JUMPRELU_BANDWIDTH_FRAC (the paper's 0.001 / 0.001 is a ratio of 1).
JUMPRELU_INIT_L0_MULT = 4.0
JUMPRELU_BANDWIDTH_FRAC = 1.0
# Adam moves log θ by at most ~lr per step: at lr 4e-4 that is e^0.8 = 2.2x in 2,000 steps, too
# little for a short run to find its sparsity. The threshold gets this multiple of the lr.
JUMPRELU_THRESHOLD_LR_MULT = 20.0
# relu_l1 trains on sparse pairs (ReluL1SparseLoss) when at most this fraction of a batch's codes
# is > 0, else with the dense five-GEMM step (ReluL1Loss). Measured side by side on the 2-core
# CPU (B = 4096, D = 480, F = 3840, another job running), dense / sparse step time: 2.6 at 0.3%,
# 2.1 at 1%, 1.75 at 2%, 0.87 at 5%, 0.68 at 10%; the break-even lies near 4%.
RELU_L1_SPARSE_MAX_DENSITY = 0.03
# sae.l0_control: log λ moves by this times log(L0 / k) per step (an integral controller).
L0_CONTROL_RATE = 0.02

# arch name -> SAE subclass; filled by `class XSAE(SAE, arch=...)` below, read by make_sae.
SAE_CLASSES: dict[str, type[SAE]] = {}


# long: one base class and the four architectures that share its trainer protocol (about 600
# lines). Each class is short; they live together so the protocol and every override of it can be
# read in one place. The kernels, checkpoints and training loop are already in their own modules.
# --------------------------------------------------------------------------------------------
# Module


@dataclass(frozen=True, eq=False)
class SAEOutput:
    """forward() result: x_hat (raw units), losses, and the codes, dense or as sparse pairs.

    The TopK family holds its codes as `pairs` + `vals`; `codes` densifies them on first access
    (and caches the result), while `feature_counts()` and `l0` read them without densifying.
    """

    x_hat: Tensor
    losses: dict[str, Tensor]
    dense_codes: Tensor | None = None  # dense archs: [B, F] codes (scaled units)
    pairs: Pairs | None = None  # TopK family: the active (sample, feature) pairs
    vals: Tensor | None = None  # TopK family: their code values [N]
    counts: Tensor | None = None  # feature_counts() when the forward computed it (relu_l1)

    @cached_property
    def codes(self) -> Tensor:
        """Dense codes [B, F] (scaled units); densified and cached on first access."""
        if self.dense_codes is not None:
            return self.dense_codes
        return self.pairs.dense(self.vals)

    @property
    def sparse(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(crow [B+1], feature index [N], value [N]) in CSR order, or None for dense archs."""
        if self.pairs is None:
            return None
        return self.pairs.crow, self.pairs.cols, self.vals

    def feature_counts(self) -> Tensor:
        """Number of samples in which each feature is > 0, as float [F]."""
        if self.counts is not None:
            return self.counts
        if self.pairs is None:
            # Dense codes are >= 0 (ReLU, JumpReLU), so sign() is the 0/1 firing indicator; its
            # float column sum is exact and 3x faster on CPU than a boolean count to int64.
            return self.dense_codes.detach().sign().sum(0)
        # A scatter of 0/1 per pair: no boolean compaction or bincount, so no host sync.
        active = (self.vals.detach() > 0).float()
        return active.new_zeros(self.pairs.n_features).index_add_(0, self.pairs.cols, active)

    @property
    def l0(self) -> Tensor:
        """Mean number of active features per sample."""
        if self.pairs is None:
            return (self.dense_codes > 0).sum(1).float().mean()
        return (self.vals.detach() > 0).sum().float() / max(1, self.pairs.n_rows)


class SAE(nn.Module):
    """Base of the four architectures: parameters, scaling, the dense encoder and decoder.

    A subclass is declared with its arch name (`class TopKSAE(SAE, arch="topk")`), which registers
    it for `make_sae` and copies the arch's traits from `config.ARCH_TRAITS` onto the class:
    `uses_k` (k selects the codes) and `has_sparsity_coeff` (λ = sae.l1_coeff weighs a sparsity
    term). `constrained` (unit-norm decoder rows) is a plain class attribute.
    """

    arch: ClassVar[str]
    uses_k: ClassVar[bool]
    has_sparsity_coeff: ClassVar[bool]
    constrained: ClassVar[bool] = True
    dec_init_norm: ClassVar[float] = 1.0  # norm of the random decoder rows at init

    def __init_subclass__(cls, arch: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if arch is not None:
            traits = ARCH_TRAITS[arch]
            cls.arch, cls.uses_k = arch, traits.uses_k
            cls.has_sparsity_coeff = traits.has_sparsity_coeff
            SAE_CLASSES[arch] = cls

    def __init__(
        self, cfg: SAEConfig, d_in: int, input_scale: float = 1.0, mean: Tensor | None = None
    ):
        super().__init__()
        cfg = as_sae_config(cfg)
        if cfg.arch != self.arch:
            raise ValueError(f"sae.arch={cfg.arch!r} given to {type(self).__name__} "
                             f"({self.arch!r}); build SAEs with make_sae")
        n_feat = n_features_of(cfg, d_in)
        if self.uses_k and not 0 < cfg.k <= n_feat:
            raise ValueError(f"sae.k={cfg.k} must lie in [1, n_features={n_feat}]")
        self.cfg, self.d_in, self.n_features = cfg, int(d_in), n_feat
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
        self._init_arch_state(cfg, n_feat)
        if self.has_sparsity_coeff:
            # log of the L0 controller's factor on λ (see update_l0_control_); 0 = the config's λ.
            self.register_buffer("l1_log_ctrl", torch.zeros(()))
        self.aux_k = default_aux_k(cfg, d_in, n_feat)
        self.l1_scale = 1.0  # λ warm-up factor; set by the trainer through set_l1_scale()
        self.reset_parameters()

    def _init_arch_state(self, cfg: SAEConfig, n_feat: int) -> None:
        """Register the architecture's own parameters and buffers (none by default)."""

    # -- initialisation and constraints -------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows: random directions of norm `dec_init_norm` (1 for every arch); W_enc = W_decᵀ."""
        dirs = torch.randn(
            self.n_features,
            self.d_in,
            generator=generator,
            dtype=self.W_dec.dtype,
            device=self.W_dec.device,
        )
        dirs /= dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(dirs * self.dec_init_norm)
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
            project_out_rows_(self.W_dec.grad, self.W_dec)

    def set_l1_scale(self, scale: float) -> None:
        """Set the sparsity-coefficient warm-up factor (effective λ = l1_coeff * scale)."""
        self.l1_scale = float(scale)

    @torch.no_grad()
    def update_l0_control_(self, l0: Tensor | float) -> None:
        """One step of the L0 controller: λ grows while the mean L0 is above sae.k, else shrinks.

        Archs with a sparsity coefficient only, when cfg.l0_control. The factor lives in a buffer,
        so it is checkpointed and a resumed run continues from it. Tensor ops only: no host sync.
        """
        if not (self.cfg.l0_control and self.has_sparsity_coeff):
            return
        l0 = torch.as_tensor(l0, dtype=torch.float32, device=self.l1_log_ctrl.device)
        step = L0_CONTROL_RATE * torch.log(l0.clamp_min(0.1) / float(self.cfg.k))
        self.l1_log_ctrl.add_(step.clamp(-0.2, 0.2)).clamp_(-20.0, 20.0)

    @property
    def l1_coeff_now(self) -> Tensor:
        """Effective sparsity coefficient: l1_coeff x warm-up factor x controller factor."""
        ctrl = self.l1_log_ctrl.exp() if self.has_sparsity_coeff else 1.0
        return self.cfg.l1_coeff * self.l1_scale * ctrl

    def param_groups(self) -> list[dict]:
        """Optimiser groups with an `lr_mult` each (JumpReLU's threshold learns faster)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_mult": 1.0}]

    # -- public maps (raw units in, raw units out) ---------------------------------------------

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """Encoder pre-activations [B, F] (scaled units)."""
        return self._pre_dense(self._scale_in(x_BD))

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense codes [B, F] (>= 0, scaled units) as the current mode (train/eval) defines them."""
        return self._activate_dense(self._pre_dense(self._scale_in(x_BD)))

    def decode(self, codes_BF: Tensor) -> Tensor:
        """Reconstruction [B, D] in raw units from dense codes [B, F]."""
        W_dec = self.W_dec
        if self.constrained and torch.is_grad_enabled() and W_dec.requires_grad:
            W_dec = ProjectRowGrad.apply(W_dec)
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
        pre = self._pre_dense(x_s).float()
        self._before_dense_forward(pre)
        W_dec = self.W_dec
        if self.constrained and torch.is_grad_enabled() and W_dec.requires_grad:
            W_dec = ProjectRowGrad.apply(W_dec)
        codes = self._activate_dense(pre)
        x_hat_s = (codes.to(W_dec.dtype) @ W_dec).float() + self.b_dec
        mse = F.mse_loss(x_hat_s, x_s.float(), reduction="sum") / x_s.shape[0]
        lam = self.cfg.l1_coeff * scale * self.l1_log_ctrl.exp()
        name, term = self._sparsity_term(pre, codes)
        loss = mse + lam * term
        return SAEOutput(self._scale_out(x_hat_s), _finish_losses(loss, {"mse": mse, name: term}),
                         dense_codes=codes)

    # -- hooks of the dense architectures -------------------------------------------------------

    def _activate_dense(self, pre_BF: Tensor) -> Tensor:
        raise NotImplementedError(type(self).__name__)

    def _sparsity_term(self, pre_BF: Tensor, codes_BF: Tensor) -> tuple[str, Tensor]:
        """(loss name, per-sample sparsity term averaged over the batch), weighted by λ."""
        raise NotImplementedError(type(self).__name__)

    def _before_dense_forward(self, pre_BF: Tensor) -> None:
        """Called with the pre-activations before the dense forward (JumpReLU's init)."""

    # -- internals ----------------------------------------------------------------------------

    def _scale_in(self, x_BD: Tensor) -> Tensor:
        return x_BD.to(self.W_dec.dtype) * self.input_scale

    def _scale_out(self, y_BD: Tensor) -> Tensor:
        return y_BD / self.input_scale

    def _encoder_input(self, x_s: Tensor) -> Tensor:
        return x_s

    def _pre_dense(self, x_s: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, self._encoder_input(x_s), self.W_enc)


class ReluL1SAE(SAE, arch="relu_l1"):
    """f = ReLU((x - b_dec) W_enc + b_enc); loss = ||x - x̂||² + λ Σ_i f_i ||W_dec,i|| (Anthropic,
    Apr 2024)."""

    constrained = False
    dec_init_norm = RELU_L1_DEC_NORM
    # Training steps read the device (the codes' density, then the active pairs) to take the
    # sparse path: True never (dense steps only), False always, None on the CPU only.
    sync_free: bool | None = None

    def _encoder_input(self, x_s: Tensor) -> Tensor:
        # Centred, as in Bricken et al. (2023) and the TopK family: post-ReLU inputs have a large
        # mean, and an uncentred encoder input conditions the encoder badly (planted benchmark:
        # MMCS 0.66 uncentred, 0.90 centred, at L0 = k). Checkpoints of format 1 encoded x;
        # checkpoint.load_sae folds b_dec W_enc into their b_enc.
        return x_s - self.b_dec

    def forward(
        self, x_BD: Tensor, dead_mask: Tensor | None = None, l1_scale: float | None = None
    ) -> SAEOutput:
        """See SAE.forward. Without autocast and with x as data (the training step), the whole
        loss is one ReluL1Loss: the same values and gradients with five GEMMs instead of six. In
        training, where the step may read the device (`sync_free`), a batch whose codes are at
        most RELU_L1_SPARSE_MAX_DENSITY > 0 trains on its active pairs instead
        (ReluL1SparseLoss): one dense GEMM, and `pairs`/`vals` in the output."""
        x_s = self._scale_in(x_BD)
        if x_s.requires_grad or torch.is_autocast_enabled(x_s.device.type):
            return super().forward(x_BD, dead_mask, l1_scale)
        scale = self.l1_scale if l1_scale is None else float(l1_scale)
        lam = self.cfg.l1_coeff * scale * self.l1_log_ctrl.exp()
        encoded = None
        if self.training and self._may_read_host(x_s.device):
            with torch.no_grad():
                encoded = relu_l1_encode(x_s, self.W_enc, self.b_enc, self.b_dec)
            if sampled_density(encoded[1]) <= RELU_L1_SPARSE_MAX_DENSITY:
                return self._sparse_forward(x_s, *encoded, lam)
        loss, mse, l1, codes, x_hat_s = ReluL1Loss.apply(
            x_s, self.W_enc, self.b_enc, self.W_dec, self.b_dec, lam, encoded)
        return SAEOutput(self._scale_out(x_hat_s), _finish_losses(loss, {"mse": mse, "l1": l1}),
                         dense_codes=codes, counts=self._firing_counts(codes))

    def _may_read_host(self, device: torch.device) -> bool:
        """Whether a training step may read the device (see sync_free)."""
        return not self.sync_free if self.sync_free is not None else device.type == "cpu"

    def _sparse_forward(self, x_s: Tensor, x_in: Tensor, codes_BF: Tensor,
                        lam: Tensor) -> SAEOutput:
        """The training step once the codes are sparse: ReluL1SparseLoss on the active pairs."""
        with torch.no_grad():
            flat = codes_BF.reshape(-1)
            idx = flat.nonzero().squeeze(1)  # ascending: CSR row-major order
            pairs = pairs_from_flat(idx, codes_BF.shape[0], codes_BF.shape[1])
            vals = flat[idx]
        del codes_BF, flat
        loss, mse, l1, x_hat_s = ReluL1SparseLoss.apply(
            x_in, vals, pairs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, lam)
        counts = feature_counts(pairs.cols, self.n_features).to(vals.dtype)
        return SAEOutput(self._scale_out(x_hat_s), _finish_losses(loss, {"mse": mse, "l1": l1}),
                         pairs=pairs, vals=vals, counts=counts)

    def _init_arch_state(self, cfg: SAEConfig, n_feat: int) -> None:
        self._sign_buf: Tensor | None = None  # reused [B, F] scratch of _firing_counts

    def _firing_counts(self, codes_BF: Tensor) -> Tensor:
        """Samples in which each feature fires: sign(codes) (codes >= 0) into a reused buffer in
        training (a fresh [4096, 3840] tensor costs page faults on CPU), summed by a
        matrix-vector product; exact, as a float sum of 0/1 below 2^24."""
        n, buf = codes_BF.numel(), self._sign_buf
        if not self.training:
            buf = codes_BF.new_empty(n)
        elif (buf is None or buf.numel() < n or buf.dtype != codes_BF.dtype
              or buf.device != codes_BF.device):
            buf = self._sign_buf = codes_BF.new_empty(n)
        sign = torch.sign(codes_BF, out=buf[:n].view(codes_BF.shape))
        return torch.mv(sign.t(), codes_BF.new_ones(codes_BF.shape[0]))

    def _activate_dense(self, pre_BF: Tensor) -> Tensor:
        return F.relu(pre_BF)

    def _sparsity_term(self, pre_BF: Tensor, codes_BF: Tensor) -> tuple[str, Tensor]:
        return "l1", (codes_BF @ self.W_dec.norm(dim=1)).mean()


class JumpReLUSAE(SAE, arch="jumprelu"):
    """f = pre · H(pre - θ), L0 penalty, straight-through rectangle kernel (Rajamanoharan 2024)."""

    def _init_arch_state(self, cfg: SAEConfig, n_feat: int) -> None:
        # Without an explicit threshold and bandwidth both are set from the first training
        # batch (see _before_dense_forward); a negative bandwidth means "not set yet".
        self.log_threshold = nn.Parameter(
            torch.full((n_feat,), math.log(cfg.jumprelu_threshold or 1.0))
        )
        bw = cfg.jumprelu_bandwidth
        if bw is None and cfg.jumprelu_threshold is not None:
            bw = JUMPRELU_BANDWIDTH_FRAC * cfg.jumprelu_threshold
        self.register_buffer("jump_bandwidth", torch.tensor(-1.0 if bw is None else float(bw)))
        # Whether jump_bandwidth is known (on the host) to be set, so a training step need not
        # read it back from the device; a loaded state dict makes it unknown again.
        self._jump_set = bw is not None and bw > 0
        self.register_load_state_dict_post_hook(_forget_jump_set)

    @property
    def jump_threshold(self) -> Tensor:
        """JumpReLU per-feature threshold θ = exp(log θ)."""
        return self.log_threshold.exp()

    def param_groups(self) -> list[dict]:
        """The threshold gets JUMPRELU_THRESHOLD_LR_MULT x the lr (see that constant)."""
        rest = [p for n, p in self.named_parameters() if n != "log_threshold" and p.requires_grad]
        return [{"params": rest, "lr_mult": 1.0},
                {"params": [self.log_threshold], "lr_mult": JUMPRELU_THRESHOLD_LR_MULT}]

    def _before_dense_forward(self, pre_BF: Tensor) -> None:
        if self.training and not self._jump_set:
            if float(self.jump_bandwidth) < 0:  # read once, not every step
                self._init_jump_from_data(pre_BF)
            self._jump_set = float(self.jump_bandwidth) > 0

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

    def _activate_dense(self, pre_BF: Tensor) -> Tensor:
        return JumpReLUFn.apply(pre_BF, self.jump_threshold, self._bandwidth())

    def _sparsity_term(self, pre_BF: Tensor, codes_BF: Tensor) -> tuple[str, Tensor]:
        return "l0", StepFn.apply(pre_BF, self.jump_threshold, self._bandwidth()).sum(1).mean()

    def _bandwidth(self) -> Tensor | float:
        if self._jump_set:  # a 0-d tensor: no host read in the step
            return self.jump_bandwidth
        bw = float(self.jump_bandwidth)
        return bw if bw > 0 else float(self.jump_threshold.detach().median())


def _forget_jump_set(module: JumpReLUSAE, _keys) -> None:
    module._jump_set = False


class TopKSAE(SAE, arch="topk"):
    """f = TopK(ReLU(pre)), pre = (x - b_dec) W_enc + b_enc; + AuxK on dead features (Gao 2024).

    Codes stay sparse (pairs + values) through the forward and backward passes; see kernels.py.
    """

    # AuxK selection: True, fixed-shape (no host sync); False, compacted; None, fixed-shape on
    # every device but the CPU, where reading the host is free and the compacted pairs are fewer.
    sync_free: bool | None = None

    def _init_arch_state(self, cfg: SAEConfig, n_feat: int) -> None:
        self._pre_buf: Tensor | None = None  # reused [B, F] pre-activation buffer

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense codes [B, F] (>= 0, scaled units) as the current mode (train/eval) defines them."""
        x_s = self._scale_in(x_BD)
        pairs, sel, x_in, _, aux_sel = self._select(x_s, None)
        if torch.is_grad_enabled():  # differentiable wrt x and the encoder, still sparse
            sel = SparseEncode.apply(
                sel, aux_sel, x_in, x_s, self.b_dec, self.W_enc, self.b_enc, pairs, None
            )[0]
        return pairs.dense(F.relu(sel))

    def forward(
        self, x_BD: Tensor, dead_mask: Tensor | None = None, l1_scale: float | None = None
    ) -> SAEOutput:
        """See SAE.forward; l1_scale is ignored (no sparsity coefficient)."""
        x_s = self._scale_in(x_BD)
        pairs, sel, x_in, aux_pairs, aux_sel = self._select(x_s, dead_mask)
        with torch.autocast(x_s.device.type, enabled=False):
            sel, aux_sel = SparseEncode.apply(
                sel, aux_sel, x_in, x_s, self.b_dec, self.W_enc, self.b_enc, pairs, aux_pairs
            )
            vals = F.relu(sel)
            x_hat_s = SparseDecode.apply(vals, self.W_dec, pairs, True) + self.b_dec
            mse = F.mse_loss(x_hat_s, x_s, reduction="sum") / x_s.shape[0]
            losses = {"mse": mse}
            loss = mse
            if aux_pairs is not None:
                residual = (x_s - x_hat_s).detach()
                aux_hat = SparseDecode.apply(F.relu(aux_sel), self.W_dec, aux_pairs, True)
                variance = (residual - residual.mean(0)).pow(2).sum() / x_s.shape[0]
                aux = F.mse_loss(aux_hat, residual, reduction="sum") / x_s.shape[0]
                aux = aux / variance.clamp_min(1e-12)  # normalised by the residual's variance
                # No dead feature: 0, as if the term were skipped (decided on the device).
                aux = torch.where(dead_mask.to(aux.device).any(), aux, aux.new_zeros(()))
                losses["auxk"] = aux
                loss = loss + self.cfg.aux_coeff * aux
            else:
                losses["auxk"] = mse.new_zeros(())
            self._after_forward(vals)
        return SAEOutput(
            self._scale_out(x_hat_s), _finish_losses(loss, losses), pairs=pairs, vals=vals
        )

    def _after_forward(self, vals_N: Tensor) -> None:
        """Called with the selected code values at the end of forward (BatchTopK's EMA)."""

    def _choose(self, pre_BF: Tensor) -> tuple[Pairs, Tensor]:
        """The active pairs and their pre-activations: the top k of each row."""
        return row_topk_pairs(pre_BF, self.cfg.k)

    def _encoder_input(self, x_s: Tensor) -> Tensor:
        # The TopK family subtracts the decoder bias first (Gao et al.), as relu_l1 does; jumprelu
        # does not.
        return x_s - self.b_dec

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
        pairs, sel = self._choose(pre)
        aux_pairs, aux_sel, aux_keep = None, sel.new_zeros(0), None
        if dead_mask is not None and self.aux_k > 0 and self.cfg.aux_coeff > 0:
            if self.sync_free if self.sync_free is not None else pre.device.type != "cpu":
                aux_pairs, aux_sel, aux_keep = self._aux_pairs(pre, dead_mask)
            else:
                aux_pairs, aux_sel = self._aux_pairs_compact(pre, dead_mask, aux_sel)
        if pre.dtype != self.W_enc.dtype:
            # A low-precision GEMM (autocast) only chose the pairs; their values are recomputed
            # in full precision, which costs one sampled dot product per pair.
            with torch.autocast(pre.device.type, enabled=False):
                W_FD, b_enc = self.W_enc.detach().t(), self.b_enc.detach()
                sel = pairs.sampled_dot(x_in, W_FD) + b_enc[pairs.cols]
                if aux_pairs is not None:
                    aux_sel = aux_pairs.sampled_dot(x_in, W_FD) + b_enc[aux_pairs.cols]
                    if aux_keep is not None:
                        aux_sel = torch.where(aux_keep, aux_sel, 0.0)
        return pairs, sel.to(self.W_dec.dtype), x_in, aux_pairs, aux_sel.to(self.W_dec.dtype)

    def _aux_pairs_compact(self, pre_BF: Tensor, dead_mask: Tensor, none: Tensor):
        """AuxK pairs on the CPU: only the dead features' columns, only positive values (the
        host counts both, which costs nothing there and saves the sparse work of padding).
        Returns (pairs or None when no feature is dead, values)."""
        n_rows = pre_BF.shape[0]
        dead_idx = dead_mask.to(device=pre_BF.device, dtype=torch.bool).nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return None, none
        pre_dead = pre_BF.index_select(1, dead_idx)
        a_vals, a_j = pre_dead.topk(min(self.aux_k, dead_idx.numel()), dim=1, sorted=False)
        a_cols, a_vals = sort_rows_for_csr(dead_idx[a_j], a_vals)
        keep = a_vals > 0  # ReLU'd zeros contribute nothing: drop them from the pairs
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=pre_BF.device)
        crow[1:] = keep.sum(1).cumsum(0)
        return Pairs(crow, a_cols[keep], n_rows, self.n_features), a_vals[keep]

    def _aux_pairs(self, pre_BF: Tensor, dead_mask: Tensor) -> tuple[Pairs, Tensor, Tensor]:
        """AuxK pairs without a host sync (the default off the CPU): the top min(aux_k, F) dead
        entries of every row of `pre_BF` (which it overwrites). A fixed number of pairs per row,
        so the host never counts the dead features or the positive values; a pair that is not a
        positive dead pre-activation keeps the value 0, which (through ReLU) adds nothing to the
        AuxK loss or its gradients. Returns (pairs, values, kept mask)."""
        n_rows, n_aux = pre_BF.shape[0], min(self.aux_k, self.n_features)
        dead_F = dead_mask.to(device=pre_BF.device, dtype=torch.bool)
        # In place: the main pairs are chosen and `pre` is a scratch buffer read by no one else.
        pre_BF.masked_fill_(~dead_F, -torch.inf)
        a_vals, a_cols = pre_BF.topk(n_aux, dim=1, sorted=False)
        a_cols, a_vals = sort_rows_for_csr(a_cols, a_vals)
        keep = a_vals > 0  # ReLU'd zeros and live features (at -inf) contribute nothing
        crow = torch.arange(0, n_rows * n_aux + 1, n_aux, device=pre_BF.device)
        pairs = Pairs(crow, a_cols.reshape(-1), n_rows, self.n_features, k=n_aux)
        keep = keep.reshape(-1)
        return pairs, torch.where(keep, a_vals.reshape(-1), 0.0), keep


class BatchTopKSAE(TopKSAE, arch="batchtopk"):
    """Top k·B codes over the whole batch in training; a learned threshold in eval (Bussmann 2024)."""

    def _init_arch_state(self, cfg: SAEConfig, n_feat: int) -> None:
        super()._init_arch_state(cfg, n_feat)
        # Inference threshold; negative means "not learned yet" (eval falls back to batch top-k).
        self.register_buffer("threshold", torch.tensor(-1.0))

    def _choose(self, pre_BF: Tensor) -> tuple[Pairs, Tensor]:
        """Above the learned threshold in eval; the top k·B of the batch otherwise."""
        if not self.training and float(self.threshold) >= 0:
            return threshold_pairs(pre_BF, self.threshold.to(pre_BF.dtype))
        flat_idx, sel = batch_topk_flat(pre_BF, self.cfg.k * pre_BF.shape[0])
        return pairs_from_flat(flat_idx, pre_BF.shape[0], self.n_features), sel

    def _after_forward(self, vals_N: Tensor) -> None:
        if self.training:
            self._update_threshold(vals_N)

    @torch.no_grad()
    def _update_threshold(self, vals_N: Tensor) -> None:
        # Tensor ops only: no host sync on CUDA. The first batch sets the threshold outright.
        low = torch.where(vals_N > 0, vals_N, torch.inf).min().to(self.threshold.dtype)
        thr = self.threshold
        new = torch.where(thr < 0, low, thr + THRESHOLD_EMA * (low - thr))
        thr.copy_(torch.where(torch.isfinite(low), new, thr))


def _finish_losses(loss: Tensor, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {"loss": loss}
    out.update({k: v.detach() for k, v in terms.items()})
    return out


def as_sae_config(cfg: Any) -> SAEConfig:
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
    cfg = as_sae_config(cfg)
    if cfg.arch not in SAE_CLASSES:
        raise ValueError(f"sae.arch={cfg.arch!r} is not valid; choose one of {sorted(SAE_CLASSES)}")
    return SAE_CLASSES[cfg.arch](cfg, d_in, input_scale=input_scale, mean=mean)


def forward_reference(sae: SAE, x_BD: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
    """TopK-family and relu_l1 forward with plain dense autograd: the oracle for tests and
    benchmarks (relu_l1's own forward is the fused ReluL1Loss)."""
    if isinstance(sae, ReluL1SAE):
        x_s = sae._scale_in(x_BD)
        codes = F.relu(torch.addmm(sae.b_enc, x_s - sae.b_dec, sae.W_enc))
        x_hat_s = codes @ sae.W_dec + sae.b_dec
        mse = (x_hat_s - x_s).pow(2).sum(1).mean()
        l1 = (codes @ sae.W_dec.norm(dim=1)).mean()
        loss = mse + sae.l1_coeff_now * l1
        return SAEOutput(sae._scale_out(x_hat_s), _finish_losses(loss, {"mse": mse, "l1": l1}),
                         dense_codes=codes)
    if not sae.uses_k:
        return sae(x_BD)
    x_s = sae._scale_in(x_BD)
    pre = torch.addmm(sae.b_enc, x_s - sae.b_dec, sae.W_enc)
    n_rows, k = x_s.shape[0], sae.cfg.k
    if not isinstance(sae, BatchTopKSAE):
        vals, idx = pre.topk(k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, idx, F.relu(vals))
    else:
        vals, idx = pre.reshape(-1).topk(k * n_rows)
        codes = torch.zeros_like(pre).reshape(-1).scatter(0, idx, F.relu(vals)).view_as(pre)
    W_dec = ProjectRowGrad.apply(sae.W_dec) if sae.W_dec.requires_grad else sae.W_dec
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
    return SAEOutput(sae._scale_out(x_hat_s), _finish_losses(loss, losses), dense_codes=codes)


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
