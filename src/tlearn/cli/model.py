"""Commands on a trained model folder: evaluate, report, export, serve."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlearn.cli.common import USER_ERRORS, CacheDir, Engine, EngineName, ModelFolder, Precision, Quiet, app, fail
from tlearn.console import out, print_evaluation
from tlearn.errors import InvalidParameter
from tlearn.evaluate import painter
from tlearn.outputs import terminal_text


class SplitName(str, Enum):  # what `evaluate` scores: tlearn.scoring.EVALUATION_SPLITS (not imported: seconds)
    auto = "auto"
    test = "test"
    val = "val"
    train = "train"
    all = "all"


@app.command()
def evaluate(
    model: ModelFolder,
    data: Annotated[Path, typer.Argument(help="Dataset folder with the same classes.")],
    split: Annotated[SplitName, typer.Option(help="What to score: auto (the test split, or val, of the folder the "
                                                  "model was trained on; every image of any other folder), test, "
                                                  "val, train or all. Images that trained the model are left out "
                                                  "(not from the training folder's own train split).")
                     ] = SplitName.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    engine: Engine = EngineName.auto,
    precision: Precision = None,
) -> None:
    """Measure a trained model on DATA: its test split when DATA is the training folder, all of it when it is new."""
    import tlearn

    try:
        metrics = tlearn.load(model, cache_dir=cache_dir, progress=not (quiet or as_json), engine=engine.value,
                              precision=precision and precision.value).evaluate(data, split.value)
    except USER_ERRORS as exc:
        fail(exc)
    if as_json:
        print(json.dumps(metrics, indent=1))
        return
    print_evaluation(metrics, metrics["evaluated"]["split"])


@app.command()
def report(
    model: ModelFolder,
    data: Annotated[Optional[Path], typer.Argument(help="Dataset folder (default: the one it was trained on).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o",
                                                    help="Report folder (default: MODEL/report).")] = None,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """Write an HTML report (metrics with confidence intervals, confusion matrix, calibration, mistakes)."""
    import tlearn

    painter.start()
    try:
        path = tlearn.load(model, cache_dir=cache_dir, progress=not quiet).report(out_dir or model / "report", data)
    except USER_ERRORS as exc:
        fail(exc)
    out.print(f"report: {terminal_text(path)}", highlight=False)


@app.command()
def export(
    model: ModelFolder,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="ONNX file to write "
                                                     "(default: MODEL/model.onnx, or model-int8.onnx).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Quantise the backbone to int8 (static, calibrated on the "
                                                      "training images); looser verification tolerance.")] = False,
    images: Annotated[Optional[list[Path]], typer.Option(
        help="Images or folders to verify on (default: the model's test/val images).")] = None,
    format: Annotated[str, typer.Option("--format", help="onnx: one ONNX file; openvino: OpenVINO IR (model.xml "
                                                         "with model.bin beside it), converted from the verified "
                                                         "ONNX export and verified again.")] = "onnx",
) -> None:
    """Export the whole classifier as one ONNX file, or OpenVINO IR (pixels in, calibrated probabilities out),
    verified against the torch model."""
    import tlearn

    if format not in ("onnx", "openvino"):
        fail(InvalidParameter(f"--format must be onnx or openvino, not {format!r}"))
    if format == "openvino" and int8:
        fail(InvalidParameter("--int8 is for the ONNX export: an OpenVINO export is fp32 (OpenVINO runs it in "
                              "bf16 where the CPU has it)"))
    default = "model.xml" if format == "openvino" else ("model-int8.onnx" if int8 else "model.onnx")
    out_file = out_file or model / default
    try:
        classifier = tlearn.load(model, progress=False)
        check = classifier.export_openvino(out_file, images=images) if format == "openvino" else \
            classifier.export(out_file, int8=int8, images=images)
    except USER_ERRORS as exc:
        fail(exc)
    size = sum(p.stat().st_size for p in {Path(check.path), Path(check.path).with_suffix(".bin")} if p.is_file())
    what = "OpenVINO IR (.xml + .bin)" if format == "openvino" else check.precision
    out.print(f"wrote {check.path} ({size / 1e6:.1f} MB, {what}): input uint8 pixels, output calibrated class "
              "probabilities; classes and preprocessing in its metadata", highlight=False)
    bound = check.tolerance
    runtime = "OpenVINO" if format == "openvino" else "onnxruntime"
    out.print(f"verified with {runtime} against torch on {check.image_source}: probabilities differ by at most "
              f"{check.max_abs_diff:.2e} (tolerance {bound['max_abs_diff']:g}), mean {check.mean_abs_diff:.2e} "
              f"(tolerance {bound['mean_abs_diff']:g}); top-1 agreement {check.top1_agreement:.1%} "
              f"(tolerance >= {bound['top1_agreement']:.0%})", highlight=False)


@app.command()
def serve(
    model: ModelFolder,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most images per engine call (requests are merged).")] = 16,
    batch_timeout_ms: Annotated[float, typer.Option(help="How long an image waits for others to fill a batch.")
                                ] = 5.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (413 above).")] = 20.0,
    max_images: Annotated[int, typer.Option(help="Most images per request (413 above).")] = 32,
    max_pixels: Annotated[int, typer.Option(help="Most decoded pixels per image, checked before decoding "
                                                 "(413 above).")] = 40_000_000,
    queue: Annotated[int, typer.Option(help="Most requests in the server at once (503 + Retry-After above).")] = 64,
    timeout_s: Annotated[float, typer.Option(help="Most seconds per request (504 above).")] = 10.0,
    token: Annotated[Optional[str], typer.Option(envvar="TLEARN_TOKEN", help="Require 'Authorization: Bearer "
                                                 "TOKEN' (401 otherwise); health probes stay open.")] = None,
    name: Annotated[Optional[str], typer.Option(help="The model's name in URLs (default: the folder's name).")
                    ] = None,
    min_confidence: Annotated[Optional[float], typer.Option(help="Label predictions whose calibrated top "
                                                            "probability is below this 'uncertain'.",
                                                            min=0.0, max=1.0)] = None,
    decode_threads: Annotated[int, typer.Option(help="Threads decoding uploaded images.")] = 2,
    engine: Engine = EngineName.auto,
) -> None:
    """Serve a model over HTTP: a web page, POST /v1/predict, KServe v2, TorchServe-style routes, /metrics."""
    import os

    from tlearn.serve import ServeSettings, run

    if token is None and os.environ.get("TLEARN_TOKEN") == "":  # click reads an empty variable as unset
        token = ""
    try:
        settings = ServeSettings(name=name or model.resolve().name, max_batch=max_batch,
                                 batch_timeout_ms=batch_timeout_ms, max_body_mb=max_body_mb, max_images=max_images,
                                 max_pixels=max_pixels, queue=queue, timeout_s=timeout_s, token=token,
                                 min_confidence=min_confidence, decode_threads=decode_threads)
        run(model, settings, host=host, port=port, engine=engine.value)
    except USER_ERRORS as exc:
        fail(exc)
