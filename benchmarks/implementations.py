"""The implementations the benchmark compares, each behind one small interface.

Every implementation gets the same random weights (samkit's official-layout state_dict: the
official package takes it as is, transformers through samkit's key table) and the same inputs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from samkit.build import build_sam
from samkit.config import ImageEncoderConfig, SamConfig, variant_config
from samkit.keys import hf_config, official_to_hf

# "tiny": a seconds-long stand-in for smoke runs (CI); the rest are the official variants
TINY = SamConfig(
    image_encoder=ImageEncoderConfig(
        img_size=256, embed_dim=64, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,)
    )
)


def config_for(model_type: str) -> SamConfig:
    return TINY if model_type == "tiny" else variant_config(model_type)


def random_state_dict(model_type: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Default-initialised weights with the zero-initialised tables filled, fp32 on the CPU."""
    torch.manual_seed(seed)
    model = build_sam(config_for(model_type))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "rel_pos" in name or name.endswith("pos_embed"):
                tensor.normal_(0.0, 0.2)
    return model.state_dict()


@dataclass
class Encoder:
    """A callable from a normalised, padded Bx3xSxS float32 batch to Bx256x64x64 embeddings."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    model: torch.nn.Module


def samkit_encoder(
    state_dict, model_type, device, *, dtype=torch.float32, backend="sdpa", compile_mode=None
) -> Encoder:
    from samkit.fast import compile_encoder

    model = build_sam(config_for(model_type), device=device)
    model.load_state_dict(state_dict)
    model.set_attention_backend(backend)
    model = model.to(dtype)
    encoder = model.image_encoder
    if compile_mode:
        encoder = compile_encoder(encoder, mode=compile_mode)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encoder(x.to(dtype))

    tag = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    name = f"samkit {tag} {backend}" + (f" compile({compile_mode})" if compile_mode else "")
    return Encoder(name, run, model)


def samkit_fast_encoder(state_dict, model_type, device, **plan_changes) -> Encoder:
    """The encoder exactly as `SamPredictor(fast=True)` runs it (samkit.fast.fast_plan), with
    optional SpeedPlan fields changed for ablations."""
    from dataclasses import replace

    from samkit.fast import Accelerated, fast_plan

    model = build_sam(config_for(model_type), device=device)
    model.load_state_dict(state_dict)
    plan = replace(fast_plan(model.device), **plan_changes)
    accelerated = Accelerated(model, plan)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return accelerated.encode(x)

    changes = ", ".join(f"{k}={v}" for k, v in plan_changes.items())
    return Encoder("samkit fast" + (f" ({changes})" if changes else ""), run, model)


def official_available(model_type: str) -> bool:
    return model_type != "tiny" and importlib.util.find_spec("segment_anything") is not None


def official_model(state_dict, model_type, device, dtype=torch.float32):
    from segment_anything import sam_model_registry

    model = sam_model_registry[model_type]()
    model.load_state_dict(state_dict)
    return model.to(device=device, dtype=dtype).eval()


def official_encoder(state_dict, model_type, device, *, dtype=torch.float32) -> Encoder:
    model = official_model(state_dict, model_type, device, dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.image_encoder(x.to(dtype))

    tag = "fp32" if dtype == torch.float32 else "bf16 weights"
    return Encoder(f"official {tag}", run, model)


def saf_available(model_type: str) -> bool:
    """pytorch-labs/segment-anything-fast on the path (it is not on PyPI: README.md says how)."""
    return model_type != "tiny" and importlib.util.find_spec("segment_anything_fast") is not None


def vit_encoder_kwargs(c) -> dict:
    """The official ImageEncoderViT's constructor arguments for an ImageEncoderConfig (the
    official package and segment-anything-fast take the same ones)."""
    return {
        "depth": c.depth,
        "embed_dim": c.embed_dim,
        "img_size": c.img_size,
        "mlp_ratio": c.mlp_ratio,
        "norm_layer": partial(torch.nn.LayerNorm, eps=1e-6),
        "num_heads": c.num_heads,
        "patch_size": c.patch_size,
        "qkv_bias": c.qkv_bias,
        "use_rel_pos": True,
        "global_attn_indexes": c.global_attn_indexes,
        "window_size": c.window_size,
        "out_chans": c.out_chans,
    }


def saf_encoder(state_dict, model_type, device, *, compile_mode="max-autotune") -> Encoder:
    """segment-anything-fast's image encoder as its README runs it: bf16 weights,
    torch.compile(mode="max-autotune") and its Triton flash kernel with the rel-pos bias."""

    from segment_anything_fast.modeling.image_encoder import ImageEncoderViT

    model = ImageEncoderViT(**vit_encoder_kwargs(config_for(model_type).image_encoder))
    prefix = "image_encoder."
    model.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    )
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    encoder = torch.compile(model, mode=compile_mode) if compile_mode else model

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return encoder(x.to(dtype))

    tag = "bf16" if dtype == torch.bfloat16 else "fp32"
    mode = f", compile({compile_mode})" if compile_mode else ""
    return Encoder(f"segment-anything-fast {tag}{mode}", run, model)


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def transformers_model(state_dict, model_type, device, dtype=torch.float32, attn="sdpa"):
    from transformers import SamConfig, SamModel

    options = hf_config(config_for(model_type))
    config = SamConfig(
        vision_config=options["vision_config"],
        prompt_encoder_config=options["prompt_encoder_config"],
        mask_decoder_config=options["mask_decoder_config"],
    )
    config._attn_implementation = attn
    model = SamModel(config)
    model.load_state_dict(official_to_hf(state_dict), strict=True)
    return model.to(device=device, dtype=dtype).eval()


def transformers_encoder(state_dict, model_type, device, *, dtype=torch.float32) -> Encoder:
    model = transformers_model(state_dict, model_type, device, dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.vision_encoder(x.to(dtype)).last_hidden_state

    tag = "fp32" if dtype == torch.float32 else "bf16"
    return Encoder(f"transformers {tag} sdpa", run, model)
