"""Reading images of every kind into HxWx3 uint8 RGB arrays, finding them, writing outputs.

All reading problems surface as `ImageReadError`, whose message is one line naming the file.
"""

from __future__ import annotations

import glob
import io
import os
import stat
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif"})
# zlib level of written PNGs: fast (level 1 files are ~7% larger than the default 6 on photos)
PNG_COMPRESS_LEVEL = 1

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF
_GLOB_CHARS = frozenset("*?[")
# Serialises the rare reads that switch off PIL's global pixel limit (Image.MAX_IMAGE_PIXELS).
_PIL_LIMIT_LOCK = threading.Lock()

PathLike = str | os.PathLike[str]


class ImageReadError(ValueError):
    """An image file could not be read; `str()` is one line: ``cannot read '<file>': <problem>``."""

    def __init__(self, path: PathLike, problem: str) -> None:
        # Both parts in args so the exception pickles (e.g. across a multiprocessing pool).
        super().__init__(str(path), " ".join(str(problem).split()))
        self.path: str = self.args[0]
        self.problem: str = self.args[1]

    def __str__(self) -> str:
        return f"cannot read {self.path!r}: {self.problem}"


def load_image(path: PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (C-contiguous), EXIF orientation applied.

    Alpha is dropped (not composited), GIFs give their first frame, 16-bit samples keep their
    high byte (as OpenCV's imread, which the official scripts use) and float or 32-bit integer
    samples are min-max scaled to 0..255 (NaN -> 0). Images with
    more than `max_pixels` pixels (width * height, read from the header before decoding) are
    refused; `max_pixels=None` lifts the limit, PIL's own `Image.MAX_IMAGE_PIXELS` included.
    TIFFs that PIL cannot decode are read with `tifffile` when it is installed.

    Raises:
        ImageReadError: missing, empty, unreadable, corrupt or truncated file, or too many pixels.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    _check_regular_file(path)
    try:
        return _read_with_pil(path, max_pixels)
    except Image.DecompressionBombError:
        # PIL's own limit fired; samkit's max_pixels decides instead, so read again without it.
        with _pil_limit_lifted():
            return _read_with_pil(path, max_pixels)


def _check_regular_file(path: PathLike) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except OSError as e:
        raise ImageReadError(path, e.strerror or type(e).__name__) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageReadError(path, "is a directory")
    if info.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")


def _check_pixels(path: PathLike, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageReadError(
            path,
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (raise it with max_pixels=, or --max-pixels on the command line)",
        )


@contextmanager
def _pil_limit_lifted() -> Iterator[None]:
    """Switch PIL's global pixel limit off for one read, restoring it afterwards."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _is_tiff(path: PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _read_with_pil(path: PathLike, max_pixels: int | None) -> np.ndarray:
    """Decode with PIL; lets DecompressionBombError through for `load_image` to handle."""
    with warnings.catch_warnings():
        # Our max_pixels check replaces PIL's DecompressionBombWarning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:
            raise
        except UnidentifiedImageError:
            if _is_tiff(path):
                return _read_with_tifffile(path, max_pixels, "unsupported layout")
            raise ImageReadError(path, "not a recognized image file") from None
        except OSError as e:
            if e.errno is not None:  # from the file system, e.g. permission denied
                raise ImageReadError(path, e.strerror or _describe(e)) from None
            raise ImageReadError(path, f"corrupt or truncated image ({_describe(e)})") from None
        except Exception as e:
            raise ImageReadError(path, f"corrupt image header ({_describe(e)})") from None
        with img:
            _check_pixels(path, img.width, img.height, max_pixels)
            try:
                img.load()  # full decode of the first frame, so truncation shows up here
                return _pil_to_rgb(path, img)
            except (Image.DecompressionBombError, ImageReadError):
                raise
            except Exception as e:
                if img.format == "TIFF":
                    return _read_with_tifffile(path, max_pixels, _describe(e))
                raise ImageReadError(path, f"corrupt or truncated image ({_describe(e)})") from None


def _pil_to_rgb(path: PathLike, img: Image.Image) -> np.ndarray:
    """Loaded PIL image of any mode -> HxWx3 uint8, after applying its EXIF orientation."""
    with suppress(Exception):  # unreadable EXIF: keep the stored orientation
        ImageOps.exif_transpose(img, in_place=True)
    mode = img.mode
    if mode == "RGB":
        return np.array(img)  # a writable copy (np.asarray of a PIL image is read-only)
    if mode in ("RGBA", "RGBX"):
        return np.ascontiguousarray(np.asarray(img)[..., :3])  # alpha dropped, not composited
    if mode in ("P", "PA"):
        # Through RGBA so palette transparency is handled; transparent pixels keep their colour.
        return np.ascontiguousarray(np.asarray(img.convert("RGBA"))[..., :3])
    if mode in ("L", "1", "LA", "La"):
        gray = np.asarray(img if mode == "L" else img.convert("L"))
    elif mode.startswith("I;16"):  # unsigned 16-bit, any byte order
        gray = _to_uint8(np.asarray(img), sixteen_bit=True)
    elif mode in ("I", "F"):
        gray = _to_uint8(np.asarray(img), sixteen_bit=mode == "I" and _is_unsigned_16bit(img))
    else:  # CMYK, YCbCr, LAB, HSV, RGBa, ...
        try:
            return np.array(img.convert("RGB"))
        except ValueError:
            raise ImageReadError(path, f"unsupported image mode {mode!r}") from None
    return _gray_to_rgb(gray)


def _is_unsigned_16bit(img: Image.Image) -> bool:
    """Whether a mode "I" image holds unsigned 16-bit samples (high byte kept, not min-max)."""
    if img.format == "PNG":
        return True  # PNG samples are at most 16-bit unsigned
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return False
    bits, sample_format = tags.get(258, 0), tags.get(339, 1)  # BitsPerSample, SampleFormat
    bits = bits[0] if isinstance(bits, tuple) else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    return bits == 16 and sample_format == 1


def _to_uint8(samples: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    """Samples of any dtype -> uint8: 16-bit to their high byte, others min-max scaled."""
    if samples.dtype == np.uint8:
        return samples
    if samples.dtype == np.bool_:
        return samples.astype(np.uint8) * 255
    if sixteen_bit or samples.dtype == np.uint16:
        # the high byte, as OpenCV's imread (which the official scripts/amg.py reads with) and
        # Pillow's own 16-bit RGB decoding give
        return (np.clip(samples, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    return _min_max_to_uint8(samples)


def _min_max_to_uint8(samples: np.ndarray) -> np.ndarray:
    """Scale finite values to 0..255; constant images give zeros, NaN gives 0, +-inf clip."""
    values = samples.astype(np.float64)  # float64: int32 ranges keep their precision
    finite = np.isfinite(values)
    out = np.zeros(values.shape, np.uint8)
    if not finite.any():
        return out
    lo = float(np.min(values, where=finite, initial=np.inf))
    hi = float(np.max(values, where=finite, initial=-np.inf))
    if hi > lo:
        np.clip(values, lo, hi, out=values)
        values -= lo
        values *= 255.0 / (hi - lo)
        np.rint(values, out=values)
        out = np.nan_to_num(values, nan=0.0).astype(np.uint8)
    return out


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)  # HxW -> HxWx3, C-contiguous


def _read_with_tifffile(path: PathLike, max_pixels: int | None, pil_problem: str) -> np.ndarray:
    """Fallback for TIFFs PIL cannot decode (e.g. float RGB); `tifffile` is optional."""
    try:
        import tifffile
    except ImportError:
        raise ImageReadError(
            path,
            f"PIL cannot decode this TIFF ({pil_problem}) and the optional 'tifffile' package, "
            "which reads more TIFF layouts, is not installed",
        ) from None
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]  # first image of a multi-page TIFF
            _check_pixels(path, int(page.imagewidth), int(page.imagelength), max_pixels)
            samples = np.asarray(page.asarray())
            axes = str(page.axes)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(path, f"corrupt or unsupported TIFF ({_describe(e)})") from None
    if axes == "SYX":  # planar configuration: SxHxW -> HxWxS
        samples = np.moveaxis(samples, 0, -1)
    if samples.ndim == 2:
        samples = samples[..., None]
    if samples.ndim != 3 or samples.shape[2] == 0:
        raise ImageReadError(path, f"unsupported TIFF layout (axes {axes}, shape {samples.shape})")
    # 1 or 2 samples: gray (+ alpha); 3 or more: RGB (+ alpha or extra samples), extras dropped.
    colour = samples[..., :3] if samples.shape[2] >= 3 else samples[..., :1]
    rgb = _to_uint8(colour, sixteen_bit=colour.dtype == np.uint16)
    if rgb.shape[2] == 1:
        return _gray_to_rgb(rgb[..., 0])
    return np.ascontiguousarray(rgb)


def save_png(path: PathLike, array: np.ndarray) -> None:
    """Write a uint8 HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) array as a PNG, atomically.

    Parent folders are created. A bool mask must be converted first, e.g. `mask * np.uint8(255)`.
    zlib level 1 (PNG_COMPRESS_LEVEL): a 1000x1500 photo's overlay takes 158 ms and 2.29 MB
    against 636 ms and 2.14 MB at PIL's default level 6 (benchmarks/README.md).
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png needs a uint8 array, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"save_png needs an HxW, HxWx3 or HxWx4 array, got shape {arr.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    write_atomic(path, buffer.getvalue())


def open_temp_beside(target: Path) -> tuple[Path, int]:
    """A new hidden temp file in target's folder, opened for writing: (path, descriptor).

    Created with mode 0o666, so the umask sets its permissions as for any new file, and the
    file renamed into place gets them (tempfile.mkstemp's 0600 would hide it from other users).
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return tmp, os.open(tmp, flags, 0o666)


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """Write bytes, or text as UTF-8, so readers see the old file or the whole new one.

    The data goes to a hidden temp file in the same folder, then `os.replace` puts it in place
    (no fsync: atomic against crashes of this process, not power loss). Parent folders are made.
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = open_temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def find_images(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders and glob patterns into image paths.

    A file named explicitly is kept whatever its suffix. Folders are walked recursively and glob
    patterns (`*`, `?`, `[...]`, `**`) expanded, keeping files with a suffix in IMAGE_EXTENSIONS
    (any case); hidden files and folders inside a walked folder are skipped. Each input's matches
    are sorted; duplicates are dropped, keeping input order.

    Returns:
        (paths, problems): problems holds one line per input that matched nothing.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    paths: list[Path] = []
    seen: set[str] = set()
    problems: list[str] = []
    for item in inputs:
        matches, problem = _expand_input(item)
        if problem is not None:
            problems.append(problem)
        for match in matches:
            key = os.path.normcase(os.path.abspath(match))
            if key not in seen:
                seen.add(key)
                paths.append(match)
    return paths, problems


def _has_image_suffix(name: str | Path) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _expand_input(item: str) -> tuple[list[Path], str | None]:
    path = Path(item)
    if path.is_file():
        return [path], None
    if path.is_dir():
        images = _walk_folder(path)
        return images, None if images else f"{item!r}: folder contains no images"
    if _GLOB_CHARS.intersection(item):
        hits = (Path(hit) for hit in glob.glob(item, recursive=True))
        images = sorted(hit for hit in hits if hit.is_file() and _has_image_suffix(hit))
        return images, None if images else f"{item!r}: pattern matched no images"
    return [], f"{item!r}: no such file or folder"


def _walk_folder(folder: Path) -> list[Path]:
    images: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        images.extend(
            Path(root) / name
            for name in files
            if not name.startswith(".") and _has_image_suffix(name)
        )
    return sorted(images)
