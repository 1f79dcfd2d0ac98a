"""AMG geometry: point grids, crop boxes, uncropping, the crop-edge filter and NMS.

NMS is checked against a pure-Python greedy reference (float64 IoU) on many random seeds with
duplicate boxes and tied scores; everything here compares exactly (integers and indices) except
point grids (atol 1e-12).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from samkit.amg.geometry import (
    batched_nms,
    box_area,
    box_iou,
    build_all_layer_point_grids,
    build_point_grid,
    generate_crop_boxes,
    is_box_near_crop_edge,
    nms,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)

from reference import DEVICES


def test_point_grid_n2() -> None:
    expected = [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]  # x varies fastest
    np.testing.assert_allclose(build_point_grid(2), expected, rtol=0, atol=1e-12)


def test_point_grid_n32() -> None:
    grid = build_point_grid(32)
    assert grid.shape == (1024, 2)
    np.testing.assert_allclose(grid[0], [1 / 64, 1 / 64], rtol=0, atol=1e-12)
    np.testing.assert_allclose(grid[1], [3 / 64, 1 / 64], rtol=0, atol=1e-12)
    np.testing.assert_allclose(grid[32], [1 / 64, 3 / 64], rtol=0, atol=1e-12)
    np.testing.assert_allclose(grid[-1], [63 / 64, 63 / 64], rtol=0, atol=1e-12)


def test_all_layer_point_grids() -> None:
    grids = build_all_layer_point_grids(32, 2, 2)
    assert [g.shape for g in grids] == [(1024, 2), (256, 2), (64, 2)]
    assert [g.shape[0] for g in build_all_layer_point_grids(10, 2, 3)] == [100, 9, 1]


def _reference_crops(h: int, w: int, n_layers: int, ratio: float) -> list[list[int]]:
    boxes = [[0, 0, w, h]]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(ratio * min(h, w) * 2 / n)
        cw = -(-(overlap * (n - 1) + w) // n)  # integer ceil
        ch = -(-(overlap * (n - 1) + h) // n)
        for i in range(n):
            for j in range(n):
                x0, y0 = (cw - overlap) * i, (ch - overlap) * j
                boxes.append([x0, y0, min(x0 + cw, w), min(y0 + ch, h)])
    return boxes


@pytest.mark.parametrize("n_layers", [0, 1, 2])
def test_crop_boxes(n_layers: int) -> None:
    h, w, ratio = 1000, 1500, 512 / 1500
    boxes, layers = generate_crop_boxes((h, w), n_layers, ratio)
    assert boxes == _reference_crops(h, w, n_layers, ratio)
    assert layers == [0] + [i for i in range(1, n_layers + 1) for _ in range(4**i)]
    assert all(isinstance(v, int) for box in boxes for v in box)
    for layer in range(1, n_layers + 1):
        crops = [b for b, li in zip(boxes, layers, strict=True) if li == layer]
        covered = np.zeros((h, w), dtype=np.int32)
        for x0, y0, x1, y1 in crops:
            covered[y0:y1, x0:x1] += 1
        assert covered.min() >= 1  # the crops cover the image
        assert covered.max() >= 4  # and overlap (a corner is shared by four crops)
        n = 2**layer
        assert max(b[2] for b in crops) == w and max(b[3] for b in crops) == h
        assert len({b[0] for b in crops}) == n and len({b[1] for b in crops}) == n


def test_crop_boxes_one_layer_values() -> None:
    boxes, _ = generate_crop_boxes((1000, 1500), 1, 512 / 1500)
    overlap = int(512 / 1500 * 1000)  # 341
    cw, ch = math.ceil((overlap + 1500) / 2), math.ceil((overlap + 1000) / 2)
    assert (overlap, cw, ch) == (341, 921, 671)
    assert boxes[1:] == [[0, 0, 921, 671], [0, 330, 921, 1000], [580, 0, 1500, 671],
                         [580, 330, 1500, 1000]]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_uncrop(device: str) -> None:
    crop = [10, 20, 15, 23]  # 5 wide, 3 high
    boxes = torch.tensor([[0, 0, 4, 2], [1, 1, 1, 1]], device=device)
    assert uncrop_boxes_xyxy(boxes, crop).tolist() == [[10, 20, 14, 22], [11, 21, 11, 21]]
    boxes3 = boxes[None].float()  # extra leading dim
    assert uncrop_boxes_xyxy(boxes3, crop).shape == (1, 2, 4)
    points = torch.tensor([[0.5, 1.5]], device=device)
    assert uncrop_points(points, crop).tolist() == [[10.5, 21.5]]

    masks = torch.rand(2, 3, 5, device=device) > 0.5
    full = uncrop_masks(masks, crop, 30, 40)
    assert full.shape == (2, 30, 40) and full.dtype == torch.bool
    assert torch.equal(full[:, 20:23, 10:15], masks)
    assert full.sum() == masks.sum()  # zeros elsewhere
    whole = torch.rand(2, 30, 40, device=device) > 0.5
    assert uncrop_masks(whole, [0, 0, 40, 30], 30, 40) is whole  # no copy
    with pytest.raises(ValueError):
        uncrop_masks(whole, crop, 30, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_is_box_near_crop_edge(device: str) -> None:
    orig = [0, 0, 1000, 800]
    crop = [400, 300, 1000, 800]  # inner edges at x=400 and y=300; right/bottom are the image's
    boxes = torch.tensor(
        [
            [0, 100, 50, 150],  # x0 at the crop's left edge (x=400 in the image) -> near
            [100, 0, 150, 50],  # y0 at the crop's top edge -> near
            [15, 100, 50, 150],  # within 20 px of the left edge -> near
            [25, 100, 50, 150],  # 25 px in -> not near
            [100, 100, 600, 500],  # touches the image's right and bottom edges -> not near
            [100, 100, 585, 480],  # within 20 px of the image edges -> not near
            [100, 100, 200, 200],  # interior -> not near
        ],
        device=device,
    )
    flags = is_box_near_crop_edge(boxes, crop, orig)
    assert flags.device.type == device
    assert flags.tolist() == [True, True, True, False, False, False, False]
    # the whole image as the crop: nothing is ever near an inner edge
    whole = is_box_near_crop_edge(boxes, orig, orig)
    assert not whole.any()
    # a crop whose left edge is also the image's left edge does not count there
    left_crop = [0, 300, 600, 800]
    assert is_box_near_crop_edge(torch.tensor([[0, 100, 50, 150]]), left_crop, orig).tolist() == [
        False
    ]
    assert is_box_near_crop_edge(torch.tensor([[0, 0, 50, 50]]), left_crop, orig).tolist() == [True]


def test_box_area_and_iou() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert box_area(a).tolist() == [4.0, 4.0, 0.0]
    iou = box_iou(a, a)
    expected = [[1.0, 1 / 7, 0.0], [1 / 7, 1.0, 0.0], [0.0, 0.0, 0.0]]  # degenerate pair -> 0
    np.testing.assert_allclose(iou.numpy(), expected, rtol=0, atol=1e-7)
    assert box_iou(a.long(), a[:2]).shape == (3, 2)


# NMS against a pure-Python greedy reference


def _py_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _py_nms(boxes: list, scores: list, thr: float, cats: list | None = None) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep index order
    kept: list[int] = []
    for i in order:
        if all(
            _py_iou(boxes[i], boxes[k]) <= thr or (cats is not None and cats[i] != cats[k])
            for k in kept
        ):
            kept.append(i)
    return kept


def _random_boxes(seed: int, n: int, integer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered random XYXY boxes with some exact duplicates, and scores with ties."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0, 100, size=(max(n // 6, 1), 2))
    xy = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 4, size=(n, 2))
    wh = rng.uniform(4, 30, size=(n, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    if integer:
        boxes = np.round(boxes)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    dup = rng.integers(0, n, size=n // 5)
    boxes[dup[: len(dup) // 2]] = boxes[dup[len(dup) // 2 : 2 * (len(dup) // 2)]]
    scores = rng.integers(0, 10, size=n).astype(np.float64) / 10  # many ties
    return torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("integer", [False, True])
def test_nms_matches_greedy_reference(device: str, integer: bool) -> None:
    for seed in range(40):
        n = [1, 2, 7, 30, 120][seed % 5]
        boxes, scores = _random_boxes(seed, n, integer)
        for thr in (0.0, 0.3, 0.5, 0.7):
            kept = nms(boxes.to(device), scores.to(device), thr)
            assert kept.dtype == torch.int64 and kept.device.type == device
            # the reference sees the same float32 values, as Python floats
            ref = _py_nms(boxes.tolist(), scores.tolist(), thr)
            assert kept.cpu().tolist() == ref, (seed, thr)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_matches_per_category_reference(device: str) -> None:
    for seed in range(30):
        n = [3, 20, 90][seed % 3]
        boxes, scores = _random_boxes(1000 + seed, n, integer=seed % 2 == 0)
        cats = torch.from_numpy(np.random.default_rng(seed).integers(0, 3, size=n))
        for thr in (0.3, 0.7):
            kept = batched_nms(boxes.to(device), scores.to(device), cats.to(device), thr)
            ref = _py_nms(boxes.tolist(), scores.tolist(), thr, cats.tolist())
            assert kept.cpu().tolist() == ref, (seed, thr)


def test_nms_hand_cases() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.5, 0.5, 0.9, 0.1])
    # box 2 first; 0 and 1 overlap it with IoU 9/11 and each other with IoU 1
    assert nms(boxes, scores, 0.5).tolist() == [2, 3]
    assert nms(boxes, scores, 0.95).tolist() == [2, 0, 3]  # tie: index 0 before 1
    assert nms(boxes, scores, 1.0).tolist() == [2, 0, 1, 3]  # IoU 1 is not > 1
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []
    # a chain: each box suppresses only the next, so kept boxes alternate
    chain = torch.tensor([[float(i), 0, i + 2, 1] for i in range(9)])
    assert nms(chain, -torch.arange(9.0), 0.3).tolist() == [0, 2, 4, 6, 8]
    cats = torch.tensor([0, 1, 0, 0])
    assert batched_nms(boxes, scores, cats, 0.5).tolist() == [2, 1, 3]
