"""Shared fixtures: real images (scikit-image's photos, small seeded subsets of ../shared/datasets) and real weights."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# $TLEARN_DATASETS overrides the default place, ../shared/datasets beside the checkout (e.g. for a git worktree).
SHARED = Path(os.environ.get("TLEARN_DATASETS") or Path(__file__).resolve().parents[1].parent / "shared" / "datasets")


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared datasets live beside the project checkout (../shared/datasets)")
    return path


def link_subset(source: Path, dest: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """A seeded subset of an ImageFolder-style dataset, as symlinks (never copies) under dest."""
    rng = random.Random(seed)
    for split, count in per_class.items():
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
            target = dest / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in rng.sample(files, count):
                (target / f.name).symlink_to(f)
    return dest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from tlearn.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="session")
def hymenoptera_small(tmp_path_factory) -> Path:
    """6 train + 4 val images per class of the ants/bees set."""
    return link_subset(shared_dataset("hymenoptera"), tmp_path_factory.mktemp("hym") / "data",
                       {"train": 6, "val": 4})


@pytest.fixture(scope="session")
def demo_model(demo_data, cache_dir):
    """A classifier trained once on the demo photos, shared by the tests that only use it."""
    import tlearn

    return tlearn.ImageClassifier(cache_dir=cache_dir, progress=False).fit(demo_data)


@pytest.fixture(scope="session")
def demo_model_dir(demo_model, tmp_path_factory) -> Path:
    """The demo classifier saved as a model folder, for the command-line tests."""
    return demo_model.save(tmp_path_factory.mktemp("demo-model") / "model")


@pytest.fixture(scope="session")
def hymenoptera_model(hymenoptera_small, cache_dir, tmp_path_factory) -> Path:
    """A model trained once on hymenoptera_small and saved, shared by the tests that only read it."""
    import tlearn

    folder = tmp_path_factory.mktemp("hymenoptera-model") / "hym"
    tlearn.ImageClassifier(cache_dir=cache_dir, progress=False).fit(hymenoptera_small).save(folder)
    return folder
