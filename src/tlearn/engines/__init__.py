"""Inference engines behind one interface, chosen by name or `auto`, exported once and checked against torch.

`open_engine(model, preprocessing, folder, engine, precision)` returns a callable: uint8 pixels (n, 3, H, W) ->
float32 outputs. Exported files (ONNX, int8 ONNX, OpenVINO's compiled blobs) and the verification verdicts live in
`folder` (the bundle's engines/ folder for prediction, the feature cache for extraction), keyed by the weights.

Importing this package does not import torch (the runtimes and exporters are loaded on first use): a re-train on
cached features and the command line's start-up do not pay for it.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata, util
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from tlearn.backbones import Preprocessing, state_sha256
from tlearn.data.pipeline import PixelBatch, pixel_batches
from tlearn.errors import EngineError
from tlearn.files import sha256_file, write_atomically

if TYPE_CHECKING:
    from torch import nn

    from tlearn.engines.reference import PixelsToOutputs




ENGINES = ("auto", "openvino", "onnx", "torch")
PRECISIONS = ("fp32", "bf16", "int8")
FASTEST_FIRST = ("openvino", "onnx", "torch")  # measured, bench/README.md "Throughput"
# Verification against eager torch fp32 on real photos: fp32 engines must agree to this absolute difference
# (outputs are pooled features in [0, 6] or logits); reduced precisions must keep every output row this close in
# direction (their cost in accuracy is measured separately, bench/precision.py).
FP32_MAX_ABS_DIFF = 1e-3
REDUCED_MIN_COSINE = 0.95

Calibration = Callable[[], Iterable[np.ndarray]]
REFERENCE_FILE = "reference.safetensors"
ENGINE_FORMAT = 2  # 2: the eager-torch reference outputs are kept beside the exported files

__all__ = ["ENGINES", "PRECISIONS", "EngineError", "PixelsToOutputs", "engine_key", "open_engine", "open_exported",
           "state_key",
           "export_onnx", "probe_pixels", "run_batches", "compare", "stream_pixels", "decode_processes", "TorchEngine",
           "open_files",
           "read_reference", "torch_reference", "run_concurrent"]
_LAZY = {"PixelsToOutputs": "reference", "TorchEngine": "reference", "OnnxEngine": "runtimes",
         "OpenVinoEngine": "runtimes", "export_onnx": "export", "quantise_int8": "export"}


def __getattr__(name: str):
    """The torch-based parts, imported on first use (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tlearn.engines.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stream_pixels(paths: Sequence[Path], preprocessing: Preprocessing, batch_size: int = 32,
                  workers: int | None = None, draft: bool = True, engine: object = None) -> Iterator[PixelBatch]:
    """uint8 batches of `paths` preprocessed exactly as in training (resize, centre crop; engines normalise).

    With `draft`, JPEGs at least four times the resize target are decoded at a reduced scale first (DCT scaling),
    to no less than twice the target, so the bicubic resize after it still has pixels to average. `engine`: the
    engine the batches feed; one on a GPU (`decode_processes`) gets them decoded in worker processes.
    """
    draft_size = preprocessing.draft_size() if draft else None
    return pixel_batches(paths, preprocessing.to_pixels, preprocessing.input_size, batch_size, workers, draft_size,
                         processes=decode_processes(engine))


def decode_processes(engine: object) -> bool:
    """Whether `engine` wants its pixels decoded in worker processes (a torch engine on a GPU) rather than threads."""
    return bool(getattr(engine, "decode_processes", False))


def run_batches(engine: Callable[[np.ndarray], np.ndarray], batches: Iterable[PixelBatch]
                ) -> Iterator[tuple[PixelBatch, np.ndarray | None]]:
    """(batch, engine outputs) for each batch, in order (None for a batch with no readable image). Engines that
    can (OpenVINO) overlap the next batch's forward pass with handing back this one's."""
    pipelined = getattr(engine, "pipelined", None)
    if pipelined is not None:
        yield from pipelined(batches)
        return
    for batch in batches:
        yield batch, engine(batch.pixels) if len(batch.indices) else None


def run_concurrent(engine: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, lock) -> np.ndarray:
    """`engine`'s outputs for `pixels` from a caller that runs beside others in threads (a Ray actor's calls): the
    batch whole on one of the engine's streams, callers on the others at the same time (OpenVINO's run_whole);
    an engine without streams runs one caller at a time, under `lock`."""
    run_whole = getattr(engine, "run_whole", None)
    if run_whole is not None:
        return run_whole(pixels)
    with lock:
        return engine(pixels)


def engine_key(model: nn.Module, preprocessing: Preprocessing) -> str:
    """Key of the exported files of `model`: its exact tensors and the preprocessing folded into the graph."""
    return state_key({name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()},
                     preprocessing)


def state_key(state: dict[str, np.ndarray], preprocessing: Preprocessing) -> str:
    """engine_key of the network whose state dict is `state`, computed without building it."""
    blob = json.dumps([ENGINE_FORMAT, preprocessing.to_dict(), state_sha256(state)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def open_exported(key: str, folder: Path, engine: str = "auto", precision: str = "fp32", threads: int | None = None):
    """The engine open_engine would give for the network with engine key `key`, from the files it exported and
    verified before, without building the network (no torch); None when it has not done so yet."""
    folder = Path(folder) / key
    model_file = folder / f"model-{'int8' if precision == 'int8' else 'fp32'}.onnx"
    if not (intact(model_file) and intact(folder / REFERENCE_FILE)):
        return None
    try:
        return open_files(model_file, folder / REFERENCE_FILE, recorded_verdicts(folder), engine, precision,
                          threads, folder / "openvino-cache")
    except EngineError:
        return None


def open_files(model_file: Path, reference_file: Path, verdicts: dict, engine: str = "auto",
               precision: str = "fp32", threads: int | None = None, compile_cache: Path | None = None):
    """The fastest installed runtime (or `engine`) that runs the exported `model_file` at `precision` and agrees
    with the eager-torch outputs in `reference_file`: by a verdict recorded for this runtime's version in
    `verdicts`, else checked now against the reference (no torch needed). EngineError says why none does."""
    check_choice_engine(engine, precision)
    from tlearn.engines.runtimes import OnnxEngine, OpenVinoEngine

    reasons = []
    for name in (FASTEST_FIRST if engine == "auto" else (engine,)):
        runtime = {"onnx": OnnxEngine, "openvino": OpenVinoEngine}.get(name)
        if runtime is None:
            reasons.append(f"{name}: needs the network itself (torch), not an exported file")
            continue
        if not installed(name) or precision not in runtime.precisions:
            reasons.append(f"{name}: {'not installed' if not installed(name) else f'does not run {precision}'}")
            continue
        try:
            opened = (OnnxEngine(model_file, precision, threads) if name == "onnx"
                      else OpenVinoEngine(model_file, precision, threads, compile_cache))
        except Exception as exc:  # a damaged file or a runtime refusing it: try the next one
            reasons.append(f"{name}: cannot load {Path(model_file).name} ({type(exc).__name__}: {exc})")
            continue
        verdict = verdicts.get(_verdict_key(name, precision)) or compare(opened, *read_reference(reference_file))
        if verdict["ok"]:
            return opened
        reasons.append(f"{name}: disagrees with torch ({verdict['detail']})")
    raise EngineError(f"no engine runs {Path(model_file).name} at {precision} here ({'; '.join(reasons)})")


def check_choice_engine(engine: str, precision: str) -> None:
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


def read_reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probe pixels, eager-torch fp32 outputs) an exported engine is verified against."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
        return tensors["pixels"], tensors["outputs"]
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise EngineError(f"{path} is not a readable engine reference ({exc})") from None


def installed(name: str) -> bool:
    module = {"onnx": "onnxruntime", "openvino": "openvino", "torch": "torch"}[name]
    return util.find_spec(module) is not None


def open_engine(model: nn.Module, preprocessing: Preprocessing, folder: Path, engine: str = "auto",
                precision: str = "fp32", calibration: Calibration | None = None, threads: int | None = None):
    """The engine running `model` (normalisation included) at `precision`, verified against eager torch.

    `auto` takes the fastest installed engine that runs `precision` and passes verification. int8 needs
    `calibration` (uint8 batches of training images) the first time, to build the quantised model.
    """
    check_choice_engine(engine, precision)
    from tlearn.engines.reference import PixelsToOutputs

    graph = PixelsToOutputs(model, preprocessing)
    folder = Path(folder) / engine_key(model, preprocessing)
    if engine != "auto":
        return _open_verified(engine, graph, folder, precision, calibration, threads)
    reasons = []
    for name in FASTEST_FIRST:
        if not installed(name):
            reasons.append(f"{name}: not installed")
            continue
        try:
            return _open_verified(name, graph, folder, precision, calibration, threads)
        except EngineError as exc:
            reasons.append(f"{name}: {exc}")
    raise EngineError(f"no engine runs {precision} here ({'; '.join(reasons)})")


def _open_verified(name: str, graph: PixelsToOutputs, folder: Path, precision: str, calibration: Calibration | None,
                   threads: int | None):
    from tlearn.engines.reference import TorchEngine
    from tlearn.engines.runtimes import OnnxEngine, OpenVinoEngine

    if name == "torch":
        return TorchEngine(graph, precision)
    if not installed(name):
        package = "onnxruntime" if name == "onnx" else "openvino"
        raise EngineError(f"the {name} engine is not installed: pip install {package}")
    runtime = OnnxEngine if name == "onnx" else OpenVinoEngine
    if precision not in runtime.precisions:
        raise EngineError(f"the {name} engine does not run {precision}")
    model_file = _model_file(graph, folder, precision, calibration)
    try:
        if name == "onnx":
            engine = OnnxEngine(model_file, precision, threads)
        else:
            engine = OpenVinoEngine(model_file, precision, threads, folder / "openvino-cache")
    except EngineError:
        raise
    except Exception as exc:  # a runtime refusing the model must let `auto` try the next engine
        raise EngineError(f"{name} cannot load {model_file.name} ({type(exc).__name__}: {exc})") from None
    verdict = _cached_verdict(folder, name, precision, lambda: compare(engine, *torch_reference(graph, folder)))
    if not verdict["ok"]:
        raise EngineError(f"{name} {precision} disagrees with torch on real photos ({verdict['detail']})")
    return engine


def _model_file(graph: PixelsToOutputs, folder: Path, precision: str, calibration: Calibration | None) -> Path:
    from tlearn.engines.export import export_onnx, quantise_int8

    fp32_file = folder / "model-fp32.onnx"
    if not intact(fp32_file):  # never exported, or changed since: (re-)export, and verify anew
        _forget(folder)
        export_onnx(graph, fp32_file)
        _remember(fp32_file)
    if precision != "int8":
        return fp32_file  # bf16 is a compile-time setting of OpenVINO, not a different file
    int8_file = folder / "model-int8.onnx"
    if not intact(int8_file):
        if calibration is None:
            raise EngineError("no int8 model is built for these weights yet, and building one needs calibration "
                              "images: train (or extract features) with --precision int8 first")
        _forget(folder, verdicts_only=True)
        quantise_int8(fp32_file, int8_file, calibration())
        _remember(int8_file)
    return int8_file


DIGESTS = "files.json"  # SHA-256 of each exported file, recorded when it is written, checked before it is used


def intact(path: Path) -> bool:
    """`path` exists and is the file that was exported there (its SHA-256 as recorded in files.json)."""
    try:
        recorded = json.loads((path.parent / DIGESTS).read_text())
        return path.exists() and recorded.get(path.name) == sha256_file(path)
    except (OSError, ValueError, AttributeError):
        return False


def _remember(path: Path) -> None:
    try:
        recorded = json.loads((path.parent / DIGESTS).read_text())
    except (OSError, ValueError):
        recorded = {}
    recorded[path.name] = sha256_file(path)
    write_atomically(path.parent / DIGESTS, lambda tmp: Path(tmp).write_text(json.dumps(recorded, indent=1)))


def _forget(folder: Path, verdicts_only: bool = False) -> None:
    """Verdicts (and the reference) belong to the files they were made on: drop them when a file is remade."""
    for name in ("verified.json",) if verdicts_only else ("verified.json", REFERENCE_FILE):
        (folder / name).unlink(missing_ok=True)


def _cached_verdict(folder: Path, name: str, precision: str, compute: Callable[[], dict]) -> dict:
    records, key = recorded_verdicts(folder), _verdict_key(name, precision)
    if key not in records:
        records[key] = compute()
        write_atomically(folder / "verified.json", lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1)))
    return records[key]


def recorded_verdicts(folder: Path) -> dict:
    """The verdicts recorded in `folder`'s verified.json ({} when there are none)."""
    try:
        return json.loads((folder / "verified.json").read_text())
    except (OSError, ValueError):
        return {}


def _verdict_key(name: str, precision: str) -> str:
    return f"{name}-{metadata.version('onnxruntime' if name == 'onnx' else name)}-{precision}"


def torch_reference(graph: PixelsToOutputs, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probe pixels, eager torch fp32 outputs of `graph` on them), computed once and kept in `folder`: exported
    engines are verified against them, then and wherever the files travel (no torch needed there)."""
    from safetensors.numpy import save_file

    from tlearn.engines.reference import TorchEngine

    path = Path(folder) / REFERENCE_FILE
    if intact(path):
        return read_reference(path)
    pixels = probe_pixels(graph.preprocessing)
    outputs = TorchEngine(graph, "fp32")(pixels)
    write_atomically(path, lambda tmp: save_file({"pixels": np.ascontiguousarray(pixels),
                                                  "outputs": np.ascontiguousarray(outputs)}, tmp))
    _remember(path)
    return pixels, outputs


def compare(engine, pixels: np.ndarray, expected: np.ndarray) -> dict:
    """Compare `engine` with eager torch fp32's `expected` outputs on `pixels`: max abs difference and worst row
    cosine; fp32 must agree to FP32_MAX_ABS_DIFF, reduced precisions to REDUCED_MIN_COSINE."""
    outputs = engine(pixels)
    diff = float(np.abs(outputs - expected).max())
    cosine = float(min(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
                       for a, b in zip(outputs, expected)))
    ok = diff <= FP32_MAX_ABS_DIFF if engine.precision == "fp32" else cosine >= REDUCED_MIN_COSINE
    return {"ok": bool(ok), "max_abs_diff": diff, "min_cosine": cosine,
            "detail": f"max abs diff {diff:.2e}, worst cosine {cosine:.4f} on {len(pixels)} photos"}


PROBE_PHOTOS = (("astronaut", "astronaut.png"), ("coffee", "coffee.png"), ("chelsea", "chelsea.png"),
                ("rocket", "rocket.jpg"), ("immunohistochemistry", "ihc.png"),
                ("hubble_deep_field", "hubble_deep_field.jpg"), ("camera", "camera.png"))


def probe_pixels(preprocessing: Preprocessing) -> np.ndarray:
    """The colour photos scikit-image ships (always present, offline), preprocessed: uint8 (n, 3, H, W). Read from
    its data folder by Pillow (the pixels its loaders give: they read the same files through Pillow) without
    skimage.io, whose import scans its plugins: 0.4 s of a first train."""
    from PIL import Image
    from skimage import data as skdata

    folder = Path(skdata.__file__).parent

    def photo(loader: str, name: str) -> Image.Image:
        if (folder / name).is_file():
            with Image.open(folder / name) as image:
                return image.convert("RGB")
        return Image.fromarray(getattr(skdata, loader)()).convert("RGB")

    return np.stack([preprocessing.to_pixels(photo(loader, name)) for loader, name in PROBE_PHOTOS])
