"""BVLC GoogLeNet's architecture, with TensorFlow SAME padding and Lucid/Lucent module names,
and the Caffe name of each of its parameters (what the weights files are keyed by)."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


def same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TF SAME padding (before, after) of one axis; an odd extra pixel goes after."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    (top, bottom), (left, right) = same_pads(x.shape[-2], k, s), same_pads(x.shape[-1], k, s)
    return F.pad(x, (left, right, top, bottom), value=value)


class _Conv(nn.Conv2d):
    """Conv2d with TF SAME padding; its output is the layer's `_pre_relu` tap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size[0], self.stride[0]))


class MaxPoolSame(nn.Module):
    """Max-pool with TF SAME padding; pads with -inf as TF does, so padding never wins the max."""

    def __init__(self, k: int, s: int):
        super().__init__()
        self.k, self.s = k, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, self.k, self.s, float("-inf")), self.k, self.s)


class _LRN(nn.Module):
    """TF-form LRN x / (1 + 2e-5 * sum_{|j-c|<=2} x_j^2) ** 0.75 (torch divides alpha by size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(x, size=5, alpha=5 * 2e-5, beta=0.75, k=1.0)


class _Inception(nn.Module):
    """Inception block; children carry Lucent's names, so `mixed3a.5x5` reads as mixed3a_5x5."""

    def __init__(self, c_in: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        convs = {
            "1x1": (c_in, c1, 1),
            "3x3_bottleneck": (c_in, c3r, 1),
            "3x3": (c3r, c3, 3),
            "5x5_bottleneck": (c_in, c5r, 1),
            "5x5": (c5r, c5, 5),
            "pool_reduce": (c_in, cp, 1),
        }
        for name, (i, o, k) in convs.items():
            self.add_module(f"{name}_pre_relu_conv", _Conv(i, o, k))
            self.add_module(name, nn.ReLU())  # not inplace: the _pre_relu tap must survive
        self.pool = MaxPoolSame(3, 1)

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._modules[name](self._modules[f"{name}_pre_relu_conv"](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._branch
        return torch.cat(
            [
                b("1x1", x),
                b("3x3", b("3x3_bottleneck", x)),
                b("5x5", b("5x5_bottleneck", x)),
                b("pool_reduce", self.pool(x)),
            ],
            1,
        )


# Channels (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), GoogLeNet paper Table 1.
_BLOCKS = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


def make_googlenet() -> nn.Sequential:
    """BVLC GoogLeNet, randomly initialised; takes BGR 0..255 minus the mean, returns logits."""

    def conv(name: str, c_in: int, c_out: int, k: int, s: int = 1) -> list:
        return [(f"{name}_pre_relu_conv", _Conv(c_in, c_out, k, s)), (name, nn.ReLU())]

    layers = [
        *conv("conv2d0", 3, 64, 7, 2),
        ("maxpool0", MaxPoolSame(3, 2)),
        ("lrn0", _LRN()),
        *conv("conv2d1", 64, 64, 1),
        *conv("conv2d2", 64, 192, 3),
        ("lrn1", _LRN()),
        ("maxpool1", MaxPoolSame(3, 2)),
    ]
    for name, channels in _BLOCKS.items():
        if name in ("4a", "5a"):  # pool names follow Lucent's numbering
            layers.append((f"maxpool{4 if name == '4a' else 10}", MaxPoolSame(3, 2)))
        layers.append((f"mixed{name}", _Inception(*channels)))
    layers += [
        ("avgpool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("classifier", nn.Linear(1024, 1000)),
    ]
    return nn.Sequential(OrderedDict(layers))


_CAFFE_STEM = {
    "conv2d0_pre_relu_conv": "conv1/7x7_s2",
    "conv2d1_pre_relu_conv": "conv2/3x3_reduce",
    "conv2d2_pre_relu_conv": "conv2/3x3",
    "classifier": "loss3/classifier",
}
_CAFFE_BRANCH = {
    "3x3_bottleneck": "3x3_reduce",
    "5x5_bottleneck": "5x5_reduce",
    "pool_reduce": "pool_proj",
}


def caffe_key(param: str) -> str:
    """Caffe name (`inception_3a/5x5_reduce.weight`) of a make_googlenet() parameter."""
    path, kind = param.rsplit(".", 1)
    if path in _CAFFE_STEM:
        return f"{_CAFFE_STEM[path]}.{kind}"
    block, conv = path.split(".")
    branch = conv.removesuffix("_pre_relu_conv")
    return f"inception_{block.removeprefix('mixed')}/{_CAFFE_BRANCH.get(branch, branch)}.{kind}"
