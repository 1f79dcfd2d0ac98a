"""The per-query rel-pos tables of the attention kernels: ``q . R[r]`` for every row r of both
rel-pos tables, h terms first.

The attention kernels gather their decomposed bias from these tables. On CUDA the product runs
as one Triton kernel that reads q straight from the qkv projection (rows of `heads x d` values
that are 3C apart) and writes each head's queries together, as the attention kernels read them.
As a matmul over that view, cuBLAS picks a narrow-tile kernel for the 64- or 256-column output:
the compiled vit_b encoder runs ~4% faster with this kernel (benchmarks/README.md).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# query rows per program of the Triton table kernel
BLOCK_P = 64


def table_matrix(
    rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """The d x 2 rows matrix whose product with q gives the table: Rh^T, then Rw^T from column
    `rows` (zero columns between)."""
    d = rel_pos_h.shape[1]
    table = rel_pos_h.new_zeros(d, 2 * rows, dtype=dtype)
    table[:, : rel_pos_h.shape[0]] = rel_pos_h.T.to(dtype)
    table[:, rows : rows + rel_pos_w.shape[0]] = rel_pos_w.T.to(dtype)
    return table


def rel_pos_table(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, rows: int
) -> torch.Tensor:
    """q . R[r] for every row r of both tables: (..., d) -> (..., 2 * rows), h terms first."""
    return q @ table_matrix(rel_pos_h, rel_pos_w, rows, q.dtype)


def pixel_table(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, rows: int
) -> torch.Tensor:
    """`rel_pos_table` of q given as (B, N, heads, d) with a unit last stride (any other strides,
    e.g. a view of a (B, N, 3 C) qkv projection) -> (B, heads, N, 2 * rows), contiguous: each
    head's queries together, as the attention kernels read them."""
    b, n, heads, d = q.shape
    if triton is None or not q.is_cuda or q.stride(-1) != 1 or 2 * rows > 256:
        return rel_pos_table(q.transpose(1, 2), rel_pos_h, rel_pos_w, rows).contiguous()
    matrix = table_matrix(rel_pos_h, rel_pos_w, rows, q.dtype)
    out = q.new_empty(b, heads, n, 2 * rows)
    grid = (triton.cdiv(n, BLOCK_P), b * heads)
    _table_fwd[grid](
        q, matrix, out, *q.stride()[:3], heads, n,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), COLS=2 * rows,
        BLOCK_P=BLOCK_P, num_warps=4 if rows <= 32 else 8,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _table_fwd(
        Q, M, Out, s_qb, s_qn, s_qh, HEADS, N,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, COLS: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        z = tl.program_id(1)  # batch item and head
        b = (z // HEADS).to(tl.int64)
        head = z % HEADS
        offs_n = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)  # the head dim, padded to a power of two (masked)
        offs_c = tl.arange(0, COLS)
        n_ok = offs_n < N
        d_ok = offs_d < HEAD_DIM
        q = tl.load(
            Q + b * s_qb + head * s_qh + offs_n[:, None] * s_qn + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        m = tl.load(M + offs_d[:, None] * COLS + offs_c[None, :], mask=d_ok[:, None], other=0.0)
        t = tl.dot(q, m)
        out = Out + (z.to(tl.int64) * N + offs_n[:, None]) * COLS + offs_c[None, :]
        tl.store(out, t.to(Out.dtype.element_ty), mask=n_ok[:, None])
