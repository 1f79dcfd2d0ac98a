"""Prompt checks for the predictor, and packing several objects' prompts for batched decoding.

Every check raises a ValueError that names the argument, the expected shape or range, and what
came. Coordinates are xy pixels, boxes XYXY, a mask prompt is 1xSxS low-res logits (S = 256 for
the official models). Points outside the image are valid: SAM accepts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from samkit.modeling import PointLabel

PROMPT_LABELS = (PointLabel.FOREGROUND, PointLabel.BACKGROUND, PointLabel.PADDING)
_LABELS_TEXT = "1 (foreground), 0 (background) or -1 (padding)"

Array = np.ndarray | torch.Tensor


@dataclass
class ObjectPrompts:
    """Prompts of K objects on one image, original-image pixels: the arguments of
    `SamPredictor.predict_objects`, as one record (e.g. per image for `predict_batch`).

    point_coords / point_labels: K entries of (N_k, 2) xy / (N_k,), N_k may differ (None or an
    empty array: no points), or (K, N, 2) / (K, N) arrays. boxes: (K, 4) XYXY, or K entries of a
    box or None. mask_inputs: (K, 1, S, S) logits, or K entries of a mask or None.
    """

    point_coords: Any = None
    point_labels: Any = None
    boxes: Any = None
    mask_inputs: Any = None


@dataclass
class PromptGroup:
    """Objects whose prompts have the same token layout, stacked for one decoder pass.

    Coordinates stay in the original image frame; G objects, N points each.
    """

    indices: list[int]  # positions of these objects in the caller's list
    point_coords: np.ndarray | None  # G x N x 2, float64
    point_labels: np.ndarray | None  # G x N, int32
    boxes: np.ndarray | None  # G x 4, float64
    mask_inputs: np.ndarray | None  # G x 1 x S x S, float32


# -- checks shared by numpy and torch inputs ---------------------------------------------------


def check_finite(values: Array, name: str) -> None:
    """No NaN or inf anywhere in `values`."""
    bad = ~torch.isfinite(values) if isinstance(values, torch.Tensor) else ~np.isfinite(values)
    if bad.any():
        index = _first(bad)
        raise ValueError(
            f"{name}: expected finite numbers, got {_item(values, index)} at index {index}"
        )


def check_labels(labels: Array, name: str) -> None:
    """Every label is 1, 0 or -1 (box corners 2/3 are for boxes: pass `box=` instead)."""
    valid = (labels == PointLabel.FOREGROUND) | (labels == PointLabel.BACKGROUND)
    valid = valid | (labels == PointLabel.PADDING)
    if not valid.all():
        index = _first(~valid)
        raise ValueError(
            f"{name}: expected labels {_LABELS_TEXT}, got {_item(labels, index)} at index {index}"
        )


def check_box_order(boxes: Array, name: str) -> None:
    """x0 <= x1 and y0 <= y1 for every (..., 4) XYXY box."""
    flat = boxes.reshape(-1, 4)
    inverted = (flat[:, 2] < flat[:, 0]) | (flat[:, 3] < flat[:, 1])
    if inverted.any():
        row = _first(inverted)
        box = [float(v) for v in flat[row]]
        where = f" at index {row}" if flat.shape[0] > 1 else ""
        raise ValueError(
            f"{name}: expected XYXY with x0 <= x1 and y0 <= y1, got {_fmt_box(box)}{where}"
        )


# -- one object, numpy (the official `predict` arguments) -----------------------------------


def as_points(
    coords: Any, labels: Any, coords_name: str = "point_coords", labels_name: str = "point_labels"
) -> tuple[np.ndarray, np.ndarray] | None:
    """Check one object's points: (N, 2) xy and (N,) labels -> float64 and int32 arrays."""
    if coords is None and labels is None:
        return None
    if labels is None:
        raise ValueError(
            f"{labels_name} must be given with {coords_name}: one label per point ({_LABELS_TEXT})"
        )
    if coords is None:
        raise ValueError(f"{coords_name} must be given with {labels_name}")
    coords = _as_array(coords, coords_name, np.float64)
    labels = _as_array(labels, labels_name, np.float64)
    if coords.size == 0 and labels.size == 0:  # e.g. [] and []: no points
        return coords.reshape(0, 2), labels.reshape(0).astype(np.int32)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"{coords_name}: expected shape (N, 2) xy, got {_shape(coords)}")
    if labels.shape != (len(coords),):
        raise ValueError(
            f"{labels_name}: expected shape ({len(coords)},), one label per point of "
            f"{coords_name}, got {_shape(labels)}"
        )
    check_finite(coords, coords_name)
    check_labels(labels, labels_name)
    return coords, labels.astype(np.int32)


def as_box(box: Any, name: str = "box") -> np.ndarray | None:
    """Check one XYXY box, (4,) or (1, 4) -> (4,) float64."""
    if box is None:
        return None
    box = _as_array(box, name, np.float64)
    if box.shape not in ((4,), (1, 4)):
        raise ValueError(f"{name}: expected shape (4,) XYXY, got {_shape(box)}")
    box = box.reshape(4)
    check_finite(box, name)
    check_box_order(box, name)
    return box


def as_mask_input(mask: Any, size: int, name: str = "mask_input") -> np.ndarray | None:
    """Check one low-res mask prompt, (1, S, S) logits -> float32."""
    if mask is None:
        return None
    mask = _as_array(mask, name, np.float32)
    if mask.shape != (1, size, size):
        raise ValueError(
            f"{name}: expected shape (1, {size}, {size}) low-res logits "
            f"(e.g. a previous call's low-res output), got {_shape(mask)}"
        )
    check_finite(mask, name)
    return mask


# -- batches of prompts, torch (the official `predict_torch` arguments) ---------------------


def check_torch_prompts(
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    mask_size: int,
) -> torch.Tensor | None:
    """Check a batch of B prompts in the model input frame; returns boxes as (B, 4)."""
    sizes: dict[str, int] = {}
    if (point_coords is None) != (point_labels is None):
        given, missing = (
            ("point_coords", "point_labels")
            if point_labels is None
            else ("point_labels", "point_coords")
        )
        raise ValueError(f"{missing} must be given with {given}")
    if point_coords is not None:
        if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
            raise ValueError(
                f"point_coords: expected shape (B, N, 2) xy, got {_shape(point_coords)}"
            )
        b, n = point_coords.shape[:2]
        if tuple(point_labels.shape) != (b, n):
            raise ValueError(
                f"point_labels: expected shape ({b}, {n}) as point_coords, "
                f"got {_shape(point_labels)}"
            )
        check_finite(point_coords, "point_coords")
        check_labels(point_labels, "point_labels")
        sizes["point_coords"] = b
    if boxes is not None:
        if not (boxes.ndim == 2 or (boxes.ndim == 3 and boxes.shape[1] == 1)) or (
            boxes.shape[-1] != 4
        ):
            raise ValueError(f"boxes: expected shape (B, 4) XYXY, got {_shape(boxes)}")
        boxes = boxes.reshape(-1, 4)
        check_finite(boxes, "boxes")
        check_box_order(boxes, "boxes")
        sizes["boxes"] = boxes.shape[0]
    if mask_input is not None:
        if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, mask_size, mask_size):
            raise ValueError(
                f"mask_input: expected shape (B, 1, {mask_size}, {mask_size}) low-res logits, "
                f"got {_shape(mask_input)}"
            )
        check_finite(mask_input, "mask_input")
        sizes["mask_input"] = mask_input.shape[0]
    if len(set(sizes.values())) > 1:
        found = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"prompt batch sizes differ: expected the same B everywhere, got {found}")
    return boxes


# -- several objects, numpy ---------------------------------------------------------------------


def group_objects(prompts: ObjectPrompts, mask_size: int) -> tuple[int, list[PromptGroup]]:
    """Check K objects' prompts and group the objects by token layout.

    Objects with the same number of points and the same presence of box and mask are stacked,
    so each group is one decoder pass and each object gets exactly the tokens it would get
    alone (SAM's padding tokens are not free: extra ones change the masks slightly).
    Returns (K, groups).
    """
    entries = {
        "point_coords": _per_object(prompts.point_coords, "point_coords"),
        "point_labels": _per_object(prompts.point_labels, "point_labels"),
        "boxes": _per_object(prompts.boxes, "boxes"),
        "mask_inputs": _per_object(prompts.mask_inputs, "mask_inputs"),
    }
    given = {name: len(items) for name, items in entries.items() if items is not None}
    if not given:
        raise ValueError(
            "predict_objects: expected prompts for at least one object "
            "(point_coords with point_labels, boxes or mask_inputs), got none"
        )
    count = next(iter(given.values()))
    first = next(iter(given))
    for name, length in given.items():
        if length != count:
            raise ValueError(
                f"{name}: expected {count} entries, one per object as in {first}, got {length}"
            )

    objects: dict[tuple[int, bool, bool], list[tuple[int, Any, Any, Any]]] = {}
    for k in range(count):
        coords, labels, box, mask = (
            None if items is None else items[k] for items in entries.values()
        )
        points = as_points(coords, labels, f"point_coords[{k}]", f"point_labels[{k}]")
        if points is not None and len(points[0]) == 0:
            points = None
        box = as_box(box, f"boxes[{k}]")
        mask = as_mask_input(mask, mask_size, f"mask_inputs[{k}]")
        if points is None and box is None and mask is None:
            raise ValueError(
                f"object {k}: expected at least one prompt (points, box or mask input), got none"
            )
        key = (0 if points is None else len(points[0]), box is not None, mask is not None)
        objects.setdefault(key, []).append((k, points, box, mask))
    return count, [_stack(members) for members in objects.values()]


def as_object_prompts(prompt: ObjectPrompts | Mapping[str, Any]) -> ObjectPrompts:
    """An ObjectPrompts from itself or from a dict of its fields."""
    if isinstance(prompt, ObjectPrompts):
        return prompt
    if isinstance(prompt, Mapping):
        unknown = set(prompt) - set(ObjectPrompts.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown keys {sorted(unknown)}; expected point_coords, point_labels, boxes, "
                "mask_inputs"
            )
        return ObjectPrompts(**prompt)
    raise ValueError(f"expected ObjectPrompts or a dict, got {type(prompt).__name__}")


def _stack(members: list[tuple[int, Any, Any, Any]]) -> PromptGroup:
    indices = [k for k, *_ in members]
    points = [p for _, p, _, _ in members]
    boxes = [b for _, _, b, _ in members]
    masks = [m for _, _, _, m in members]
    return PromptGroup(
        indices=indices,
        point_coords=None if points[0] is None else np.stack([p[0] for p in points]),
        point_labels=None if points[0] is None else np.stack([p[1] for p in points]),
        boxes=None if boxes[0] is None else np.stack(boxes),
        mask_inputs=None if masks[0] is None else np.stack(masks),
    )


def _per_object(value: Any, name: str) -> list[Any] | None:
    """K per-object entries from a list/tuple of entries or an array with K rows."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise ValueError(f"{name}: expected one entry per object, got a scalar")
        return list(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    raise ValueError(f"{name}: expected a list with one entry per object, got {type(value)}")


# -- helpers ------------------------------------------------------------------------------------


def _as_array(value: Any, name: str, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError):
        raise ValueError(f"{name}: expected an array of numbers, got {_describe(value)}") from None


def _first(mask: Array) -> tuple[int, ...] | int:
    """Index of the first True entry (an int for 1-D input)."""
    if isinstance(mask, torch.Tensor):
        index = tuple(int(i) for i in mask.nonzero()[0])
    else:
        index = tuple(int(i[0]) for i in np.nonzero(mask))
    return index[0] if len(index) == 1 else index


def _item(values: Array, index: tuple[int, ...] | int) -> str:
    value = values[index]
    value = value.item() if hasattr(value, "item") else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _shape(value: Array) -> str:
    return str(tuple(int(s) for s in value.shape))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
