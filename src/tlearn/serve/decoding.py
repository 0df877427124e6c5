"""Encoded images -> model pixels, in a thread pool, refusing bombs before they are decoded.

Each image is first identified from its header alone (cheap): not an image -> 415, more pixels than
--max-pixels -> 413; only then does Predictor.to_pixels decode it (corrupt or truncated -> 422).
"""
from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from tlearn.data.decode import DecodeError
from tlearn.serve.limits import Rejection


class PixelDecoder:
    """Decodes the images of a request in parallel threads; the first bad image (lowest index) is reported."""

    def __init__(self, predictor, max_pixels: int, threads: int):
        self.predictor, self.max_pixels = predictor, max_pixels
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tlearn-decode")

    async def pixels(self, images: list[bytes | np.ndarray]) -> np.ndarray:
        """uint8 (n, 3, H, W) for n encoded images (bytes) or RGB arrays (H, W, 3)."""
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.pool, self.one, image, i) for i, image in enumerate(images)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return np.stack(results)

    def one(self, image: bytes | np.ndarray, index: int) -> np.ndarray:
        if isinstance(image, bytes):
            self.check_header(image, index)
        try:
            return self.predictor.to_pixels(image, max_pixels=self.max_pixels)
        except DecodeError as exc:
            raise Rejection(422, "decodable-image", f"image {index}: {exc.reason}", index=index) from None

    def check_header(self, content: bytes, index: int) -> None:
        identify(content, index, self.max_pixels)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def identify(content: bytes, index: int, max_pixels: int) -> str:
    """The format of an encoded image (Pillow's name, e.g. JPEG), read from its header alone: 415 for what is not
    an image, 413 for more pixels than `max_pixels`, 422 for a corrupt header."""
    try:
        with Image.open(io.BytesIO(content)) as img:
            width, height, kind = img.width, img.height, img.format
    except UnidentifiedImageError:
        what = "an empty body" if not content else f"{len(content):,} bytes that are no image format we read"
        raise Rejection(415, "image-format", f"image {index}: {what}", index=index) from None
    except Image.DecompressionBombError as exc:
        raise Rejection(413, "max-pixels", f"image {index}: {exc}", index=index) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Rejection(422, "decodable-image", f"image {index}: corrupt image header ({exc})", index=index) from None
    if width * height > max_pixels:
        raise Rejection(413, "max-pixels", f"image {index}: {width}x{height} = {width * height:,} pixels, over "
                                           f"the limit of {max_pixels:,} (--max-pixels)", index=index)
    return kind
