"""The exemplar score's embedding: when it can run, and the held-out vectors with positions."""

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
