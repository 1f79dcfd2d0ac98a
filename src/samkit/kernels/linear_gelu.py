"""A linear layer followed by GELU in one GEMM: the activation runs in cuBLASLt's epilogue.

cuBLASLt's GELU epilogue is the tanh approximation of GELU (the exact one uses erf); the two
differ by less than 5e-4 anywhere, far below bf16's resolution, so the fast bf16 path uses it
to save a pass over the MLP's widest activation. Registered as a custom op so torch.compile
does not split it back into a GEMM and a separate GELU kernel.
"""

from __future__ import annotations

import torch


def supported(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and not torch.is_grad_enabled()


@torch.library.custom_op("samkit::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) for x (..., in), weight (out, in), bias (out,)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, flat, weight.T, use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
