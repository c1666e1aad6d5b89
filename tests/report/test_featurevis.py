"""Feature visualisation through Lucent's optvis with the real BVLC weights: optimising a channel
(or an SAE feature's pre-activation) at the centre raises it far above its value on noise; units
in one batch each get their own image; results are cached; the shared model is left untouched."""

import numpy as np
import pytest
import torch

from sae_vision.core.config import SAEConfig
from sae_vision.report import featurevis
from sae_vision.sae.architectures import make_sae

LAYER = "mixed3a"
SIZE = 64  # mixed3a is 8x8 at 64 px: small and fast, the centre position still well inside


def noise(n, size=SIZE, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)


def test_redirected_relu_is_a_relu_that_lets_dead_units_be_pushed_up():
    x = torch.tensor([[-1.0, -2.0], [1.0, -1.0]], requires_grad=True)
    y = featurevis.RedirectedReLU.apply(x)
    assert torch.equal(y, torch.relu(x))
    # Row 0 is all dead: a plain ReLU gives it no gradient; redirected, a push upwards (negative
    # loss gradient) passes, and a push further down does not.
    y.backward(torch.tensor([[-1.0, 1.0], [-1.0, -1.0]]))
    assert x.grad.tolist() == [[-1.0, 0.0], [-1.0, 0.0]]


def test_optimising_channels_raises_each_far_above_noise(bvlc_model):
    channels = [5, 100]
    params = {n: p.requires_grad for n, p in bvlc_model.named_parameters()}
    imgs = featurevis.render_units(bvlc_model, LAYER, channels, steps=24, size=SIZE)
    assert imgs.shape == (2, SIZE, SIZE, 3) and 0 <= imgs.min() and imgs.max() <= 1
    resp = featurevis.unit_response(bvlc_model, LAYER, imgs, channels)
    base = featurevis.unit_response(bvlc_model, LAYER, noise(2), channels)
    crossed = featurevis.unit_response(bvlc_model, LAYER, imgs[::-1].copy(), channels)
    for i in range(2):
        assert resp[i] > 3 * base[i] + 10, (resp, base)
        assert resp[i] > crossed[i], "each batch element optimises its own unit"
    # The shared model comes back as it was: weights' grad flags, no leftover hooks, plain ReLUs.
    assert {n: p.requires_grad for n, p in bvlc_model.named_parameters()} == params
    assert not any(m._forward_hooks for m in bvlc_model.modules())
    assert not any("forward" in vars(m) for m in bvlc_model.modules())


def test_sae_feature_objective_is_its_encoder_pre_activation(bvlc_model):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", n_features=64, k=4), 256)
    feats = [3]
    imgs = featurevis.render_units(bvlc_model, LAYER, feats, sae=sae, steps=24, size=SIZE)
    resp = featurevis.unit_response(bvlc_model, LAYER, imgs, feats, sae=sae)
    base = featurevis.unit_response(bvlc_model, LAYER, noise(1), feats, sae=sae)
    assert resp[0] > base[0] + 3 * base.abs()[0] + 1, (resp, base)


def test_visualisations_are_cached_by_model_layer_run_and_steps(bvlc_model, tmp_path):
    paths = featurevis.visualise(bvlc_model, LAYER, [1, 2], tmp_path, "neurons", steps=2, size=32)
    assert all(p.is_file() for p in paths.values())
    paths[1].write_bytes(b"sentinel")  # a cached file is reused, not re-rendered
    again = featurevis.visualise(bvlc_model, LAYER, [1, 2, 3], tmp_path, "neurons", steps=2,
                                 size=32)
    assert again[1] == paths[1] and again[1].read_bytes() == b"sentinel"
    assert again[3].is_file()
    other = featurevis.visualise(bvlc_model, LAYER, [1], tmp_path, "neurons", steps=3, size=32)
    assert other[1].parent != paths[1].parent  # more steps: another cache entry


@pytest.mark.slow
def test_mixed3b_neuron_visualisations_at_full_size_beat_noise_by_far(bvlc_model):
    channels = [10, 379]
    imgs = featurevis.render_units(bvlc_model, "mixed3b", channels, steps=96, size=128)
    resp = featurevis.unit_response(bvlc_model, "mixed3b", imgs, channels)
    base = featurevis.unit_response(bvlc_model, "mixed3b", noise(2, 128), channels)
    assert (resp > 10 * base + 50).all(), (resp, base)
