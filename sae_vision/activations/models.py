"""InceptionV1 (BVLC GoogLeNet, Lucent's inception5h) and timm classifiers behind one hooked API.

Every public layer is the output of its own nn.Module, so forward hooks can read it
(`activations`, which also cuts the pass short) and replace it (`splice`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from sae_vision.core import (
    ALL_LAYER_DIMS,
    MODELS,
    ModelConfig,
    PlantConfig,
    check_layer,
    check_plant,
    to_plain,
)

from .devices import pick_device
from .googlenet import caffe_key, make_googlenet, same_pads
from .plant import LayerRotation
from .weights import file_sha256, find_weights

BVLC_MEAN_BGR = (104.0, 116.7, 122.7)


class LayerGeometry(NamedTuple):
    """Where a layer sits in the input: position (y, x) is centred on offset + stride * (y, x)."""

    stride: int  # input pixels between neighbouring positions
    rf_size: int  # receptive-field side in input pixels (padding included)
    offset: float  # input pixel index (0-based) of the centre of position 0
    size: int  # spatial side of the layer at input_size


def _load_googlenet(net: nn.Module, path: Path) -> None:
    with np.load(path, allow_pickle=False) as npz:
        state = {k: torch.from_numpy(npz[caffe_key(k)]) for k in net.state_dict()}
        if len(npz.files) != len(state):
            raise ValueError(f"{path} holds {len(npz.files)} arrays; GoogLeNet has {len(state)}")
    net.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Receptive fields of the Lucid layers

# (kernel, stride) of every op that moves the receptive field; 1x1 convs and LRN do not.
_TO_MIXED3A = [(7, 2), (3, 2), (3, 1), (3, 2)]  # conv2d0, maxpool0, conv2d2, maxpool1
# Extra ops inside a block; "" is the concat, whose reach is that of its widest (5x5) branch.
_BRANCH_OPS = {
    "1x1": [],
    "3x3_bottleneck": [],
    "3x3": [(3, 1)],
    "5x5_bottleneck": [],
    "5x5": [(5, 1)],
    "pool_reduce": [(3, 1)],
    "": [(5, 1)],
}


def lucid_geometry(layer: str, input_size: int = 224) -> LayerGeometry:
    """Analytic geometry of a Lucid layer under TF SAME padding (Lucent's fixed pads agree at 224)."""
    check_layer(layer)
    name = layer.removesuffix("_pre_relu")
    stem = {"conv2d0": 1, "conv2d1": 2, "conv2d2": 3}
    if name in stem:
        ops = _TO_MIXED3A[: stem[name]]
    else:
        block, _, branch = name.partition("_")
        ops = _TO_MIXED3A + ([(5, 1)] if block == "mixed3b" else []) + _BRANCH_OPS[branch]
    n, stride, rf, offset = input_size, 1, 1, 0.0
    for k, s in ops:
        rf += (k - 1) * stride
        # A window's centre sits (k - 1) / 2 past its first tap; asymmetric pads shift it.
        offset += ((k - 1) / 2 - same_pads(n, k, s)[0]) * stride
        stride, n = stride * s, math.ceil(n / s)
    return LayerGeometry(stride, rf, offset, n)


# --------------------------------------------------------------------------------------------
# The hooked model


def _as_1C11(v: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1)  # broadcasts over BCHW


class _Stop(Exception):
    """Raised by a hook once every requested layer is captured, to skip the rest of the net."""


class VisionModel(nn.Module):
    """A classifier whose named layers can be read, cut short at, and spliced via forward hooks."""

    def __init__(
        self,
        family: str,
        net: nn.Module,
        layer_paths: dict[str, str],
        scale: float | Sequence[float] | torch.Tensor,
        shift: float | Sequence[float] | torch.Tensor,
        bgr: bool = False,
        input_size: int = 224,
        weights_path: Path | None = None,
    ):
        super().__init__()
        self.family, self.net, self.bgr, self.input_size = family, net, bgr, input_size
        self._paths = layer_paths  # public layer name -> module path inside net
        self.register_buffer("scale", _as_1C11(scale), persistent=False)
        self.register_buffer("shift", _as_1C11(shift), persistent=False)
        self.weights_path = str(weights_path) if weights_path else None
        self.weights_sha256 = file_sha256(weights_path) if weights_path else None
        self._dims: dict[str, int] = {}  # probed timm channel counts
        self.plant: LayerRotation | None = None  # the planted change of basis (install_plant)
        self.plant_id: str | None = None  # its hash: part of the census memo key

    def preprocess(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> the network's own input convention (channel order, scale, mean)."""
        x_B3HW = x_B3HW.flip(1) if self.bgr else x_B3HW
        return x_B3HW * self.scale - self.shift

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Logits for RGB images in [0, 1]."""
        return self.net(self.preprocess(x_B3HW))

    def layer_names(self) -> list[str]:
        """Every layer accepted by activations / splice / geometry."""
        return list(self._paths)

    def _module(self, layer: str) -> nn.Module:
        if layer not in self._paths:
            if self.family != "timm":
                check_layer(layer)  # raises, listing the Lucid names
            raise ValueError(
                f"layer={layer!r} is not a module of {self.family} model; "
                f"valid layers are: {', '.join(self._paths)}"
            )
        return self.net.get_submodule(self._paths[layer])

    def activations(self, x_B3HW: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Outputs of `layers`; the pass stops once the last of them is computed.

        Grad mode is the caller's: wrap in torch.no_grad() to cache, leave it on to backprop.
        """
        modules = {name: self._module(name) for name in layers}
        if not modules:
            return {}
        out: dict[str, torch.Tensor] = {}

        def capture(name: str) -> Callable:
            def hook(_m, _inputs, output):
                out[name] = output
                if len(out) == len(modules):
                    raise _Stop  # nothing downstream is needed: skip its compute

            return hook

        handles = [m.register_forward_hook(capture(name)) for name, m in modules.items()]
        try:
            self(x_B3HW)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return {name: out[name] for name in modules}

    @contextmanager
    def splice(
        self, layer: str, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[VisionModel]:
        """Inside the block, `layer`'s output is replaced by fn(output) for every forward pass."""
        handle = self._module(layer).register_forward_hook(lambda _m, _inputs, output: fn(output))
        try:
            yield self
        finally:
            handle.remove()

    def install_plant(self, plant: PlantConfig) -> None:
        """Rotate `plant.layer`'s output by an orthogonal map (model.plant): every reader (cache,
        splice, census, null networks copied from this model) sees y = R h; the next module of
        the network gets R^T y back, so the logits do not change."""
        if self.plant is not None:
            raise ValueError("this model already carries a plant")
        module = self._module(plant.layer)
        names = list(self.net._modules)
        path = self._paths[plant.layer]
        if path not in names or names.index(path) + 1 >= len(names):
            raise ValueError(f"model.plant.layer={plant.layer!r} is not a block or conv output "
                             "of the network's main path; choose e.g. mixed3a or mixed3b")
        nxt = self.net._modules[names[names.index(path) + 1]]
        self.plant = LayerRotation(plant, self.layer_dim(plant.layer))
        self.plant_id = self.plant.plant_id
        module.register_forward_hook(self.plant.output_hook)
        nxt.register_forward_pre_hook(self.plant.input_pre_hook)

    def layer_dim(self, layer: str) -> int:
        """Channels of `layer`: the Lucid table, or a probe pass for timm modules."""
        self._module(layer)
        if self.family != "timm":
            return ALL_LAYER_DIMS[layer]
        if layer not in self._dims:
            x = torch.zeros(1, 3, self.input_size, self.input_size, device=self.scale.device)
            with torch.no_grad():
                self._dims[layer] = self.activations(x, [layer])[layer].shape[1]
        return self._dims[layer]

    def geometry(self, layer: str) -> LayerGeometry:
        """Stride, receptive field, centre offset and side of `layer` at input_size."""
        self._module(layer)
        if self.family == "timm":
            return self._probe_geometry(layer)
        return lucid_geometry(layer, self.input_size)

    def _probe_geometry(self, layer: str) -> LayerGeometry:
        # No analytic table for arbitrary timm nets: take the input-gradient support of the centre
        # unit over a few random images. It is clipped at the border, so rf is approximate.
        n = self.input_size
        x = torch.rand(2, 3, n, n, device=self.scale.device, requires_grad=True)
        with torch.enable_grad():
            acts = self.activations(x, [layer])[layer]
            size = acts.shape[-1]
            acts[:, :, size // 2, size // 2].sum().backward()
        stride = max(n // size, 1)
        rows = x.grad.abs().sum((0, 1, 3)).nonzero().flatten().tolist()
        if not rows:
            raise RuntimeError(f"no input gradient reaches {layer}; cannot measure its geometry")
        lo, hi = rows[0], rows[-1]
        return LayerGeometry(stride, int(hi - lo + 1), (lo + hi) / 2 - stride * (size // 2), size)


# --------------------------------------------------------------------------------------------
# Builders


def _lucid_paths(net: nn.Module) -> dict[str, str]:
    """Lucid layer -> module path; `X_pre_relu` is the conv feeding `X` (Lucent's X_pre_relu_conv)."""
    flat = {path.replace(".", "_"): path for path, _ in net.named_modules() if path}
    return {
        name: flat[name + "_conv" if name.endswith("_pre_relu") else name]
        for name in ALL_LAYER_DIMS
    }


def _build_googlenet(cfg: ModelConfig) -> VisionModel:
    path = find_weights(cfg) if cfg.pretrained else None
    net = make_googlenet()
    if path:
        _load_googlenet(net, path)
    return VisionModel(
        "googlenet_bvlc", net, _lucid_paths(net), 255.0, BVLC_MEAN_BGR, bgr=True, weights_path=path
    )


def _build_inceptionv1(cfg: ModelConfig) -> VisionModel:
    path = find_weights(cfg) if cfg.pretrained else None  # before the slow Lucent import
    from lucent.modelzoo import inceptionv1

    # Plain ReLU: true gradients, like googlenet_bvlc (Lucent's default redirects them).
    net = inceptionv1(pretrained=False, redirected_ReLU=False)
    if path:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.softmax2 = nn.Identity()  # forward returns the 1008 inception5h logits, not softmax
    return VisionModel("inceptionv1", net, _lucid_paths(net), 255.0, 117.0, weights_path=path)


def _build_timm(cfg: ModelConfig) -> VisionModel:
    import timm

    net = timm.create_model(cfg.name, pretrained=cfg.pretrained)
    data = timm.data.resolve_model_data_config(net)
    mean, std = torch.tensor(data["mean"]), torch.tensor(data["std"])
    paths = {path: path for path, _ in net.named_modules() if path}
    size = data["input_size"][-1]
    return VisionModel("timm", net, paths, scale=1 / std, shift=mean / std, input_size=size)


_BUILDERS = {
    "googlenet_bvlc": _build_googlenet,
    "inceptionv1": _build_inceptionv1,
    "timm": _build_timm,
}


def load_model(cfg: ModelConfig) -> VisionModel:
    """Build cfg.family with its weights, frozen and in eval mode, on cfg.device."""
    if cfg.family not in _BUILDERS:
        raise ValueError(
            f"model.family={cfg.family!r} is not valid; choose one of {sorted(MODELS)}"
        )
    plant = PlantConfig(**to_plain(cfg.plant))  # a dataclass or OmegaConf node: plain lists
    check_plant(plant, cfg.family)
    model = _BUILDERS[cfg.family](cfg)
    if plant.kind != "none":
        model.install_plant(plant)
    device = pick_device(cfg.device, "model.device")
    return model.eval().requires_grad_(False).to(device)
