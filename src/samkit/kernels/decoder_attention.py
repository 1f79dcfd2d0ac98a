"""The decoder's image->token attention, LayerNorm and PE for many prompts, fused (Triton).

Segment everything decodes 64 prompts at a time, and each prompt has its own 4096 x 256 image
tokens after the first image->token attention. In the factored form (see
`samkit.modeling.transformer`) each block's image->token attention is: each image row x (with
PE) scores the heads*T stacked token keys, softmaxes within each head's T scores, mixes the
stacked values and adds its residual; the block's LayerNorm follows, and the next attention
wants the result with and without the PE. In PyTorch that is a GEMM, a strided copy, a softmax
along a strided axis, a batched GEMM with the residual as addend and the LayerNorm pass:
1.36 ms per layer for 64 prompts on an H100. `image_to_token_norm` does it in one kernel that
reads each image row once and writes the two results: 0.89 ms (0.84 with the image shared by
all prompts, as in layer 0). Segment everything's IoU pass per batch of 64 points (CUDA graph):
4.69 -> 3.94 ms; the whole default-threshold run on vit_b: 141 -> 128 ms
(benchmarks/results/h100-fused-*.log).

fp32 products run as "tf32x3" (each operand split into a TF32 high part and a TF32 low part,
three tensor-core products, fp32 accumulation): about fp32 accuracy at tensor-core speed.
Measured against the PyTorch path on 64 prompts: image tokens within 3.3e-7 of their scale,
IoU predictions within 1.3e-7. Plain TF32 (~1e-3 relative) would move masks; Triton's fp32
FMA products ("ieee") made the batch 10x slower.
"""

from __future__ import annotations

import torch

from samkit.kernels import fp32_cuda_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

FP32_PRECISION = "tf32x3"
# rows per block, blocks per program (for batches of 16+ prompts; else 1), channels per partial
# score product, pipelining stages, warps: the fastest of 60 configurations at 64 prompts on an
# H100 (benchmarks/results/h100-fused-i2t-configs.log); the whole 256 channels at once or
# deeper pipelines run out of shared memory (tf32x3 operands take twice fp32's)
ROWS, BLOCKS, CHUNK, STAGES, WARPS = 32, 16, 64, 1, 8


def supported(x: torch.Tensor, tokens: int) -> bool:
    """Whether the kernel takes image tokens x (..., N, C) with `tokens` prompt tokens: CUDA
    fp32, C a power of two in 64..256, at most 8 tokens (one or two points, a box, a box and a
    point), inference only. (bf16 decoders keep PyTorch's kernels: their GEMMs run on tensor
    cores already.)"""
    return triton is not None and tokens <= 8 and fp32_cuda_rows(x, 64, 256)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (n - 1).bit_length())


def image_to_token_norm(
    x: torch.Tensor,
    kx: torch.Tensor,
    bias: torch.Tensor,
    vo: torch.Tensor,
    residual: torch.Tensor,
    norm: torch.nn.LayerNorm,
    pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, y + pe) with y = norm(residual + softmax_T(x kx^T + bias) vo), per head.

    x: (1 or B, N, C) image rows (with PE); kx: (B, heads, T, C) the tokens' keys in the image
    space, scaled; bias: (B, heads, T); vo: (B, heads, T, C) values through the output
    projection; residual: (1 or B, N, C); pe: (1, N, C). Returns two (B, N, C) tensors.
    """
    batch, heads, tokens, c = kx.shape
    n = x.shape[1]
    tp = _pow2(tokens, 16 // heads if heads < 16 else 1)
    dtype = x.dtype
    # pad each head to tp tokens: zero keys and values, -inf bias (never picked by the softmax)
    pad = tp - tokens
    kx_p = torch.nn.functional.pad(kx.to(dtype), (0, 0, 0, pad)).contiguous()
    vo_p = torch.nn.functional.pad(vo.to(dtype), (0, 0, 0, pad)).contiguous()
    bias_p = torch.nn.functional.pad(bias.float(), (0, pad), value=float("-inf")).contiguous()
    x, residual, pe = x.contiguous(), residual.to(dtype).contiguous(), pe.to(dtype).contiguous()
    y = torch.empty(batch, n, c, device=x.device, dtype=dtype)
    y_pe = torch.empty_like(y)
    blocks = BLOCKS if batch >= 16 else 1  # one prompt: 128 programs of one block each
    grid = (triton.cdiv(n, ROWS * blocks), batch)
    _image_to_token_norm[grid](
        x, kx_p, bias_p, vo_p, residual, pe, norm.weight, norm.bias, y, y_pe,
        n, x.stride(0) if x.shape[0] > 1 else 0,
        residual.stride(0) if residual.shape[0] > 1 else 0, norm.eps,
        C=c, G=heads * tp, HEADS=heads, ROWS=ROWS, BLOCKS=blocks, CHUNK=min(CHUNK, c),
        PREC=FP32_PRECISION, num_warps=WARPS, num_stages=STAGES,
    )  # fmt: skip
    return y, y_pe


if triton is not None:

    @triton.jit
    def _image_to_token_norm(
        X, KX, BIAS, VO, R, PE, W, B, Y, YPE,
        n, x_batch, r_batch, eps,
        C: tl.constexpr, G: tl.constexpr, HEADS: tl.constexpr, ROWS: tl.constexpr,
        BLOCKS: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, G)
        col = tl.arange(0, C)
        keys = KX + b * G * C
        # the prompt's keys, values and the norm's parameters: loaded once for BLOCKS x ROWS rows
        if CHUNK == C:
            kt = tl.load(keys + g[None, :] * C + col[:, None])  # C x G
        vo = tl.load(VO + b * G * C + g[:, None] * C + col[None, :])  # G x C
        token_bias = tl.load(BIAS + b * G + g)
        w = tl.load(W + col).to(tl.float32)
        bias = tl.load(B + col).to(tl.float32)
        for block in range(BLOCKS):
            row = (tl.program_id(0) * BLOCKS + block) * ROWS + tl.arange(0, ROWS)
            live = (row < n)[:, None]
            offs = row[:, None].to(tl.int64) * C + col[None, :]
            if CHUNK == C:
                x = tl.load(X + b * x_batch + offs, mask=live, other=0.0)
                scores = tl.dot(x, kt, input_precision=PREC)
            else:
                scores = tl.zeros((ROWS, G), dtype=tl.float32)
                for c0 in tl.static_range(0, C, CHUNK):
                    cc = c0 + tl.arange(0, CHUNK)
                    x = tl.load(
                        X + b * x_batch + row[:, None].to(tl.int64) * C + cc[None, :],
                        mask=live,
                        other=0.0,
                    )
                    kc = tl.load(keys + g[None, :] * C + cc[:, None])  # CHUNK x G
                    scores = tl.dot(x, kc, scores, input_precision=PREC)
            scores += token_bias[None, :]
            # softmax over each head's tokens: columns are (head, token)
            s3 = tl.reshape(scores, (ROWS, HEADS, G // HEADS))
            e = tl.exp(s3 - tl.max(s3, axis=2)[:, :, None])
            p = tl.reshape(e / tl.sum(e, axis=2)[:, :, None], (ROWS, G))
            r = tl.load(R + b * r_batch + offs, mask=live, other=0.0).to(tl.float32)
            out = tl.dot(p.to(vo.dtype), vo, r, input_precision=PREC)
            mean = tl.sum(out, axis=1) / C
            centred = out - mean[:, None]
            var = tl.sum(centred * centred, axis=1) / C
            rstd = 1.0 / tl.sqrt(var + eps)
            y = centred * rstd[:, None] * w[None, :] + bias[None, :]
            pe = tl.load(PE + offs, mask=live, other=0.0).to(tl.float32)
            out_offs = b * n * C + offs
            tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=live)
            tl.store(YPE + out_offs, (y + pe).to(YPE.dtype.element_ty), mask=live)
