"""The ViT image encoder: patches -> windowed/global transformer blocks -> 256-channel neck."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samkit.config import ImageEncoderConfig
from samkit.modeling.attention import AttentionBackend, attention
from samkit.modeling.common import Conv2d, LayerNorm2d, MLPBlock, drop_path


class ImageEncoderViT(nn.Module):
    """Maps a normalised, padded image to its embedding.

    Input (B, 3, S, S) with S = ``config.img_size``; output (B, out_chans, S/16, S/16).
    """

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.img_size = config.img_size
        grid = config.grid_size
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
            if config.use_abs_pos
            else None
        )
        self.blocks = nn.ModuleList(
            Block(
                dim=config.embed_dim,
                num_heads=config.num_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                use_rel_pos=config.use_rel_pos,
                window_size=0 if i in config.global_attn_indexes else config.window_size,
                grid_size=grid,
                drop_path=config.drop_path * i / max(config.depth - 1, 1),
            )
            for i in range(config.depth)
        )
        # fast path only: residual adds fused with the LayerNorms after them (a CUDA kernel)
        self.fused_residual_norm = False
        self.neck = nn.Sequential(
            Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # BxHxWxC
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.fused_residual_norm and self.blocks and not self.training:
            x = self._blocks_fused(x)
        else:
            for block in self.blocks:
                x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # BxHxWxC -> BxCxHxW

    def _blocks_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks with each residual add and the LayerNorm after it in one pass."""
        normed = self.blocks[0].norm1(x)
        for block, after in zip(self.blocks, [*self.blocks[1:], None], strict=True):
            x, normed = block.forward_fused(x, normed, after.norm1 if after else None)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patches through one strided convolution, returned channels-last."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            # the same sums as one GEMM over flattened patches: cuDNN picks a slow kernel for
            # this stride-16 convolution (3.5 ms of vit_h's 130 at batch 8 on an H100)
            p = self.proj.kernel_size[0]
            patches = x.unflatten(2, (-1, p)).unflatten(4, (-1, p))  # BxCx(H/p)xpx(W/p)xp
            patches = patches.permute(0, 2, 4, 1, 3, 5).flatten(3)  # Bx(H/p)x(W/p)x(C*p*p)
            return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
        return self.proj(x).permute(0, 2, 3, 1)  # BxCxHxW -> BxHxWxC


class Block(nn.Module):
    """Pre-norm transformer block; attention inside windows, or over the whole map."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        use_rel_pos: bool,
        window_size: int,
        grid_size: int,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        side = window_size if window_size > 0 else grid_size
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, size=side
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size
        self.drop_path = drop_path
        # fast path only: the MLP's GELU in the first GEMM's epilogue (tanh approximation)
        self.gelu_epilogue = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self._attend(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self._mlp(self.norm2(x)), self.drop_path, self.training)

    def forward_fused(
        self, x: torch.Tensor, normed: torch.Tensor, next_norm: nn.LayerNorm | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference: (x, norm1(x)) -> (out, next_norm(out)), out as `forward(x)`; each
        residual add and the LayerNorm after it run as one kernel where it applies."""
        from samkit.kernels.add_layer_norm import add_layer_norm

        x, normed = add_layer_norm(x, self._attend(normed), self.norm2)
        update = self._mlp(normed)
        if next_norm is None:
            return x + update, None
        return add_layer_norm(x, update, next_norm)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the normalised map x (B, H, W, C), in windows or global."""
        if self.window_size > 0 and not self.attn.windows_in_kernel(x, self.window_size):
            h, w = x.shape[1:3]
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            return window_unpartition(x, self.window_size, padded, (h, w))
        return self.attn(x, self.window_size)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_epilogue:
            from samkit.kernels import linear_gelu

            if linear_gelu.supported(x):
                lin1 = self.mlp.lin1
                return self.mlp.lin2(linear_gelu.linear_gelu(x, lin1.weight, lin1.bias))
        return self.mlp(x)


class Attention(nn.Module):
    """Multi-head self-attention on a BxHxWxC map with decomposed relative positions."""

    backend: AttentionBackend

    def __init__(
        self, dim: int, *, num_heads: int, qkv_bias: bool, use_rel_pos: bool, size: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            # zero-initialised as in the official model; checkpoints fill them
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.backend = "sdpa"

    def windows_in_kernel(self, x: torch.Tensor, window: int) -> bool:
        """Whether `forward(x, window)` can window the map itself (fused backend, on a GPU)."""
        if self.backend != "fused" or not self.use_rel_pos:
            return False
        from samkit.kernels import relpos_window

        return relpos_window.supported(x, window, self.rel_pos_h.shape[1])

    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        """Attention over a BxHxWxC map; with `window`, within each window of that size as if
        the map were zero-padded to a multiple of it (only when `windows_in_kernel`)."""
        b, h, w, c = x.shape
        if window:
            from samkit.kernels import relpos_window

            bias = self.qkv.bias if self.qkv.bias is not None else x.new_zeros(3 * c)
            out = relpos_window.relpos_window_attention(
                self.qkv(x),
                self.rel_pos_h,
                self.rel_pos_w,
                bias[c : 2 * c],
                bias[2 * c :],
                self.num_heads,
                window,
            )
            return self.proj(out)
        # BxHxWx3C -> 3xBxheadsx(HW)xd
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        rel_pos = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else None
        out = attention(q, k, v, rel_pos=rel_pos, size=(h, w), backend=self.backend)
        out = out.transpose(1, 2).reshape(b, h, w, c)  # Bxheadsx(HW)xd -> BxHxWxC
        return self.proj(out)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad a BxHxWxC map to a multiple of `window` and cut it into windows.

    Returns ((B*nH*nW) x window x window x C, (padded H, padded W)).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`: windows back to a BxHxWxC map without the padding."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if (hp, wp) != (h, w) else x
