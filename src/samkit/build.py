"""Building SAM models: one builder, the official-compatible registry, auto-detecting loading."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from samkit.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_state_dict,
    describe,
    read_checkpoint,
    resize_position_tables,
    same_architecture,
)
from samkit.config import VARIANTS, SamConfig, variant_config
from samkit.modeling import Sam

PathLike = str | os.PathLike


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) picks CUDA, then Apple MPS, then the CPU; any other device is checked
    against this machine.

    Raises:
        ValueError: not a device name, or a CUDA/MPS device this machine does not have.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device {device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if (resolved.index or 0) >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
    if resolved.type == "mps" and not _mps_available():
        raise ValueError(f"device {device!r}: Apple MPS is not available on this machine")
    return resolved


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def expected_state_dict(config: SamConfig) -> dict[str, torch.Tensor]:
    """The keys and shapes a model of `config` has, as meta tensors (allocates nothing)."""
    with torch.device("meta"):
        return Sam(config).state_dict()


def build_sam(
    config: SamConfig | str = "vit_h",
    checkpoint: PathLike | Checkpoint | None = None,
    *,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
) -> Sam:
    """A SAM model of `config` (a SamConfig or a variant name), random or from `checkpoint`.

    The checkpoint (a path in any supported format, or what `read_checkpoint` gave) must match
    the config, except for the input size: pos_embed and the rel-pos tables are interpolated to
    the config's image size.
    """
    device = resolve_device(device)  # before reading a checkpoint of gigabytes
    if isinstance(config, str):
        config = variant_config(config)
    if checkpoint is None:
        model = Sam(config)
    else:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        if not same_architecture(ckpt.config, config):
            raise CheckpointError(
                f"{ckpt.path}: holds {describe(ckpt.config)} weights, not {describe(config)} "
                "(load it with model type 'auto')"
            )
        expected = expected_state_dict(config)
        state_dict = resize_position_tables(ckpt.state_dict, expected)
        check_state_dict(state_dict, expected, ckpt.path, describe(ckpt.config))
        with torch.device("meta"):
            model = Sam(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.reset_pixel_stats()
    model.eval()
    return model.to(device=device, dtype=dtype)


def load_sam(
    checkpoint: PathLike,
    model_type: str = "auto",
    *,
    image_size: int | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
) -> Sam:
    """Load a checkpoint, detecting the variant from its tensors when `model_type` is 'auto'.

    `image_size` builds the model for another input side than the checkpoint's.
    """
    device = resolve_device(device)  # before reading a checkpoint of gigabytes
    if model_type == "auto":
        ckpt = read_checkpoint(checkpoint)  # read once: build_sam takes it as it is
        config, checkpoint = ckpt.config, ckpt
    else:
        config = variant_config(model_type)
    if image_size is not None:
        config = config.with_image_size(image_size)
    return build_sam(config, checkpoint, device=device, dtype=dtype)


def _registry_builder(name: str) -> Callable[..., Sam]:
    def build(checkpoint: PathLike | None = None) -> Sam:
        return build_sam(name, checkpoint)

    build.__name__ = f"build_sam_{name}"
    build.__doc__ = f"The official `{name}` model, random or loaded from `checkpoint`."
    return build


# official-compatible: sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")
sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": _registry_builder("vit_h"),
    **{name: _registry_builder(name) for name in VARIANTS},
}
build_sam_vit_h = sam_model_registry["vit_h"]
build_sam_vit_l = sam_model_registry["vit_l"]
build_sam_vit_b = sam_model_registry["vit_b"]

__all__ = [
    "CheckpointError",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "expected_state_dict",
    "load_sam",
    "resolve_device",
    "sam_model_registry",
]
