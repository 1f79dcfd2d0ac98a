"""Segment everything: prompt SAM with a grid of points and keep the good, distinct masks.

The algorithm and its defaults are the official `SamAutomaticMaskGenerator`'s, so the same
weights give the same records. What differs is where the work happens: each batch of points is
decoded, filtered, boxed and run-length encoded on the model's device with batched tensor ops,
masks are kept as device-side RLE (`RleBatch`) rather than full-resolution tensors, and results
cross to the host once per image.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from samkit.amg.geometry import (
    box_area,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    nms,
    uncrop_boxes_xyxy,
    uncrop_masks,
)
from samkit.amg.masks import calculate_stability_score, stability_from_counts
from samkit.amg.postprocess import remove_small_regions
from samkit.amg.records import OUTPUT_MODES, MaskRecord, MaskTable, OutputMode, make_records
from samkit.amg.rle_batch import RleBatch
from samkit.kernels import mask_stats
from samkit.modeling import PointLabel, Sam
from samkit.modeling.mask_decoder import DecodedTokens
from samkit.predictor import SamPredictor

# masks whose box comes this close (pixels) to an inner crop edge are cut off by the crop
CROP_EDGE_TOLERANCE = 20.0
# points per decoder call on CUDA (`_points_per_decode`): 1024 instead of 256 gained ~3%; the
# decoder's work space per point, rounded up (6.2 GiB measured at 256 points, vit_b, H100)
MAX_POINTS_PER_DECODE = 256
DECODE_BYTES_PER_POINT = 32 << 20
# bound on the mask pixels decoded at once during small-region cleanup
_CLEANUP_PIXELS = 1 << 27


class SamAutomaticMaskGenerator:
    """Masks for a whole image from a grid of point prompts (the official generator's API).

    For each crop (layer 0 is the whole image, layer i adds (2**i)**2 overlapping crops): encode
    the crop, prompt one point at a time from the layer's grid, in batches of
    `points_per_batch`, three masks per point; keep masks with predicted IoU above
    `pred_iou_thresh` and stability score at least `stability_score_thresh` (each filter off at
    0); drop masks cut by an inner crop edge; box NMS ranked by predicted IoU within the crop,
    then across crops ranked by 1 / crop area (smaller crops win). With
    `min_mask_region_area > 0`, holes and then islands smaller than that are removed and a box
    NMS prefers masks that needed no cleanup.

    Beyond the official: `max_mask_region_fraction` drops masks covering more than this
    fraction of the image (the paper used 0.95), and `generate_records` returns typed
    `MaskRecord`s (`generate` returns their official dicts).
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: OutputMode = "binary_mask",
        *,
        max_mask_region_fraction: float | None = None,
        fast: bool = False,
    ) -> None:
        """`point_grids` (exclusive with `points_per_side`) gives layer i's points as [P, 2] xy
        in [0, 1]; otherwise layer i has int(points_per_side / factor**i) points per side.
        `fast=True` encodes through samkit.fast (see SamPredictor); the default is exact fp32."""
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if points_per_side is not None:
            _check_grid(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
            point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        assert point_grids is not None
        if len(point_grids) < crop_n_layers + 1:
            raise ValueError(f"{len(point_grids)} point grids for {crop_n_layers + 1} crop layers")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {output_mode!r}; expected one of {OUTPUT_MODES}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be at least 1, got {points_per_batch}")
        if max_mask_region_fraction is not None and not 0 < max_mask_region_fraction <= 1:
            raise ValueError(
                f"max_mask_region_fraction must be in (0, 1], got {max_mask_region_fraction}"
            )

        self.predictor = SamPredictor(model, fast=fast)
        self.point_grids = [
            np.asarray(grid, dtype=np.float64).reshape(-1, 2) for grid in point_grids
        ]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.max_mask_region_fraction = max_mask_region_fraction
        # `_points_per_decode`, once decided: (points_per_batch, points per decoder call)
        self._decode_points: tuple[int, int] | None = None

    @property
    def model(self) -> Sam:
        return self.predictor.model

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Official records for an HxWx3 uint8 RGB image: dicts with segmentation, area, bbox
        (XYWH), predicted_iou, point_coords ([[x, y]]), stability_score, crop_box (XYWH)."""
        return [record.to_dict() for record in self.generate_records(image)]

    @torch.inference_mode()
    def generate_records(self, image: np.ndarray) -> list[MaskRecord]:
        """Typed records for an HxWx3 uint8 RGB image, in the official order."""
        image = _check_image(image)
        orig_size = (image.shape[0], image.shape[1])
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        # each crop's points in its own frame, float64 as the official computes them
        crop_points = [
            self.point_grids[layer] * np.array([x1 - x0, y1 - y0])
            for (x0, y0, x1, y1), layer in zip(crop_boxes, layer_idxs, strict=True)
        ]
        tables = [
            self._process_crop(image, crop_box, crop_id, points)
            for crop_id, (crop_box, points) in enumerate(zip(crop_boxes, crop_points, strict=True))
        ]
        table = MaskTable.cat(tables)

        if len(crop_boxes) > 1:
            table = self.remove_crop_duplicates(table, crop_boxes, self.crop_nms_thresh)

        if self.min_mask_region_area > 0:
            table = self.postprocess_small_regions(
                table,
                self.min_mask_region_area,
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )
        return make_records(table, crop_boxes, crop_points, self.output_mode)

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], crop_id: int, points: np.ndarray
    ) -> MaskTable:
        """Masks of one crop, de-duplicated, in the image frame. `points`: [P, 2] crop frame."""
        x0, y0, x1, y1 = crop_box
        orig_size = (image.shape[0], image.shape[1])
        if x1 <= x0 or y1 <= y0:  # deep crop layers on tiny images give empty crops
            return MaskTable.empty(orig_size, self.model.device)
        self.predictor.set_image(image[y0:y1, x0:x1, :])
        embedding = self.predictor.get_image_embedding()
        tables = [MaskTable.empty(orig_size, self.model.device)]
        coords = self._model_coords(points)
        # decoded in groups of whole batches (`_points_per_decode`), filtered batch by batch;
        # group i+1 is queued before group i is filtered (the filter's host syncs wait for it
        # too; filtering on a second CUDA stream measured no clear gain, benchmarks/README.md)
        group = self._points_per_decode()
        decoded = None
        for begin in range(0, len(points), group):
            decoded, previous = (
                self._decode_batch(embedding, coords[begin : begin + group], begin),
                decoded,
            )
            if previous is not None:
                tables += self._process_group(previous, crop_box, crop_id, orig_size)
        if decoded is not None:
            tables += self._process_group(decoded, crop_box, crop_id, orig_size)
        self.predictor.reset_image()
        table = MaskTable.cat(tables)
        # duplicates within the crop
        return table.select(nms(table.boxes.float(), table.iou_preds, self.box_nms_thresh))

    def _model_coords(self, points: np.ndarray) -> Tensor:
        """A crop's points ([P, 2] crop frame) in the model input frame, (P, 1, 2) on the
        device: one copy for the whole crop (a copy from pageable host memory waits for the
        device's queue, which per batch left the GPU idle while the host launched the next)."""
        predictor = self.predictor
        # float64 coordinates, as the official passes them (except where the device lacks it)
        coords = predictor.transform.apply_coords(points, predictor.original_size)
        coords = torch.as_tensor(coords, device=self.model.device)[:, None, :]  # Px2 -> Px1x2
        return coords.float() if coords.device.type == "mps" else coords

    def _points_per_decode(self) -> int:
        """Points decoded per decoder call: whole batches of `points_per_batch`, several at a
        time on CUDA with the IoU filter on (each call's work is then large enough to fill the
        GPU: vit_b, 1024 points on an H100, 114 ms per image at 64 points a call, 96 at 256),
        as long as about 32 MiB of work space per point stays under a quarter of the free
        device memory. The masks of each batch are still decoded batch by batch.

        Decided on the first call and kept: one decoder layout (one pair of CUDA graphs) for
        every image, whatever the memory the first images leave cached."""
        batch = self.points_per_batch
        device = self.model.device
        if device.type != "cuda" or self.pred_iou_thresh <= 0.0 or batch >= MAX_POINTS_PER_DECODE:
            return batch
        if self._decode_points is None or self._decode_points[0] != batch:
            free, _ = torch.cuda.mem_get_info(device)
            # memory PyTorch holds in its cache is free to it too
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            fit = free // 4 // DECODE_BYTES_PER_POINT
            points = batch * max(1, min(MAX_POINTS_PER_DECODE, fit) // batch)
            self._decode_points = (batch, points)
        return self._decode_points[1]

    def _decode_batch(self, embedding: Tensor, coords: Tensor, first_point_id: int) -> _Batch:
        """Queue the decoder on points `coords` ([B, 1, 2] model frame); no host sync."""
        predictor = self.predictor
        labels = torch.full(
            coords.shape[:2], PointLabel.FOREGROUND, dtype=torch.int, device=coords.device
        )
        # through the predictor's decode hooks, so speed-ups layered there apply here too
        if self.pred_iou_thresh > 0.0:
            # the IoU filter needs no pixels: only prompts with a mask passing it are upscaled
            tokens = predictor._decode_tokens(embedding, coords, labels, None, None, True)
            passing = (tokens.iou_pred > self.pred_iou_thresh).any(1)
            if not passing.is_cuda:
                return _Batch(first_point_id, tokens=tokens, passing=passing)
            # read back through pinned memory behind an event: the filter then waits for this
            # batch only, not for the next one queued behind it, so the GPU works while the
            # host filters (vit_b generate() 85-89 -> 83-86 ms on an H100, benchmarks/README.md)
            host = torch.empty(passing.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(passing, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return _Batch(first_point_id, tokens=tokens, passing=host, ready=ready)
        low_res, iou_preds = predictor._decode(embedding, coords, labels, None, None, True)
        return _Batch(first_point_id, low_res=low_res, iou_preds=iou_preds)

    def _process_group(
        self,
        decoded: _Batch,
        crop_box: list[int],
        crop_id: int,
        orig_size: tuple[int, int],
    ) -> list[MaskTable]:
        """`_process_batch` on each batch of `points_per_batch` points of a decoded group."""
        count = 0 if decoded.tokens is None else decoded.tokens.iou_pred.shape[0]
        if count <= self.points_per_batch:
            return [self._process_batch(decoded, crop_box, crop_id, orig_size)]
        return [
            self._process_batch(
                _Batch(
                    decoded.first_point_id + begin,
                    tokens=decoded.tokens.prompts_between(begin, begin + self.points_per_batch),
                    passing=decoded.passing[begin : begin + self.points_per_batch],
                    ready=decoded.ready,
                ),
                crop_box,
                crop_id,
                orig_size,
            )
            for begin in range(0, count, self.points_per_batch)
        ]

    def _process_batch(
        self,
        decoded: _Batch,
        crop_box: list[int],
        crop_id: int,
        orig_size: tuple[int, int],
    ) -> MaskTable:
        """Filter and encode the masks of one decoded batch of points."""
        model, predictor = self.model, self.predictor
        device = model.device
        orig_h, orig_w = orig_size
        tokens = decoded.tokens
        if tokens is not None:
            if decoded.ready is not None:
                decoded.ready.synchronize()
            prompts = decoded.passing.nonzero().squeeze(1)
            if prompts.shape[0] == 0:
                return MaskTable.empty(orig_size, device)
            if prompts.device != device:  # from pinned memory: no wait for the queue
                prompts = prompts.pin_memory().to(device, non_blocking=True)
            low_res = predictor._decode_masks(tokens, prompts)
            iou_preds = tokens.iou_pred[prompts]
        else:
            low_res, iou_preds = decoded.low_res, decoded.iou_preds
            prompts = torch.arange(low_res.shape[0], device=device)

        # BxCxhxw -> (B*C)xhxw: mask k of point j is row j*C + k
        n_out = low_res.shape[1]
        low_res, iou_preds = low_res.flatten(0, 1), iou_preds.flatten(0, 1)
        point_ids = prompts.repeat_interleave(n_out) + decoded.first_point_id

        if self.pred_iou_thresh > 0.0:
            keep = (iou_preds > self.pred_iou_thresh).nonzero().squeeze(1)
            low_res, iou_preds, point_ids = low_res[keep], iou_preds[keep], point_ids[keep]
        logits = model.postprocess_masks(
            low_res[:, None], predictor.input_size, predictor.original_size
        )[:, 0]  # Nx1xhxw -> NxHcxWc, the crop's size

        masks, stability, boxes, areas = threshold_statistics(
            logits, model.mask_threshold, self.stability_score_offset
        )
        del logits
        # the official applies these one after the other; together they keep the same masks
        keep = ~is_box_near_crop_edge(
            boxes, crop_box, [0, 0, orig_w, orig_h], atol=CROP_EDGE_TOLERANCE
        )
        if self.stability_score_thresh > 0.0:
            keep &= stability >= self.stability_score_thresh
        if self.max_mask_region_fraction is not None:
            keep &= areas <= self.max_mask_region_fraction * orig_h * orig_w
        keep = keep.nonzero().squeeze(1)
        if keep.shape[0] < masks.shape[0]:
            masks = masks[keep]
        n = keep.shape[0]
        return MaskTable(
            rles=RleBatch.encode(uncrop_masks(masks, crop_box, orig_h, orig_w)),
            boxes=uncrop_boxes_xyxy(boxes[keep], crop_box),
            areas=areas[keep],
            iou_preds=iou_preds[keep].float(),
            stability_scores=stability[keep].float(),
            crop_ids=torch.full((n,), crop_id, dtype=torch.int64, device=device),
            point_ids=point_ids[keep],
        )

    @staticmethod
    def remove_crop_duplicates(
        table: MaskTable, crop_boxes: list[list[int]], nms_thresh: float
    ) -> MaskTable:
        """Box NMS across crops ranked by 1 / crop area: masks from smaller crops win.

        `crop_boxes` are XYXY, indexed by `table.crop_ids`. Ties keep the earlier row.
        """
        crop_areas = box_area(torch.tensor(crop_boxes, device=table.boxes.device))
        scores = 1 / crop_areas.to(torch.float32)[table.crop_ids]
        return table.select(nms(table.boxes.float(), scores, nms_thresh))

    @staticmethod
    def postprocess_small_regions(table: MaskTable, min_area: int, nms_thresh: float) -> MaskTable:
        """Fill holes, then remove islands, smaller than `min_area`; NMS preferring clean masks.

        A mask scores 1 if neither pass found a small region and 0 otherwise, then box NMS at
        `nms_thresh` runs over the recomputed boxes. As in the official, a lone island smaller
        than `min_area` (kept, since it is the largest) still counts as cleaned up.
        """
        if len(table) == 0:
            return table
        h, w = table.rles.size
        device = table.rles.device
        rles, boxes, areas, unchanged = [], [], [], []
        for dense in table.rles.decode_chunks(max(1, _CLEANUP_PIXELS // max(1, h * w))):
            cleaned = []
            for mask in dense.contiguous().cpu().numpy():
                mask, holes_changed = remove_small_regions(mask, min_area, "holes")
                mask, islands_changed = remove_small_regions(mask, min_area, "islands")
                islands_changed |= 0 < int(mask.sum()) < min_area
                cleaned.append(mask)
                unchanged.append(not (holes_changed or islands_changed))
            masks = torch.from_numpy(np.stack(cleaned)).to(device)
            rles.append(RleBatch.encode(masks))
            chunk_boxes, chunk_areas = boxes_and_areas(masks)
            boxes.append(chunk_boxes)
            areas.append(chunk_areas)
        table = replace(
            table, rles=RleBatch.cat(rles), boxes=torch.cat(boxes), areas=torch.cat(areas)
        )
        scores = torch.tensor(unchanged, dtype=torch.float32, device=device)
        return table.select(nms(table.boxes.float(), scores, nms_thresh))


class _Batch(NamedTuple):
    """One batch of points, decoded: its tokens (IoU filter on) or masks (filter off)."""

    first_point_id: int
    tokens: DecodedTokens | None = None
    low_res: Tensor | None = None  # (B, 3, 256, 256) logits
    iou_preds: Tensor | None = None  # (B, 3)
    # with tokens: which points have a mask passing the IoU filter, (B,) bool, on the host
    # (pinned) once `ready` has passed where the device is a GPU
    passing: Tensor | None = None
    ready: torch.cuda.Event | None = None


def threshold_statistics(
    logits: Tensor, threshold: float, offset: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masks [N, H, W] bool (logits > threshold), their stability scores [N] float32, tight
    XYXY boxes [N, 4] int64 and areas [N] int64 from full-size logits [N, H, W]: one pass on
    CUDA (`samkit.kernels.mask_stats`), else `calculate_stability_score` and
    `boxes_and_areas`."""
    if mask_stats.supported(logits):
        masks, tight, loose, areas, extents = mask_stats.mask_statistics(logits, threshold, offset)
        boxes = torch.where(areas[:, None] > 0, extents.long(), 0)
        return masks, stability_from_counts(tight, loose), boxes, areas.long()
    stability = calculate_stability_score(logits, threshold, offset)
    masks = logits > threshold
    return masks, stability, *boxes_and_areas(masks)


def boxes_and_areas(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Tight boxes and pixel counts of masks [N, H, W] bool -> ([N, 4] int64, [N] int64).

    The boxes are `batched_mask_to_box`'s (XYXY inclusive, zeros for an empty mask); both come
    from one pass of row counts plus a column max, avoiding bool reductions that are slow on
    the CPU and an int64 copy of the masks.
    """
    row_dtype = torch.int16 if masks.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    row_counts = masks.sum(-1, dtype=row_dtype)  # NxH
    areas = row_counts.sum(-1, dtype=torch.int64)
    cols = masks.view(torch.uint8).amax(-2) > 0  # NxW
    y0, y1 = _first_last(row_counts > 0)
    x0, x1 = _first_last(cols)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return torch.where(areas[:, None] > 0, boxes, 0), areas


def _first_last(flags: Tensor) -> tuple[Tensor, Tensor]:
    """First and last True index along the last dim of [N, L] bool (garbage where none)."""
    idx = torch.arange(flags.shape[-1], device=flags.device)
    first = torch.where(flags, idx, flags.shape[-1]).amin(-1)
    last = torch.where(flags, idx, -1).amax(-1)
    return first, last


def _check_grid(points_per_side: int, crop_n_layers: int, downscale: int) -> None:
    """Every crop layer gets at least one point per side (the official divides by zero)."""
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be at least 1, got {points_per_side}")
    if downscale < 1:
        raise ValueError(f"crop_n_points_downscale_factor must be at least 1, got {downscale}")
    deepest = int(points_per_side / downscale**crop_n_layers)
    if deepest < 1:
        raise ValueError(
            f"crop layer {crop_n_layers} would get int({points_per_side} / {downscale}**"
            f"{crop_n_layers}) = 0 points per side; use fewer crop layers, a smaller "
            "crop_n_points_downscale_factor or more points_per_side"
        )


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an HxWx3 uint8 RGB image (samkit.io.load_image reads any image file as "
            f"one), got shape {image.shape} and dtype {image.dtype}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has no pixels: shape {image.shape}")
    return image
