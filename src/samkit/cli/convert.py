"""`samkit convert`: between the official, Hugging Face and samkit checkpoint formats."""

from __future__ import annotations

import argparse

from samkit.checkpoint import FORMATS, checkpoint_destination, convert_checkpoint, describe
from samkit.cli.common import UserError, add_command

EXAMPLES = """\
  samkit convert sam_vit_b_01ec64.pth sam_vit_b.safetensors --format samkit
  samkit convert sam-vit-base/model.safetensors sam_vit_b.pth --format official
  samkit convert sam_vit_b_01ec64.pth hf/model.safetensors --format hf
  samkit convert sam_vit_b_01ec64.pth sam-vit-base/ --format hf   # the folder layout
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "convert",
        help="convert a checkpoint between formats",
        description=(
            "Read a SAM checkpoint in any supported format (official .pth, Hugging Face "
            "model.safetensors / pytorch_model.bin or their folder, samkit .safetensors), check "
            "it against the model it describes, and write it in another format."
        ),
        examples=EXAMPLES,
    )
    parser.add_argument("input", metavar="IN", help="checkpoint file (or Hugging Face folder)")
    parser.add_argument(
        "output",
        metavar="OUT",
        help="file to write; for --format hf a folder takes model.safetensors and config.json",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="official: flat state_dict .pth; hf: transformers SamModel safetensors; "
        "samkit: safetensors with the config in its metadata",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    destination = checkpoint_destination(args.output, args.format)
    try:
        ckpt = convert_checkpoint(args.input, destination, args.format)
    except OSError as e:  # reading errors are CheckpointErrors: this is the writing side
        raise UserError(f"cannot write {destination}: {e.strerror or e}") from None
    print(
        f"{ckpt.path} ({ckpt.source_format}, {describe(ckpt.config)}, "
        f"{len(ckpt.state_dict)} tensors) -> {destination} ({args.format})"
    )
    return 0
