"""One request's way through the server: admit -> decode (threads) -> micro-batch (engine) -> probabilities."""
from __future__ import annotations

import asyncio

import numpy as np

from tlearn.serve.batcher import MicroBatcher
from tlearn.serve.decoding import PixelDecoder
from tlearn.serve.limits import Admission, Rejection, ServeSettings
from tlearn.serve.metrics import ServeMetrics


class InferenceService:
    """The Predictor behind the routes: every protocol module calls `classify` and formats its answer."""

    def __init__(self, predictor, settings: ServeSettings):
        self.predictor, self.settings = predictor, settings
        card = predictor.card.to_dict()
        self.identity = {"name": settings.name, "backbone": str(card.get("backbone", "")),
                         "model_sha256": str(card.get("model_sha256", "")), "engine": str(card.get("engine", "")),
                         "tlearn_version": str(card.get("tlearn_version", ""))}
        self.metrics = ServeMetrics(self.identity)
        self.decoder = PixelDecoder(predictor, settings.max_pixels, settings.decode_threads)
        self.batcher = MicroBatcher(predictor.probabilities, settings.max_batch, settings.batch_timeout_ms,
                                    self.metrics.observe_batch)
        self.admission = Admission(settings.queue)
        self.ready = False      # set once a warm-up inference has passed
        self.draining = False   # set on SIGTERM: stop advertising readiness, finish what is in flight
        self.received = self.answered = 0  # HTTP requests, counted by app.RequestMetrics (logged at shutdown)
        self._warm_up: asyncio.Task | None = None

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    def card(self) -> dict:
        return {**self.predictor.card.to_dict(), "served_as": self.settings.name}

    async def start(self) -> None:
        self.batcher.start()
        self._warm_up = asyncio.get_running_loop().create_task(self._warm())

    async def stop(self) -> None:
        if self._warm_up is not None:
            await asyncio.gather(self._warm_up, return_exceptions=True)
        await self.batcher.stop()
        self.decoder.close()

    async def _warm(self) -> None:
        # a full batch through the engine: first-call allocations and kernel selection happen here, not in a request
        size = self.predictor.input_size
        await self.batcher.infer(np.full((self.settings.max_batch, 3, size, size), 127, np.uint8))
        self.ready = True

    async def classify(self, images: list[bytes | np.ndarray]) -> np.ndarray:
        """float64 (n, classes) calibrated probabilities of n encoded images or RGB arrays, in order."""
        with self.admission:
            self.metrics.in_flight.set(self.admission.in_flight)
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    pixels = await self.decoder.pixels(images)
                    self.metrics.waiting_images.set(self.batcher.waiting + len(pixels))
                    return await self.batcher.infer(pixels)
            except TimeoutError:
                raise Rejection(504, "timeout-s", f"no answer within {self.settings.timeout_s:g} s "
                                                  "(--timeout-s)") from None
            finally:
                self.metrics.in_flight.set(self.admission.in_flight - 1)
                self.metrics.waiting_images.set(self.batcher.waiting)

    def ranked(self, probabilities: np.ndarray, top_k: int, min_confidence: float | None) -> list:
        """One Prediction per row, through Predictor.rank (the same ranking as `tlearn predict`)."""
        threshold = self.settings.min_confidence if min_confidence is None else min_confidence
        k = max(1, min(top_k, len(self.classes)))
        return [self.predictor.rank(f"<image {i}>", row, top_k=k, min_confidence=threshold)
                for i, row in enumerate(probabilities)]
