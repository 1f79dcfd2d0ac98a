"""Segment everything's per-mask statistics in one pass over the full-size logits (Triton).

For every kept mask of a batch the generator needs, from its logits at the image's size: the
binary mask (logits > threshold), the stability score (the pixel counts above threshold +
offset and above threshold - offset), the area and the tight box. In PyTorch that is a compare
for the mask and, for each count, a compare, a cast of the flags to an integer type (a reduction
of bool in another dtype copies it first) and two reductions, then row counts and a column max
for the box: about 7 ms for 192 masks of 1000x1500 on an H100, where the logits (1.15 GB) take
~0.4 ms to read once. This kernel reads each logit once, writes the mask and gathers the counts
and the box extents with integer atomics (exact, and independent of their order).
"""

from __future__ import annotations

import torch

from samkit.kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl
else:  # CPU-only installs
    triton = None

# rows per program, columns per step (the step count is a compile-time constant: one kernel
# per ceil(W / COLUMNS), a handful for the image widths met)
ROWS, COLUMNS, NUM_WARPS = 16, 512, 4


def supported(logits: torch.Tensor) -> bool:
    """Whether the kernel takes these (N, H, W) logits: CUDA fp32, inference, < 2**31 pixels
    per mask."""
    return (
        triton is not None
        and logits.is_cuda
        and logits.dtype == torch.float32
        and logits.dim() == 3
        and logits.shape[1] * logits.shape[2] < 2**31
        and not torch.is_grad_enabled()
    )


def mask_statistics(
    logits: torch.Tensor, threshold: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For (N, H, W) logits: masks (logits > threshold, bool); the pixel counts above
    threshold + offset, above threshold - offset and above threshold (int32, N each); and
    the extents (N, 4) int32 [first column, first row, last column, last row] of each mask's
    pixels (W, H, -1, -1 for an empty mask)."""
    n, h, w = logits.shape
    logits = logits.contiguous()
    masks = torch.empty((n, h, w), dtype=torch.bool, device=logits.device)
    counts = torch.zeros((n, 3), dtype=torch.int32, device=logits.device)
    extents = torch.full((n, 4), -1, dtype=torch.int32, device=logits.device)  # no host copy
    extents[:, 0], extents[:, 1] = w, h
    if n and h and w:
        grid = (triton.cdiv(h, ROWS), n)
        _mask_statistics[grid](
            logits, masks.view(torch.uint8), counts, extents, h, w,
            float(threshold), float(threshold) + float(offset), float(threshold) - float(offset),
            ROWS=ROWS, COLUMNS=COLUMNS, STEPS=triton.cdiv(w, COLUMNS), num_warps=NUM_WARPS,
        )  # fmt: skip
    return masks, counts[:, 0], counts[:, 1], counts[:, 2], extents


if triton is not None:

    @triton.jit
    def _mask_statistics(
        X, M, COUNTS, EXTENTS, h, w, threshold, tight_at, loose_at,
        ROWS: tl.constexpr, COLUMNS: tl.constexpr, STEPS: tl.constexpr,
    ):  # fmt: skip
        mask_id = tl.program_id(1).to(tl.int64)
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = row < h
        base = mask_id * h * w + row.to(tl.int64)[:, None] * w
        tight = tl.zeros((ROWS,), dtype=tl.int32)
        loose = tl.zeros((ROWS,), dtype=tl.int32)
        area = tl.zeros((ROWS,), dtype=tl.int32)
        row_any = tl.zeros((ROWS,), dtype=tl.int32)
        first_col = w + 0
        last_col = w * 0 - 1
        for step in range(STEPS):
            col = step * COLUMNS + tl.arange(0, COLUMNS)
            ok = row_ok[:, None] & (col < w)[None, :]
            x = tl.load(X + base + col[None, :], mask=ok, other=float("-inf"))
            on = x > threshold  # NaN: False, as torch's compare
            tl.store(M + base + col[None, :], on.to(tl.uint8), mask=ok)
            tight += tl.sum((x > tight_at).to(tl.int32), axis=1)
            loose += tl.sum((x > loose_at).to(tl.int32), axis=1)
            on32 = on.to(tl.int32)
            area += tl.sum(on32, axis=1)
            row_any = tl.maximum(row_any, tl.max(on32, axis=1))
            col_any = tl.max(on32, axis=0) > 0
            first_col = tl.minimum(first_col, tl.min(tl.where(col_any, col, w)))
            last_col = tl.maximum(last_col, tl.max(tl.where(col_any, col, -1)))
        tl.atomic_add(COUNTS + mask_id * 3, tl.sum(tight))
        tl.atomic_add(COUNTS + mask_id * 3 + 1, tl.sum(loose))
        tl.atomic_add(COUNTS + mask_id * 3 + 2, tl.sum(area))
        rows_on = row_any > 0
        out = EXTENTS + mask_id * 4
        tl.atomic_min(out, first_col)
        tl.atomic_min(out + 1, tl.min(tl.where(rows_on, row, h)))
        tl.atomic_max(out + 2, last_col)
        tl.atomic_max(out + 3, tl.max(tl.where(rows_on, row, -1)))
