"""Tests for sae_vision/evaluate/fidelity.py: reconstruction and feature health, the splice, batching.

The end-to-end splice numbers (identity, zero and mean SAEs against the ablation baselines) and
the held-out image choice are tested through the stage in test_evaluate.py."""

import torch

from sae_vision.evaluate import fidelity
from tests.evaluate.test_stage import identity_sae


def test_branch_layer_splice_changes_only_that_branch(bvlc_model):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = bvlc_model.activations(x, ["mixed3b"])["mixed3b"]
        with bvlc_model.splice("mixed3b_5x5", fidelity.zero_fn):
            spliced = bvlc_model.activations(x, ["mixed3b"])["mixed3b"]
    lo, hi = 128 + 192, 128 + 192 + 96  # mixed3b = concat(1x1, 3x3, 5x5, pool_reduce)
    assert full[:, lo:hi].abs().max() > 0 and spliced[:, lo:hi].abs().max() == 0
    assert torch.equal(spliced[:, :lo], full[:, :lo]) and torch.equal(spliced[:, hi:], full[:, hi:])


def test_dead_counts_top_up_from_training_vectors_only_when_asked():
    g = torch.Generator().manual_seed(0)
    held = [torch.rand(30, 4, generator=g) for _ in range(2)]
    train = [torch.rand(50, 4, generator=g) for _ in range(4)]
    sae = identity_sae(4)
    r0, d0 = fidelity.reconstruction_metrics(sae, held, "cpu", 0.5)
    assert d0.n == 60 and not r0["features"]["includes_train_vectors"]
    assert r0["features"]["n_dead"] == 4  # the -e_i atoms never fire on positive data
    r1, d1 = fidelity.reconstruction_metrics(sae, held, "cpu", 0.5, iter(train), 120)
    assert d1.n == 120 and r1["features"]["includes_train_vectors"]
    assert r1["reconstruction"]["n_vectors"] == 60  # reconstruction stays held-out only


def test_batches_of_rebatches_and_stops_at_the_limit():
    chunks = [torch.arange(n * 2.0).view(n, 2) for n in (3, 5, 4)]
    out = list(fidelity.batches_of(chunks, 4, limit=10))
    assert [len(b) for b in out] == [4, 4, 2]
    assert torch.equal(torch.cat(out), torch.cat(chunks)[:10])
    assert [len(b) for b in fidelity.batches_of(chunks, 5)] == [5, 5, 2]
