"""loop: the schedules and the optimizer the training loop uses (the loop itself runs end to end
in test_train.py, on planted data)."""

from __future__ import annotations

import pytest
import torch

from sae_vision.core.config import SAEConfig, TrainConfig
from sae_vision.sae.architectures import make_sae
from sae_vision.sae.loader import MemoryBatches
from sae_vision.sae.loop import l1_factor, lr_factor, make_optimizer, train_loop


def test_lr_warms_up_then_decays_to_zero_and_l1_ramps():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert l1_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert l1_factor(9, 100, 0.1) == 1.0 and l1_factor(0, 100, 0.0) == 1.0



def test_loop_uses_the_optimizer_and_model_it_is_given(one_thread):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", n_features=32, k=4), 8)
    opt = make_optimizer(sae, 1e-3)
    calls = []

    def model(x_BD, dead_mask=None):  # a wrapper, as DDP or torch.compile would be
        calls.append(len(x_BD))
        return sae(x_BD, dead_mask=dead_mask)

    cfg = TrainConfig(n_steps=3, batch_size=16, log_every=3, device="cpu")
    train_loop(sae, MemoryBatches(torch.randn(64, 8), 16, seed=0), cfg, sae.cfg,
               log=lambda m, s: None, optimizer=opt, model=model)
    assert calls == [16, 16, 16]
    assert all(s["step"].item() == 3 for s in opt.state.values())  # our optimizer stepped


# Ops whose result size or value the host must read: on a GPU each waits for the queued work.
HOST_SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "index[bool]", "index_put[bool]",
              "index_put_[bool]", "bincount", "repeat_interleave", "unique", "_unique2")


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu_l1"])
def test_a_training_step_that_does_not_log_makes_no_host_sync(arch, count_ops, one_thread):
    # sync_free=True is what every device but the CPU runs by default (the CPU, where a host
    # read is free, keeps its per-step divergence check and compacted AuxK pairs).
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=arch, n_features=64, k=4, aux_k=8), 8)
    # dead_window=16: after one step of 16 vectors, features that did not fire are dead, so the
    # AuxK path runs in the counted step.
    cfg = TrainConfig(n_steps=6, batch_size=16, log_every=6, dead_window=16, device="cpu")
    counter = count_ops()
    counted = []

    def on_step(done):  # counts the whole third step: batch, forward, backward, update
        if done == 2:
            counter.__enter__()
        elif done == 3:
            counter.__exit__(None, None, None)
            counted.append(dict(counter.counts))
    train_loop(sae, MemoryBatches(torch.randn(256, 8), 16, seed=0), cfg, sae.cfg,
               log=lambda m, s: None, optimizer=make_optimizer(sae, 1e-3), on_step=on_step,
               sync_free=True)
    (ops,) = counted
    # the step was counted (relu_l1's fused loss folds its biases into plain mm GEMMs)
    assert ops.get({"topk": "topk", "relu_l1": "mm"}.get(arch, "addmm"), 0) >= 1
    assert {k: v for k, v in ops.items() if k in HOST_SYNCS} == {}
