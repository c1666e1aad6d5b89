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
