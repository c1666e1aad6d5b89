"""Tests for sae_vision/census/layer_census.py: the census of a layer and the neuron-census memo.

The census's detections on toy and real networks are tested in test_curves.py and
test_novelty.py, which share the toy network defined in test_curves.py."""

import copy

import pytest
import torch

from sae_vision.census import features as FC
from sae_vision.census import layer_census as CS
from sae_vision.census import nulls as NL
from sae_vision.census import responses as R
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


def test_neurons_nulls_and_features_take_their_sigma_from_the_same_photos(monkeypatch):
    # A null that is the network itself, and a feature that is channel 3 (decoder row e_3):
    # with one σ sample, all three see channel 3 at the same σ-unit peak.
    monkeypatch.setitem(NL.NULLS, "same", lambda model, layer, seed: copy.deepcopy(model))
    monkeypatch.setitem(NL.NULL_DESTROYS, "same", "nothing (a test null)")
    net = ToyNet()
    cfg = toy_cfg(nulls=["same"], n_null_seeds=2, check_input_block=False,
                  n_reference_images=3)
    photos = R.make_reference_images(2, size=64)
    sae = OneHotSAE(10, [3], n_noise=2)
    memo = CS.NeuronCensusMemo()
    inputs = CS.CensusInputs(images=photos, photos="two test photos", source="data-a")
    res = CS.run_census(net, "toy", cfg, inputs, CS.FeatureInputs(sae), memo=memo,
                        verbose=False)
    assert res["sigma_source"] == {"photos": "two test photos", "count": 2,
                                   "positions": "every position", "n_vectors": 2 * 64 * 64,
                                   "neurons": "photos", "nulls": "photos", "features": "photos"}
    part = memo.get(CS.NeuronCensusMemo.key_of(net, "toy", cfg, 2, "data-a",
                                               CS.sigma_key(inputs)))
    neuron = part.real["evidence"]["peak_sigma"][3]
    assert neuron > 1.0
    null_evs = part.figs["evidence_neurons"][1]["same"]
    assert [e["peak_sigma"][3] for e in null_evs] == pytest.approx([neuron] * 2, rel=1e-5)
    f_ev = FC.feature_census(net, "toy", cfg, part, CS.FeatureInputs(sae), 2)["figs"][
        "evidence_features"][0]
    assert f_ev["peak_sigma"][0] == pytest.approx(neuron, rel=1e-5)
    # ...which another sample of photos would not give.
    other = R.unit_stats(R.layer_vectors(net, "toy", R.make_reference_images(2, 64, seed=1)))
    assert float(part.real["std"][3]) != pytest.approx(float(other[1][3]), rel=1e-3)
    # The memo is keyed by the σ sample: other photos under the same source name run again.
    calls = []
    real_census_of_model = CS.census_of_model
    monkeypatch.setattr(CS, "census_of_model",
                        lambda *a, **k: calls.append(1) or real_census_of_model(*a, **k))
    CS.run_census(net, "toy", cfg, inputs, memo=memo, verbose=False)
    assert not calls
    CS.run_census(net, "toy", cfg, CS.CensusInputs(images=photos.flip(-1), source="data-a"),
                  memo=memo, verbose=False)
    assert len(calls) == 3  # the real network and two null seeds
