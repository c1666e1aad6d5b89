"""Tests for sae_vision/census/responses.py: running a network on the stimulus battery."""

import torch

from sae_vision.census import curves as C
from sae_vision.census import responses as R
from sae_vision.census import stimuli as S


def test_small_canvas_gives_exactly_the_full_size_response(bvlc_model):
    probe = R.make_probe(bvlc_model, "mixed3b")
    assert probe.size < 224
    full = C.Probe("mixed3b", 224, 14, 7.0 + 8 * 14, 8, 91)
    kw = dict(arc_length_deg=120, max_arc_px=48)
    small = S.curve_sweep([30.0, 200.0], [16.0], size=probe.size,
                          centre=(probe.centre, probe.centre), **kw)
    big = S.curve_sweep([30.0, 200.0], [16.0], size=224, centre=(full.centre, full.centre), **kw)
    a = R.centre_activations(bvlc_model, "mixed3b", small, probe)
    b = R.centre_activations(bvlc_model, "mixed3b", big, full)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
