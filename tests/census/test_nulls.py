"""Tests for sae_vision/census/nulls.py: each null network changes exactly the weights it should."""

import copy

import pytest
import torch
import torch.nn as nn

from sae_vision.census import nulls as NL


def test_nulls_permute_redraw_or_scramble_only_the_convolutions_they_should(bvlc_model):
    before = {k: v.clone() for k, v in bvlc_model.state_dict().items()}
    perm = NL.permuted_input_null(bvlc_model, "mixed3b", seed=0)
    fed = {id(c) for c in NL.feeding_convs(perm, "mixed3b")}
    assert len(fed) == 4  # 1x1, 3x3_bottleneck, 5x5_bottleneck, pool_reduce
    for (name, real_m), (_, null_m) in zip(bvlc_model.named_modules(), perm.named_modules()):
        if not isinstance(real_m, nn.Conv2d):
            continue
        if id(null_m) in fed:  # same weights per output filter, in another input order
            assert not torch.equal(real_m.weight, null_m.weight), name
            assert torch.allclose(real_m.weight.sum(1), null_m.weight.sum(1), atol=1e-5), name
            assert torch.equal(real_m.weight.flatten(1).sort(1).values,
                               null_m.weight.flatten(1).sort(1).values)
        else:
            assert torch.equal(real_m.weight, null_m.weight), name
    re = NL.reinit_null(bvlc_model, "mixed3b", seed=0)
    redrawn = {id(c) for c in NL.convs_above_stem(re, "mixed3b")}
    assert len(redrawn) == 12  # six convolutions in each of mixed3a and mixed3b
    for (name, real_m), (_, null_m) in zip(bvlc_model.named_modules(), re.named_modules()):
        if isinstance(real_m, nn.Conv2d) and id(null_m) in redrawn:
            w0, w1 = real_m.weight.flatten(1), null_m.weight.flatten(1)
            assert not torch.equal(w0, w1)
            assert torch.allclose(w0.std(1), w1.std(1), rtol=0.35)
        elif isinstance(real_m, nn.Conv2d):
            assert torch.equal(real_m.weight, null_m.weight), name  # the stem is kept
    sp = NL.spatial_null(bvlc_model, "mixed3b", seed=0)
    scrambled = {id(c) for c in NL.convs_above_stem(sp, "mixed3b")}
    n_changed = 0
    for (name, real_m), (_, null_m) in zip(bvlc_model.named_modules(), sp.named_modules()):
        if not isinstance(real_m, nn.Conv2d):
            continue
        w0, w1 = real_m.weight, null_m.weight
        if id(null_m) in scrambled and w0.shape[-1] > 1:
            # Same taps per (filter, input channel), so the same channel sums; new positions.
            assert not torch.equal(w0, w1), name
            assert torch.equal(w0.flatten(2).sort(2).values, w1.flatten(2).sort(2).values)
            assert torch.allclose(w0.sum((2, 3)), w1.sum((2, 3)), atol=1e-5)
            n_changed += 1
        else:
            assert torch.equal(w0, w1), name  # 1x1 convolutions and the stem are kept
    assert n_changed == 4  # the 3x3 and 5x5 convolutions of mixed3a and mixed3b
    assert NL.input_block_of(bvlc_model, "mixed3b") == "mixed3a"
    assert NL.input_block_of(bvlc_model, "conv2d2") is None
    after = bvlc_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the real model is untouched


@pytest.mark.parametrize("name", sorted(NL.NULLS))
def test_every_null_builds_on_the_device_of_its_model(bvlc_model, name):
    # A `meta` copy stands in for a GPU model: any CPU tensor mixed into its weights fails.
    meta = copy.deepcopy(bvlc_model).to("meta")
    null = NL.NULLS[name](meta, "mixed3b", seed=0)
    assert {p.device.type for p in null.parameters()} == {"meta"}
