"""Checkpoints: read, check, save and convert the official, Hugging Face and samkit formats.

- official: a flat state_dict pickled by torch.save (`sam_vit_b_01ec64.pth`, ...), read with
  `weights_only=True` (a pickle that would run code is refused, never executed);
- hf: `transformers` SamModel weights (`model.safetensors` or `pytorch_model.bin`);
- samkit: safetensors with official key names and the model config in its metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from samkit.config import (
    ImageEncoderConfig,
    MaskDecoderConfig,
    PromptEncoderConfig,
    SamConfig,
    variant_name,
)
from samkit.io import open_temp_beside, write_atomic
from samkit.keys import hf_config, hf_to_official, official_to_hf

CheckpointFormat = Literal["official", "hf", "samkit"]
FORMATS: tuple[str, ...] = ("official", "hf", "samkit")
SAMKIT_FORMAT_TAG = "samkit"
HF_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_KEYS = ("model", "state_dict")  # training scripts often nest the weights


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a one-line message naming the file."""


@dataclass
class Checkpoint:
    """Weights in the official key layout, where they came from, and their config."""

    state_dict: dict[str, torch.Tensor]
    source_format: CheckpointFormat
    config: SamConfig
    path: Path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any supported checkpoint; keys come back in the official layout.

    The config is the one stored in a samkit file, else inferred from the tensor shapes.
    """
    path = _resolve(Path(path))
    tensors, metadata = _read_tensors(path)
    if metadata.get("format") == SAMKIT_FORMAT_TAG:
        config = SamConfig.from_dict(json.loads(metadata["config"]))
        return Checkpoint(tensors, "samkit", config, path)
    if any(key.startswith("image_encoder.") for key in tensors):
        source: CheckpointFormat = "official"
    elif any(key.startswith("vision_encoder.") for key in tensors):
        tensors, source = hf_to_official(tensors), "hf"
    else:
        raise CheckpointError(
            f"{path}: not a SAM checkpoint (no image encoder weights; "
            f"first keys: {_few(sorted(tensors))})"
        )
    return Checkpoint(tensors, source, infer_config(tensors, path), path)


def _resolve(path: Path) -> Path:
    if path.is_dir():  # a Hugging Face model folder
        for name in HF_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder without {' or '.join(HF_FILE_NAMES)}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    return path


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with path.open("rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: damaged safetensors file ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # the pickle names a callable to run
            raise CheckpointError(
                f"{path}: refused: this pickle needs code execution to load "
                "(only plain tensor checkpoints are read; nothing was executed)"
            ) from None
        raise CheckpointError(f"{path}: not a checkpoint (not a tensor pickle)") from None
    except Exception as e:  # torch.load fails in many ways on foreign bytes
        raise CheckpointError(f"{path}: not a checkpoint ({_first_line(e)})") from None
    return _as_state_dict(obj, path), {}


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping) and len(obj) <= 4:
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a checkpoint (holds {type(obj).__name__}, no tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: not a checkpoint (a mapping without tensors)")
    return tensors


def infer_config(state_dict: Mapping[str, torch.Tensor], path: Path | str = "") -> SamConfig:
    """The model config that official-layout weights of these shapes belong to."""
    try:
        return _infer_config(state_dict)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        what = f"no {e.args[0]}" if isinstance(e, KeyError) else _first_line(e)
        raise CheckpointError(f"{path}: cannot tell the model from its tensors ({what})") from None


def _infer_config(sd: Mapping[str, torch.Tensor]) -> SamConfig:
    enc = "image_encoder."
    patch = sd[enc + "patch_embed.proj.weight"]  # C x 3 x p x p
    embed_dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = _count(sd, enc + "blocks.")
    pos = sd.get(enc + "pos_embed")
    use_rel_pos = enc + "blocks.0.attn.rel_pos_h" in sd
    if use_rel_pos:
        head_dim = sd[enc + "blocks.0.attn.rel_pos_h"].shape[1]
        sides = [(sd[f"{enc}blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in range(depth)]
    else:
        head_dim, sides = 64, []
    grid = pos.shape[1] if pos is not None else max(sides)
    global_blocks = tuple(i for i, side in enumerate(sides) if side == grid)
    window = next((side for side in sides if side != grid), 0)
    mlp_dim = sd[enc + "blocks.0.mlp.lin1.weight"].shape[0]
    image_encoder = ImageEncoderConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        mlp_ratio=mlp_dim / embed_dim,
        out_chans=sd[enc + "neck.0.weight"].shape[0],
        window_size=window,
        global_attn_indexes=global_blocks,
        qkv_bias=enc + "blocks.0.attn.qkv.bias" in sd,
        use_abs_pos=pos is not None,
        use_rel_pos=use_rel_pos,
    )
    prompt = PromptEncoderConfig(
        embed_dim=sd["prompt_encoder.no_mask_embed.weight"].shape[1],
        mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
    )
    dec = "mask_decoder."
    dim = sd[dec + "iou_token.weight"].shape[1]
    cross_q = sd[dec + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight"]
    decoder = MaskDecoderConfig(
        transformer_dim=dim,
        transformer_depth=_count(sd, dec + "transformer.layers."),
        num_heads=MaskDecoderConfig.num_heads,  # not visible in shapes; every SAM uses 8
        mlp_dim=sd[dec + "transformer.layers.0.mlp.lin1.weight"].shape[0],
        attention_downsample_rate=dim // cross_q.shape[0],
        num_multimask_outputs=sd[dec + "mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=_count(sd, dec + "iou_prediction_head.layers."),
        iou_head_hidden_dim=sd[dec + "iou_prediction_head.layers.0.weight"].shape[0],
    )
    return SamConfig(image_encoder=image_encoder, prompt_encoder=prompt, mask_decoder=decoder)


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    if not indices:
        raise KeyError(f"no {prefix}* tensors")
    return max(indices) + 1


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    path: Path | str,
    looks_like: str,
) -> None:
    """Raise a one-line CheckpointError unless keys and shapes match `expected` exactly."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        raise CheckpointError(f"{path}: {'; '.join(parts)}; the file looks like {looks_like}")
    wrong = [k for k in expected if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if wrong:
        first = wrong[0]
        raise CheckpointError(
            f"{path}: shape mismatch for {len(wrong)} tensors, e.g. {first} is "
            f"{tuple(state_dict[first].shape)}, the model wants {tuple(expected[first].shape)}; "
            f"the file looks like {looks_like}"
        )


def describe(config: SamConfig) -> str:
    """'vit_b', or a short description of a custom model, for messages."""
    name = variant_name(config)
    if name:
        return name
    if variant_name(config.with_image_size(1024)):
        return f"{variant_name(config.with_image_size(1024))} at {config.image_size}px"
    enc = config.image_encoder
    return (
        f"a custom model (width {enc.embed_dim}, depth {enc.depth}, {enc.num_heads} heads, "
        f"input {enc.img_size})"
    )


def same_architecture(a: SamConfig, b: SamConfig) -> bool:
    """Equal but for the input size and the decoder's head count (invisible in the weights)."""

    def key(config: SamConfig) -> SamConfig:
        decoder = dataclasses.replace(config.mask_decoder, num_heads=0)
        return dataclasses.replace(config.with_image_size(0), mask_decoder=decoder)

    return key(a) == key(b)


def resize_position_tables(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Interpolate pos_embed (bicubic) and rel-pos tables (linear) to the model's input size.

    Other tensors pass through untouched; shape checks happen afterwards.
    """
    out = dict(state_dict)
    for key, tensor in state_dict.items():
        want = expected.get(key)
        if want is None or want.shape == tensor.shape or tensor.ndim != want.ndim:
            continue
        if key.endswith("pos_embed") and tensor.shape[-1] == want.shape[-1]:
            grid = tensor.permute(0, 3, 1, 2).float()  # 1xHxWxC -> 1xCxHxW
            grid = F.interpolate(grid, want.shape[1:3], mode="bicubic", align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(tensor.dtype)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and tensor.shape[1] == want.shape[1]:
            table = tensor.T[None].float()  # L x d -> 1 x d x L
            table = F.interpolate(table, want.shape[0], mode="linear", align_corners=False)
            out[key] = table[0].T.to(tensor.dtype)
    return out


def checkpoint_destination(path: str | os.PathLike, fmt: CheckpointFormat) -> Path:
    """The file `save_checkpoint(..., path, fmt)` writes.

    A folder (an existing one, a path ending in a separator, or for `hf` a path without a
    suffix) gets the Hugging Face layout's `model.safetensors` inside it for `hf`, and is an
    error for the single-file formats.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    text = os.fspath(path)
    target = Path(text)
    folder = target.is_dir() or text.endswith(("/", os.sep))
    if fmt == "hf" and (folder or not (target.suffix or target.exists())):
        return target / HF_FILE_NAMES[0]
    if folder:
        example = target / ("model.pth" if fmt == "official" else "model.safetensors")
        raise CheckpointError(f"{text} is a folder; give the file to write, e.g. {example}")
    return target


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    fmt: CheckpointFormat,
    config: SamConfig | None = None,
) -> Path:
    """Write official-layout weights as `fmt`; atomic (a temp file, then a rename)."""
    path = checkpoint_destination(path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp, fd = open_temp_beside(path)
    mode = os.fstat(fd).st_mode  # what the umask gives a new file
    os.close(fd)  # the writers below open the path again (safetensors makes it anew, 0600)
    try:
        if fmt == "official":
            torch.save(tensors, tmp)
        elif fmt == "hf":
            save_file(official_to_hf(tensors), tmp, metadata={"format": "pt"})
            config = config or infer_config(tensors, path)
            # beside the weights, so that transformers' SamModel.from_pretrained opens the folder
            config_json = json.dumps(hf_config(config), indent=2) + "\n"
            write_atomic(path.parent / "config.json", config_json)
        else:
            config = config or infer_config(tensors, path)
            metadata = {"format": SAMKIT_FORMAT_TAG, "config": json.dumps(config.to_dict())}
            save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, stat.S_IMODE(mode))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, fmt: CheckpointFormat
) -> Checkpoint:
    """Read any checkpoint, check it against the model it describes, write it as `fmt`."""
    from samkit.build import expected_state_dict  # the builder imports this module

    ckpt = read_checkpoint(src)
    check_state_dict(
        ckpt.state_dict, expected_state_dict(ckpt.config), ckpt.path, describe(ckpt.config)
    )
    save_checkpoint(ckpt.state_dict, dst, fmt, ckpt.config)
    return ckpt


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
