"""tlearn doctor: real images (the demo photos, hymenoptera when present) with real problems planted in copies."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import shared_dataset
from tlearn.cli import app
from tlearn.data import find_dataset
from tlearn.data.doctor import examine_dataset, quarantine, quick_check
from tlearn.errors import DatasetError

runner = CliRunner()


@pytest.fixture
def demo(demo_data) -> Path:
    return demo_data


@pytest.fixture
def demo_copy(demo_data, tmp_path) -> Path:
    return Path(shutil.copytree(demo_data, tmp_path / "data"))


def kinds(report) -> dict[str, list[list[str]]]:
    found: dict[str, list[list[str]]] = {}
    for finding in report.findings:
        found.setdefault(finding.kind, []).append(finding.paths)
    return found


def test_clean_demo_dataset_has_no_errors_and_exits_zero(demo):
    report = examine_dataset(demo, progress=False)
    assert report.errors == []
    assert report.files_checked == 84
    assert report.counts["train"] == {"brick": 16, "grass": 16, "gravel": 16}
    assert report.imbalance["train"] == 1.0
    assert runner.invoke(app, ["doctor", str(demo), "-q"]).exit_code == 0


def test_leakage_and_conflicting_labels_are_errors_with_exit_code_1(demo_copy):
    shutil.copy(demo_copy / "train/brick/brick_00.png", demo_copy / "test/brick/copy_of_train.png")
    shutil.copy(demo_copy / "train/grass/grass_03.png", demo_copy / "train/gravel/actually_grass.png")
    report = examine_dataset(demo_copy, progress=False)
    found = kinds(report)
    assert ["test/brick/copy_of_train.png", "train/brick/brick_00.png"] in [sorted(p) for p in found["leakage"]]
    assert ["train/grass/grass_03.png", "train/gravel/actually_grass.png"] in [sorted(p) for p in
                                                                             found["conflicting_labels"]]
    result = runner.invoke(app, ["doctor", str(demo_copy), "--json"])
    assert result.exit_code == 1
    assert {f["kind"] for f in json.loads(result.stdout)["findings"]} >= {"leakage", "conflicting_labels"}


def test_near_duplicate_across_splits_is_leakage(demo_copy):
    # the same photo re-encoded smaller: different bytes, same picture
    image = Image.open(demo_copy / "train/grass/grass_05.png")
    image.resize((image.width * 3 // 4, image.height * 3 // 4)).convert("RGB").save(
        demo_copy / "val/grass/resized.jpg", quality=80)
    found = kinds(examine_dataset(demo_copy, progress=False))
    assert ["train/grass/grass_05.png", "val/grass/resized.jpg"] in [sorted(p) for p in found["leakage"]]


def test_file_level_problems_are_named(demo_copy):
    source = demo_copy / "train/brick/brick_01.png"
    photo = Image.open(source).convert("RGB").resize((120, 120))
    folder = demo_copy / "train/brick"
    (folder / "truncated.jpg").write_bytes(_jpeg_bytes(photo)[:600])
    photo.save(folder / "really_png.jpg", format="PNG")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.resize((20, 20)).save(folder / "tiny.png")
    frames = [photo, photo.rotate(90)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 200)).save(folder / "sixteen.png")
    placeholder = Image.new("RGB", (300, 300), (240, 240, 240))
    placeholder.paste((60, 60, 60), (60, 130, 240, 170))  # a dark "text" bar on a flat background
    placeholder.save(folder / "missing.gif")
    found = {kind: [p for paths in value for p in paths] for kind, value in
             kinds(examine_dataset(demo_copy, progress=False)).items()}
    assert "train/brick/truncated.jpg" in found["unreadable"]
    assert "train/brick/really_png.jpg" in found["extension_mismatch"]
    assert {"train/brick/cmyk.jpg", "train/brick/sixteen.png"} <= set(found["odd_mode"])
    assert "train/brick/tiny.png" in found["tiny"]
    assert "train/brick/animated.gif" in found["animated"]
    assert "train/brick/missing.gif" in found["suspicious"]
    assert not any("brick_0" in p for p in found["suspicious"])  # real photos are not placeholders


def test_structural_problem_is_reported_not_raised(demo_copy):
    shutil.rmtree(demo_copy / "val/gravel")
    report = examine_dataset(demo_copy, progress=False)
    found = kinds(report)
    assert "structure" in found and "missing_class" in found
    assert any("gravel" in f.message for f in report.errors)
    assert report.files_checked == 84 - 6  # the files were still checked


def test_quarantine_moves_flagged_files_with_reasons_and_deletes_nothing(demo_copy, tmp_path):
    shutil.copy(demo_copy / "train/brick/brick_00.png", demo_copy / "test/brick/copy_of_train.png")
    before = sorted(p.name for p in demo_copy.rglob("*.png"))
    target = tmp_path / "quarantine"
    result = runner.invoke(app, ["doctor", str(demo_copy), "-q", "--quarantine", str(target)])
    assert result.exit_code == 1
    assert not (demo_copy / "test/brick/copy_of_train.png").exists()
    assert (demo_copy / "train/brick/brick_00.png").exists()  # the training copy stays
    assert (target / "test/brick/copy_of_train.png").is_file()
    rows = list(csv.DictReader(open(target / "reasons.csv")))
    assert [r["path"] for r in rows] == ["test/brick/copy_of_train.png"] and "leakage" in rows[0]["reasons"]
    after = sorted(p.name for p in demo_copy.rglob("*.png")) + [p.name for p in target.rglob("*.png")]
    assert sorted(after) == before
    assert runner.invoke(app, ["doctor", str(demo_copy), "-q"]).exit_code == 0


def test_quarantine_inside_the_dataset_is_refused(demo_copy):
    report = examine_dataset(demo_copy, progress=False)
    with pytest.raises(DatasetError, match="inside the dataset"):
        quarantine(report, demo_copy / "train" / "quarantine")


def test_quick_check_finds_exact_duplicates_without_decoding(demo_copy):
    shutil.copy(demo_copy / "train/brick/brick_00.png", demo_copy / "val/brick/again.png")
    report = quick_check(find_dataset(demo_copy))
    assert not report.decoded
    assert [f.kind for f in report.errors] == ["leakage"]


def test_hymenoptera_placeholder_is_flagged(tmp_path):
    hymenoptera = shared_dataset("hymenoptera")
    # a small copy: the placeholder, a few photos of each class (fast), plus a leak and a mislabelled copy
    for split, cls in (("train", "ants"), ("train", "bees"), ("val", "ants"), ("val", "bees")):
        folder = tmp_path / split / cls
        folder.mkdir(parents=True)
        for path in sorted((hymenoptera / split / cls).glob("*.jpg"))[:5]:
            shutil.copy(path, folder)
    shutil.copy(hymenoptera / "train/ants/imageNotFound.gif", tmp_path / "train/ants")
    ant = next((tmp_path / "train/ants").glob("*.jpg"))
    shutil.copy(ant, tmp_path / "val/ants" / f"leaked_{ant.name}")
    bee = next((tmp_path / "train/bees").glob("*.jpg"))
    shutil.copy(bee, tmp_path / "train/ants" / f"mislabelled_{bee.name}")
    result = runner.invoke(app, ["doctor", str(tmp_path), "-q"])
    assert result.exit_code == 1
    text = " ".join(result.stdout.split())
    assert "leakage" in text and "conflicting_labels" in text
    suspicious = [f for f in examine_dataset(tmp_path, progress=False).findings if f.kind == "suspicious"]
    assert any(f.paths == ["train/ants/imageNotFound.gif"] and "placeholder" in f.message for f in suspicious)


def _jpeg_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_hostile_names_survive_doctor_and_quarantine(demo_copy, tmp_path):
    import os
    import subprocess
    import sys

    folder = demo_copy / "train/brick"
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9[red]\x1b[2J.png")
    Path(odd).write_bytes(b"not a png at all")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-m", "tlearn.cli", "doctor", str(demo_copy), "-q", "--quarantine",
                             str(tmp_path / "q")], capture_output=True, env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"Traceback" not in result.stderr and b"\x1b[2J" not in result.stdout
    assert b"caf\\xe9[red]\\x1b[2J.png" in result.stdout
    rows = list(csv.DictReader(open(tmp_path / "q" / "reasons.csv", encoding="utf-8", errors="surrogateescape")))
    assert [os.fsencode(r["path"]) for r in rows] == [b"train/brick/caf\xe9[red]\\x1b[2J.png"]
    assert os.path.exists(os.fsencode(tmp_path / "q") + b"/train/brick/caf\xe9[red]\x1b[2J.png")
    result = subprocess.run([sys.executable, "-m", "tlearn.cli", "doctor", str(demo_copy), "--json"],
                            capture_output=True, env=env)
    assert result.returncode == 0 and json.loads(result.stdout)["errors"] == 0


@pytest.mark.slow
def test_oxford17flowers_carved_splits_do_not_leak_or_move(tmp_path):
    """The bar of issue 13: oxford17flowers as one unsplit folder per class (train+test linked together); the
    carved splits hold no near-duplicate pair across them, and 10 new files move no other file."""
    flowers = shared_dataset("oxford17flowers")
    root = tmp_path / "flowers"
    for split in ("train", "test"):
        for cls in sorted(p for p in (flowers / split).iterdir() if p.is_dir()):
            (root / cls.name).mkdir(parents=True, exist_ok=True)
            for photo in sorted(cls.glob("*.jpg")):
                (root / cls.name / f"{split}_{photo.name}").symlink_to(photo)
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["doctor", str(root), "--json", "--cache-dir", str(cache)])
    report = json.loads(result.stdout)
    assert report["files_checked"] == 1360 and "carved" in report["layout"]
    assert [f for f in report["findings"] if f["kind"] == "leakage"] == []
    assert sum(f["kind"] == "near_duplicate" for f in report["findings"]) > 0  # there are some, kept together
    before = find_dataset(root, cache_dir=cache)
    assert before.leaks == []
    classes = sorted(p.name for p in root.iterdir())
    for i, photo in enumerate(sorted((shared_dataset("hymenoptera") / "val" / "bees").glob("*.jpg"))[:10]):
        (root / classes[i] / f"new_{photo.name}").symlink_to(photo)
    after = find_dataset(root, cache_dir=cache)
    split_of = lambda ds: {p: s for s in ds.splits for p in ds.paths(s)}  # noqa: E731
    moved = {p for p, s in split_of(before).items() if split_of(after)[p] != s}
    assert moved == set() and sum(len(v) for v in after.splits.values()) == 1370


def test_a_class_with_too_few_training_images_is_warned_about(tmp_path):
    import os

    mini = Path(__file__).parent / "data" / "pbc8-mini"
    for cls, n in (("basophil", 6), ("platelet", 3)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for f in sorted((mini / cls).iterdir())[:n]:
            os.symlink(f, tmp_path / "data" / cls / f.name)
    done = runner.invoke(app, ["doctor", str(tmp_path / "data"), "--json"])
    report = json.loads(done.stdout)
    few = {f["message"] for f in report["findings"] if f["kind"] == "few_images"}
    train = report["counts"]["train"]
    assert len(few) == 2 and all(f["severity"] == "warning" for f in report["findings"] if f["kind"] == "few_images")
    assert (f"class 'platelet' has only {train['platelet']} training image" in " ".join(few))
    assert done.exit_code == 0  # a warning, not an error that corrupts an evaluation
