"""Decode one image file into an RGB PIL image, or say exactly why it cannot be decoded."""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from tlearn.errors import TlearnError
from tlearn.files import sha256_file

# Pillow refuses images above ~179 Mpx as a decompression bomb; we do the same with a message of our own.
MAX_PIXELS = 120_000_000
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class DecodeError(TlearnError):
    """An image file that cannot be used, with the reason in words a user can act on."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_path(path: Path) -> bool:
    """True for files whose extension (any case) is one tlearn reads."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def decode_bytes(content: bytes, path: str | Path = "<bytes>", draft_size: tuple[int, int] | None = None, *,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to RGB with EXIF orientation applied; raise DecodeError naming the problem.

    draft_size lets JPEG decoding scale down by DCT (cheap) to no less than that size.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(content))
            if img.width * img.height > max_pixels:
                raise DecodeError(path, f"image too large ({img.width}x{img.height} pixels, limit {max_pixels:,})")
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(path, "not an image Pillow can identify (wrong content or unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(path, f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(path, f"corrupt or truncated image ({exc})") from None


def content_hash(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes (what identifies an image for caches and duplicate checks), None if unreadable."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def content_hashes(paths: Sequence[str | Path], workers: int = 2) -> dict[Path, str | None]:
    """content_hash of each file, keyed by path; hashing releases the GIL, so threads read and hash in parallel."""
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(paths, pool.map(content_hash, paths)))


def load_image(path: str | Path, draft_size: tuple[int, int] | None = None, *,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read and decode one file (see decode_bytes); a missing or unreadable file is a DecodeError too."""
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise DecodeError(path, f"cannot read file ({exc.strerror or exc})") from None
    return decode_bytes(content, path, draft_size, max_pixels=max_pixels)


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
