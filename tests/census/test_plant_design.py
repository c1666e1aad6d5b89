"""Hidden plants that leave a real gap (sae_vision.census.plant_design) on ToyNet plus four line
units: a partner silent on the battery hides nothing, the proposed group does, and then the
census's own control record says "yes" for a feature equal to the planted detector."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_vision.activations.plant import LayerRotation
from sae_vision.census import curves as C
from sae_vision.census import layer_census as CS
from sae_vision.census import responses as R
from sae_vision.census.plant_design import gap_ok, planted_record, propose_hidden
from sae_vision.core import PlantConfig
from tests.census.test_curves import K, ToyNet, template, toy_cfg
from tests.census.test_novelty import DirectionSAE

D = 14


class LinesToyNet(ToyNet):
    """ToyNet (curve units 0-7 every 45°, line unit 8 at 90°, colour-flip unit 9) and four more
    line units (10-13: 0°, 45°, 135°, 90°): partners that respond to the battery but are not
    curve-tuned. With `plant`, the layer is read through it, as VisionModel's hook does."""

    def __init__(self, plant: PlantConfig | None = None):
        super().__init__()
        t = torch.stack([template("line", a) for a in (0.0, 45.0, 135.0, 90.0)])[:, None]
        self.lines = nn.Conv2d(1, len(t), K, padding=K // 2, bias=False)
        self.lines.weight.data = t / t.flatten(1).sum(1).view(-1, 1, 1, 1)
        self.plant = LayerRotation(plant, D) if plant is not None else None
        self.plant_id = self.plant.plant_id if plant is not None else None

    def activations(self, x, layers):
        grey = x.mean(1, keepdim=True)
        signed = grey[:, :, :1, :1] - grey
        signed = signed / signed.abs().amax((2, 3), keepdim=True).clamp_min(1e-6)
        signed = F.conv2d(signed, self.blur, padding=3)
        extra = F.relu(self.lines(signed.abs()) - self.threshold)
        h = torch.cat([super().activations(x, layers)["toy"], extra], 1)
        return {"toy": self.plant.rotate(h) if self.plant is not None else h}


@pytest.fixture(scope="module")
def toy():
    cfg, net = toy_cfg(), LinesToyNet()
    probe = R.make_probe(net, "toy", cfg.canvas_size)
    table = C.make_battery(cfg, probe)
    acts = R.centre_activations(net, "toy", table, probe).double().numpy()
    vecs = np.random.default_rng(0).random((500, D)) * 0.02
    return cfg, table, acts, vecs


def test_a_partner_silent_on_the_battery_hides_nothing(toy):
    cfg, table, acts, vecs = toy
    # one more channel, silent on every stimulus (but varying on natural images)
    acts1 = np.concatenate([acts, np.zeros((len(acts), 1))], 1)
    vecs1 = np.random.default_rng(1).random((500, D + 1)) * 0.02
    rec = planted_record(PlantConfig(kind="hidden", layer="toy", channels=[2, D]), acts1,
                         vecs1, table, cfg)
    # on the battery both rotated channels are 0.707 x the detector: still curve-tuned at
    # its orientation, and the detector itself is a functional copy of one of them
    assert rec["orientation_deg"] == 90.0
    assert rec["rotated_channels_curve_tuned"] == {2: 90.0, D: 90.0}
    assert rec["oracle"]["rho_max"] == pytest.approx(1.0, abs=1e-6)
    assert rec["oracle"]["class"] == "copy" and not rec["oracle"]["fills_gap"]
    assert not gap_ok(rec)


def test_the_proposed_group_leaves_a_gap_that_the_oracle_fills(toy):
    cfg, table, acts, vecs = toy
    got = propose_hidden(2, acts, vecs, table, cfg, layer="toy")
    assert got is not None
    plant, rec = got
    assert plant.channels[0] == 2 and set(plant.channels[1:]) <= {8, 10, 11, 12, 13}  # lines
    assert gap_ok(rec) and rec["neuron_census_lost"] and rec["gap_at_detector_deg"] >= 30.0
    o = rec["oracle"]
    assert o["class"] == "new" and o["rho_max"] < cfg.copy_min_rho and o["fills_gap"]
    assert all(s >= n for s, n in zip(o["neighbour_separation_deg"],
                                      o["required_separation_deg"]))
    for c, deg in rec["rotated_channels_curve_tuned"].items():  # none near the detector
        assert float(C.circ_diff(deg, 90.0)) >= cfg.gap_min_separation_deg, (c, deg)
    with pytest.raises(ValueError, match="not a census detector"):
        propose_hidden(8, acts, vecs, table, cfg, layer="toy")


def test_the_census_of_the_planted_net_calls_the_detector_new_and_gap_filling(toy):
    cfg, table, acts, vecs = toy
    plant, sim = propose_hidden(2, acts, vecs, table, cfg, layer="toy")
    net = LinesToyNet(plant)
    u = net.plant.hidden_direction().float()
    nat = torch.as_tensor(vecs, dtype=torch.float32) @ net.plant.matrix().float().T
    res = CS.run_census(net, "toy", cfg,
                        CS.CensusInputs(unit_mean=nat.mean(0), unit_std=nat.std(0),
                                        null_seeds=0),
                        CS.FeatureInputs(DirectionSAE(torch.stack([u, torch.eye(D)[0]])),
                                         vectors=nat), verbose=False)
    ctl = res["control"]
    assert ctl["neuron_census_lost"] and ctl["oracle"]["class"] == "new"
    assert ctl["oracle"]["fills_gap"] and ctl["oracle"] == sim["oracle"]
    assert ctl["found_new_gap_filling"] and ctl["best_feature"]["feature"] == 0
