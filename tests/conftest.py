"""Shared fixtures: the real BVLC GoogLeNet weights from ../shared/weights, loaded once."""

import os
from pathlib import Path

import pytest

# Point the weights search at the workplace copy unless the user already chose a folder.
_SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"
if not os.environ.get("SAE_VISION_WEIGHTS_DIR") and _SHARED_WEIGHTS.is_dir():
    os.environ["SAE_VISION_WEIGHTS_DIR"] = str(_SHARED_WEIGHTS)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """Folder holding bvlc_googlenet.npz and its reference outputs; skips when absent."""
    path = Path(os.environ.get("SAE_VISION_WEIGHTS_DIR") or _SHARED_WEIGHTS)
    if not (path / "bvlc_googlenet.npz").is_file():
        pytest.skip(f"no bvlc_googlenet.npz in {path}; set SAE_VISION_WEIGHTS_DIR")
    return path


@pytest.fixture(scope="session")
def bvlc_model(weights_dir):
    """The pretrained BVLC GoogLeNet on CPU, shared by all tests: leave it as you found it."""
    from sae_vision.activations.models import load_model
    from sae_vision.core.config import ModelConfig

    return load_model(
        ModelConfig(family="googlenet_bvlc", weights_dir=str(weights_dir), device="cpu")
    )


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and lose a lot on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def count_ops():
    """A context manager that counts the aten ops run inside it, by name (`nonzero`, `_to_copy`,
    `_local_scalar_dense` for `.item()`, `index[bool]` for a boolean-mask index):
    device-independent evidence of copies and host syncs.
    `float_counts` counts only the ops whose first argument is a floating-point tensor (data, as
    against indices)."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts: collections.Counter = collections.Counter()
            self.float_counts: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name.startswith("index") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple))
                              else ())):
                name += "[bool]"  # a boolean mask index: its result's size is read on the host
            self.counts[name] += 1
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                self.float_counts[name] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter


@pytest.fixture
def fake_gpus(monkeypatch):
    """A setter `gpus(n)` that makes torch see n GPUs (no GPU needed); it returns the list of
    indices later passed to torch.cuda.set_device."""
    import torch

    chosen: list[int] = []

    def gpus(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1] if chosen else 0)
        return chosen
    return gpus
