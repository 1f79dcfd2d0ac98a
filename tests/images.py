"""Test images made on the spot: photo-like (smooth gradients, a few shapes, noise)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 image with gradients, an ellipse, a rectangle, a triangle and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([120 + 80 * x, 90 + 100 * y, 160 - 60 * x * y], axis=-1)
    picture = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    h, w = height, width
    draw.ellipse((0.15 * w, 0.2 * h, 0.45 * w, 0.6 * h), fill=(220, 60, 40))
    draw.rectangle((0.55 * w, 0.45 * h, 0.9 * w, 0.85 * h), fill=(40, 70, 200))
    draw.polygon(
        [(0.5 * w, 0.1 * h), (0.7 * w, 0.35 * h), (0.35 * w, 0.35 * h)], fill=(250, 220, 60)
    )
    noisy = np.asarray(picture, dtype=np.float32) + rng.normal(0.0, 6.0, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)
