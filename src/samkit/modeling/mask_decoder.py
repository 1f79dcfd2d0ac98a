"""Mask decoder: output tokens + prompt tokens meet the image; hypernetworks predict masks."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from samkit.config import MaskDecoderConfig
from samkit.modeling.common import MLP, LayerNorm2d
from samkit.modeling.transformer import (
    ImageSide,
    TwoWayTransformer,
    factored_pays,
    select_tokens,
)
from samkit.modeling.upscale_fold import UpscaleFactors, folded_conv, folded_weights


class MaskDecoder(nn.Module):
    """Predicts 1 + num_multimask_outputs masks and their IoU estimates per prompt."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        dim = config.transformer_dim
        self.transformer_dim = dim
        self.transformer = TwoWayTransformer(
            depth=config.transformer_depth,
            embedding_dim=dim,
            num_heads=config.num_heads,
            mlp_dim=config.mlp_dim,
            attention_downsample_rate=config.attention_downsample_rate,
        )
        self.num_multimask_outputs = config.num_multimask_outputs
        self.num_mask_tokens = config.num_multimask_outputs + 1  # token 0: the single-mask output
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            dim, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth
        )

    # The fast formulations, used by `forward` and `Sam.decode` (the modules above still define
    # the model and its state_dict; set these to False to run them as plain modules):
    # - factored: the two-way transformer's image side factored through the few prompt tokens
    #   (TwoWayTransformer.forward_factored): 1.9 -> 0.8 GFLOP per point prompt, and with a
    #   prepared image side (Sam.prepare_decode) layer 0 projects no image tokens at all. On the
    #   2-core CPU (vit_b, one point, 2 threads) the transformer went from ~36 to ~12 ms. fp32
    #   and equal to the plain modules within ~1e-6 of the output scale (reassociated sums),
    #   inside every parity tolerance, so it is the default on every device; where it does not
    #   pay (heads * tokens >= internal dim, e.g. 16+ prompt tokens) each attention falls back
    #   to its module by shape.
    # - gemm_upscaling: each stride-2 2x2 transposed conv is a per-pixel linear map (C -> 4 C'),
    #   one matmul on the channels-last image tokens, with the LayerNorm on the channels-last
    #   result and one pixel shuffle at the end (after the hypernetwork product, on K masks
    #   only). CPU, 2 threads: 17.5 -> 6.5 ms per prompt; exact up to fp32 reassociation.
    # - fold_upscaling (CPU, with a prepared image side and no autograd): the first transposed
    #   conv of the final image tokens, folded back through both layers' last LayerNorm and
    #   image->token update (samkit.modeling.upscale_fold): one 4096 x (2 heads T + 3) x 256
    #   product per prompt instead of 4096 x 256 x 256. decode_masks, 2 threads: bf16 copy
    #   4.85 -> 4.50 ms, fp32 7.85 -> 6.83 ms.
    # Numbers for whole prompts: benchmarks/README.md ("CPU mask decoder").
    factored: bool = True
    gemm_upscaling: bool = True
    fold_upscaling: bool = True
    _cache: dict | None = None  # weights derived from parameters: `_derived`
    cpu_prompt_chunk: int = 4  # prompts per pass on the CPU (measured: 64 at once is slower)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        *,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts.

        Args:
            image_embeddings: (1 or B, C, h, w); one embedding is shared by all B prompts.
            image_pe: (1, C, h, w) dense positional encoding.
            sparse_prompt_embeddings: (B, T, C); dense_prompt_embeddings: (B, C, h, w).
            multimask_output: masks 1..3 if True, else mask 0.
            image_side: `prepare_image(image_embeddings, image_pe, no-mask dense embedding)`,
                computed once per image; only valid without a mask prompt.
        Returns:
            mask logits (B, 3 or 1, 4h, 4w) and IoU predictions (B, 3 or 1).
        """
        tokens = self.decode_tokens(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            multimask_output,
            image_side=image_side,
        )
        return self.decode_masks(tokens), tokens.iou_pred

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All num_mask_tokens masks (B, M, 4h, 4w) and IoU predictions (B, M)."""
        tokens = self.decode_tokens(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, None
        )
        return self.decode_masks(tokens), tokens.iou_pred

    def prepare_image(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> ImageSide:
        """The prompt-independent image side of one image (1, C, h, w) with the dense embedding
        of "no mask" (1, C, h, w), for `forward(..., image_side=...)`."""
        side = self.transformer.prepare_image(image_embeddings + dense, image_pe)
        if self._foldable() and side.keys.device.type == "cpu":
            h = self._folded_weights(side.keys.dtype)[0]
            side = side._replace(upscale=side.keys @ h)  # 1 x N x 4 C1: X H (upscale_fold)
        return side

    def _folded_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """`folded_weights` of this decoder, derived once per parameter state."""
        conv1 = self.output_upscaling[0]
        norms = [layer.norm4 for layer in self.transformer.layers]
        params = [conv1.weight, conv1.bias, *(p for n in norms for p in n.parameters())]
        return self._derived(
            f"folded {dtype}", params, lambda: folded_weights(conv1, *norms, dtype)
        )

    def _foldable(self) -> bool:
        """Whether `folded_conv` applies to this decoder's structure (SAM's: 2 layers)."""
        return self.fold_upscaling and self.gemm_upscaling and len(self.transformer.layers) == 2

    def decode_tokens(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool | None,
        *,
        image_side: ImageSide | None = None,
    ) -> DecodedTokens:
        """The transformer and IoU head: IoU predictions without any mask pixels.

        multimask_output: outputs 1..3 if True, 0 if False, all if None.
        `decode_masks` turns the result into masks, for all prompts or only those kept.
        """
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings for {batch} prompts: "
                "give one embedding, or one per prompt"
            )
        h, w = image_embeddings.shape[-2:]
        if multimask_output is None:
            keep = slice(None)
        else:
            keep = slice(1, None) if multimask_output else slice(0, 1)
        mask_ids = range(self.num_mask_tokens)[keep]
        # the transformer's outputs that are read: the IoU token's and the kept mask tokens'
        outputs = (0, *(1 + m for m in mask_ids))
        folded = None
        if image_side is not None and self.factored:
            fold = (
                self._foldable()
                and image_side.upscale.numel() > 0
                and not torch.is_grad_enabled()  # the LayerNorm statistics have no gradient
                and all(
                    factored_pays(layer.cross_attn_image_to_token, tokens.shape[1])
                    for layer in self.transformer.layers
                )
            )

            def run(part: torch.Tensor) -> tuple[torch.Tensor, ...]:
                record = [] if fold else None
                hs, src = self.transformer.forward_factored(
                    image_side, image_pe, part, outputs=outputs, record=record
                )
                # folded, the factors stand for the final image tokens, which are not kept
                # (4 MiB a prompt to gather: the IoU pass of 64 prompts 825 -> 669 ms, 2 CPU cores)
                kept = () if fold else (src,)
                return hs, *kept, *(t for layer in record or () for t in layer)

            # prompts are independent here: on the CPU a few at a time, so the image-side
            # tensors (4 MiB per prompt) stay in cache
            chunk = self.cpu_prompt_chunk if tokens.device.type == "cpu" else batch
            parts = [run(part) for part in tokens.split(chunk)]
            if len(parts) > 1:
                parts = [tuple(torch.cat(x) for x in zip(*parts, strict=True))]
            hs, *rest = parts[0]
            if fold:
                src = None
                folded = UpscaleFactors(*rest, image=image_side.upscale)
            else:
                (src,) = rest
        else:
            if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
                # a broadcast dense embedding (no mask prompt) is the same for every prompt:
                # keep one image so the first image-side projections run once, not B times
                dense_prompt_embeddings = dense_prompt_embeddings[:1]
            src = image_embeddings + dense_prompt_embeddings  # (1 or B) x C x h x w
            if self.factored:
                hs, src = self.transformer.forward_factored(src, image_pe, tokens, outputs=outputs)
            else:
                hs, src = self.transformer(src, image_pe, tokens)
                hs = select_tokens(hs, outputs)
        # hs: B x (1 + K) x C, the IoU token's output, then the K kept mask tokens'
        iou_pred = self.iou_prediction_head(hs[:, 0].to(_dtype(self.iou_prediction_head)))
        return DecodedTokens(
            iou_pred=iou_pred[:, keep],
            mask_tokens=hs[:, 1:],
            image_tokens=src,
            mask_ids=mask_ids,
            size=(h, w),
            folded=folded,
        )

    def decode_masks(
        self, tokens: DecodedTokens, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mask logits (B, K, 4h, 4w) of `decode_tokens`' prompts, or (P, K, 4h, 4w) of the P
        prompts indexed by `prompts`."""
        image_tokens, mask_tokens = tokens.image_tokens, tokens.mask_tokens
        # without image tokens the folded factors are the only form of them
        folded = tokens.folded if self._foldable() or image_tokens is None else None
        if prompts is not None:
            mask_tokens = mask_tokens[prompts]
            if image_tokens is not None and image_tokens.shape[0] > 1:
                image_tokens = image_tokens[prompts]
            if folded is not None:
                folded = folded.select(prompts)
        like = image_tokens if image_tokens is not None else folded.image
        # the heads may run in another dtype than the rest (samkit.fast: fp32 heads on a bf16
        # decoder copy on the CPU, where one-row bf16 matmuls are slow)
        mask_tokens = mask_tokens.to(_dtype(self.output_hypernetworks_mlps))
        hyper_in = self._hypernetworks(mask_tokens, tokens.mask_ids).to(like.dtype)
        h, w = tokens.size
        if self.gemm_upscaling:
            shared = (image_tokens if image_tokens is not None else hyper_in).shape[0] == 1
            if like.device.type != "cpu" or shared:
                return self._upscaled_masks(image_tokens, hyper_in, h, w, folded)
            chunk = self.cpu_prompt_chunk
            count = len(hyper_in.split(chunk))
            parts = zip(
                [image_tokens] * count if image_tokens is None else image_tokens.split(chunk),
                hyper_in.split(chunk),
                [None] * count if folded is None else folded.split(chunk),
                strict=True,
            )
            return torch.cat([self._upscaled_masks(x, y, h, w, f) for x, y, f in parts])
        # upscale the image tokens 4x and take a dot product with each mask token's hypernetwork
        src = image_tokens.transpose(1, 2).unflatten(2, (h, w))  # Bx(hw)xC -> BxCxhxw
        upscaled = self.output_upscaling(src)
        masks = hyper_in @ upscaled.flatten(2)
        return masks.view(hyper_in.shape[0], -1, 4 * h, 4 * w)

    def _upscaled_masks(
        self,
        image_tokens: torch.Tensor | None,
        hyper_in: torch.Tensor,
        h: int,
        w: int,
        folded: UpscaleFactors | None = None,
    ) -> torch.Tensor:
        """`output_upscaling` + hypernetwork product as two matmuls on channels-last tokens.

        A stride-2 2x2 transposed conv maps each input pixel's C channels to the 2x2 output
        pixels it covers, 4 x C' values: out[2i+a, 2j+b, o] = sum_c x[i, j, c] W[c, o, a, b] +
        bias[o]. Rows stay in (i, j, a, b, a', b') order until one pixel shuffle of the K masks.
        folded: the first conv from the transformer's factors instead (`folded_conv`; needed
        where image_tokens is None).
        """
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        c1, c2 = conv1.out_channels, conv2.out_channels
        w1 = conv1.weight.permute(0, 2, 3, 1).flatten(1)  # C x (2 2 C1)
        w2 = conv2.weight.permute(0, 2, 3, 1).flatten(1)  # C1 x (2 2 C2)
        hw = (folded.image if image_tokens is None else image_tokens).shape[1]
        if folded is not None:  # per prompt, also where the image tokens are one for all
            x = folded_conv(folded, self._folded_weights(folded.image.dtype))
        else:  # bias + product in one addmm
            x = torch.addmm(conv1.bias.repeat(4), image_tokens.reshape(-1, w1.shape[0]), w1)
        x = x.view(-1, hw * 4, c1)  # B x (hw 2 2) x C1
        batch = x.shape[0]
        x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        x = torch.addmm(conv2.bias.repeat(4), x.view(-1, c1), w2)  # (B hw 2 2) x (2 2 C2)
        x = act2(x).view(batch, hw * 16, c2)  # B x (hw 2 2 2 2) x C2
        # (i, j, a, b, a', b') -> row 4i + 2a + a', column 4j + 2b + b'
        batch, k = hyper_in.shape[:2]  # image tokens may be one image for all B
        # the CPU's bf16 matmul wants the long side first: B x (hw 2 2 2 2) x K, else B x K x ...
        tokens_first = x.dtype == torch.bfloat16
        masks = x @ hyper_in.transpose(1, 2) if tokens_first else hyper_in @ x.transpose(1, 2)
        if masks.device.type == "cpu":
            # a permuting copy with 2-wide inner dims runs ~7x slower here than a gather (and
            # index_select along dim 1, 3x on 2 threads)
            index = _shuffle_index(h, w, k, tokens_first).expand(masks.shape[0], -1)
            masks = masks.view(masks.shape[0], index.shape[1]).gather(1, index)
            return masks.view(masks.shape[0], k, 4 * h, 4 * w)
        if tokens_first:
            masks = masks.view(-1, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        else:
            masks = masks.view(-1, k, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return masks.reshape(batch, k, 4 * h, 4 * w)

    def _hypernetworks(self, mask_tokens: torch.Tensor, ids: range) -> torch.Tensor:
        """The hypernetwork MLPs `ids` on their mask tokens (B, K, C) -> (B, K, C/8).

        On the CPU, K > 1 MLPs at once: each layer one batched product over the K stacked
        weights (3 baddbmm instead of 3 K addmm; 3 masks, fp32, 2 threads: 0.48 -> 0.30 ms).
        """
        mlps = self.output_hypernetworks_mlps
        if mask_tokens.device.type != "cpu" or len(ids) == 1 or ids.step != 1:
            return torch.stack([mlps[m](mask_tokens[:, i]) for i, m in enumerate(ids)], dim=1)
        layers = len(mlps[0].layers)

        def stacked() -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [
                (
                    torch.stack([mlp.layers[i].weight.T for mlp in mlps]),  # M x in x out
                    torch.stack([mlp.layers[i].bias for mlp in mlps])[:, None],  # M x 1 x out
                )
                for i in range(layers)
            ]

        weights = self._derived("hypernetworks", mlps.parameters(), stacked)
        x = mask_tokens.transpose(0, 1)  # K x B x C
        for i, (weight, bias) in enumerate(weights):
            x = torch.baddbmm(bias[ids.start : ids.stop], x, weight[ids.start : ids.stop])
            if i < layers - 1:
                x = F.relu(x)
        return x.transpose(0, 1)

    def _derived(self, name: str, params, compute):
        """`compute()`, kept until one of `params` is replaced or modified in place
        (load_state_dict, optimizers bump `_version`); recomputed under autograd, where the
        result must carry the parameters' history."""
        if torch.is_grad_enabled():
            return compute()
        params = list(params)
        if self._cache is None:
            self._cache = {}
        cached = self._cache.get(name)
        # the same tensor objects (held here, so never another one at a reused address)
        if cached is None or any(
            a is not p or v != p._version for (a, v), p in zip(cached[0], params, strict=True)
        ):
            cached = self._cache[name] = ([(p, p._version) for p in params], compute())
        return cached[1]


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)  # cached: usable later in autograd too
def _shuffle_index(h: int, w: int, k: int, tokens_first: bool) -> torch.Tensor:
    """For one prompt's masks in `_upscaled_masks`' row order, flattened: the position of each
    pixel of the K x 4h x 4w output (the pixel shuffle as a gather on the CPU)."""
    if tokens_first:  # (i, j, a, b, a', b', k)
        order = torch.arange(16 * h * w * k).view(h, w, 2, 2, 2, 2, k).permute(6, 0, 2, 4, 1, 3, 5)
    else:  # (k, i, j, a, b, a', b')
        order = torch.arange(16 * h * w * k).view(k, h, w, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return order.flatten()


class DecodedTokens(NamedTuple):
    """`MaskDecoder.decode_tokens`' result for B prompts and K output masks per prompt."""

    iou_pred: torch.Tensor  # (B, K)
    mask_tokens: torch.Tensor  # (B, K, C) the transformer's output mask tokens
    # (B or 1, h*w, C) the transformer's image tokens; None where `folded` stands for them
    image_tokens: torch.Tensor | None
    mask_ids: range  # which of the num_mask_tokens outputs the K are
    size: tuple[int, int]  # (h, w) of the image token map
    folded: UpscaleFactors | None = None  # for the folded upscaling (CPU), if it applies

    def prompts_between(self, start: int, stop: int) -> DecodedTokens:
        """The result of prompts start..stop-1 alone (views)."""
        image = self.image_tokens
        return self._replace(
            iou_pred=self.iou_pred[start:stop],
            mask_tokens=self.mask_tokens[start:stop],
            image_tokens=image if image is None or image.shape[0] == 1 else image[start:stop],
            folded=None if self.folded is None else self.folded.select(slice(start, stop)),
        )
