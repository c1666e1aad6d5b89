"""Polysemantic neurons split into SAE features, with a selectivity comparison that is well
defined (pure functions of activations, codes and the SAE's weights).

Decomposition. A neuron's reconstructed activation above the decoder bias is
Σ_f c_f W_dec[f, d]. Feature f's *contribution* to neuron d is mean_n(c_nf) W_dec[f, d] (raw
units). Contributions can be negative (a feature that inhibits the neuron); a feature's **share**
of the neuron is its positive contribution over the sum of positive contributions, so shares lie
in [0, 1] and sum to 1 over features (0 for a neuron no feature drives). `negative_frac` is the
part of the absolute contribution mass that is inhibitory, and `r2` is the neuron's own
reconstruction R² (1 - residual variance / variance) on the same vectors, so a neuron whose
decomposition is poor says so.

Selectivity. A unit is more selective the heavier the tail of what it reads from the layer. Both
a neuron and a feature read a *linear projection* of the same activation vector (the neuron its
channel axis, the feature its encoder column: the pre-activation, before any ReLU or TopK), so
both are scored the same way: the excess kurtosis of that projection over held-out vectors
(scale- and offset-free; sparse, single-cause directions have heavy tails and mixtures of
independent causes have lighter ones, as in ICA). Scoring the pre-activation keeps the comparison
free of the sparsity the SAE imposes by construction: scoring TopK codes would call any sparse
code "selective".

For neuron d, its *own* features are the ones with share >= min_share (at most top_k). The
neuron's score is the fraction of them whose kurtosis exceeds the neuron's; the report gives the
mean over neurons and, over every (neuron, own feature) pair, P(feature > neuron). When the
neurons are an arbitrary rotation of the causes (no privileged basis), a random dictionary's
directions are exchangeable with the neurons and score 0.5; a dictionary of the causes scores
clearly above (tests/test_polysemantic.py). On a real layer whose neuron basis *is* privileged
the random-dictionary baseline falls below 0.5, so it is reported beside every SAE.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from sae_vision.core import track, write_json


def neuron_decomposition(codes_NF: torch.Tensor, dec_FD: torch.Tensor,
                         scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Contributions [F, D] (raw units), shares [F, D] in [0, 1], negative_frac and
    n_effective [D] (participation ratio of the shares)."""
    mean_F = codes_NF.double().mean(0)
    contrib_FD = mean_F[:, None] * dec_FD.double() / float(scale)
    pos, neg = contrib_FD.clamp_min(0), (-contrib_FD).clamp_min(0)
    pos_D, neg_D = pos.sum(0), neg.sum(0)
    share_FD = pos / pos_D.clamp_min(1e-30)
    n_eff = torch.where(pos_D > 0, 1.0 / (share_FD ** 2).sum(0).clamp_min(1e-30),
                        torch.zeros_like(pos_D))
    return {"contribution": contrib_FD.float(), "share": share_FD.float(), "mean_code":
            mean_F.float(), "negative_frac": (neg_D / (pos_D + neg_D).clamp_min(1e-30)).float(),
            "n_effective": n_eff.float()}


def neuron_r2(acts_ND: torch.Tensor, recon_ND: torch.Tensor) -> torch.Tensor:
    """Per-neuron reconstruction R² [D] (NaN for a constant neuron)."""
    a, r = acts_ND.double(), recon_ND.double()
    var = ((a - a.mean(0)) ** 2).sum(0)
    res = ((a - r) ** 2).sum(0)
    return torch.where(var > 0, 1.0 - res / var.clamp_min(1e-30),
                       torch.full_like(var, float("nan"))).float()


def kurtosis(x_NK: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Excess kurtosis of every column [K] (NaN for a constant column); float64, in column
    chunks so a wide dictionary never needs a float64 copy of the whole matrix."""
    out = []
    for i in range(0, x_NK.shape[1], chunk):
        c = x_NK[:, i:i + chunk].double()
        c = c - c.mean(0)
        m2 = (c ** 2).mean(0)
        m4 = (c ** 4).mean(0)
        out.append(torch.where(m2 > 0, m4 / m2.clamp_min(1e-300) ** 2 - 3.0,
                               torch.full_like(m2, float("nan"))))
    return torch.cat(out).float()


def top_mass(acts_NU: torch.Tensor, top_frac: float = 0.001) -> torch.Tensor:
    """Share of each unit's rectified activation mass on its top `top_frac` examples [U]."""
    a = acts_NU.double().clamp_min(0.0)
    k = max(1, int(round(top_frac * a.shape[0])))
    total = a.sum(0)
    return torch.where(total > 0, a.topk(k, dim=0).values.sum(0) / total.clamp_min(1e-30),
                       torch.full_like(total, float("nan"))).float()


def own_features(share_FD: torch.Tensor, min_share: float = 0.05,
                 top_k: int = 5) -> list[list[tuple[int, float]]]:
    """Per neuron, its features with share >= min_share, largest first (at most top_k)."""
    k = min(top_k, share_FD.shape[0])
    top = share_FD.topk(k, dim=0)
    out = []
    for d in range(share_FD.shape[1]):
        out.append([(int(f), float(s)) for f, s in zip(top.indices[:, d].tolist(),
                                                       top.values[:, d].tolist())
                    if s >= min_share])
    return out


def selectivity_comparison(sel_neurons_D: torch.Tensor, sel_features_F: torch.Tensor,
                           own: list[list[tuple[int, float]]]) -> dict:
    """Per-neuron fraction of own features more selective than the neuron; its mean; and
    P(feature > neuron) over all (neuron, own feature) pairs."""
    per, wins, pairs = [], 0, 0
    for d, feats in enumerate(own):
        sn = float(sel_neurons_D[d])
        vals = [float(sel_features_F[f]) for f, _ in feats]
        vals = [v for v in vals if math.isfinite(v)]
        if not math.isfinite(sn) or not vals:
            per.append(None)
            continue
        w = sum(v > sn for v in vals)
        per.append(w / len(vals))
        wins += w
        pairs += len(vals)
    scored = [p for p in per if p is not None]
    return {"per_neuron": per,
            "mean_frac_more_selective": float(np.mean(scored)) if scored else None,
            "p_pair_feature_more_selective": wins / pairs if pairs else None,
            "n_neurons_scored": len(scored), "n_pairs": pairs}


def split_selectivity(rows: list[dict]) -> dict:
    """The selectivity comparison separated into copies and splits, from polysemantic_report's
    per-neuron rows. A neuron with one own feature is *copied* (a sharpened copy can read its
    channel more selectively, which is not a split); one with two or more is *split*, the
    paper's claim being that those features are more monosemantic than the neuron. Each group's
    score is the mean over its neurons of the fraction of own features more selective."""
    out: dict = {}
    for name, keep in (("split", lambda n: n >= 2), ("single", lambda n: n == 1)):
        scored = [r["frac_features_more_selective"] for r in rows
                  if keep(len(r.get("features") or []))
                  and r.get("frac_features_more_selective") is not None]
        out[f"n_neurons_{name}"] = len(scored)
        out[f"frac_more_selective_{name}"] = float(np.mean(scored)) if scored else None
    return out


def _dist(v: torch.Tensor) -> dict:
    v = v[torch.isfinite(v)].double()
    if len(v) == 0:
        return {"n": 0}
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    q = torch.quantile(v, torch.tensor(qs, dtype=torch.float64))
    return {"n": len(v), "mean": float(v.mean()),
            **{f"p{int(p * 100)}": float(x) for p, x in zip(qs, q)}}


def _num(v) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def polysemantic_report(acts_ND: torch.Tensor, codes_NF: torch.Tensor, pre_NF: torch.Tensor,
                        recon_ND: torch.Tensor, dec_FD: torch.Tensor, scale: float = 1.0,
                        top_k: int = 5, min_share: float = 0.05, n_list: int = 20,
                        top_frac: float = 0.001, baseline: dict | None = None) -> dict:
    """Neurons decomposed into features, and neuron-vs-feature selectivity (JSON-able).

    acts: raw held-out vectors; codes/pre: the SAE's codes and pre-activations on them; recon:
    its reconstruction; dec: decoder rows [F, D]. `baseline`, when given, is the same
    comparison for a random dictionary (`selectivity_comparison`'s output), reported beside.
    """
    dec = neuron_decomposition(codes_NF, dec_FD, scale)
    r2 = neuron_r2(acts_ND, recon_ND)
    k_n, k_f = kurtosis(acts_ND), kurtosis(pre_NF)
    tm_n, tm_f = top_mass(acts_ND, top_frac), top_mass(codes_NF, top_frac)
    own = own_features(dec["share"], min_share, top_k)
    cmp = selectivity_comparison(k_n, k_f, own)
    rows = []
    for d in range(acts_ND.shape[1]):
        feats = [{"feature": f, "share": round(s, 4),
                  "contribution": float(dec["contribution"][f, d]),
                  "kurtosis": _num(k_f[f]), "top_mass": _num(tm_f[f])} for f, s in own[d]]
        rows.append({"neuron": d, "n_effective_features": float(dec["n_effective"][d]),
                     "share_sum": round(sum(x["share"] for x in feats), 4),
                     "negative_frac": float(dec["negative_frac"][d]), "r2": _num(r2[d]),
                     "kurtosis": _num(k_n[d]), "top_mass": _num(tm_n[d]), "features": feats,
                     "frac_features_more_selective": cmp["per_neuron"][d]})
    order = sorted((r for r in rows if r["r2"] is not None and r["r2"] > 0.5),
                   key=lambda r: -r["n_effective_features"])
    summary = {
        "selectivity": "excess kurtosis of the unit's linear read-out (neuron: its channel; "
                       "feature: its encoder pre-activation)",
        "min_share": min_share, "top_k": top_k, "n_vectors": int(acts_ND.shape[0]),
        "mean_frac_own_features_more_selective": cmp["mean_frac_more_selective"],
        "p_pair_feature_more_selective": cmp["p_pair_feature_more_selective"],
        "n_neurons_scored": cmp["n_neurons_scored"],
        "kurtosis": {"neurons": _dist(k_n), "features": _dist(k_f)},
        "top_mass_codes": {"neurons": _dist(tm_n), "features": _dist(tm_f), "top_frac": top_frac},
        "r2": _dist(r2), "n_effective_features": _dist(dec["n_effective"]),
        "copies_vs_splits": split_selectivity(rows),
    }
    if baseline is not None:
        summary["random_dictionary"] = {
            "mean_frac_own_features_more_selective": baseline["mean_frac_more_selective"],
            "p_pair_feature_more_selective": baseline["p_pair_feature_more_selective"]}
        m, b = cmp["mean_frac_more_selective"], baseline["mean_frac_more_selective"]
        summary["excess_over_random"] = (m - b) if m is not None and b is not None else None
    return {"summary": summary, "most_polysemantic": order[:n_list], "neurons": rows}


def random_dictionary_baseline(acts_ND: torch.Tensor, n_features: int, k: int, seed: int = 0,
                               min_share: float = 0.0, top_k: int = 5) -> dict:
    """The same comparison for a random dictionary: unit directions as encoder and decoder,
    codes = TopK(ReLU(centred projections)) with the SAE's mean L0 as k. A random dictionary
    spreads every neuron over many features, so its own features are its top_k by share
    (min_share 0): otherwise no neuron would have any and the baseline would be undefined."""
    g = torch.Generator().manual_seed(int(seed))
    d = acts_ND.shape[1]
    dirs_FD = torch.randn(n_features, d, generator=g, dtype=torch.float64)
    dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
    x = acts_ND.float()
    pre = (x - x.mean(0)) @ dirs_FD.T.float()
    k = max(1, min(int(k), n_features))
    top = pre.clamp_min(0).topk(k, dim=1)
    codes = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
    share = neuron_decomposition(codes, dirs_FD)["share"]
    del codes
    return selectivity_comparison(kurtosis(acts_ND), kurtosis(pre),
                                  own_features(share, min_share, top_k))


@torch.no_grad()
def decompose_run(sae, acts_ND: torch.Tensor, ccfg, batch_size: int, device, path: Path,
                  header: dict) -> dict:
    """Neurons decomposed into this SAE's features, and neuron vs feature selectivity with a
    random dictionary's score beside it, on held-out vectors `acts_ND`. Writes the full report
    (with `header`, e.g. the run and layer) to `path` and returns its headline numbers.
    `ccfg` is the curves config (polysemantic_min_share, selectivity_top_frac)."""
    codes, pre, recon = [], [], []
    for x in track(acts_ND.split(batch_size), "evaluate polysemantic", len(acts_ND), "vec",
                   size=len):
        x = x.to(device)
        c = sae.encode(x)
        codes.append(c.cpu())
        pre.append(sae.pre_acts(x).cpu())
        recon.append(sae.decode(c).cpu())
    codes_NF, pre_NF, recon_ND = torch.cat(codes), torch.cat(pre), torch.cat(recon)
    l0 = float((codes_NF > 0).sum(1).float().mean())
    base = random_dictionary_baseline(acts_ND, codes_NF.shape[1], round(l0))
    res = polysemantic_report(acts_ND, codes_NF, pre_NF, recon_ND, sae.W_dec.detach().cpu(),
                              scale=float(getattr(sae, "input_scale", 1.0)),
                              min_share=ccfg.polysemantic_min_share,
                              top_frac=ccfg.selectivity_top_frac, baseline=base)
    write_json(path, {**header, "n_vectors": len(acts_ND), **res})
    s = res["summary"]
    return {"path": str(path), "n_vectors": len(acts_ND),
            "frac_more_selective": s["mean_frac_own_features_more_selective"],
            "frac_more_selective_random": s["random_dictionary"][
                "mean_frac_own_features_more_selective"],
            "excess_over_random": s["excess_over_random"],
            "median_kurtosis_neurons": s["kurtosis"]["neurons"].get("p50"),
            "median_kurtosis_features": s["kurtosis"]["features"].get("p50")}
