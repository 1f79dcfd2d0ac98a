"""Model configurations: one small dataclass per component and the named SAM variants.

Every size SAM depends on (input side 1024, patch 16, prompt width 256, ...) is named here once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, on 0-255 values
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ImageEncoderConfig:
    """The ViT image encoder (ViTDet style, windowed attention with decomposed rel-pos)."""

    img_size: int = 1024  # square input side, pixels
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256  # neck output channels (= prompt embedding width)
    window_size: int = 14  # 0 means every block is global
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    drop_path: float = 0.0  # stochastic depth, training only

    @property
    def grid_size(self) -> int:
        """Side of the token map (64 for a 1024 input and patch 16)."""
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class PromptEncoderConfig:
    """Sparse (points, boxes) and dense (mask) prompt embedding."""

    embed_dim: int = 256
    mask_in_chans: int = 16  # hidden channels of the mask downscaling convs


@dataclass(frozen=True)
class MaskDecoderConfig:
    """Two-way transformer decoder with hypernetwork mask heads."""

    transformer_dim: int = 256
    transformer_depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class SamConfig:
    """A whole SAM model: its three parts and the pixel normalisation that goes with the weights."""

    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD

    def __post_init__(self) -> None:
        widths = {
            "image_encoder.out_chans": self.image_encoder.out_chans,
            "prompt_encoder.embed_dim": self.prompt_encoder.embed_dim,
            "mask_decoder.transformer_dim": self.mask_decoder.transformer_dim,
        }
        if len(set(widths.values())) != 1:
            raise ValueError(f"prompt embedding widths must agree, got {widths}")
        enc = self.image_encoder
        if enc.img_size % enc.patch_size:
            raise ValueError(f"img_size {enc.img_size} is not a multiple of patch {enc.patch_size}")
        if enc.embed_dim % enc.num_heads:
            raise ValueError(f"embed_dim {enc.embed_dim} is not divisible by {enc.num_heads} heads")
        if any(not 0 <= i < enc.depth for i in enc.global_attn_indexes):
            raise ValueError(
                f"global_attn_indexes {enc.global_attn_indexes} outside depth {enc.depth}"
            )

    @property
    def image_size(self) -> int:
        """Side of the square model input (1024 for the official models)."""
        return self.image_encoder.img_size

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding (64 for the official models)."""
        return self.image_encoder.grid_size

    @property
    def mask_size(self) -> int:
        """Side of the low-resolution mask logits: the decoder upscales the embedding 4x (256)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamConfig:
        enc = dict(data.get("image_encoder", {}))
        if "global_attn_indexes" in enc:
            enc["global_attn_indexes"] = tuple(enc["global_attn_indexes"])
        return cls(
            image_encoder=ImageEncoderConfig(**enc),
            prompt_encoder=PromptEncoderConfig(**data.get("prompt_encoder", {})),
            mask_decoder=MaskDecoderConfig(**data.get("mask_decoder", {})),
            pixel_mean=tuple(data.get("pixel_mean", PIXEL_MEAN)),
            pixel_std=tuple(data.get("pixel_std", PIXEL_STD)),
        )

    def with_image_size(self, img_size: int) -> SamConfig:
        """The same model for another input side (pos_embed and rel-pos tables get resized)."""
        return dataclasses.replace(
            self, image_encoder=dataclasses.replace(self.image_encoder, img_size=img_size)
        )


def _vit(embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]) -> SamConfig:
    return SamConfig(
        image_encoder=ImageEncoderConfig(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            global_attn_indexes=global_attn,
        )
    )


VARIANTS: dict[str, SamConfig] = {
    "vit_b": _vit(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _vit(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _vit(1280, 32, 16, (7, 15, 23, 31)),
}
DEFAULT_VARIANT = "vit_h"


def variant_config(name: str) -> SamConfig:
    """The config of a named variant; `default` is vit_h, as in the official registry."""
    key = DEFAULT_VARIANT if name == "default" else name
    if key not in VARIANTS:
        known = ", ".join(["default", *VARIANTS])
        raise ValueError(f"unknown model type {name!r}; expected one of: {known}")
    return VARIANTS[key]


def variant_name(config: SamConfig) -> str | None:
    """The name of the variant equal to `config`, or None for a custom model."""
    return next((name for name, cfg in VARIANTS.items() if cfg == config), None)
