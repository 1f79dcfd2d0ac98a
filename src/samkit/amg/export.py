"""Writing generated masks: SA-1B JSON, the official folder of PNGs with metadata.csv, overlays.

Every file is written atomically (a temp file, then a rename), and a mask folder appears whole:
it is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from samkit.amg.masks import coco_encode_rle
from samkit.amg.records import MaskRecord
from samkit.io import PNG_COMPRESS_LEVEL, write_atomic

# the official scripts/amg.py columns, one row per mask, `id` = i of `<i>.png`
METADATA_COLUMNS = (
    "id",
    "area",
    "bbox_x0",
    "bbox_y0",
    "bbox_w",
    "bbox_h",
    "point_input_x",
    "point_input_y",
    "predicted_iou",
    "stability_score",
    "crop_box_x0",
    "crop_box_y0",
    "crop_box_w",
    "crop_box_h",
)
METADATA_FILE = "metadata.csv"


def sa1b_document(
    records: Sequence[MaskRecord], *, image_id: int, file_name: str, height: int, width: int
) -> dict[str, Any]:
    """The SA-1B per-image JSON: `{"image": {...}, "annotations": [...]}`, COCO RLE masks.

    Annotation `id`s are the records' positions (0, 1, ...), as the PNG layout's `id`s.
    """
    annotations = [
        {
            "id": i,
            "segmentation": coco_rle(record),
            "bbox": list(record.bbox),
            "area": record.area,
            "predicted_iou": record.predicted_iou,
            "stability_score": record.stability_score,
            "crop_box": list(record.crop_box),
            "point_coords": [list(record.point_coords)],
        }
        for i, record in enumerate(records)
    ]
    image = {"image_id": image_id, "width": width, "height": height, "file_name": file_name}
    return {"image": image, "annotations": annotations}


def write_sa1b_json(path: str | os.PathLike, document: dict[str, Any]) -> None:
    """Write an SA-1B document atomically."""
    write_atomic(path, json.dumps(document))


def coco_rle(record: MaskRecord) -> dict[str, Any]:
    """The record's mask as a COCO RLE with a str `counts`, from any output mode."""
    seg = record.segmentation
    if isinstance(seg, np.ndarray):
        encoded = coco_mask.encode(np.asfortranarray(seg, dtype=np.uint8))
        return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode()}
    if isinstance(seg["counts"], str):
        return seg
    if isinstance(seg["counts"], bytes):
        return {"size": list(seg["size"]), "counts": seg["counts"].decode()}
    return coco_encode_rle(seg)


def metadata_csv(records: Sequence[MaskRecord]) -> str:
    """The official metadata.csv text: a header and one row per mask."""
    rows = [",".join(METADATA_COLUMNS)]
    for i, r in enumerate(records):
        values = [i, r.area, *r.bbox, *r.point_coords, r.predicted_iou, r.stability_score]
        rows.append(",".join(str(v) for v in [*values, *r.crop_box]))
    return "\n".join(rows) + "\n"


def write_mask_folder(folder: str | os.PathLike, records: Sequence[MaskRecord]) -> None:
    """The official PNG layout: `<i>.png` (0/255 gray) per mask and metadata.csv.

    Written into a hidden temp folder beside `folder`, then renamed into place; an existing
    `folder` is replaced.
    """
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    try:
        for i, record in enumerate(records):
            png = Image.fromarray(record.mask().astype(np.uint8) * np.uint8(255))
            png.save(tmp / f"{i}.png", format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        (tmp / METADATA_FILE).write_text(metadata_csv(records), encoding="utf-8")
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.old")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def overlay(
    image: np.ndarray, records: Sequence[MaskRecord], alpha: float = 0.5, seed: int = 0
) -> np.ndarray:
    """The image with every mask blended in its own colour; smaller masks drawn on top.

    Args:
        image: HxWx3 uint8 RGB. records: masks of that image (any output mode).
    Returns:
        HxWx3 uint8.
    """
    h, w = image.shape[:2]
    label = np.full((h, w), -1, dtype=np.int32)
    order = sorted(range(len(records)), key=lambda i: -records[i].area)
    for i in order:  # largest first, so smaller masks overwrite them
        x0, y0, bw, bh = records[i].bbox
        window = (slice(y0, y0 + bh + 1), slice(x0, x0 + bw + 1))  # the inclusive pixel box
        label[window][records[i].mask()[window]] = i
    colours = np.random.default_rng(seed).integers(0, 256, size=(len(records), 3))
    covered = label >= 0
    out = image.astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * colours[label[covered]]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
