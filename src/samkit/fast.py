"""Speed, layered on top of the same modules: dtype, attention kernel, torch.compile.

Nothing here changes the model's definition: the fast path is the reference model cast to
bf16, with the rel-pos bias folded into a flash-attention kernel and the encoder compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from samkit.modeling import Sam
from samkit.modeling.attention import AttentionBackend


@dataclass(frozen=True)
class SpeedPlan:
    """How a model runs: what `fast=True` means on one device."""

    dtype: torch.dtype = torch.float32
    attention: AttentionBackend = "sdpa"
    compile_mode: str | None = None  # torch.compile mode for the image encoder, None = eager

    @property
    def is_reference(self) -> bool:
        return self.dtype == torch.float32 and self.compile_mode is None


REFERENCE = SpeedPlan()


def fast_plan(device: torch.device) -> SpeedPlan:
    """The fastest plan measured for this kind of device (benchmarks/README.md)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        dtype = torch.bfloat16 if major >= 8 else torch.float16
        return SpeedPlan(dtype=dtype, attention="fused", compile_mode="max-autotune-no-cudagraphs")
    # CPU: fp32 with SDPA measured fastest on a 2-core AVX-512 machine
    return SpeedPlan(dtype=torch.float32, attention="sdpa", compile_mode=None)


def compile_encoder(encoder: torch.nn.Module, mode: str = "max-autotune-no-cudagraphs"):
    """torch.compile for fixed-shape image batches."""
    return torch.compile(encoder, mode=mode, dynamic=False)


def apply_plan(model: Sam, plan: SpeedPlan) -> Sam:
    """Cast and set the attention kernel in place; compilation is left to the caller."""
    model.set_attention_backend(plan.attention)
    return model.to(plan.dtype)
