"""The decoder's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import torch
from torch import nn

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
        # self-attention of the tokens; the first layer sees them without PE and replaces them
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # cross attention, tokens attending to the image
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        queries = self.norm3(queries + self.mlp(queries))

        # cross attention, the image attending to the tokens
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


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
