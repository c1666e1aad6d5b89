"""Tests for sae_vision/census/layer_census.py: the census of a layer and the neuron-census memo.

The census's detections on toy and real networks are tested in test_curves.py and
test_novelty.py, which share the toy network defined in test_curves.py."""

import torch

from sae_vision.census import layer_census as CS
from tests.census.test_curves import OneHotSAE, ToyNet, toy_cfg


def test_a_sweep_reuses_the_neuron_census_across_saes(monkeypatch):
    net, cfg = ToyNet(), toy_cfg(n_reference_images=4)
    calls = []
    real_census_of_model = CS.census_of_model
    monkeypatch.setattr(CS, "census_of_model",
                        lambda *a, **k: calls.append(1) or real_census_of_model(*a, **k))
    vecs = torch.rand(300, 10) * 0.02
    memo = CS.NeuronCensusMemo()
    first = CS.run_census(net, "toy", cfg,
                CS.CensusInputs(null_seeds=0, source="data-a"),
                CS.FeatureInputs(OneHotSAE(10, [3]), vectors=vecs),
                verbose=False,
                memo=memo)
    second = CS.run_census(net, "toy", cfg,
                 CS.CensusInputs(null_seeds=0, source="data-a"),
                 CS.FeatureInputs(OneHotSAE(10, [3, 5]), vectors=vecs),
                 verbose=False,
                 memo=memo)
    assert len(calls) == 1  # the neuron census ran once for both SAEs
    CS.run_census(net, "toy", cfg,
        CS.CensusInputs(null_seeds=0, source="data-b"),
        CS.FeatureInputs(OneHotSAE(10, [3]), vectors=vecs),
        verbose=False,
        memo=memo)
    assert len(calls) == 2  # other data (another memo key) is never served the old census
    assert first["neurons"] == second["neurons"]
    assert first["features"]["n_units"] == 7 and second["features"]["n_units"] == 8
