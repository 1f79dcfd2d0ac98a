"""The decoder's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from samkit.kernels import decoder_attention
from samkit.kernels.layer_norm_pe import layer_norm_pe
from samkit.modeling.attention import AttentionBackend, attention
from samkit.modeling.common import MLPBlock


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks, then a last attention from the tokens to the image."""

    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=i == 0,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embedding: (B or 1, C, h, w); one embedding is shared by the B prompts until
                the first image->token attention makes it prompt-specific.
            image_pe: (1, C, h, w).
            point_embedding: (B, T, C) prompt and output tokens (also their positional encoding).
        Returns:
            tokens (B, T, C) and image tokens (B, h*w, C) (batch 1 only if depth is 0).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)  # BxCxhxw -> Bx(hw)xC
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        # tokens attend to the image once more
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + key_pe, v=keys
        )
        return self.norm_final_attn(queries + attn_out), keys

    def prepare_image(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> ImageSide:
        """Everything of layer 0 that depends on the image alone, for `forward_factored`.

        image_embedding: (1, C, h, w), the embedding plus the (prompt-independent) dense prompt
        embedding; image_pe: (1, C, h, w).
        """
        keys, key_pe = _tokens(image_embedding), _tokens(image_pe)
        if not self.layers:
            empty = keys.new_empty(0)
            return ImageSide(keys, key_pe, empty, empty, empty, empty)
        layer = self.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        keys_pe = keys + key_pe

        def heads(x: torch.Tensor, count: int) -> torch.Tensor:
            # on the CPU each prompt's products would copy the strided heads (3 x 0.2 ms):
            # copy them once per image instead
            x = _split(x, count)
            return x if x.is_cuda else x.contiguous()

        return ImageSide(
            keys=keys,
            key_pe=key_pe,
            t2i_k=heads(t2i.k_proj(keys_pe), t2i.num_heads),
            t2i_v=heads(t2i.v_proj(keys), t2i.num_heads),
            i2t_q=heads(i2t.q_proj(keys_pe), i2t.num_heads),
            upscale=keys.new_empty(0),
        )

    def forward_factored(
        self,
        image: torch.Tensor | ImageSide,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        *,
        outputs: tuple[int, ...] | None = None,
        record: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with the image side factored through the tokens (see `token_to_image`).

        Equal to `forward` up to fp32 rounding. `image` is an embedding (B or 1, C, h, w), or
        `prepare_image`'s result (layer 0 then projects no image tokens at all). A shared
        (batch 1) embedding is prepared here, once for all B prompts. Every choice depends on
        shapes only (no host syncs): fit for torch.compile and CUDA graphs.

        outputs: the tokens (increasing indices) whose final outputs are returned, (B, len, C)
        instead of (B, T, C); the last attention then runs for these queries only (the mask
        decoder reads the IoU token and the masks it returns, never the prompt tokens').
        record: a list that receives each layer's image->token factors (see
        `TwoWayAttentionBlock.forward_factored`); only where every layer's attention is factored.
        """
        if isinstance(image, torch.Tensor):
            if image.shape[0] == 1:
                image = self.prepare_image(image, image_pe)
            else:
                keys, key_pe = _tokens(image), _tokens(image_pe)
                image = None
        if image is not None:
            keys, key_pe = image.keys, image.key_pe
        queries, keys_pe = point_embedding, None
        for i, layer in enumerate(self.layers):
            queries, keys, keys_pe = layer.forward_factored(
                queries,
                keys,
                query_pe=point_embedding,
                key_pe=key_pe,
                side=image if i == 0 else None,
                keys_pe=keys_pe,
                record=record,
            )
        if keys_pe is None:
            keys_pe = keys + key_pe
        if outputs is not None:
            # one point, multimask: 4 of 7 queries, 56 -> 32 rows against 4096 image tokens
            queries = select_tokens(queries, outputs)
            point_embedding = select_tokens(point_embedding, outputs)
        attn_out = token_to_image(
            self.final_attn_token_to_image, queries + point_embedding, keys_pe, keys
        )
        return self.norm_final_attn(queries + attn_out), keys


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, tokens->image, token MLP, image->tokens; each with a LayerNorm."""

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        *,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self._token_self_attention(queries, query_pe)

        # cross attention, tokens attending to the image
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        queries = self.norm3(queries + self.mlp(queries))

        # cross attention, the image attending to the tokens
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys

    def _token_self_attention(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """Self-attention of the tokens; the first layer sees them without PE and replaces them."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        return self.norm1(queries)

    def forward_factored(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        *,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        side: ImageSide | None,
        keys_pe: torch.Tensor | None = None,
        record: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` with the factored image side; `side`: this (first) layer's prepared image,
        `keys_pe`: keys + key_pe if known. Returns queries, keys and keys + key_pe.

        record: a list to append this layer's image->token update to, as (probs (B, R, N),
        values (B, R, C), mean (B, N, 1), rstd (B, N, 1)): the new keys are
        norm4(keys + probs^T @ values), with norm4's row statistics mean and rstd (for the mask
        decoder's folded upscaling). Only with a factored image->token attention.
        """
        queries = self._token_self_attention(queries, query_pe)

        q = queries + query_pe
        if side is not None:
            attn_out = _token_to_projected_image(
                self.cross_attn_token_to_image, q, side.t2i_k, side.t2i_v
            )
        else:
            if keys_pe is None:  # also the image->token queries below (keys are unchanged)
                keys_pe = keys + key_pe
            attn_out = token_to_image(self.cross_attn_token_to_image, q, keys_pe, keys)
        queries = self.norm2(queries + attn_out)

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        attn = self.cross_attn_image_to_token
        if record is None and fused_pays(attn, keys, q.shape[1]):
            # one kernel for the attention, the residual, the LayerNorm and the PE
            x = keys_pe if side is None else side.keys + side.key_pe
            return queries, *image_to_token_norm(attn, self.norm4, x, q, queries, keys, key_pe)
        if side is not None:
            keys = image_to_token(
                attn, side.i2t_q, q, queries, projected=True, residual=keys, record=record
            )
        else:
            keys = image_to_token(attn, keys_pe, q, queries, residual=keys, record=record)
        if record is not None:
            norm = self.norm4
            keys, mean, rstd = torch.native_layer_norm(
                keys, norm.normalized_shape, norm.weight, norm.bias, norm.eps
            )
            record.append((*record.pop(), mean, rstd))
            return queries, keys, keys + key_pe
        # the next attention needs the keys with and without their PE: one pass for both
        return queries, *layer_norm_pe(keys, self.norm4, key_pe)


class Attention(nn.Module):
    """Multi-head attention whose q/k/v are projected down by `downsample_rate` and back up."""

    backend: AttentionBackend

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.backend = "sdpa"
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide internal dim {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # BxNxC -> BxheadsxNxd

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B or 1, Nq, C), k and v (B or 1, Nk, C): a batch of 1 is shared by all B."""
        q, k, v = (
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(k)),
            self._heads(self.v_proj(v)),
        )
        batch = max(q.shape[0], k.shape[0])
        # projections of a shared input are computed once and broadcast; on CUDA as a copy, which
        # costs far less than the projection and suits every fused kernel (no zero batch stride)
        q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
        if q.is_cuda:
            q, k, v = (t.contiguous() if t.stride(0) == 0 else t for t in (q, k, v))
        out = attention(q, k, v, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # BxheadsxNxd -> BxNxC


# -- the factored image side ------------------------------------------------------------------
#
# Per prompt only T tokens (5 output tokens + the prompt's) meet N = 64*64 image tokens. The
# module projects all N image tokens through C x I linear layers (I = C / 2 = 128) in every
# image-side attention. By linearity the same attention can be computed with the *tokens*
# projected into the C-wide image space instead, per head h (d = I / heads, X the N x C image
# side, s = d**-0.5):
#
# token->image, queries q (T x I):
#     scores_h = s q_h (X Wk_h^T + bk_h)^T = (s q_h Wk_h) X^T + (a per-row constant, which the
#     softmax ignores), and P_h (X Wv_h^T + bv_h) = (P_h X) Wv_h^T + bv_h since rows of P_h sum
#     to 1: one attention of the heads*T projected queries against X with X as the values.
# image->token, keys k and values v (T x I):
#     scores_h = s (X Wq_h^T + bq_h) k_h^T = X (s Wq_h^T k_h^T) + s bq_h . k_h (per key: kept),
#     and sum_h A_h v_h Wo_h^T + bo = [A_1 .. A_H] [v_1 Wo_1^T; ..; v_H Wo_H^T] + bo: one
#     N x (heads*T) by (heads*T) x C product.
#
# Image-side work per attention drops from 2 N C I to 2 N C heads T multiply-adds, a gain while
# heads * T < I (T <= 15 for SAM: up to 10 points, or a box and 8 points). Rounding differs from
# the module's (the sums are reassociated), by about 1e-6 of the output scale in fp32.


class ImageSide(NamedTuple):
    """Layer 0's prompt-independent image side for one image (no mask prompt): computed once per
    image and reused by every prompt (`TwoWayTransformer.prepare_image`)."""

    keys: torch.Tensor  # (1, N, C) image embedding + dense prompt embedding
    key_pe: torch.Tensor  # (1, N, C)
    t2i_k: torch.Tensor  # (1, heads, N, d) layer 0 token->image keys, projected
    t2i_v: torch.Tensor  # (1, heads, N, d) and values
    i2t_q: torch.Tensor  # (1, heads, N, d) layer 0 image->token queries, projected
    # (1, N, C') the keys through the mask decoder's folded output upscaling, where it uses
    # one (MaskDecoder.prepare_image); else empty
    upscale: torch.Tensor


def select_tokens(x: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """x[:, ids] for increasing ids, as slices of consecutive runs (a view where one run): no
    index tensor, so nothing is copied to the device (CUDA graph capture)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    parts = [x[:, start:stop] for start, stop in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def factored_pays(attn: Attention, tokens: int) -> bool:
    """Whether the factored form of an image-side attention needs fewer FLOPs than the module."""
    return attn.num_heads * tokens < attn.internal_dim


def fused_pays(attn: Attention, image: torch.Tensor, tokens: int) -> bool:
    """Whether the fused CUDA kernels (samkit.kernels.decoder_attention) run an attention on
    the image tokens `image` for `tokens` prompt tokens: only where the factored form pays."""
    return factored_pays(attn, tokens) and decoder_attention.supported(image, tokens)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), contiguous: every image-side op then reads rows of C."""
    return x.flatten(2).transpose(1, 2).contiguous()


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, I) -> (B, heads, T, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> (B, T, I)."""
    return x.transpose(1, 2).flatten(2)


def _attend_shared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention (unit scale) of q (B, G, M, e) on k, v (1 or B, G, N, e).

    Keys shared by all B (batch 1) are not copied: the B query sets become one longer set.
    """
    batch, groups, m, e = q.shape
    if k.shape[0] == 1 and batch > 1:
        q = q.transpose(0, 1).reshape(1, groups, batch * m, e)
        out = _softmax_attention(q, k, v)
        return out.view(groups, batch, m, -1).transpose(0, 1)
    return _softmax_attention(q, k, v)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # the CPU's bf16 SDPA kernel runs at a third of its bf16 matmuls here (a few wide queries
    # against 4096 keys); everywhere else SDPA is as fast or faster
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # keys on the left: the CPU's bf16 matmul copies a transposed operand, so transpose
        # the small M x N scores, never the N = 4096 key rows; the softmax then runs over
        # contiguous rows (along a strided dim it is 5x slower on 2 threads)
        scores = (k @ q.transpose(-2, -1)).transpose(-2, -1).contiguous()  # ... x M x N
        return scores.softmax(-1) @ v
    if q.is_cuda:
        # few queries, long keys: the fused kernels split the work by query blocks and heads
        # only (8 thread blocks for one prompt on an H100, 134 us a call); two GEMMs and a
        # softmax over the small G x M x N scores spread over the whole GPU
        return _split_k_product((q @ k.transpose(-2, -1)).softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def _split_k_product(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """a @ b for a (..., M, K), b (..., K, N) with a long K and a small M x N result: as partial
    products over K chunks, summed (cuBLAS picks a kernel that walks all of K in a few thread
    blocks here: 125 us on an H100 for one prompt's 8 x 7 x 4096 by 8 x 4096 x 16)."""
    m, k_len = a.shape[-2:]
    n = b.shape[-1]
    # many prompts fill the GPU without a split (64 prompts' 56 x 4096 by 4096 x 256: 595 us
    # split, 534 us not, on an H100)
    if k_len < 4 * chunk or k_len % chunk or m * n > 1 << 14 or a.shape[:-2].numel() >= 32:
        return a @ b
    parts = k_len // chunk
    a = a.unflatten(-1, (parts, chunk)).transpose(-3, -2)  # ... x parts x M x chunk
    b = b.unflatten(-2, (parts, chunk))  # ... x parts x chunk x N
    return (a @ b).sum(-3)


def token_to_image(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """`attn(q=q, k=k, v=v)` for T tokens q (B, T, C) on the image k, v (1 or B, N, C), with the
    queries projected into the image space (see above) instead of the image into the heads."""
    if not factored_pays(attn, q.shape[1]):
        return attn(q=q, k=k, v=v)
    heads = attn.num_heads
    d = attn.internal_dim // heads
    c = k.shape[-1]
    qh = _split(attn.q_proj(q), heads)  # B x heads x T x d
    wk = attn.k_proj.weight.view(heads, d, c)  # I x C -> heads x d x C
    qx = (qh * d**-0.5) @ wk  # B x heads x T x C
    batch, _, tokens, _ = qx.shape
    px = _attend_shared(qx.reshape(batch, 1, heads * tokens, c), k[:, None], v[:, None])
    px = px.view(batch, heads, tokens, c)  # (P_h X) per head
    wv = attn.v_proj.weight.view(heads, d, c).transpose(1, 2)  # heads x C x d
    out = px @ wv + attn.v_proj.bias.view(heads, 1, d)  # B x heads x T x d
    return attn.out_proj(_merge(out))


def _token_to_projected_image(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """`attn(q=q, ...)` with the image keys and values already projected: (1, heads, N, d)."""
    qh = _split(attn.q_proj(q), attn.num_heads) * (k.shape[-1] ** -0.5)
    return attn.out_proj(_merge(_attend_shared(qh, k, v)))


def image_to_token(
    attn: Attention,
    x: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    projected: bool = False,
    residual: torch.Tensor,
    record: list | None = None,
) -> torch.Tensor:
    """`residual + attn(q=x, k=k, v=v)` for the image x (1 or B, N, C) attending to T tokens
    k, v (B, T, C), with the tokens' keys and values projected into the image space (see
    above); residual: (1 or B, N, C).

    projected: x is already `attn.q_proj(...)` split into heads, (1, heads, N, d).
    record: a list to append (probs (B, heads T, N), values (B, heads T, C)) to, where the
    result is residual + probs^T @ values (the factored form only).
    """
    heads = attn.num_heads
    batch, tokens = k.shape[:2]
    if not factored_pays(attn, tokens):
        if not projected:
            return residual + attn(q=x, k=k, v=v)
        kh, vh = _split(attn.k_proj(k), heads), _split(attn.v_proj(v), heads)
        out = F.scaled_dot_product_attention(x.expand(batch, -1, -1, -1), kh, vh)
        return residual + attn.out_proj(_merge(out))
    kh, vo = _token_keys_values(attn, k, v)
    vo = vo.flatten(1, 2)  # B x (heads T) x C, stacked
    n = x.shape[-2]
    # scores are laid out (heads T) x N, the softmax runs over T along dim -2: a softmax over a
    # last dim of T ~ 7 is 20x slower on the CPU
    # the image tokens stay the left operand of every product (a transposed N-row operand
    # costs a copy in the CPU's bf16 matmul); the small results are transposed instead
    if projected:
        # per head (d wide): heads x N x d by heads x d x (B T); the B prompts share one product
        scores = x[0] @ kh.permute(1, 3, 0, 2).flatten(2)  # heads x N x (B T)
        # B x heads x T x N in memory: a softmax over T contiguous values is 20x slower
        scores = scores.view(heads, n, batch, tokens).permute(2, 0, 3, 1).contiguous()
        probs = scores.softmax(-2)
    else:
        kx, bias = _keys_in_image_space(attn, kh)
        kx, bias = kx.flatten(1, 2), bias[..., None].flatten(1, 2)  # stacked (heads T) rows
        if x.shape[0] == 1 and batch > 1:  # one product for all prompts
            scores = (x[0] @ kx.flatten(0, 1).T).view(n, batch, heads * tokens).permute(1, 2, 0)
        else:
            scores = (x @ kx.transpose(1, 2)).transpose(1, 2)
        probs = (scores + bias).reshape(batch, heads, tokens, n).softmax(-2)
    probs = probs.reshape(batch, heads * tokens, n)  # B x (heads T) x N
    if record is not None:
        record.append((probs, vo))
    return torch.baddbmm(residual, probs.transpose(1, 2), vo)


def _token_keys_values(
    attn: Attention, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The T tokens' scaled keys (B, heads, T, d) and values through the output projection
    (B, heads, T, C) for an image->token attention."""
    heads = attn.num_heads
    c = k.shape[-1]
    d = attn.internal_dim // heads
    kh = _split(attn.k_proj(k), heads) * d**-0.5  # B x heads x T x d
    vh = _split(attn.v_proj(v), heads)
    wo = attn.out_proj.weight.view(c, heads, d).permute(1, 2, 0)  # heads x d x C
    # each head's probabilities sum to 1, so the heads*T rows of the probabilities sum to
    # `heads`: the output bias rides along as bias/heads on every value row, and the residual
    # is the product's addend (one pass over the N x C image tokens instead of three)
    return kh, vh @ wo + attn.out_proj.bias / heads


def _keys_in_image_space(attn: Attention, kh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s Wq_h^T k_h per head (B, heads, T, C) and the query bias' part, bq_h . k_h (B, heads,
    T): the image->token scores of image rows X are X kx^T + bias."""
    heads, d = kh.shape[1], kh.shape[-1]
    wq = attn.q_proj.weight.view(heads, d, -1)
    return kh @ wq, (kh @ attn.q_proj.bias.view(heads, d, 1))[..., 0]


def image_to_token_norm(
    attn: Attention,
    norm: nn.LayerNorm,
    x: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    residual: torch.Tensor,
    pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm(residual + attn(q=x, k=k, v=v))` and that plus `pe`, with the fused kernel
    (`fused_pays`): x (1 or B, N, C) the image rows with their PE, k, v (B, T, C)."""
    kh, vo = _token_keys_values(attn, k, v)
    kx, bias = _keys_in_image_space(attn, kh)
    return decoder_attention.image_to_token_norm(x, kx, bias, vo, residual, norm, pe)
