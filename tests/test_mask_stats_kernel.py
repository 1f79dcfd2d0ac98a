"""The one-pass mask statistics kernel (CUDA) against the PyTorch ops it replaces."""

from __future__ import annotations

import pytest
import torch

from samkit.amg.generator import boxes_and_areas, threshold_statistics
from samkit.amg.masks import calculate_stability_score
from samkit.kernels import mask_stats

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _logits(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth blobs plus noise, so masks have holes, edges and every kind of box
    base = torch.nn.functional.interpolate(
        torch.randn(n, 1, max(2, h // 8), max(2, w // 8), generator=g), (h, w), mode="bilinear"
    )[:, 0]
    x = 3 * base + 0.3 * torch.randn(n, h, w, generator=g)
    x[0] = -2.0  # an empty mask
    if n > 1:
        x[1] = -2.0
        x[1, h - 1, w - 1] = 0.5  # one pixel, in the last corner
    if n > 2 and h > 4 and w > 4:
        x[2, 1:3, 2:4] = float("nan")  # NaN compares False
    return x.cuda()


@pytest.mark.parametrize(
    "shape", [(4, 37, 50), (3, 16, 512), (3, 5, 1030), (2, 1, 1), (3, 33, 7), (8, 1000, 1500)]
)
def test_mask_statistics_equal_the_torch_ops(shape):
    logits = _logits(*shape, seed=sum(shape))
    with torch.inference_mode():
        assert mask_stats.supported(logits)  # (inference only)
        masks, tight, loose, areas, extents = mask_stats.mask_statistics(logits, 0.0, 1.0)
        want_masks = logits > 0.0
        want_boxes, want_areas = boxes_and_areas(want_masks)
        got = threshold_statistics(logits, 0.0, 1.0)
        want_stability = calculate_stability_score(logits, 0.0, 1.0)
    # integer counts and the same float32 division: exactly equal
    assert torch.equal(masks, want_masks)
    assert torch.equal(areas.long(), want_areas)
    assert torch.equal(got[1], want_stability)
    assert torch.equal(got[2], want_boxes) and torch.equal(got[3], want_areas)
    assert torch.equal(got[0], want_masks)
    empty = want_areas == 0
    assert bool(empty[0]) and int(want_areas[1]) == 1
    assert extents[0].tolist() == [shape[2], shape[1], -1, -1]
    assert tight.dtype == loose.dtype == torch.int32
