"""Suspect labels (doctor --labels), relabel files honoured by train, and relabel moves with a journal and undo:
on the demo's real photos with real weights, labels flipped on purpose."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tlearn.cli import app
from tlearn.evaluate.suspects import find_suspects

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture(scope="module")
def noisy(demo_data, tmp_path_factory):
    """The demo's train/ and test/ as links, with one image of each class put in the next class's folder."""
    root = tmp_path_factory.mktemp("noisy") / "data"
    classes = sorted(p.name for p in (demo_data / "train").iterdir())
    flipped = set()
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
    for i, c in enumerate(classes):
        files = sorted((demo_data / "train" / c).iterdir())
        wrong = classes[(i + 1) % len(classes)]
        os.symlink(files[3], root / "train" / wrong / files[3].name)
        flipped.add((f"train/{wrong}/{files[3].name}", c))
        for f in files[:3] + files[4:]:
            os.symlink(f, root / "train" / c / f.name)
        for f in sorted((demo_data / "test" / c).iterdir()):
            os.symlink(f, root / "test" / c / f.name)
    return root, flipped


def test_confident_learning_counts_on_known_probabilities():
    classes = ["a", "b", "c"]
    proba = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.85, 0.05], [0.05, 0.9, 0.05],
                      [0.1, 0.1, 0.8], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([0, 0, 1, 1, 2, 2, 1])  # row 5 says c but looks like a; row 6 is unsure
    report = find_suspects(classes, [f"f{i}" for i in range(7)], labels, proba)
    assert [s.path for s in report.suspects] == ["f5", "f6"]
    first = report.suspects[0]
    assert (first.given, first.suggested, first.rank) == ("c", "a", 1)
    assert first.self_confidence == pytest.approx(0.05) and first.margin == pytest.approx(-0.85)
    assert report.thresholds["a"] == pytest.approx(0.85) and report.estimated_errors >= 1
    by_margin = find_suspects(classes, [f"f{i}" for i in range(7)], labels, proba, ranked_by="margin")
    assert [s.path for s in by_margin.suspects] == ["f5", "f6"]
    assert report.to_csv().splitlines()[0] == "rank,path,given,suggested,self_confidence,suggested_probability,margin"


def test_doctor_labels_finds_the_flipped_files_first(noisy, cache_dir, tmp_path):
    root, flipped = noisy
    done = runner.invoke(app, ["doctor", str(root), "--labels", "--json", "--cache-dir", str(cache_dir)])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert "cross-validated now" in report["source"] and report["images"] == len(list((root / "train").rglob("*.png")))
    top = {(r["path"], r["suggested"]) for r in report["rows"][: 2 * len(flipped)]}
    assert flipped <= top  # each flipped file, with its true class suggested, among the first 2 x N
    table = tmp_path / "suspects.csv"
    done = runner.invoke(app, ["doctor", str(root), "--labels", "--csv", str(table), "--cache-dir", str(cache_dir)])
    assert done.exit_code == 0 and "training images have a label" in _flat(done.output)
    rows = table.read_text().splitlines()
    assert rows[0].startswith("rank,path,given,suggested") and len(rows) == len(report["rows"]) + 1
    mine = tmp_path / "mine.csv"
    mine.write_text("my,own\n1,2\n")
    done = runner.invoke(app, ["doctor", str(root), "--labels", "--csv", str(mine), "--cache-dir", str(cache_dir)])
    assert done.exit_code == 2 and "not a suspect-label table" in _flat(done.output)
    assert mine.read_text() == "my,own\n1,2\n"


def test_a_model_of_the_same_files_is_read_and_a_changed_dataset_is_looked_at_again(noisy, cache_dir, tmp_path):
    import tlearn

    root, flipped = noisy
    model = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False).fit(root).save(tmp_path / "m")
    page = (model / "report" / "report.html").read_text()
    assert "Labels to check (train)" in page  # the report shows the suspects, with thumbnails
    shown = page.split("Labels to check (train)")[1]
    assert all(f"<small>{p}</small>" in shown for p, _ in flipped)
    assert (model / "report" / "gallery" / "suspect_01.jpg").is_file()
    report = tlearn.suspect_labels(root, model, cache_dir=cache_dir, progress=False)
    assert report.source == f"out-of-fold probabilities of {model}"
    assert flipped <= {(s.path, s.suggested) for s in report.suspects[: 2 * len(flipped)]}
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in sorted(flipped)))
    fixed = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, relabel=fixes).fit(root)
    labels = dict((p, fixed.classes_[c]) for p, c in fixed.bundle_.split["files"]["train"])
    assert all(labels[p] == c for p, c in flipped)  # train honours the relabel file
    assert all((root / p).is_symlink() for p, _ in flipped)  # and moves nothing
    assert fixed.bundle_.training["relabel"] == str(fixes)
    after = tlearn.suspect_labels(root, model, cache_dir=cache_dir, progress=False)
    assert after.source.startswith("out-of-fold probabilities of")  # the folders did not change
    again = tlearn.suspect_labels(root, fixed.save(tmp_path / "fixed", report=False), cache_dir=cache_dir,
                                  progress=False)
    assert "cross-validated now" in again.source and "rows differ" in again.source  # labels differ from folders


def test_relabel_moves_with_a_journal_and_undo_puts_everything_back(noisy, tmp_path):
    source, flipped = noisy
    root = tmp_path / "data"
    for link in source.rglob("*.png"):
        (root / link.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        (root / link.relative_to(source)).write_bytes(link.read_bytes())
    before = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.png")}
    (path, label), *_ = sorted(flipped)
    clash = root / "train" / label / Path(path).name
    clash.write_bytes(b"a file of the user's with the same name")  # the target name is taken
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in sorted(flipped)))
    done = runner.invoke(app, ["relabel", str(root), str(fixes)])
    assert done.exit_code == 0, done.output
    assert clash.read_bytes() == b"a file of the user's with the same name"  # never overwritten
    renamed = clash.with_name(f"{clash.stem}.relabel1{clash.suffix}")
    assert renamed.read_bytes() == before[path]
    for p, c in flipped:
        assert not (root / p).exists()
    journal = json.loads((root / ".tlearn" / "relabel-journal.json").read_text())
    assert len(journal) == 1 and len(journal[0]["moves"]) == len(flipped)
    done = runner.invoke(app, ["relabel", str(root), "--undo"])
    assert done.exit_code == 0, done.output
    clash.unlink()
    assert {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.png")} == before
    done = runner.invoke(app, ["relabel", str(root), "--undo"])
    assert done.exit_code == 2 and "nothing to undo" in _flat(done.output)


@pytest.mark.parametrize("rows, message", [
    ("path,label\ntrain/brick/nope.png,grass\n", "line 2: train/brick/nope.png does not exist"),
    ("path,label\n{first},marble\n", "line 2: class 'marble' does not exist"),
    ("file,class\n{first},grass\n", "the first line must be the header path,label"),
    ("path,label\n../outside.png,grass\n", "is not inside the dataset folder"),
])
def test_a_bad_relabel_file_is_refused_by_line_and_moves_nothing(noisy, tmp_path, rows, message, cache_dir):
    root, _ = noisy
    first = sorted((root / "train" / "brick").iterdir())[0].relative_to(root)
    (root.parent / "outside.png").write_bytes(b"x")
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(rows.format(first=first))
    listing = sorted(p.relative_to(root) for p in root.rglob("*"))
    for command in (["relabel", str(root), str(fixes)],
                    ["train", str(root), "--relabel", str(fixes), "--out", str(tmp_path / "m"), "--cache-dir",
                     str(cache_dir)]):
        done = runner.invoke(app, command)
        assert done.exit_code == 2 and message in _flat(done.output), done.output
        assert "Traceback" not in done.output
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == listing and not (tmp_path / "m").exists()


def test_rank_orders_unlabelled_images_and_keeps_near_copies_apart(demo_model_dir, demo_data, tmp_path):
    import csv
    import io

    pool = tmp_path / "pool"
    pool.mkdir()
    for f in sorted((demo_data / "test").rglob("*.png")):
        (pool / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    alone = runner.invoke(app, ["predict", str(demo_model_dir), str(pool), "--rank", "--diverse", "0"])
    assert alone.exit_code == 0, alone.output
    rows = list(csv.DictReader(io.StringIO(alone.stdout)))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in pool.iterdir())  # each image once
    unsure = [float(r["uncertainty"]) for r in rows]
    assert unsure == sorted(unsure, reverse=True)  # uncertainty alone: most uncertain first
    most = Path(rows[0]["path"])
    for n in range(4):  # four byte copies of the most uncertain image
        (pool / f"copy{n}-{most.name}").write_bytes(most.read_bytes())
    (pool / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "ranking.csv"
    done = runner.invoke(app, ["predict", str(demo_model_dir), str(pool), "--rank", "--output", str(out)])
    assert done.exit_code == 1 and "broken.png" in done.output  # unreadable: listed, the rest ranked
    ranked = list(csv.DictReader(out.open()))
    copies = {str(most)} | {str(pool / f"copy{n}-{most.name}") for n in range(4)}
    first = [r["path"] for r in ranked[:5]]
    assert len(copies & set(first)) <= 1  # diversity: at most one of the five copies among the first five
    assert float(ranked[1]["novelty"]) > 0.0
    plain = runner.invoke(app, ["predict", str(demo_model_dir), str(pool), "--rank", "--diverse", "0"])
    assert {r["path"] for r in list(csv.DictReader(io.StringIO(plain.stdout)))[:5]} == copies  # without: all
    again = runner.invoke(app, ["predict", str(demo_model_dir), str(pool), "--rank", "--output", str(out)])
    assert again.exit_code == 1  # its own previous ranking is replaced without --force
