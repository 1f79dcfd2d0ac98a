"""The mask decoder's first upscaling conv, folded back through the two-way transformer.

The conv (as a matmul, W: C x 4 C1, bias c) reads the final image tokens keys2 = LN1(y),
y = keys1 + P1 V1, keys1 = LN0(z), z = X + P0 V0: X the prepared image side (N x C), P_l the
layers' image->token probabilities (N x R, R = heads T), V_l their values with the output
projection folded in (R x C), LN_l(v) = (v - mu) rstd g_l + b_l per row. With G = diag(g1) W
and H = diag(g0) G, per row (r0, r1 the rstds, m0, m1 the means):

    keys2 W + c = r1 (y G - m1 colsum G) + b1 W + c
    y G = keys1 G + P1 (V1 G),    keys1 G = r0 (z H - m0 colsum H) + b0 G
    z H = X H + P0 (V0 H)

so keys2 W + c = [r0 r1 P0 | r1 P1 | -r0 r1 m0 | r1 | -r1 m1] @ [V0 H; V1 G; colsum H; b0 G;
colsum G] + r0 r1 (X H) + (b1 W + c). X H is computed once per image (ImageSide.upscale), then
per prompt one N x (2 R + 3) x 4 C1 product (one point: 4096 x 115 x 256 instead of the conv's
4096 x 256 x 256) and one pass over N x 4 C1. The means and rstds are the LayerNorms' own
(torch.native_layer_norm); they carry no gradient, so this is for inference only.

fp32: equal to the plain conv up to rounding (~5e-7 of the output scale measured; the mean is
subtracted after the product, which loses precision only where a row's mean is large against
its spread). bf16 (the CPU's decoder copy): X H, the factors and the statistics are rounded to
bf16; ~1.4e-2 of the scale from fp32, as the plain bf16 conv's ~1.6e-2 (tests/test_decoder_fast).
vit_b decoder, one point, same process (load ~1.8): decode_masks bf16 8.83 -> 7.95 ms on 1
thread, 4.85 -> 4.50 ms on 2; fp32 14.35 -> 11.78 ms and 7.85 -> 6.83 ms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class UpscaleFactors(NamedTuple):
    """The transformer's image->token updates of B prompts, for `folded_conv`:
    per layer l, new keys = LN(keys + probs_l @ values_l) with that LayerNorm's row stats."""

    probs0: torch.Tensor  # (B, R, N) layer 0 image->token probabilities
    values0: torch.Tensor  # (B, R, C) its values, output projection folded in
    mean0: torch.Tensor  # (B, N, 1) layer 0 norm4's row means
    rstd0: torch.Tensor  # (B, N, 1) and reciprocal standard deviations
    probs1: torch.Tensor  # layer 1, the same
    values1: torch.Tensor
    mean1: torch.Tensor
    rstd1: torch.Tensor
    image: torch.Tensor  # (1, N, 4 C1) ImageSide.upscale: the image side X through H

    def select(self, prompts: torch.Tensor) -> UpscaleFactors:
        """The factors of the prompts indexed by `prompts`."""
        return UpscaleFactors(*(t[prompts] for t in self[:-1]), image=self.image)

    def split(self, chunk: int) -> list[UpscaleFactors]:
        """The factors in groups of `chunk` prompts."""
        parts = zip(*(t.split(chunk) for t in self[:-1]), strict=True)
        return [UpscaleFactors(*p, image=self.image) for p in parts]


def folded_weights(
    conv1: nn.ConvTranspose2d, norm0: nn.LayerNorm, norm1: nn.LayerNorm, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """H (C x 4 C1), G (C x 4 C1), [colsum H; b0 G; colsum G] (3 x 4 C1) and b1 W + c (4 C1)
    for the conv and the two layers' last LayerNorms, in fp32, rounded once to dtype."""
    w1 = conv1.weight.float().permute(0, 2, 3, 1).flatten(1)  # C x (2 2 C1)
    g = norm1.weight.float()[:, None] * w1
    h = norm0.weight.float()[:, None] * g
    rows = torch.stack([h.sum(0), norm0.bias.float() @ g, g.sum(0)])
    bias = norm1.bias.float() @ w1 + conv1.bias.float().repeat(4)
    return tuple(t.to(dtype) for t in (h, g, rows, bias))


def folded_conv(factors: UpscaleFactors, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The first upscaling conv of the final image tokens (B, N, 4 C1), from the factors and
    `folded_weights` (in the factors' dtype)."""
    f = factors
    h, g, rows, bias = weights
    batch = f.probs0.shape[0]
    right = torch.cat([f.values0 @ h, f.values1 @ g, rows.expand(batch, -1, -1)], dim=1)
    # the left factor built transposed, B x (2 R + 3) x N, from the probabilities' own
    # layout: 0.14 ms, where the N x (2 R + 3) concatenation of their transposes costs
    # 1.4 ms (bf16, 1 thread); the product reads it as a transposed operand
    r0, r1 = f.rstd0.transpose(1, 2), f.rstd1.transpose(1, 2)  # B x 1 x N
    rstd = r0 * r1
    left = torch.cat(
        [
            f.probs0 * rstd,
            f.probs1 * r1,
            -rstd * f.mean0.transpose(1, 2),
            r1,
            -r1 * f.mean1.transpose(1, 2),
        ],
        dim=1,
    )
    out = torch.baddbmm(bias, left.transpose(1, 2), right)
    return out.addcmul_(f.image, rstd.transpose(1, 2))
