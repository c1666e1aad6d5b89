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

Selectivity. A unit is more selective the heavier the tail of what it reads from the layer,
scored as the excess kurtosis of its response over held-out vectors (scale- and offset-free;
sparse, single-cause directions have heavy tails and mixtures of independent causes lighter ones,
as in ICA). Kurtosis also rises with a threshold alone (a ReLU at 0, 1 and 2σ of a Gaussian gives
2.4, 20 and 193), so a neuron's post-ReLU channel against a feature's unthresholded
pre-activation is tilted towards the neuron, and a feature reading two rectified channels looks
less selective whatever it means. The comparison is therefore made like with like: for each
(neuron, own feature) pair, both are rectified at the threshold that lets them fire at the same
rate, the neuron's own (matched_comparison). For the neuron that needs no pre-ReLU value: at a
rate no higher than its own the threshold t is >= 0 and ReLU(ReLU(z) - t) = ReLU(z - t), so its
cached post-ReLU channel gives exactly the score of its pre-ReLU value rectified at that rate. (The concatenated mixed3a/mixed3b outputs have no single pre-ReLU tap, and the
cache holds the post-ReLU vectors, so this is the form that is exact for every layer.) The
unmatched score stays in the report under `unmatched`, for comparison.

For neuron d, its *own* features are the ones with share >= min_share (at most top_k). The
neuron's score is the fraction of them more selective than it (a tie, as for an exact copy,
counts half); the report gives the mean over neurons and P(feature > neuron) over every pair.
Two nulls sit beside it. A random dictionary matched on firing rate (each random direction
fires at the rate of one SAE feature): when the neurons are an arbitrary rotation of the causes
it scores about 0.5, and a dictionary of the causes clearly above. And planted rectified
neurons of known mixtures (tests/census/test_polysemantic.py): a feature that reads one cause of
a two-cause neuron scores more selective, a copy of a one-cause neuron ties, and a feature
mixing two one-cause neurons scores less selective.
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
    """Per neuron, its features with share >= min_share, largest first (at most top_k); a
    feature with no share at all never counts, even with min_share 0."""
    k = min(top_k, share_FD.shape[0])
    top = share_FD.topk(k, dim=0)
    out = []
    for d in range(share_FD.shape[1]):
        out.append([(int(f), float(s)) for f, s in zip(top.indices[:, d].tolist(),
                                                       top.values[:, d].tolist())
                    if s >= min_share and s > 0])
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


def firing_rate(v_NU: torch.Tensor) -> torch.Tensor:
    """Fraction of vectors on which each unit is above zero [U] (its natural firing rate)."""
    return (v_NU > 0).double().mean(0).float()


def rate_threshold(v_NU: torch.Tensor, rate_U: torch.Tensor) -> torch.Tensor:
    """Per column, the smallest of its round(rate · N) largest values [U] (the largest value
    for rate 0, so that nothing fires). Rectifying at it, ReLU(v - t), keeps the order and gaps
    of the top values: a post-ReLU channel at its own rate gives its pre-ReLU value's result."""
    n = v_NU.shape[0]
    n_top = (rate_U.double() * n).round().long().clamp(1, n) - 1
    top = v_NU.sort(dim=0, descending=True).values
    return top.gather(0, n_top[None, :].to(top.device))[0]


def matched_kurtosis(v_NU: torch.Tensor, rate_U: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Excess kurtosis [U] of each column rectified at the threshold its `rate` exceeds:
    kurtosis(ReLU(v - t)), where a fraction `rate` of the vectors lies above t. Two units scored
    at the same rate carry the same threshold's share of kurtosis, so what remains is the shape of
    their top responses. On a post-ReLU channel at a rate no higher than its own, t >= 0 and
    ReLU(ReLU(z) - t) = ReLU(z - t): the score is exactly that of its pre-ReLU value z."""
    out = []
    for i in range(0, v_NU.shape[1], chunk):
        c = v_NU[:, i:i + chunk].double()
        t = rate_threshold(c, rate_U[i:i + chunk])
        out.append(kurtosis((c - t).clamp_min(0.0), chunk=chunk))
    return torch.cat(out) if out else torch.zeros(0)


def matched_comparison(acts_ND: torch.Tensor, pre_NF: torch.Tensor, rate_D: torch.Tensor,
                       rate_F: torch.Tensor, own: list[list[tuple[int, float]]],
                       rtol: float = 1e-4) -> dict:
    """selectivity_comparison made fair: each (neuron d, own feature f) pair is scored at one
    stage and one firing rate. Both units are rectified so as to fire at the neuron's natural
    rate q = rate_d (the neuron: its post-ReLU channel as it is, exactly its pre-ReLU value
    rectified; the feature: its pre-activation, rectified there) and scored by
    matched_kurtosis. The neuron's own rate is the widest view of it the post-ReLU channel
    gives; a rarer common rate would show only the top of both, where the shape of the
    strongest responses (not how many causes drive them) decides. A tie (equal within rtol:
    a copy) counts half a win. `rate_F` is unused by the score itself (the feature's rate is
    reported). Returns
    per_neuron fractions, their mean, P(feature > neuron) over pairs, and each pair's
    (neuron kurtosis, feature kurtosis, rate)."""
    pairs = [(d, f) for d, feats in enumerate(own) for f, _ in feats]
    if not pairs:
        return {"per_neuron": [None] * len(own), "mean_frac_more_selective": None,
                "p_pair_feature_more_selective": None, "n_neurons_scored": 0, "n_pairs": 0,
                "pairs": {}}
    d_idx = torch.tensor([d for d, _ in pairs])
    f_idx = torch.tensor([f for _, f in pairs])
    q_P = rate_D[d_idx].clone()
    k_n = matched_kurtosis(acts_ND[:, d_idx], q_P)
    k_f = matched_kurtosis(pre_NF[:, f_idx], q_P)
    scored = {}
    for (d, f), kn, kf, q in zip(pairs, k_n.tolist(), k_f.tolist(), q_P.tolist()):
        scored[(d, f)] = (kn, kf, q)
    per, wins, n_pairs = [], 0.0, 0
    for d, feats in enumerate(own):
        vals = [scored[(d, f)] for f, _ in feats]
        vals = [(kn, kf) for kn, kf, _ in vals if math.isfinite(kn) and math.isfinite(kf)]
        if not vals:
            per.append(None)
            continue
        w = sum(0.5 if abs(kf - kn) <= rtol * max(abs(kf), abs(kn)) else float(kf > kn)
                for kn, kf in vals)
        per.append(w / len(vals))
        wins += w
        n_pairs += len(vals)
    done = [p for p in per if p is not None]
    return {"per_neuron": per, "mean_frac_more_selective": float(np.mean(done)) if done else None,
            "p_pair_feature_more_selective": wins / n_pairs if n_pairs else None,
            "n_neurons_scored": len(done), "n_pairs": n_pairs, "pairs": scored}


def _top_distinct(resp_N: torch.Tensor, groups_N: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest responses, at most one per group (e.g. per image)."""
    order = resp_N.argsort(descending=True)
    _, first = np.unique(groups_N[order].numpy(), return_index=True)
    return order[torch.from_numpy(np.sort(first)[:n])]


def exemplar_coherence(resp_NU: torch.Tensor, emb_NE: torch.Tensor, n_top: int = 16,
                       groups_N: torch.Tensor | None = None) -> torch.Tensor:
    """A selectivity score that does not depend on the activation's shape [U]: the mean pairwise
    cosine, in an embedding (e.g. a later layer of the same network at the same positions), of
    each unit's n_top most responsive vectors, the embedding centred on its mean over all
    vectors. It reads only the ranking of the responses, so any monotone map (a ReLU, a
    threshold below the top n_top, a scale) leaves it unchanged. A unit whose top exemplars are
    one kind of thing scores high; one answering two unrelated kinds about half as high.
    `groups_N` (e.g. each vector's image) allows at most one exemplar per group, so that
    neighbouring positions of one photo do not make every unit look coherent. NaN for a unit
    with fewer than two exemplars."""
    e = emb_NE.double() - emb_NE.double().mean(0)
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = min(int(n_top), resp_NU.shape[0])
    if n < 2:
        raise ValueError(f"n_top={n_top} leaves fewer than two exemplars; use at least 2")
    if groups_N is None:
        idx = resp_NU.topk(n, dim=0).indices  # [n, U]
        s_UE = e[idx].sum(0)
        return (((s_UE ** 2).sum(1) - n) / (n * (n - 1))).float()
    out = torch.full((resp_NU.shape[1],), float("nan"))
    for u in range(resp_NU.shape[1]):
        idx = _top_distinct(resp_NU[:, u], groups_N, n)
        m = len(idx)
        if m >= 2:
            out[u] = float(((e[idx].sum(0) ** 2).sum() - m) / (m * (m - 1)))
    return out


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
        coh = [r["frac_features_more_coherent"] for r in rows
               if keep(len(r.get("features") or []))
               and r.get("frac_features_more_coherent") is not None]
        if coh:  # the exemplar score, where the run was evaluated with it
            out[f"frac_more_coherent_{name}"] = float(np.mean(coh))
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


def exemplar_comparison(acts_ND: torch.Tensor, pre_NF: torch.Tensor,
                        own: list[list[tuple[int, float]]], emb_NE: torch.Tensor,
                        groups_N: torch.Tensor | None = None, n_top: int = 16) -> dict:
    """The exemplar score of every neuron and of every own feature (NaN for the others), and
    the fraction of each neuron's own features whose exemplars are more coherent than its own
    (selectivity_comparison's fields)."""
    coh_n = exemplar_coherence(acts_ND, emb_NE, n_top, groups_N)
    coh_f = torch.full((pre_NF.shape[1],), float("nan"))
    used = sorted({f for feats in own for f, _ in feats})
    if used:
        coh_f[used] = exemplar_coherence(pre_NF[:, used], emb_NE, n_top, groups_N)
    return {**selectivity_comparison(coh_n, coh_f, own), "neurons": coh_n, "features": coh_f,
            "used": used}


def _exemplar_summary(ex: dict, exemplars: dict) -> dict:
    """polysemantic.json's summary of exemplar_comparison's result."""
    return {"score": "mean pairwise cosine of a unit's top held-out exemplars (one per image) "
                     "in a later layer's embedding at their positions; reads only the ranking",
            "layer": exemplars.get("layer"), "n_top": exemplars.get("n_top", 16),
            "mean_frac_own_features_more_coherent": ex["mean_frac_more_selective"],
            "p_pair_feature_more_coherent": ex["p_pair_feature_more_selective"],
            "coherence": {"neurons": _dist(ex["neurons"]),
                          "features": _dist(ex["features"][ex["used"]])}}


def polysemantic_report(acts_ND: torch.Tensor, codes_NF: torch.Tensor, pre_NF: torch.Tensor,
                        recon_ND: torch.Tensor, dec_FD: torch.Tensor, scale: float = 1.0,
                        top_k: int = 5, min_share: float = 0.05, n_list: int = 20,
                        top_frac: float = 0.001, baseline: dict | None = None,
                        exemplars: dict | None = None) -> dict:
    """Neurons decomposed into features, and neuron-vs-feature selectivity (JSON-able).

    acts: raw held-out vectors; codes/pre: the SAE's codes and pre-activations on them; recon:
    its reconstruction; dec: decoder rows [F, D]. The comparison is matched_comparison's (one
    stage, one firing rate); the unmatched kurtosis (neuron channel against feature
    pre-activation, tilted towards neurons) stays beside it for comparison. `baseline`, when
    given, is the same fair comparison for a rate-matched random dictionary, reported beside.
    `exemplars`, when given, holds `emb` [N, E] (a later layer at each vector's position),
    optional `groups` [N] (its image), `n_top` and `layer`: the exemplar score is added.
    """
    dec = neuron_decomposition(codes_NF, dec_FD, scale)
    r2 = neuron_r2(acts_ND, recon_ND)
    k_n, k_f = kurtosis(acts_ND), kurtosis(pre_NF)
    rate_n, rate_f = firing_rate(acts_ND), firing_rate(codes_NF)
    tm_n, tm_f = top_mass(acts_ND, top_frac), top_mass(codes_NF, top_frac)
    own = own_features(dec["share"], min_share, top_k)
    cmp = matched_comparison(acts_ND, pre_NF, rate_n, rate_f, own)
    unmatched = selectivity_comparison(k_n, k_f, own)
    ex = None if exemplars is None else exemplar_comparison(
        acts_ND, pre_NF, own, exemplars["emb"], exemplars.get("groups"),
        exemplars.get("n_top", 16))
    rows = []
    for d in range(acts_ND.shape[1]):
        feats = []
        for f, s in own[d]:
            kn, kf, q = cmp["pairs"][(d, f)]
            feats.append({"feature": f, "share": round(s, 4),
                          "contribution": float(dec["contribution"][f, d]),
                          "kurtosis": _num(k_f[f]), "rate": float(rate_f[f]),
                          "matched_rate": q, "kurtosis_matched": _num(kf),
                          "neuron_kurtosis_matched": _num(kn), "top_mass": _num(tm_f[f]),
                          **({"coherence": _num(ex["features"][f])} if ex else {})})
        rows.append({"neuron": d, "n_effective_features": float(dec["n_effective"][d]),
                     "share_sum": round(sum(x["share"] for x in feats), 4),
                     "negative_frac": float(dec["negative_frac"][d]), "r2": _num(r2[d]),
                     "kurtosis": _num(k_n[d]), "rate": float(rate_n[d]),
                     "top_mass": _num(tm_n[d]), "features": feats,
                     "frac_features_more_selective": cmp["per_neuron"][d],
                     **({"coherence": _num(ex["neurons"][d]),
                         "frac_features_more_coherent": ex["per_neuron"][d]} if ex else {})})
    order = sorted((r for r in rows if r["r2"] is not None and r["r2"] > 0.5),
                   key=lambda r: -r["n_effective_features"])
    summary = {
        "selectivity": "excess kurtosis of ReLU(v - t) with t set so that both units of a pair "
                       "fire at the neuron's own firing rate (neuron: its post-ReLU channel, "
                       "exact for its pre-ReLU value; feature: its encoder pre-activation); "
                       "ties count half",
        "min_share": min_share, "top_k": top_k, "n_vectors": int(acts_ND.shape[0]),
        "mean_frac_own_features_more_selective": cmp["mean_frac_more_selective"],
        "p_pair_feature_more_selective": cmp["p_pair_feature_more_selective"],
        "n_neurons_scored": cmp["n_neurons_scored"],
        "unmatched": {"selectivity": "excess kurtosis of the neuron's channel against the "
                                     "feature's pre-activation (tilted towards neurons)",
                      "mean_frac_own_features_more_selective":
                          unmatched["mean_frac_more_selective"],
                      "p_pair_feature_more_selective":
                          unmatched["p_pair_feature_more_selective"]},
        "kurtosis": {"neurons": _dist(k_n), "features": _dist(k_f)},
        "firing_rate": {"neurons": _dist(rate_n), "features": _dist(rate_f)},
        "top_mass_codes": {"neurons": _dist(tm_n), "features": _dist(tm_f), "top_frac": top_frac},
        "r2": _dist(r2), "n_effective_features": _dist(dec["n_effective"]),
        "copies_vs_splits": split_selectivity(rows),
    }
    if ex is not None:
        summary["exemplars"] = _exemplar_summary(ex, exemplars)
    if baseline is not None:
        summary["random_dictionary"] = {
            "mean_frac_own_features_more_selective": baseline["mean_frac_more_selective"],
            "p_pair_feature_more_selective": baseline["p_pair_feature_more_selective"],
            "matched": "firing rates: the SAE's own, one per random feature"}
        m, b = cmp["mean_frac_more_selective"], baseline["mean_frac_more_selective"]
        summary["excess_over_random"] = (m - b) if m is not None and b is not None else None
    return {"summary": summary, "most_polysemantic": order[:n_list], "neurons": rows}


def random_dictionary_baseline(acts_ND: torch.Tensor, rate_F: torch.Tensor, seed: int = 0,
                               min_share: float = 0.0, top_k: int = 5,
                               chunk: int = 512) -> dict:
    """The same fair comparison for a random dictionary matched on firing rate: unit directions
    as encoder and decoder, pre-activations the centred projections, and feature f's code
    ReLU(pre - t_f) with t_f set so that it fires at rate_F[f] (the SAE's own rates). A random
    dictionary spreads every neuron over many features, so its own features are its top_k by
    share (min_share 0): otherwise no neuron would have any and the baseline would be undefined.
    Codes are never held whole: the shares need only their means."""
    g = torch.Generator().manual_seed(int(seed))
    d = acts_ND.shape[1]
    n_features = len(rate_F)
    dirs_FD = torch.randn(n_features, d, generator=g, dtype=torch.float64)
    dirs_FD /= dirs_FD.norm(dim=1, keepdim=True)
    x = acts_ND.float() - acts_ND.float().mean(0)
    dirs = dirs_FD.float()
    mean_F = torch.zeros(n_features, dtype=torch.float64)
    for i in range(0, n_features, chunk):
        pre = x @ dirs[i:i + chunk].T
        t = rate_threshold(pre, rate_F[i:i + chunk])
        mean_F[i:i + chunk] = (pre - t).clamp_min(0).double().mean(0)
    share = neuron_decomposition(mean_F[None, :], dirs_FD)["share"]
    own = own_features(share, min_share, top_k)
    used = sorted({f for feats in own for f, _ in feats})  # only the columns compared
    col = {f: i for i, f in enumerate(used)}
    own = [[(col[f], s) for f, s in feats] for feats in own]
    out = matched_comparison(acts_ND, x @ dirs[used].T, firing_rate(acts_ND), rate_F[used], own)
    out["pairs"] = {(d, used[i]): v for (d, i), v in out["pairs"].items()}
    return out


@torch.no_grad()
def decompose_run(sae, acts_ND: torch.Tensor, ccfg, batch_size: int, device, path: Path,
                  header: dict, exemplars: dict | None = None) -> dict:
    """Neurons decomposed into this SAE's features, and neuron vs feature selectivity with a
    random dictionary's score beside it, on held-out vectors `acts_ND`. Writes the full report
    (with `header`, e.g. the run and layer) to `path` and returns its headline numbers.
    `ccfg` is the curves config (polysemantic_min_share, selectivity_top_frac); `exemplars`
    adds the exemplar score (see polysemantic_report)."""
    codes, pre, recon = [], [], []
    for x in track(acts_ND.split(batch_size), "evaluate polysemantic", len(acts_ND), "vec",
                   size=len):
        x = x.to(device)
        c = sae.encode(x)
        codes.append(c.cpu())
        pre.append(sae.pre_acts(x).cpu())
        recon.append(sae.decode(c).cpu())
    codes_NF, pre_NF, recon_ND = torch.cat(codes), torch.cat(pre), torch.cat(recon)
    base = random_dictionary_baseline(acts_ND, firing_rate(codes_NF))
    res = polysemantic_report(acts_ND, codes_NF, pre_NF, recon_ND, sae.W_dec.detach().cpu(),
                              scale=float(getattr(sae, "input_scale", 1.0)),
                              min_share=ccfg.polysemantic_min_share,
                              top_frac=ccfg.selectivity_top_frac, baseline=base,
                              exemplars=exemplars)
    write_json(path, {**header, "n_vectors": len(acts_ND), **res})
    s = res["summary"]
    return {"path": str(path), "n_vectors": len(acts_ND),
            "frac_more_selective": s["mean_frac_own_features_more_selective"],
            "frac_more_selective_random": s["random_dictionary"][
                "mean_frac_own_features_more_selective"],
            "excess_over_random": s["excess_over_random"],
            "frac_more_selective_unmatched": s["unmatched"][
                "mean_frac_own_features_more_selective"],
            "median_kurtosis_neurons": s["kurtosis"]["neurons"].get("p50"),
            "median_kurtosis_features": s["kurtosis"]["features"].get("p50"),
            "frac_more_coherent": (s.get("exemplars") or {}).get(
                "mean_frac_own_features_more_coherent")}
