"""SamPredictor: encode an image once, then get masks for prompts in milliseconds.

Official-compatible: `set_image`, `predict` (numpy, original image pixels), `predict_torch`
(torch, batched, in the model input frame), `get_image_embedding`, `reset_image`, with the
official names, shapes, dtypes and preprocessing (PIL bilinear resize of the uint8 image).
Beyond the official: several objects in one call (`predict_objects`), a batch of images in one
encoder pass (`encode_images`, `predict_batch`), embeddings saved to and loaded from files.

Image encoding happens only in `_encode` and mask decoding only in `_decode` (or, split, in
`_decode_tokens` for IoU predictions and `_decode_masks` for the masks of chosen prompts):
speed-ups (dtype, compile) are layered over those methods. The decoder's prompt-independent
image side is computed on the first prompt of an image and reused (`Sam.prepare_decode`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from samkit import embedding as embedding_files
from samkit.build import load_sam
from samkit.embedding import ImageEmbedding, image_digest
from samkit.fast import Accelerated
from samkit.graphs import (
    MAX_GRAPH_BATCH,
    MAX_GRAPHS,
    GraphCache,
    PromptInputs,
    PromptOutputs,
    run_prompts,
)
from samkit.modeling import Sam
from samkit.modeling.mask_decoder import DecodedTokens
from samkit.modeling.transformer import ImageSide
from samkit.prompts import (
    ObjectPrompts,
    PromptGroup,
    as_box,
    as_mask_input,
    as_object_prompts,
    as_points,
    check_torch_prompts,
    group_objects,
)
from samkit.transforms import ResizeLongestSide

IMAGE_FORMATS = ("RGB", "BGR")
# numpy results: masks (C, H, W) or (K, C, H, W), scores, low-res logits
Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]


class SamPredictor:
    """Prompted segmentation with a SAM model (official-compatible API, plus extensions).

    Attributes: model, transform (ResizeLongestSide to the model input side), device,
    is_image_set, features (1, C, 64, 64), original_size (H, W), input_size (h, w) of the resized
    image. The attributes are plain, as in the official predictor.
    """

    def __init__(self, sam_model: Sam, *, fast: bool = False) -> None:
        """`fast=True` layers samkit.fast over the model (on CUDA: bf16 compiled encoder, bf16
        decoder copy, compiled for batches of many prompts; slightly different numbers, compiled
        on first use).
        It converts `sam_model`'s image encoder in place: give other predictors their own model.
        The default is the exact fp32 path."""
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.config.image_size)
        self.accelerated = Accelerated(sam_model) if fast else None
        # on CUDA, prompts are decoded by replaying CUDA graphs (samkit.graphs): the same
        # kernels on the same values, without the launch overheads that dominate otherwise
        self._prompt_graphs = GraphCache(
            self._run_prompts, max_batch=MAX_GRAPH_BATCH, max_graphs=MAX_GRAPHS
        )
        # segment everything holds two batches' results at a time (it reads batch i while
        # batch i+1 runs): two graphs per layout, whose outputs are returned without a copy
        self._token_graphs = GraphCache(
            self._run_decode_tokens, max_batch=None, max_graphs=2, buffers=2
        )
        self.reset_image()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        model_type: str = "auto",
        *,
        device: str | torch.device | None = "auto",
        dtype: torch.dtype | None = None,
        fast: bool = False,
    ) -> SamPredictor:
        """A predictor for a checkpoint file; `device="auto"` picks CUDA, then MPS, then CPU."""
        return cls(load_sam(checkpoint, model_type, device=device, dtype=dtype), fast=fast)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- images ----------------------------------------------------------------------------------

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode an HxWx3 uint8 image ("RGB", or "BGR" as from OpenCV) for later prompts."""
        image = np.asarray(image)
        self.set_torch_image(self._prepare_image(image, image_format), image.shape[:2])

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Encode an image already resized by `transform.apply_image`, as (1, 3, h, w) 0-255.

        Runs under no_grad (not inference_mode), so the features can feed differentiable code.
        """
        size = self.model.config.image_size
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[1] != 3 or max(shape[2:]) != size:
            raise ValueError(
                f"transformed_image: expected shape (B, 3, h, w) with max(h, w) = {size} "
                f"(resize with predictor.transform.apply_image), got {shape}"
            )
        transformed_image = transformed_image.to(self.device)
        self.reset_image()
        self.original_size = (int(original_image_size[0]), int(original_image_size[1]))
        self.input_size = (shape[2], shape[3])
        self.features = self._encode(self.model.preprocess(transformed_image))
        self._digest_source = transformed_image  # hashed only when asked for (host copy)
        self.is_image_set = True

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[np.ndarray], image_format: str = "RGB"
    ) -> list[ImageEmbedding]:
        """Encode several HxWx3 uint8 images (any sizes) in one encoder pass.

        The current image is left alone; pass a result to `set_embedding` to prompt it, or give
        images and prompts together to `predict_batch`. Memory grows with len(images).
        """
        if len(images) == 0:
            raise ValueError("images: expected at least one image, got none")
        prepared = [
            self._prepare_image(image, image_format, f"images[{i}]")
            for i, image in enumerate(images)
        ]
        batch = torch.cat([self.model.preprocess(x) for x in prepared])  # Bx3xSxS
        features = self._encode(batch)
        return [
            ImageEmbedding(
                features=features[i : i + 1],
                original_size=(int(image.shape[0]), int(image.shape[1])),
                input_size=(x.shape[2], x.shape[3]),
                image_digest=image_digest(x),
            )
            for i, (image, x) in enumerate(zip(images, prepared, strict=True))
        ]

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Make an encoded image current (from `encode_images`, `load_embedding`, ...)."""
        self.reset_image()
        self.features = embedding.features.to(self.device)
        self.original_size = tuple(embedding.original_size)
        self.input_size = tuple(embedding.input_size)
        self.image_digest = embedding.image_digest
        self.is_image_set = True

    def get_embedding(self) -> ImageEmbedding:
        """The current image as a record (features, sizes, digest)."""
        self._require_image("to get its embedding")
        return ImageEmbedding(self.features, self.original_size, self.input_size, self.image_digest)

    def get_image_embedding(self) -> torch.Tensor:
        """The current image embedding, (1, C, 64, 64)."""
        self._require_image("to generate an embedding")
        return self.features

    def reset_image(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.image_digest = None
        self._image_side: tuple[torch.Tensor, ImageSide] | None = None
        # official attribute names, kept for scripts that read them
        self.orig_h = self.orig_w = self.input_h = self.input_w = None

    @property
    def image_digest(self) -> str | None:
        """sha256 of the current model input image (samkit.embedding.image_digest)."""
        if self._digest is None and self._digest_source is not None:
            self._digest = image_digest(self._digest_source)
            self._digest_source = None
        return self._digest

    @image_digest.setter
    def image_digest(self, value: str | None) -> None:
        self._digest = value
        self._digest_source: torch.Tensor | None = None

    def save_embedding(self, path: str | os.PathLike) -> None:
        """Save the current image embedding to a safetensors file (see samkit.embedding)."""
        embedding_files.save_embedding(path, self.get_embedding(), self.model)

    def load_embedding(
        self, path: str | os.PathLike, image: np.ndarray | None = None, image_format: str = "RGB"
    ) -> None:
        """Make a saved embedding current. With `image`, also check the file was made for it.

        Raises:
            EmbeddingError: unreadable file. EmbeddingMismatchError: another model's embedding
                (other config or weights), or another image's.
        """
        digest = None
        if image is not None:
            digest = image_digest(self._prepare_image(image, image_format))
        self.set_embedding(embedding_files.load_embedding(path, self.model, image_digest=digest))

    # -- prompts ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for one object on the current image, in original image pixels.

        Args:
            point_coords: (N, 2) xy; point_labels: (N,) 1 foreground, 0 background, -1 padding.
            box: (4,) XYXY. mask_input: (1, 256, 256) low-res logits, e.g. from a previous call.
            multimask_output: three masks (for ambiguous prompts) instead of one.
            return_logits: float logits instead of bool masks.
        Returns:
            masks (C, H, W) bool (float32 logits with return_logits), scores (C,) float32,
            low-res logits (C, 256, 256) float32; C = 3 with multimask_output, else 1.
        """
        self._require_image("before mask prediction")
        points = as_points(point_coords, point_labels)
        group = PromptGroup(
            indices=[0],
            point_coords=None if points is None else points[0][None],
            point_labels=None if points is None else points[1][None],
            boxes=None if box is None else as_box(box)[None],
            mask_inputs=None
            if mask_input is None
            else as_mask_input(mask_input, self.model.config.mask_size)[None],
        )
        masks, scores, low_res = self._predict_group(
            self.get_embedding(), group, multimask_output, return_logits
        )
        return _to_numpy(masks[0]), _to_numpy(scores[0]), _to_numpy(low_res[0])

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for B prompts on the current image; prompts in the model input frame.

        Transform original-image coordinates with `transform.apply_coords_torch` and
        `transform.apply_boxes_torch` first.
        Args:
            point_coords: (B, N, 2) xy; point_labels: (B, N). boxes: (B, 4) XYXY.
            mask_input: (B, 1, 256, 256) low-res logits.
        Returns:
            masks (B, C, H, W) bool (or logits) at the original size, IoU predictions (B, C),
            low-res logits (B, C, 256, 256).
        """
        self._require_image("before mask prediction")
        boxes = check_torch_prompts(
            point_coords, point_labels, boxes, mask_input, self.model.config.mask_size
        )
        return self._predict_input_frame(
            self.get_embedding(),
            point_coords,
            point_labels,
            boxes,
            mask_input,
            multimask_output,
            return_logits,
        )

    def predict_objects(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        boxes: Any = None,
        mask_inputs: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for K objects on the current image in one call, original image pixels.

        Each object has its own points (any number, labels as in `predict`) and/or its own box
        and mask input; see `ObjectPrompts` for the accepted layouts, e.g.
        `predict_objects([[[10, 20]], [[30, 40], [50, 60]]], [[1], [1, 0]], boxes=[None, box])`.
        Object k gets exactly what `predict` would give it alone: objects are grouped by prompt
        layout, one decoder pass per group, so no padding tokens are added.
        Returns:
            masks (K, C, H, W), scores (K, C), low-res logits (K, C, 256, 256), as `predict`.
        """
        self._require_image("before mask prediction")
        prompts = ObjectPrompts(point_coords, point_labels, boxes, mask_inputs)
        count, groups = group_objects(prompts, self.model.config.mask_size)
        return self._predict_objects(
            self.get_embedding(), count, groups, multimask_output, return_logits
        )

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[ObjectPrompts | Mapping[str, Any]],
        image_format: str = "RGB",
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> list[Prediction]:
        """Encode several images in one pass and prompt each: prompts[i] holds image i's objects.

        prompts[i] is an `ObjectPrompts` or a dict of `predict_objects` arguments. Returns, per
        image, what `predict_objects` returns. The current image is left alone.
        """
        if len(prompts) != len(images):
            raise ValueError(
                f"prompts: expected one entry per image ({len(images)} images), got {len(prompts)}"
            )
        checked = []
        for i, prompt in enumerate(prompts):
            try:
                checked.append(
                    group_objects(as_object_prompts(prompt), self.model.config.mask_size)
                )
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        embeddings = self.encode_images(images, image_format)
        return [
            self._predict_objects(embedding, count, groups, multimask_output, return_logits)
            for embedding, (count, groups) in zip(embeddings, checked, strict=True)
        ]

    # -- internals -------------------------------------------------------------------------------

    def _encode(self, input_batch: torch.Tensor) -> torch.Tensor:
        """Normalised, padded (B, 3, S, S) images -> image embeddings (B, C, 64, 64)."""
        if self.accelerated is not None:
            return self.accelerated.encode(input_batch)
        return self.model.image_encoder(input_batch)

    def _decode(
        self,
        features: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        *,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts in the input frame -> low-res logits (B, C, 256, 256), IoU (B, C).

        image_side: `_prepared(features, mask_input)` where the caller has it (inside a CUDA
        graph `features` is a static copy, which the per-image cache does not know).
        """
        if image_side is None:
            image_side = self._prepared(features, mask_input)
        decode = self.model.decode if self.accelerated is None else self.accelerated.decode
        return decode(
            features,
            point_coords,
            point_labels,
            boxes,
            mask_input,
            multimask_output,
            image_side=image_side,
        )

    def _decode_tokens(
        self,
        features: torch.Tensor,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
    ) -> DecodedTokens:
        """`_decode` up to the IoU predictions; `_decode_masks` gives the masks of any prompts.

        On CUDA, replayed from a CUDA graph per prompt layout (segment everything decodes
        batches of the same layout: it is bound by kernel launches otherwise). A replayed
        result's tensors belong to the graph: valid until the second next call with the same
        layout (the generator holds at most two), so copy what must live longer.
        """
        side = self._prepared(features, mask_input)
        prompts = (point_coords, point_labels, boxes, mask_input)
        return self._token_graphs(features, side, prompts, multimask_output)

    def _run_decode_tokens(
        self,
        features: torch.Tensor,
        image_side: ImageSide | None,
        prompts: tuple[torch.Tensor | None, ...],
        multimask_output: bool,
    ) -> DecodedTokens:
        runner = self.model if self.accelerated is None else self.accelerated
        return runner.decode_tokens(
            features, *prompts, multimask_output=multimask_output, image_side=image_side
        )

    def _decode_masks(
        self, tokens: DecodedTokens, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Low-res logits (P, C, 256, 256) of the `prompts` (indices) of `_decode_tokens`."""
        if self.accelerated is not None:
            return self.accelerated.decode_masks(tokens, prompts)
        return self.model.mask_decoder.decode_masks(tokens, prompts)

    def _prepared(
        self, features: torch.Tensor, mask_input: torch.Tensor | None
    ) -> ImageSide | None:
        """The decoder's prompt-independent work on `features` (Sam.prepare_decode), computed
        on the first prompt without a mask input and kept until the image changes."""
        if mask_input is not None or features.shape[0] != 1:
            return None
        if not self.model.mask_decoder.factored:
            return None
        cached = self._image_side
        if cached is None or cached[0] is not features:
            prepare = self.model if self.accelerated is None else self.accelerated
            cached = self._image_side = (features, prepare.prepare_decode(features))
        return cached[1]

    @torch.inference_mode()
    def _predict_objects(
        self,
        embedding: ImageEmbedding,
        count: int,
        groups: list[PromptGroup],
        multimask_output: bool,
        return_logits: bool,
    ) -> Prediction:
        outputs: list[np.ndarray] = []
        for group in groups:
            results = self._predict_group(embedding, group, multimask_output, return_logits)
            if not outputs:  # shapes and dtypes are known after the first group
                outputs = [np.empty((count, *r.shape[1:]), _numpy_dtype(r)) for r in results]
            for out, result in zip(outputs, results, strict=True):
                out[group.indices] = _to_numpy(result)
        if not outputs:  # no objects: empty arrays of the shapes and dtypes objects would get
            config = self.model.config
            c = config.mask_decoder.num_multimask_outputs if multimask_output else 1
            (h, w), low = embedding.original_size, config.mask_size
            outputs = [
                np.empty((0, c, h, w), np.float32 if return_logits else np.bool_),
                np.empty((0, c), np.float32),
                np.empty((0, c, low, low), np.float32),
            ]
        return outputs[0], outputs[1], outputs[2]

    def _predict_group(
        self,
        embedding: ImageEmbedding,
        group: PromptGroup,
        multimask_output: bool,
        return_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stacked group of checked numpy prompts, original frame -> torch results."""
        size = embedding.original_size
        coords = labels = boxes = masks = None
        if group.point_coords is not None:
            coords = self._tensor(self.transform.apply_coords(group.point_coords, size))
            labels = torch.as_tensor(group.point_labels, dtype=torch.int, device=self.device)
        if group.boxes is not None:
            boxes = self._tensor(self.transform.apply_boxes(group.boxes, size))
        if group.mask_inputs is not None:
            masks = self._tensor(group.mask_inputs)
        return self._predict_input_frame(
            embedding, coords, labels, boxes, masks, multimask_output, return_logits
        )

    def _predict_input_frame(
        self,
        embedding: ImageEmbedding,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        return_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if point_coords is not None:
            point_coords = point_coords.to(self.device)
            point_labels = point_labels.to(self.device)
        if boxes is not None:
            boxes = boxes.to(self.device)
        if mask_input is not None:
            mask_input = mask_input.to(self.device, self.model.dtype)
        features = embedding.features
        outputs = self._prompt_graphs(
            features,
            self._prepared(features, mask_input),
            PromptInputs(point_coords, point_labels, boxes, mask_input),
            multimask_output,
            embedding.input_size,
            embedding.original_size,
            return_logits,
        )
        return tuple(outputs)

    def _run_prompts(
        self, features: torch.Tensor, image_side: ImageSide | None, prompts: PromptInputs, *args
    ) -> PromptOutputs:
        """`graphs.run_prompts` through this predictor's `_decode`."""
        return run_prompts(self.model, features, image_side, prompts, *args, decode=self._decode)

    def _prepare_image(
        self, image: np.ndarray, image_format: str, name: str = "image"
    ) -> torch.Tensor:
        """HxWx3 uint8 -> the resized (1, 3, h, w) uint8 tensor on the model's device."""
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format: expected 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(
                f"{name}: expected an HxWx3 array (samkit.io.load_image reads any image "
                f"file as one), got shape {image.shape}"
            )
        if image.dtype != np.uint8:
            raise ValueError(f"{name}: expected dtype uint8 (0-255), got {image.dtype}")
        if image_format != self.model.image_format:
            image = np.ascontiguousarray(image[..., ::-1])
        if self.device.type == "cuda":  # PIL's resize, the same bytes, on the GPU
            image = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            resized = self.transform.apply_image_uint8_torch(image)
        else:
            resized = torch.from_numpy(np.array(self.transform.apply_image(image))).to(self.device)
        return resized.permute(2, 0, 1).contiguous()[None]  # HxWxC -> 1xCxHxW

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float, device=self.device)

    def _require_image(self, purpose: str) -> None:
        if not self.is_image_set or self.features is None:
            raise RuntimeError(f"An image must be set with .set_image(...) {purpose}.")


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.float()  # bf16/fp16 models still give float32 arrays
    return tensor.cpu().numpy()


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    return np.dtype(np.float32) if tensor.is_floating_point() else np.dtype(np.bool_)
