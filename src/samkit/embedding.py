"""Image embeddings as records and files: encode an image once, prompt it later.

A file is safetensors with the tensor "features" (1, C, h, w), a small "model_probe" tensor
(a few of the encoder's weights) and metadata: original and input sizes, a digest of the model
input image, and the config of the model that computed it. Loading into a model of another
config or with other weights is refused with a one-line error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from samkit.checkpoint import describe
from samkit.config import SamConfig
from samkit.modeling import Sam

EMBEDDING_FORMAT = "samkit-embedding"
FORMAT_VERSION = "1"
# weights spread over the encoder (first, last block, neck): they tell checkpoints apart cheaply
_PROBE_KEYS = (
    "image_encoder.patch_embed.proj.bias",
    "image_encoder.blocks.0.norm1.weight",
    "image_encoder.blocks.{last}.mlp.lin2.bias",
    "image_encoder.neck.1.weight",
    "image_encoder.neck.3.weight",
    "image_encoder.neck.3.bias",
)
# the probe is compared with a tolerance so that a bf16/fp16 copy of the same weights matches
_PROBE_RTOL = 1e-2


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; one line naming the file."""


class EmbeddingMismatchError(EmbeddingError):
    """A valid embedding file computed by another model, or for another image."""


@dataclass(frozen=True)
class ImageEmbedding:
    """What the predictor keeps of an encoded image.

    features: (1, C, h, w) image embedding. original_size: (H, W) of the image as given.
    input_size: (h', w') of the resized image inside the square model input.
    image_digest: `image_digest` of the model input image, if known.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    image_digest: str | None = None


def image_digest(image: torch.Tensor) -> str:
    """sha256 of an image tensor's dtype, shape and values, to recognise it later."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def model_probe(model: Sam) -> torch.Tensor:
    """A few encoder weights, flattened to float32 (a fingerprint of the checkpoint)."""
    last = model.config.image_encoder.depth - 1
    state = model.state_dict()
    keys = [key.format(last=last) for key in _PROBE_KEYS]
    return torch.cat([state[key].detach().float().cpu().flatten() for key in keys if key in state])


def save_embedding(path: str | os.PathLike, embedding: ImageEmbedding, model: Sam) -> Path:
    """Write `embedding`, computed by `model`, to a safetensors file (atomically)."""
    from samkit.io import write_atomic  # io pulls in PIL; only needed when writing

    features = embedding.features
    if features.ndim != 4 or features.shape[0] != 1:
        raise ValueError(f"features: expected shape (1, C, h, w), got {tuple(features.shape)}")
    tensors = {
        "features": features.detach().contiguous().cpu(),
        "model_probe": model_probe(model),
    }
    metadata = {
        "format": EMBEDDING_FORMAT,
        "version": FORMAT_VERSION,
        "original_size": json.dumps([int(s) for s in embedding.original_size]),
        "input_size": json.dumps([int(s) for s in embedding.input_size]),
        "image_digest": embedding.image_digest or "",
        "model": describe(model.config),
        "config": json.dumps(model.config.to_dict()),
    }
    path = Path(path)
    write_atomic(path, save(tensors, metadata=metadata))
    return path


def load_embedding(
    path: str | os.PathLike, model: Sam, *, image_digest: str | None = None
) -> ImageEmbedding:
    """Read an embedding file for `model`; features come on the model's device and dtype.

    Raises:
        EmbeddingError: missing or damaged file, or not an embedding.
        EmbeddingMismatchError: computed by a model of another config or with other weights,
            or, when `image_digest` is given, for another image.
    """
    path = Path(path)
    tensors, metadata = _read(path)
    try:
        saved_config = SamConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise EmbeddingError(f"{path}: damaged embedding file (bad config)") from None
    if saved_config != model.config:
        raise EmbeddingMismatchError(
            f"{path}: embedding computed by {describe(saved_config)}, but this model is "
            f"{describe(model.config)}; encode the image again with this model"
        )
    probe, expected = tensors["model_probe"].float(), model_probe(model)
    if probe.shape != expected.shape or not torch.allclose(
        probe, expected, rtol=_PROBE_RTOL, atol=_PROBE_RTOL * expected.abs().max().item()
    ):
        raise EmbeddingMismatchError(
            f"{path}: embedding computed by another {describe(model.config)} checkpoint "
            "(its weights differ from this model's); encode the image again with this model"
        )
    saved_digest = metadata.get("image_digest") or None
    if image_digest is not None and saved_digest != image_digest:
        raise EmbeddingMismatchError(
            f"{path}: embedding computed for another image; encode this image again"
        )
    features = tensors["features"].to(device=model.device, dtype=model.dtype)
    return ImageEmbedding(
        features=features,
        original_size=_size(metadata, "original_size", path),
        input_size=_size(metadata, "input_size", path),
        image_digest=saved_digest,
    )


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EmbeddingError(f"{path}: no such file") from None
    except OSError as e:
        raise EmbeddingError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        tensors = load(data)
        with io.BytesIO(data) as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (SafetensorError, ValueError, OSError, UnicodeDecodeError) as e:
        raise EmbeddingError(
            f"{path}: not a samkit embedding file (not safetensors: {str(e)[:80]})"
        ) from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != EMBEDDING_FORMAT or "features" not in tensors:
        raise EmbeddingError(
            f"{path}: not a samkit embedding file (a safetensors file of another kind)"
        )
    if metadata.get("version") != FORMAT_VERSION:
        raise EmbeddingError(
            f"{path}: embedding file version {metadata.get('version')!r}, this samkit reads "
            f"version {FORMAT_VERSION}; encode the image again"
        )
    missing = {"config", "original_size", "input_size"} - set(metadata)
    if missing or "model_probe" not in tensors:
        raise EmbeddingError(f"{path}: damaged embedding file (missing {sorted(missing)})")
    return tensors, metadata


def _size(metadata: dict[str, str], key: str, path: Path) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in json.loads(metadata[key]))
    except (ValueError, TypeError):
        raise EmbeddingError(f"{path}: damaged embedding file (bad {key})") from None
    return h, w
