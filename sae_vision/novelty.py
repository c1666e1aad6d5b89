"""Is an SAE curve feature a new detector, or a copy of one neuron? (pure functions)

A feature that passes the curve census may simply be one of the layer's own neurons, written
again: its decoder row (what it writes) or its encoder column (what it reads) points along one
channel axis. Such a feature cannot fill a gap that the neurons leave, whatever its measured
preferred orientation (a sharpened copy can prefer an orientation 5-20° away from its neuron's,
because the encoder subtracts a little of the neighbouring curve neurons).

For every feature and for both of its directions (decoder row W_dec[f], encoder column
W_enc[:, f]) this module records:
- `top1_neuron`, `top1_cos`: the channel axis with the largest |cosine| to the direction
  (the signed cosine is kept);
- `top1_share`, `top3_share`: the share of the direction's squared norm on its top-1 and top-3
  channels (top1_share = top1_cos²);
- whether that neuron is itself a census curve detector, and its preferred orientation.

A census feature is a **copy** when max(decoder top1_share, encoder top1_share) >=
`max_share` (`CurvesConfig.copy_min_share`, default 0.6: |cos| >= 0.77 with one axis on either
side); otherwise it is **new**. Only new detectors count as filling orientation gaps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def axis_alignment(dirs_FD: np.ndarray, top: int = 3) -> dict[str, np.ndarray]:
    """Per direction (rows of [F, D]): nearest channel axis, its signed cosine, top-1/3 shares."""
    w = np.asarray(dirs_FD, dtype=np.float64)
    n2 = np.maximum((w * w).sum(1, keepdims=True), 1e-30)
    share = w * w / n2
    order = np.argsort(-share, axis=1)[:, :top]
    rows = np.arange(len(w))[:, None]
    top_share = share[rows, order]
    top1 = order[:, 0]
    return {
        "top1_neuron": top1,
        "top1_cos": w[np.arange(len(w)), top1] / np.sqrt(n2[:, 0]),
        "top1_share": top_share[:, 0],
        "top3_share": top_share.sum(1),
        "top_neurons": order,
        "top_shares": top_share,
    }


def is_copy(dec_align: Mapping, enc_align: Mapping | None, max_share: float) -> np.ndarray:
    """[F] True where the decoder or the encoder direction is mostly one channel axis."""
    share = np.asarray(dec_align["top1_share"], dtype=np.float64)
    if enc_align is not None:
        share = np.maximum(share, np.asarray(enc_align["top1_share"], dtype=np.float64))
    return share >= float(max_share)


def novelty_records(units: Sequence[int], dec_align: Mapping, enc_align: Mapping | None,
                    neuron_orientation: Mapping[int, float], max_share: float) -> list[dict]:
    """One JSON-able record per feature in `units`: both alignments and its class."""
    copy = is_copy(dec_align, enc_align, max_share)
    out = []
    for f in units:
        rec: dict = {"feature": int(f), "class": "copy" if copy[f] else "new"}
        for side, al in (("decoder", dec_align), ("encoder", enc_align)):
            if al is None:
                continue
            n = int(al["top1_neuron"][f])
            rec[side] = {
                "neuron": n,
                "cos": round(float(al["top1_cos"][f]), 4),
                "top1_share": round(float(al["top1_share"][f]), 4),
                "top3_share": round(float(al["top3_share"][f]), 4),
                "top_neurons": [int(x) for x in al["top_neurons"][f]],
                "top_shares": [round(float(x), 4) for x in al["top_shares"][f]],
                "neuron_is_detector": n in neuron_orientation,
                "neuron_orientation": (float(neuron_orientation[n]) if n in neuron_orientation
                                       else None),
            }
        out.append(rec)
    return out


def split_by_class(records: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(copies, new) feature ids of novelty records."""
    copies = [r["feature"] for r in records if r["class"] == "copy"]
    new = [r["feature"] for r in records if r["class"] == "new"]
    return copies, new


def alignment_summary(dec_align: Mapping, enc_align: Mapping | None) -> dict:
    """Distribution of top-1 shares over every feature of the dictionary (JSON-able)."""
    out = {}
    for side, al in (("decoder", dec_align), ("encoder", enc_align)):
        if al is None:
            continue
        s = np.asarray(al["top1_share"], dtype=np.float64)
        q = np.quantile(s, [0.1, 0.25, 0.5, 0.75, 0.9]) if len(s) else [np.nan] * 5
        out[side] = {"mean_top1_share": float(s.mean()) if len(s) else None,
                     **{f"p{p}": float(v) for p, v in zip((10, 25, 50, 75, 90), q)},
                     "frac_top1_share_ge_0.9": float((s >= 0.9).mean()) if len(s) else None}
    return out
