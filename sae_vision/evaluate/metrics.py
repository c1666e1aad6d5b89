"""Pure evaluation metrics for SAEs: reconstruction, feature health, splice, cross-seed stability.

Nothing here touches files, the network or W&B. The functions take tensors and return tensors or
plain numbers; the `*Stats` accumulators fold batches in float64 so an evaluation over millions
of vectors runs in bounded memory and gives the same numbers as one big batch would.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Vectors with a smaller norm are skipped by the cosine and L2-ratio averages (both undefined at 0).
NORM_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Reconstruction (one batch)


def mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """Mean squared error per element."""
    return float((x_BD.double() - x_hat_BD.double()).pow(2).mean())


def fvu(x_BD: torch.Tensor, x_hat_BD: torch.Tensor, mean_D: torch.Tensor | None = None) -> float:
    """Fraction of variance unexplained: ||x - x̂||² over ||x - mean||² (the mean-vector baseline)."""
    x = x_BD.double()
    mean = x.mean(0) if mean_D is None else mean_D.double()
    return float((x - x_hat_BD.double()).pow(2).sum() / (x - mean).pow(2).sum().clamp_min(1e-30))


def explained_variance(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> float:
    """1 - Var(x - x̂) / Var(x), summed over dims (unlike 1 - FVU, a constant offset is not error)."""
    x, r = x_BD.double(), x_BD.double() - x_hat_BD.double()
    return float(1 - (r - r.mean(0)).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def cosine_similarity(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """[B] cosine between each vector and its reconstruction."""
    return F.cosine_similarity(x_BD.double(), x_hat_BD.double(), dim=1, eps=NORM_EPS)


def l2_ratio(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """[B] ||x̂|| / ||x||: below 1 means shrinkage (the L1 penalty's signature)."""
    return x_hat_BD.double().norm(dim=1) / x_BD.double().norm(dim=1).clamp_min(NORM_EPS)


def l0(codes_BF: torch.Tensor) -> torch.Tensor:
    """[B] number of active (non-zero) features per vector."""
    return (codes_BF != 0).sum(1)


def topk_channels(x_BD: torch.Tensor, k: int, fill_D: torch.Tensor | None = None) -> torch.Tensor:
    """The neuron-basis code at L0 k: each vector keeps its k largest channels (the most active
    neurons) and every other channel is set to fill_D (zero when None; the channel mean for the
    mean-filled variant). k <= 0 keeps none; k >= D keeps the vector whole."""
    x = x_BD.double()
    fill = torch.zeros(x.shape[1], dtype=torch.float64) if fill_D is None else fill_D.double()
    out = fill.to(x.device).expand_as(x).clone()
    k = min(int(k), x.shape[1])
    if k > 0:
        idx = x.topk(k, dim=1).indices
        out.scatter_(1, idx, x.gather(1, idx))
    return out


def neuron_gain(fvu_neuron: float, fvu_sae: float) -> float:
    """How many times less variance the SAE leaves unexplained than the neuron basis at its L0
    (fvu_neuron / fvu_sae): above 1 the SAE beats keeping the top neurons; NaN when undefined."""
    if not (math.isfinite(fvu_neuron) and math.isfinite(fvu_sae)) or fvu_sae <= 0:
        return float("nan")
    return fvu_neuron / fvu_sae


# --------------------------------------------------------------------------------------------
# Feature health


def feature_density(fire_counts_F: torch.Tensor, n_vectors: int) -> torch.Tensor:
    """[F] fraction of vectors on which each feature is active."""
    return fire_counts_F.double() / max(int(n_vectors), 1)


def dead_dense(density_F: torch.Tensor, dense_threshold: float) -> dict:
    """Counts and fractions of dead (never active) and dense (> dense_threshold) features."""
    n = len(density_F)
    n_dead = int((density_F == 0).sum())
    n_dense = int((density_F > dense_threshold).sum())
    return {"n_dead": n_dead, "dead_frac": n_dead / max(n, 1),
            "n_dense": n_dense, "dense_frac": n_dense / max(n, 1)}


def log_density_histogram(density_F: torch.Tensor, n_vectors: int, n_bins: int = 40) -> dict:
    """log10 feature-density histogram of the live features; dead ones are counted apart.

    The lowest observable density is 1/n_vectors, so the bins span [log10(1/n), 0].
    """
    d = density_F.double().cpu().numpy()
    live = d[d > 0]
    lo = math.floor(math.log10(1.0 / max(int(n_vectors), 1)) * 4) / 4  # quarter-decade aligned
    lo = min(lo, float(np.log10(live.min()))) if len(live) else lo
    edges = np.linspace(lo, 0.0, n_bins + 1)
    counts, _ = np.histogram(np.log10(live), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "n_dead": int((d == 0).sum()),
            "n_live": int(len(live)), "n_vectors": int(n_vectors)}


# --------------------------------------------------------------------------------------------
# Downstream splice


def kl_divergence(logits_p_BC: torch.Tensor, logits_q_BC: torch.Tensor) -> torch.Tensor:
    """[B] KL(p || q) between the class distributions softmax(p) and softmax(q), in nats."""
    logp = torch.log_softmax(logits_p_BC.double(), dim=-1)
    logq = torch.log_softmax(logits_q_BC.double(), dim=-1)
    # Clamp: rounding can give -1e-17 for identical inputs; KL is never negative.
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def top1_agreement(logits_a_BC: torch.Tensor, logits_b_BC: torch.Tensor) -> torch.Tensor:
    """[B] 1.0 where both logit sets give the same top-1 class, else 0.0."""
    return (logits_a_BC.argmax(-1) == logits_b_BC.argmax(-1)).double()


def kl_recovered(kl_sae: float, kl_ablation: float) -> float:
    """Fraction of the ablation's KL gap recovered by the SAE: 1 - KL_sae / KL_ablation.

    1 means the splice is as good as the original network, 0 as bad as the ablation; negative
    means worse than ablating the layer. NaN when the ablation itself changes nothing.
    """
    if kl_ablation <= 0:
        return float("nan")
    return 1.0 - kl_sae / kl_ablation


# --------------------------------------------------------------------------------------------
# Cross-seed stability


def match_dictionaries(dec_a_FD: torch.Tensor, dec_b_FD: torch.Tensor,
                       threshold: float = 0.9) -> dict:
    """Hungarian matching of two decoders' atoms on cosine similarity (SciPy's solver).

    Returns the mean matched cosine, the share of matched atoms above `threshold`, and the
    assignment (rows of A, their partners in B). Unequal sizes match min(F_a, F_b) atoms.
    """
    from scipy.optimize import linear_sum_assignment

    a = F.normalize(dec_a_FD.detach().double().cpu(), dim=1, eps=NORM_EPS)
    b = F.normalize(dec_b_FD.detach().double().cpu(), dim=1, eps=NORM_EPS)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders live in different spaces: d={a.shape[1]} vs d={b.shape[1]}")
    cos_AB = (a @ b.T).numpy()
    rows, cols = linear_sum_assignment(cos_AB, maximize=True)
    matched = cos_AB[rows, cols]
    return {
        "mean_cosine": float(matched.mean()) if len(matched) else float("nan"),
        "frac_above": float((matched > threshold).mean()) if len(matched) else float("nan"),
        "threshold": threshold,
        "n_matched": int(len(matched)),
        "rows": rows.tolist(),
        "cols": cols.tolist(),
        "matched_cosine": matched.tolist(),
    }


# --------------------------------------------------------------------------------------------
# Streaming accumulators


class ReconstructionStats:
    """Folds (x, x̂) batches into MSE, FVU, explained variance, cosine and L2 ratio."""

    def __init__(self, d: int):
        self.n = 0
        self.n_nonzero = 0  # vectors with ||x|| > NORM_EPS (cosine, L2 ratio)
        self.sum_x_D = torch.zeros(d, dtype=torch.float64)
        self.sum_r_D = torch.zeros(d, dtype=torch.float64)
        self.sum_x2 = 0.0
        self.sum_r2 = 0.0
        self.sum_cos = 0.0
        self.sum_ratio = 0.0

    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        """Add one batch."""
        x = x_BD.detach().double().cpu()
        r = x - x_hat_BD.detach().double().cpu()
        self.n += len(x)
        self.sum_x_D += x.sum(0)
        self.sum_r_D += r.sum(0)
        self.sum_x2 += float(x.pow(2).sum())
        self.sum_r2 += float(r.pow(2).sum())
        ok = x.norm(dim=1) > NORM_EPS
        x_hat = x - r
        self.n_nonzero += int(ok.sum())
        self.sum_cos += float(cosine_similarity(x[ok], x_hat[ok]).sum())
        self.sum_ratio += float(l2_ratio(x[ok], x_hat[ok]).sum())

    def compute(self) -> dict:
        """The metrics over everything seen so far."""
        n, d = max(self.n, 1), len(self.sum_x_D)
        # Total variance about the mean: Σ||x||² - n·||mean||², in float64 for stability.
        var_x = self.sum_x2 - float(self.sum_x_D.pow(2).sum()) / n
        var_r = self.sum_r2 - float(self.sum_r_D.pow(2).sum()) / n
        return {
            "n_vectors": self.n,
            "mse": self.sum_r2 / (n * d),
            "fvu": self.sum_r2 / var_x if var_x > 0 else float("nan"),
            "explained_variance": 1 - var_r / var_x if var_x > 0 else float("nan"),
            "cosine": self.sum_cos / max(self.n_nonzero, 1),
            "l2_ratio": self.sum_ratio / max(self.n_nonzero, 1),
            "n_zero_vectors": self.n - self.n_nonzero,
        }


class SparsityStats:
    """Folds code batches into the L0 distribution and per-feature firing counts."""

    def __init__(self, n_features: int):
        self.n = 0
        self.fire_counts_F = torch.zeros(n_features, dtype=torch.int64)
        self.l0_hist = torch.zeros(n_features + 1, dtype=torch.int64)  # l0_hist[k]: vectors with L0=k

    def update(self, codes_BF: torch.Tensor) -> None:
        """Add one batch of codes."""
        active = codes_BF.detach() != 0
        self.n += len(active)
        self.fire_counts_F += active.sum(0).cpu().to(torch.int64)
        self.l0_hist += torch.bincount(active.sum(1).cpu(), minlength=len(self.l0_hist))

    def l0_summary(self) -> dict:
        """Mean L0, its standard deviation and quantiles."""
        h = self.l0_hist.double()
        k = torch.arange(len(h), dtype=torch.float64)
        n = max(float(h.sum()), 1.0)
        mean = float((h * k).sum() / n)
        std = float(((h * (k - mean) ** 2).sum() / n).sqrt())
        cdf = (h.cumsum(0) / n).numpy()
        q = {f"p{int(p * 100)}": int(np.searchsorted(cdf, p - 1e-12)) for p in
             (0.05, 0.25, 0.5, 0.75, 0.95)}
        return {"l0": mean, "l0_std": std, "l0_max": int(k[h > 0].max()) if h.sum() else 0,
                "l0_quantiles": q}

    def health(self, dense_threshold: float) -> dict:
        """Dead/dense counts and density summary over everything seen so far."""
        density = feature_density(self.fire_counts_F, self.n)
        live = density[density > 0]
        return {
            "n_vectors": self.n,
            "n_features": len(density),
            **dead_dense(density, dense_threshold),
            "dense_threshold": dense_threshold,
            "median_log10_density": float(live.log10().median()) if len(live) else float("nan"),
        }

    def density(self) -> torch.Tensor:
        """[F] firing frequencies."""
        return feature_density(self.fire_counts_F, self.n)


class SpliceStats:
    """Folds logits of the original and spliced networks into mean KL and top-1 agreement."""

    def __init__(self):
        self.n = 0
        self.sum_kl: dict[str, float] = {}
        self.sum_agree: dict[str, float] = {}

    def update(self, logits_orig_BC: torch.Tensor, variants: dict[str, torch.Tensor]) -> None:
        """Add one batch: the original logits and each variant's logits (e.g. sae, zero, mean)."""
        self.n += len(logits_orig_BC)
        for name, logits in variants.items():
            self.sum_kl[name] = self.sum_kl.get(name, 0.0) + float(
                kl_divergence(logits_orig_BC, logits).sum())
            self.sum_agree[name] = self.sum_agree.get(name, 0.0) + float(
                top1_agreement(logits_orig_BC, logits).sum())

    def compute(self, reference: str = "sae") -> dict:
        """Mean KL and agreement per variant, and the KL gap `reference` recovers vs each other."""
        n = max(self.n, 1)
        out: dict = {"n_images": self.n}
        for name in self.sum_kl:
            out[f"kl_{name}"] = self.sum_kl[name] / n
            out[f"agreement_{name}"] = self.sum_agree[name] / n
        if reference in self.sum_kl:
            for name in self.sum_kl:
                if name != reference:
                    out[f"frac_recovered_{name}"] = kl_recovered(out[f"kl_{reference}"],
                                                                 out[f"kl_{name}"])
        return out
