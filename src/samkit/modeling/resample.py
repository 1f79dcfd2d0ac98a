"""Mask postprocessing on the CPU as two banded matmuls, one per axis.

`Sam.postprocess_masks` is defined as: bilinear (align_corners=False) from the low-res logits to
the padded input side, crop to the resized image, bilinear to the original size. Along each axis
that is a linear map, and the composition of the two maps is one (out x low-res) matrix with at
most 3 nonzeros per row, all on a band. Applied separably (the width first, on the few low-res
rows the crop keeps; then the height, which writes the full-size output once), it costs a
fraction of the two resamplings, whose second step reads a 1024-wide intermediate.

The weights follow torch's bilinear kernels: source position (dst + 0.5) * ratio - 0.5 clamped
at 0, in fp32 (rounded once, as the kernels' fused multiply-add does), and lambdas in fp32. They
are composed in fp64 and rounded to fp32 once, so the result equals the two-step resampling up to
fp32 rounding of the products (~2e-7 of the logit scale measured; tests/test_resample.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

# rows (or columns) of output per block of the banded product; each block reads the few
# source rows its band covers. Measured on a 2-core CPU at 1000x1500: 16-row blocks for the
# height pass, 64-column blocks for the width pass.
HEIGHT_BLOCK = 16
WIDTH_BLOCK = 64


class BandedMap(NamedTuple):
    """A (n_out x n_in) matrix whose rows' nonzeros lie on a band, in blocks of output rows:
    out[b * block + i] = sum_j weights[b, i, j] * x[index[b, j]]."""

    index: torch.Tensor  # (blocks, k) long: the k source positions block b reads
    weights: torch.Tensor  # (blocks, block, k) float32, rows past n_out are zero
    n_out: int
    used: int  # source positions 0..used-1 are all any output reads


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


def banded(matrix: torch.Tensor, block: int) -> BandedMap:
    """Blocks of `block` rows of a banded fp64 matrix, each with the source range it reads."""
    n_out, n_in = matrix.shape
    nonzero = matrix != 0
    cols = torch.arange(n_in).expand(n_out, -1)
    first = torch.where(nonzero, cols, n_in).amin(1)
    last = torch.where(nonzero, cols, -1).amax(1)
    used = int(last.max()) + 1
    blocks = -(-n_out // block)
    padded = torch.cat([matrix[:, :used], matrix.new_zeros(blocks * block - n_out, used)])
    first = torch.cat([first, first.new_full((blocks * block - n_out,), n_in)])
    last = torch.cat([last, last.new_full((blocks * block - n_out,), -1)])
    starts = first.view(blocks, block).amin(1)
    k = int((last.view(blocks, block).amax(1) - starts).max()) + 1
    starts = starts.clamp(max=used - k)  # a full-width window inside 0..used-1
    index = starts[:, None] + torch.arange(k)  # blocks x k
    rows = padded.view(blocks, block, used)
    weights = torch.gather(rows, 2, index[:, None, :].expand(-1, block, -1))
    return BandedMap(index, weights.float(), n_out, used)


@functools.lru_cache(maxsize=16)
def postprocess_maps(
    low_size: tuple[int, int],
    image_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> tuple[BandedMap, BandedMap]:
    """(height, width) banded maps of Sam.postprocess_masks for these sizes, cached."""
    height = postprocess_axis(low_size[0], image_size, input_size[0], original_size[0])
    width = postprocess_axis(low_size[1], image_size, input_size[1], original_size[1])
    return banded(height, HEIGHT_BLOCK), banded(width, WIDTH_BLOCK)


def resample_separable(masks: torch.Tensor, height: BandedMap, width: BandedMap) -> torch.Tensor:
    """(N, h, w) float32 -> (N, H, W): the width map on the rows the height map reads, then
    the height map."""
    n = masks.shape[0]
    rows = height.used
    x = masks[:, :rows]  # N x r x w
    # width: block b of output columns reads the k columns index[b]
    blocks, k = width.index.shape
    gathered = x.index_select(2, width.index.flatten()).view(n * rows, blocks, k)
    y = torch.bmm(gathered.transpose(0, 1), width.weights.transpose(1, 2))  # blocks x (N r) x bw
    y = y.transpose(0, 1).reshape(n, rows, -1)[:, :, : width.n_out].contiguous()  # N x r x W
    # height: block b of output rows reads the k rows index[b]; each mask's output is written
    # in place, full blocks in one batched product and the last, partial one after it
    blocks, block, k = height.weights.shape
    out_h, out_w = height.n_out, width.n_out
    gathered = y.index_select(1, height.index.flatten()).view(n, blocks, k, out_w)
    out = masks.new_empty(n, out_h, out_w)
    full = out_h // block
    for i in range(n):
        if full:
            target = out[i, : full * block].view(full, block, out_w)
            torch.bmm(height.weights[:full], gathered[i, :full], out=target)
        if full < blocks:
            tail = out_h - full * block
            torch.mm(height.weights[full, :tail], gathered[i, full], out=out[i, full * block :])
    return out
