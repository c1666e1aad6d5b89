"""Dataset examples: the streaming top-k / random-sample merge against brute force, and crops that
are exactly the receptive field of the recorded position (synthetic marked images, the cache's
provenance, and the real network's input-gradient support)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sae_vision.activations import shards
from sae_vision.activations.images import FolderImages, Item
from sae_vision.activations.models import LayerGeometry, lucid_geometry
from sae_vision.core.config import DataConfig
from sae_vision.report.examples import (
    ExampleCollector,
    collect_examples,
    crop_receptive_field,
    iter_images,
    merge_topk,
    pack_pos,
    rf_box,
    save_crops,
    unpack_pos,
)


def stream(acts_NF, pos_N3, sizes):
    """Chunks of uneven sizes, as a cache would deliver them."""
    lo = 0
    for n in sizes:
        yield acts_NF[lo: lo + n], pos_N3[lo: lo + n], {}
        lo += n


def random_data(n=1000, f=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, f, generator=gen) - 0.3)
    pos = torch.stack([torch.arange(n) // 7, torch.arange(n) % 7, (torch.arange(n) * 3) % 11], 1)
    return acts, pos


def test_pos_codes_round_trip():
    pos = torch.tensor([[0, 0, 0], [123456, 27, 13], [7, 65535, 65535]])
    assert torch.equal(unpack_pos(pack_pos(pos)), pos)


def test_merge_topk_keeps_payload_aligned():
    key, (pay,) = merge_topk(torch.tensor([[5.0, 1.0]]), [torch.tensor([[50, 10]])],
                             torch.tensor([[3.0, 7.0, 0.0]]), [torch.tensor([30, 70, 0])], 3)
    assert key.tolist() == [[7.0, 5.0, 3.0]] and pay.tolist() == [[70, 50, 30]]


def test_streaming_topk_equals_brute_force():
    acts, pos = random_data()
    k = 6
    ex, _ = collect_examples(stream(acts, pos, [1, 50, 3, 200, 346, 400]), {"u": lambda x: x},
                             {"u": acts.shape[1]}, k=k, n_random=0, batch_size=64)
    ex = ex["u"]
    want_val, want_idx = acts.T.topk(k, dim=1)
    assert torch.allclose(ex.top_val_FK, want_val)
    assert torch.equal(ex.top_pos_FK3, pos[want_idx])  # continuous data: no ties
    assert torch.equal(ex.n_active_F, (acts > 0).sum(0))
    assert torch.allclose(ex.sum_F, acts.double().sum(0))
    assert ex.n_vectors == len(acts)


def test_units_with_few_activations_list_only_activating_examples():
    acts = torch.zeros(30, 2)
    acts[4, 0], acts[9, 0] = 2.0, 1.0  # unit 0 fires twice, unit 1 never
    pos = torch.stack([torch.arange(30), torch.zeros(30, dtype=torch.long),
                       torch.zeros(30, dtype=torch.long)], 1)
    col = ExampleCollector(2, k=5, n_random=3)
    col.update(acts, pos)
    ex = col.result()
    assert ex.examples(0, "top") == [(2.0, 4, 0, 0), (1.0, 9, 0, 0)]
    assert sorted(e[1] for e in ex.examples(0, "random")) == [4, 9]
    assert ex.examples(1, "top") == [] and ex.examples(1, "random") == []


def test_random_examples_are_a_uniform_sample_of_activating_vectors():
    # 3000 units with identical activations: each is an independent draw, so every activating
    # vector must be kept by about n_units * r / n_active units, and no inactive one ever.
    n, n_units, r = 40, 3000, 5
    col = torch.zeros(n)
    active = torch.arange(0, n, 2)
    col[active] = torch.rand(len(active)) + 0.1
    acts = col[:, None].repeat(1, n_units)
    pos = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long),
                       torch.zeros(n, dtype=torch.long)], 1)
    ex, _ = collect_examples(stream(acts, pos, [7, 13, 20]), {"u": lambda x: x}, {"u": n_units},
                             k=1, n_random=r, seed=3, batch_size=8)
    picked = ex["u"].rand_pos_FR3[:, :, 0]
    assert (picked >= 0).all()
    assert torch.isin(picked, active).all()
    assert all(len(set(row.tolist())) == r for row in picked)  # without replacement
    counts = torch.bincount(picked.flatten(), minlength=n)[active].double()
    expect = n_units * r / len(active)
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 50, (chi2, counts)  # 19 dof: p(chi2 > 50) < 1e-4
    vals = ex["u"].rand_val_FR
    assert torch.allclose(vals, col[picked])


def coordinate_image(h=224, w=224):
    """R encodes the column, G the row (exactly, in float), B is a constant."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs / 1000.0, ys / 1000.0, torch.full((h, w), 0.25)]).float()


@pytest.mark.parametrize("layer", ["conv2d0", "conv2d2", "mixed3a", "mixed3b"])
def test_crop_is_exactly_the_receptive_field_of_a_marked_spot(layer):
    geom = lucid_geometry(layer)
    img = coordinate_image()
    half = (geom.rf_size - 1) // 2
    for y, x in [(geom.size // 2, geom.size // 3), (0, 0), (geom.size - 1, 5)]:
        cy, cx = int(geom.offset + geom.stride * y), int(geom.offset + geom.stride * x)
        marked = img.clone()
        marked[2, cy, cx] = 1.0  # the spot at the position's receptive-field centre
        crop = crop_receptive_field(marked, geom, y, x)
        assert crop.pixels_3SS.shape == (3, geom.rf_size, geom.rf_size)
        assert crop.pixels_3SS[2, half, half] == 1.0  # the spot is the crop's centre pixel
        assert (crop.pixels_3SS[2] == 1.0).sum() == 1
        assert (crop.top, crop.left) == (cy - half, cx - half)
        for i in range(geom.rf_size):
            for j in range(0, geom.rf_size, 7):
                iy, ix = cy - half + i, cx - half + j
                got = crop.pixels_3SS[:2, i, j]
                if 0 <= iy < 224 and 0 <= ix < 224:
                    assert torch.equal(got, torch.tensor([ix / 1000.0, iy / 1000.0])), (i, j)
                else:
                    assert torch.equal(got, torch.tensor([0.5, 0.5]))  # grey outside the image
        y0, x0, y1, x1 = crop.valid
        assert (y0, x0) == (max(0, half - cy), max(0, half - cx))
        assert (y1, x1) == (min(geom.rf_size, 224 - cy + half), min(geom.rf_size, 224 - cx + half))
        assert crop.clipped == (cy - half < 0 or cx - half < 0 or cy + half >= 224
                                or cx + half >= 224)


def test_crop_box_handles_half_pixel_centres():
    # A probed (timm) geometry can put the centre between pixels when the field is even-sized.
    geom = LayerGeometry(stride=4, rf_size=8, offset=1.5, size=56)
    top, left, side = rf_box(geom, 2, 3)
    assert side == 8 and (top + (side - 1) / 2, left + (side - 1) / 2) == (9.5, 13.5)


def test_crops_follow_cache_provenance_to_the_source_image(tmp_path):
    # A 256-px photo (ImageFolder centre-crops it to 224 at offset 16) with a white square
    # centred on the receptive field of mixed3a position (10, 5); that vector is the only one
    # on which unit 0 fires, so its top example must show the square at the crop's centre.
    geom = lucid_geometry("mixed3a")
    y, x = 10, 5
    cy, cx = int(geom.offset + geom.stride * y) + 16, int(geom.offset + geom.stride * x) + 16
    arr = np.zeros((256, 256, 3), np.uint8)
    arr[cy - 2: cy + 3, cx - 2: cx + 3] = 255
    (tmp_path / "photos").mkdir()
    Image.fromarray(arr).save(tmp_path / "photos" / "a.png")
    Image.fromarray(np.full((256, 256, 3), 90, np.uint8)).save(tmp_path / "photos" / "b.png")
    data = DataConfig(name="imagefolder", root=str(tmp_path / "photos"), n_images=2)
    pos = np.array([[1, 3, 3], [0, y, x], [0, 20, 20], [1, 10, 5]], np.int32)
    acts = torch.zeros(4, 2)
    acts[1, 0] = 5.0
    acts[:, 1] = torch.tensor([1.0, 0.0, 3.0, 2.0])
    cache = tmp_path / "cache"
    shards.write_cache(cache, [(acts, pos, {0: "a.png", 1: "b.png"})],
                       {"layer": "mixed3a", "dim": 2, "dtype": "float32"})
    ex, sources = collect_examples(shards.iter_chunks(cache, with_pos=True), {"n": lambda v: v},
                                   {"n": 2}, k=3, n_random=2)
    assert ex["n"].examples(0, "top") == [(5.0, 0, y, x)]
    assert sources == {0: "a.png", 1: "b.png"}
    wanted = {(i, yy, xx) for u in (0, 1) for _, i, yy, xx in ex["n"].examples(u, "top")}
    crops = save_crops(wanted, iter_images(data, {p[0] for p in wanted}), geom,
                       tmp_path / "crops", thumb_px=geom.rf_size, sources=sources)
    info = crops[(0, y, x)]
    got = np.asarray(Image.open(tmp_path / "crops" / info["file"]).convert("L"), np.float32)
    assert got.shape == (geom.rf_size, geom.rf_size)
    bright = np.argwhere(got > 128)
    centre = (geom.rf_size - 1) / 2
    assert np.allclose(bright.mean(0), [centre, centre], atol=0.5)  # JPEG blurs, never moves
    assert len(crops) == 4 and all("file" in v for v in crops.values())
    assert info["clipped"] is False  # the field of (10, 5) spans columns 18..76: inside


def test_crops_refuse_an_image_that_is_not_the_recorded_one(tmp_path):
    img = Item(0, "photo-b.png", torch.rand(3, 224, 224))
    crops = save_crops([(0, 3, 3), (4, 1, 1)], [img], lucid_geometry("mixed3a"), tmp_path,
                       sources={0: "photo-a.png"})
    assert "photo-a.png" in crops[(0, 3, 3)]["error"]
    assert "not in the data source" in crops[(4, 1, 1)]["error"]
    assert not list(tmp_path.glob("*.jpg"))


@pytest.mark.parametrize("layer", ["conv2d0_pre_relu", "conv2d2", "mixed3a"])
def test_crop_box_is_the_input_gradient_support_of_the_real_network(bvlc_model, layer):
    # Everything the unit at (y, x) can see lies inside the crop, and the crop is not larger.
    geom = bvlc_model.geometry(layer)
    y = x = geom.size // 2
    torch.manual_seed(0)
    img = torch.rand(4, 3, 224, 224, requires_grad=True)
    with torch.enable_grad():
        acts = bvlc_model.activations(img, [layer])[layer]
        acts[:, :, y, x].sum().backward()
    support = img.grad.abs().sum((0, 1)) > 0
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    top, left, side = rf_box(geom, y, x)
    assert (int(rows[0]), int(rows[-1])) == (top, top + side - 1)
    assert (int(cols[0]), int(cols[-1])) == (left, left + side - 1)
    assert math.isclose(geom.offset + geom.stride * y, top + (side - 1) / 2)


def test_folder_images_are_addressed_by_cache_index(tmp_path):
    for i, v in enumerate((10, 200, 120)):
        Image.fromarray(np.full((256, 256, 3), v, np.uint8)).save(tmp_path / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), n_images=3)
    got = {it.idx: it for it in iter_images(cfg, [2, 0])}
    assert sorted(got) == [0, 2]
    assert got[2].source == FolderImages(cfg)[2].source == "2.png"
    assert Path(got[0].source).name == "0.png"
