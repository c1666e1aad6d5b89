"""model.plant: an orthogonal change of basis of one layer inside the network (the planted
positive controls). Real BVLC weights (../shared/weights) on small random images."""

import copy

import pytest
import torch

from sae_vision.activations.models import load_model
from sae_vision.activations.plant import LayerRotation, plant_group
from sae_vision.core.config import Config, ModelConfig, PlantConfig, check_config
from sae_vision.core.paths import cache_key

HIDDEN = PlantConfig(kind="hidden", channels=[324, 41])


@pytest.fixture(scope="module")
def x_small():
    return torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def nets(weights_dir):
    def build(plant):
        return load_model(ModelConfig(device="cpu", weights_dir=str(weights_dir), plant=plant))

    return {"none": build(PlantConfig()), "hidden": build(HIDDEN),
            "rotate": build(PlantConfig(kind="rotate", seed=1))}


def _layer(net, x):
    with torch.no_grad():
        return net.activations(x, ["mixed3b"])["mixed3b"]


def test_hidden_plant_is_a_45_degree_rotation_of_exactly_its_two_channels(nets, x_small):
    h, y = _layer(nets["none"], x_small), _layer(nets["hidden"], x_small)
    rot = nets["hidden"].plant.matrix()
    assert torch.allclose(rot @ rot.T, torch.eye(480, dtype=rot.dtype), atol=1e-12)
    others = [c for c in range(480) if c not in (324, 41)]
    assert torch.equal(y[:, others], h[:, others])  # every other channel bit-identical
    s = 2 ** -0.5
    assert torch.allclose(y[:, 324], s * (h[:, 324] - h[:, 41]), atol=1e-5)
    assert torch.allclose(y[:, 41], s * (h[:, 324] + h[:, 41]), atol=1e-5)
    assert (y[:, 324] < 0).any()  # a linear map of post-ReLU channels: negatives are intended
    # the detector's own response is the dot product with its hidden direction
    u = nets["hidden"].plant.hidden_direction().float()
    assert torch.allclose(torch.einsum("bchw,c->bhw", y, u), h[:, 324], atol=1e-5)


def test_rotated_basis_mixes_every_channel_and_the_inverse_recovers_the_layer(nets, x_small):
    h, y = _layer(nets["none"], x_small), _layer(nets["rotate"], x_small)
    plant = nets["rotate"].plant
    rot = plant.matrix()
    assert torch.allclose(rot @ rot.T, torch.eye(480, dtype=rot.dtype), atol=1e-10)
    assert (rot.abs().amax(0) < 0.5).all()  # no channel keeps its own axis
    assert not torch.allclose(y, h, atol=1e-2)
    assert torch.allclose(plant.unrotate(y), h, atol=1e-4)
    assert torch.allclose(plant.unrotate(plant.rotate(h)), h, atol=1e-4)
    assert plant_group(PlantConfig(kind="rotate", seed=1), 480)[0] == list(range(480))
    assert torch.equal(plant_group(PlantConfig(kind="rotate", seed=1), 480)[1],
                       plant_group(PlantConfig(kind="rotate", seed=1), 480)[1])
    assert not torch.equal(plant_group(PlantConfig(kind="rotate", seed=1), 480)[1],
                           plant_group(PlantConfig(kind="rotate", seed=2), 480)[1])


def test_planted_network_keeps_its_logits_and_its_copies_keep_the_plant(nets, x_small):
    with torch.no_grad():
        base = nets["none"](x_small)
        for kind in ("hidden", "rotate"):  # the next module gets R^T y: same function
            assert torch.allclose(nets[kind](x_small), base, atol=1e-3)
        # a null network is a deep copy of the model: it reads the same rotated layer
        twin = copy.deepcopy(nets["hidden"])
        assert torch.equal(_layer(twin, x_small), _layer(nets["hidden"], x_small))
        assert twin.plant is not nets["hidden"].plant and twin.plant_id == nets["hidden"].plant_id


def test_a_group_of_partners_spreads_the_detector_over_all_of_them():
    rot = LayerRotation(PlantConfig(kind="hidden", channels=[5, 1, 2, 3], seed=4), 8)
    full = rot.matrix()
    assert torch.allclose(full @ full.T, torch.eye(8, dtype=full.dtype), atol=1e-12)
    col = full[:, 5]
    assert set(torch.nonzero(col).flatten().tolist()) <= {1, 2, 3, 5}
    assert col.abs().max() < 0.99  # spread, not left on its own axis
    x = torch.rand(2, 8, 3, 3)
    assert torch.equal(rot.rotate(x)[:, [0, 4, 6, 7]], x[:, [0, 4, 6, 7]])


def test_cache_key_changes_with_the_plant_and_not_without_one():
    base = Config()
    keys = {cache_key(base, "mixed3b")}
    for plant in (HIDDEN, PlantConfig(kind="hidden", channels=[324, 58]),
                  PlantConfig(kind="hidden", channels=[324, 41], angle_deg=30.0),
                  PlantConfig(kind="rotate", seed=0), PlantConfig(kind="rotate", seed=1)):
        cfg = Config()
        cfg.model.plant = plant
        keys.add(cache_key(cfg, "mixed3b"))
    assert len(keys) == 6
    cfg = Config()
    cfg.model.plant = PlantConfig(kind="none", channels=[1, 2], seed=5)  # inert settings
    assert cache_key(cfg, "mixed3b") == cache_key(base, "mixed3b")


@pytest.mark.parametrize("plant,family,fix", [
    (PlantConfig(kind="hidden", channels=[324]), "googlenet_bvlc", "model.plant.channels"),
    (PlantConfig(kind="hidden", channels=[324, 324]), "googlenet_bvlc", "model.plant.channels"),
    (PlantConfig(kind="hidden", channels=[324, 480]), "googlenet_bvlc", "model.plant.channels"),
    (PlantConfig(kind="swap"), "googlenet_bvlc", "model.plant.kind"),
    (PlantConfig(kind="rotate"), "timm", "model.family"),
])
def test_bad_plants_are_one_error_naming_the_field(plant, family, fix):
    cfg = Config(stage=Config().stage)
    cfg.stage.name = "cache"
    cfg.model.plant, cfg.model.family = plant, family
    with pytest.raises(ValueError, match=fix.replace(".", r"\.")):
        check_config(cfg)


def test_evaluation_loads_the_plant_of_the_cache_the_sae_was_trained_on():
    from sae_vision.sae.runs import model_config

    cfg = Config()
    cfg.model.plant = HIDDEN
    settings = {"settings": {"model": {"family": "googlenet_bvlc", "name": "googlenet_bvlc",
                                       "pretrained": True, "weights_path": None}}}
    meta = {"settings": {"model": {**settings["settings"]["model"],
                                   "plant": {"kind": "rotate", "layer": "mixed3b",
                                             "channels": [], "angle_deg": 45.0, "seed": 2}}}}
    assert model_config(cfg, meta).plant == PlantConfig(kind="rotate", seed=2)
    # an unplanted cache evaluates on the unplanted network, whatever the command line says
    assert model_config(cfg, settings).plant == PlantConfig()
