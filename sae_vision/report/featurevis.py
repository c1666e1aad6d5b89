"""Feature visualisation with Lucent's optvis, for SAE features and for neurons.

The image is Lucent's decorrelated, FFT-parameterised image, optimised through its standard
transforms (pad, jitter, scale, rotate). The objective of an SAE feature is its encoder
pre-activation on the layer's activation vector at the centre position; that of a neuron is the
channel's activation at the centre. Many units are optimised at once: batch element i of the
image parameterisation maximises unit i, and the objective sums over the batch.

Our models take RGB in [0, 1] and normalise internally, so Lucent's own preprocessing is off.
Results are cached on disk, keyed by the model weights, layer, dictionary, steps and image size.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sae_vision.core import atomic_write, content_hash, write_json


def _lucent():
    """Lucent's optvis modules; kornia's import-time torch.jit deprecation warning is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from lucent.optvis import objectives, param, render, transform
        from lucent.optvis.param import spatial
    return objectives, param, render, transform, spatial


class _LayerProbe(nn.Module):
    """What render_vis sees as "the model": the net cut at `layer`, exposed through one module.

    Lucent hooks every sub-module of the model it is given, and never removes those hooks, so the
    real network is held in a plain list (invisible to it); only `out` is hooked, and it passes
    the layer's output through for the objective to read as T("out").
    """

    def __init__(self, model, layer: str):
        super().__init__()
        self._model = [model]
        self.layer = layer
        self.out = nn.Identity()

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.out(self._model[0].activations(x_B3HW, [self.layer])[self.layer])


def centre(acts_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C] activation vectors at the centre position of each map."""
    _, _, h, w = acts_BCHW.shape
    return acts_BCHW[:, :, h // 2, w // 2]


def unit_objective(unit_ids: Sequence[int], encode: Callable | None = None):
    """A Lucent objective: batch element i maximises unit_ids[i] at the centre position.

    encode maps [B, D] activation vectors to [B, F] unit responses (an SAE's pre_acts); None means
    the units are the layer's channels.
    """
    Objective = _lucent()[0].Objective
    ids = torch.as_tensor(list(unit_ids), dtype=torch.long)

    def objective(T) -> torch.Tensor:
        acts_BD = centre(T("out"))
        resp_BF = encode(acts_BD) if encode is not None else acts_BD
        chosen = resp_BF.gather(1, ids.to(resp_BF.device)[:, None])
        return -chosen.sum()  # Lucent minimises

    kind = "feature" if encode is not None else "channel"
    return Objective(objective, name=f"{kind}s {list(unit_ids)[:4]}...",
                     description=f"centre {kind} objective")


class RedirectedReLU(torch.autograd.Function):
    """ReLU whose backward lets a dead unit be pushed up (Lucid's redirected ReLU gradient).

    A unit that starts inactive at the probed position has zero gradient through a plain ReLU,
    so the optimisation would never move. Per batch element, when the ReLU gradient is all zero,
    the incoming gradient is passed through except where it would push a negative input lower.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        neg = x < 0
        relu_grad = grad.masked_fill(neg, 0.0)
        alive = relu_grad.flatten(1).ne(0).any(1)
        if bool(alive.all()):  # the usual case once the optimisation is under way
            return relu_grad
        redirected = grad.masked_fill(neg & (grad > 0), 0.0)  # descent lowers x where grad > 0
        return torch.where(alive.view(-1, *[1] * (x.dim() - 1)), relu_grad, redirected)


@contextmanager
def redirected_relus(model: nn.Module) -> Iterator[None]:
    """Inside the block every nn.ReLU of model uses the redirected gradient (forward unchanged)."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    for m in relus:
        m.forward = RedirectedReLU.apply  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for m in relus:
            del m.forward


@contextmanager
def _frozen(*modules) -> Iterator[None]:
    """Parameters need no gradient while only the image is optimised (saves memory and time)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def lucent_device() -> torch.device:
    """The device Lucent's image parameterisation and transforms use (fixed at its import)."""
    return _lucent()[4].device


def render_units(model, layer: str, unit_ids: Sequence[int], sae=None, steps: int = 128,
                 size: int = 128, batch_size: int = 16, seed: int = 0, lr: float = 0.05,
                 ) -> np.ndarray:
    """[N, size, size, 3] float images in [0, 1] maximising each unit (SAE feature or channel).

    It runs on Lucent's device (CUDA when available); the model and SAE go back afterwards.
    """
    _, param, render, transform, _ = _lucent()
    device = lucent_device()
    homes = [(m, next(m.parameters()).device) for m in (model, sae) if m is not None]
    for m, _ in homes:
        m.to(device)
    encode = sae.pre_acts if sae is not None else None
    probe = _LayerProbe(model, layer)
    np_state, torch_state = np.random.get_state(), torch.random.get_rng_state()
    out = []
    try:
        torch.manual_seed(seed)
        np.random.seed(seed)  # Lucent's jitter/scale/rotate draw from numpy's global generator
        with _frozen(model, sae), redirected_relus(model):
            for lo in range(0, len(unit_ids), batch_size):
                ids = list(unit_ids[lo: lo + batch_size])
                images = render.render_vis(
                    probe, unit_objective(ids, encode),
                    param_f=functools.partial(param.image, size, batch=len(ids), fft=True,
                                              decorrelate=True),
                    optimizer=lambda params: torch.optim.Adam(params, lr=lr),
                    transforms=transform.standard_transforms, thresholds=(steps,),
                    preprocess=False, progress=False, show_image=False,
                    fixed_image_size=size,  # Lucent would otherwise upsample to 224
                )
                out.append(images[-1])
    finally:
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
        for m, home in homes:  # leave the caller's modules where they were
            m.to(home)
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.float32)


def unit_response(model, layer: str, images_NHW3: np.ndarray, unit_ids: Sequence[int],
                  sae=None) -> torch.Tensor:
    """[N] response of unit_ids[i] to image i at the centre position (no transforms)."""
    device = next(model.parameters()).device
    x = torch.as_tensor(images_NHW3, dtype=torch.float32).permute(0, 3, 1, 2).to(device)
    with torch.no_grad():
        acts_BD = centre(model.activations(x, [layer])[layer])
        resp = sae.pre_acts(acts_BD) if sae is not None else acts_BD
        return resp.gather(1, torch.as_tensor(list(unit_ids), device=device)[:, None])[:, 0].cpu()


def cache_key(weights_sha: str | None, layer: str, run: str, steps: int, size: int,
              seed: int) -> str:
    """Folder name of cached visualisations: every setting that changes the pixels."""
    return content_hash({"weights": weights_sha, "layer": layer, "run": run, "steps": steps,
                         "size": size, "seed": seed, "v": 1}, n=16)


def visualise(model, layer: str, unit_ids: Sequence[int], cache_root: str | Path, run: str,
              sae=None, steps: int = 128, size: int = 128, batch_size: int = 16,
              seed: int = 0) -> dict[int, Path]:
    """unit id -> PNG path, rendering only the units not already cached.

    run names the dictionary: an SAE run name plus its checkpoint sha, or "neurons".
    """
    from PIL import Image

    key = cache_key(getattr(model, "weights_sha256", None), layer, run, steps, size, seed)
    folder = Path(cache_root) / key
    folder.mkdir(parents=True, exist_ok=True)
    paths = {int(u): folder / f"u{int(u)}.png" for u in unit_ids}
    todo = [u for u, p in paths.items() if not p.exists()]
    if todo:
        images = render_units(model, layer, todo, sae=sae, steps=steps, size=size,
                              batch_size=batch_size, seed=seed)
        for u, img in zip(todo, images):
            arr = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
            with atomic_write(paths[u]) as tmp:  # a killed run never leaves half an image
                Image.fromarray(arr).save(tmp, format="PNG")
        write_json(folder / "key.json", {
            "weights": getattr(model, "weights_sha256", None), "layer": layer, "run": run,
            "steps": steps, "size": size, "seed": seed})
    return paths
