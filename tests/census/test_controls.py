"""The planted positive controls' `control` record in curves.json, on the toy network of
test_curves.py with a real model.plant rotation (sae_vision.activations.plant) on its layer."""

import json

import pytest
import torch

from sae_vision.activations.plant import LayerRotation
from sae_vision.census import layer_census as CS
from sae_vision.core.config import PlantConfig
from tests.census.test_curves import ToyNet, toy_cfg
from tests.census.test_novelty import DirectionSAE


class PlantedToy(ToyNet):
    """ToyNet whose layer is read through a plant, as VisionModel's hook does."""

    def __init__(self, plant: PlantConfig):
        super().__init__()
        self.plant = LayerRotation(plant, 10)
        self.plant_id = self.plant.plant_id

    def activations(self, x, layers):
        return {"toy": self.plant.rotate(super().activations(x, layers)["toy"])}


def _census(net, dec, memo):
    return CS.run_census(net, "toy", toy_cfg(),
                         CS.CensusInputs(unit_mean=torch.zeros(10),
                                         unit_std=torch.full((10,), 0.02), null_seeds=0),
                         CS.FeatureInputs(DirectionSAE(dec), vectors=torch.rand(500, 10) * 0.02),
                         verbose=False, memo=memo)


@pytest.fixture(scope="module")
def hidden():
    # the 90° curve unit rotated 45° with the 90° straight-line unit
    return PlantedToy(PlantConfig(kind="hidden", layer="toy", channels=[2, 8])), CS.NeuronCensusMemo()


def test_hidden_detector_is_lost_by_the_neuron_census_and_found_by_its_direction(hidden):
    net, memo = hidden
    u = net.plant.hidden_direction().float()
    eye = torch.eye(10)
    res = _census(net, torch.stack([u, eye[2], eye[0]]), memo)
    ctl = res["control"]
    assert ctl["detector"] == 2 and ctl["partners"] == [8] and ctl["orientation_deg"] == 90.0
    assert ctl["passes_census_unrotated"]  # the detector itself is still a detector...
    assert ctl["rotated_channels_detected"] == []  # ...but neither 50/50 "neuron" is
    assert ctl["neuron_census_lost"] and ctl["gap_at_detector_deg"] >= 30.0
    assert 2 not in {d["unit"] for d in res["neurons"]["detected"]}
    best = ctl["best_feature"]
    assert ctl["found"] and best["feature"] == 0 and best["corr_battery"] > 0.999
    assert best["orientation_diff_deg"] == 0.0 and best["weight_class"] == "new"
    # the functional rule agrees: no single channel responds like it on the battery
    assert best["class"] == "new"
    assert ctl["found_new_gap_filling"] == bool(best["fills_gap"])
    assert sorted(best["decoder_top_shares"][:2]) == pytest.approx([0.5, 0.5], abs=1e-3)
    assert json.dumps(res)


def test_an_sae_without_the_hidden_direction_does_not_find_it(hidden):
    net, memo = hidden
    eye = torch.eye(10)
    ctl = _census(net, torch.stack([eye[2], eye[8], eye[0], eye[4]]), memo)["control"]
    assert ctl["neuron_census_lost"] and not ctl["found"]
    assert ctl["best_feature"] is None or ctl["best_feature"]["orientation_diff_deg"] > 15.0 \
        or ctl["best_feature"]["corr_battery"] < 0.8


def test_rotated_basis_copies_are_weight_new_but_functional_copies():
    net = PlantedToy(PlantConfig(kind="rotate", layer="toy", seed=14))
    full = net.plant.matrix().float()
    # the neurons' own directions in the rotated layer, R e_i: none has over 0.37 of its norm²
    # on one channel (seed 14)
    res = _census(net, torch.stack([full[:, i] for i in range(8)]), CS.NeuronCensusMemo())
    ctl = res["control"]
    assert ctl["kind"] == "rotate" and len(ctl["features"]) >= 6
    assert ctl["n_weight_copies"] == 0  # the weight rule calls every one of them new
    assert ctl["n_functional_copies"] == len(ctl["features"])
    assert all(r["neuron"] == r["feature"] and r["corr_battery"] > 0.999
               for r in ctl["features"])


def test_an_unplanted_census_has_no_control_record():
    eye = torch.eye(10)
    res = CS.run_census(ToyNet(), "toy", toy_cfg(),
                        CS.CensusInputs(unit_mean=torch.zeros(10),
                                        unit_std=torch.full((10,), 0.02), null_seeds=0),
                        CS.FeatureInputs(DirectionSAE(eye[:3]), vectors=torch.rand(200, 10) * 0.02),
                        verbose=False)
    assert "control" not in res
