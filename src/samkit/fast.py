"""Speed, layered on top of the same modules: dtype, attention kernel, torch.compile, graphs.

Nothing here changes the model's definition. `fast=True` on a predictor means, on CUDA: the
image encoder in bf16 with the rel-pos bias computed inside flash-attention kernels, compiled;
the prompt encoder in fp32; a bf16 copy of the mask decoder (IoU head and hypernetworks in fp32)
whose two-way transformer is compiled for batches of many prompts (segment everything's), while
a few prompts (clicks) run it eagerly. On the CPU it means the measured best CPU plan
(benchmarks/README.md). (Every CUDA predictor, fast or not, replays its prompt path as CUDA
graphs (samkit.graphs) and resizes images on the GPU with PIL's arithmetic
(samkit.transforms.resize_uint8).)
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from samkit.modeling import Sam
from samkit.modeling.attention import AttentionBackend


@dataclass(frozen=True)
class SpeedPlan:
    """How a model runs: what `fast=True` means on one kind of device."""

    dtype: torch.dtype = torch.float32  # of the image encoder
    attention: AttentionBackend = "sdpa"
    compile_mode: str | None = None  # torch.compile mode for the image encoder; None = eager
    gelu_epilogue: bool = False  # encoder MLP GELU (tanh approximation) in the GEMM epilogue
    # encoder residual adds fused with the LayerNorms after them (samkit.kernels.add_layer_norm)
    fused_residual_norm: bool = False
    decoder_dtype: torch.dtype = torch.float32  # of a mask decoder copy
    # torch.compile mode ("default" or another) for that copy's two-way transformer on batches
    # of at least COMPILE_DECODER_MIN_BATCH prompts; None = eager
    decoder_compile_mode: str | None = None


REFERENCE = SpeedPlan()


def fast_plan(device: torch.device) -> SpeedPlan:
    """The fastest plan measured for this kind of device (benchmarks/README.md)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return SpeedPlan(
            dtype=torch.bfloat16 if major >= 8 else torch.float16,
            attention="fused",
            # CUDA graphs: vit_b batch 1 157 -> 300 img/s on an H100 (launch gaps gone), batch 8
            # unchanged; max-autotune: +~5-9%, but minutes of autotuning
            compile_mode="reduce-overhead",
            gelu_epilogue=True,
            # vit_h: Inductor's add + LayerNorm 332 us a pass on 1280-wide rows, this one 117
            fused_residual_norm=True,
            # segment everything's token pass (1024 points, vit_b, H100): fp32 eager with the
            # fused kernels 55.7 ms a generate(), bf16 eager 52.5, bf16 compiled 32.8; masks at
            # IoU >= 0.988 (mean 0.995) with the exact path's (results/h100-lowprecision-*)
            decoder_dtype=torch.bfloat16 if major >= 8 else torch.float32,
            decoder_compile_mode="default" if major >= 8 else None,
        )
    return CPU_PLAN


# 2-core AVX-512-BF16 CPU, vit_b: bf16 + SDPA 5.3 s, fp32 8.7 s, fp32 one-hot "fused" 10.2 s
# (benchmarks/README.md); the one-hot width costs more FLOPs than the bias it saves on a CPU.
# A bf16 decoder copy: bf16 matmuls run ~3x faster than fp32 here; one prompt 25.6 -> 22.1 ms,
# 64 prompts ~1.9 -> ~1.0 s, masks at IoU 0.995 (min 0.991) with the fp32 decoder's on vit_b
CPU_PLAN = SpeedPlan(dtype=torch.bfloat16, attention="sdpa", decoder_dtype=torch.bfloat16)


# batch sizes a compiled encoder runs: each new size compiles again (~35 s for vit_h on an H100)
# and records its own CUDA graphs, and torch.compile falls back to eager after 8 sizes
COMPILED_BATCHES = (8, 4, 2, 1)


def batch_chunks(size: int) -> list[int]:
    """`size` as consecutive chunks of COMPILED_BATCHES sizes, largest first."""
    chunks = []
    for part in COMPILED_BATCHES:
        count, size = divmod(size, part)
        chunks += [part] * count
    return chunks


# the widest rows Inductor reduces in one persistent pass (wider: a looped, slower reduction);
# torch._inductor.choices.should_use_persistent_reduction, inner reductions, torch 2.11-2.13
INDUCTOR_PERSISTENT_WIDTH = 1024


# prompts per call from which the compiled transformer runs: segment everything decodes 64-256
# points at a time; an interactive click (1 prompt) or a few boxes never wait for a compile
COMPILE_DECODER_MIN_BATCH = 16


def compile_encoder(encoder: torch.nn.Module, mode: str = "max-autotune-no-cudagraphs"):
    """torch.compile for fixed-shape image batches."""
    return torch.compile(encoder, mode=mode, dynamic=False)


def compile_batched(transformer: torch.nn.Module, compiler: Callable[[Callable], Callable]) -> None:
    """Route `transformer.forward_factored` calls with at least COMPILE_DECODER_MIN_BATCH
    prompts, in inference and without recorded factors, through `compiler(forward_factored)`;
    the others keep the eager method. Changes this instance only (a decoder copy's)."""
    eager = transformer.forward_factored
    compiled = compiler(eager)
    # Inductor explains at each compile that it split a softmax over the 4096 image tokens: noise
    # in a user's terminal (a `samkit everything --fast` run), not a problem of theirs
    warnings.filterwarnings("ignore", r"\s*Online softmax is disabled", UserWarning)

    def forward_factored(image, image_pe, point_embedding, **kwargs):
        batched = point_embedding.shape[0] >= COMPILE_DECODER_MIN_BATCH
        if batched and kwargs.get("record") is None and not torch.is_grad_enabled():
            return compiled(image, image_pe, point_embedding, **kwargs)
        return eager(image, image_pe, point_embedding, **kwargs)

    transformer.forward_factored = forward_factored


class Accelerated:
    """The fast path of one model, with the predictor's `_encode`/`_decode` signatures."""

    def __init__(self, model: Sam, plan: SpeedPlan | None = None) -> None:
        self.model = model
        self.plan = plan or fast_plan(model.device)
        model.set_attention_backend(self.plan.attention)
        model.image_encoder.to(self.plan.dtype)  # prompts and masks stay in fp32
        for block in model.image_encoder.blocks:
            block.gelu_epilogue = self.plan.gelu_epilogue
        # Inductor's own add + LayerNorm keeps rows of up to 1024 in registers, as this kernel
        # does (vit_b's 768: 73 us both); only wider rows (vit_h's 1280) gain from it
        encoder = model.image_encoder
        encoder.fused_residual_norm = (
            self.plan.fused_residual_norm and encoder.config.embed_dim > INDUCTOR_PERSISTENT_WIDTH
        )
        if model.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the best conv
        self._encoder = model.image_encoder
        if self.plan.compile_mode:
            self._encoder = compile_encoder(self._encoder, self.plan.compile_mode)
        # a snapshot of the mask decoder in decoder_dtype: weights loaded into the model later
        # do not reach it (as with the converted encoder, give each model its own predictor)
        self._low_decoder = None
        if self.plan.decoder_dtype != torch.float32:
            self._low_decoder = copy.deepcopy(model.mask_decoder).to(self.plan.decoder_dtype)
            # the IoU head and hypernetworks see one token per prompt: fp32 matmuls of one row
            # run ~3x faster than bf16 ones on the CPU (0.40 -> 0.18 ms per prompt)
            self._low_decoder.iou_prediction_head.float()
            self._low_decoder.output_hypernetworks_mlps.float()
            if self.plan.decoder_compile_mode is not None:
                compiler = functools.partial(torch.compile, mode=self.plan.decoder_compile_mode)
                compile_batched(self._low_decoder.transformer, compiler)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised, padded (B, 3, S, S) -> fp32 embeddings (B, C, 64, 64).

        A compiled encoder sees only the batch sizes of COMPILED_BATCHES: other batches run as
        consecutive chunks of those sizes (11 = 8 + 2 + 1).
        """
        batch = batch.to(self.plan.dtype)
        if not self.plan.compile_mode:
            return self._encoder(batch).float()
        # .float() copies each chunk out of the CUDA graph's output buffer before the next replay
        chunks = batch.split(batch_chunks(batch.shape[0]))
        outputs = [self._encoder(chunk).float() for chunk in chunks]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def decode(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self._low_decoder is not None:
            tokens = self.decode_tokens(*args, **kwargs)
            return self.decode_masks(tokens), tokens.iou_pred
        return self.model.decode(*args, **kwargs)

    def prepare_decode(self, features: torch.Tensor):
        """`Sam.prepare_decode` for the decoder that `decode` runs."""
        return self.model.prepare_decode(features, self._low_decoder)

    def decode_tokens(self, *args, **kwargs):
        """`Sam.decode_tokens` through the decoder that `decode` runs, fp32 IoU."""
        tokens = self.model.decode_tokens(*args, **kwargs, mask_decoder=self._low_decoder)
        return tokens._replace(iou_pred=tokens.iou_pred.float())

    def decode_masks(self, tokens, prompts=None) -> torch.Tensor:
        """`MaskDecoder.decode_masks`, fp32 logits."""
        decoder = self.model.mask_decoder if self._low_decoder is None else self._low_decoder
        return decoder.decode_masks(tokens, prompts).float()
