"""The exported-graph engines (onnxruntime, OpenVINO): one call, uint8 pixels (n, 3, H, W) in, float32 outputs out.

Normalisation is inside every engine (in the exported graph here, in torch for the reference engine of
reference.py), so all of them see exactly the pixels the pipeline made. No torch here: a model whose engine is
exported and verified predicts without importing it.
"""
from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tlearn.engines import EngineError

# Above this ONNX file size (VGG 528 MB, Inception-ResNet-v2 ~215 MB; EfficientNet-Lite0 18 MB, ResNet-50 ~98 MB)
# a batch is split across OpenVINO's requests rather than one batch per request: see OpenVinoEngine.pipelined.
LARGE_MODEL_BYTES = 150 << 20


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


_openvino_core = None
_openvino_core_lock = threading.Lock()


def openvino_core():
    """The process's one OpenVINO Core, which every OpenVinoEngine compiles with.

    One, never released before the process exits, because each Core loads its own CPU plugin, and that plugin
    (intel_cpu's SigAltStackSetup) mmaps a signal stack and installs it as the calling thread's sigaltstack, then at
    its release munmaps it, putting the previous one back only if its own is still the thread's. Two plugins
    released in the order they were made (engine A, engine B; A goes, then B) leave the thread's signal stack on A's
    unmapped pages; the next signal whose handler runs on the signal stack (every handler Python installs, as torch
    DataLoader's SIGCHLD, and faulthandler's) then kills the process with SIGSEGV, faulthandler unable to say a word.
    That is how a Predictor with its feature-map engine beside its backbone engine crashed a later DataLoader."""
    global _openvino_core
    with _openvino_core_lock:
        if _openvino_core is None:
            import openvino as ov

            _openvino_core = ov.Core()
        return _openvino_core


class OnnxEngine:
    """onnxruntime, CPU, all graph optimisations; int8 runs the statically quantised (QDQ) model."""

    name = "onnx"
    precisions = ("fp32", "int8")

    def __init__(self, model_file: Path, precision: str = "fp32", threads: int | None = None):
        check_precision(self, precision)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.input_name, self.precision = self.session.get_inputs()[0].name, precision

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(pixels)})[0]


class OpenVinoEngine:
    """OpenVINO on the CPU; bf16 is its inference-precision hint, int8 runs the quantised (QDQ) model.

    Compiled blobs are kept in `cache_dir`, so a second start skips the compilation.
    """

    name = "openvino"
    precisions = ("fp32", "bf16", "int8")

    def __init__(self, model_file: Path, precision: str = "fp32", threads: int | None = None,
                 cache_dir: Path | None = None):
        check_precision(self, precision)
        from tlearn.engines.offline import quiet_openvino

        quiet_openvino()
        import openvino as ov

        # THROUGHPUT: several streams, each running its own requests on its own threads (on 2 cores: 2 streams of
        # 1 thread). A stream's thread is never stalled waiting for a sibling that the decoders pre-empted, which
        # one 2-thread request (LATENCY) is: measured end to end on 2 cores, 118-121 img/s with one request of 2
        # threads, 135-142 img/s with 2 streams, 2 requests in flight; forward alone ~190 img/s either way.
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": threads or default_threads(), "PERFORMANCE_HINT": "THROUGHPUT"}
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        self.compiled = openvino_core().compile_model(str(model_file), "CPU", config)
        jobs = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.queue, self.precision = ov.AsyncInferQueue(self.compiled, jobs), precision
        self.queue.set_callback(_keep_output)
        large = Path(model_file).stat().st_size > LARGE_MODEL_BYTES
        self.parts_per_batch = jobs if large else 1
        self._idle: queue.SimpleQueue | None = None  # run_whole's own requests, made on its first call
        self._idle_lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """One batch, split across the requests so that every stream works on it."""
        chunks = [c for c in np.array_split(np.ascontiguousarray(pixels), len(self.queue)) if len(c)]
        slots: list = [None] * len(chunks)
        for i, chunk in enumerate(chunks):
            self.queue.start_async([chunk], (slots, i))
        self.queue.wait_all()
        return np.concatenate(slots)

    def run_whole(self, pixels: np.ndarray) -> np.ndarray:
        """One batch, whole, on one request (one stream): thread-safe, so callers in as many threads as there are
        streams run at once, each stream on its own batch, as `pipelined` keeps them for one caller. This is how a
        Ray actor overlaps decoding with the engine (its calls run in threads); `__call__` instead splits one
        batch across the streams, the shorter wait for a single caller. The requests are this method's own, made on
        its first call, so it may run beside `__call__` and `pipelined`; each holds its own working memory, as the
        queue's do (EfficientNet-Lite0, batch 32: ~320 MiB per request), so an engine used both ways holds both."""
        with self._idle_lock:
            if self._idle is None:
                self._idle = queue.SimpleQueue()
                for _ in range(len(self.queue)):
                    self._idle.put(self.compiled.create_infer_request())
        request = self._idle.get()  # waits while every stream is busy
        try:
            request.infer([np.ascontiguousarray(pixels)])  # the GIL is released while it runs
            return np.array(request.get_output_tensor(0).data, dtype=np.float32)
        finally:
            self._idle.put(request)

    def pipelined(self, batches: Iterable) -> Iterator[tuple[object, np.ndarray | None]]:
        """(batch, outputs) for each batch (a PixelBatch), in order, with the streams kept busy: OpenVINO's
        AsyncInferQueue starts each part on a free request (waiting for one when all are busy) while finished
        batches are handed back and the decoders refill.

        A small network runs a whole batch per request (EfficientNet-Lite0 on 2 cores: 75-76% of the forward-only
        speed end to end, 65-69% splitting batches). A large one splits each batch across the requests, so that
        no more images are in flight than one batch: VGG16 at batch 32 peaks at 3.2 GiB of RSS, not 4.0."""
        pending: deque = deque()  # (batch, the output slots of its parts, or None for a batch with no image)

        def ready() -> bool:
            return pending[0][1] is None or all(part is not None for part in pending[0][1])

        for batch in batches:
            slots = None
            if len(batch.indices):
                parts = [p for p in np.array_split(np.ascontiguousarray(batch.pixels), self.parts_per_batch) if len(p)]
                slots = [None] * len(parts)
                for i, part in enumerate(parts):
                    self.queue.start_async([part], (slots, i))  # waits for a free request when all are busy
            pending.append((batch, slots))
            while pending and ready():
                done, outputs = pending.popleft()
                yield done, None if outputs is None else np.concatenate(outputs)
        self.queue.wait_all()
        while pending:
            done, outputs = pending.popleft()
            yield done, None if outputs is None else np.concatenate(outputs)


def _keep_output(request, slot) -> None:
    """AsyncInferQueue's callback: copy the finished request's output into its batch's slot."""
    slots, i = slot
    slots[i] = np.array(request.get_output_tensor(0).data, dtype=np.float32)


def check_precision(engine, precision: str) -> None:
    if precision not in engine.precisions:
        raise EngineError(f"the {engine.name} engine does not run {precision}; it runs "
                          f"{', '.join(engine.precisions)} (openvino runs fp32, bf16 and int8)")


def keep_freed_memory() -> None:
    """Stop glibc from unmapping and re-faulting torch's activation buffers on every forward pass.

    Equivalent to MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set before start (up to 4x faster at large
    batches); an LD_PRELOADed allocator would do it too but makes OpenVINO abort.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value on 64-bit
    libc.mallopt(m_trim_threshold, 1 << 30)
