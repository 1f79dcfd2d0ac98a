"""Drawing masks and prompts over an image, for a quick visual check of results.

Masks are tinted with distinct colours and outlined; foreground points are green dots,
background points red dots, boxes rectangles in their object's colour. Everything is in original
image pixels (xy for points and boxes, HxW for masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# distinct colours; pure green and red are left to the points
PALETTE: tuple[tuple[int, int, int], ...] = (
    (30, 144, 255),
    (255, 165, 0),
    (148, 103, 189),
    (0, 206, 209),
    (255, 215, 0),
    (255, 105, 180),
    (140, 86, 75),
    (188, 189, 34),
    (65, 105, 225),
    (210, 180, 140),
)
FOREGROUND_COLOUR = (0, 220, 0)
BACKGROUND_COLOUR = (235, 0, 0)
MASK_ALPHA = 0.45


def draw_overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    *,
    colours: Sequence[tuple[int, int, int]] | None = None,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: Sequence[np.ndarray] = (),
    box_colours: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """An HxWx3 uint8 picture of `masks` (HxW bool each) and prompts over `image` (HxWx3 uint8).

    colours[i] is mask i's colour (default: PALETTE in turn). points (N, 2) xy with labels (N,)
    (1 foreground, 0 background); boxes XYXY, drawn in box_colours (default: PALETTE in turn).
    Larger masks are drawn first, so smaller ones stay visible on top.
    """
    h, w = image.shape[:2]
    colours = list(colours) if colours is not None else _cycle(len(masks))
    thickness = max(1, round(min(h, w) / 300))
    out = image.astype(np.float32)
    for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        mask = np.asarray(masks[i], dtype=bool)
        colour = np.array(colours[i], dtype=np.float32)
        out[mask] = (1 - MASK_ALPHA) * out[mask] + MASK_ALPHA * colour
        out[_outline(mask, thickness)] = colour
    picture = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    box_colours = list(box_colours) if box_colours is not None else _cycle(len(boxes))
    for box, colour in zip(boxes, box_colours, strict=False):
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=tuple(colour), width=2 * thickness)
    if points is not None and len(points):
        radius = max(5.0, min(h, w) / 70)
        for (x, y), label in zip(np.asarray(points), np.asarray(labels), strict=True):
            fill = FOREGROUND_COLOUR if label == 1 else BACKGROUND_COLOUR
            draw.ellipse(
                (x - radius, y - radius, x + radius, y + radius),
                fill=fill,
                outline=(255, 255, 255),
                width=max(1, round(radius / 4)),
            )
    return np.asarray(picture)


def _cycle(count: int) -> list[tuple[int, int, int]]:
    return [PALETTE[i % len(PALETTE)] for i in range(count)]


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of `mask` within `thickness` pixels of its edge (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(thickness):
        eroded = inner.copy()
        eroded[1:] &= inner[:-1]
        eroded[:-1] &= inner[1:]
        eroded[:, 1:] &= inner[:, :-1]
        eroded[:, :-1] &= inner[:, 1:]
        inner = eroded
    return mask & ~inner
