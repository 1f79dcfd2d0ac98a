"""`samkit everything`: outputs and their layouts, bad files, resuming, --overwrite, names."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from samkit.amg.export import METADATA_COLUMNS
from samkit.checkpoint import save_checkpoint
from samkit.cli import main
from samkit.cli.everything import output_names

from reference import TINY, random_sam

# thresholds 0 so that the random TINY model's masks survive
FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
FAST += ["--box-nms-thresh", "0.9", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(random_sam(TINY).state_dict(), path, "samkit", TINY)
    return str(path)


def _photos(folder: Path, names: list[str], h: int = 36, w: int = 52) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _run(inputs, out, checkpoint, *extra) -> int:
    args = ["everything", *map(str, inputs), "--checkpoint", checkpoint, "--out", str(out)]
    return main([*args, "--device", "cpu", *FAST, *extra])


def test_sa1b_layout_and_a_corrupt_file(tmp_path, checkpoint, capsys) -> None:
    _photos(tmp_path / "in", ["a.png", "b.jpg"])
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert _run([tmp_path / "in"], tmp_path / "out", checkpoint) == 1
    captured = capsys.readouterr()
    [failure] = [line for line in captured.err.splitlines() if "failed" in line]
    assert "broken.jpg" in failure
    assert "2 done, 0 skipped (output exists), 1 failed" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json", "b.json"]

    doc = json.loads((tmp_path / "out" / "a.json").read_text())
    assert doc["image"] == {"image_id": 1, "width": 52, "height": 36, "file_name": "a.png"}
    assert len(doc["annotations"]) > 0
    for i, ann in enumerate(doc["annotations"]):
        assert set(ann) == {
            "id",
            "segmentation",
            "bbox",
            "area",
            "predicted_iou",
            "stability_score",
            "crop_box",
            "point_coords",
        }
        assert ann["id"] == i and ann["crop_box"] == [0, 0, 52, 36]
        rle = ann["segmentation"]
        assert rle["size"] == [36, 52] and isinstance(rle["counts"], str)
        mask = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert mask.sum() == ann["area"]
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert len(ann["point_coords"]) == 1 and len(ann["point_coords"][0]) == 2


def test_png_layout_and_overlay(tmp_path, checkpoint) -> None:
    _photos(tmp_path, ["img.png"])
    out = tmp_path / "out"
    assert _run([tmp_path / "img.png"], out, checkpoint, "--format", "png", "--overlay") == 0
    folder = out / "img"
    with open(folder / "metadata.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == METADATA_COLUMNS
    masks = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
    assert [p.name for p in masks] == [f"{i}.png" for i in range(len(rows) - 1)]
    for row, png in zip(rows[1:], masks, strict=True):
        mask = np.asarray(Image.open(png))
        assert mask.shape == (36, 52) and set(np.unique(mask)) <= {0, 255}
        assert int(row[0]) == int(png.stem) and int(row[1]) == (mask == 255).sum()
        assert [int(v) for v in row[10:]] == [0, 0, 52, 36]
    overlay = np.asarray(Image.open(out / "img.overlay.png"))
    assert overlay.shape == (36, 52, 3)
    assert not list(out.glob(".*"))  # no temp files left behind


def test_resume_skips_done_images_and_overwrite_redoes_them(tmp_path, checkpoint, capsys) -> None:
    _photos(tmp_path / "in", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    assert _run([tmp_path / "in" / "a.png", tmp_path / "in" / "b.png"], out, checkpoint) == 0
    old = 1_000_000_000
    for name in ["a.json", "b.json"]:
        os.utime(out / name, (old, old))
    capsys.readouterr()

    assert _run([tmp_path / "in"], out, checkpoint) == 0  # the half-done folder
    assert "1 done, 2 skipped" in capsys.readouterr().out
    assert [int((out / n).stat().st_mtime) for n in ["a.json", "b.json"]] == [old, old]
    assert (out / "c.json").is_file()

    assert _run([tmp_path / "in"], out, checkpoint, "--overwrite") == 0
    assert "3 done, 0 skipped" in capsys.readouterr().out
    assert all(int((out / n).stat().st_mtime) > old for n in ["a.json", "b.json"])


def test_png_folders_resume_and_overwrite(tmp_path, checkpoint, capsys) -> None:
    _photos(tmp_path, ["x.png"])
    out = tmp_path / "out"
    assert _run([tmp_path / "x.png"], out, checkpoint, "--format", "png") == 0
    (out / "x" / "marker").write_text("")  # a folder from an earlier run
    assert _run([tmp_path / "x.png"], out, checkpoint, "--format", "png") == 0
    assert (out / "x" / "marker").exists()
    assert _run([tmp_path / "x.png"], out, checkpoint, "--format", "png", "--overwrite") == 0
    assert not (out / "x" / "marker").exists() and (out / "x" / "metadata.csv").is_file()
    assert "1 done" in capsys.readouterr().out
    assert not list(out.glob(".*"))


def test_same_stems_get_distinct_names(tmp_path, checkpoint) -> None:
    paths = _photos(tmp_path / "in", ["a/x.png", "b/x.jpg", "b/y.png", "b/y.jpg", "z.png"])
    names = output_names(paths)
    assert list(names.values()) == ["a/x", "b/x", "b/y.png", "b/y.jpg", "z"]
    assert _run([tmp_path / "in"], tmp_path / "out", checkpoint) == 0
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in tmp_path.rglob("*.json"))
    assert written == ["a/x.json", "b/x.json", "b/y.jpg.json", "b/y.png.json", "z.json"]


def test_usage_errors_exit_2(tmp_path, checkpoint, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert _run([tmp_path / "empty"], tmp_path / "out", checkpoint) == 2
    assert "no images" in capsys.readouterr().err
    _photos(tmp_path, ["a.png"])
    assert _run([tmp_path / "a.png"], tmp_path / "out", str(tmp_path / "missing.pth")) == 2
    with pytest.raises(SystemExit) as exit_info:
        _run([tmp_path / "a.png"], tmp_path / "out", checkpoint, "--points-per-side", "0")
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--points-per-side", "abc", "expected an integer, got 'abc'"),
        ("--points-per-batch", "0", "must be at least 1, got 0"),
        ("--pred-iou-thresh", "nan", "expected a finite number, got 'nan'"),
        ("--stability-score-offset", "-1", "must be in [0, inf], got -1"),
        ("--box-nms-thresh", "1.5", "must be in [0, 1], got 1.5"),
        ("--crop-nms-thresh", "x", "expected a number, got 'x'"),
        ("--crop-overlap-ratio", "1", "must be in [0, 1), got 1"),
        ("--max-mask-region-fraction", "0", "must be in (0, 1], got 0"),
    ],
)
def test_out_of_range_options_are_one_line_usage_errors(
    tmp_path, checkpoint, capsys, flag, value, message
) -> None:
    _photos(tmp_path, ["a.png"])
    with pytest.raises(SystemExit) as exit_info:
        _run([tmp_path / "a.png"], tmp_path / "out", checkpoint, flag, value)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"samkit everything: error: argument {flag}: {message}"
    assert not (tmp_path / "out").exists()


def test_help_has_examples_and_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["everything", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--overwrite" in text
    for option in ["points-per-side", "crop-overlap-ratio", "min-mask-region-area", "format"]:
        assert f"--{option}" in text


def test_fast_flag_runs(tmp_path, checkpoint, capsys) -> None:
    _photos(tmp_path / "in", ["a.png"])
    assert _run([tmp_path / "in"], tmp_path / "out", checkpoint, "--fast") == 0
    assert "1 done" in capsys.readouterr().out
    assert (tmp_path / "out" / "a.json").exists()


def test_outputs_of_many_images_match_the_generator(tmp_path, checkpoint) -> None:
    """Images read ahead and written by worker threads: each JSON holds its own image's
    records (as the generator gives them, image by image) and image id, a corrupt file in the
    middle is skipped, and every overlay is the image's."""
    from samkit import SamAutomaticMaskGenerator, load_sam
    from samkit.amg.export import overlay, sa1b_document
    from samkit.io import load_image

    names = [f"img{i}.png" for i in range(6)]
    paths = _photos(tmp_path / "in", names[:3], h=30, w=44) + _photos(
        tmp_path / "in", names[3:], h=40, w=28
    )
    (tmp_path / "in" / "img2b.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "out"
    assert _run([tmp_path / "in"], out, checkpoint, "--overlay") == 1
    generator = SamAutomaticMaskGenerator(
        load_sam(checkpoint),
        points_per_side=4,
        pred_iou_thresh=0,
        stability_score_thresh=0,
        box_nms_thresh=0.9,
        output_mode="coco_rle",
    )
    order = sorted([*paths, tmp_path / "in" / "img2b.jpg"])
    for path in paths:
        image = load_image(path)
        records = generator.generate_records(image)
        want = sa1b_document(
            records,
            image_id=order.index(path) + 1,
            file_name=path.name,
            height=image.shape[0],
            width=image.shape[1],
        )
        got = json.loads((out / f"{path.stem}.json").read_text())
        assert got["image"] == want["image"]
        assert len(got["annotations"]) == len(want["annotations"]) > 0
        for a, b in zip(got["annotations"], want["annotations"], strict=True):
            assert a["segmentation"] == b["segmentation"] and a["bbox"] == b["bbox"]
            assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-6)
        drawn = np.asarray(Image.open(out / f"{path.stem}.overlay.png"))
        assert np.array_equal(drawn, overlay(image, records))


def test_a_failed_write_is_reported_and_the_others_go_on(tmp_path, checkpoint, capsys) -> None:
    _photos(tmp_path / "in", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    (out / "b.json").mkdir(parents=True)  # a folder where the output file must go
    assert _run([tmp_path / "in"], out, checkpoint, "--overwrite") == 1
    captured = capsys.readouterr()
    [failure] = [line for line in captured.err.splitlines() if "failed" in line]
    assert "cannot write the outputs of" in failure and "b.png" in failure
    assert "2 done, 0 skipped (output exists), 1 failed" in captured.out
    assert (out / "a.json").is_file() and (out / "c.json").is_file()
    assert not list(out.glob(".*"))  # no temp files left behind


def test_pending_outputs_stay_within_the_memory_bound(tmp_path, checkpoint, monkeypatch) -> None:
    """With no memory to spare for waiting images (PENDING_BYTES 0), each image's outputs are
    written before the next image's are queued, however many writer threads there are."""
    import threading
    import time

    from samkit.cli import everything

    running, most = 0, 0
    lock = threading.Lock()
    write = everything._write_outputs

    def slow_write(*args) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.2)  # slower than segmenting a tiny image, so writes would overlap
        try:
            write(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(everything, "_write_outputs", slow_write)
    monkeypatch.setattr(everything, "WRITERS", 3)
    monkeypatch.setattr(everything, "PENDING_BYTES", 0)
    _photos(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
    assert _run([tmp_path / "in"], tmp_path / "out", checkpoint, "--format", "png") == 0
    assert most == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "c", "d"]


def test_an_interrupted_run_keeps_what_it_segmented_and_resumes(
    tmp_path, checkpoint, capsys, monkeypatch
) -> None:
    """Ctrl-C while the third image is segmented: the two before it are written and counted,
    the exit code is 130 with a one-line summary, and the same command finishes the rest."""
    from samkit.amg.generator import SamAutomaticMaskGenerator

    generate = SamAutomaticMaskGenerator.generate_records
    calls = 0

    def interrupted(self, image):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return generate(self, image)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate_records", interrupted)
    _photos(tmp_path / "in", ["a.png", "b.png", "c.png", "d.png"])
    out = tmp_path / "out"
    assert _run([tmp_path / "in"], out, checkpoint) == 130
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "interrupted: 2 done, 0 failed, 2 left; the same command resumes" in line
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]

    assert _run([tmp_path / "in"], out, checkpoint) == 0
    assert "2 done, 2 skipped (output exists), 0 failed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json", "c.json", "d.json"]


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(
    tmp_path, checkpoint, capsys
) -> None:
    """Resuming with --out inside the walked folder must not segment the masks and overlays
    the first run wrote there."""
    _photos(tmp_path, ["a.png"])
    out = tmp_path / "masks"
    assert _run([tmp_path], out, checkpoint, "--format", "png", "--overlay") == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()

    assert _run([tmp_path], out, checkpoint, "--format", "png", "--overlay") == 0
    captured = capsys.readouterr()
    assert "0 done, 1 skipped (output exists)" in captured.out
    assert "inside the output folder" in captured.err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == written


def test_max_pixels_fails_larger_images_and_the_others_go_on(tmp_path, checkpoint, capsys) -> None:
    _photos(tmp_path / "in", ["small.png"], h=20, w=30)
    _photos(tmp_path / "in", ["large.png"], h=40, w=60)
    out = tmp_path / "out"
    assert _run([tmp_path / "in"], out, checkpoint, "--max-pixels", "1000") == 1
    captured = capsys.readouterr()
    [failure] = [line for line in captured.err.splitlines() if "failed" in line]
    assert "large.png" in failure and "2,400 pixels, over the limit of 1,000" in failure
    assert "--max-pixels" in failure
    assert sorted(p.name for p in out.iterdir()) == ["small.json"]


def test_a_file_as_the_output_folder_is_a_usage_error_before_any_work(
    tmp_path, checkpoint, capsys
) -> None:
    _photos(tmp_path, ["a.png"])
    (tmp_path / "out").write_text("not a folder")
    assert _run([tmp_path / "a.png"], tmp_path / "out", checkpoint) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    prefix = f"samkit everything: error: --out {tmp_path / 'out'}: "
    assert line == prefix + "a file is in the way; give a folder"


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "--device 'tpu': expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        ("meta", "--device 'meta': expected auto, cpu, cuda, cuda:N or mps"),
        ("cuda:7", "--device 'cuda:7': "),
    ],
)
def test_device_errors_are_one_line_before_any_work(
    tmp_path, checkpoint, capsys, device, message
) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    _photos(tmp_path, ["a.png"])
    args = ["everything", str(tmp_path / "a.png"), "--checkpoint", checkpoint]
    assert main([*args, "--out", str(tmp_path / "out"), "--device", device]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"samkit everything: error: {message}")
    assert not (tmp_path / "out").exists()


def test_an_unexpected_error_on_one_image_fails_it_and_the_others_go_on(
    tmp_path, checkpoint, capsys, monkeypatch
) -> None:
    from samkit.amg.generator import SamAutomaticMaskGenerator

    generate = SamAutomaticMaskGenerator.generate_records

    def broken_on_b(self, image):
        if image.shape == (20, 30, 3):
            raise RuntimeError("something nobody expected")
        return generate(self, image)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate_records", broken_on_b)
    _photos(tmp_path / "in", ["a.png", "c.png"])
    _photos(tmp_path / "in", ["b.png"], h=20, w=30)
    out = tmp_path / "out"
    assert _run([tmp_path / "in"], out, checkpoint) == 1
    captured = capsys.readouterr()
    [failure] = [line for line in captured.err.splitlines() if "failed" in line]
    assert "b.png" in failure and "something nobody expected (RuntimeError" in failure
    assert "2 done, 0 skipped (output exists), 1 failed" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "c.json"]
