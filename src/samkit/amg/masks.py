"""Mask utilities for automatic mask generation: RLE, areas, boxes and stability scores.

Masks are boolean tensors of shape [..., H, W] in image pixels (row y, column x). Boxes are
XYXY with inclusive pixel indices unless stated otherwise. The tensor functions run on whatever
device their input lives on and avoid host syncs; only the RLE encoder moves data to the host,
once per batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as coco_mask
from torch import Tensor

# An uncompressed RLE: {"size": [h, w], "counts": [zeros, ones, zeros, ...]} in column-major order.
Rle = dict[str, Any]

_INT16_MAX = torch.iinfo(torch.int16).max


def mask_to_rle(masks: Tensor) -> list[Rle]:
    """Encode masks [B, H, W] bool as uncompressed RLEs, one dict per mask.

    Runs are taken in column-major (Fortran) order and start with a run of zeros, so a mask whose
    first pixel (0, 0) is set begins with a count of 0. The change points are found on the
    masks' device with one diff over the whole batch; the result crosses to the host once.
    """
    b, h, w = masks.shape
    if b == 0:
        return []
    # BxHxW -> Bx(W*H): column-major pixel order
    flat = masks.transpose(1, 2).reshape(b, h * w)
    # change[k] = (mask index, position p) where pixel p+1 differs from pixel p; row-major order
    change = (flat[:, 1:] != flat[:, :-1]).nonzero()
    first = flat[:, 0].long()
    packed = torch.cat([change.T.reshape(-1), first]).cpu().numpy()  # the one device -> host copy
    n_change = change.shape[0]
    mask_idx, positions, first = (
        packed[:n_change],
        packed[n_change : 2 * n_change],
        packed[2 * n_change :],
    )
    # change points of mask i are positions[bounds[i]:bounds[i + 1]] (mask_idx is sorted)
    bounds = np.searchsorted(mask_idx, np.arange(b + 1))
    rles = []
    for i in range(b):
        cuts = positions[bounds[i] : bounds[i + 1]] + 1
        runs = np.diff(np.concatenate(([0], cuts, [h * w])))
        counts = runs.tolist()
        if first[i]:
            counts.insert(0, 0)
        rles.append({"size": [h, w], "counts": counts})
    return rles


def rle_to_mask(rle: Rle) -> np.ndarray:
    """Decode an uncompressed RLE into an HxW bool array (C-contiguous)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected h*w = {h * w}")
    # odd-numbered runs are ones
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    # column-major: the flat array walks down each column in turn
    return np.ascontiguousarray(flat.reshape(w, h).T)


def area_from_rle(rle: Rle) -> int:
    """Number of set pixels in an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: Rle) -> Rle:
    """Compress an uncompressed RLE with pycocotools; `counts` becomes a UTF-8 string."""
    h, w = rle["size"]
    encoded = coco_mask.frPyObjects(rle, h, w)
    encoded["counts"] = encoded["counts"].decode("utf-8")
    return encoded


def coco_rle_to_mask(rle: Rle) -> np.ndarray:
    """Decode a COCO (compressed) RLE, `counts` as str or bytes, into an HxW bool array."""
    return coco_mask.decode(rle).astype(bool)


def mask_areas(masks: Tensor) -> Tensor:
    """Pixel counts of masks [..., H, W] bool -> [...] int64."""
    return masks.sum(dim=(-2, -1), dtype=torch.int64)


def batched_mask_to_box(masks: Tensor) -> Tensor:
    """Tight boxes around masks [..., H, W] bool -> [..., 4] int64 XYXY.

    Coordinates are inclusive pixel indices (x0, y0, x1, y1): a one-pixel mask at (x, y) gives
    [x, y, x, y]. Empty masks give [0, 0, 0, 0].
    """
    rows = masks.any(dim=-1)  # [..., H]: row y has a set pixel
    cols = masks.any(dim=-2)  # [..., W]: column x has a set pixel
    y0, y1 = _first_last_true(rows)
    x0, x1 = _first_last_true(cols)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    nonempty = rows.any(dim=-1, keepdim=True)
    return torch.where(nonempty, boxes, torch.zeros_like(boxes))


def _first_last_true(flags: Tensor) -> tuple[Tensor, Tensor]:
    """First and last True index along the last dim of `flags` [..., N]; meaningless if none."""
    n = flags.shape[-1]
    idx = torch.arange(n, device=flags.device)
    first = torch.where(flags, idx, n).amin(dim=-1)
    last = torch.where(flags, idx, -1).amax(dim=-1)
    return first, last


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """XYXY boxes [..., 4] -> XYWH with w = x1 - x0 and h = y1 - y0.

    This is the official AMG `bbox` convention. For inclusive-pixel boxes from
    `batched_mask_to_box` the w and h are one less than pycocotools' `toBbox`.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def calculate_stability_score(
    mask_logits: Tensor, mask_threshold: float, threshold_offset: float
) -> Tensor:
    """Stability of masks under a shifted threshold, for logits [..., H, W] -> [...] float32.

    score = |logits > threshold + offset| / |logits > threshold - offset|, i.e. the IoU of the
    tight and the loose binarisation when offset >= 0. Counts are exact integers (int16 per row,
    int32 per mask) to keep memory low on large batches. Where the loose mask is empty the score
    is 0 rather than NaN.
    """
    row_dtype = torch.int16 if mask_logits.shape[-1] <= _INT16_MAX else torch.int32
    tight = (mask_logits > mask_threshold + threshold_offset).sum(-1, dtype=row_dtype)
    loose = (mask_logits > mask_threshold - threshold_offset).sum(-1, dtype=row_dtype)
    return stability_from_counts(tight.sum(-1, dtype=torch.int32), loose.sum(-1, dtype=torch.int32))


def stability_from_counts(tight: Tensor, loose: Tensor) -> Tensor:
    """`calculate_stability_score` from the integer pixel counts above the tight and the loose
    threshold: tight / loose as float32, 0 where the loose mask is empty."""
    score = tight / loose.clamp(min=1)
    return torch.where(loose > 0, score, torch.zeros_like(score))
