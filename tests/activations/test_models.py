"""VisionModel: the BVLC forward pass, hooks (activations, early stop, splice), geometry, weights."""

import hashlib
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sae_vision.activations import googlenet
from sae_vision.activations.models import load_model, lucid_geometry
from sae_vision.core.config import ALL_LAYER_DIMS, ModelConfig

REFERENCE_LAYERS = {
    "conv1": "conv2d0",
    "conv2_reduce": "conv2d1",
    "conv2": "conv2d2",
    "inception_3a": "mixed3a",
    "inception_3b": "mixed3b",
}


@pytest.fixture(scope="module")
def x_1():
    return torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def x_small():
    # The net is fully convolutional up to a global pool: small images keep hook tests cheap.
    return torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def test_bvlc_reproduces_reference_top5_and_layer_stats(bvlc_model, weights_dir):
    ref = json.loads((weights_dir / "reference_outputs.json").read_text())
    img = np.load(weights_dir / "reference_input_rgb_uint8.npy")
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    acts = bvlc_model.activations(x, list(REFERENCE_LAYERS.values()))
    grab = bvlc_model.net.mixed4a.register_forward_hook(lambda _m, _i, o: acts.update(mixed4a=o))
    try:
        probs = bvlc_model(x).softmax(-1)[0]
    finally:
        grab.remove()
    top = probs.topk(5)
    assert top.indices.tolist() == ref["top5_class_index"]
    np.testing.assert_allclose(top.values.numpy(), ref["top5_prob"], rtol=1e-4, atol=1e-6)
    for caffe_name, layer in {**REFERENCE_LAYERS, "inception_4a": "mixed4a"}.items():
        a_CHW, r = acts[layer][0].double(), ref[caffe_name]
        assert list(a_CHW.shape) == r["shape"]
        np.testing.assert_allclose(a_CHW.mean().item(), r["mean"], rtol=1e-4)
        np.testing.assert_allclose(a_CHW.std(unbiased=False).item(), r["std"], rtol=1e-4)
        # Reference means are rounded to 5 decimals, hence the small absolute slack.
        first8 = a_CHW.mean((1, 2))[:8].numpy()
        np.testing.assert_allclose(first8, r["channel_mean_first8"], rtol=1e-4, atol=1e-4)


def test_load_model_freezes_parameters_and_records_weights_hash(bvlc_model, weights_dir):
    assert not bvlc_model.training
    assert not any(p.requires_grad for p in bvlc_model.parameters())
    blob = (weights_dir / "bvlc_googlenet.npz").read_bytes()
    assert bvlc_model.weights_sha256 == hashlib.sha256(blob).hexdigest()


def test_every_lucid_layer_has_its_configured_dim_and_size(bvlc_model, x_1):
    assert bvlc_model.layer_names() == list(ALL_LAYER_DIMS)
    acts = bvlc_model.activations(x_1, list(ALL_LAYER_DIMS))
    for layer, dim in ALL_LAYER_DIMS.items():
        assert acts[layer].shape[1] == dim == bvlc_model.layer_dim(layer), layer
        assert acts[layer].shape[-1] == bvlc_model.geometry(layer).size, layer
        if layer.endswith("_pre_relu"):  # the tap really sits right before the ReLU
            assert torch.equal(acts[layer].clamp(min=0), acts[layer.removesuffix("_pre_relu")])


def test_activations_stop_after_the_deepest_requested_layer(bvlc_model, x_small):
    calls = {"mixed3a": 0, "maxpool4": 0}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    net = bvlc_model.net
    handles = [net.get_submodule(name).register_forward_pre_hook(count(name)) for name in calls]
    try:
        early = bvlc_model.activations(x_small, ["conv2d0"])
        assert calls == {"mixed3a": 0, "maxpool4": 0}
        deep = bvlc_model.activations(x_small, ["mixed3b", "conv2d0"])
        assert calls == {"mixed3a": 1, "maxpool4": 0}
    finally:
        for h in handles:
            h.remove()
    assert list(deep) == ["mixed3b", "conv2d0"]  # requested order, whatever the execution order
    assert torch.equal(early["conv2d0"], deep["conv2d0"])


def test_splice_with_identity_keeps_logits_and_a_real_change_moves_them(bvlc_model, x_small):
    base = bvlc_model(x_small)
    with bvlc_model.splice("mixed3b", lambda t: t):
        assert torch.equal(bvlc_model(x_small), base)
    with bvlc_model.splice("mixed3b", lambda t: t * 0.5):
        assert (bvlc_model(x_small) - base).abs().max() > 1e-2
    assert torch.equal(bvlc_model(x_small), base)  # the hook is gone after the block


def test_branch_splice_changes_only_its_slice_of_the_concat(bvlc_model, x_small):
    base = bvlc_model.activations(x_small, ["mixed3b"])["mixed3b"]
    lo, hi = 128 + 192, 128 + 192 + 96  # concat order is 1x1, 3x3, 5x5, pool_reduce
    with bvlc_model.splice("mixed3b_5x5", torch.zeros_like):
        spliced = bvlc_model.activations(x_small, ["mixed3b"])["mixed3b"]
    assert base[:, lo:hi].abs().sum() > 0 and spliced[:, lo:hi].abs().sum() == 0
    assert torch.equal(spliced[:, :lo], base[:, :lo]) and torch.equal(spliced[:, hi:], base[:, hi:])
    with bvlc_model.splice("mixed3b_5x5_pre_relu", lambda t: t - 1e4):  # before the ReLU: all dead
        assert bvlc_model.activations(x_small, ["mixed3b"])["mixed3b"][:, lo:hi].abs().sum() == 0


@contextmanager
def _linearised(model):
    """ReLUs pass everything and max-pools average, so every pixel of the RF gets gradient."""

    def avg_pool(m, inputs, _out):
        return F.avg_pool2d(googlenet.pad_same(inputs[0], m.k, m.s), m.k, m.s)

    handles = []
    for m in model.net.modules():
        if isinstance(m, nn.ReLU):
            handles.append(m.register_forward_hook(lambda _m, inputs, _out: inputs[0]))
        elif isinstance(m, googlenet.MaxPoolSame):
            handles.append(m.register_forward_hook(avg_pool))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


_GEOMETRY_FAST = {"conv2d0", "conv2d2_pre_relu", "mixed3a_pool_reduce", "mixed3b"}


_GEOMETRY_LAYERS = [
    name if name in _GEOMETRY_FAST else pytest.param(name, marks=pytest.mark.slow)
    for name in ALL_LAYER_DIMS
]


@pytest.mark.parametrize("layer", _GEOMETRY_LAYERS)
def test_geometry_matches_the_input_gradient_of_a_centre_unit(bvlc_model, layer):
    geo = bvlc_model.geometry(layer)
    assert geo == lucid_geometry(layer, 224)
    x = torch.rand(1, 3, 224, 224, requires_grad=True)
    y = geo.size // 2
    with _linearised(bvlc_model):
        bvlc_model.activations(x, [layer])[layer][0, :, y, y].sum().backward()
    grad_HW = x.grad[0].abs().sum(0)
    for profile in (grad_HW.sum(1), grad_HW.sum(0)):  # rows, then columns: the unit is at (y, y)
        support = profile.nonzero().flatten()
        lo, hi = support.min().item(), support.max().item()
        assert 0 < lo and hi < 223, "RF clipped by the border: pick a more central unit"
        assert hi - lo + 1 == geo.rf_size
        assert abs((lo + hi) / 2 - (geo.offset + geo.stride * y)) <= 1.0


def test_paper_layer_geometry_values():
    # The numbers downstream code relies on (dataset-example crops, border exclusion).
    assert lucid_geometry("conv2d0") == (2, 7, 1.0, 112)
    assert lucid_geometry("conv2d2") == (4, 19, 3.0, 56)
    assert lucid_geometry("mixed3a") == (8, 59, 7.0, 28)
    assert lucid_geometry("mixed3b") == (8, 91, 7.0, 28)


def test_unknown_layer_raises_listing_the_valid_names(bvlc_model, x_small):
    calls = [
        lambda: bvlc_model.activations(x_small, ["mixed3c"]),
        lambda: bvlc_model.layer_dim("mixed3c"),
        lambda: bvlc_model.geometry("mixed3c"),
        lambda: bvlc_model.splice("mixed3c", abs).__enter__(),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="mixed3c.*valid layers are: conv2d0, .*mixed3b"):
            call()


def test_inceptionv1_random_init_exposes_the_lucid_layers(x_1):
    model = load_model(ModelConfig(family="inceptionv1", pretrained=False, device="cpu"))
    assert model.layer_names() == list(ALL_LAYER_DIMS) and model.weights_sha256 is None
    early = [
        "conv2d0",
        "conv2d1_pre_relu",
        "conv2d2",
        "mixed3a",
        "mixed3a_5x5",
        "mixed3b_3x3_bottleneck",
    ]
    acts = model.activations(x_1, early)
    for layer in early:
        assert acts[layer].shape[1:] == (ALL_LAYER_DIMS[layer], *[lucid_geometry(layer).size] * 2)
    assert model(x_1).shape == (1, 1008)  # inception5h logits, softmax removed


def test_inceptionv1_loads_a_pth_from_weights_dir(tmp_path):
    src = load_model(ModelConfig(family="inceptionv1", pretrained=False, device="cpu"))
    torch.save(src.net.state_dict(), tmp_path / "inception5h.pth")  # plain tensors: weights_only
    model = load_model(
        ModelConfig(
            family="inceptionv1", weights_dir=str(tmp_path), allow_download=False, device="cpu"
        )
    )
    assert (
        model.weights_sha256
        == hashlib.sha256((tmp_path / "inception5h.pth").read_bytes()).hexdigest()
    )
    for (name, got), want in zip(model.state_dict().items(), src.state_dict().values()):
        assert torch.equal(got, want), name


def test_timm_resnet18_random_init_reads_layer2_by_module_path():
    model = load_model(ModelConfig(family="timm", name="resnet18", pretrained=False, device="cpu"))
    x = torch.rand(1, 3, 224, 224)
    entered = []
    hook = model.net.layer3.register_forward_pre_hook(lambda *_: entered.append(1))
    try:
        acts = model.activations(x, ["layer2"])["layer2"]
    finally:
        hook.remove()
    assert acts.shape == (1, 128, 28, 28) and not entered
    assert model.layer_dim("layer2") == 128
    geo = model.geometry("layer2")
    assert (geo.stride, geo.size) == (8, 28) and geo.rf_size > 8
    assert model(x).shape == (1, 1000)
    with pytest.raises(ValueError, match="layer2"):
        model.activations(x, ["layer9"])
