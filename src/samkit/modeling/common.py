"""Small layers shared by the encoder and decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a BxCxHxW map, at every pixel."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BxCxHxW -> BxHxWxC for layer_norm over C, then back
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` whose fp32 CUDA calls are a GEMM over unfolded patches (`conv2d_as_matmul`).

    cuDNN runs fp32 convolutions in TF32 unless `torch.backends.cudnn.allow_tf32` is switched
    off, and PyTorch leaves it on: the neck's two convolutions then move vit_b's image
    embeddings by ~5e-4 of their scale from fp32 (and from the CPU's result). As a GEMM the
    convolution follows the matmul precision setting instead, fp32 by default, like every other
    product of the model. Other dtypes and devices call cuDNN (or the CPU kernel) as usual.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.float32:
            return conv2d_as_matmul(self, x)
        return super().forward(x)


def conv2d_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for x (B, C, H, W) as unfolded patches (B, C*kh*kw, L) times the flattened
    weight; zero padding and one group only."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return conv(x)
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    out = conv.weight.flatten(1) @ cols  # O x (C kh kw) by B x (C kh kw) x L -> B x O x L
    if conv.bias is not None:
        out = out + conv.bias[:, None]
    size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(
            x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    ]
    return out.view(x.shape[0], -1, *size)


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (the transformer feed-forward)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (hypernetworks and the IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole residual branch per sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)
