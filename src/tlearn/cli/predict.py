"""`tlearn predict`: labels for images, as CSV or JSON, or Parquet parts on one machine or a Ray cluster."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from tlearn.cli.common import USER_ERRORS, Device, Engine, EngineName, ModelFolder, Precision, Quiet, app, fail
from tlearn.console import err
from tlearn.errors import TlearnError
from tlearn.outputs import terminal_text

if TYPE_CHECKING:
    from tlearn.predict import Unreadable


class Format(str, Enum):
    csv = "csv"
    json = "json"


@app.command()
def predict(
    model: ModelFolder,
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
    device: Device = "auto",
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
    rank: Annotated[bool, typer.Option("--rank", help="Order the images by how much labelling them should help "
                                                      "(uncertainty + diversity), most useful first: "
                                                      "rank,path,label,score,uncertainty,novelty.")] = False,
    uncertainty: Annotated[str, typer.Option(help="--rank: margin or entropy.")] = "margin",
    diverse: Annotated[int, typer.Option(help="--rank: how many first picks also weigh diversity (0: uncertainty "
                                              "alone).", min=0)] = 1000,
) -> None:
    """Predict labels for images, one row per image (progress and unreadable files on stderr). With --output
    OUT.parquet: a folder of Parquet parts with a manifest, unreadable files as rows (see docs/scale-out.md).

    Exit code 0: every image predicted; 1: some files could not be read (the others are written); 2: nothing
    to predict, or a usage error."""
    if rank:
        _rank(model, paths, output, force, uncertainty, diverse, engine, precision, batch_size)
        return
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
                          batch_size=batch_size, device=device)
        clf.predictor()  # the engine opened (or the device refused) before anything is written
        k = min(top_k, len(clf.classes_))
        rows = clf.iter_predict(files, top_k=k, min_confidence=min_confidence)
        unreadable = [Unreadable(os.fsdecode(p.path), p.reason) for p in problems]
        written = _write_predictions(rows, fmt, output, k, min_confidence is not None, unreadable,
                                     progress=len(files) if not quiet and len(files) >= PROGRESS_FROM else 0)
    except USER_ERRORS as exc:
        fail(exc)
    _finish(unreadable, output and f"wrote {written} prediction(s) to {terminal_text(output)}")


def _finish(unreadable: list, done: str | None) -> None:
    """The files that could not be read (one line each), what was written, and exit 1 when some were unreadable."""
    for u in unreadable:
        err.print(f"unreadable: {terminal_text(u.source)}: {terminal_text(u.reason)}", highlight=False,
                  soft_wrap=True)
    if done:
        err.print(done, highlight=False, soft_wrap=True)
    if unreadable:
        raise typer.Exit(1)


PROGRESS_FROM = 64  # images; fewer are predicted before a bar would be worth drawing


def _write_predictions(rows, fmt: Format, output: Optional[Path], k: int, with_top_label: bool,
                       unreadable: list[Unreadable], progress: int) -> int:
    """Write the predictions to `output` (whole or not at all) or standard output, a bar on stderr when
    `progress` (the number of images) is not 0; return how many were written."""
    from rich.progress import Progress

    from tlearn.outputs import atomic_text_file, stdout_text, write_predictions

    opened = atomic_text_file(output, "--output") if output else stdout_text()
    with opened as sink, Progress(console=err, transient=True, disable=not progress) as bar:
        task = bar.add_task("predicting", total=progress or None)
        return write_predictions(rows, sink, fmt.value, k, with_top_label, unreadable,
                                 advance=lambda: bar.advance(task))


def _rank(model: Path, paths: list[str], output: Optional[Path], force: bool, measure: str, diverse: int, engine,
          precision, batch_size: int) -> None:
    """`--rank`: every readable image once, in the order to label them (tlearn.evaluate.acquisition)."""
    import tlearn
    from tlearn.data.discovery import find_images
    from tlearn.errors import check_choice
    from tlearn.evaluate.acquisition import MEASURES, rank_for_labelling
    from tlearn.outputs import atomic_text_file, check_output_path, csv_cell, csv_writer, stdout_text
    from tlearn.predict import Unreadable

    try:
        check_choice("uncertainty", measure, MEASURES)
        if output is not None:
            if output.suffix.lower() not in (".csv", ".parquet"):
                raise TlearnError("--rank writes CSV (--output FILE.csv) or Parquet (--output FILE.parquet)")
            check_output_path(output, force)
        files, problems = find_images(paths)
        if not files:
            raise TlearnError("nothing to rank: no image files in the paths given")
        predictor = tlearn.load(model, progress=False, engine=engine.value, precision=precision and precision.value,
                                batch_size=batch_size).predictor()
        kept, features, proba, unreadable = predictor.score_files(files)
        unreadable = [Unreadable(os.fsdecode(p.path), p.reason) for p in problems] + unreadable
        if not kept:
            raise TlearnError("nothing to rank: no image could be read")
        ranked = rank_for_labelling(features, proba, measure=measure, diverse=diverse)
        rows = [(r + 1, os.fsdecode(files[kept[i]]), predictor.classes[int(proba[i].argmax())],
                 float(proba[i].max()), float(ranked.uncertainty[i]), float(ranked.novelty[i]))
                for r, i in enumerate(ranked.order)]
        columns = ("rank", "path", "label", "score", "uncertainty", "novelty")
        if output is not None and output.suffix.lower() == ".parquet":
            from tlearn.errors import require

            require("pyarrow", "parquet", "Parquet output")
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({c: [row[n] for row in rows] for n, c in enumerate(columns)})
            tmp = output.with_name(output.name + ".tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, output)
        else:
            with (atomic_text_file(output, "--output") if output else stdout_text()) as sink:
                writer = csv_writer(sink)
                writer.writerow(columns)
                for r, path, label, *numbers in rows:
                    writer.writerow([r, csv_cell(path), csv_cell(label), *(f"{v:.6g}" for v in numbers)])
    except USER_ERRORS as exc:
        fail(exc)
    _finish(unreadable, output and f"ranked {len(rows)} image(s) into {terminal_text(output)}")


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
    except USER_ERRORS as exc:
        fail(exc)
    err.print(f"wrote {manifest['rows_this_run']} row(s) ({manifest['errors_this_run']} unreadable) to {output} in "
              f"{manifest['seconds']:.1f}s ({manifest['images_per_second'] or 0:.0f} images/s, {manifest['mode']}, "
              f"{manifest['cores']} cores); {manifest['rows']} row(s) in all", highlight=False)
    if manifest["errors_this_run"]:
        raise typer.Exit(1)  # as for CSV/JSON: some files could not be read (their rows say why)


@app.command()
def explain(
    model: ModelFolder,
    paths: Annotated[list[str], typer.Argument(help="Image files or folders (searched recursively).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the overlays (<name>.heat.png each); "
                                                              "only heat maps tlearn wrote are ever replaced.")],
    class_: Annotated[Optional[str], typer.Option("--class", help="Class to explain (default: each image's "
                                                                  "top-1 class).")] = None,
    engine: Engine = EngineName.auto,
) -> None:
    """Write a heat map of each image (a class activation map in jet colours over the photo, PNG): where the
    model found the evidence for its class. No torch needed. Exit 2 (nothing written) for a class the model does
    not have, an image that does not decode, or a file in the way."""
    import tlearn
    from tlearn.data.discovery import find_images
    from tlearn.explain import write_overlays

    try:
        files, problems = find_images(paths)
        if problems:
            raise TlearnError(f"{problems[0].path}: {problems[0].reason}")
        if not files:
            raise TlearnError("nothing to explain: no image files in the paths given")
        written = write_overlays(tlearn.load(model, progress=False, engine=engine.value).predictor(), files,
                                 out_dir, class_)
    except USER_ERRORS as exc:
        fail(exc)
    for target, explanation in written:
        err.print(f"{terminal_text(explanation.source)}: {terminal_text(explanation.label)} "
                  f"({explanation.probability:.1%}) -> {terminal_text(target)}", highlight=False, soft_wrap=True)
