"""Mask utilities for AMG: RLE round trips (ours and pycocotools'), boxes, areas, stability,
small-region removal. References are brute-force numpy or pycocotools; all comparisons are exact
except the stability score (float32 division, atol 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from samkit.amg.masks import (
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    calculate_stability_score,
    coco_encode_rle,
    coco_rle_to_mask,
    mask_areas,
    mask_to_rle,
    rle_to_mask,
)
from samkit.amg.postprocess import remove_small_regions

from reference import DEVICES


def _special_masks(h: int = 5, w: int = 7) -> np.ndarray:
    """[6, h, w] bool: empty, full, corner pixels (0,0) and (h-1,w-1), a middle pixel, checkers."""
    masks = np.zeros((6, h, w), dtype=bool)
    masks[1] = True
    masks[2, 0, 0] = True
    masks[3, h - 1, w - 1] = True
    masks[4, h // 2, w // 2] = True
    masks[5] = (np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0
    return masks


def _random_masks(seed: int, b: int = 8, h: int = 13, w: int = 17) -> np.ndarray:
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.05, 0.95, size=(b, 1, 1))
    return rng.random((b, h, w)) < density


def _reference_rle_counts(mask: np.ndarray) -> list[int]:
    """Column-major runs starting with zeros, by walking the pixels one at a time."""
    counts, current, run = [], False, 0
    for value in mask.flatten(order="F"):
        if bool(value) != current:
            counts.append(run)
            current, run = bool(value), 0
        run += 1
    counts.append(run)
    return counts


def _all_masks() -> np.ndarray:
    return np.concatenate([_special_masks(13, 17), _random_masks(0)])


@pytest.mark.parametrize("device", DEVICES)
def test_rle_matches_reference_and_round_trips(device: str) -> None:
    masks = _all_masks()
    rles = mask_to_rle(torch.from_numpy(masks).to(device))
    assert len(rles) == len(masks)
    for mask, rle in zip(masks, rles, strict=True):
        assert rle["size"] == [13, 17]
        assert rle["counts"] == _reference_rle_counts(mask)
        assert all(isinstance(c, int) for c in rle["counts"])
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
        assert area_from_rle(rle) == int(mask.sum())


def test_rle_edge_cases() -> None:
    masks = _special_masks(5, 7)
    rles = mask_to_rle(torch.from_numpy(masks))
    assert rles[0]["counts"] == [35]  # empty
    assert rles[1]["counts"] == [0, 35]  # full: starts with zero zeros
    assert rles[2]["counts"] == [0, 1, 34]  # pixel (0, 0)
    assert rles[3]["counts"] == [34, 1]  # last pixel in column-major order
    assert mask_to_rle(torch.zeros(0, 5, 7, dtype=torch.bool)) == []


@pytest.mark.parametrize("seed", range(5))
def test_rle_random_shapes(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    h, w = (int(v) for v in rng.integers(1, 40, size=2))
    masks = rng.random((3, h, w)) < rng.uniform(0.1, 0.9)
    for mask, rle in zip(masks, mask_to_rle(torch.from_numpy(masks)), strict=True):
        assert rle["counts"] == _reference_rle_counts(mask)
        np.testing.assert_array_equal(rle_to_mask(rle), mask)


# pycocotools' own decode trips a numpy 2 DeprecationWarning inside the library
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_rle_matches_pycocotools() -> None:
    masks = _all_masks()
    boxes = batched_mask_to_box(torch.from_numpy(masks))
    for mask, rle, box in zip(masks, mask_to_rle(torch.from_numpy(masks)), boxes, strict=True):
        ours = coco_encode_rle(rle)
        theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert isinstance(ours["counts"], str)
        assert ours["counts"] == theirs["counts"].decode("utf-8")
        assert list(ours["size"]) == [13, 17]
        np.testing.assert_array_equal(coco_rle_to_mask(ours), mask)
        assert area_from_rle(rle) == int(coco_mask.area(theirs))
        if mask.any():
            # pycocotools' bbox is XYWH with w = x1 - x0 + 1 for inclusive x1
            x, y, bw, bh = coco_mask.toBbox(theirs).tolist()
            x0, y0, x1, y1 = box.tolist()
            assert (x0, y0, x1 - x0 + 1, y1 - y0 + 1) == (x, y, bw, bh)


def _reference_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


@pytest.mark.parametrize("device", DEVICES)
def test_batched_mask_to_box(device: str) -> None:
    masks = _all_masks()  # [14, 13, 17]
    boxes = batched_mask_to_box(torch.from_numpy(masks).to(device))
    assert boxes.dtype == torch.int64 and boxes.device.type == device
    expected = [_reference_box(m) for m in masks]
    assert boxes.cpu().tolist() == expected
    assert boxes[4].tolist() == [8, 6, 8, 6]  # one pixel at (x=8, y=6)

    # extra batch dims: [2, 7, H, W] -> [2, 7, 4]
    batched = torch.from_numpy(masks).to(device).reshape(2, 7, 13, 17)
    assert batched_mask_to_box(batched).cpu().tolist() == [expected[:7], expected[7:]]
    empty_batch = torch.zeros(0, 13, 17, dtype=torch.bool, device=device)
    assert batched_mask_to_box(empty_batch).shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_areas(device: str) -> None:
    masks = _all_masks()
    areas = mask_areas(torch.from_numpy(masks).to(device))
    assert areas.cpu().tolist() == masks.sum(axis=(1, 2)).tolist()


def test_box_xyxy_to_xywh() -> None:
    boxes = torch.tensor([[2, 3, 10, 7], [0, 0, 0, 0]])
    assert box_xyxy_to_xywh(boxes).tolist() == [[2, 3, 8, 4], [0, 0, 0, 0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 1.0, 2.5])
def test_stability_score_matches_numpy(device: str, offset: float) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 3.0, size=(2, 5, 32, 48)).astype(np.float32)
    logits[0, 0] = -10.0  # empty loose mask: defined as 0
    score = calculate_stability_score(torch.from_numpy(logits).to(device), 0.5, offset)
    tight = (logits > 0.5 + offset).sum(axis=(-2, -1))
    loose = (logits > 0.5 - offset).sum(axis=(-2, -1))
    expected = np.where(loose > 0, tight / np.maximum(loose, 1), 0.0)
    assert score.shape == (2, 5) and score.dtype == torch.float32
    assert not torch.isnan(score).any()
    np.testing.assert_allclose(score.cpu().numpy(), expected, rtol=0, atol=1e-6)
    assert score[0, 0].item() == 0.0


# remove_small_regions: hand-built masks


def _ring(hole: list[tuple[int, int]]) -> np.ndarray:
    """A 7x7 filled square inside a 9x9 image with the given pixels cut out."""
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:8, 1:8] = True
    for y, x in hole:
        mask[y, x] = False
    return mask


def test_small_hole_filled_only_above_threshold() -> None:
    mask = _ring([(4, 3), (4, 4), (4, 5)])  # a hole of 3 pixels
    filled, changed = remove_small_regions(mask, 5, "holes")
    assert changed
    np.testing.assert_array_equal(filled, _ring([]))

    kept, changed = remove_small_regions(mask, 2, "holes")
    assert not changed
    np.testing.assert_array_equal(kept, mask)


def test_holes_are_8_connected() -> None:
    # two diagonal hole pixels form one hole of 2 under 8-connectivity
    mask = _ring([(3, 3), (4, 4)])
    out, changed = remove_small_regions(mask, 2, "holes")
    assert not changed  # one hole of area 2 is not < 2
    np.testing.assert_array_equal(out, mask)
    out, changed = remove_small_regions(mask, 3, "holes")
    assert changed
    np.testing.assert_array_equal(out, _ring([]))


def test_small_background_counts_as_a_hole() -> None:
    # official semantics: no keep-the-largest rule for holes, so a small outer background fills
    mask = np.ones((6, 6), dtype=bool)
    mask[0, 0] = mask[5, 5] = False
    out, changed = remove_small_regions(mask, 2, "holes")
    assert changed and out.all()


def test_diagonal_island_is_connected() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:5, 0:5] = True  # a large island of 25
    mask[7, 7] = mask[8, 8] = True  # touching only diagonally: one island of 2
    out, changed = remove_small_regions(mask, 3, "islands")
    assert changed
    expected = mask.copy()
    expected[7, 7] = expected[8, 8] = False
    np.testing.assert_array_equal(out, expected)

    out, changed = remove_small_regions(mask, 2, "islands")  # area 2 is not < 2
    assert not changed
    np.testing.assert_array_equal(out, mask)


def test_all_small_islands_keep_the_largest() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:2] = True  # 4 pixels
    mask[5:8, 5:7] = True  # 6 pixels
    mask[9, 0] = True  # 1 pixel
    out, changed = remove_small_regions(mask, 100, "islands")
    assert changed
    expected = np.zeros_like(mask)
    expected[5:8, 5:7] = True
    np.testing.assert_array_equal(out, expected)

    single = expected
    out, changed = remove_small_regions(single, 100, "islands")
    assert not changed  # the only island is kept as it is
    np.testing.assert_array_equal(out, single)


def test_remove_small_regions_no_regions_and_bad_mode() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    out, changed = remove_small_regions(empty, 10, "islands")
    assert not changed and not out.any()
    with pytest.raises(ValueError):
        remove_small_regions(empty, 10, "blobs")  # type: ignore[arg-type]
