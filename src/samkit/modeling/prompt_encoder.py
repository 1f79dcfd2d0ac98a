"""Prompt encoder: points and boxes to sparse tokens, a mask to a dense embedding."""

from __future__ import annotations

import math
from enum import IntEnum

import torch
from torch import nn

from samkit.config import PromptEncoderConfig
from samkit.modeling.common import Conv2d, LayerNorm2d


class PointLabel(IntEnum):
    """Point label codes of the official model (the box corners are only used internally)."""

    PADDING = -1
    BACKGROUND = 0
    FOREGROUND = 1
    BOX_TOP_LEFT = 2
    BOX_BOTTOM_RIGHT = 3


class PromptEncoder(nn.Module):
    """Embeds prompts given in the model's input frame (pixels of the padded S x S input).

    Args:
        config: widths of the embeddings.
        image_size: side S of the model input (1024).
        embedding_size: side of the image embedding (64).
    """

    def __init__(self, config: PromptEncoderConfig, *, image_size: int, embedding_size: int):
        super().__init__()
        dim = config.embed_dim
        self.embed_dim = dim
        self.input_image_size = (image_size, image_size)
        self.image_embedding_size = (embedding_size, embedding_size)
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        # background point, foreground point, box top-left, box bottom-right (PointLabel 0..3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_input_size = (4 * embedding_size, 4 * embedding_size)
        hidden = config.mask_in_chans
        self.mask_downscaling = nn.Sequential(
            Conv2d(1, hidden // 4, kernel_size=2, stride=2),
            LayerNorm2d(hidden // 4),
            nn.GELU(),
            Conv2d(hidden // 4, hidden, kernel_size=2, stride=2),
            LayerNorm2d(hidden),
            nn.GELU(),
            Conv2d(hidden, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of B prompts.

        Args:
            points: (coords (B, N, 2) xy, labels (B, N)) in the input frame, or None.
            boxes: (B, 4) XYXY in the input frame, or None.
            masks: (B, 1, 256, 256) mask logits, or None.
        Returns:
            sparse (B, T, C) tokens, T = N (+1 padding point if there is no box) (+2 for a box);
            dense (B, C, 64, 64).
        """
        batch = _batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        sparse = weight.new_empty((batch, 0, self.embed_dim))
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], 1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords + 0.5  # to the pixel centre
        if pad:
            # one padding point so the decoder sees the same token layout as with a box
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            pad_label = labels.new_full((labels.shape[0], 1), PointLabel.PADDING)
            labels = torch.cat([labels, pad_label], dim=1)
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        labels = labels[..., None]
        pe = torch.where(labels == PointLabel.PADDING, self.not_a_point_embed.weight, pe)
        for code in range(4):  # background, foreground, box corners
            pe = torch.where(labels == code, pe + self.point_embeddings[code].weight, pe)
        return pe

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # Bx4 -> Bx2x2, pixel centres
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return pe + corner_embed


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised xy coordinates (a fixed 2 x F Gaussian matrix)."""

    def __init__(self, num_pos_feats: int = 64, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], (..., 2) xy -> (..., 2F) [sin, cos]."""
        coords = 2 * coords - 1
        coords = coords.to(self.positional_encoding_gaussian_matrix.dtype)
        coords = 2 * math.pi * (coords @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of an h x w grid of cell centres, (2F, h, w)."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=matrix.device, dtype=matrix.dtype) + 0.5) / h
        xs = (torch.arange(w, device=matrix.device, dtype=matrix.dtype) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # h x w x 2 (x, y)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Encoding of pixel coordinates (..., 2) xy in an image of size (h, w)."""
        h, w = image_size
        # division by Python numbers, not a tensor built from them: no host-to-device copy,
        # so the prompt path can be captured in a CUDA graph (same values: w, h are exact)
        return self._pe_encoding(torch.stack([coords[..., 0] / w, coords[..., 1] / h], dim=-1))


def _batch_size(
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
) -> int:
    if points is not None:
        return points[0].shape[0]
    if boxes is not None:
        return boxes.shape[0]
    if masks is not None:
        return masks.shape[0]
    return 1
