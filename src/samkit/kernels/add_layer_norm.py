"""A residual add and the LayerNorm after it, in one pass over the rows.

Each encoder block adds its attention output to the residual stream and normalises the sum for
the MLP, then adds the MLP output and the next block normalises that sum. On vit_h's 1280-wide
rows Inductor splits each LayerNorm into a looped reduction: 332 us per add + LayerNorm of a
batch of 8 on an H100, against 117 us for this kernel (the memory's bandwidth allows 100 us;
768-wide rows: 73 us both; benchmarks/results/h100-add-layer-norm.log).

The sum is taken in fp32 and stored rounded to the input dtype (as `x + y` rounds it); the
LayerNorm normalises the unrounded fp32 sum (mean, then the biased variance of the centred row),
with one rounding of its output. In the bf16 vit_h encoder the embedding's cosine with the fp32
path is 0.99990, as in the eager bf16 encoder (compiled without the kernel: 0.99996, Inductor
recomputing some sums instead of reloading them rounded).

Registered with `torch.library.triton_op`, so torch.compile traces the kernel launch into its
graph. (Wrapped as an opaque custom op returning two tensors, compiling vit_h's 32 chained blocks
did not finish: Inductor recursed through the chained outputs.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs
    triton = None

ROWS = 2  # rows per program; 1-8 measure alike at 1280 wide, 16 is slower
NUM_WARPS = 4
WIDEST = 8192  # one row in registers


def supported(x: torch.Tensor) -> bool:
    """Whether the kernel handles rows of x (..., C): CUDA fp16/bf16/fp32, inference only."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and x.shape[-1] <= WIDEST
        and not torch.is_grad_enabled()
    )


def add_layer_norm(
    x: torch.Tensor, y: torch.Tensor, norm: torch.nn.LayerNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) with s = x + y; x and y of one shape and dtype, (..., C)."""
    if not supported(x) or y.shape != x.shape or y.dtype != x.dtype:
        return reference(x, y, norm)
    return _add_layer_norm(x, y, norm.weight, norm.bias, norm.eps)


def reference(
    x: torch.Tensor, y: torch.Tensor, norm: torch.nn.LayerNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain two-step computation: the fallback, and the tests' reference."""
    s = x + y
    return s, F.layer_norm(s, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


if triton is not None:

    @triton_op("samkit::add_layer_norm", mutates_args=())
    def _add_layer_norm(
        x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[-1]
        x, y = x.contiguous(), y.contiguous()
        total, normed = torch.empty_like(x), torch.empty_like(x)
        rows = x.numel() // c
        wrap_triton(_add_ln_rows)[(triton.cdiv(rows, ROWS),)](
            x, y, weight, bias, total, normed, rows, eps,
            C=c, BLOCK_C=triton.next_power_of_2(c), ROWS=ROWS, num_warps=NUM_WARPS,
        )  # fmt: skip
        return total, normed

    @triton.jit
    def _add_ln_rows(
        X, Y, Wt, Bs, S, Out, rows, eps,
        C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        col = tl.arange(0, BLOCK_C)
        col_ok = col < C
        live = (row < rows)[:, None] & col_ok[None, :]
        offs = row[:, None].to(tl.int64) * C + col[None, :]
        x = tl.load(X + offs, mask=live, other=0.0).to(tl.float32)
        s = x + tl.load(Y + offs, mask=live, other=0.0).to(tl.float32)
        tl.store(S + offs, s.to(S.dtype.element_ty), mask=live)
        mean = tl.sum(s, axis=1) / C
        centred = tl.where(live, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
        w = tl.load(Wt + col, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(Bs + col, mask=col_ok, other=0.0).to(tl.float32)
        out = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=live)
