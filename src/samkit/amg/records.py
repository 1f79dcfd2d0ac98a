"""The generator's masks as typed records: a device-side table while working, records at the end.

`MaskTable` is what the official code keeps in its `MaskData` dict, with fixed typed columns.
`MaskRecord` is one result; `MaskRecord.to_dict()` is the official record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from samkit.amg.masks import coco_rle_to_mask, rle_to_mask
from samkit.amg.rle_batch import RleBatch

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]
OUTPUT_MODES: tuple[str, ...] = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass(frozen=True)
class MaskTable:
    """Candidate masks of one image, one row per mask, all on one device.

    Boxes are XYXY with inclusive pixel indices in the original image's frame. `crop_ids` index
    the image's crop boxes and `point_ids` the point grid of that crop, so the float64 point
    coordinates are rebuilt exactly on the host at the end.
    """

    rles: RleBatch  # masks at the original image size
    boxes: Tensor  # [N, 4] int64
    areas: Tensor  # [N] int64
    iou_preds: Tensor  # [N] float
    stability_scores: Tensor  # [N] float
    crop_ids: Tensor  # [N] int64
    point_ids: Tensor  # [N] int64

    def __len__(self) -> int:
        return self.areas.shape[0]

    @classmethod
    def empty(cls, size: tuple[int, int], device: torch.device) -> MaskTable:
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(
            rles=RleBatch.empty(size, device),
            boxes=zeros(0, 4),
            areas=zeros(0),
            iou_preds=zeros(0, dtype=torch.float32),
            stability_scores=zeros(0, dtype=torch.float32),
            crop_ids=zeros(0),
            point_ids=zeros(0),
        )

    @classmethod
    def cat(cls, tables: Sequence[MaskTable]) -> MaskTable:
        """Rows of all tables, in order (at least one table)."""
        return cls(
            rles=RleBatch.cat([t.rles for t in tables]),
            boxes=torch.cat([t.boxes for t in tables]),
            areas=torch.cat([t.areas for t in tables]),
            iou_preds=torch.cat([t.iou_preds for t in tables]),
            stability_scores=torch.cat([t.stability_scores for t in tables]),
            crop_ids=torch.cat([t.crop_ids for t in tables]),
            point_ids=torch.cat([t.point_ids for t in tables]),
        )

    def select(self, index: Tensor) -> MaskTable:
        """The rows at `index` ([M] int64, in that order, or [N] bool)."""
        if index.dtype == torch.bool:
            index = index.nonzero().squeeze(1)
        return replace(
            self,
            rles=self.rles.select(index),
            boxes=self.boxes[index],
            areas=self.areas[index],
            iou_preds=self.iou_preds[index],
            stability_scores=self.stability_scores[index],
            crop_ids=self.crop_ids[index],
            point_ids=self.point_ids[index],
        )


@dataclass(frozen=True, eq=False)
class MaskRecord:
    """One generated mask, in the original image's frame (xy pixels).

    `segmentation` is an HxW bool array (output mode "binary_mask"), an uncompressed RLE dict
    with a `counts` list ("uncompressed_rle", column-major, zeros first) or a COCO RLE dict with
    `counts` as a str ("coco_rle"). Binary masks are F-contiguous, as the official's, and the
    masks of one `make_records` call are views of one buffer (`.copy()` one to keep it alone).
    `bbox` and `crop_box` are XYWH; as in the official records, the bbox width and height are
    x1 - x0 and y1 - y0 of the inclusive pixel box.
    """

    segmentation: np.ndarray | dict[str, Any]
    area: int
    bbox: tuple[int, int, int, int]
    predicted_iou: float
    point_coords: tuple[float, float]  # the point prompt (x, y) that produced the mask
    stability_score: float
    crop_box: tuple[int, int, int, int]

    def mask(self) -> np.ndarray:
        """The mask as an HxW bool array, whatever the output mode."""
        seg = self.segmentation
        if isinstance(seg, np.ndarray):
            return seg
        if isinstance(seg["counts"], str | bytes):
            return coco_rle_to_mask(seg)
        return rle_to_mask(seg)

    def to_dict(self) -> dict[str, Any]:
        """The official record: lists where the official has lists, point_coords as [[x, y]]."""
        return {
            "segmentation": self.segmentation,
            "area": self.area,
            "bbox": list(self.bbox),
            "predicted_iou": self.predicted_iou,
            "point_coords": [list(self.point_coords)],
            "stability_score": self.stability_score,
            "crop_box": list(self.crop_box),
        }


def make_records(
    table: MaskTable,
    crop_boxes: Sequence[Sequence[int]],
    crop_points: Sequence[np.ndarray],
    output_mode: OutputMode,
) -> list[MaskRecord]:
    """Records of every row of `table`, in order, with segmentations in `output_mode`.

    `crop_boxes` are XYXY (exclusive end) and `crop_points` the [P_c, 2] float64 xy points of
    each crop in the crop's frame. Each column crosses to the host once.
    """
    segmentations = _segmentations(table.rles, output_mode)
    boxes = table.boxes.cpu().numpy()
    areas = table.areas.cpu().tolist()
    ious = table.iou_preds.float().cpu().tolist()
    stabilities = table.stability_scores.float().cpu().tolist()
    crop_ids = table.crop_ids.cpu().numpy()
    point_ids = table.point_ids.cpu().numpy()

    crops = np.asarray(crop_boxes, dtype=np.int64).reshape(-1, 4)
    # point j of crop c is row first_point[c] + j of all crops' points
    first_point = np.cumsum([0, *(len(p) for p in crop_points)])[:-1]
    all_points = np.concatenate(
        [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in crop_points]
    )
    # uncropped as the official does it: (grid * crop size) + crop origin, in float64
    points = all_points[first_point[crop_ids] + point_ids] + crops[crop_ids, :2]
    crops_xywh = np.concatenate([crops[:, :2], crops[:, 2:] - crops[:, :2]], axis=1).tolist()
    boxes_xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()

    return [
        MaskRecord(
            segmentation=segmentations[i],
            area=areas[i],
            bbox=tuple(boxes_xywh[i]),
            predicted_iou=ious[i],
            point_coords=(float(points[i, 0]), float(points[i, 1])),
            stability_score=stabilities[i],
            crop_box=tuple(crops_xywh[crop_ids[i]]),
        )
        for i in range(len(table))
    ]


def _segmentations(rles: RleBatch, output_mode: OutputMode) -> list[Any]:
    h, w = rles.size
    if output_mode == "binary_mask":
        return list(rles.to_masks())  # views of one block, each HxW like the official's
    if output_mode == "uncompressed_rle":
        return [{"size": [h, w], "counts": c.tolist()} for c in rles.to_counts()]
    if output_mode == "coco_rle":
        return [{"size": [h, w], "counts": s} for s in rles.to_coco_strings()]
    raise ValueError(f"unknown output_mode {output_mode!r}; expected one of {OUTPUT_MODES}")
