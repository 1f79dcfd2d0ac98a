"""Windowed attention with SAM's decomposed rel-pos bias, read straight from the qkv projection.

The plain windowed block pads the normalised map to a multiple of the window (64 -> 70 for
14x14 windows), cuts it into windows, runs qkv, attention and proj per window and stitches
the windows back. This kernel does the same arithmetic without any of those copies: qkv runs
on the unpadded map, one program takes a few rows of one window for one head, loads the
window's keys and values straight from the (B, H, W, 3C) projection and writes its output
into the (B, H, W, C) map, where proj runs on the real tokens only.

Keys outside the map are the padding: the official block pads *after* the LayerNorm, so their
projections are the qkv biases, and they take part in the softmax of edge windows. Queries
outside the map are never needed. A window holds at most 16x16 tokens here (SAM's is 14x14),
so all its keys fit one tile and the softmax needs no running maximum.

The rel-pos term ``q . Rh[qh - kh] + q . Rw[qw - kw]`` comes from a small table per query:
``q . R[r]`` for every row r of both tables (`relpos_table.pixel_table`), gathered in the
kernel.

Inference only; registered as a torch custom op so torch.compile keeps it as one kernel.
"""

from __future__ import annotations

import torch

from samkit.kernels.relpos_table import pixel_table

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

MAX_WINDOW = 16
# query slots per program (whole window rows) and warps: the fastest measured on an H100 for
# 14x14 windows at head dims 64 and 80 (benchmarks/results/h100-window-kernel-configs.log)
QUERY_SLOTS = 128
NUM_WARPS = 8


def supported(x: torch.Tensor, window: int, head_dim: int) -> bool:
    """Whether the kernel handles a (B, H, W, C) map with this window (else: partition path)."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and 1 <= window <= MAX_WINDOW
        and head_dim <= 128
        and not torch.is_grad_enabled()
    )


if triton is not None:

    @triton.jit
    def _window_fwd(
        QKV, A, BK, BV, Out,
        s_qb, s_qy, s_qx, s_ab, s_ay, s_ax, s_ah, s_ob, s_oy, s_ox,
        H, W, N_WIN_H, N_WIN_W, C, sm_scale,
        WIN: tl.constexpr, SLOT: tl.constexpr, ROWS: tl.constexpr, TABLE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        BLOCK_M: tl.constexpr = ROWS * SLOT
        KEYS: tl.constexpr = SLOT * SLOT
        log2e: tl.constexpr = 1.4426950408889634
        row_block = tl.program_id(0)
        win = tl.program_id(1)
        head = tl.program_id(2)
        b = (win // (N_WIN_H * N_WIN_W)).to(tl.int64)
        wy = (win // N_WIN_W) % N_WIN_H
        wx = win % N_WIN_W

        offs_d = tl.arange(0, BLOCK_D)  # the head dim, padded to a power of two (masked)
        d_ok = offs_d < HEAD_DIM
        # query slot m is window row qr, column qc (slots past the window are masked)
        offs_m = tl.arange(0, BLOCK_M)
        qr = row_block * ROWS + offs_m // SLOT
        qc = offs_m % SLOT
        qy = wy * WIN + qr
        qx = wx * WIN + qc
        q_ok = (qr < WIN) & (qc < WIN) & (qy < H) & (qx < W)
        # key slot n is window row kr, column kc
        offs_n = tl.arange(0, KEYS)
        kr = offs_n // SLOT
        kc = offs_n % SLOT
        ky = wy * WIN + kr
        kx = wx * WIN + kc
        k_ok = (kr < WIN) & (kc < WIN)
        k_in = k_ok & (ky < H) & (kx < W)  # else: padding, whose projections are the biases

        base = QKV + b * s_qb + head * HEAD_DIM
        q_ptr = base + qy[:, None] * s_qy + qx[:, None] * s_qx
        k_ptr = base + C + ky[None, :] * s_qy + kx[None, :] * s_qx
        q = tl.load(q_ptr + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptr + offs_d[:, None], mask=k_in[None, :] & d_ok[:, None], other=0.0)
        bias_k = tl.load(BK + head * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        k = tl.where(k_in[None, :], k, bias_k[:, None].to(k.dtype))
        s = tl.dot(q, k) * sm_scale

        # rel-pos: table entry r of query m is q_m . R[r], h terms first, then w terms. The
        # bias of key (kr, kc) is rel_h[m, kr] + rel_w[m, kc]: gather SLOT of each, then
        # spread them over the key slots with two exact one-hot products (one term each)
        a_ptr = A + b * s_ab + qy * s_ay + qx * s_ax + head * s_ah
        offs_s = tl.arange(0, SLOT)
        both = q_ok[:, None] & (offs_s < WIN)[None, :]
        rel_h = tl.load(
            a_ptr[:, None] + (qr[:, None] - offs_s[None, :] + WIN - 1), mask=both, other=0.0
        )
        rel_w = tl.load(
            a_ptr[:, None] + TABLE + (qc[:, None] - offs_s[None, :] + WIN - 1), mask=both, other=0.0
        )
        row_of_key = (offs_s[:, None] == kr[None, :]).to(rel_h.dtype)  # SLOT x KEYS
        col_of_key = (offs_s[:, None] == kc[None, :]).to(rel_w.dtype)
        s = tl.dot(rel_h, row_of_key, s)
        s = tl.dot(rel_w, col_of_key, s)
        s = tl.where(k_ok[None, :], s * log2e, float("-inf"))

        p = tl.exp2(s - tl.max(s, 1)[:, None])
        inv = 1.0 / tl.sum(p, 1)
        v_ptr = base + 2 * C + ky[:, None] * s_qy + kx[:, None] * s_qx
        o_ptr = Out + b * s_ob + qy[:, None] * s_oy + qx[:, None] * s_ox + head * HEAD_DIM
        v = tl.load(v_ptr + offs_d[None, :], mask=k_in[:, None] & d_ok[None, :], other=0.0)
        bias_v = tl.load(BV + head * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        v = tl.where(k_in[:, None], v, bias_v[None, :].to(v.dtype))
        out = tl.dot(p.to(v.dtype), v) * inv[:, None]
        tl.store(
            o_ptr + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=q_ok[:, None] & d_ok[None, :],
        )


def _table_rows(window: int) -> int:
    return triton.next_power_of_2(2 * window - 1)


@torch.library.custom_op("samkit::relpos_window_attention", mutates_args=())
def relpos_window_attention(
    qkv: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    bias_k: torch.Tensor,
    bias_v: torch.Tensor,
    num_heads: int,
    window: int,
) -> torch.Tensor:
    """Windowed multi-head attention of a (B, H, W, 3C) qkv projection -> (B, H, W, C).

    Equal to: pad the map (before qkv) to a multiple of `window`, attend within each window
    with the decomposed rel-pos bias (tables of 2 * window - 1 rows), drop the padding.
    `bias_k`/`bias_v` (C,) are the key/value biases: the projections of the zero padding.
    """
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    qkv = qkv.contiguous()
    rows = _table_rows(window)
    q = qkv.view(b, h * w, c3)[..., :c].unflatten(-1, (num_heads, d))  # Bx(HW)xheadsxd
    table = pixel_table(q, rel_pos_h, rel_pos_w, rows)  # Bxheadsx(HW)x2R
    table = table.view(b, num_heads, h, w, 2 * rows).permute(0, 2, 3, 1, 4)  # BxHxWxheadsx2R
    out = qkv.new_empty(b, h, w, c)
    slot = max(16, triton.next_power_of_2(window))  # tl.dot needs 16 along the one-hot side
    row_count = max(1, QUERY_SLOTS // slot)  # window rows per program
    n_win_h, n_win_w = triton.cdiv(h, window), triton.cdiv(w, window)
    grid = (triton.cdiv(window, row_count), b * n_win_h * n_win_w, num_heads)
    _window_fwd[grid](
        qkv, table, bias_k.to(qkv.dtype).contiguous(), bias_v.to(qkv.dtype).contiguous(), out,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        table.stride(0), table.stride(1), table.stride(2), table.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        h, w, n_win_h, n_win_w, c, d**-0.5,
        WIN=window, SLOT=slot, ROWS=row_count, TABLE=rows,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=NUM_WARPS, num_stages=1,
    )  # fmt: skip
    return out


@relpos_window_attention.register_fake
def _(qkv, rel_pos_h, rel_pos_w, bias_k, bias_v, num_heads, window):
    b, h, w, c3 = qkv.shape
    return qkv.new_empty(b, h, w, c3 // 3)
