"""Host-side batch work of the cache stage, kept off the intra-op pool that the forward uses."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from .images import Item


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed host work on one intra-op thread: on 2 cores the small ops around the
    forward (resize, stacking, norms, gather, encoding) run several times slower when they share
    the cores with the pool (stacking a batch: 20 ms vs 2 ms; a resize: 29 ms vs 1.5 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def single_threaded(batches: Iterable[list[Item]]) -> Iterator[list[Item]]:
    """Decode in one thread (see one_thread)."""
    it = iter(batches)
    while True:
        with one_thread():
            items = next(it, None)
        if items is None:
            return
        yield items


class HostBatch:
    """Stacks each batch of images for the model's device. On CUDA into fresh pinned memory, so
    that the non-blocking copy really is asynchronous; otherwise into one buffer reused from
    batch to batch, on one thread (a fresh 19 MB batch on the 2-thread pool costs ~20 ms of
    page faults and contention against ~1.5 ms this way)."""

    def __init__(self, device: torch.device):
        self.device, self.buf = device, None

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        shape = (len(images), *images[0].shape)
        if self.device.type == "cuda":
            buf = torch.empty(shape, dtype=images[0].dtype, pin_memory=True)
            return torch.stack(images, out=buf).to(self.device, non_blocking=True)
        buf = self.buf
        if (buf is None or buf.dtype != images[0].dtype or buf.shape[1:] != shape[1:]
                or len(buf) < len(images)):
            self.buf = buf = torch.empty(shape, dtype=images[0].dtype)
        with one_thread():
            x = torch.stack(images, out=buf[:len(images)])
        # The model never writes into its input, and nothing keeps x past its batch.
        return x.to(self.device)
