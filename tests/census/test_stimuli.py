"""The curve-stimulus renderer: deterministic, anti-aliased, and rotating with orientation."""

import numpy as np
import pytest
import torch

from sae_vision.census import stimuli as S

SIZE = 64
CENTRE = ((SIZE - 1) / 2, (SIZE - 1) / 2)  # the rotation centre of a torch.rot90 of the canvas


def _sweep(thetas, radii=(4.0, 8.0, 16.0, 1000.0), **kw):
    return S.curve_sweep(thetas, radii, size=SIZE, centre=CENTRE, max_arc_px=40.0, **kw)


def test_render_is_deterministic_and_in_unit_range():
    t = _sweep(S.orientations(30))
    a, b = S.render(t), S.render(t)
    assert a.shape == (len(t), 3, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_edges_are_anti_aliased_with_fractional_coverage():
    img = S.render(_sweep([17.0], radii=[11.0]))[0, 0]
    frac = ((img > 0.02) & (img < 0.98)).sum().item()
    assert frac >= 20  # an aliased renderer would give only 0 and 1
    assert (img < 0.02).any()  # ...and a solid stroke core


@pytest.mark.parametrize("kind", ["curve", "corner", "line"])
def test_orientation_plus_90_is_the_render_rotated_by_90(kind):
    thetas = np.array([0.0, 25.0, 140.0, 305.0])
    if kind == "curve":
        a, b = _sweep(thetas, radii=[9.0]), _sweep(thetas + 90, radii=[9.0])
    elif kind == "corner":
        a = S.corner_sweep(thetas, [70.0], size=SIZE, centre=CENTRE, length_px=30)
        b = S.corner_sweep(thetas + 90, [70.0], size=SIZE, centre=CENTRE, length_px=30)
    else:
        a = S.shifted_line_sweep(thetas, [5.0], size=SIZE, centre=CENTRE, length_px=30)
        b = S.shifted_line_sweep(thetas + 90, [5.0], size=SIZE, centre=CENTRE, length_px=30)
    # rot90 turns the displayed image counter-clockwise, which is +90° with y pointing up.
    rotated = torch.rot90(S.render(a), 1, dims=(-2, -1))
    assert torch.allclose(rotated, S.render(b), atol=1e-4)


def test_orientation_points_where_the_arc_bulges():
    # θ = 0 bulges right: the arc's apex is at the anchor and the rest lies to its left.
    img = 1 - S.render(_sweep([0.0], radii=[10.0]))[0, 0]
    cols = torch.arange(SIZE).float()
    ink_x = (img.sum(0) * cols).sum() / img.sum()
    assert ink_x < CENTRE[1] - 1
    # θ = 90 bulges up: the ink lies below the anchor (rows grow downwards).
    img = 1 - S.render(_sweep([90.0], radii=[10.0]))[0, 0]
    ink_y = (img.sum(1) * cols).sum() / img.sum()
    assert ink_y > CENTRE[0] + 1


def test_opposite_orientations_are_mirror_images_and_lines_are_half_periodic():
    a = S.render(_sweep([0.0], radii=[10.0]))[0]
    b = S.render(_sweep([180.0], radii=[10.0]))[0]
    assert torch.allclose(a.flip(-1), b, atol=1e-4)  # CENTRE is the flip's centre too
    l0 = S.render(S.make_table("line", [30.0], size=SIZE, centre=CENTRE, length_px=30))
    l1 = S.render(S.make_table("line", [210.0], size=SIZE, centre=CENTRE, length_px=30))
    assert torch.allclose(l0, l1, atol=1e-4)


def test_huge_radius_matches_a_straight_line_and_blank_is_empty():
    arc = S.render(_sweep([40.0], radii=[1e5]))
    line = S.render(S.make_table("line", [40.0], size=SIZE, centre=CENTRE, length_px=40.0))
    assert (arc - line).abs().max() < 0.05
    blank = S.render(S.blank_table(size=SIZE, centre=CENTRE, bg=(0.2, 0.4, 0.6)))
    assert torch.allclose(blank[0], torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1).expand(3, SIZE, SIZE))


def test_colours_jitter_and_table_columns():
    t = _sweep([0.0], radii=[8.0], fg=(1.0, 0.0, 0.0), bg=(0.0, 0.0, 1.0), jitter=(3.0, -2.0))
    img = S.render(t)[0]
    assert torch.isclose(img[:, 0, 0], torch.tensor([0.0, 0.0, 1.0])).all()
    assert img[0].max() == 1.0 and img[1].max() == 0.0
    assert t.cx[0] == CENTRE[1] + 3 and t.cy[0] == CENTRE[0] + 2  # dy = -2 (down) is +2 rows
    row = t.rows()[0]
    assert row["kind"] == "curve" and row["radius"] == 8.0 and row["jitter_x"] == 3.0
    jittered = S.render(t)
    plain = S.render(_sweep([0.0], radii=[8.0], fg=(1.0, 0.0, 0.0), bg=(0.0, 0.0, 1.0)))
    assert torch.allclose(torch.roll(plain, (2, 3), dims=(-2, -1)), jittered, atol=1e-4)


def test_chunks_match_the_whole_render_and_tables_concatenate():
    t = S.concat_tables([_sweep(S.orientations(45)),
                         S.corner_sweep([0, 90], [90], size=SIZE, centre=CENTRE, length_px=20)])
    whole = S.render(t)
    parts = torch.cat([imgs for _, imgs in S.iter_chunks(t, 7)])
    assert torch.equal(whole, parts)
    assert len(t) == 8 * 4 + 2
    with pytest.raises(ValueError, match="kind"):
        S.make_table("spiral", [0.0], size=SIZE, centre=CENTRE)
