"""The assembled model: image encoder + prompt encoder + mask decoder, with pre/post-processing."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samkit.config import SamConfig
from samkit.modeling.attention import BACKENDS, AttentionBackend
from samkit.modeling.image_encoder import Attention as EncoderAttention
from samkit.modeling.image_encoder import ImageEncoderViT
from samkit.modeling.mask_decoder import DecodedTokens, MaskDecoder
from samkit.modeling.prompt_encoder import PromptEncoder
from samkit.modeling.resample import postprocess_maps, resample_separable
from samkit.modeling.transformer import Attention as DecoderAttention
from samkit.modeling.transformer import ImageSide


class Sam(nn.Module):
    """Segment Anything. Differentiable: nothing here runs under no_grad."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT(config.image_encoder)
        self.prompt_encoder = PromptEncoder(
            config.prompt_encoder,
            image_size=config.image_size,
            embedding_size=config.embedding_size,
        )
        self.mask_decoder = MaskDecoder(config.mask_decoder)
        # not in the state_dict: they belong to the config, as in the official checkpoints
        self.register_buffer("pixel_mean", torch.empty(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.empty(3, 1, 1), persistent=False)
        self.reset_pixel_stats()

    def reset_pixel_stats(self) -> None:
        """(Re)fill pixel_mean/std from the config, e.g. after loading weights into a meta model."""
        device = None if self.pixel_mean.is_meta else self.pixel_mean.device
        self.pixel_mean = torch.tensor(self.config.pixel_mean, device=device).view(-1, 1, 1)
        self.pixel_std = torch.tensor(self.config.pixel_std, device=device).view(-1, 1, 1)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_decoder.iou_token.weight.dtype

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Choose "reference", "sdpa" (default) or "fused" attention for every attention layer."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
        for module in self.modules():
            if isinstance(module, EncoderAttention | DecoderAttention):
                module.backend = backend

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (B, 3, h, w) 0-255 RGB and zero-pad right/bottom to the square input."""
        x = (x - self.pixel_mean) / self.pixel_std
        size = self.config.image_size
        h, w = x.shape[-2:]
        return F.pad(x, (0, size - w, 0, size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Low-res logits (B, C, 256, 256) -> logits at the original image size (B, C, H, W).

        input_size is the (h, w) of the resized image inside the padded input.

        Bilinear to the padded input side, crop to input_size, bilinear to original_size; the
        first step computes only the pixels the crop keeps (bit-identical: with the scale
        given, each output pixel's source position and weights do not depend on the output
        size, so a smaller output is a crop of the full one).
        Masks are resampled as (B*C, 1, H, W): each is resampled on its own either way, and the
        CPU kernel runs 3-4x faster on one channel than on C=3 (which it copies to channels-last
        and back); its C=3 and C=1 paths round the weights differently, by about an ulp.
        fp32 on the CPU: both steps as one banded linear map per axis (samkit.modeling.resample,
        equal up to fp32 rounding, ~2e-7 of the logit scale; 1000x1500, 3 masks, 2 threads:
        4.8 -> 1.4-1.6 ms).
        """
        if _separable(masks):
            return self._postprocess_separable(masks, input_size, original_size)
        size = self.config.image_size
        h, w = int(input_size[0]), int(input_size[1])
        lead = masks.shape[:-2]
        masks = masks.reshape(-1, 1, *masks.shape[-2:])
        scale_h, scale_w = size / masks.shape[-2], size / masks.shape[-1]
        masks = torch.ops.aten.upsample_bilinear2d(masks, [h, w], False, scale_h, scale_w)
        masks = F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
        return masks.view(*lead, *masks.shape[-2:])

    def postprocess_binary(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """`postprocess_masks(...) > mask_threshold`: bool masks (B, C, H, W) at the original size.

        fp32 on the CPU with the threshold at 0: inside the last resampling pass, block by
        block (samkit.modeling.resample; 1000x1500, 3 masks, 1 thread: 5.2 -> 2.9 ms).
        """
        if _separable(masks) and self.mask_threshold == 0:
            return self._postprocess_separable(masks, input_size, original_size, positive=True)
        return self.postprocess_masks(masks, input_size, original_size) > self.mask_threshold

    def _postprocess_separable(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
        positive: bool = False,
    ) -> torch.Tensor:
        """`postprocess_masks` (or with positive, `> 0`) as banded maps per axis."""
        low = (int(masks.shape[-2]), int(masks.shape[-1]))
        size = (int(input_size[0]), int(input_size[1]))
        original = (int(original_size[0]), int(original_size[1]))
        maps = postprocess_maps(low, self.config.image_size, size, original)
        out = resample_separable(masks.reshape(-1, *low), *maps, positive=positive)
        return out.view(*masks.shape[:-2], *original)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        *,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for B prompts on one image embedding (or one embedding per prompt).

        Coordinates are in the model's input frame (the resized image, pixels).
        Args:
            image_embeddings: (1 or B, C, 64, 64).
            point_coords: (B, N, 2) xy; point_labels: (B, N) PointLabel codes.
            boxes: (B, 4) XYXY. mask_input: (B, 1, 256, 256) logits.
            image_side: `prepare_decode(image_embeddings)`, the image's prompt-independent
                decoder work, reusable by every prompt without a mask input (ignored with one).
        Returns:
            low-res mask logits (B, 3 or 1, 256, 256), IoU predictions (B, 3 or 1).
        """
        tokens = self.decode_tokens(
            image_embeddings,
            point_coords,
            point_labels,
            boxes,
            mask_input,
            multimask_output,
            image_side=image_side,
        )
        return self.mask_decoder.decode_masks(tokens), tokens.iou_pred

    def decode_tokens(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        *,
        image_side: ImageSide | None = None,
        mask_decoder: MaskDecoder | None = None,
    ) -> DecodedTokens:
        """`decode` up to the IoU predictions: `mask_decoder.decode_masks(result, prompts)` then
        gives the masks of all prompts or only of those kept (same values as `decode`).

        mask_decoder: run this copy of the decoder instead (e.g. a bf16 one: the prompt encoder
        stays as it is, its outputs are cast to the copy's dtype).
        """
        decoder = self.mask_decoder if mask_decoder is None else mask_decoder
        dtype = decoder.iou_token.weight.dtype
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        if mask_input is not None or not decoder.factored:
            image_side = None
        # the dense positional encoding, the embedding and the (no-mask) dense embedding are
        # part of a prepared image side: not cast (a copy of 64x64x256 each per prompt)
        image_pe = None if image_side is not None else self.prompt_encoder.get_dense_pe()
        if image_side is None:
            image_embeddings, dense = image_embeddings.to(dtype), dense.to(dtype)
        return decoder.decode_tokens(
            image_embeddings,
            None if image_pe is None else image_pe.to(dtype),
            sparse.to(dtype),
            dense,
            multimask_output,
            image_side=image_side,
        )

    def prepare_decode(
        self, image_embeddings: torch.Tensor, mask_decoder: MaskDecoder | None = None
    ) -> ImageSide:
        """The decoder's prompt-independent work on one image embedding (1, C, 64, 64), for
        `decode(..., image_side=...)`: compute it once per image (the predictor caches it)."""
        if image_embeddings.shape[0] != 1:
            raise ValueError(f"expected one image embedding, got {image_embeddings.shape[0]}")
        decoder = self.mask_decoder if mask_decoder is None else mask_decoder
        dtype = decoder.iou_token.weight.dtype
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return decoder.prepare_image(
            image_embeddings.to(dtype),
            self.prompt_encoder.get_dense_pe().to(dtype),
            dense.to(dtype),
        )

    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """The official batched interface.

        Each input dict holds 'image' (3xHxW, already resized so the long side is 1024),
        'original_size' (H, W) and optionally 'point_coords' (Bx Nx2), 'point_labels' (BxN),
        'boxes' (Bx4), 'mask_inputs' (Bx1x256x256), all in the resized frame. Each output dict holds
        'masks' (BxCxHxW bool at the original size), 'iou_predictions' (BxC) and
        'low_res_logits' (BxCx256x256).
        """
        images = torch.stack([self.preprocess(x["image"][None])[0] for x in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings, strict=True):
            low_res, iou = self.decode(
                embedding[None],
                point_coords=record.get("point_coords"),
                point_labels=record.get("point_labels"),
                boxes=record.get("boxes"),
                mask_input=record.get("mask_inputs"),
                multimask_output=multimask_output,
            )
            masks = self.postprocess_binary(
                low_res, record["image"].shape[-2:], record["original_size"]
            )
            outputs.append(
                {
                    "masks": masks,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs


def _separable(masks: torch.Tensor) -> bool:
    """Whether `postprocess_masks` runs as banded maps (samkit.modeling.resample): fp32 on the
    CPU."""
    return masks.device.type == "cpu" and masks.dtype == torch.float32
