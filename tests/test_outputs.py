"""Results written safely: CSV cells, terminal text, result files, and `tlearn predict`'s output and exit codes."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tlearn.cli import app
from tlearn.outputs import (
    OutputRefused,
    atomic_text_file,
    check_output_path,
    csv_cell,
    terminal_text,
    write_predictions,
)

runner = CliRunner()


@pytest.mark.parametrize("name,cell", [
    ("=HYPERLINK(\"http://x\",\"y\").jpg", "'=HYPERLINK(\"http://x\",\"y\").jpg"),
    ("+1.jpg", "'+1.jpg"), ("-2.jpg", "'-2.jpg"), ("@SUM(A1).jpg", "'@SUM(A1).jpg"),
    ("\tx.jpg", "'\\x09x.jpg"), ("\rx.jpg", "'\\x0dx.jpg"),
    ("a\x1b[31mred.jpg", "a\\x1b[31mred.jpg"), ("photos/cat 1.jpg", "photos/cat 1.jpg"),
    ("é.jpg", "é.jpg"),
])
def test_csv_cells_are_neutralised(name, cell):
    assert csv_cell(name) == cell


def test_terminal_text_escapes_controls_bytes_and_markup():
    name = os.fsdecode(b"dir/[bold]x[/bold]\x1b]0;pwned\x07\xff.jpg")
    shown = terminal_text(name)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(shown, highlight=False)
    printed = console.file.getvalue().strip()
    assert printed == "dir/[bold]x[/bold]\\x1b]0;pwned\\x07\\xff.jpg"


def test_output_path_refusals(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8 a photo")
    with pytest.raises(OutputRefused, match="exists and is not a previous tlearn result"):
        check_output_path(image)
    check_output_path(image, force=True)
    with pytest.raises(OutputRefused, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.csv")
    with pytest.raises(OutputRefused, match="is a folder"):
        check_output_path(tmp_path)
    (tmp_path / "old.csv").write_text("path,label,score\n")
    check_output_path(tmp_path / "old.csv")


def test_a_users_own_csv_or_json_is_not_overwritten_without_force(tmp_path):
    for name, content in (("accounts.csv", "name,balance\nann,10\n"), ("settings.json", '{"keep": true}\n'),
                          ("notes.txt", "")):
        own = tmp_path / name
        own.write_text(content)
        with pytest.raises(OutputRefused, match="not a previous tlearn result"):
            check_output_path(own)
        assert own.read_text() == content
        check_output_path(own, force=True)
    rows = [SimpleNamespace(source="a.jpg", label="cat", score=0.9, top_label="cat", top=[("cat", 0.9)])]
    for fmt in ("csv", "json"):
        previous = tmp_path / f"previous.{fmt}"
        with atomic_text_file(previous) as sink:
            write_predictions(rows, sink, fmt)
        check_output_path(previous)  # what predict wrote before may be replaced
    (tmp_path / "empty.json").write_text("")
    check_output_path(tmp_path / "empty.json")


def test_atomic_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("previous\n")
    with pytest.raises(RuntimeError):
        with atomic_text_file(target) as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "previous\n" and sorted(os.listdir(tmp_path)) == ["out.csv"]
    with atomic_text_file(target) as handle:
        handle.write(os.fsdecode(b"caf\xe9\n"))
    assert target.read_bytes() == b"caf\xe9\n" and (target.stat().st_mode & 0o777) == 0o644


# ---- tlearn predict ------------------------------------------------------------------------------------------
@pytest.fixture
def images(demo_data, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, source in enumerate(sorted((demo_data / "test").rglob("*.png"))[:4]):
        shutil.copy(source, folder / f"{i}.png")
    return folder


def test_predict_of_only_missing_paths_exits_2(demo_model_dir, tmp_path):
    result = runner.invoke(app, ["predict", str(demo_model_dir), str(tmp_path / "nope.jpg")])
    assert result.exit_code == 2 and "nothing to predict" in result.output and "nope.jpg" in result.output


def test_predict_exit_1_when_some_inputs_are_unreadable_rows_still_written(demo_model_dir, images, tmp_path):
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(demo_model_dir), str(images), str(tmp_path / "gone.jpg"),
                                 "--output", str(out)])
    assert result.exit_code == 1
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(r["label"] in {"brick", "grass", "gravel"} for r in rows)
    assert "broken.png" in result.stderr and "gone.jpg" in result.stderr
    assert f"wrote 4 prediction(s) to {out}" in result.stderr
    assert runner.invoke(app, ["predict", str(demo_model_dir), str(images / "0.png")]).exit_code == 0


def test_predict_output_never_replaces_an_image(demo_model_dir, images, tmp_path):
    target = images / "0.png"
    before = target.read_bytes()
    result = runner.invoke(app, ["predict", str(demo_model_dir), str(images), "--output", str(target)])
    assert result.exit_code == 2 and "refusing to overwrite" in result.output
    assert target.read_bytes() == before
    result = runner.invoke(app, ["predict", str(demo_model_dir), str(images), "--output",
                                 str(tmp_path / "no" / "where.csv")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_uncertain_rows_keep_the_top_label(demo_model_dir, images):
    result = runner.invoke(app, ["predict", str(demo_model_dir), str(images), "--min-confidence", "1.0"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert result.exit_code == 0 and len(rows) == 4
    assert all(r["label"] == "uncertain" and r["top_label"] in {"brick", "grass", "gravel"} for r in rows)


def test_hostile_names_in_predict_output(demo_model_dir, images, tmp_path, monkeypatch):
    names = ['=HYPERLINK("evil","x").png', "\x1b[2Jclear.png", "[bold]markup[red].png", "-cmd.png"]
    for i, name in enumerate(names):
        shutil.copy(images / f"{i}.png", images / name)
    odd = os.fsdecode(b"caf\xe9.png")
    shutil.copy(images / "3.png", images / odd)
    monkeypatch.chdir(images)  # relative paths: the cell begins with the file's own name
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(demo_model_dir), "--output", str(out), "--", *names, odd])
    assert result.exit_code == 0, result.output
    text = out.read_bytes()
    assert b"caf\xe9.png" in text and b"\x1b" not in text
    cells = [row[0] for row in csv.reader(io.StringIO(text.decode("utf-8", "surrogateescape")))][1:]
    assert cells == ["'" + names[0], "\\x1b[2Jclear.png", names[2], "'" + names[3], odd]
    result = runner.invoke(app, ["predict", str(demo_model_dir), ".", "--format", "json"])
    paths = {Path(p["path"]).name for p in json.loads(result.stdout)["predictions"]}
    assert {odd, *names} <= paths
