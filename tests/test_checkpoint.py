"""Checkpoints: the three formats, variant detection, resizing, conversion and every error."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import torch

import samkit
from samkit.build import build_sam, expected_state_dict, load_sam
from samkit.checkpoint import CheckpointError, infer_config, read_checkpoint, save_checkpoint
from samkit.config import VARIANTS

from reference import TINY, assert_close_scaled, hf_reference, random_sam


@pytest.fixture(scope="module")
def tiny_model():
    return random_sam(TINY, seed=5)


@pytest.fixture(scope="module")
def tiny_files(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    state = tiny_model.state_dict()
    return {
        fmt: save_checkpoint(state, folder / f"tiny.{fmt}", fmt, TINY)
        for fmt in ("official", "hf", "samkit")
    }


def _assert_same_weights(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("fmt", ["official", "hf", "samkit"])
def test_every_format_loads_back_exactly(tiny_model, tiny_files, fmt):
    model = load_sam(tiny_files[fmt])  # auto-detected: TINY is no named variant
    assert model.config == TINY
    _assert_same_weights(model, tiny_model.state_dict())
    assert read_checkpoint(tiny_files[fmt]).source_format == fmt


def test_official_file_is_a_flat_state_dict(tiny_model, tiny_files):
    raw = torch.load(tiny_files["official"], weights_only=True)
    assert set(raw) == set(tiny_model.state_dict())


def test_hf_file_loads_strictly_into_transformers(tiny_model, tiny_files):
    from safetensors.torch import load_file

    hf = hf_reference(TINY, tiny_model.state_dict())
    theirs = load_file(tiny_files["hf"])
    # strict=True inside hf_reference already checked names; here the file itself
    assert set(theirs) == set(hf.state_dict())
    hf.load_state_dict(theirs, strict=True)


def test_transformers_save_pretrained_folder_loads(tiny_model, tmp_path):
    hf = hf_reference(TINY, tiny_model.state_dict())
    hf.save_pretrained(tmp_path / "sam-tiny")  # may store the tied Gaussian matrix once
    model = load_sam(tmp_path / "sam-tiny")
    _assert_same_weights(model, tiny_model.state_dict())


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_variant_detected_from_shapes(name):
    assert infer_config(expected_state_dict(VARIANTS[name])) == VARIANTS[name]


def test_tiny_config_detected_from_shapes():
    assert infer_config(expected_state_dict(TINY)) == TINY


@pytest.mark.slow
def test_registry_loads_official_vit_b_file(tmp_path):
    model = random_sam(VARIANTS["vit_b"], seed=7)
    path = save_checkpoint(model.state_dict(), tmp_path / "sam_vit_b_01ec64.pth", "official")
    loaded = samkit.sam_model_registry["vit_b"](checkpoint=path)
    assert {"image_encoder", "prompt_encoder", "mask_decoder"} <= set(dict(loaded.named_children()))
    _assert_same_weights(loaded, model.state_dict())
    assert load_sam(path).config == VARIANTS["vit_b"]  # auto-detection on a real file
    with pytest.raises(CheckpointError, match=r"holds vit_b weights, not vit_l"):
        samkit.sam_model_registry["vit_l"](checkpoint=path)
    with pytest.raises(CheckpointError, match=r"holds vit_b weights, not vit_h"):
        samkit.sam_model_registry["default"](checkpoint=path)


def test_registry_keys():
    assert set(samkit.sam_model_registry) == {"default", "vit_h", "vit_l", "vit_b"}


def test_model_for_another_image_size_interpolates_position_tables(tiny_model, tiny_files):
    model = load_sam(tiny_files["official"], image_size=224)  # 10x10 tokens -> 14x14
    assert model.config.image_size == 224
    pos = model.image_encoder.pos_embed
    assert pos.shape == (1, 14, 14, 32)
    global_block = model.image_encoder.blocks[1].attn
    assert global_block.rel_pos_h.shape == (27, 16)
    windowed = model.image_encoder.blocks[0].attn  # window tables keep their size
    torch.testing.assert_close(
        windowed.rel_pos_h, tiny_model.image_encoder.blocks[0].attn.rel_pos_h
    )
    # a smooth resize keeps the range and the corners of the original table
    old = tiny_model.image_encoder.pos_embed
    assert pos.abs().max() <= old.abs().max() * 1.3
    with torch.no_grad():
        out = model.image_encoder(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 32, 14, 14) and torch.isfinite(out).all()


def test_same_size_build_is_identity(tiny_model, tiny_files):
    _assert_same_weights(build_sam(TINY, tiny_files["samkit"]), tiny_model.state_dict())


# ---- errors: one line, naming the file ----


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_sam(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.pth")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "empty.pth")


@pytest.mark.parametrize(
    "content", [b"this is a text file, not weights\n" * 3, bytes(range(256)) * 40]
)
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    assert "not a checkpoint" in _error(path)


def test_pickle_of_something_else(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "not a checkpoint" in _error(tmp_path / "list.pth")


def test_unrelated_state_dict(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    assert "not a SAM checkpoint" in _error(tmp_path / "other.pth")


class _Payload:
    """Unpickling this creates a file: a stand-in for arbitrary code execution."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_code_executing_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _Payload(marker)}, path)
    message = _error(path)
    assert "refused" in message and "code execution" in message
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it (in a child process)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    assert marker.exists()


def test_missing_and_unexpected_keys_are_listed(tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    for key in [k for k in state if "blocks.2." in k and "rel_pos" not in k][:5]:
        del state[key]
    state["extra.one"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    message = _error(path)  # auto: the config is inferred, then keys checked against it
    assert "5 missing keys" in message and "and 2 more" in message
    assert "1 unexpected keys (extra.one)" in message


def test_shape_mismatch_says_what_the_file_looks_like(tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    state["image_encoder.neck.2.weight"] = torch.zeros(32, 32, 1, 1)  # should be 3x3
    torch.save(state, tmp_path / "odd.pth")
    message = _error(tmp_path / "odd.pth")
    assert "shape mismatch" in message and "image_encoder.neck.2.weight" in message
    assert "looks like a custom model" in message


def test_wrong_variant_names_the_file_variant(tiny_files):
    message = _error(tiny_files["official"], model_type="vit_b")
    assert "holds a custom model (width 32, depth 3" in message and "not vit_b" in message


def test_damaged_safetensors(tiny_files, tmp_path):
    data = tiny_files["samkit"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    assert "damaged safetensors" in _error(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_files_get_the_umask_permissions_and_leave_no_temp_files(tiny_model, tmp_path):
    """A checkpoint is written to a temp file first; the renamed file must get the permissions
    of any new file (0666 less the umask), not the temp file's private 0600."""
    previous = os.umask(0o022)
    try:
        for fmt in ("official", "hf", "samkit"):
            path = save_checkpoint(tiny_model.state_dict(), tmp_path / fmt / "w.bin", fmt, TINY)
            for written in path.parent.iterdir():
                assert not written.name.startswith("."), written
                assert stat.S_IMODE(written.stat().st_mode) == 0o644, written
    finally:
        os.umask(previous)


# ---- samkit convert ----


def _samkit(*args):
    return subprocess.run(
        [sys.executable, "-m", "samkit", *map(str, args)], capture_output=True, text=True
    )


def test_convert_round_trip_through_every_format(tiny_model, tiny_files, tmp_path):
    hf = tmp_path / "a" / "model.safetensors"
    native = tmp_path / "b.safetensors"
    back = tmp_path / "c.pth"
    for src, dst, fmt in [
        (tiny_files["official"], hf, "hf"),
        (hf, native, "samkit"),
        (native, back, "official"),
    ]:
        result = _samkit("convert", src, dst, "--format", fmt)
        assert result.returncode == 0, result.stderr
        assert f"({fmt})" in result.stdout
    _assert_same_weights(load_sam(back), tiny_model.state_dict())
    assert load_sam(hf.parent).config == TINY  # the folder form of a HF checkpoint
    # and transformers opens that folder itself (config.json written beside the weights)
    from transformers import SamModel

    theirs = SamModel.from_pretrained(hf.parent)
    ours_hf = hf_reference(TINY, tiny_model.state_dict()).state_dict()
    for key, tensor in theirs.state_dict().items():
        torch.testing.assert_close(tensor, ours_hf[key], rtol=0, atol=0, msg=key)


def test_convert_user_errors_are_one_line(tmp_path, tiny_files):
    result = _samkit("convert", tmp_path / "missing.pth", tmp_path / "out.pth", "--format", "hf")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr
    assert "Traceback" not in result.stderr
    result = _samkit("convert", "a", "b", "--format", "onnx")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    (tmp_path / "file").write_text("in the way")
    result = _samkit(
        "convert", tiny_files["official"], tmp_path / "file" / "w.pth", "--format", "official"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"samkit convert: error: cannot write {tmp_path / 'file' / 'w.pth'}: File exists"
    )


def test_hf_output_to_a_folder_and_single_files_not_to_one(tiny_model, tiny_files, tmp_path):
    """--format hf into a folder (existing, with a trailing slash, or a new name without a
    suffix) writes the transformers layout inside it; the single-file formats refuse a folder
    in one line instead of a traceback from the rename."""
    (tmp_path / "there").mkdir()
    for out in [tmp_path / "there", f"{tmp_path / 'slash'}/", tmp_path / "new"]:
        result = _samkit("convert", tiny_files["official"], out, "--format", "hf")
        assert result.returncode == 0, result.stderr
        folder = pathlib.Path(out)
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        assert f"-> {folder / 'model.safetensors'} (hf)" in result.stdout
        _assert_same_weights(load_sam(folder), tiny_model.state_dict())
    for fmt, example in [("official", "model.pth"), ("samkit", "model.safetensors")]:
        result = _samkit("convert", tiny_files["official"], tmp_path / "there", "--format", fmt)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().endswith(
            f"is a folder; give the file to write, e.g. {tmp_path / 'there' / example}"
        )
    with pytest.raises(CheckpointError, match="is a folder"):
        save_checkpoint(tiny_model.state_dict(), f"{tmp_path / 'other'}/", "samkit", TINY)


def test_device_is_checked_before_the_checkpoint_is_read(tmp_path):
    missing = tmp_path / "missing.pth"  # read first, this would raise FileNotFoundError
    with pytest.raises(ValueError, match="device 'tpu': expected 'auto', 'cpu'"):
        load_sam(missing, device="tpu")
    with pytest.raises(ValueError, match=r"device 'cuda:99': .*CUDA"):  # none, or too few
        load_sam(missing, device="cuda:99")
    assert build_sam(TINY, device="auto").device.type in ("cpu", "cuda", "mps")


def test_convert_help_has_examples():
    result = _samkit("convert", "--help")
    assert result.returncode == 0 and "examples:" in result.stdout


def test_low_precision_load(tiny_files):
    model = load_sam(tiny_files["official"], dtype=torch.bfloat16)
    assert model.image_encoder.pos_embed.dtype == torch.bfloat16
    reference = load_sam(tiny_files["official"])
    with torch.no_grad():
        image = torch.randn(1, 3, 160, 160)
        low = model.image_encoder(image.bfloat16()).float()
        assert_close_scaled(low, reference.image_encoder(image), rel=0.1)  # bf16: 8-bit mantissa


def test_config_round_trip():
    data = dataclasses.asdict(TINY)
    assert samkit.SamConfig.from_dict(data) == TINY
