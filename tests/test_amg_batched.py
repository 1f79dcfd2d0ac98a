"""Batched helpers of the generator: device-side RLE (RleBatch), boxes and areas, MaskTable.
Everything is compared exactly with the one-mask-at-a-time utilities of samkit.amg.masks."""

from __future__ import annotations

import numpy as np
import torch

from samkit.amg.generator import boxes_and_areas
from samkit.amg.masks import batched_mask_to_box, mask_to_rle
from samkit.amg.records import MaskTable
from samkit.amg.rle_batch import RleBatch


def test_boxes_and_areas_match_their_definitions() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((12, 9, 14)) < rng.uniform(0.0, 0.2, (12, 1, 1))
    masks[0], masks[1] = False, True
    boxes, areas = boxes_and_areas(torch.from_numpy(masks))
    assert torch.equal(boxes, batched_mask_to_box(torch.from_numpy(masks)))
    assert areas.tolist() == masks.sum((1, 2)).tolist()
    assert boxes[0].tolist() == [0, 0, 0, 0] and boxes[1].tolist() == [0, 0, 13, 8]


def test_rle_batch_round_trips() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((9, 7, 5)) < rng.uniform(0.1, 0.9, (9, 1, 1))
    masks[0], masks[1], masks[2] = False, True, False
    masks[2, 0, 0] = masks[3, -1, -1] = True
    batch = RleBatch.encode(torch.from_numpy(masks))
    np.testing.assert_array_equal(batch.decode().numpy(), masks)
    official = mask_to_rle(torch.from_numpy(masks))
    assert [c.tolist() for c in batch.to_counts()] == [r["counts"] for r in official]
    index = torch.tensor([8, 2, 2, 0])
    np.testing.assert_array_equal(batch.select(index).decode().numpy(), masks[index.numpy()])
    joined = RleBatch.cat([batch.select(index), RleBatch.empty((7, 5)), batch])
    np.testing.assert_array_equal(
        joined.decode().numpy(), np.concatenate([masks[[8, 2, 2, 0]], masks])
    )
    chunks = [c.numpy() for c in batch.decode_chunks(4)]
    assert [len(c) for c in chunks] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), masks)


def test_mask_table_select_and_cat_keep_rows_together() -> None:
    rng = np.random.default_rng(2)
    masks = torch.from_numpy(rng.random((6, 5, 8)) < 0.4)
    boxes, areas = boxes_and_areas(masks)
    table = MaskTable(
        rles=RleBatch.encode(masks),
        boxes=boxes,
        areas=areas,
        iou_preds=torch.linspace(0, 1, 6),
        stability_scores=torch.linspace(1, 0, 6),
        crop_ids=torch.zeros(6, dtype=torch.int64),
        point_ids=torch.arange(6),
    )
    picked = MaskTable.cat([table.select(torch.tensor([4, 1])), table.select(table.areas > 15)])
    rows = [4, 1, *np.flatnonzero(areas.numpy() > 15)]
    assert picked.point_ids.tolist() == rows
    assert torch.equal(picked.rles.decode(), masks[rows])
    assert torch.equal(picked.boxes, boxes[rows]) and torch.equal(picked.areas, areas[rows])
    assert torch.equal(picked.iou_preds, table.iou_preds[rows])
