"""The exemplar score's embedding: when it can run, and the held-out vectors with positions."""

import torch

from sae_vision.evaluate.exemplars import skip_reason


def test_exemplar_score_runs_only_with_images_and_a_later_googlenet_block():
    assert skip_reason("mixed3b", "mixed4c", "googlenet_bvlc", None) is None
    assert skip_reason("mixed3a_3x3_pre_relu", "mixed3b", "inceptionv1", None) is None
    assert "empty" in skip_reason("mixed3b", "", "googlenet_bvlc", None)
    assert "array" in skip_reason("mixed3b", "mixed4c", "googlenet_bvlc", "array")
    assert "timm" in skip_reason("mixed3b", "mixed4c", "timm", None)
    # Not later: the same block, an earlier one, or no block at all.
    for later in ("mixed3b", "mixed3a", "fc8"):
        assert "not a block after mixed3b" in skip_reason("mixed3b", later, "googlenet_bvlc",
                                                          None)


def test_spread_held_out_sample_covers_every_held_out_image_first_does_not(tmp_path):
    from pathlib import Path

    import numpy as np

    from sae_vision.activations import shards
    from sae_vision.evaluate.exemplars import held_out_with_pos
    from sae_vision.sae import RunInfo

    # 3 shards of 4 images x 50 positions (sampling=all-like: many vectors per image).
    chunks = []
    for img in range(12):
        acts = np.zeros((50, 6), np.float32)
        acts[:, 0], acts[:, 1] = img, np.arange(50)  # each row names its image and position
        pos = np.stack([np.full(50, img), np.arange(50) // 10, np.arange(50) % 10], 1)
        chunks.append((acts, pos, {img: f"p{img}"}))
    shards.write_cache(tmp_path, chunks, {"dim": 6}, chunks_per_shard=4)
    info = RunInfo(Path("x"), "x", "mixed3b", tmp_path, ("shard-000001.tar", "shard-000002.tar"),
                   ("shard-000000.tar",), "topk", 8, 6, {})
    first, fpos = held_out_with_pos(info, 120)
    spread, spos = held_out_with_pos(info, 120, spread=True)
    again, _ = held_out_with_pos(info, 120, spread=True)
    assert first.shape == spread.shape == (120, 6) and torch.equal(spread, again)
    assert set(fpos[:, 0].tolist()) == {4, 5, 6}  # the first 120 vectors: three images
    assert set(spos[:, 0].tolist()) == set(range(4, 12))  # every held-out image
    assert torch.equal(spread[:, 0], spos[:, 0].float())  # each vector keeps its position
    assert torch.equal(spread[:, 1], (spos[:, 1] * 10 + spos[:, 2]).float())
    assert (spos[1:, 0] >= spos[:-1, 0]).all()  # shard order
    everything, _ = held_out_with_pos(info, 10_000, spread=True)
    assert len(everything) == 400
