"""Sparse kernels of the SAEs: active (sample, feature) pairs, the autograd Functions that use
them, and top-k selection. Nothing here knows about an architecture or a config.

The TopK family never builds dense [B, F] codes in training. The encoder GEMM and the top-k
selection are the only dense work; decoding gathers the k chosen decoder rows (`embedding_bag`) and
the backward pass touches only the chosen (sample, feature) pairs: `sampled_addmm` gives the code
gradient, `embedding_bag` over pairs sorted by feature gives the weight gradients.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Sparse codes as CSR pairs and the custom autograd Functions that use them


def feature_counts(idx: Tensor, n: int) -> Tensor:
    """How often each of 0..n-1 occurs in `idx` (bincount with minlength=n), without the host
    sync that bincount makes on CUDA to size its output."""
    return torch.zeros(n, dtype=idx.dtype, device=idx.device).index_add_(
        0, idx, torch.ones_like(idx))


class Pairs:
    """Active (sample, feature) pairs in CSR order; the by-feature sort is built once, lazily."""

    def __init__(
        self, crow: Tensor, cols: Tensor, n_rows: int, n_features: int, k: int | None = None
    ):
        # crow [B+1], cols [N]: row-major; column order within a row: see sort_rows_for_csr
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
            perm = argsort_1d(self.cols)
            rows = self.rows()[perm]
            offsets = torch.zeros(
                self.n_features + 1, dtype=self.cols.dtype, device=self.cols.device
            )
            offsets[1:] = feature_counts(self.cols, self.n_features).cumsum(0)
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


class SparseEncode(torch.autograd.Function):
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


class SparseDecode(torch.autograd.Function):
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
                project_out_rows_(grad_W, W_dec_FD)
        return grad_vals, grad_W, None, None


class ReluL1Loss(torch.autograd.Function):
    """relu_l1's whole loss in one Function, with a hand-written backward of five GEMMs.

    f = ReLU((x - b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec,
    loss = Σ ||x̂ - x||² / B + λ Σ_b Σ_f f_bf ||W_dec,f|| / B.
    Returns (loss, mse, l1, codes [B, F], x̂ [B, D]); only loss carries a gradient. x enters as
    data, so the encoder's [B, D] input gradient that plain autograd forms only to reduce it to
    ∇b_dec is never built: b_dec's encoder-side gradient is -W_enc ∇b_enc, a matrix-vector
    product. Every bias and reduction over [B, F] rides in a GEMM as one extra column (x_in gets
    a column of ones against b_enc, W_dec a column of row norms, the residual gradient a column
    of the L1 weight), so no [B, F] tensor is copied or summed apart from the ReLU, applied in
    place, and its mask in the backward, also in place.
    """

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, lam, encoded=None):
        n, d = x_BD.shape
        # `encoded`: (x_in, codes) of relu_l1_encode on these very parameters, when the caller
        # already ran GEMM 1 (to measure the codes' density before choosing this path)
        x_in, codes = encoded if encoded is not None else relu_l1_encode(
            x_BD, W_enc_DF, b_enc_F, b_dec_D)
        norms_F = W_dec_FD.norm(dim=1)
        dec = torch.cat([W_dec_FD, norms_F[:, None]], 1)  # [F, D+1]: [W_dec, ||W_dec,f||]
        out = codes @ dec  # GEMM 2: [f W_dec, Σ_f f_bf ||W_dec,f||]
        x_hat = out[:, :d] + b_dec_D
        r = x_hat - x_BD
        mse = torch.dot(r.reshape(-1), r.reshape(-1)) / n
        l1 = out[:, d].sum() / n
        loss = mse + lam * l1
        ctx.save_for_backward(x_in, codes, r, norms_F, dec, W_enc_DF, W_dec_FD, lam)
        ctx.mark_non_differentiable(mse, l1, codes, x_hat)
        ctx.set_materialize_grads(False)  # else autograd zero-fills a [B, F] grad for the codes
        return loss, mse, l1, codes, x_hat

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        if g_loss is None:
            return (None,) * 6
        x_in, codes, r, norms_F, dec, W_enc_DF, W_dec_FD, lam = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, d = r.shape
        g = r.new_empty(n, d + 1)  # [∂loss/∂x̂, c]: c = λ g / B weighs the L1 term
        torch.mul(r, 2.0 * g_loss / n, out=g[:, :d])
        g[:, d] = lam * g_loss / n
        grad_W_dec = None
        if need[3]:
            gd = codes.t() @ g  # GEMM 3: [∇W_dec from x̂, c Σ_b f_bf]
            # the L1 term through the row norms: c Σ_b f_bf W_dec,f / ||W_dec,f||
            per_row = torch.where(norms_F > 0, gd[:, d] / norms_F, torch.zeros_like(norms_F))
            grad_W_dec = torch.addcmul(gd[:, :d], per_row[:, None], W_dec_FD)
        g_pre = g @ dec.t()  # GEMM 4: ∂loss/∂f = g_x̂ W_decᵀ + c ||W_dec,f||
        torch.ops.aten.threshold_backward.grad_input(g_pre, codes, 0, grad_input=g_pre)
        ge = g_pre.t() @ x_in  # GEMM 5: [∇W_encᵀ, ∇b_enc]
        grad_b_enc = ge[:, d].contiguous()
        grad_W_enc = ge[:, :d].contiguous().t() if need[1] else None  # [F, D]-major, as W_enc
        grad_b_dec = g[:, :d].sum(0) - W_enc_DF @ grad_b_enc if need[4] else None
        return (None, grad_W_enc, grad_b_enc if need[2] else None, grad_W_dec, grad_b_dec, None,
                None)


def relu_l1_encode(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor,
                   b_dec_D: Tensor) -> tuple[Tensor, Tensor]:
    """relu_l1's encoder as one GEMM: (x_in = [x - b_dec, 1] [B, D+1], codes [B, F]).

    b_enc rides in the GEMM as the column of ones; the ReLU is applied in place.
    """
    n, d = x_BD.shape
    x_in = x_BD.new_empty(n, d + 1)
    torch.sub(x_BD, b_dec_D, out=x_in[:, :d])
    x_in[:, d] = 1
    enc = torch.cat([W_enc_DF.t(), b_enc_F[:, None]], 1)  # [F, D+1]: [W_encᵀ, b_enc]
    return x_in, (x_in @ enc.t()).relu_()  # GEMM 1


def sampled_density(codes_BF: Tensor, n_sample: int = 65536) -> float:
    """Fraction of codes > 0, estimated from a strided sample of ~n_sample entries (a host read).

    The stride is coprime with the number of features, so the sample spans every feature.
    Deterministic: the same codes give the same estimate.
    """
    flat = codes_BF.reshape(-1)
    stride = max(1, flat.numel() // n_sample)
    while math.gcd(stride, codes_BF.shape[-1]) != 1:
        stride += 1
    sample = flat[::stride]
    return float((sample > 0).sum()) / max(1, sample.numel())


class ReluL1SparseLoss(torch.autograd.Function):
    """ReluL1Loss once the codes are sparse: the encoder GEMM is the only dense product.

    The caller runs the encoder GEMM and the ReLU without autograd and passes the active pairs
    (every code > 0) with their values; decoding gathers decoder rows (`embedding_bag`), and the
    backward touches only those pairs: `sampled_addmm` gives ∂loss/∂f where f > 0 (the only
    places the ReLU passes a gradient), `embedding_bag` over pairs sorted by feature gives ∇W_dec
    and ∇[W_encᵀ, b_enc]. The L1 weight and the encoder bias ride along as one extra column, as in
    ReluL1Loss: x_in = [x - b_dec, 1] and dec = [W_dec, ||W_dec,f||]. The same loss and gradients
    as ReluL1Loss (tested against it); at a trained density of ~1% it does ~1/4 of the work.
    """

    @staticmethod
    def forward(ctx, x_in_BD1, vals_N, pairs, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, lam):
        n, d = x_in_BD1.shape[0], x_in_BD1.shape[1] - 1
        norms_F = W_dec_FD.norm(dim=1)
        dec = torch.cat([W_dec_FD, norms_F[:, None]], 1)  # [F, D+1]
        out = pairs.bag_sum_by_row(dec, vals_N)  # [f W_dec, Σ_f f_bf ||W_dec,f||]
        r = out[:, :d] - x_in_BD1[:, :d]  # x̂ - x = f W_dec + b_dec - x
        mse = torch.dot(r.reshape(-1), r.reshape(-1)) / n
        l1 = out[:, d].sum() / n
        loss = mse + lam * l1
        x_hat = out[:, :d] + b_dec_D
        ctx.save_for_backward(x_in_BD1, vals_N, r, norms_F, dec, W_enc_DF, W_dec_FD, lam)
        ctx.pairs = pairs
        ctx.mark_non_differentiable(mse, l1, x_hat)
        ctx.set_materialize_grads(False)
        return loss, mse, l1, x_hat

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        if g_loss is None:
            return (None,) * 8
        x_in, vals_N, r, norms_F, dec, W_enc_DF, W_dec_FD, lam = ctx.saved_tensors
        pairs, need = ctx.pairs, ctx.needs_input_grad
        n, d = r.shape
        g = r.new_empty(n, d + 1)  # [∂loss/∂x̂, c]: c = λ g / B weighs the L1 term
        torch.mul(r, 2.0 * g_loss / n, out=g[:, :d])
        g[:, d] = lam * g_loss / n
        grad_W_dec = grad_W_enc = grad_b_enc = grad_b_dec = None
        if need[5]:
            gd = pairs.bag_sum_by_feature(g, vals_N)  # [∇W_dec from x̂, c Σ_b f_bf]
            per_row = torch.where(norms_F > 0, gd[:, d] / norms_F, torch.zeros_like(norms_F))
            grad_W_dec = torch.addcmul(gd[:, :d], per_row[:, None], W_dec_FD)
        g_vals = pairs.sampled_dot(g, dec)  # ∂loss/∂f_bf = g_x̂ · W_dec,f + c ||W_dec,f||
        ge = pairs.bag_sum_by_feature(x_in, g_vals)  # [∇W_encᵀ, ∇b_enc]
        grad_b_enc = ge[:, d].contiguous()
        if need[3]:
            grad_W_enc = ge[:, :d].contiguous().t()  # [F, D]-major, as W_enc is stored
        if need[6]:
            grad_b_dec = g[:, :d].sum(0) - W_enc_DF @ grad_b_enc
        return (None, None, None, grad_W_enc, grad_b_enc if need[4] else None, grad_W_dec,
                grad_b_dec, None)


class ProjectRowGrad(torch.autograd.Function):
    """Identity whose backward removes each row's gradient component along that row (dense paths)."""

    @staticmethod
    def forward(ctx, W_FD):
        ctx.save_for_backward(W_FD)
        return W_FD.view_as(W_FD)

    @staticmethod
    def backward(ctx, g_FD):
        (W_FD,) = ctx.saved_tensors
        return project_out_rows_(g_FD.clone(), W_FD)


def project_out_rows_(grad_FD: Tensor, W_FD: Tensor) -> Tensor:
    """grad_f -= (grad_f·w_f / ||w_f||²) w_f for every row, in place."""
    coef = (grad_FD * W_FD).sum(1) / (W_FD * W_FD).sum(1).clamp_min(1e-12)
    return grad_FD.sub_(coef[:, None] * W_FD)


class JumpReLUFn(torch.autograd.Function):
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


class StepFn(torch.autograd.Function):
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


def batch_topk_flat(pre_BF: Tensor, n: int) -> tuple[Tensor, Tensor]:
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


def argsort_1d(keys: Tensor) -> Tensor:
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


def sort_rows_for_csr(idx_BK: Tensor, vals_BK: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row's column indices (with their values) where the backend needs it.

    PyTorch's CSR invariants ask for sorted columns within a row and cuSPARSE may rely on it; the
    CPU sampled_addmm kernel is a plain per-pair loop that does not, and on CPU the sort of a
    [4096, 256] AuxK block costs more than the sparse products themselves.
    """
    if idx_BK.device.type == "cpu":
        return idx_BK, vals_BK
    idx_BK, order = idx_BK.sort(dim=1)
    return idx_BK, vals_BK.gather(1, order)


def pairs_from_flat(flat_idx: Tensor, n_rows: int, n_features: int) -> Pairs:
    """CSR pairs from ascending flat indices into a [B, F] matrix."""
    rows = flat_idx // n_features
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=flat_idx.device)
    crow[1:] = feature_counts(rows, n_rows).cumsum(0)
    return Pairs(crow, flat_idx % n_features, n_rows, n_features)


def row_topk_pairs(pre_BF: Tensor, k: int) -> tuple[Pairs, Tensor]:
    """The k largest pre-activations of every row, as (pairs, values [B·k]) (TopK)."""
    n_rows = pre_BF.shape[0]
    sel, idx = pre_BF.topk(k, dim=1, sorted=False)
    idx, sel = sort_rows_for_csr(idx, sel)
    crow = torch.arange(0, n_rows * k + 1, k, device=pre_BF.device)
    return Pairs(crow, idx.reshape(-1), n_rows, pre_BF.shape[1], k=k), sel.reshape(-1)


def threshold_pairs(pre_BF: Tensor, threshold: Tensor) -> tuple[Pairs, Tensor]:
    """Every pre-activation above `threshold`, as (pairs, values) (BatchTopK at inference)."""
    flat_idx = (pre_BF > threshold).reshape(-1).nonzero().squeeze(1)
    pairs = pairs_from_flat(flat_idx, pre_BF.shape[0], pre_BF.shape[1])
    return pairs, pre_BF.reshape(-1)[flat_idx]
