"""The CPU postprocessing's composed per-axis maps against torch's two bilinear resamplings.

The reference is the definition run by torch itself: `upsample_bilinear2d` to the padded input
side with the scale given, crop, `F.interpolate` to the original size. The per-axis maps compose
the same per-axis weights in fp64 and round them once to fp32, so they differ from the two fp32
resamplings by fp32 rounding of products and sums only. Tolerance: 1e-6 of the output's scale
(observed <= 2.2e-7 on every size here); a wrong source position (half-pixel offset, missed
clamp at 0 or at the edge, a wrong crop) changes outputs by 1e-2 or more of the scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samkit.modeling.resample import (
    bilinear_matrix,
    column_blocks,
    postprocess_axis,
    postprocess_maps,
    resample_separable,
    taps,
)

from reference import assert_close_scaled

REL = 1e-6


def two_step(masks: torch.Tensor, size: int, input_size, original_size) -> torch.Tensor:
    """(N, h, w) -> (N, H, W) by torch's kernels, as Sam.postprocess_masks defines it."""
    x = masks[:, None]
    scale_h, scale_w = size / x.shape[-2], size / x.shape[-1]
    x = torch.ops.aten.upsample_bilinear2d(x, [size, size], False, scale_h, scale_w)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)[:, 0]


CASES = [
    # (low-res side, padded input side, input (h, w), original (H, W))
    (256, 1024, (683, 1024), (1000, 1500)),  # the benchmark photo
    (256, 1024, (1024, 683), (1500, 1000)),  # portrait
    (256, 1024, (1024, 1024), (1024, 1024)),  # the identity second step
    (256, 1024, (768, 1024), (3000, 4000)),  # larger than the input
    (256, 1024, (683, 1024), (10, 15)),  # a tiny image: the second step shrinks
    (256, 1024, (1, 1024), (1, 3000)),  # 1-pixel dims
    (256, 1024, (1024, 1), (3000, 2)),
    (40, 160, (107, 160), (997, 1499)),  # odd (prime) output sizes, partial last blocks
    (40, 160, (160, 120), (1500, 1125)),
    (40, 160, (160, 160), (77, 77)),
    (40, 160, (1, 160), (2, 240)),
]


@pytest.mark.parametrize("low, size, input_size, original_size", CASES)
def test_separable_equals_two_resamplings(low, size, input_size, original_size):
    masks = torch.randn(3, low, low, generator=torch.Generator().manual_seed(low)) * 10
    want = two_step(masks, size, input_size, original_size)
    got = resample_separable(masks, *postprocess_maps((low, low), size, input_size, original_size))
    assert_close_scaled(got, want, rel=REL)


@pytest.mark.parametrize("low, size, input_size, original_size", CASES)
def test_positive_equals_threshold_of_two_resamplings(low, size, input_size, original_size):
    """The thresholded form (clamp and cast in blocks) against `> 0` of torch's resampling:
    equal except where the reference logit is within fp32 rounding (REL of the scale) of 0."""
    g = torch.Generator().manual_seed(low + 1)
    masks = torch.randn(3, low, low, generator=g) * 10
    masks[0, :4] = 0.0  # exact zeros stay False
    masks[1, :, :3] = -0.0
    want = two_step(masks, size, input_size, original_size)
    maps = postprocess_maps((low, low), size, input_size, original_size)
    got = resample_separable(masks, *maps, positive=True)
    assert got.dtype == torch.bool and got.shape == want.shape
    differ = got != (want > 0)
    assert bool((want[differ].abs() <= REL * want.abs().max()).all())
    assert int(differ.sum()) <= 1e-5 * want.numel()
    # against the unfused separable result: the same sums, so the same signs
    assert torch.equal(got, resample_separable(masks, *maps) > 0)


def test_positive_with_nan_and_inf_is_the_threshold():
    """Non-finite logits fall back to `> 0` of the logits (NaN is False, as `>` has it)."""
    masks = torch.randn(2, 40, 40, generator=torch.Generator().manual_seed(4))
    masks[0, 10:20, 10:20] = float("nan")
    masks[1, :5] = float("inf")
    masks[1, 5:8] = -float("inf")
    maps = postprocess_maps((40, 40), 160, (107, 160), (31, 45))
    got = resample_separable(masks, *maps, positive=True)
    assert torch.equal(got, resample_separable(masks, *maps) > 0)


def test_positive_with_huge_logits_and_nan_in_unread_rows():
    """Finite logits whose sum overflows take the general path, and a NaN in rows the map never
    reads (below the image's resized height) does not matter: both equal `> 0`."""
    maps = postprocess_maps((40, 40), 160, (107, 160), (31, 45))
    g = torch.Generator().manual_seed(5)
    sign = torch.where(torch.rand(2, 40, 40, generator=g) < 0.8, 1.0, -1.0)
    huge = sign * (1 + torch.rand(2, 40, 40, generator=g)) * 1e38  # mostly positive, finite
    assert not torch.isfinite(huge.sum()) and torch.isfinite(huge).all()
    want = resample_separable(huge, *maps) > 0
    assert torch.equal(resample_separable(huge, *maps, positive=True), want)
    masks = torch.randn(2, 40, 40, generator=torch.Generator().manual_seed(6))
    unread = maps[0].used
    assert unread < 40
    masks[:, unread:] = float("nan")
    got = resample_separable(masks, *maps, positive=True)
    assert torch.equal(got, resample_separable(masks, *maps) > 0)


def test_axis_map_is_a_band_of_at_most_three_taps():
    """Each output reads two neighbouring intermediate pixels, each of which reads two
    neighbouring low-res pixels four apart at most: at most 3 low-res taps, weights sum to 1."""
    for keep, out in [(683, 1000), (1024, 1500), (683, 10), (1, 3000), (1024, 1024)]:
        matrix = postprocess_axis(256, 1024, keep, out)
        taps = (matrix != 0).sum(1)
        assert int(taps.max()) <= 3
        torch.testing.assert_close(matrix.sum(1), torch.ones(out, dtype=torch.float64))
        cols = torch.arange(256).expand(out, -1)
        last = torch.where(matrix != 0, cols, -1).amax(1)
        first = torch.where(matrix != 0, cols, 256).amin(1)
        assert int((last - first).max()) <= 2


def test_bilinear_matrix_is_torchs_interpolation():
    """One axis, against F.interpolate on a basis: rows of the matrix are the kernel's weights
    (its fp32 lambdas, whose products here have no rounding to compare: a single axis)."""
    for n_in, n_out in [(256, 1024), (683, 1000), (1024, 15), (1, 7), (7, 1), (5, 5)]:
        basis = torch.eye(n_in)[:, None, :]  # n_in one-hot signals of length n_in
        want = F.interpolate(basis, n_out, mode="linear", align_corners=False)[:, 0].T
        got = bilinear_matrix(n_in, n_out, n_in / n_out)
        torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-7)


def test_taps_reproduce_the_matrix():
    for keep, out in [(683, 1000), (683, 10), (1, 3000)]:
        matrix = postprocess_axis(256, 1024, keep, out)
        got = taps(matrix)
        dense = torch.zeros_like(matrix)
        dense.scatter_add_(1, got.index, got.weights.double())
        torch.testing.assert_close(dense, matrix, rtol=0, atol=1e-7)
        assert got.used == int((matrix != 0).any(0).nonzero().max()) + 1
        assert got.index.shape[1] <= 3


@pytest.mark.parametrize("out, block", [(1500, 64), (1499, 64), (15, 64), (64, 64), (65, 64)])
def test_column_blocks_reproduce_the_matrix(out, block):
    """Blocks start every `block` columns, the last one ends at the last column."""
    matrix = postprocess_axis(256, 1024, 683, out)
    blocks = column_blocks(matrix, block)
    width = min(block, out)
    dense = torch.zeros_like(matrix)
    starts = [*range(0, out - width, width), out - width]
    assert len(starts) == blocks.weights.shape[0]
    for start, cols, weights in zip(starts, blocks.index, blocks.weights, strict=True):
        dense[start : start + width, cols] = weights.T.double()
    torch.testing.assert_close(dense, matrix, rtol=0, atol=1e-7)


def test_postprocess_masks_uses_it_on_cpu_fp32():
    """Sam.postprocess_masks on (B, C, h, w) fp32 CPU logits: the separable maps, any batch."""
    from reference import TINY, random_sam

    model = random_sam(TINY)
    masks = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    got = model.postprocess_masks(masks, (107, 160), (1000, 1500))
    want = two_step(masks.flatten(0, 1), TINY.image_size, (107, 160), (1000, 1500))
    assert got.shape == (2, 3, 1000, 1500) and got.is_contiguous()
    assert_close_scaled(got, want.view(2, 3, 1000, 1500), rel=REL)


def test_postprocess_binary_is_the_threshold_of_postprocess_masks():
    """Sam.postprocess_binary: `postprocess_masks(...) > mask_threshold`, fused on the CPU at
    threshold 0 (equal signs: the same fp32 sums), plain otherwise."""
    from reference import TINY, random_sam

    model = random_sam(TINY)
    masks = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    for threshold in (0.0, 0.5):
        model.mask_threshold = threshold
        got = model.postprocess_binary(masks, (107, 160), (1000, 1500))
        want = model.postprocess_masks(masks, (107, 160), (1000, 1500)) > threshold
        assert got.shape == (2, 3, 1000, 1500) and got.is_contiguous()
        assert torch.equal(got, want)


def test_empty_batch():
    """Segment everything may keep no mask of a batch."""
    from reference import TINY, random_sam

    model = random_sam(TINY)
    got = model.postprocess_masks(torch.randn(0, 3, 40, 40), (107, 160), (31, 45))
    assert got.shape == (0, 3, 31, 45)
    got = model.postprocess_binary(torch.randn(0, 3, 40, 40), (107, 160), (31, 45))
    assert got.shape == (0, 3, 31, 45) and got.dtype == torch.bool


def test_maps_cached_under_inference_mode_work_with_autograd():
    """The predictor fills the cache under inference_mode; training code reuses it."""
    masks = torch.randn(2, 40, 40, requires_grad=True)
    with torch.inference_mode():
        maps = postprocess_maps((40, 40), 160, (107, 160), (31, 45))
        resample_separable(masks.detach(), *maps)
    out = resample_separable(masks, *postprocess_maps((40, 40), 160, (107, 160), (31, 45)))
    out.sum().backward()
    assert masks.grad is not None and torch.isfinite(masks.grad).all()
