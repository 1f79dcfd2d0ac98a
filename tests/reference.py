"""Shared test helpers: random weights in the official layout, and the independent reference.

The reference is Hugging Face `transformers`' SamModel, loaded with the *same* weights through
samkit's key table (strict key matching), so every comparison checks the table too.
"""

from __future__ import annotations

import math

import pytest
import torch

from samkit.config import ImageEncoderConfig, MaskDecoderConfig, PromptEncoderConfig, SamConfig
from samkit.keys import hf_config, official_to_hf
from samkit.modeling import Sam

# parametrize over these to run a test on the CPU and, where there is one, on CUDA
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]

# A small model that still has everything: windows that need padding (a 10x10 map in 4x4
# windows -> 12x12), a global block, 2 encoder heads, narrow prompt width. The decoder keeps
# 8 heads: the head count is invisible in the weights, and official-layout files assume 8.
TINY = SamConfig(
    image_encoder=ImageEncoderConfig(
        img_size=160,
        patch_size=16,
        embed_dim=32,
        depth=3,
        num_heads=2,
        out_chans=32,
        window_size=4,
        global_attn_indexes=(1,),
    ),
    prompt_encoder=PromptEncoderConfig(embed_dim=32, mask_in_chans=8),
    mask_decoder=MaskDecoderConfig(
        transformer_dim=32, num_heads=8, mlp_dim=64, iou_head_hidden_dim=32
    ),
)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and persistent buffer random, well-scaled values (in place).

    Weights get std 1/sqrt(fan_in); LayerNorm weights 1 +- noise; biases, rel-pos tables
    (zero in a fresh model) and embeddings get noise of their own, so no tensor is left at
    its initial value and a wrong key mapping cannot hide.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if "rel_pos" in name:
                value = 0.5 * noise
            elif _is_embedding(name, tensor):
                value = noise
            elif tensor.ndim >= 2:
                value = noise / math.sqrt(tensor[0].numel())
            elif ("norm" in name and name.endswith("weight")) or _is_layernorm_weight(name):
                value = 1.0 + 0.2 * noise
            else:
                value = 0.2 * noise
            tensor.copy_(value.to(tensor.dtype))
    return model


def _is_embedding(name: str, tensor: torch.Tensor) -> bool:
    return (
        name.endswith("pos_embed")
        or "gaussian_matrix" in name
        or ("embed" in name and tensor.ndim == 2)
        or "tokens" in name
    )


def _is_layernorm_weight(name: str) -> bool:
    # neck.1/neck.3, mask_downscaling.1/.4, output_upscaling.1 are LayerNorm2d
    return name.endswith(
        (
            "neck.1.weight",
            "neck.3.weight",
            "mask_downscaling.1.weight",
            "mask_downscaling.4.weight",
            "output_upscaling.1.weight",
        )
    )


def random_sam(config: SamConfig = TINY, seed: int = 0) -> Sam:
    """A samkit model of `config` with every tensor perturbed, in eval mode."""
    return perturb_(Sam(config), seed).eval()


def hf_reference(config: SamConfig, state_dict: dict[str, torch.Tensor]):
    """transformers.SamModel of this shape, loaded strictly with `state_dict` (official keys)."""
    from transformers import SamConfig as HFConfig
    from transformers import SamModel

    options = hf_config(config)
    hf_config_obj = HFConfig(
        vision_config=options["vision_config"],
        prompt_encoder_config=options["prompt_encoder_config"],
        mask_decoder_config=options["mask_decoder_config"],
    )
    hf_config_obj._attn_implementation = "eager"
    model = SamModel(hf_config_obj).eval()
    model.load_state_dict(official_to_hf(state_dict), strict=True)
    return model


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """max |actual - expected| <= rel * max |expected|: tolerance relative to the output's scale."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x scale {scale:.3g}"
