"""Mask decoder: output tokens + prompt tokens meet the image; hypernetworks predict masks."""

from __future__ import annotations

import torch
from torch import nn

from samkit.config import MaskDecoderConfig
from samkit.modeling.common import MLP, LayerNorm2d
from samkit.modeling.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts 1 + num_multimask_outputs masks and their IoU estimates per prompt."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        dim = config.transformer_dim
        self.transformer_dim = dim
        self.transformer = TwoWayTransformer(
            depth=config.transformer_depth,
            embedding_dim=dim,
            num_heads=config.num_heads,
            mlp_dim=config.mlp_dim,
            attention_downsample_rate=config.attention_downsample_rate,
        )
        self.num_multimask_outputs = config.num_multimask_outputs
        self.num_mask_tokens = config.num_multimask_outputs + 1  # token 0: the single-mask output
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            dim, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts.

        Args:
            image_embeddings: (1 or B, C, h, w); one embedding is shared by all B prompts.
            image_pe: (1, C, h, w) dense positional encoding.
            sparse_prompt_embeddings: (B, T, C); dense_prompt_embeddings: (B, C, h, w).
            multimask_output: masks 1..3 if True, else mask 0.
        Returns:
            mask logits (B, 3 or 1, 4h, 4w) and IoU predictions (B, 3 or 1).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All num_mask_tokens masks (B, M, 4h, 4w) and IoU predictions (B, M)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {batch} prompts: "
                "give one embedding, or one per prompt"
            )
        if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
            # a broadcast dense embedding (no mask prompt) is the same for every prompt: keep
            # one image so the decoder's first image-side projections run once, not B times
            dense_prompt_embeddings = dense_prompt_embeddings[:1]
        src = image_embeddings + dense_prompt_embeddings  # (1 or B) x C x h x w
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]

        # upscale the image tokens 4x and take a dot product with each mask token's hypernetwork
        src = src.transpose(1, 2).reshape(src.shape[0], c, h, w)  # Bx(hw)xC -> BxCxhxw
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # BxMx(C/8)
        _, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.flatten(2)).view(batch, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
