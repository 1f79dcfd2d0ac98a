"""Optional GPU kernels (Triton); every one has a pure-torch fallback."""

from __future__ import annotations

import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None  # absent on CPU-only installs


def fp32_cuda_rows(x: torch.Tensor, smallest: int, largest: int) -> bool:
    """Whether x (..., C) suits the fp32 row kernels here: Triton present, CUDA fp32,
    C a power of two in smallest..largest, inference only."""
    c = x.shape[-1]
    return (
        HAVE_TRITON
        and x.is_cuda
        and x.dtype == torch.float32
        and c & (c - 1) == 0
        and smallest <= c <= largest
        and not torch.is_grad_enabled()
    )
