"""Key names: the official layout <-> Hugging Face `transformers` SamModel, declaratively.

samkit's modules carry the official names, so only the Hugging Face layout needs a table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from samkit.config import SamConfig

# (official, hugging face): dotted fragments, matched on whole key components, longest first
HF_RENAMES: tuple[tuple[str, str], ...] = (
    ("image_encoder.blocks", "vision_encoder.layers"),
    ("image_encoder", "vision_encoder"),
    ("patch_embed.proj", "patch_embed.projection"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("point_embeddings", "point_embed"),
    ("mask_downscaling.0", "mask_embed.conv1"),
    ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"),
    ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"),
    ("output_upscaling.0", "upscale_conv1"),
    ("output_upscaling.1", "upscale_layer_norm"),
    ("output_upscaling.3", "upscale_conv2"),
    ("norm_final_attn", "layer_norm_final_attn"),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
    ("norm3", "layer_norm3"),
    ("norm4", "layer_norm4"),
)
# Hugging Face keeps a second copy of the prompt encoder's Gaussian matrix at the top level
HF_SHARED_PE = "shared_image_embedding.positional_embedding"
HF_PROMPT_PE = "prompt_encoder.shared_embedding.positional_embedding"

# MLP heads: official `layers.{0..n-1}`, Hugging Face `proj_in`, `layers.{0..n-3}`, `proj_out`
_MLP_PREFIX = r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))"
_OFFICIAL_MLP = re.compile(_MLP_PREFIX + r"\.layers\.(\d+)\.")
_HF_MLP = re.compile(_MLP_PREFIX + r"\.(proj_in|proj_out|layers\.(\d+))\.")


def _fragment_pattern(fragments: list[str]) -> re.Pattern[str]:
    ordered = sorted(fragments, key=len, reverse=True)
    return re.compile(r"(?<![^.])(" + "|".join(map(re.escape, ordered)) + r")(?![^.])")


_TO_HF = dict(HF_RENAMES)
_FROM_HF = {hf: official for official, hf in HF_RENAMES}
_TO_HF_RE = _fragment_pattern(list(_TO_HF))
_FROM_HF_RE = _fragment_pattern(list(_FROM_HF))


def _mlp_depths(keys: list[str], pattern: re.Pattern[str]) -> dict[str, int]:
    """Number of linear layers of each MLP head found in `keys`."""
    depths: dict[str, set[str]] = {}
    for key in keys:
        match = pattern.match(key)
        if match:
            depths.setdefault(match.group(1), set()).add(match.group(2))
    return {prefix: len(layers) for prefix, layers in depths.items()}


def official_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official state_dict to the `transformers` SamModel layout."""
    depths = _mlp_depths(list(state_dict), _OFFICIAL_MLP)

    def mlp_name(match: re.Match[str]) -> str:
        prefix, index = match.group(1), int(match.group(2))
        last = depths[prefix] - 1
        name = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
        return f"{prefix}.{name}."

    out = {}
    for key, tensor in state_dict.items():
        new = _TO_HF_RE.sub(lambda m: _TO_HF[m.group(1)], _OFFICIAL_MLP.sub(mlp_name, key))
        out[new] = tensor
    if HF_PROMPT_PE in out:
        out[HF_SHARED_PE] = out[HF_PROMPT_PE].clone()
    return out


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a `transformers` SamModel state_dict to the official layout."""
    state_dict = dict(state_dict)
    shared = state_dict.pop(HF_SHARED_PE, None)
    if HF_PROMPT_PE not in state_dict and shared is not None:  # tied copy saved once
        state_dict[HF_PROMPT_PE] = shared
    inner = {}
    for key in state_dict:
        match = _HF_MLP.match(key)
        if match and match.group(3) is not None:
            inner[match.group(1)] = max(inner.get(match.group(1), -1), int(match.group(3)))

    def mlp_name(match: re.Match[str]) -> str:
        prefix, name = match.group(1), match.group(2)
        if name == "proj_in":
            index = 0
        elif name == "proj_out":
            index = inner.get(prefix, -1) + 2
        else:
            index = int(match.group(3)) + 1
        return f"{prefix}.layers.{index}."

    return {
        _FROM_HF_RE.sub(lambda m: _FROM_HF[m.group(1)], _HF_MLP.sub(mlp_name, key)): tensor
        for key, tensor in state_dict.items()
    }


def hf_config(config: SamConfig) -> dict[str, Any]:
    """The `transformers` SamConfig (as a config.json dict) of a model of this config."""
    enc, prompt, dec = config.image_encoder, config.prompt_encoder, config.mask_decoder
    return {
        "model_type": "sam",
        "architectures": ["SamModel"],
        "vision_config": {
            "hidden_size": enc.embed_dim,
            "output_channels": enc.out_chans,
            "num_hidden_layers": enc.depth,
            "num_attention_heads": enc.num_heads,
            "image_size": enc.img_size,
            "patch_size": enc.patch_size,
            "mlp_ratio": enc.mlp_ratio,
            "window_size": enc.window_size,
            "global_attn_indexes": list(enc.global_attn_indexes),
            "num_pos_feats": prompt.embed_dim // 2,
            "qkv_bias": enc.qkv_bias,
            "use_abs_pos": enc.use_abs_pos,
            "use_rel_pos": enc.use_rel_pos,
        },
        "prompt_encoder_config": {
            "hidden_size": prompt.embed_dim,
            "image_size": enc.img_size,
            "patch_size": enc.patch_size,
            "mask_input_channels": prompt.mask_in_chans,
        },
        "mask_decoder_config": {
            "hidden_size": dec.transformer_dim,
            "mlp_dim": dec.mlp_dim,
            "num_hidden_layers": dec.transformer_depth,
            "num_attention_heads": dec.num_heads,
            "attention_downsample_rate": dec.attention_downsample_rate,
            "num_multimask_outputs": dec.num_multimask_outputs,
            "iou_head_depth": dec.iou_head_depth,
            "iou_head_hidden_dim": dec.iou_head_hidden_dim,
        },
    }
