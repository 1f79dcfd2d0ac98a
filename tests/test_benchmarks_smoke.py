"""The benchmark scripts run end to end (tiny models, CPU, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fast", [False, True])
def test_amg_benchmark_smoke(tmp_path, fast) -> None:
    out = tmp_path / "amg.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "amg_benchmark.py"), "--tiny"]
    command += ["--fast"] if fast else []
    command += ["--device", "cpu", "--points-per-side", "4", "--runs", "1", "--worst-case"]
    command += ["--height", "120", "--width", "180", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "samkit generate" in result.stdout and "encoder only" in result.stdout
    report = json.loads(out.read_text())
    assert report["samkit_masks"] == 4 * 4 * 3  # the worst case keeps every mask
    assert report["samkit_s"] > 0 and report["encoder_s"] > 0
    assert report["fast"] is fast


def test_records_benchmark_smoke(tmp_path) -> None:
    out = tmp_path / "records.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "records_benchmark.py")]
    command += ["--device", "cpu", "--masks", "5", "--height", "60", "--width", "90"]
    command += ["--mean-run", "4", "--runs", "1", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| coco_rle |" in result.stdout and "| binary_mask |" in result.stdout
    report = json.loads(out.read_text())
    assert report["masks"] == 5 and report["size"] == [60, 90]
    assert [row["case"] for row in report["rows"]] == [
        "binary_mask",
        "uncompressed_rle",
        "coco_rle",
    ]
    assert all(row["median_s"] > 0 and row["cold_s"] > 0 for row in report["rows"])


def test_prompt_stages_smoke() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "prompt_stages.py"), "fast", "1", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "decode_masks" in result.stdout and "predict_torch" in result.stdout


def test_encoder_benchmark_smoke(tmp_path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--device", "cpu"]
    command += ["--latency", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = report["encoder"]
    assert {row["batch"] for row in rows} == {1, 2}
    assert all("error" not in row for row in rows), rows
    reference = [row for row in rows if row["impl"] == "samkit fp32 sdpa"]
    assert len(reference) == 2  # the reference path against itself: agreement 1 up to rounding
    assert all(row["cosine"] > 1 - 1e-6 and row["mask_iou"] > 0.999 for row in reference)
    assert all(row["img_per_s"] > 0 and row["ms"] > 0 for row in rows)
    latency = report["latency"]
    assert [row["impl"] for row in latency] == ["samkit fp32 (reference)", "samkit fast"]
    assert all(row["set_image_ms"] > 0 and row["prompt_numpy_ms"] > 0 for row in latency)


def test_encoder_benchmark_only_filters_rows(tmp_path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--device", "cpu"]
    command += ["--only", "bf16", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["encoder"]
    assert rows and all("bf16" in row["impl"] for row in rows)
    assert "fp32" not in result.stdout.split("|---", 1)[1]
