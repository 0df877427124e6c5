"""The datasets the issue-14 benches run on: a shared photo set by name, or the far-from-ImageNet digits set."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from tlearn.data.far_sets import make_digits_dataset

SHARED = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" /
                             "datasets"))


def dataset_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", help="a folder name under $TLEARN_DATASETS, or digits")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--per-class", type=int, help="digits only: images per digit")
    return parser


def dataset_and_cache(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path]:
    """The dataset folder (digits built in `scratch`) and the feature cache folder (fresh in `scratch` by default)."""
    data = (make_digits_dataset(scratch / "digits", per_class=args.per_class) if args.dataset == "digits"
            else SHARED / args.dataset)
    return data, args.cache_dir or scratch / "cache"
