"""What the commands share: the typer app, option types, and how a user's error is reported."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlearn.console import err
from tlearn.errors import TlearnError
from tlearn.outputs import terminal_text  # light: rich.markup and the standard library

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
Device = Annotated[str, typer.Option(metavar="auto|cpu|cuda[:N]|mps|xla", help=(
    "Where the network runs: auto takes a GPU or TPU this machine has, else the CPU (its exported engines); on a "
    "GPU or TPU the backbone runs in torch there and fine-tuning uses Lightning's matching accelerator."))]
ModelFolder = Annotated[Path, typer.Argument(help="Model folder written by `tlearn train`.")]

# Problems a user can fix: one line and exit 2. Anything else is a bug and shows its traceback (exit 1).
USER_ERRORS = (TlearnError,)


def fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {terminal_text(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
