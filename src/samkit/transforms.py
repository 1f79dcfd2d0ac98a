"""Resize-longest-side: images and coordinates between the original frame and the model's.

The model sees the image resized so its long side is `target_length` (1024), then padded.
Coordinates are xy pixels; sizes are (h, w).
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

# fixed-point fraction bits of Pillow's 8-bit resampling (32 - 8 - 2, libImaging/Resample.c)
PIL_PRECISION_BITS = 22
# (major, minor) of the installed Pillow, whose resize pass order the GPU resize follows (the
# rounding between the passes makes the order visible; see `vertical_first`)
PIL_VERSION = tuple(int(re.match(r"\d*", part)[0] or 0) for part in PIL.__version__.split(".")[:2])
# largest int32 products tensor of one resize pass gathered at once (a 1000x1500 photo's
# horizontal pass: 61 MB; a 100 Mpixel one would take 2.7 GB and goes tap by tap instead)
GATHER_BYTES = 256 * 2**20


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    """(h, w) after scaling the long side to `long_side_length`, rounded half up, and at least
    1 (the official rounds a side of an image over 2048:1 to 0 and then fails to resize)."""
    scale = long_side_length / max(oldh, oldw)
    return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))


class ResizeLongestSide:
    """Official-compatible transform: numpy methods for HWC uint8 images and xy arrays,
    `*_torch` methods for BxCxHxW float batches and coordinate tensors."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> h'xw'x3 uint8, PIL bilinear (the official preprocessing)."""
        h, w = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        resized = Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(resized)

    def apply_image_uint8_torch(self, image: torch.Tensor) -> torch.Tensor:
        """HxWx3 uint8 tensor -> h'xw'x3 uint8 on its device: `apply_image`'s bytes
        (`resize_uint8`)."""
        size = get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return resize_uint8(image, size)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) xy in the original image -> xy in the resized image (a float copy)."""
        scale = self._scale(original_size)
        return np.asarray(coords, dtype=np.float64) * np.array(scale)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 4) XYXY in the original image -> the resized image."""
        boxes = np.asarray(boxes)
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(boxes.shape)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """BxCxHxW float -> BxCxh'xw', bilinear with antialiasing (close to PIL's)."""
        size = get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """(..., 2) xy tensor in the original image -> the resized image (float)."""
        sx, sy = self._scale(original_size)
        scale = torch.tensor([sx, sy], device=coords.device, dtype=torch.float32)
        return coords.to(torch.float32) * scale

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """(..., 4) XYXY tensor in the original image -> the resized image."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(boxes.shape)

    def _scale(self, original_size: tuple[int, ...]) -> tuple[float, float]:
        old_h, old_w = original_size[0], original_size[1]
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        return new_w / old_w, new_h / old_h


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """HxWxC uint8 tensor -> (h, w, C) uint8: PIL's BILINEAR resize, value for value, on the
    tensor's device.

    Pillow resamples 8-bit images in two passes, each output value sum(input * weight) in fixed
    point (PIL_PRECISION_BITS fraction bits, rounded, clipped to 0..255) with weights computed
    in float64 (`_bilinear_taps`); the same integer sums in the same pass order
    (`vertical_first`) here give the same bytes. On a GPU it replaces the host's PIL call,
    which took 20-24 ms of vit_b's 55 ms set_image for a 1000x1500 photo on an H100 machine; on
    the CPU PIL is faster.
    """
    h, w = size
    if vertical_first(image.shape[0], image.shape[1], h, w):
        return _resize_axis(_resize_axis(image, 0, h), 1, w)
    return _resize_axis(_resize_axis(image, 1, w), 0, h)


def vertical_first(in_h: int, in_w: int, h: int, w: int) -> bool:
    """Whether the installed Pillow resizes (in_h, in_w) -> (h, w) with the vertical pass first.

    Pillow up to 12.1 always starts with the horizontal pass; 12.2 and 12.3 start with the
    vertical one for images over 100 times taller than wide that lose height; from 13 it does
    where the height shrinks by more than twice as many pixels as the width.
    """
    if PIL_VERSION >= (13, 0):
        return in_h - h > 0 and in_h - h > 2 * (in_w - w)
    if PIL_VERSION >= (12, 2):
        return in_h > in_w * 100 and h < in_h
    return False


def _resize_axis(x: torch.Tensor, dim: int, out: int) -> torch.Tensor:
    if x.shape[dim] == out:  # PIL skips a pass whose size does not change
        return x
    index, weight = _bilinear_taps(x.shape[dim], out, x.device)
    taps = index.shape[1]
    rounding = 1 << (PIL_PRECISION_BITS - 1)
    # int32 products cannot overflow: the weights are >= 0 and sum to 2**22
    if x.numel() // x.shape[dim] * out * taps * 4 <= GATHER_BYTES:
        # every tap of every output pixel in one gather, (..., out, taps, ...), summed in int64
        shape = [1] * (x.dim() + 1)
        shape[dim : dim + 2] = [out, taps]
        products = x.index_select(dim, index.flatten()).unflatten(dim, (out, taps)).int()
        total = (products * weight.view(shape)).sum(dim + 1) + rounding
    else:  # large images (many taps when reducing a lot): one tap at a time
        shape = [1] * x.dim()
        shape[dim] = out
        total = torch.full((), rounding, dtype=torch.int32, device=x.device)
        for tap in range(taps):
            total = total + x.index_select(dim, index[:, tap]).int() * weight[:, tap].view(shape)
    return (total >> PIL_PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=32)
def _bilinear_taps(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input index and fixed-point weight of each tap of each output pixel, (out, taps) int64
    and int32, as Pillow's precompute_coeffs and normalize_coeffs_8bpc compute them (bilinear:
    support 1, widened by the scale when reducing); the same float64 operations in the same
    order, so the same weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filterscale
    taps = np.arange(math.ceil(support) * 2 + 1)
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    x = (taps[None, :] + first[:, None]) - center[:, None] + 0.5
    weight = np.where(
        taps < count[:, None], np.maximum(1.0 - np.abs(x * (1.0 / filterscale)), 0.0), 0.0
    )
    norm = np.zeros(out_size)
    for tap in taps:  # summed in Pillow's order
        norm = norm + weight[:, tap]
    weight = weight / np.where(norm == 0.0, 1.0, norm)[:, None] * float(1 << PIL_PRECISION_BITS)
    fixed = np.where(weight < 0, np.trunc(weight - 0.5), np.trunc(weight + 0.5))
    index = np.minimum(taps[None, :] + first[:, None], in_size - 1)  # zero-weight taps: any pixel
    return (
        torch.as_tensor(index, device=device),
        torch.as_tensor(fixed.astype(np.int32), device=device),
    )
