"""Resize-longest-side: images and coordinates between the original frame and the model's.

The model sees the image resized so its long side is `target_length` (1024), then padded.
Coordinates are xy pixels; sizes are (h, w).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    """(h, w) after scaling the long side to `long_side_length`, rounded half up."""
    scale = long_side_length / max(oldh, oldw)
    return int(oldh * scale + 0.5), int(oldw * scale + 0.5)


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
