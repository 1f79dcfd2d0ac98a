"""SamAutomaticMaskGenerator: each step against its definition, the whole pipeline against a
loop-based numpy re-implementation on the same model outputs, and end to end on TINY.

Most tests swap the decoder of a TINY model for `disk_decoder`: three textured disks around each
point, with a predicted IoU that depends on the point, so masks differ, overlap, touch crop
edges and have holes and islands (random weights give near-identical masks for every point).
Comparisons are exact except predicted IoU and stability scores (float32, atol 1e-6).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from samkit import SamAutomaticMaskGenerator
from samkit.amg.geometry import generate_crop_boxes
from samkit.amg.masks import batched_mask_to_box, mask_to_rle, rle_to_mask
from samkit.amg.records import MaskRecord, MaskTable
from samkit.amg.rle_batch import RleBatch
from samkit.predictor import SamPredictor

from reference import TINY, random_sam

ATOL = 1e-6


@pytest.fixture(scope="module")
def model():
    return random_sam(TINY, seed=0)


def disk_decoder(model):
    """A stand-in for `predictor._decode` (points only): logits of three textured disks of
    growing radius around each point, IoU predictions in [-0.05, 1.15] from the point."""
    size, m = model.config.image_size, model.config.mask_size
    centres = (torch.arange(m, dtype=torch.float32) + 0.5) * (size / m)
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    texture = 1.5 * torch.sin(gx * 0.35) * torch.cos(gy * 0.4)

    def decode(
        features, point_coords, point_labels, boxes, mask_input, multimask_output, image_side=None
    ):
        xy = point_coords[:, 0].cpu().to(torch.float32)  # Bx2, model input frame
        x, y = xy[:, 0, None, None], xy[:, 1, None, None]
        dist = torch.sqrt((gx - x) ** 2 + (gy - y) ** 2)  # Bxmxm
        wobble = 1 + 0.4 * torch.sin(0.05 * xy[:, 0] + 0.11 * xy[:, 1])
        radii = torch.tensor([0.06, 0.15, 0.3]) * size * wobble[:, None]  # Bx3
        logits = (radii[:, :, None, None] - dist[:, None]) / 2 + texture
        phase = 0.13 * xy[:, :1] + 0.29 * xy[:, 1:] + 1.7 * torch.arange(3)
        return logits.to(features.device), (0.55 + 0.6 * torch.sin(phase)).to(features.device)

    return decode


def disk_generator(model, **options) -> SamAutomaticMaskGenerator:
    options = {"points_per_side": 6, "points_per_batch": 10, **options}
    generator = SamAutomaticMaskGenerator(model, **options)
    decode = disk_decoder(model)
    generator.predictor._decode = decode
    # the split hooks (IoU first, masks of chosen prompts) that the IoU filter uses
    generator.predictor._decode_tokens = lambda *args: _DiskTokens(*decode(*args))
    generator.predictor._decode_masks = lambda tokens, prompts: tokens.low_res[prompts]
    return generator


class _DiskTokens(NamedTuple):
    """`disk_decoder`'s masks standing in for `DecodedTokens`."""

    low_res: torch.Tensor
    iou_pred: torch.Tensor

    def prompts_between(self, start: int, stop: int) -> _DiskTokens:
        return _DiskTokens(self.low_res[start:stop], self.iou_pred[start:stop])


def photo(h: int = 48, w: int = 72, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


# -- the reference: the official algorithm, one mask at a time, in numpy ---------------------


def reference_generate(gen: SamAutomaticMaskGenerator, image: np.ndarray) -> list[dict]:
    h, w = image.shape[:2]
    predictor = SamPredictor(gen.model)
    predictor._decode = gen.predictor._decode
    crop_boxes, layers = generate_crop_boxes((h, w), gen.crop_n_layers, gen.crop_overlap_ratio)
    masks = []
    for crop, layer in zip(crop_boxes, layers, strict=True):
        x0, y0, x1, y1 = crop
        predictor.set_image(image[y0:y1, x0:x1])
        points = gen.point_grids[layer] * np.array([x1 - x0, y1 - y0])
        found = []
        for begin in range(0, len(points), gen.points_per_batch):
            batch = points[begin : begin + gen.points_per_batch]
            coords = torch.as_tensor(predictor.transform.apply_coords(batch, (y1 - y0, x1 - x0)))
            logits, ious, _ = predictor.predict_torch(
                coords[:, None], torch.ones(len(batch), 1, dtype=torch.int), return_logits=True
            )
            for j, k in np.ndindex(*ious.shape):
                point = batch[j] + [x0, y0]
                found += _reference_mask(
                    gen, logits[j, k].numpy(), float(ious[j, k]), crop, point, h, w
                )
        scores = [m["iou"] for m in found]
        masks += [found[i] for i in _reference_nms(found, scores, gen.box_nms_thresh)]
    if len(crop_boxes) > 1:
        scores = [1 / np.float32((c[2] - c[0]) * (c[3] - c[1])) for c in (m["crop"] for m in masks)]
        masks = [masks[i] for i in _reference_nms(masks, scores, gen.crop_nms_thresh)]
    if gen.min_mask_region_area > 0:
        scores = []
        for m in masks:
            m["mask"], changed = _reference_cleanup(m["mask"], gen.min_mask_region_area)
            m["box"] = _box(m["mask"])
            scores.append(0.0 if changed else 1.0)
        thresh = max(gen.box_nms_thresh, gen.crop_nms_thresh)
        masks = [masks[i] for i in _reference_nms(masks, scores, thresh)]
    return masks


def _reference_mask(gen, logits, iou, crop, point, h, w) -> list[dict]:
    if gen.pred_iou_thresh > 0 and not iou > gen.pred_iou_thresh:
        return []
    loose = (logits > -gen.stability_score_offset).sum()
    stability = (logits > gen.stability_score_offset).sum() / loose if loose else 0.0
    if gen.stability_score_thresh > 0 and not stability >= gen.stability_score_thresh:
        return []
    mask = logits > 0
    x0, y0 = crop[:2]
    box = _box(mask) + np.array([x0, y0, x0, y0])
    for i, edge in enumerate(crop):  # inner crop edges: within 20 px of the crop, not the image
        if abs(box[i] - edge) <= 20 and abs(box[i] - [0, 0, w, h][i]) > 20:
            return []
    full = np.zeros((h, w), bool)
    full[y0 : crop[3], x0 : crop[2]] = mask
    return [dict(mask=full, box=box, iou=iou, stability=stability, crop=crop, point=point)]


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()]) if len(xs) else np.zeros(4, int)


def _reference_nms(masks: list[dict], scores, thresh) -> list[int]:
    boxes = [m["box"] for m in masks]
    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(_box_iou(boxes[i], boxes[j]) <= thresh for j in keep):
            keep.append(i)
    return keep


def _box_iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(np.float32(inter) / np.float32(union)) if union > 0 else 0.0


def _reference_cleanup(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """Fill holes, then drop islands, below min_area (8-connected); `changed`: any found."""
    changed = False
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), None, 8)
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < min_area:
            mask, changed = mask | (labels == k), True
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), None, 8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if (areas < min_area).any():
        changed = True
        keep = areas >= min_area if (areas >= min_area).any() else areas == areas.max()
        mask = np.isin(labels, 1 + np.flatnonzero(keep))
    return mask, changed


def assert_same(records: list[MaskRecord], expected: list[dict]) -> None:
    assert len(records) == len(expected)
    for r, e in zip(records, expected, strict=True):
        np.testing.assert_array_equal(r.mask(), e["mask"])
        x0, y0, x1, y1 = e["box"]
        assert r.bbox == (x0, y0, x1 - x0, y1 - y0)
        assert r.area == e["mask"].sum()
        assert r.point_coords == tuple(e["point"])
        c = e["crop"]
        assert r.crop_box == (c[0], c[1], c[2] - c[0], c[3] - c[1])
        assert abs(r.predicted_iou - e["iou"]) <= ATOL
        assert abs(r.stability_score - e["stability"]) <= ATOL


# -- the whole pipeline against the reference -------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},  # official defaults: few masks pass
        {"pred_iou_thresh": 0.5, "stability_score_thresh": 0.6},
        {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 0.9},
        {"pred_iou_thresh": 0.3, "stability_score_thresh": 0.3, "crop_n_layers": 1},
        {
            "pred_iou_thresh": 0.2,
            "stability_score_thresh": 0.2,
            "stability_score_offset": 2.0,
            "crop_n_layers": 1,
            "crop_n_points_downscale_factor": 2,
            "min_mask_region_area": 20,
        },
    ],
)
def test_pipeline_matches_loop_reference(model, options) -> None:
    gen = disk_generator(model, output_mode="uncompressed_rle", **options)
    image = photo()
    expected = reference_generate(gen, image)
    assert_same(gen.generate_records(image), expected)
    if options:
        assert len(expected) >= 5  # the comparison saw something


def test_zero_thresholds_switch_the_filters_off(model) -> None:
    gen = disk_generator(model, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1)
    records = gen.generate_records(photo())
    assert len(records) == 3 * 36  # every mask of every point survives
    assert min(r.predicted_iou for r in records) < 0  # an IoU threshold of 0 is not applied
    assert min(r.stability_score for r in records) < 0.5


def test_records_rank_by_predicted_iou_within_a_crop(model) -> None:
    gen = disk_generator(model, pred_iou_thresh=0.1, stability_score_thresh=0.1)
    records = gen.generate_records(photo())
    ious = [r.predicted_iou for r in records]
    assert len(ious) > 3 and ious == sorted(ious, reverse=True)


def test_no_kept_mask_touches_an_inner_crop_edge(model) -> None:
    gen = disk_generator(model, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1)
    image = photo()
    h, w = image.shape[:2]
    records = gen.generate_records(image)
    from_crops = [r for r in records if r.crop_box != (0, 0, w, h)]
    assert len(from_crops) > 5
    for r in from_crops:
        cx, cy, cw, ch = r.crop_box
        x, y, bw, bh = r.bbox
        for coord, edge, image_edge in [
            (x, cx, 0),
            (y, cy, 0),
            (x + bw, cx + cw, w),
            (y + bh, cy + ch, h),
        ]:
            assert abs(coord - edge) > 20 or abs(coord - image_edge) <= 20


# -- single steps on constructed masks ---------------------------------------------------------


def _table(masks: np.ndarray, ious, crop_ids=None) -> MaskTable:
    masks_t = torch.from_numpy(masks)
    n = len(masks)
    return MaskTable(
        rles=RleBatch.encode(masks_t),
        boxes=batched_mask_to_box(masks_t),
        areas=masks_t.sum((1, 2)),
        iou_preds=torch.tensor(ious, dtype=torch.float32),
        stability_scores=torch.ones(n),
        crop_ids=torch.tensor(crop_ids if crop_ids is not None else [0] * n),
        point_ids=torch.arange(n),
    )


def _rect(h, w, x0, y0, x1, y1) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_cross_crop_duplicates_prefer_smaller_crops() -> None:
    crops = [[0, 0, 40, 30], [0, 0, 25, 20], [15, 0, 40, 20]]
    masks = np.stack([_rect(30, 40, 5, 5, 15, 15)] * 3 + [_rect(30, 40, 20, 2, 30, 9)])
    # the same square from the whole image (best IoU), crop 2 (smaller) and crop 1 (larger)
    table = _table(masks, [0.99, 0.5, 0.6, 0.7], crop_ids=[0, 2, 1, 2])
    kept = SamAutomaticMaskGenerator.remove_crop_duplicates(table, crops, nms_thresh=0.7)
    assert kept.point_ids.tolist() == [1, 3]  # smallest crop first, then by position


def test_small_region_cleanup_prefers_unchanged_masks() -> None:
    h, w = 30, 40
    clean = _rect(h, w, 5, 5, 25, 25)
    holey = clean.copy()
    holey[10, 10] = False  # a 1-pixel hole
    island = clean | _rect(h, w, 35, 2, 37, 4)  # a 4-pixel island far away
    lone = _rect(h, w, 30, 20, 32, 22)  # a lone small island: kept, but counts as cleaned up
    table = _table(np.stack([holey, island, clean, lone]), [0.9, 0.8, 0.7, 0.6])
    out = SamAutomaticMaskGenerator.postprocess_small_regions(table, min_area=10, nms_thresh=0.7)
    # the clean mask (score 1) suppresses both cleaned-up copies of itself; the lone one stays
    assert out.point_ids.tolist() == [2, 3]
    np.testing.assert_array_equal(out.rles.decode().numpy(), np.stack([clean, lone]))
    assert out.areas.tolist() == [400, 4]

    # without the clean copy, the cleaned masks are kept with new masks, boxes and areas
    table = _table(np.stack([holey, island]), [0.9, 0.8])
    out = SamAutomaticMaskGenerator.postprocess_small_regions(table, min_area=10, nms_thresh=1.0)
    np.testing.assert_array_equal(out.rles.decode().numpy(), np.stack([clean, clean]))
    assert out.boxes.tolist() == [[5, 5, 24, 24]] * 2


def test_max_mask_region_fraction_drops_large_masks(model) -> None:
    options = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    image = photo()
    everything = disk_generator(model, **options).generate_records(image)
    limited = disk_generator(model, **options, max_mask_region_fraction=0.1).generate_records(image)
    limit = 0.1 * image.shape[0] * image.shape[1]
    assert [r.area for r in limited] == [r.area for r in everything if r.area <= limit]
    assert 0 < len(limited) < len(everything)


# -- output modes and records --------------------------------------------------------------------


def test_output_modes_decode_to_the_same_masks(model) -> None:
    options = {"pred_iou_thresh": 0.2, "stability_score_thresh": 0.2, "crop_n_layers": 1}
    image = photo()
    binary = disk_generator(model, **options).generate(image)
    rle = disk_generator(model, output_mode="uncompressed_rle", **options).generate(image)
    coco = disk_generator(model, output_mode="coco_rle", **options).generate(image)
    assert len(binary) == len(rle) == len(coco) > 5
    for b, u, c in zip(binary, rle, coco, strict=True):
        mask = b["segmentation"]
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert u["segmentation"]["counts"] == mask_to_rle(torch.from_numpy(mask)[None])[0]["counts"]
        np.testing.assert_array_equal(rle_to_mask(u["segmentation"]), mask)
        assert isinstance(c["segmentation"]["counts"], str)
        np.testing.assert_array_equal(coco_mask.decode(c["segmentation"]).astype(bool), mask)
        assert coco_mask.area(c["segmentation"]) == b["area"]
        assert {k: v for k, v in b.items() if k != "segmentation"} == {
            k: v for k, v in u.items() if k != "segmentation"
        }


# -- end to end on the TINY model (its own decoder, 160 px input) --------------------------------


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_generate_end_to_end_tiny(model, crop_n_layers) -> None:
    image = photo(45, 70, seed=1)
    gen = SamAutomaticMaskGenerator(
        model,
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        crop_n_layers=crop_n_layers,
        crop_nms_thresh=1.0,
    )
    records = gen.generate(image)
    if crop_n_layers == 0:
        assert len(records) == 4 * 4 * 3  # nothing is filtered
    else:
        assert_same(gen.generate_records(image), reference_generate(gen, image))
    for r in records:
        assert set(r) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "point_coords",
            "stability_score",
            "crop_box",
        }
        mask = r["segmentation"]
        assert mask.shape == (45, 70) and mask.dtype == bool
        assert type(r["area"]) is int and r["area"] == mask.sum()
        assert all(type(v) is int for v in r["bbox"] + r["crop_box"])
        x0, y0, x1, y1 = _box(mask)
        assert r["bbox"] == [x0, y0, x1 - x0, y1 - y0]
        assert type(r["predicted_iou"]) is float and type(r["stability_score"]) is float
        [[px, py]] = r["point_coords"]
        cx, cy, cw, ch = r["crop_box"]
        assert cx <= px <= cx + cw and cy <= py <= cy + ch


def test_generate_is_deterministic(model) -> None:
    options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    image = photo(seed=2)
    first = SamAutomaticMaskGenerator(model, crop_n_layers=1, **options).generate(image)
    second = SamAutomaticMaskGenerator(model, crop_n_layers=1, **options).generate(image)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.pop("segmentation"), b.pop("segmentation"))
        assert a == b


def test_several_batches_per_decoder_call_give_the_same_records(model, monkeypatch) -> None:
    # on CUDA the generator decodes whole groups of batches per call (`_points_per_decode`)
    # and filters them batch by batch; forced here on the CPU: groups of 3 batches of 5
    # points over 16 points (a last group of one point), against one batch per call
    options = {"points_per_side": 4, "points_per_batch": 5, "pred_iou_thresh": 0.01}
    options |= {"stability_score_thresh": 0.0, "crop_n_layers": 1}
    image = photo(seed=3)
    alone = SamAutomaticMaskGenerator(model, **options)
    assert alone._points_per_decode() == 5  # the CPU decodes one batch per call
    want = alone.generate(image)
    grouped = SamAutomaticMaskGenerator(model, **options)
    monkeypatch.setattr(grouped, "_points_per_decode", lambda: 15)
    got = grouped.generate(image)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.pop("segmentation"), b.pop("segmentation"))
        # the batched products of 15 prompts round differently from those of 5 (fp32)
        for key in ("predicted_iou", "stability_score"):
            assert abs(a.pop(key) - b.pop(key)) <= ATOL
        assert a == b


def test_invalid_arguments(model) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        SamAutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(model, output_mode="polygons")
    with pytest.raises(ValueError, match="point grids"):
        SamAutomaticMaskGenerator(model, None, point_grids=[np.zeros((1, 2))], crop_n_layers=1)
    with pytest.raises(ValueError, match="max_mask_region_fraction"):
        SamAutomaticMaskGenerator(model, max_mask_region_fraction=1.5)
    with pytest.raises(ValueError, match="points_per_side must be at least 1, got 0"):
        SamAutomaticMaskGenerator(model, points_per_side=0)
    with pytest.raises(ValueError, match="crop_n_points_downscale_factor must be at least 1"):
        SamAutomaticMaskGenerator(model, crop_n_points_downscale_factor=0)
    with pytest.raises(ValueError, match=r"crop layer 2 would get int\(3 / 2\*\*2\) = 0 points"):
        SamAutomaticMaskGenerator(
            model, points_per_side=3, crop_n_layers=2, crop_n_points_downscale_factor=2
        )
    SamAutomaticMaskGenerator(  # int(4 / 2**2) = 1 point per side in the deepest layer: fine
        model, points_per_side=4, crop_n_layers=2, crop_n_points_downscale_factor=2
    )
    with pytest.raises(ValueError, match="uint8"):
        SamAutomaticMaskGenerator(model).generate(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="load_image reads any image file"):
        SamAutomaticMaskGenerator(model).generate("photo.jpg")  # a path, not pixels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_records(model) -> None:
    options = {"pred_iou_thresh": 0.2, "stability_score_thresh": 0.2, "crop_n_layers": 1}
    options |= {"min_mask_region_area": 20, "output_mode": "coco_rle"}
    image = photo(96, 144)
    on_cpu = disk_generator(model, **options).generate(image)
    cuda_model = random_sam(TINY, seed=0).cuda()
    on_cuda = disk_generator(cuda_model, **options).generate(image)
    assert len(on_cpu) == len(on_cuda) > 10
    for a, b in zip(on_cpu, on_cuda, strict=True):
        assert a["segmentation"] == b["segmentation"]
        assert a["bbox"] == b["bbox"] and a["point_coords"] == b["point_coords"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) <= ATOL
        assert abs(a["stability_score"] - b["stability_score"]) <= ATOL


def test_tiny_thin_images_and_empty_crops(model) -> None:
    """5x5 has empty crops; 1x2100 and 2100x1 are over 2048:1, where the official resize
    rounds the short side to 0 pixels and fails: samkit resizes it to 1."""
    options = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    cases = [((1, 1), 0), ((3, 200), 0), ((5, 5), 2), ((1, 2100), 1), ((2100, 1), 0)]
    for shape, layers in cases:
        records = SamAutomaticMaskGenerator(model, crop_n_layers=layers, **options).generate(
            np.full((*shape, 3), 100, np.uint8)
        )
        assert records and all(r["segmentation"].shape == shape for r in records), shape
