"""Tests for sae_vision/evaluate/summary.py: the sweep table, its frontier plots, the training summary."""

import csv
import json
from pathlib import Path

import pytest

from sae_vision.evaluate import summary


def _metrics_for(layer, arch, k, l0, fvu, kl):
    return {"run": f"{layer}-{arch}-k{k}", "layer": layer, "arch": arch, "n_features": 64,
            "hparams": {"k": k, "l1_coeff": 5.0, "expansion": 8, "seed": 0},
            "reconstruction": {"l0": l0, "fvu": fvu, "n_vectors": 100},
            "features": {"dead_frac": 0.1}, "splice": {"kl_sae": kl, "n_images": 4}}


def test_frontier_summary_and_plots_show_more_sparsity_more_error(tmp_path):
    ms = [_metrics_for(la, "topk", k, k * 0.98, 0.6 / k ** 0.5, 0.3 / k)
          for la in ("mixed3a", "mixed3b") for k in (32, 4, 8, 16)]
    ms.append(_metrics_for("mixed3b", "relu_l1", 0, 20.0, 0.2, 0.05))
    csv_path, json_path, figs = summary.write_summary([summary.summary_row(m) for m in ms],
                                                       tmp_path)
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 9 and {Path(f).name for f in figs} == {"frontier_l0_fvu.png",
                                                               "frontier_l0_kl.png"}
    assert all(Path(f).stat().st_size > 5000 for f in figs)
    relu = next(r for r in rows if r["arch"] == "relu_l1")
    assert relu["k"] == "" and relu["l1_coeff"] == "5.0"  # only the knob the arch uses
    for layer in ("mixed3a", "mixed3b"):
        grp = [r for r in rows if r["layer"] == layer and r["arch"] == "topk"]
        l0 = [float(r["l0"]) for r in grp]
        fvu = [float(r["fvu"]) for r in grp]
        assert l0 == sorted(l0) and fvu == sorted(fvu, reverse=True)


def _write_run_log(run_dir, losses, n_steps=100, decay_frac=0.2):
    run_dir.mkdir(parents=True)
    cfg = {"meta": {"config": {"train": {"n_steps": n_steps, "batch_size": 10,
                                         "decay_frac": decay_frac}}}}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    (run_dir / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": v, "fvu": v / 100}) + "\n" for s, v in losses))


def test_training_summary_reads_flatness_before_the_lr_decay(tmp_path):
    # Converged at full rate (flat at 10 from step 30), then the decay lowers it to 9.
    plateau = [(s, 10.0 if s <= 80 else 10.0 - (s - 80) / 20) for s in range(5, 101, 5)]
    _write_run_log(tmp_path / "flat", [(s, 50.0 if s < 30 else v) for s, v in plateau])
    flat = summary.training_summary(tmp_path / "flat", n_train_vectors=250)
    assert flat["epochs"] == pytest.approx(4.0)
    assert abs(flat["loss_flatness"]) < 1e-9  # the decay's drop is not read as "still falling"
    assert flat["loss_decay_gain"] == pytest.approx((10.0 - 9.0) / 9.0)  # last 5%: step 100
    # Still falling at full rate: the flatness says so.
    falling = [(s, 100.0 - s) for s in range(5, 101, 5)]
    _write_run_log(tmp_path / "falling", falling)
    assert summary.training_summary(tmp_path / "falling", None)["loss_flatness"] > 0.2


def test_summary_row_and_table_carry_the_neuron_basis_and_the_sae_gain(tmp_path):
    m = _metrics_for("mixed3b", "topk", 32, 31.6, 0.031, 0.01)
    m["neuron_baseline"] = {"k": 32, "fvu_zero": 0.0375, "fvu_mean": 0.05, "gain": 0.0375 / 0.031}
    row = summary.summary_row(m)
    assert row["fvu_neuron_topk"] == 0.0375 and row["fvu_neuron_topk_mean"] == 0.05
    assert row["neuron_gain"] == pytest.approx(1.21, abs=0.01)
    old = summary.summary_row(_metrics_for("mixed3b", "topk", 8, 8.0, 0.1, 0.02))
    assert old["fvu_neuron_topk"] is None  # evaluated before the baseline: an empty cell
    csv_path, _, _ = summary.write_summary([row, old], tmp_path)
    got = {r["run"]: r for r in csv.DictReader(open(csv_path))}
    assert float(got[row["run"]]["neuron_gain"]) == pytest.approx(row["neuron_gain"])
    assert got[old["run"]]["fvu_neuron_topk"] == ""
