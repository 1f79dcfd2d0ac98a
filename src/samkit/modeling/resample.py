"""Mask postprocessing on the CPU as two banded products, one per axis.

`Sam.postprocess_masks` is defined as: bilinear (align_corners=False) from the low-res logits to
the padded input side, crop to the resized image, bilinear to the original size. Along each axis
that is a linear map, and the composition of the two maps is one (out x low-res) matrix with at
most 3 neighbouring nonzeros per row. Applied separably, it costs a fraction of the two
resamplings, whose second step reads a 1024-wide intermediate:
- the width first, on the few low-res rows the crop keeps: blocks of output columns, each a
  small matmul with the few source columns its band covers (one batched product);
- then the height, which writes the full-size output once: each output row is a weighted sum
  of 3 source rows, which `F.embedding_bag` with per-sample weights computes in one pass (a
  vectorized gather-and-accumulate, parallel over rows).

The weights follow torch's bilinear kernels: source position (dst + 0.5) * ratio - 0.5 clamped
at 0, in fp32 (rounded once, as the kernels' fused multiply-add does), and lambdas in fp32. They
are composed in fp64 and rounded to fp32 once, so the result equals the two-step resampling up to
fp32 rounding of the products (~2e-7 of the logit scale measured; tests/test_resample.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Taps(NamedTuple):
    """A (n_out x n_in) matrix with k neighbouring nonzeros per row at most:
    out[i] = sum_j weights[i, j] * x[index[i, j]]."""

    index: torch.Tensor  # (n_out, k) long, increasing along each row
    weights: torch.Tensor  # (n_out, k) float32 (zero where a row has fewer taps)
    used: int  # source positions 0..used-1 are all any output reads


class ColumnBlocks(NamedTuple):
    """A banded (n_out x n_in) matrix applied to rows x (M, n_in) in blocks of `block` output
    columns: block b is x[:, index[b]] @ weights[b]. Blocks start at b * block, the last one
    at n_out - block (it may overlap the one before it, with the same values)."""

    index: torch.Tensor  # (blocks, k) long: the source columns each block reads
    weights: torch.Tensor  # (blocks, k, block) float32
    n_out: int


# output columns per block of the width pass: 64 measured best at 1000x1500 (2-core CPU)
WIDTH_BLOCK = 64
# output rows per pass of the thresholded height pass: 128 measured best at 1000x1500, 3 masks
# (32: 4.7, 64: 3.7, 128: 2.9, 256: 3.7, all 1000: 4.7 ms, 1 thread)
POSITIVE_ROWS = 128


def bilinear_matrix(n_in: int, n_out: int, ratio: float) -> torch.Tensor:
    """torch's 1-D bilinear resampling (align_corners=False) as an (n_out, n_in) fp64 matrix.

    ratio: the kernel's source step, in/out (or 1/scale_factor where a scale is given).
    """
    if n_in == n_out:  # the kernels copy
        return torch.eye(n_in, dtype=torch.float64)
    ratio32 = float(torch.tensor(ratio, dtype=torch.float32))
    dst = torch.arange(n_out, dtype=torch.float64)
    src = ((dst + 0.5) * ratio32 - 0.5).clamp(min=0).float()  # one fp32 rounding, as an FMA
    i0 = src.floor().long().clamp(max=n_in - 1)
    lam1 = (src - i0).clamp(0, 1)  # fp32
    lam0 = 1 - lam1  # fp32, as the kernels round it
    i1 = (i0 + 1).clamp(max=n_in - 1)
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix.index_put_((rows, i0), lam0.double(), accumulate=True)
    matrix.index_put_((rows, i1), lam1.double(), accumulate=True)
    return matrix


def postprocess_axis(low: int, size: int, keep: int, out: int) -> torch.Tensor:
    """One axis of postprocessing as an (out, low) fp64 matrix: bilinear low -> size with the
    scale size / low given (as Sam.postprocess_masks calls it), keep the first `keep`, bilinear
    keep -> out with the sizes given."""
    first = bilinear_matrix(low, size, 1.0 / (size / low))[:keep]
    second = bilinear_matrix(keep, out, float(torch.tensor(keep, dtype=torch.float32) / out))
    return second @ first


def taps(matrix: torch.Tensor) -> Taps:
    """The nonzeros of a banded fp64 (n_out, n_in) matrix as k taps per row."""
    n_out, n_in = matrix.shape
    nonzero = matrix != 0
    cols = torch.arange(n_in).expand(n_out, -1)
    first = torch.where(nonzero, cols, n_in).amin(1)
    last = torch.where(nonzero, cols, -1).amax(1)
    used = int(last.max()) + 1
    k = int((last - first).max()) + 1
    index = first.clamp(max=used - k)[:, None] + torch.arange(k)  # a full window in 0..used-1
    return Taps(index, torch.gather(matrix, 1, index).float(), used)


def column_blocks(matrix: torch.Tensor, block: int = WIDTH_BLOCK) -> ColumnBlocks:
    """A banded fp64 (n_out, n_in) matrix as blocks of output columns."""
    n_out, n_in = matrix.shape
    block = min(block, n_out)
    starts = [*range(0, n_out - block, block), n_out - block]  # the last block ends at n_out
    windows = [matrix[s : s + block] for s in starts]  # block x n_in each
    reads = [w.ne(0).any(0).nonzero()[:, 0] for w in windows]
    k = max(int(r[-1] - r[0]) + 1 for r in reads)
    first = torch.tensor([min(int(r[0]), n_in - k) for r in reads])
    index = first[:, None] + torch.arange(k)  # blocks x k
    weights = torch.stack([w[:, i].T for w, i in zip(windows, index, strict=True)])
    return ColumnBlocks(index, weights.float(), n_out)


@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)  # cached: usable later in autograd too
def postprocess_maps(
    low_size: tuple[int, int],
    image_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> tuple[Taps, ColumnBlocks]:
    """(height, width) maps of Sam.postprocess_masks for these sizes, cached."""
    height = postprocess_axis(low_size[0], image_size, input_size[0], original_size[0])
    width = postprocess_axis(low_size[1], image_size, input_size[1], original_size[1])
    return taps(height), column_blocks(width)


def resample_separable(
    masks: torch.Tensor, height: Taps, width: ColumnBlocks, *, positive: bool = False
) -> torch.Tensor:
    """(N, h, w) float32 -> (N, H, W): the width map on the rows the height map reads, then
    the height map. positive: the bool `result > 0` instead (`_positive_rows`)."""
    n, rows = masks.shape[0], height.used
    # all finite (the fast threshold's condition) if their sum is: a NaN or an infinity makes
    # the sum NaN or infinite, and a sum that overflows only sends finite values down the
    # general path; the sum costs a tenth of isfinite().all() (3 x 256 x 256 on 2 threads:
    # 28 vs 316 us)
    finite = positive and bool(torch.isfinite(masks[:, :rows].sum()))
    x = masks[:, :rows].reshape(n * rows, masks.shape[-1])  # (N r) x w
    blocks, k, block = width.weights.shape
    gathered = x.index_select(1, width.index.flatten()).view(n * rows, blocks, k)
    y = torch.bmm(gathered.transpose(0, 1), width.weights)  # blocks x (N r) x block
    # one copy into (N r) x W rows; the last block may overlap the one before (same values)
    out = masks.new_empty(n * rows, width.n_out)
    full = (blocks - 1) * block
    out[:, :full].view(n * rows, blocks - 1, block).copy_(y[:-1].transpose(0, 1))
    out[:, width.n_out - block :].copy_(y[-1])
    out = out.view(n, rows, width.n_out)
    if finite:
        return _positive_rows(out, height)
    out = _gather_rows(out, height)  # N x H x W
    return out > 0 if positive else out


def _gather_rows(x: torch.Tensor, taps: Taps) -> torch.Tensor:
    """(N, n_in, C) -> (N, n_out, C): out[:, i] = sum_j weights[i, j] x[:, index[i, j]]."""
    n, n_in, c = x.shape
    n_out = taps.index.shape[0]
    index = taps.index + n_in * torch.arange(n)[:, None, None]  # rows of mask m: m n_in + i
    out = F.embedding_bag(
        index.view(n * n_out, index.shape[-1]),
        x.reshape(n * n_in, c),
        mode="sum",
        per_sample_weights=taps.weights.repeat(n, 1),
    )
    return out.view(n, n_out, c)


def _positive_rows(x: torch.Tensor, taps: Taps, chunk: int = POSITIVE_ROWS) -> torch.Tensor:
    """`_gather_rows(x, taps) > 0` for finite x, bool (N, n_out, C).

    As clamp_min(0) then a cast to bool, in place on blocks of `chunk` output rows: the cast
    is vectorized where `> 0` is not (3 x 1000 x 1500 fp32, 1 thread: 0.6 + 0.5 vs 2.0 ms), and
    each block's logits are still in cache when they are cast (the full-size fp32 logits are
    never written). Equal to `> 0` whenever no output is NaN (+-0 -> False either way), which
    holds for finite x: each output is a convex combination of x's values (weights >= 0).
    """
    n, n_in, c = x.shape
    n_out = taps.index.shape[0]
    out = torch.empty(n, n_out, c, dtype=torch.bool, device=x.device)
    index = taps.index + n_in * torch.arange(n)[:, None, None]  # rows of mask m: m n_in + i
    weights = taps.weights.expand(n, -1, -1)
    x = x.reshape(n * n_in, c)
    for start in range(0, n_out, chunk):
        part = index[:, start : start + chunk]
        rows = part.shape[1]
        k = part.shape[-1]
        logits = F.embedding_bag(
            part.reshape(n * rows, k),
            x,
            mode="sum",
            per_sample_weights=weights[:, start : start + chunk].reshape(n * rows, k),
        )
        out[:, start : start + rows].copy_(logits.view(n, rows, c).clamp_min_(0))
    return out
