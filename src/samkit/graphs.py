"""Prompt decoding replayed as CUDA graphs.

One prompt costs the GPU well under a millisecond of work spread over ~100 small kernels; eager
PyTorch spends longer than that launching them. A CUDA graph records the launches once and
replays them with one call, so a call costs one replay plus a few copies. Two users, in every
CUDA predictor (fast or not: a replay computes exactly what the eager path computes): the
prompt path of `predict`/`predict_torch` (points or a box to masks at the original size,
`run_prompts`), and `_decode_tokens`, which segment everything calls for every batch of points
(eagerly, the host's launches take longer than the GPU's work on 64 prompts).

A graph reads and writes fixed ("static") tensors. The image side (embedding and the decoder's
prepared per-image work, `Sam.prepare_decode`) lives in one set of static tensors shared by
all graphs of a cache: a new image is copied in (a few MiB, device to device). Each input
layout (batch, points, box, mask input, options, sizes) gets its own graph, recorded on its
second use (a layout seen once runs eagerly), and the few most recent are kept. Replays run
the same kernels on the same values as the eager path: the results are identical.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch

from samkit.modeling import Sam
from samkit.modeling.transformer import ImageSide

# prompts per call worth a graph: beyond a few, the GPU work outweighs the launches
MAX_GRAPH_BATCH = 8
MAX_GRAPHS = 4


class PromptInputs(NamedTuple):
    """One call's prompts on the device, in the model input frame (see `Sam.decode`)."""

    point_coords: torch.Tensor | None  # (B, N, 2) xy
    point_labels: torch.Tensor | None  # (B, N)
    boxes: torch.Tensor | None  # (B, 4) XYXY
    mask_input: torch.Tensor | None  # (B, 1, 256, 256) logits


class PromptOutputs(NamedTuple):
    masks: torch.Tensor  # (B, C, H, W) bool, or float logits
    iou_predictions: torch.Tensor  # (B, C)
    low_res_logits: torch.Tensor  # (B, C, 256, 256)


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: tuple  # static copies of the call's inputs, which the replay reads
    outputs: tuple  # static tensors the replay overwrites


def run_prompts(
    model: Sam,
    features: torch.Tensor,
    image_side: ImageSide | None,
    prompts: PromptInputs,
    multimask_output: bool,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    return_logits: bool,
    decode: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> PromptOutputs:
    """Prompts -> masks at the original size, eagerly (what the graphs record).

    decode: `Sam.decode` or a replacement with its signature (e.g. a bf16 decoder copy's).
    """
    decode = model.decode if decode is None else decode
    low_res, iou = decode(
        features, *prompts, multimask_output=multimask_output, image_side=image_side
    )
    if return_logits:
        masks = model.postprocess_masks(low_res, input_size, original_size)
    else:
        masks = model.postprocess_binary(low_res, input_size, original_size)
    return PromptOutputs(masks, iou, low_res)


class GraphCache:
    """`fn(features, image_side, inputs, *args)` replayed from CUDA graphs where that pays.

    `inputs` is a tuple of tensors (or None) of the call's own data, `args` plain values; each
    layout of both gets its own graph, recorded on its second use. The result is a NamedTuple
    whose tensors are returned as fresh copies (not overwritten by later replays).

    buffers > 1: each layout gets that many graphs, replayed in turn, and a replay's outputs
    are returned as they are, without the copy: they stay valid until `buffers` more calls of
    the same layout (for a caller that holds at most that many results at a time; segment
    everything holds two batches, and copying a batch's 64 x 4096 x 256 image tokens cost
    ~0.2 ms of a ~4 ms batch on an H100).
    """

    def __init__(
        self, fn: Callable, *, max_batch: int | None, max_graphs: int, buffers: int = 1
    ) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.max_graphs = max_graphs
        self.buffers = buffers
        self._graphs: OrderedDict[tuple, list[_Graph]] = OrderedDict()
        self._turn: dict[tuple, int] = {}
        self._seen: set[tuple] = set()
        self._features: torch.Tensor | None = None  # static image embedding
        self._side: ImageSide | None = None  # static prepared image side
        self._source: torch.Tensor | None = None  # the embedding in _features
        self._side_source: torch.Tensor | None = None  # the embedding _side was prepared from

    def __call__(
        self, features: torch.Tensor, image_side: ImageSide | None, inputs: tuple, *args
    ) -> tuple:
        key = self._layout(features, image_side, inputs, args)
        if key is None or (key not in self._graphs and key not in self._seen):
            if key is not None:
                if len(self._seen) > 4 * self.max_graphs:
                    self._seen.clear()
                self._seen.add(key)
            return self.fn(features, image_side, inputs, *args)
        self._load_image(features, image_side)
        graphs = self._graphs.get(key)
        if graphs is None:
            graphs = self._graphs[key] = []
            if len(self._graphs) > self.max_graphs:
                dropped, _ = self._graphs.popitem(last=False)
                self._turn.pop(dropped, None)
        self._graphs.move_to_end(key)
        turn = self._turn.get(key, 0)
        self._turn[key] = (turn + 1) % self.buffers
        if turn == len(graphs):
            graphs.append(self._record(inputs, image_side is not None, args))
        graph = graphs[turn]
        for static, value in zip(graph.inputs, inputs, strict=True):
            if static is not None:
                static.copy_(value)
        graph.graph.replay()
        if self.buffers > 1:
            return graph.outputs
        return _rebuilt(graph.outputs, (_cloned(x) for x in graph.outputs))

    def _layout(
        self, features: torch.Tensor, image_side: ImageSide | None, inputs: tuple, args: tuple
    ) -> tuple | None:
        """What a graph is recorded for, or None where no graph is used."""
        present = [t for t in inputs if t is not None]
        if not features.is_cuda or features.shape[0] != 1 or not present:
            return None
        if self.max_batch is not None and present[0].shape[0] > self.max_batch:
            return None
        if torch.is_grad_enabled():
            return None
        shapes = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs)
        return (shapes, image_side is not None, *args)

    def _load_image(self, features: torch.Tensor, image_side: ImageSide | None) -> None:
        """Copy a new image into the static tensors every graph reads."""
        if self._source is not features:
            if self._features is None or self._features.shape != features.shape:
                self._forget()  # recorded on tensors of another shape
                self._features = features.clone()
            else:
                self._features.copy_(features)
            self._source = features
        if image_side is None or self._side_source is features:
            return
        if self._side is None or any(
            a.shape != b.shape for a, b in zip(self._side, image_side, strict=True)
        ):
            self._forget()
            self._side = ImageSide(*(t.clone() for t in image_side))
        else:
            for static, value in zip(self._side, image_side, strict=True):
                static.copy_(value)
        self._side_source = features

    def _forget(self) -> None:
        self._graphs.clear()
        self._turn.clear()

    def _record(self, inputs: tuple, with_side: bool, args: tuple) -> _Graph:
        inputs = _rebuilt(inputs, (_cloned(t) for t in inputs))
        side = self._side if with_side else None

        def step() -> tuple:
            return self.fn(self._features, side, inputs, *args)

        # warm up on a side stream (lazy initialisation, cuBLAS workspaces, cuDNN choices)
        stream = torch.cuda.Stream(self._features.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
        return _Graph(graph, inputs, outputs)


def _cloned(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def _rebuilt(like: tuple, values) -> tuple:
    """A tuple, or a NamedTuple of like's type, of `values`."""
    return type(like)(*values) if hasattr(like, "_fields") else tuple(values)
