"""Geometry for automatic mask generation: point grids, crops, uncropping, edge filter, NMS.

Coordinates are xy in pixels. Crop boxes are XYXY with an exclusive end ([x0, y0, x1, y1] covers
columns x0..x1-1); mask boxes are XYXY with inclusive pixel indices, as `batched_mask_to_box`
returns them. Boxes inside a crop are in the crop's frame until uncropped into the image's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def build_point_grid(n_per_side: int) -> np.ndarray:
    """A regular grid of n*n points [n*n, 2] xy in [0, 1], at (i + 0.5) / n, x varying fastest."""
    # linspace between the end points, as the official: the same float64 values to the last bit
    offset = 1 / (2 * n_per_side)
    coords = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(coords, n_per_side)
    ys = np.repeat(coords, n_per_side)
    return np.stack([xs, ys], axis=-1)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """Point grids for crop layers 0..n_layers; layer i has int(n / scale**i) points per side."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Overlapping crop boxes for image size (h, w): (XYXY boxes, layer index of each box).

    Layer 0 is the whole image; layer i tiles it with 2**i by 2**i crops that overlap by
    int(overlap_ratio * min(h, w) * 2 / 2**i) pixels. Within a layer, crops are listed with x0 in
    the outer loop and y0 in the inner loop.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes = [[0, 0, im_w, im_h]]
    layer_idxs = [0]
    for layer in range(1, n_layers + 1):
        n_crops = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        crop_w = math.ceil((overlap * (n_crops - 1) + im_w) / n_crops)
        crop_h = math.ceil((overlap * (n_crops - 1) + im_h) / n_crops)
        x0s = [int((crop_w - overlap) * k) for k in range(n_crops)]
        y0s = [int((crop_h - overlap) * k) for k in range(n_crops)]
        for x0 in x0s:
            for y0 in y0s:
                crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
                layer_idxs.append(layer)
    return crop_boxes, layer_idxs


def uncrop_boxes_xyxy(boxes: Tensor, crop_box: Sequence[int]) -> Tensor:
    """Shift XYXY boxes [..., 4] from the crop's frame into the image's."""
    x0, y0 = crop_box[0], crop_box[1]
    offset = torch.tensor([x0, y0, x0, y0], device=boxes.device, dtype=boxes.dtype)
    return boxes + offset


def uncrop_points(points: Tensor, crop_box: Sequence[int]) -> Tensor:
    """Shift xy points [..., 2] from the crop's frame into the image's."""
    offset = torch.tensor([crop_box[0], crop_box[1]], device=points.device, dtype=points.dtype)
    return points + offset


def uncrop_masks(masks: Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> Tensor:
    """Place masks [..., crop_h, crop_w] into zero images [..., orig_h, orig_w].

    Returns `masks` itself (no copy) when the crop is the whole image.
    """
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    if masks.shape[-2:] != (y1 - y0, x1 - x0):
        raise ValueError(f"masks of size {tuple(masks.shape[-2:])} do not fit crop {crop_box}")
    out = masks.new_zeros((*masks.shape[:-2], orig_h, orig_w))
    out[..., y0:y1, x0:x1] = masks
    return out


def is_box_near_crop_edge(
    boxes: Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> Tensor:
    """Flag boxes [B, 4] XYXY (crop frame) that touch an inner crop edge -> [B] bool.

    After uncropping, a coordinate is near the crop edge if it is within `atol` pixels of the
    crop box's matching coordinate, and counts only if it is not also within `atol` of the
    original image box's (so image borders never count). A box is flagged if any of its four
    coordinates counts.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float32, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop, atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig, atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Areas (x1 - x0) * (y1 - y0) of XYXY boxes [..., 4] -> [...]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise IoU of XYXY boxes [N, 4] and [M, 4] -> [N, M] float.

    Integer boxes are computed in float32. Pairs whose union is empty (two degenerate boxes)
    get 0.
    """
    if not boxes_a.is_floating_point():
        boxes_a = boxes_a.float()
    if not boxes_b.is_floating_point():
        boxes_b = boxes_b.float()
    ax0, ay0, ax1, ay1 = (c[:, None] for c in boxes_a.unbind(-1))  # Nx1 each
    bx0, by0, bx1, by1 = (c[None, :] for c in boxes_b.unbind(-1))  # 1xM each
    inter_w = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp_(min=0)
    inter_h = (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp_(min=0)
    inter = inter_w * inter_h  # NxM
    union = ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0)) - inter
    return (inter / union).masked_fill_(union <= 0, 0.0)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression of XYXY boxes [N, 4] with scores [N] -> kept indices [K].

    Same result as torchvision.ops.nms: boxes are visited by decreasing score (ties keep the
    lower index first) and a box is dropped if its IoU with an already kept box is strictly
    greater than `iou_threshold`. Kept indices are returned in that visiting order.
    """
    return _nms(boxes, scores, iou_threshold, categories=None)


def batched_nms(boxes: Tensor, scores: Tensor, categories: Tensor, iou_threshold: float) -> Tensor:
    """`nms` run separately per category (categories [N] int): boxes of different categories
    never suppress each other. Kept indices [K] by decreasing score, as torchvision's."""
    return _nms(boxes, scores, iou_threshold, categories=categories)


def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float, categories: Tensor | None) -> Tensor:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = boxes[order]
    # suppresses[j, i]: box j ranks above box i and would suppress it if j is kept
    suppresses = box_iou(ranked, ranked) > iou_threshold
    if categories is not None:
        ranked_cats = categories[order]
        suppresses &= ranked_cats[:, None] == ranked_cats[None, :]
    suppresses = suppresses.triu(diagonal=1)
    return order[_greedy_keep(suppresses)]


def _greedy_keep(suppresses: Tensor) -> Tensor:
    """Greedy selection on a strictly upper-triangular [N, N] bool matrix -> kept mask [N] bool.

    Instead of visiting boxes one at a time, each round settles many at once: an undecided box
    that no undecided box above it suppresses is surely kept, and everything such a box
    suppresses is surely dropped. The rest form a smaller problem of the same kind (kept boxes
    never suppress them, dropped ones no longer count), so the matrix shrinks every round. The
    first undecided box is always settled, and in practice a handful of rounds suffice: the
    count is bounded by the length of the longest chain of boxes each suppressing the next.
    One host sync per round.
    """
    n = suppresses.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=suppresses.device)
    undecided = torch.arange(n, device=suppresses.device)
    while undecided.numel() > 0:
        surely_kept = ~suppresses.any(dim=0)
        dropped = (suppresses & surely_kept[:, None]).any(dim=0)
        keep[undecided] = surely_kept
        rest = (~(surely_kept | dropped)).nonzero().squeeze(1)
        undecided = undecided[rest]
        suppresses = suppresses[rest][:, rest]
    return keep
