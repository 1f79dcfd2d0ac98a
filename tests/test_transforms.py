"""`samkit.transforms.resize_uint8`: PIL's bilinear resize, byte for byte, in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from samkit import transforms
from samkit.transforms import get_preprocess_shape, resize_uint8

# reductions (photo sizes, a 4000-pixel side: 4 taps wide), enlargements, one axis unchanged,
# long side already 1024, thin and tiny images
SHAPES = [
    (1000, 1500),
    (1500, 1000),
    (333, 777),
    (4000, 3000),
    (480, 640),
    (100, 150),
    (1024, 700),
    (700, 1024),
    (3, 5),
    (1, 1),
    (2, 1999),
    (1, 5000),  # over 2048:1: the official's short side would round to 0 pixels
    (4100, 2),
    # portrait shapes where Pillow 13 runs the vertical pass first, and both sides of its rule
    (1500, 300),
    (2000, 7),
    (3000, 1499),
    (3000, 1500),
]


@pytest.mark.parametrize("gather_bytes", [None, 0])  # one gather per pass, or tap by tap
@pytest.mark.parametrize("shape", SHAPES)
def test_resize_uint8_equals_pil_bilinear(shape, gather_bytes, monkeypatch):
    """Compared with Pillow itself (an independent implementation) on noise, where every
    weight and every rounding shows: any difference in the taps, their fixed-point weights,
    the pass order or the clipping changes bytes."""
    if gather_bytes is not None:
        monkeypatch.setattr(transforms, "GATHER_BYTES", gather_bytes)
    rng = np.random.default_rng(shape[0] * 7919 + shape[1])
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    h, w = get_preprocess_shape(shape[0], shape[1], 1024)
    want = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    got = resize_uint8(torch.from_numpy(image), (h, w)).numpy()
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.array_equal(got, want)


@pytest.mark.parametrize("version", [(12, 1), (12, 3), (13, 0)])
def test_pass_order_of_each_pillow_generation(version, monkeypatch):
    """Pillow up to 12.1 resizes horizontally first; 12.2-12.3 vertically first for images over
    100 times taller than wide; 13 where the height loses more than twice the pixels the width
    does. Each rule's order is checked against Pillow's one-axis resizes (one pass each)
    composed in that order, whichever Pillow is installed."""
    monkeypatch.setattr(transforms, "PIL_VERSION", version)
    rule_13 = transforms.vertical_first(3000, 1499, 1024, 512)
    assert rule_13 is (version >= (13, 0))
    assert not transforms.vertical_first(3000, 1500, 1024, 512)  # 1976 = 2 x 988: not more
    assert not transforms.vertical_first(1000, 1500, 683, 1024)
    assert transforms.vertical_first(2000, 7, 1024, 4) is (version >= (12, 2))
    assert not transforms.vertical_first(700, 7, 1024, 10)  # taller than 100:1, but enlarged
    bilinear = Image.Resampling.BILINEAR
    rng = np.random.default_rng(5)
    for shape in [(1500, 300), (2000, 7)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        (h, w), pil = get_preprocess_shape(*shape, 1024), Image.fromarray(image)
        vertical = pil.resize((shape[1], h), bilinear).resize((w, h), bilinear)
        horizontal = pil.resize((w, shape[0]), bilinear).resize((w, h), bilinear)
        want, other = (vertical, horizontal)
        if not transforms.vertical_first(*shape, h, w):
            want, other = horizontal, vertical
        got = resize_uint8(torch.from_numpy(image), (h, w)).numpy()
        assert np.array_equal(got, np.asarray(want)), shape
        assert not np.array_equal(got, np.asarray(other)), shape  # the order shows


def test_resize_uint8_extremes():
    """All-0 and all-255 images stay so (no overflow, the rounding never leaves 0..255), and a
    smaller-than-input target on both axes works too."""
    for value in (0, 255):
        image = torch.full((37, 53, 3), value, dtype=torch.uint8)
        for size in [(11, 17), (80, 120)]:
            out = resize_uint8(image, size)
            assert out.shape == (*size, 3) and bool((out == value).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_predictor_resizes_like_pil():
    """The CUDA predictor resizes on the GPU; the bytes equal the host's PIL resize."""
    from samkit import SamPredictor

    from reference import random_sam

    rng = np.random.default_rng(0)
    predictor = SamPredictor(random_sam().cuda())
    # a landscape photo, and a portrait one that Pillow 13 resizes vertically first
    for shape in [(1000, 1500), (1500, 300)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        got = predictor._prepare_image(image, "RGB")
        want = predictor.transform.apply_image(image).copy()
        assert got.is_cuda and got.dtype == torch.uint8
        assert torch.equal(got.cpu(), torch.from_numpy(want).permute(2, 0, 1)[None]), shape
