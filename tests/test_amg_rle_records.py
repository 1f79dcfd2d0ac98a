"""RleBatch to records: binary masks, uncompressed counts and COCO strings, on every path.

Each path (host numpy, device tensor ops run here on CPU tensors, CUDA where present) is
compared exactly with independent references: the masks themselves, counts from walking the
pixels with itertools.groupby, and pycocotools' own encoder for the COCO strings.
"""

from __future__ import annotations

from itertools import groupby, pairwise

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from samkit.amg import rle_batch
from samkit.amg.coco_rle import coco_strings
from samkit.amg.records import MaskTable, make_records
from samkit.amg.rle_batch import RleBatch

from reference import DEVICES


def _shapes(h: int, w: int, seed: int) -> np.ndarray:
    """[16, h, w] bool: empties (leading, consecutive, trailing), full, corners, checkers,
    an ellipse, noise of several densities, and a mask with runs of one pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    masks = np.zeros((16, h, w), dtype=bool)
    masks[1] = True
    masks[2, 0, 0] = True  # first pixel set: counts start with a 0
    masks[3, -1, -1] = True
    masks[4] = (y + x) % 2 == 0  # every run is one pixel
    masks[5] = ((y - h / 2) / (h / 3 + 1)) ** 2 + ((x - w / 2) / (w / 4 + 1)) ** 2 < 1
    masks[6] = rng.random((h, w)) < 0.05
    masks[7] = rng.random((h, w)) < 0.5
    masks[8] = rng.random((h, w)) < 0.95  # mostly set, usually from pixel (0, 0)
    masks[10] = masks[5] ^ (rng.random((h, w)) < 0.1)
    masks[11] = x < w // 2
    masks[12] = y >= h // 2
    masks[13] = ~masks[5]
    # 0, 9, 14 and 15 stay empty: at the start, between masks and (twice) at the end
    return masks


MASKS = [_shapes(13, 17, 0), _shapes(1, 9, 1), _shapes(9, 1, 2), _shapes(40, 33, 3)]


def _reference_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths, zeros first."""
    runs = [(bool(v), len(list(g))) for v, g in groupby(mask.flatten(order="F"))]
    counts = [n for _, n in runs]
    return [0, *counts] if runs[0][0] else counts


def _pycocotools_string(mask: np.ndarray) -> str:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


@pytest.mark.parametrize("masks", MASKS, ids=lambda m: "x".join(map(str, m.shape[1:])))
def test_counts_and_decode_paths_match_references(
    masks: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = RleBatch.encode(torch.from_numpy(masks))
    expected = [_reference_counts(m) for m in masks]
    for counts_of in (rle_batch._counts_host, rle_batch._counts_device):
        counts, bounds = (np.asarray(t) for t in counts_of(batch))
        assert bounds[0] == 0 and bounds[-1] == len(counts)
        assert [counts[a:b].tolist() for a, b in pairwise(bounds)] == expected
    assert [c.tolist() for c in batch.to_counts()] == expected
    flat = masks.transpose(0, 2, 1).reshape(len(masks), -1)  # column-major pixels
    for toggle_run in (1, 64, 10**9):  # the host decoder: np.repeat only, mixed, toggles only
        monkeypatch.setattr(rle_batch, "_TOGGLE_RUN", toggle_run)
        np.testing.assert_array_equal(rle_batch._decode_host(batch), flat)
    np.testing.assert_array_equal(rle_batch._decode_device(batch).numpy(), flat)
    for block in (1, 16, 64):  # the two-level scan over many blocks, ragged last block
        monkeypatch.setattr(rle_batch, "_SCAN_BLOCK", block)
        np.testing.assert_array_equal(rle_batch._decode_device(batch).numpy(), flat)
    np.testing.assert_array_equal(batch.decode().numpy(), masks)


@pytest.mark.parametrize("masks", MASKS, ids=lambda m: "x".join(map(str, m.shape[1:])))
def test_coco_strings_match_pycocotools(masks: np.ndarray) -> None:
    batch = RleBatch.encode(torch.from_numpy(masks))
    expected = [_pycocotools_string(m) for m in masks]
    assert batch.to_coco_strings() == expected  # host: pycocotools on our counts
    assert coco_strings(*rle_batch._counts_device(batch)) == expected  # the device encoder


def test_coco_strings_of_large_and_signed_differences() -> None:
    """Counts needing every group count 1..7, and count - count[i-2] of both signs."""
    runs = [0, 3, 15, 16, 17, 511, 512, 513, 2, 16383, 16384, 3, (1 << 19) + 1, 1, 1 << 24]
    runs += [5, (1 << 29) - 1, 1 << 29, 7, 1, 1 << 30, 9, 4]
    masks = [runs, runs[1:], runs[:4], [1 << 31], [0, 1 << 31]]
    counts = torch.tensor([c for m in masks for c in m])
    bounds = torch.tensor(np.cumsum([0, *map(len, masks)]))
    expected = []
    for m in masks:
        rle = coco_mask.frPyObjects({"size": [1, sum(m)], "counts": m}, 1, sum(m))
        expected.append(rle["counts"].decode())
    assert coco_strings(counts, bounds) == expected
    assert coco_strings(counts[:0], torch.zeros(1, dtype=torch.int64)) == []


def test_chunks_partition_the_batch() -> None:
    masks = MASKS[3]
    batch = RleBatch.encode(torch.from_numpy(masks))
    per_mask = batch.offsets.diff().tolist()
    for max_masks, max_runs in [(3, None), (None, 40), (2, 1), (None, 10**6)]:
        parts = list(batch.chunks(max_masks=max_masks, max_runs=max_runs))
        assert sum(len(p) for p in parts) == len(masks)
        for part in parts:
            assert max_masks is None or len(part) <= max_masks
            assert max_runs is None or len(part) == 1 or part.starts.shape[0] <= max_runs
        np.testing.assert_array_equal(torch.cat([p.decode() for p in parts]).numpy(), masks)
    # one mask with more positions than max_runs still makes a chunk of its own
    assert max(per_mask) > 40 and all(len(p) >= 1 for p in batch.chunks(max_runs=40))


@pytest.mark.parametrize("device", DEVICES)
def test_host_masks_layout_and_values(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    masks = MASKS[3]
    monkeypatch.setattr(rle_batch, "_STAGING_PIXELS", 3 * 40 * 33)  # several staging chunks
    batch = RleBatch.encode(torch.from_numpy(masks).to(device))
    out = batch.to_masks()
    assert out.shape == masks.shape and out.dtype == np.bool_
    np.testing.assert_array_equal(out, masks)
    for mask in out:  # the official rle_to_mask layout: a transposed column-major array
        assert mask.shape == (40, 33) and mask.flags.f_contiguous
    if device == "cpu":  # the non-CUDA device path, fed by the host decoder here
        block = np.empty((len(masks), 40 * 33), dtype=bool)
        rle_batch._decode_device_to_host(batch, block)
        np.testing.assert_array_equal(block, masks.transpose(0, 2, 1).reshape(len(masks), -1))
    assert RleBatch.empty((4, 6), device).to_masks().shape == (0, 4, 6)


# pycocotools' own decode trips a numpy 2 DeprecationWarning inside the library
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_make_records_in_every_output_mode(device: str) -> None:
    masks = np.concatenate([MASKS[3], MASKS[3][::-1]])
    n = len(masks)
    rles = RleBatch.encode(torch.from_numpy(masks).to(device))
    table = MaskTable(
        rles=rles,
        boxes=torch.zeros(n, 4, dtype=torch.int64, device=device),
        areas=torch.from_numpy(masks.sum((1, 2))).to(device),
        iou_preds=torch.ones(n, device=device),
        stability_scores=torch.ones(n, device=device),
        crop_ids=torch.zeros(n, dtype=torch.int64, device=device),
        point_ids=torch.zeros(n, dtype=torch.int64, device=device),
    )
    crop, points = [[0, 0, 33, 40]], [np.zeros((1, 2))]
    binary = make_records(table, crop, points, "binary_mask")
    rle = make_records(table, crop, points, "uncompressed_rle")
    coco = make_records(table, crop, points, "coco_rle")
    for i, mask in enumerate(masks):
        seg = binary[i].segmentation
        assert isinstance(seg, np.ndarray) and seg.dtype == np.bool_ and seg.shape == (40, 33)
        np.testing.assert_array_equal(seg, mask)
        assert rle[i].segmentation == {"size": [40, 33], "counts": _reference_counts(mask)}
        assert all(type(c) is int for c in rle[i].segmentation["counts"])
        assert coco[i].segmentation == {"size": [40, 33], "counts": _pycocotools_string(mask)}
        np.testing.assert_array_equal(coco[i].mask(), mask)
    empty = MaskTable.empty((40, 33), torch.device(device))
    assert make_records(empty, crop, points, "coco_rle") == []
