"""Pieces shared by the subcommands: user errors, argument types, help formatting."""

from __future__ import annotations

import argparse


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user gave something unusable (never shown as a traceback)."""
    from samkit.checkpoint import CheckpointError

    errors: list[type[BaseException]] = [UserError, CheckpointError, FileNotFoundError]
    try:
        from samkit.io import ImageReadError

        errors.append(ImageReadError)
    except ImportError:  # io arrives with the predictor
        pass
    return tuple(errors)


def add_command(
    subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """A subcommand parser whose --help ends with examples."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_device(text: str):
    """--device: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', checked against this machine."""
    from samkit.build import resolve_device

    try:
        device = resolve_device(text)
    except ValueError as e:
        raise UserError(f"--{e}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {text!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def output_folder(path, flag: str = "--out"):
    """The output folder, made if missing; a one-line UserError where it cannot be."""
    from pathlib import Path

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: a file is in the way; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot make the folder ({e.strerror or e})") from None
    return folder
