"""An asyncio micro-batcher: images from many requests are merged into batches for the model's one engine session.

The first image of a batch waits at most `timeout_ms` for others (up to `max_batch`); the engine runs in one
dedicated thread, so the event loop keeps accepting and decoding while a batch is inferred.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class _Item:
    pixels: np.ndarray          # uint8 (3, H, W)
    done: asyncio.Future        # -> float64 (classes,)


class MicroBatcher:
    def __init__(self, probabilities: Callable[[np.ndarray], np.ndarray], max_batch: int, timeout_ms: float,
                 on_batch: Callable[[int, float], None] = lambda size, seconds: None):
        self.probabilities, self.max_batch, self.timeout_s = probabilities, max_batch, timeout_ms / 1000
        self.on_batch = on_batch
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="tlearn-engine")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="tlearn-batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.engine.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        return self.queue.qsize()

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (n, classes) of uint8 pixels (n, 3, H, W), each image batched with whatever is waiting."""
        loop = asyncio.get_running_loop()
        items = [_Item(p, loop.create_future()) for p in pixels]
        for item in items:
            self.queue.put_nowait(item)
        return np.stack(await asyncio.gather(*(item.done for item in items)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            started = time.perf_counter()
            try:
                proba = await loop.run_in_executor(self.engine, self.probabilities,
                                                   np.stack([item.pixels for item in batch]))
            except Exception as exc:  # a bug or a broken engine: fail these requests, keep serving
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)
                continue
            self.on_batch(len(batch), time.perf_counter() - started)
            for item, row in zip(batch, proba):
                if not item.done.done():  # the request may have timed out meanwhile
                    item.done.set_result(row)

    async def _collect(self) -> list[_Item]:
        batch = [await self.queue.get()]
        if self.queue.qsize() < self.max_batch - 1:
            # sleep rather than wait_for(queue.get()): on 3.11 a get that completes as the timeout fires is lost
            await asyncio.sleep(self.timeout_s)
        while len(batch) < self.max_batch and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return [item for item in batch if not item.done.done()] or await self._collect()
