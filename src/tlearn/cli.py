"""`tlearn` command line: parse arguments, call the Python API, print. No logic of its own."""
from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from rich.table import Table

from tlearn.console import err, out, print_doctor, print_evaluation, print_summary
from tlearn.errors import TlearnError
from tlearn.evaluate import painter
from tlearn.outputs import terminal_text  # light: rich.markup and the standard library

if TYPE_CHECKING:
    from tlearn.predict import Unreadable

# Everything else is imported inside the command that needs it: `tlearn --help` and `tlearn predict` must start
# fast, and predicting needs no torch.

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and use image classifiers by transfer learning, on CPU, offline.")

CacheDir = Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: $TLEARN_CACHE or "
                                                       "~/.cache/tlearn).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


class EngineName(str, Enum):
    auto = "auto"
    openvino = "openvino"
    onnx = "onnx"
    torch = "torch"


class PrecisionName(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"


Engine = Annotated[EngineName, typer.Option(help="Inference engine for the backbone; auto: the fastest installed "
                                                 "one that agrees with torch on this model.")]
Precision = Annotated[Optional[PrecisionName], typer.Option(
    help="Precision of the frozen-backbone forward (int8 is calibrated on training images) "
         "(default: fp32 for train, the model's own otherwise).")]


class Recipe(str, Enum):
    head = "head"
    finetune = "finetune"
    auto = "auto"


class Format(str, Enum):
    csv = "csv"
    json = "json"


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {terminal_text(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


# Problems a user can fix: one line and exit 2. Anything else is a bug and shows its traceback (exit 1).
_USER_ERRORS = (TlearnError,)


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="Dataset folder: one sub-folder per class, or train/ val/ test/.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Model folder to write "
                                                    "(default: ./<data folder name>-model).")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone name (see `tlearn backbones`), or auto: a head on each of "
                                          "efficientnet_lite0/1/2 (features cached per backbone), the best on an "
                                          "inner split of train kept.")] = "efficientnet_lite0",
    weights: Annotated[Optional[Path], typer.Option(help="Backbone weights file instead of the registry's.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits and training.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    engine: Engine = EngineName.auto,
    precision: Precision = None,
    recipe: Annotated[Recipe, typer.Option(help="head: linear head on frozen features (seconds). finetune: then "
                                           "unfreeze the top of the backbone and train it (minutes), keeping the "
                                           "stage that does better on an inner split of train (val only reports). "
                                           "auto: fine-tune when there are >= 20 train images "
                                           "per class and the head's val accuracy is below 0.995. The default, head, "
                                           "makes a re-run on the same data take seconds (cached features).")
                    ] = Recipe.head,
    fine_tune: Annotated[bool, typer.Option("--fine-tune", help="Same as --recipe finetune.")] = False,
    epochs: Annotated[int, typer.Option(help="Fine-tuning: most epochs (early stopping may end sooner).")] = 10,
    lr: Annotated[float, typer.Option(help="Fine-tuning: peak learning rate of the head and top layer.")] = 1e-3,
    unfreeze: Annotated[str, typer.Option(help="Fine-tuning: 'top' (the backbone's top blocks), 'all', or module "
                                          "names, e.g. blocks.5,blocks.6,conv_head,bn2.")] = "top",
    augment: Annotated[str, typer.Option(help="Fine-tuning augmentation: none, flip (random resized crop + "
                                         "flip), trivial (+TrivialAugment), randaugment.")] = "flip",
    mixup: Annotated[float, typer.Option(help="Fine-tuning: MixUp alpha (0 = off).")] = 0.0,
    cutmix: Annotated[float, typer.Option(help="Fine-tuning: CutMix alpha (0 = off).")] = 0.0,
    patience: Annotated[int, typer.Option(help="Fine-tuning: stop after this many epochs without a better "
                                          "accuracy on the inner split of train.")] = 4,
    train_bn: Annotated[bool, typer.Option("--train-bn", help="Fine-tuning: train BatchNorm (statistics and "
                                           "weights) in the unfrozen layers (default: frozen).")] = False,
    trunk_cache: Annotated[bool, typer.Option("--trunk-cache/--no-trunk-cache", help="Fine-tuning: train the top on "
                                              "cached activations of the frozen trunk for fixed views of each "
                                              "image (much faster; falls back to whole images when it cannot).")
                           ] = True,
    views: Annotated[int, typer.Option(help="Fine-tuning with the trunk cache: fixed views per train image.")] = 6,
    inner_fraction: Annotated[float, typer.Option(help="Fine-tuning: share of train held out to choose the epoch "
                                                  "and the stage.")] = 0.15,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic torch algorithms.")] = False,
    train_precision: Annotated[str, typer.Option(help="Fine-tuning: Lightning precision: auto (bf16-mixed on a CPU "
                                                 "with bf16 "
                                           "support, else 32-true), 32-true, bf16-mixed, 16-mixed.")] = "auto",
    accelerator: Annotated[str, typer.Option(help="Lightning accelerator: cpu, gpu, tpu, auto.")] = "auto",
    devices: Annotated[str, typer.Option(help="Lightning devices: a count, a list, or auto.")] = "1",
    num_nodes: Annotated[int, typer.Option(help="Lightning: number of nodes.")] = 1,
    strategy: Annotated[str, typer.Option(help="Lightning strategy, e.g. ddp.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted fine-tune from the last "
                                         "checkpoint in OUT/run (same command otherwise).")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="local|auto|ADDRESS", help="Extract the features on "
                                               "Ray Data (the ray extra): 'local', 'auto' or a cluster address.")
                   ] = None,
    mirror: Annotated[str, typer.Option(metavar="off|train|tta|both|auto", help="The head and the image's mirror: "
                                        "train: its features as extra training rows; tta: predict on the mean of "
                                        "the image's and its mirror's features (2 forward passes per image); both; "
                                        "auto: the best of the four on an inner split of train.")] = "off",
) -> None:
    """Train a classifier on DATA and write a model folder (fine-tuning checkpoints and logs in OUT/run)."""
    import tlearn
    from tlearn.train.settings import FinetuneSettings

    out_dir = out_dir or Path(f"{data.resolve().name}-model")
    settings = FinetuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, unfreeze=unfreeze, augment=augment,
                                mixup=mixup, cutmix=cutmix, patience=patience, train_bn=train_bn,
                                precision=train_precision, accelerator=accelerator, devices=devices,
                                num_nodes=num_nodes, strategy=strategy, deterministic=deterministic,
                                trunk_cache=trunk_cache, views=views, inner_fraction=inner_fraction)
    painter.start()  # the report's figures: a second process imports matplotlib while this one trains
    try:
        clf = tlearn.ImageClassifier(backbone, weights=weights, seed=seed, batch_size=batch_size,
                                     cache_dir=cache_dir, progress=not quiet, engine=engine.value,
                                     precision=precision and precision.value,
                                     recipe="finetune" if fine_tune else recipe.value, finetune=settings,
                                     run_dir=out_dir / "run", ray=ray, mirror=mirror).fit(data, resume=resume)
        clf.save(out_dir)
    except _USER_ERRORS as exc:
        _fail(exc)
    print_summary(clf, out_dir)
    out.print(f"report: {terminal_text(out_dir / 'report' / 'report.html')}", highlight=False)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model folder written by `tlearn train`.")],
    data: Annotated[Path, typer.Argument(help="Dataset folder with the same classes.")],
    split: Annotated[str, typer.Option(help="Split to evaluate: train, val or test.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    engine: Engine = EngineName.auto,
    precision: Precision = None,
) -> None:
    """Measure a trained model on one split of DATA."""
    import tlearn

    try:
        metrics = tlearn.load(model, cache_dir=cache_dir, progress=not (quiet or as_json), engine=engine.value,
                              precision=precision and precision.value).evaluate(data, split)
    except _USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(metrics, indent=1))
        return
    print_evaluation(metrics, split)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Model folder written by `tlearn train`.")],
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively), globs; with "
                                              "--output OUT.parquet also manifests (.txt/.csv) and s3:// gs:// "
                                              "URIs.")],
    top_k: Annotated[int, typer.Option(help="How many labels per image, best first.", min=1)] = 1,
    fmt: Annotated[Optional[Format], typer.Option("--format", help="Output format (default: json for an --output "
                                                                  "file named *.json, else csv).")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write here instead of standard output (a new file, or a "
                                                        "previous .csv/.json result).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --output replace any existing file.")] = False,
    engine: Engine = EngineName.auto,
    precision: Precision = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 32,
    min_confidence: Annotated[Optional[float], typer.Option(
        help="Label images whose (calibrated) top probability is below this 'uncertain'.", min=0.0, max=1.0)] = None,
    quiet: Quiet = False,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="local|auto|ADDRESS",
        help="Run on Ray Data (the ray extra): 'local' starts a cluster sized to this machine; 'auto' joins the one "
             "`ray start` made here; host:port or ray://host:10001 joins that one. Needs --output OUT.parquet.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Parquet output: skip the paths OUT.parquet already "
                                                          "holds (after a crash or kill).")] = False,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Parquet output: a column with every "
                                                                        "class's probability.")] = False,
) -> None:
    """Predict labels for images, one row per image (progress and unreadable files on stderr). With --output
    OUT.parquet: a folder of Parquet parts with a manifest, unreadable files as rows (see docs/scale-out.md).

    Exit code 0: every image predicted; 1: some files could not be read (the others are written); 2: nothing
    to predict, or a usage error."""
    if ray is not None or resume or probabilities or (output is not None and output.suffix == ".parquet"):
        _predict_parquet(model, paths, output, ray, resume, top_k, min_confidence, probabilities, engine,
                         precision, batch_size)
        return
    import tlearn
    from tlearn.data.discovery import find_images
    from tlearn.outputs import check_output_path
    from tlearn.predict import Unreadable

    fmt = fmt or (Format.json if output is not None and output.suffix.lower() == ".json" else Format.csv)
    try:
        if output:
            check_output_path(output, force)
        files, problems = find_images(paths)
        if not files:
            raise TlearnError("nothing to predict: " + "; ".join(f"{p.path}: {p.reason}" for p in problems)
                                    if problems else "nothing to predict: no image files in the paths given")
        clf = tlearn.load(model, progress=False, engine=engine.value, precision=precision and precision.value,
                          batch_size=batch_size)
        k = min(top_k, len(clf.classes_))
        rows = clf.iter_predict(files, top_k=k, min_confidence=min_confidence)
        unreadable = [Unreadable(os.fsdecode(p.path), p.reason) for p in problems]
        written = _write_predictions(rows, fmt, output, k, min_confidence is not None, unreadable,
                                     progress=len(files) if not quiet and len(files) >= PROGRESS_FROM else 0)
    except _USER_ERRORS as exc:
        _fail(exc)
    for u in unreadable:
        err.print(f"unreadable: {terminal_text(u.source)}: {terminal_text(u.reason)}", highlight=False,
                  soft_wrap=True)
    if output:
        err.print(f"wrote {written} prediction(s) to {terminal_text(output)}", highlight=False, soft_wrap=True)
    if unreadable:
        raise typer.Exit(1)


PROGRESS_FROM = 64  # images; fewer are predicted before a bar would be worth drawing


def _write_predictions(rows, fmt: Format, output: Optional[Path], k: int, with_top_label: bool,
                       unreadable: list[Unreadable], progress: int) -> int:
    """Write the predictions to `output` (whole or not at all) or standard output, a bar on stderr when
    `progress` (the number of images) is not 0; return how many were written."""
    from rich.progress import Progress

    from tlearn.outputs import atomic_text_file, stdout_text, write_predictions

    opened = atomic_text_file(output) if output else stdout_text()
    with opened as sink, Progress(console=err, transient=True, disable=not progress) as bar:
        task = bar.add_task("predicting", total=progress or None)
        return write_predictions(rows, sink, fmt.value, k, with_top_label, unreadable,
                                 advance=lambda: bar.advance(task))


def _predict_parquet(model: Path, paths: list[str], output: Optional[Path], ray: Optional[str], resume: bool,
                     top_k: int, min_confidence: Optional[float], probabilities: bool, engine, precision,
                     batch_size: int) -> None:
    from tlearn.distributed import predict_to_parquet
    from tlearn.errors import InvalidParameter

    try:
        if output is None or output.suffix != ".parquet":
            raise InvalidParameter("--ray, --resume and --probabilities write Parquet: give --output OUT.parquet")
        manifest = predict_to_parquet(model, paths, output, ray=ray is not None, address=ray, resume=resume,
                                      top_k=top_k, min_confidence=min_confidence, probabilities=probabilities,
                                      engine=engine.value, precision=precision and precision.value,
                                      batch_size=batch_size)
    except _USER_ERRORS as exc:
        _fail(exc)
    err.print(f"wrote {manifest['rows_this_run']} row(s) ({manifest['errors_this_run']} unreadable) to {output} in "
              f"{manifest['seconds']:.1f}s ({manifest['images_per_second'] or 0:.0f} images/s, {manifest['mode']}, "
              f"{manifest['cores']} cores); {manifest['rows']} row(s) in all", highlight=False)
    if manifest["errors_this_run"]:
        raise typer.Exit(1)  # as for CSV/JSON: some files could not be read (their rows say why)


@app.command()
def doctor(
    data: Annotated[Path, typer.Argument(help="Dataset folder to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    quarantine: Annotated[Optional[Path], typer.Option(help="MOVE flagged files into this folder (outside DATA), "
                                                            "with reasons.csv; nothing is deleted.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the carved splits (as in `tlearn train`).")] = 0,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """Check a dataset: unreadable/odd files, duplicates, leakage between splits, conflicting labels, balance.

    Exit code 1 when a problem would corrupt an evaluation (leakage, conflicting labels, unusable layout)."""
    from tlearn.data.doctor import examine_dataset
    from tlearn.data.doctor import quarantine as move_flagged
    from tlearn.outputs import json_text

    try:
        report = examine_dataset(data, seed=seed, progress=not (quiet or as_json), cache_dir=cache_dir)
        moved = move_flagged(report, quarantine) if quarantine else []
    except _USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        print(json_text({**report.to_dict(), "quarantined": moved}))
    else:
        print_doctor(report, moved, quarantine)
    if report.errors:
        raise typer.Exit(1)


@app.command()
def report(
    model: Annotated[Path, typer.Argument(help="Model folder written by `tlearn train`.")],
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
    except _USER_ERRORS as exc:
        _fail(exc)
    out.print(f"report: {terminal_text(path)}", highlight=False)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="Model folder written by `tlearn train`.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="ONNX file to write "
                                                     "(default: MODEL/model.onnx, or model-int8.onnx).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Quantise the backbone to int8 (static, calibrated on the "
                                                      "training images); looser verification tolerance.")] = False,
    images: Annotated[Optional[list[Path]], typer.Option(
        help="Images or folders to verify on (default: the model's test/val images).")] = None,
) -> None:
    """Export the whole classifier as one ONNX file (pixels in, calibrated probabilities out), verified against
    the torch model."""
    import tlearn

    out_file = out_file or model / ("model-int8.onnx" if int8 else "model.onnx")
    try:
        check = tlearn.load(model, progress=False).export(out_file, int8=int8, images=images)
    except _USER_ERRORS as exc:
        _fail(exc)
    out.print(f"wrote {check.path} ({Path(check.path).stat().st_size / 1e6:.1f} MB, {check.precision}): input "
              "uint8 pixels, output calibrated class probabilities; classes and preprocessing in its metadata",
              highlight=False)
    bound = check.tolerance
    out.print(f"verified with onnxruntime against torch on {check.image_source}: probabilities differ by at most "
              f"{check.max_abs_diff:.2e} (tolerance {bound['max_abs_diff']:g}), mean {check.mean_abs_diff:.2e} "
              f"(tolerance {bound['mean_abs_diff']:g}); top-1 agreement {check.top1_agreement:.1%} "
              f"(tolerance >= {bound['top1_agreement']:.0%})", highlight=False)


@app.command()
def backbones() -> None:
    """List the backbones, their input size, parameter count and whether their weights are on this machine."""
    from rich import box

    from tlearn.backbones import BACKBONES, parameter_count, weights_available

    # fits 80 columns: a narrow terminal cuts nothing
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for title in ("name", "architecture (timm)"):
        table.add_column(title, no_wrap=True)
    for title in ("input", "params", "weights"):
        table.add_column(title, no_wrap=True, justify="right" if title == "params" else "left")
    missing = []
    for name, spec in BACKBONES.items():
        here = weights_available(name)
        missing += [] if here else [name]
        table.add_row(name, spec.architecture, f"{spec.preprocessing.input_size}px",
                      f"{parameter_count(name) / 1e6:.1f}M", "[green]yes[/]" if here else "[red]no[/]")
    out.print(table)
    if missing:
        out.print(f"missing weights: `tlearn fetch-weights NAME` on a machine with network (then copy the file "
                  f"here), or `--weights FILE`; for {', '.join(missing)}", highlight=False)


@app.command("fetch-weights")
def fetch_weights_command(
    name: Annotated[str, typer.Argument(help="Backbone name (see `tlearn backbones`).")],
) -> None:
    """Download a backbone's ImageNet weights into the local weights cache (needs network and HF_HUB_OFFLINE=0)."""
    from tlearn.backbones import fetch_weights

    try:
        path = fetch_weights(name)
    except _USER_ERRORS as exc:
        _fail(exc)
    out.print(f"{name}: weights saved to {path}", highlight=False)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the demo data and model.")] = Path("demo-output"),
    cache_dir: CacheDir = None,
) -> None:
    """Build a small real-photo dataset from scikit-image's photos, then train, evaluate and predict on it."""
    from tlearn.data.demo import make_demo_dataset

    data = make_demo_dataset(out_dir / "data")
    out.print(f"demo dataset: {data} (brick / grass / gravel crops of scikit-image's photos)")
    train(data, out_dir / "model", cache_dir=cache_dir)
    evaluate(out_dir / "model", data, split="test", cache_dir=cache_dir)
    out.print("predictions for the test images (top 2):")
    predict(out_dir / "model", [data / "test"], top_k=2)


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="Model folder written by `tlearn train`.")],
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
    from tlearn.serve import ServeSettings, run

    try:
        settings = ServeSettings(name=name or model.resolve().name, max_batch=max_batch,
                                 batch_timeout_ms=batch_timeout_ms, max_body_mb=max_body_mb, max_images=max_images,
                                 max_pixels=max_pixels, queue=queue, timeout_s=timeout_s, token=token or None,
                                 min_confidence=min_confidence, decode_threads=decode_threads)
        run(model, settings, host=host, port=port, engine=engine.value)
    except _USER_ERRORS as exc:
        _fail(exc)


class Interrupted(BaseException):
    """Ctrl-C, raised past click (which would print "Aborted!" and exit 1) so that main can say what was kept."""


def _interrupt(signum, frame) -> None:
    raise Interrupted


def main() -> None:
    """The `tlearn` console script: the typer app, with Ctrl-C explained (exit 130), then a quick exit."""
    import signal

    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except Interrupted:
        err.print("\ninterrupted. Nothing half-written was kept: a model folder is written whole or not at all, and "
                  "any output file only when complete. Features extracted so far are cached: the same command "
                  "continues from there (a fine-tune continues with --resume).", highlight=False)
        _leave(130)
    except SystemExit as done:  # typer ends every command with one
        _leave(done.code)


def _leave(code: int | str | None) -> NoReturn:
    """Exit once the command's work is done and flushed, without the interpreter's teardown.

    Tearing down a process that loaded torch, timm and OpenVINO (freeing ~400,000 objects module by module, then the
    libraries' static destructors) took 1.4-1.7 s here, a sixth of a first `tlearn train`; a re-train spends 0.23 s
    on it. Everything a command writes is closed and fsynced before it returns, and the atexit handlers (Ray's
    shutdown, temporary folders, logging) still run. Non-daemon threads still running (none in tlearn's commands)
    get the normal, waiting exit instead."""
    import atexit
    import threading

    if isinstance(code, str):
        err.print(code, highlight=False)
        code = 1
    code = 0 if code is None else code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        raise SystemExit(code)
    atexit._run_exitfuncs()  # the one way to run them without the teardown that follows in sys.exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), or a stream already closed
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
