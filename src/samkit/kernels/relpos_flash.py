"""A Triton flash-attention forward with SAM's decomposed relative-position bias in the kernel.

For a key map of kh x kw tokens (kw a power of two, 16..128) each key block is one key row, so
the bias of a (query block, key block) tile is one column of rel_h (the row term, the same for
the whole block) plus the query block's rel_w tile (the column term, the same for every key
block, loaded once). No N x N bias is formed and the head dimension is not widened.

Inference only (no backward). Used by the "fused" attention path on CUDA when Triton is there;
registered as a torch custom op so torch.compile treats it as one opaque kernel.
"""

from __future__ import annotations

import torch

from samkit.kernels.relpos_window import split_head_dim

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
        key=["N", "HEAD_DIM", "KW"],
    )
    @triton.jit
    def _fwd(
        Q, K, V, RH, RW, Out,
        stride_qz, stride_qn, stride_kz, stride_kn, stride_vz, stride_vn,
        stride_hz, stride_hn, stride_wz, stride_wn, stride_oz, stride_on,
        N, KH, sm_scale,
        HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, KW: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        start_m = tl.program_id(0)
        z = tl.program_id(1).to(tl.int64)  # batch x head
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, KW)
        # the head dim as D1 + D2 channels (80 = 64 + 16): no padding to a power of two
        offs_d1 = tl.arange(0, D1)
        offs_d2 = D1 + tl.arange(0, D2 if D2 > 0 else 16)
        d1_ok = offs_d1 < HEAD_DIM
        d2_ok = offs_d2 < HEAD_DIM
        m_ok = offs_m < N
        log2e: tl.constexpr = 1.4426950408889634

        q_ptr = Q + z * stride_qz + offs_m[:, None] * stride_qn
        q1 = tl.load(q_ptr + offs_d1[None, :], mask=m_ok[:, None] & d1_ok[None, :], other=0.0)
        q2 = tl.load(q_ptr + offs_d2[None, :], mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
        # the column term: the same for every key row
        rw = tl.load(
            RW + z * stride_wz + offs_m[:, None] * stride_wn + offs_n[None, :],
            mask=m_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        rw = rw * log2e
        rh_ptr = RH + z * stride_hz + offs_m * stride_hn
        k_ptr = K + z * stride_kz + offs_n[None, :] * stride_kn
        v_ptr = V + z * stride_vz + offs_n[:, None] * stride_vn

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
        acc2 = tl.zeros([BLOCK_M, D2 if D2 > 0 else 16], tl.float32)
        qk_scale = sm_scale * log2e
        for row in range(0, KH):  # one key row per block
            row_k = k_ptr + row * KW * stride_kn
            k1 = tl.load(row_k + offs_d1[:, None], mask=d1_ok[:, None], other=0.0)
            s = tl.dot(q1, k1)
            if D2 > 0:
                k2 = tl.load(row_k + offs_d2[:, None], mask=d2_ok[:, None], other=0.0)
                s = tl.dot(q2, k2, s)
            s = s * qk_scale
            rh = tl.load(rh_ptr + row, mask=m_ok, other=0.0).to(tl.float32) * log2e
            s = s + rh[:, None] + rw
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            row_v = v_ptr + row * KW * stride_vn
            v1 = tl.load(row_v + offs_d1[None, :], mask=d1_ok[None, :], other=0.0)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None])
            if D2 > 0:
                v2 = tl.load(row_v + offs_d2[None, :], mask=d2_ok[None, :], other=0.0)
                acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None])
            m_i = m_new
        o_ptr = Out + z * stride_oz + offs_m[:, None] * stride_on
        inv = 1.0 / l_i
        tl.store(
            o_ptr + offs_d1[None, :],
            (acc1 * inv[:, None]).to(Out.dtype.element_ty),
            mask=m_ok[:, None] & d1_ok[None, :],
        )
        if D2 > 0:
            tl.store(
                o_ptr + offs_d2[None, :],
                (acc2 * inv[:, None]).to(Out.dtype.element_ty),
                mask=m_ok[:, None] & d2_ok[None, :],
            )


@torch.library.custom_op("samkit::relpos_flash_attention", mutates_args=())
def relpos_flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> torch.Tensor:
    """softmax(q.k/sqrt(d) + rel_h[.., kh] + rel_w[.., kw]) v.

    q, k, v: (B, heads, N, d) with N = kh * kw; rel_h: (B, heads, N, kh); rel_w: (B, heads, N, kw).
    """
    b, h, n, d = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    q, k, v = (t.contiguous().view(b * h, n, d) for t in (q, k, v))
    rel_h = rel_h.contiguous().view(b * h, n, kh)
    rel_w = rel_w.contiguous().view(b * h, n, kw)
    out = torch.empty_like(q)
    d1, d2 = split_head_dim(d)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), b * h)

    _fwd[grid](
        q, k, v, rel_h, rel_w, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        rel_h.stride(0), rel_h.stride(1), rel_w.stride(0), rel_w.stride(1),
        out.stride(0), out.stride(1),
        n, kh, d**-0.5,
        HEAD_DIM=d, D1=d1, D2=d2, KW=kw,
    )  # fmt: skip
    return out.view(b, h, n, d)


@relpos_flash_attention.register_fake
def _(q, k, v, rel_h, rel_w):
    return q.new_empty(q.shape)  # contiguous, like the real output
