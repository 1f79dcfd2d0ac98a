"""Tests for samkit.io: image modes to RGB uint8, error messages, atomic writes, find_images."""

from __future__ import annotations

import contextlib
import pickle
import struct
import sys
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samkit.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageReadError,
    find_images,
    load_image,
    save_png,
    write_atomic,
)

# Lossy formats are compared on flat 16x16 colour blocks with a max abs difference of 8: JPEG at
# quality 95 without chroma subsampling over the whole image; lossy WebP (always 4:2:0 chroma,
# off by up to ~55 at block edges) on block interiors 4 px away from the edges.
LOSSY_ATOL = 8


def pattern(h: int = 6, w: int = 10) -> np.ndarray:
    """HxWx3 uint8, every pixel different, asymmetric in both axes."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y * 20 + x, x * 25, 255 - y * 30 - x], axis=-1).astype(np.uint8)


def blocks(rows: int = 2, cols: int = 3, size: int = 16) -> np.ndarray:
    """Flat size x size colour blocks, each block a different colour (for lossy codecs)."""
    colours = pattern(rows, cols) // 2 * 2 + 20
    return np.repeat(np.repeat(colours, size, axis=0), size, axis=1)


def gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def check_rgb(arr: np.ndarray, expected: np.ndarray, atol: int = 0) -> None:
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.flags.c_contiguous and arr.flags.writeable
    assert arr.shape == expected.shape
    diff = np.abs(arr.astype(int) - expected.astype(int))
    assert diff.max() <= atol, f"max abs difference {diff.max()} > {atol}"


def write_tiff(path: Path, arr: np.ndarray) -> None:
    """Minimal little-endian TIFF (one uncompressed strip, interleaved samples), for layouts PIL
    cannot write: 16-bit RGB, float RGB, signed 16-bit."""
    h, w = arr.shape[:2]
    spp = 1 if arr.ndim == 2 else arr.shape[2]
    sample_format = {"u": 1, "i": 2, "f": 3}[arr.dtype.kind]
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
    short, long = 3, 4
    entries = [  # (tag, type, values): size, bits, no compression, RGB or min-is-black, strip
        (256, long, [w]), (257, long, [h]), (258, short, [arr.dtype.itemsize * 8] * spp),
        (259, short, [1]), (262, short, [2 if spp >= 3 else 1]), (273, long, [8]),
        (277, short, [spp]), (278, long, [h]), (279, long, [len(data)]), (284, short, [1]),
        (339, short, [sample_format] * spp),
    ]  # fmt: skip
    ifd_at = 8 + len(data)
    extra_at = ifd_at + 2 + 12 * len(entries) + 4  # values over 4 bytes go after the IFD
    ifd, extra = struct.pack("<H", len(entries)), b""
    for tag, kind, values in entries:
        raw = struct.pack(f"<{len(values)}{'H' if kind == short else 'I'}", *values)
        if len(raw) > 4:
            raw, extra = struct.pack("<I", extra_at + len(extra)), extra + raw
        ifd += struct.pack("<HHI", tag, kind, len(values)) + raw.ljust(4, b"\0")
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd_at) + data + ifd + b"\0\0\0\0" + extra)


# ---- modes and formats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [("a.png", {}), ("a.tif", {}), ("a.bmp", {}), ("a.webp", {"lossless": True})],
)
def test_rgb_lossless_formats(tmp_path: Path, name: str, options: dict) -> None:
    rgb = pattern()
    Image.fromarray(rgb).save(tmp_path / name, **options)
    check_rgb(load_image(tmp_path / name), rgb)


@pytest.mark.parametrize(
    ("name", "options"),
    [("a.jpg", {"quality": 95, "subsampling": 0}), ("a.webp", {"quality": 95})],
)
def test_rgb_lossy_formats(tmp_path: Path, name: str, options: dict) -> None:
    rgb = blocks()
    Image.fromarray(rgb).save(tmp_path / name, **options)
    loaded = load_image(str(tmp_path / name))
    check_rgb(loaded, rgb, atol=255)
    offset = np.indices(rgb.shape[:2]) % 16  # position inside each block
    interior = ((offset >= 4) & (offset < 12)).all(axis=0)
    diff = np.abs(loaded[interior].astype(int) - rgb[interior])
    assert diff.max() <= LOSSY_ATOL


def test_gray_gray_alpha_and_one_bit(tmp_path: Path) -> None:
    gray, alpha = pattern()[..., 0], pattern()[..., 1]
    bits = gray % 2 == 1
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(np.stack([gray, alpha], axis=-1), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    check_rgb(load_image(tmp_path / "l.png"), gray3(gray))
    check_rgb(load_image(tmp_path / "la.png"), gray3(gray))  # alpha dropped
    check_rgb(load_image(tmp_path / "b.png"), gray3(bits.astype(np.uint8) * 255))


@pytest.mark.parametrize("name", ["a.png", "a.webp", "a.tif"])
def test_rgba_drops_alpha_without_compositing(tmp_path: Path, name: str) -> None:
    rgb = pattern()
    alpha = np.zeros(rgb.shape[:2], np.uint8)  # fully transparent: colours must survive as stored
    alpha[:, ::2] = 255
    # exact=True: lossless WebP would otherwise zero the colour of transparent pixels.
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / name, lossless=True, exact=True)
    check_rgb(load_image(tmp_path / name), rgb)


def test_palette_with_transparency(tmp_path: Path) -> None:
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    index = (np.arange(24).reshape(4, 6) % 3).astype(np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette.ravel().tolist())
    img.save(tmp_path / "p.png", transparency=1)
    assert Image.open(tmp_path / "p.png").mode == "P"
    check_rgb(load_image(tmp_path / "p.png"), palette[index])


SIXTEEN = np.array([[0, 257, 65535], [128 * 257, 65534, 1000]], np.uint16)
SIXTEEN_AS_8 = np.array([[0, 1, 255], [128, 255, 3]], np.uint8)  # the high byte


@pytest.mark.parametrize(
    ("name", "mode", "dtype"),
    [("a.png", "I;16", "<u2"), ("a.tif", "I;16", "<u2"), ("a.tif", "I;16B", ">u2")],
)
def test_sixteen_bit_gray(tmp_path: Path, name: str, mode: str, dtype: str) -> None:
    h, w = SIXTEEN.shape
    Image.frombytes(mode, (w, h), SIXTEEN.astype(dtype).tobytes()).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    check_rgb(load_image(tmp_path / name), gray3(SIXTEEN_AS_8))


def test_sixteen_bit_rgb_tiff(tmp_path: Path) -> None:
    rgb16 = np.stack([SIXTEEN, SIXTEEN[:, ::-1], np.full_like(SIXTEEN, 257 * 7)], axis=-1)
    write_tiff(tmp_path / "rgb16.tif", rgb16)
    loaded = load_image(tmp_path / "rgb16.tif")
    assert loaded.shape == (*SIXTEEN.shape, 3)
    np.testing.assert_array_equal(loaded, (rgb16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_pixels_equal_opencv_imread(tmp_path: Path, channels: int) -> None:
    """The official scripts/amg.py reads images with cv2.imread (IMREAD_COLOR) and converts
    BGR to RGB; lossless files give the same pixels here, 8 and 16 bits, gray and colour."""
    import cv2

    rng = np.random.default_rng(channels)
    for dtype in (np.uint8, np.uint16):
        pixels = rng.integers(0, np.iinfo(dtype).max + 1, (23, 37, channels), dtype=dtype)
        path = str(tmp_path / f"{dtype.__name__}.png")
        assert cv2.imwrite(path, pixels[..., 0] if channels == 1 else pixels)
        theirs = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(load_image(path), theirs, err_msg=path)


def test_float_tiff_min_max(tmp_path: Path) -> None:
    values = np.array([[-10.0, -9.5, np.nan], [117.5, 0.0, 40.0]], np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    # (v + 10) * 255 / 127.5 = 2 * (v + 10) exactly; NaN -> 0
    expected = np.array([[0, 1, 0], [255, 20, 100]], np.uint8)
    check_rgb(load_image(tmp_path / "f.tif"), gray3(expected))
    Image.fromarray(np.full((3, 4), 7.5, np.float32)).save(tmp_path / "c.tif")
    check_rgb(load_image(tmp_path / "c.tif"), np.zeros((3, 4, 3), np.uint8))  # constant


def test_int32_and_signed16_tiff_min_max(tmp_path: Path) -> None:
    values = np.array([[-1000, 0], [1550, 500]], np.int32)
    expected = np.array([[0, 100], [255, 150]], np.uint8)  # (v + 1000) / 10
    Image.fromarray(values).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    check_rgb(load_image(tmp_path / "i32.tif"), gray3(expected))
    write_tiff(tmp_path / "i16.tif", values.astype(np.int16))
    check_rgb(load_image(tmp_path / "i16.tif"), gray3(expected))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    rgb = [(255, 255, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
    stored = np.repeat(np.array(cmyk, np.uint8)[None], 16, axis=0).repeat(16, axis=1)
    Image.fromarray(stored, mode="CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    expected = np.repeat(np.array(rgb, np.uint8)[None], 16, axis=0).repeat(16, axis=1)
    check_rgb(load_image(tmp_path / "c.jpg"), expected, atol=LOSSY_ATOL)


def test_gif_first_frame(tmp_path: Path) -> None:
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]
    index = (np.arange(30).reshape(5, 6) % 4).astype(np.uint8)
    frames = [Image.fromarray(index, mode="P"), Image.fromarray(3 - index, mode="P")]
    for frame in frames:
        frame.putpalette(palette)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(tmp_path / "a.gif").n_frames == 2
    check_rgb(load_image(tmp_path / "a.gif"), np.array(palette, np.uint8).reshape(4, 3)[index])


def test_exif_orientation_rotates(tmp_path: Path) -> None:
    stored = blocks(rows=2, cols=3)  # 32x48, asymmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "o.jpg", quality=95, subsampling=0, exif=exif)
    loaded = load_image(tmp_path / "o.jpg")
    assert loaded.shape == (48, 32, 3)
    check_rgb(loaded, np.rot90(stored, k=-1), atol=LOSSY_ATOL)  # k=-1: clockwise


# ---- tifffile fallback -----------------------------------------------------------------------


def fake_tifffile(samples: np.ndarray, axes: str) -> types.SimpleNamespace:
    """Stand-in for the optional tifffile package, with the small API samkit.io uses."""
    h, w = samples.shape[-2:] if axes == "SYX" else samples.shape[:2]
    page = types.SimpleNamespace(imagewidth=w, imagelength=h, axes=axes, asarray=lambda: samples)
    tiff = types.SimpleNamespace(pages=[page])
    return types.SimpleNamespace(TiffFile=lambda path: contextlib.nullcontext(tiff))


def test_tiff_pil_cannot_read_uses_tifffile(tmp_path: Path, monkeypatch) -> None:
    rgbf = np.zeros((2, 3, 3), np.float32)
    rgbf[0, 0] = [1.0, 2.0, 3.0]
    write_tiff(tmp_path / "f.tif", rgbf)  # float RGB: PIL cannot identify it
    monkeypatch.setitem(sys.modules, "tifffile", fake_tifffile(rgbf, "YXS"))
    expected = np.zeros((2, 3, 3), np.uint8)
    expected[0, 0] = [85, 170, 255]  # min-max over all channels: 0..3
    check_rgb(load_image(tmp_path / "f.tif"), expected)
    planar = np.moveaxis(rgbf, -1, 0)
    monkeypatch.setitem(sys.modules, "tifffile", fake_tifffile(planar, "SYX"))
    check_rgb(load_image(tmp_path / "f.tif"), expected)
    with pytest.raises(ImageReadError, match="over the limit"):
        load_image(tmp_path / "f.tif", max_pixels=5)


def test_tiff_gray_alpha_16bit_via_tifffile(tmp_path: Path, monkeypatch) -> None:
    gray_alpha = np.stack([SIXTEEN, np.full_like(SIXTEEN, 65535)], axis=-1)
    write_tiff(tmp_path / "la.tif", gray_alpha)
    monkeypatch.setitem(sys.modules, "tifffile", fake_tifffile(gray_alpha, "YXS"))
    check_rgb(load_image(tmp_path / "la.tif"), gray3(SIXTEEN_AS_8))


def test_tiff_without_tifffile_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    write_tiff(tmp_path / "f.tif", np.zeros((2, 3, 3), np.float32))
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import fails
    with pytest.raises(ImageReadError, match="tifffile") as info:
        load_image(tmp_path / "f.tif")
    check_message(info.value, tmp_path / "f.tif")


# ---- errors --------------------------------------------------------------------------------


def check_message(error: ImageReadError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message
    assert repr(str(path)) in message
    assert message.startswith("cannot read ")


def test_error_cases(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ["cut.jpg", "cut.png"]:  # noise: the cut lands in the pixel data, past the headers
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), np.uint8)).save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "noise.png"
    corrupt.write_bytes(rng.integers(0, 256, 1000, np.uint8).tobytes())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image\n")
    (tmp_path / "folder.png").mkdir()
    cases = {
        "cut.jpg": "truncated",
        "cut.png": "corrupt or truncated",
        "noise.png": "not a recognized image",
        "empty.png": "empty file",
        "text.jpg": "not a recognized image",
        "folder.png": "is a directory",
        "missing.png": "no such file",
    }
    for name, problem in cases.items():
        with pytest.raises(ImageReadError, match=problem) as info:
            load_image(tmp_path / name)
        check_message(info.value, tmp_path / name)
        assert isinstance(info.value, ValueError)


def test_max_pixels(tmp_path: Path) -> None:
    Image.fromarray(pattern(10, 20)).save(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="max_pixels") as info:
        load_image(tmp_path / "a.png", max_pixels=100)
    check_message(info.value, tmp_path / "a.png")
    assert "20x10" in str(info.value) and "100" in str(info.value)
    check_rgb(load_image(tmp_path / "a.png", max_pixels=200), pattern(10, 20))
    check_rgb(load_image(tmp_path / "a.png", max_pixels=None), pattern(10, 20))
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(tmp_path / "a.png", max_pixels=0)


def test_max_pixels_checked_from_header_before_decoding(tmp_path: Path) -> None:
    png = tmp_path / "huge.png"
    Image.fromarray(pattern()).save(png)
    raw = bytearray(png.read_bytes())
    raw[16:24] = struct.pack(">II", 20_000, 20_000)  # IHDR width, height; no pixel data for it
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    png.write_bytes(bytes(raw))
    pixels = 20_000 * 20_000
    assert pixels > DEFAULT_MAX_PIXELS
    assert pixels > 2 * (Image.MAX_IMAGE_PIXELS or 0)  # PIL's own error would fire too
    with pytest.raises(ImageReadError, match="20000x20000") as info:
        load_image(png)
    check_message(info.value, png)


def test_pil_pixel_limit_does_not_replace_ours(tmp_path: Path, monkeypatch) -> None:
    Image.fromarray(pattern(64, 64)).save(tmp_path / "a.png")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would raise DecompressionBombError
    check_rgb(load_image(tmp_path / "a.png", max_pixels=None), pattern(64, 64))
    check_rgb(load_image(tmp_path / "a.png"), pattern(64, 64))
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ImageReadError, match="over the limit"):
        load_image(tmp_path / "a.png", max_pixels=4000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # PIL would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_rgb(load_image(tmp_path / "a.png"), pattern(64, 64))


def test_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(ImageReadError("x.jpg", "truncated\nimage file")))
    assert str(error) == "cannot read 'x.jpg': truncated image file"


# ---- writing -------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [0, 3, 4])
def test_save_png_round_trip(tmp_path: Path, channels: int) -> None:
    rgb = pattern()
    array = rgb[..., 0] if channels == 0 else np.dstack([rgb, rgb[..., :1]])[..., :channels]
    target = tmp_path / "deep" / "er" / "out.png"
    save_png(target, array)
    save_png(target, array)  # overwrite
    np.testing.assert_array_equal(np.asarray(Image.open(target)), array)
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]


def test_save_png_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "a.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        save_png(tmp_path / "a.png", np.zeros((4, 4, 2), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_atomic(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "sub" / "out.json"
    write_atomic(target, '{"a": "é"}')
    assert target.read_text(encoding="utf-8") == '{"a": "é"}'
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("samkit.io.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "new")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


# ---- finding images ------------------------------------------------------------------------


def test_find_images(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ["data/b.png", "data/a.JPG", "data/sub/c.tif", "data/.hidden.png", "other/d.gif"]:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern()).save(name, format="PNG")
    Path("data/notes.txt").write_text("hello")
    Path("empty").mkdir()

    paths, problems = find_images(["data"])
    assert paths == [Path("data/a.JPG"), Path("data/b.png"), Path("data/sub/c.tif")]
    assert problems == []

    paths, problems = find_images(["other/*.gif", "data/*", "data/b.png", "missing.png", "empty"])
    assert paths == [Path("other/d.gif"), Path("data/a.JPG"), Path("data/b.png")]
    assert len(problems) == 2
    assert "missing.png" in problems[0] and "empty" in problems[1]
    assert all("\n" not in p for p in problems)

    paths, _ = find_images(["**/*.tif", "data/notes.txt"])  # explicit file: any suffix
    assert paths == [Path("data/sub/c.tif"), Path("data/notes.txt")]

    paths, problems = find_images(["*.nothing"])
    assert paths == [] and "matched no images" in problems[0]


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif"} == IMAGE_EXTENSIONS
    assert all(ext == ext.lower() for ext in IMAGE_EXTENSIONS)
