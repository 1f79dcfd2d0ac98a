"""Attention with SAM's decomposed relative positions, one function with three paths.

For a query at (qh, qw) and a key at (kh, kw) of an h x w map, the logit gets
``q . Rh[qh - kh] + q . Rw[qw - kw]`` with the *unscaled* query (MViTv2). The paths:

- ``reference``: plain matmul + softmax in float32 with the full N x N bias. Slow, obviously right.
- ``sdpa``: ``scaled_dot_product_attention`` with the bias materialised as ``attn_mask``.
- ``fused``: no N x N tensor. On CUDA with Triton, for maps whose width is a power of two (the
  64x64 global blocks), a flash kernel that adds the bias in-kernel (samkit.kernels); otherwise
  the bias folded into the dot product: q gets its two rel-pos terms appended (h + w features)
  and k gets one-hot row/column indicators, so ``q' . k'`` equals the biased logit exactly and
  any dense (flash) kernel computes it.
- ``flex``: FlexAttention with a score_mod that adds the two terms inside the kernel (meant to
  run under torch.compile; eager it falls back to a slow unfused loop).

A test keeps them equal.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

AttentionBackend = Literal["reference", "sdpa", "fused", "flex"]
BACKENDS: tuple[str, ...] = ("reference", "sdpa", "fused", "flex")


def relative_index(size: int, device: torch.device) -> torch.Tensor:
    """Index into a (2*size-1)-row rel-pos table: idx[q, k] = q - k + size - 1, (size, size)."""
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + (size - 1)


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two decomposed rel-pos terms for every query.

    Args:
        q: unscaled queries, (..., h*w, d).
        rel_pos_h, rel_pos_w: tables of shape (2h-1, d) and (2w-1, d).
        size: (h, w) of the token map.
    Returns:
        rel_h (..., h*w, h) with rel_h[.., (qh,qw), kh] = q . Rh[qh-kh], and rel_w (..., h*w, w).
    """
    h, w = size
    if rel_pos_h.shape[0] != 2 * h - 1 or rel_pos_w.shape[0] != 2 * w - 1:
        raise ValueError(
            f"rel-pos tables {tuple(rel_pos_h.shape)}/{tuple(rel_pos_w.shape)} do not fit a "
            f"{h}x{w} map (need {2 * h - 1} and {2 * w - 1} rows)"
        )
    # q against every table row at once (one wide matmul), then pick row q - k + size - 1
    all_h = q @ rel_pos_h.to(q.dtype).T  # ... x N x (2h-1)
    all_w = q @ rel_pos_w.to(q.dtype).T  # ... x N x (2w-1)
    rows = torch.arange(h * w, device=q.device)
    index_h = relative_index(h, q.device)[rows // w]  # N x h: qh - kh + h - 1
    index_w = relative_index(w, q.device)[rows % w]  # N x w: qw - kw + w - 1
    rel_h = torch.gather(all_h, -1, index_h.expand(*all_h.shape[:-1], h))
    rel_w = torch.gather(all_w, -1, index_w.expand(*all_w.shape[:-1], w))
    return rel_h, rel_w


def _bias(rel_h: torch.Tensor, rel_w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Full (..., N, N) additive bias from the decomposed terms."""
    # ... x N x h x 1 + ... x N x 1 x w -> ... x N x (h*w)
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.pad(x, (0, size - x.shape[-1])) if x.shape[-1] < size else x


def _fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    h, w = size
    d = q.shape[-1]
    scale = d**-0.5
    rows = torch.arange(h * w, device=q.device)
    # N x h and N x w indicators of each key's row and column
    onehot_h = F.one_hot(rows // w, h).to(k.dtype).expand(*k.shape[:-2], -1, -1)
    onehot_w = F.one_hot(rows % w, w).to(k.dtype).expand(*k.shape[:-2], -1, -1)
    q_ext = torch.cat([q * scale, rel_h, rel_w], dim=-1)
    k_ext = torch.cat([k, onehot_h, onehot_w], dim=-1)
    # flash kernels want equal head dims, a multiple of 8: zero padding changes no dot product
    width = -(-q_ext.shape[-1] // 8) * 8
    out = F.scaled_dot_product_attention(
        _pad_last(q_ext, width), _pad_last(k_ext, width), _pad_last(v, width), scale=1.0
    )
    return out[..., :d]


def _flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    w = size[1]

    def add_rel_pos(score, b, head, q_idx, kv_idx):
        return score + rel_h[b, head, q_idx, kv_idx // w] + rel_w[b, head, q_idx, kv_idx % w]

    return flex_attention(q, k, v, score_mod=add_rel_pos)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    size: tuple[int, int] | None = None,
    backend: AttentionBackend = "sdpa",
) -> torch.Tensor:
    """Softmax attention over B x heads x N x d tensors, with optional decomposed rel-pos.

    Args:
        q, k, v: (B, heads, N, d); N = h*w when ``rel_pos`` is given.
        rel_pos: (rel_pos_h, rel_pos_w) tables, or None for plain attention.
        size: (h, w) of the token map, needed with ``rel_pos``.
        backend: "reference", "sdpa" or "fused" (see the module docstring).
    Returns:
        (B, heads, N, d) in the dtype of q.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if rel_pos is not None and size is None:
        raise ValueError("size=(h, w) is needed with rel_pos")
    if backend == "fused" and rel_pos is not None and q.is_cuda:
        from samkit.kernels import relpos_flash

        if relpos_flash.supported(q, size):
            return relpos_flash.relpos_flash_attention(q, k, v, rel_pos[0], rel_pos[1])
    rel = None if rel_pos is None else rel_pos_terms(q, rel_pos[0], rel_pos[1], size)

    if backend == "reference":
        scale = q.shape[-1] ** -0.5
        logits = (q.float() * scale) @ k.float().transpose(-2, -1)
        if rel is not None:
            logits = logits + _bias(rel[0].float(), rel[1].float(), size)
        return (logits.softmax(dim=-1) @ v.float()).to(q.dtype)
    if backend == "fused" and rel is not None:
        return _fused(q, k, v, rel[0], rel[1], size)
    if backend == "flex" and rel is not None:
        return _flex(q, k, v, rel[0], rel[1], size)
    mask = None if rel is None else _bias(rel[0], rel[1], size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
