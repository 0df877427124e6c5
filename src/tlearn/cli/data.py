"""Commands on data and backbones: doctor, backbones, fetch-weights, and the built-in demo."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tlearn.cli.common import USER_ERRORS, CacheDir, Quiet, app, fail
from tlearn.cli.model import SplitName, evaluate
from tlearn.cli.predict import predict
from tlearn.cli.train import train
from tlearn.console import out, print_doctor
from tlearn.outputs import terminal_text


@app.command()
def doctor(
    data: Annotated[Path, typer.Argument(help="Dataset folder to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    quarantine: Annotated[Optional[Path], typer.Option(help="MOVE flagged files into this folder (outside DATA), "
                                                            "with reasons.csv; nothing is deleted.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the carved splits (as in `tlearn train`).")] = 0,
    labels: Annotated[bool, typer.Option("--labels", help="Instead of the file checks: rank the training images "
                                                          "whose given label the out-of-fold probabilities "
                                                          "contradict (confident learning).")] = False,
    model: Annotated[Optional[Path], typer.Option(help="--labels: the model trained on DATA whose out_of_fold.csv "
                                                       "to rank (default: ./<DATA name>-model when it matches; "
                                                       "otherwise a head is cross-validated now).")] = None,
    rank_by: Annotated[str, typer.Option(help="--labels: self_confidence or margin.")] = "self_confidence",
    top: Annotated[int, typer.Option(help="--labels: rows to print in the table (all go to --csv and --json).",
                                     min=1)] = 30,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="--labels: write every suspect to this CSV "
                                                                  "(rank,path,given,suggested,...).")] = None,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
) -> None:
    """Check a dataset: unreadable/odd files, duplicates, leakage between splits, conflicting labels, balance.

    Exit code 1 when a problem would corrupt an evaluation (leakage, conflicting labels, unusable layout).
    With --labels: the training images whose labels look wrong, most suspect first (exit 0)."""
    from tlearn.data.doctor import examine_dataset
    from tlearn.data.doctor import quarantine as move_flagged
    from tlearn.outputs import json_text

    if labels:
        check_labels(data, model, rank_by, top, csv_out, as_json, cache_dir, quiet)
        return
    if model is not None or csv_out is not None:
        fail(ValueError("--model and --csv go with --labels"))
    try:
        report = examine_dataset(data, seed=seed, progress=not (quiet or as_json), cache_dir=cache_dir)
        moved = move_flagged(report, quarantine) if quarantine else []
    except USER_ERRORS as exc:
        fail(exc)
    if as_json:
        print(json_text({**report.to_dict(), "quarantined": moved}))
    else:
        print_doctor(report, moved, quarantine)
    if report.errors:
        raise typer.Exit(1)


def check_labels(data: Path, model: Optional[Path], rank_by: str, top: int, csv_out: Optional[Path],
                 as_json: bool, cache_dir: Optional[Path], quiet: bool) -> None:
    from tlearn.console import print_suspects
    from tlearn.errors import InvalidParameter, check_choice
    from tlearn.evaluate.suspects import RANKINGS
    from tlearn.outputs import atomic_text_file, json_text
    from tlearn.train.label_check import suspect_labels

    try:
        check_choice("rank_by", rank_by, RANKINGS)
        if csv_out is not None and csv_out.exists() and not csv_out.read_bytes().startswith(b"rank,path,given,"):
            raise InvalidParameter(f"{csv_out} exists and is not a suspect-label table that tlearn wrote: "
                                   "give a new file")
        report = suspect_labels(data, model, ranked_by=rank_by, cache_dir=cache_dir,
                                progress=not (quiet or as_json))
        if csv_out is not None:
            with atomic_text_file(csv_out) as handle:
                handle.write(report.to_csv())
    except USER_ERRORS as exc:
        fail(exc)
    if as_json:
        print(json_text(report.to_dict()))
    else:
        print_suspects(report, top, csv_out)


@app.command()
def relabel(
    data: Annotated[Path, typer.Argument(help="Dataset folder whose files to move.")],
    file: Annotated[Optional[Path], typer.Argument(help="CSV path,label (paths relative to DATA): each file moves "
                                                        "into its new class folder.")] = None,
    undo: Annotated[bool, typer.Option("--undo", help="Put back the files the last relabel moved.")] = False,
) -> None:
    """Move images between class folders as a relabel CSV says, with a journal (DATA/.tlearn/) and --undo.

    Every row is checked before a file moves; nothing is deleted or overwritten (a taken name gets a new one)."""
    from tlearn.data import find_dataset
    from tlearn.data.relabel import relabel_folders, undo_last

    try:
        if undo == (file is not None):
            raise ValueError("give a relabel FILE, or --undo (not both)")
        if undo:
            moved = undo_last(data)
            out.print(f"put back {len(moved)} file(s)", highlight=False)
        else:
            classes = find_dataset(data, relabel=file).classes
            moved = relabel_folders(data, file, classes)
            out.print(f"moved {len(moved)} file(s); journal: {data / '.tlearn' / 'relabel-journal.json'} "
                      "(undo with --undo)", highlight=False)
        for source, target in moved:
            out.print(f"  {terminal_text(os.path.relpath(source, data))} -> "
                      f"{terminal_text(os.path.relpath(target, data))}", highlight=False)
    except (ValueError, *USER_ERRORS) as exc:
        fail(exc)


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
    except USER_ERRORS as exc:
        fail(exc)
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
    evaluate(out_dir / "model", data, split=SplitName.test, cache_dir=cache_dir)
    out.print("predictions for the test images (top 2):")
    predict(out_dir / "model", [data / "test"], top_k=2)
