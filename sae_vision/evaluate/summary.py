"""The sweep summary of evaluated runs: one row per run (summary_row), written as CSV and JSON
with the sparsity-fidelity frontier plots (write_summary), and how far each run's training got
(training_summary, read from its train log). Read by the evaluate and report stages.
"""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np

from sae_vision.core import atomic_write, drop_stale_tmp, plots, uses_l1_coeff, write_json
from sae_vision.sae import CONFIG_FILE, TRAIN_LOG


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a/b': 1}, keeping scalars only (for tracker.log)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)):
            out[key] = v
    return out


SUMMARY_COLUMNS = (
    "run", "layer", "arch", "n_features", "expansion", "l1_coeff", "k", "seed", "l0", "fvu",
    "fvu_neuron_topk", "fvu_neuron_topk_mean", "neuron_gain", "explained_variance", "mse", "cosine", "l2_ratio", "dead_frac", "dense_frac", "kl_sae",
    "kl_zero", "kl_mean", "agreement_sae", "frac_recovered_zero", "frac_recovered_mean",
    "n_vectors", "n_splice_images", "loss_flatness", "loss_decay_gain", "curve_features",
    "copies", "new", "new_in_neuron_gaps", "new_in_gaps_uncovered", "largest_gap_neurons_deg",
    "largest_gap_with_new_deg", "largest_gap_curve_tuned_deg", "new_fdr",
    "frac_more_selective", "frac_more_selective_random",
)


def training_summary(run_dir: Path, n_train_vectors: int | None) -> dict:
    """How far training got: vectors seen, epochs, and how flat the loss and FVU curves are at
    the end. The schedule ends with a linear learning-rate decay to 0 (`train.decay_frac`), and
    a decaying step flattens any curve by construction, so flatness is read before it:
    `loss_flatness` is the relative drop of the mean loss from 55-65% of the constant-rate phase
    to its last 10% (a few percent or less: the curve has levelled off at that rate), and
    `loss_decay_gain` the further drop from there to the last 5% of all steps (what the decay
    adds). The same two for the FVU."""
    path = Path(run_dir) / TRAIN_LOG
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    cfg_json = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        cfg_json = json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    tcfg = (cfg_json.get("meta", {}).get("config") or {}).get("train") or {}
    n_steps, batch = tcfg.get("n_steps"), tcfg.get("batch_size")
    out: dict = {"n_steps": n_steps, "batch_size": batch}
    if n_steps and batch:
        out["n_vectors_seen"] = int(n_steps) * int(batch)
        if n_train_vectors:
            out["epochs"] = out["n_vectors_seen"] / n_train_vectors
    rows = [r for r in rows if isinstance(r.get("step"), (int, float))]
    if len(rows) >= 8:
        last = rows[-1]["step"]

        def window(key: str, lo: float, hi: float) -> float | None:
            v = [r[key] for r in rows if key in r and lo * last < r["step"] <= hi * last]
            return float(np.mean(v)) if v else None

        decay_frac = float(tcfg.get("decay_frac", 0.2) or 0.0)
        flat_end = 1.0 - decay_frac  # the decay starts here (fraction of the last logged step)
        for key in ("loss", "fvu"):
            a, b = window(key, 0.55 * flat_end, 0.65 * flat_end), window(key, 0.9 * flat_end,
                                                                           flat_end)
            c = window(key, 0.95, 1.0)
            if a is not None and b is not None and b > 0:
                out[f"{key}_flatness"] = (a - b) / b
            if b is not None and c is not None and c > 0 and decay_frac > 0:
                out[f"{key}_decay_gain"] = (b - c) / c
    return out


def summary_row(m: dict) -> dict:
    """One sweep-table row from a run's metrics.json content."""
    rec, feat, spl = m.get("reconstruction", {}), m.get("features", {}), m.get("splice") or {}
    hp, nb = m.get("hparams", {}), m.get("neuron_baseline") or {}
    arch = m.get("arch")
    # Show only the sparsity knob the architecture actually uses.
    uses_l1 = uses_l1_coeff(arch)
    row = {
        "run": m.get("run"), "layer": m.get("layer"), "arch": arch,
        "n_features": m.get("n_features"), "expansion": hp.get("expansion"),
        "l1_coeff": hp.get("l1_coeff") if uses_l1 else None,
        "k": hp.get("k") if not uses_l1 else None, "seed": hp.get("seed"),
        "l0": rec.get("l0"), "fvu": rec.get("fvu"),
        # the neuron basis at the same L0 (each vector's top-round(L0) channels), and the
        # SAE's gain over the better of its zero- and mean-filled forms
        "fvu_neuron_topk": nb.get("fvu_zero"), "fvu_neuron_topk_mean": nb.get("fvu_mean"),
        "neuron_gain": nb.get("gain"),
        "explained_variance": rec.get("explained_variance"), "mse": rec.get("mse"),
        "cosine": rec.get("cosine"), "l2_ratio": rec.get("l2_ratio"),
        "dead_frac": feat.get("dead_frac"), "dense_frac": feat.get("dense_frac"),
        "kl_sae": spl.get("kl_sae"), "kl_zero": spl.get("kl_zero"), "kl_mean": spl.get("kl_mean"),
        "agreement_sae": spl.get("agreement_sae"),
        "frac_recovered_zero": spl.get("frac_recovered_zero"),
        "frac_recovered_mean": spl.get("frac_recovered_mean"),
        "n_vectors": rec.get("n_vectors"), "n_splice_images": spl.get("n_images"),
        "loss_flatness": (m.get("training") or {}).get("loss_flatness"),
        "loss_decay_gain": (m.get("training") or {}).get("loss_decay_gain"),
    }
    cur, poly = m.get("curves") or {}, m.get("polysemantic") or {}
    row.update({"curve_features": cur.get("n_feature_detectors"), "copies": cur.get("n_copies"),
                "new": cur.get("n_new"), "new_in_neuron_gaps": cur.get("n_features_in_neuron_gaps"),
                "largest_gap_neurons_deg": cur.get("largest_gap_neurons_deg"),
                "largest_gap_with_new_deg": cur.get("largest_gap_combined_deg"),
                "new_in_gaps_uncovered": cur.get("n_new_in_gaps_uncovered"),
                "largest_gap_curve_tuned_deg": cur.get("largest_gap_curve_tuned_neurons_deg"),
                "new_fdr": cur.get("new_fdr"),
                "frac_more_selective": poly.get("frac_more_selective"),
                "frac_more_selective_random": poly.get("frac_more_selective_random")})
    return row


def write_summary(rows: list[dict], out_dir: Path) -> tuple[Path, Path, list[Path]]:
    """Sweep table as CSV + JSON, and the L0-vs-FVU (with the neuron basis beside every SAE)
    and L0-vs-KL frontier plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drop_stale_tmp(out_dir)
    rows = sorted(rows, key=lambda r: (str(r["layer"]), str(r["arch"]), r["l0"] or 0))
    csv_path, json_path = out_dir / "summary.csv", out_dir / "summary.json"
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    write_json(json_path, {"columns": list(SUMMARY_COLUMNS), "rows": rows})
    figs = [plots.plot_frontier(rows, "fvu", "FVU", out_dir / "frontier_l0_fvu.png"),
            plots.plot_frontier(rows, "kl_sae", "splice KL (nats)", out_dir / "frontier_l0_kl.png")]
    return csv_path, json_path, [p for p in figs if p is not None]
