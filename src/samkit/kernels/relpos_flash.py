"""A Triton flash-attention forward with SAM's decomposed relative-position bias in the kernel.

For a key map of kh x kw tokens (kw a power of two, 16..128) each key block is one key row, so
the bias of a (query block, key block) tile is one row term per query (the same for the whole
block) plus the query block's column-term tile (the same for every key block, loaded once).
Both come from a small per-query table ``q . R[r]`` over every row r of the two rel-pos tables
(`relpos_table.pixel_table`), gathered in the kernel: no N x N bias, no widened head dim, no
gather pass. q, k and v are read with their own strides (views of the qkv projection need no
copies) and the output is laid out so that merging the heads is a view.

Inference only (no backward). Used by the "fused" attention path on CUDA when Triton is there;
registered as a torch custom op so torch.compile treats it as one opaque kernel.
"""

from __future__ import annotations

import torch

from samkit.kernels.relpos_table import pixel_table

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def supported(q: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether the kernel handles these inputs (else the caller uses another path)."""
    kw = size[1]
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and kw in (16, 32, 64, 128)
        and q.shape[-1] <= 128
        and not torch.is_grad_enabled()
    )


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm in (64, 128)
            for w in (4, 8)
            for s in (2, 3)
        ],
        key=["N", "HEAD_DIM", "KW", "KH"],
    )
    @triton.jit
    def _fwd(
        Q, K, V, T, Out,
        s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_tb, s_th, s_tn, s_ob, s_oh, s_on,
        HEADS, N, sm_scale,
        KH: tl.constexpr, KW: tl.constexpr, TABLE: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        start_m = tl.program_id(0)
        z = tl.program_id(1)
        b = (z // HEADS).to(tl.int64)
        head = (z % HEADS).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, KW)
        offs_d = tl.arange(0, BLOCK_D)  # the head dim, padded to a power of two (masked)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < N
        log2e: tl.constexpr = 1.4426950408889634

        q_ptr = Q + b * s_qb + head * s_qh + offs_m[:, None] * s_qn
        q = tl.load(q_ptr + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        # rel-pos: table entry r of query m is q_m . R[r] (h rows first, w rows from TABLE)
        t_ptr = T + b * s_tb + head * s_th + offs_m * s_tn
        qh = offs_m // KW
        qw = offs_m % KW
        # the column term of key column kw, the same for every key row: loaded once
        rw = tl.load(
            t_ptr[:, None] + TABLE + (qw[:, None] - offs_n[None, :] + KW - 1),
            mask=m_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        rw = rw * log2e
        k_ptr = K + b * s_kb + head * s_kh + offs_n[None, :] * s_kn
        v_ptr = V + b * s_vb + head * s_vh + offs_n[:, None] * s_vn

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        qk_scale = sm_scale * log2e
        for row in range(0, KH):  # one key row per block
            row_k = k_ptr + row * KW * s_kn
            k = tl.load(row_k + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            s = tl.dot(q, k) * qk_scale
            rh = tl.load(t_ptr + (qh - row + KH - 1), mask=m_ok, other=0.0).to(tl.float32)
            s = s + rh[:, None] * log2e + rw
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            row_v = v_ptr + row * KW * s_vn
            v = tl.load(row_v + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        o_ptr = Out + b * s_ob + head * s_oh + offs_m[:, None] * s_on
        inv = 1.0 / l_i
        tl.store(
            o_ptr + offs_d[None, :],
            (acc * inv[:, None]).to(Out.dtype.element_ty),
            mask=m_ok[:, None] & d_ok[None, :],
        )


@torch.library.custom_op("samkit::relpos_flash_attention", mutates_args=())
def relpos_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
) -> torch.Tensor:
    """softmax(q.k/sqrt(d) + q.Rh[qh - kh] + q.Rw[qw - kw]) v over a kh x kw key map.

    q, k, v: (B, heads, N, d) with N = kh * kw, any strides with a unit last stride (e.g. views
    of one qkv projection); rel_pos_h (2kh - 1, d), rel_pos_w (2kw - 1, d). Returns
    (B, heads, N, d) laid out as (B, N, heads, d), so merging the heads is a view.
    """
    b, h, n, d = q.shape
    kh, kw = (rel_pos_h.shape[0] + 1) // 2, (rel_pos_w.shape[0] + 1) // 2
    rows = triton.next_power_of_2(max(rel_pos_h.shape[0], rel_pos_w.shape[0]))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    table = pixel_table(q.transpose(1, 2), rel_pos_h, rel_pos_w, rows)  # B x heads x N x 2R
    out = q.new_empty(b, n, h, d).transpose(1, 2)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), b * h)

    _fwd[grid](
        q, k, v, table, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *table.stride()[:3], *out.stride()[:3],
        h, n, d**-0.5,
        KH=kh, KW=kw, TABLE=rows, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return out


@relpos_flash_attention.register_fake
def _(q, k, v, rel_pos_h, rel_pos_w):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)
