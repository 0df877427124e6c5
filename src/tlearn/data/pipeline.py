"""Streaming pixel batches for inference: decode and resize in a thread pool, a bounded number of batches in flight.

Pillow releases the GIL while it decodes and resizes, so on the CPU threads keep every core busy without worker
processes: nothing is pickled between processes and nothing forks after an inference engine has started its own
threads. An engine on a GPU asks for worker processes instead (`processes`): there the cores only decode, and a
dozen decoding threads would queue on the GIL for the Python between Pillow's calls while the GPU waits. The
workers start from a clean server process (forkserver; spawn where there is none), never forked from this one
after CUDA is up. Batches are uint8 (n, 3, H, W): four times less to move than floats; normalisation belongs to
the engine.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from tlearn.data.decode import DecodeError, load_image


@dataclass
class PixelBatch:
    indices: list[int]  # positions in the input list of the images in `pixels`
    pixels: np.ndarray  # (n, 3, H, W) uint8; n may be 0 when every image of the batch failed
    errors: list[tuple[int, str]]  # (position, reason) of files that could not be decoded


def default_workers() -> int:
    """Decoding workers when the caller does not say: one per core (threads here, processes in loader.py)."""
    return max(1, os.cpu_count() or 1)


def pixel_batches(paths: Sequence[Path], to_pixels: Callable, input_size: int, batch_size: int = 32,
                  workers: int | None = None, draft_size: tuple[int, int] | None = None,
                  processes: bool = False) -> Iterator[PixelBatch]:
    """Yield batches in input order; files that fail to decode are reported in `errors`, never raised.

    `to_pixels` maps an RGB PIL image to a uint8 (3, H, W) array (picklable, with `processes`); `draft_size` lets
    JPEGs much larger than it be decoded at a reduced scale (DCT scaling), no smaller than that size. At most
    2 x workers batches are decoded ahead of the consumer, so memory stays flat however many files there are.
    `processes`: decode in `workers` worker processes instead of threads (for an engine on a GPU; a list of two
    batches or less is decoded in threads, since starting processes would cost more).
    """
    workers = default_workers() if workers is None else max(1, workers)
    starts = range(0, len(paths), batch_size)
    with _decoders(workers, processes and len(paths) > 2 * batch_size) as pool:
        pending: deque = deque()
        for start in starts:
            chunk = list(enumerate(paths[start:start + batch_size], start))
            pending.append(pool.submit(_decode_batch, chunk, to_pixels, input_size, draft_size))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _decoders(workers: int, processes: bool) -> Executor:
    if not processes:
        return ThreadPoolExecutor(workers, thread_name_prefix="tlearn-decode")
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def _decode_batch(chunk: list[tuple[int, Path]], to_pixels: Callable, input_size: int,
                  draft_size: tuple[int, int] | None) -> PixelBatch:
    pixels = np.empty((len(chunk), 3, input_size, input_size), dtype=np.uint8)
    indices, errors = [], []
    for position, path in chunk:
        try:
            pixels[len(indices)] = to_pixels(load_image(path, draft_size))
            indices.append(position)
        except DecodeError as exc:
            errors.append((position, exc.reason))
        except Exception as exc:  # a transform failing on a strange image must not end the run either
            errors.append((position, f"cannot preprocess image ({type(exc).__name__}: {exc})"))
    return PixelBatch(indices, pixels[:len(indices)], errors)
