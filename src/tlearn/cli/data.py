"""Commands on data and backbones: doctor, backbones, fetch-weights, and the built-in demo."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tlearn.cli.common import USER_ERRORS, CacheDir, Quiet, app, fail
from tlearn.cli.model import evaluate
from tlearn.cli.predict import predict
from tlearn.cli.train import train
from tlearn.console import out, print_doctor


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
    except USER_ERRORS as exc:
        fail(exc)
    if as_json:
        print(json_text({**report.to_dict(), "quarantined": moved}))
    else:
        print_doctor(report, moved, quarantine)
    if report.errors:
        raise typer.Exit(1)


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
    evaluate(out_dir / "model", data, split="test", cache_dir=cache_dir)
    out.print("predictions for the test images (top 2):")
    predict(out_dir / "model", [data / "test"], top_k=2)
