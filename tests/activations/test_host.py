"""Host-side batch work of the cache stage: one reused input buffer, one thread, restored."""

import pytest
import torch

from sae_vision.activations.host import HostBatch, one_thread, single_threaded


def test_cpu_batches_are_stacked_into_one_reused_buffer():
    host = HostBatch(torch.device("cpu"))
    ptrs = []
    for n in (3, 1, 3):  # a short batch, then a full one again
        images = [torch.rand(3, 8, 8) for _ in range(n)]
        x = host(images)
        assert torch.equal(x, torch.stack(images)) and x.is_contiguous()
        ptrs.append(x.data_ptr())
    assert len(set(ptrs)) == 1  # no fresh allocation after the first batch
    bigger = [torch.rand(3, 8, 8) for _ in range(5)]
    assert torch.equal(host(bigger), torch.stack(bigger))  # outgrows the buffer: a new one


def test_host_work_runs_on_one_thread_and_restores_the_pool():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def batches():
            for i in range(2):
                seen.append(torch.get_num_threads())
                yield [i]

        got = []
        for items in single_threaded(batches()):
            got.append((items, torch.get_num_threads()))
        assert seen == [1, 1] and got == [([0], 2), ([1], 2)]
        with pytest.raises(RuntimeError), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
