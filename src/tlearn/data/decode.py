"""Decode one image file into an RGB PIL image, or say exactly why it cannot be decoded."""
from __future__ import annotations

import io
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from tlearn.errors import TlearnError
from tlearn.files import sha256_file

# Refused as a decompression bomb: checked from the header, before any pixel is decoded, by each call on its own
# (no process-wide warning filters, which threads race on). Below Pillow's own warning threshold (~89.5 Mpx).
MAX_PIXELS = 80_000_000
# Refused as too small to mean anything: an image is upscaled to the model's input (224 px and more), and a few
# pixels blown up to that are a blur that a model still labels, often confidently. The same bound everywhere: the
# command line, the Python API, the server and training data (the smallest input size a model may have).
MIN_SIDE = 16
MAX_FILE_BYTES = 1 << 30  # larger files are refused before they are read into memory
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# formats people do keep beside their photos that tlearn does not read: skipped with this reason, never silently
UNSUPPORTED_EXTENSIONS = {".avif": "AVIF", ".heic": "HEIC", ".heif": "HEIF", ".svg": "SVG", ".svgz": "SVG",
                          ".jxl": "JPEG XL", ".raw": "camera RAW", ".cr2": "camera RAW", ".nef": "camera RAW",
                          ".dng": "camera RAW", ".psd": "Photoshop"}


class DecodeError(TlearnError):
    """An image file that cannot be used, with the reason in words a user can act on."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_path(path: Path) -> bool:
    """True for files whose extension (any case) is one tlearn reads."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def unsupported_reason(path: Path) -> str | None:
    """Why an image file of a format tlearn does not read is skipped, or None for any other file."""
    kind = UNSUPPORTED_EXTENSIONS.get(path.suffix.lower())
    return f"{kind} images are not supported: convert it to JPEG or PNG" if kind else None


def decode_bytes(content: bytes, path: str | Path = "<bytes>", draft_size: tuple[int, int] | None = None, *,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to RGB with EXIF orientation applied; raise DecodeError naming the problem.

    draft_size lets JPEG decoding scale down by DCT (cheap) to no less than that size. Images of more than
    `max_pixels` pixels (width x height in the header) are refused before their pixels are decoded.
    """
    try:
        img = Image.open(io.BytesIO(content))
        if img.width * img.height > max_pixels:
            raise DecodeError(path, f"image too large ({img.width}x{img.height} pixels, limit {max_pixels:,})")
        check_size(img.width, img.height, path)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(path, "not an image Pillow can identify (wrong content or unsupported format)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit, when it is below ours
        raise DecodeError(path, f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise DecodeError(path, f"corrupt or truncated image ({exc})") from None


def check_size(width: int, height: int, path: str | Path = "<image>") -> None:
    """DecodeError for an image under MIN_SIDE pixels on a side (see MIN_SIDE)."""
    if min(width, height) < MIN_SIDE:
        raise DecodeError(path, f"image too small ({width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} are "
                                "needed to mean anything)")


def read_regular_file(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file; a FIFO, device, socket or folder is refused by name, never read (it could
    block or never end); raise DecodeError."""
    with _open_regular(path, max_bytes) as handle:
        try:
            return handle.read()
        except OSError as exc:
            raise DecodeError(path, f"cannot read file ({exc.strerror or exc})") from None


def _open_regular(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> io.BufferedReader:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat on the open file leaves no gap to swap it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DecodeError(path, f"cannot read file ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DecodeError(path, f"not a regular file ({file_kind(info.st_mode)})")
        raise DecodeError(path, f"file too large ({info.st_size:,} bytes, limit {max_bytes:,})")
    return os.fdopen(fd, "rb")


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words (from its st_mode)."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def content_hash(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes (what identifies an image for caches and duplicate checks), None if unreadable."""
    try:
        _open_regular(path).close()  # a FIFO or a device is never read: it could block or never end
        return sha256_file(path)
    except (OSError, DecodeError):
        return None


def content_hashes(paths: Sequence[str | Path], workers: int = 2) -> dict[Path, str | None]:
    """content_hash of each file, keyed by path; hashing releases the GIL, so threads read and hash in parallel."""
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(content_hash, paths)))


def load_image(path: str | Path, draft_size: tuple[int, int] | None = None, *,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read and decode one file (see decode_bytes); a missing, unreadable or special file is a DecodeError too."""
    return decode_bytes(read_regular_file(path), path, draft_size, max_pixels=max_pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels otherwise become arbitrary (often black) colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale: scale to 8 bits instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        img = Image.fromarray((arr / hi * 255.0).astype("uint8"), mode="L")
    return img.convert("RGB")
