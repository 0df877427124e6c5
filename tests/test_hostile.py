"""A corpus of hostile inputs for the data and command-line side, generated at test time (small files).

For each kind: no traceback, a message that names the problem, the dataset's and the inputs' files unchanged
(hashed before and after), and no label given to a file that is not a usable image with exit code 0.
One tiny model (the demo photos, trained once per session) serves every predict case.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tlearn.cli import app

runner = CliRunner()
CLASSES = {"brick", "grass", "gravel"}


# ---- hostile files ---------------------------------------------------------------------------------------------
def _photo(demo_data: Path, i: int = 0) -> Image.Image:
    return Image.open(sorted((demo_data / "test" / "brick").glob("*.png"))[i % 6]).convert("RGB")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _bomb(path: Path) -> Path:
    Image.new("1", (10_000, 10_000)).save(path, optimize=True)  # ~12 kB that decode to 100 Mpx
    return path


def _content(kind: str, demo_data: Path) -> bytes:
    photo = _photo(demo_data)
    jpeg = _encoded(photo, "JPEG")
    return {
        "corrupt_jpeg": jpeg[:20] + bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
        "truncated_jpeg": jpeg[: len(jpeg) // 3],
        "truncated_png": _encoded(photo, "PNG")[:300],
        "empty": b"",
        "text": b"this is a text file, not a photo\n",
        "html": b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        "zip": b"PK\x03\x04" + b"\0" * 200,
        "header_100kx100k": _png_header_only(100_000, 100_000),
        "header_zero": _png_header_only(0, 0),
        "jpeg_header_only": jpeg[:200],
        "one_pixel": _encoded(photo.resize((1, 1)), "PNG"),
        "two_by_two": _encoded(photo.resize((2, 2)), "PNG"),
        "strip_15x400": _encoded(photo.resize((400, 15)), "PNG"),
        "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94.",
    }[kind]


def _valid_image(kind: str, demo_data: Path) -> tuple[str, bytes]:
    """(extension, bytes) of an unusual but valid image of a brick."""
    photo = _photo(demo_data, 1)
    frames = [photo, photo.rotate(90)]
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 250)
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    exif = Image.Exif()
    exif[0x0112] = 9  # an orientation value that does not exist
    return {
        "cmyk": (".jpg", _encoded(photo.convert("CMYK"), "JPEG")),
        "sixteen_bit": (".png", _encoded(grey16, "PNG")),
        "palette": (".png", _encoded(photo.convert("P"), "PNG")),
        "rgba": (".png", _encoded(rgba, "PNG")),
        "grey": (".jpg", _encoded(photo.convert("L"), "JPEG")),
        "one_bit": (".png", _encoded(photo.convert("1"), "PNG")),
        "animated_gif": (".gif", _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])),
        "multipage_tiff": (".tif", _encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:])),
        "bmp": (".bmp", _encoded(photo, "BMP")),
        "webp": (".webp", _encoded(photo, "WEBP")),
        "png_named_jpg": (".jpg", _encoded(photo, "PNG")),
        "bad_exif_orientation": (".jpg", _encoded(photo, "JPEG", exif=exif)),
        "progressive_jpeg": (".jpg", _encoded(photo, "JPEG", progressive=True)),
    }[kind]


# ---- the cases --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """CLI arguments built in a fresh folder, and what must come out."""

    build: Callable[[Path, Path, Path], list[str]]  # (work folder, model folder, demo data) -> argv
    exits: tuple[int, ...]
    says: str  # a regular expression the output must match
    unlabelled: tuple[str, ...] = ()  # file names that must get no label
    change: Callable[[Path], None] | None = None  # of a tampered model folder: the edit


def _inputs(work: Path, demo_data: Path, good: int = 1) -> Path:
    folder = work / "in"
    folder.mkdir(exist_ok=True)
    for i, source in enumerate(sorted((demo_data / "test").rglob("*.png"))[:good]):
        shutil.copy(source, folder / f"good{i}.png")
    return folder


def _bad_file(kind: str, name: str) -> Case:
    def build(work, model, demo):
        folder = _inputs(work, demo)
        (folder / name).write_bytes(_content(kind, demo))
        return ["predict", str(model), str(folder)]
    return Case(build, (1,), rf"unreadable: .*{re.escape(name)}: (corrupt|not an image|image too (large|small)|"
                             "truncated)",
                (name,))


def _valid_file(kind: str) -> Case:
    def build(work, model, demo):
        folder = _inputs(work, demo, good=0)
        ext, content = _valid_image(kind, demo)
        (folder / f"{kind}{ext}").write_bytes(content)
        return ["predict", str(model), str(folder)]
    return Case(build, (0,), r"path,label,score\n.*,(brick|grass|gravel),")


def _given(make: Callable[[Path], Path], says: str) -> Case:
    """A path given on the command line beside one good image: named as unreadable, exit 1."""
    def build(work, model, demo):
        folder = _inputs(work, demo)
        return ["predict", str(model), str(folder / "good0.png"), str(make(work))]
    return Case(build, (1,), says)


def _in_folder(make: Callable[[Path], None], says: str, exits: tuple[int, ...] = (1,)) -> Case:
    def build(work, model, demo):
        folder = _inputs(work, demo)
        make(folder)
        return ["predict", str(model), str(folder)]
    return Case(build, exits, says)


def _fifo(work: Path) -> Path:
    os.mkfifo(work / "pipe.jpg")
    return work / "pipe.jpg"


def _link(work: Path, target: str, name: str = "link.jpg") -> Path:
    (work / name).symlink_to(work / target)
    return work / name


def _named(name: str | bytes, says: str, readable: bool = True) -> Case:
    """A file with a hostile name, given by its bare name (the test runs in the work folder, so the name begins
    the CSV cell): good content (labelled, the name made safe) or bad content (named safely)."""
    def build(work, model, demo):
        good = _inputs(work, demo) / "good0.png"
        path = Path(os.fsdecode(bytes(work) + b"/" + (name if isinstance(name, bytes) else name.encode())))
        path.write_bytes(good.read_bytes() if readable else b"not an image")
        return ["predict", str(model), "--", path.name]
    return Case(build, (0,) if readable else (1,), says)


def _option(args: list[str], exits: tuple[int, ...], says: str) -> Case:
    def build(work, model, demo):
        return ["predict", str(model), str(_inputs(work, demo)), *args]
    return Case(build, exits, says)


def _output_to(target: Callable[[Path], Path], says: str, exits=(2,), force=False) -> Case:
    def build(work, model, demo):
        folder = _inputs(work, demo, good=2)
        return ["predict", str(model), str(folder), "--output", str(target(work))] + (["--force"] if force else [])
    return Case(build, exits, says)


def _bombs(work, model, demo):
    folder = _inputs(work, demo, good=2)
    for i in range(8):
        _bomb(folder / f"bomb{i}.png")
    return ["predict", str(model), str(folder), "--batch-size", "2"]


def _dataset(work: Path, demo: Path, change: Callable[[Path], None] = lambda root: None, per_class: int = 6) -> Path:
    """A small copy of the demo photos, one folder per class (carved splits), changed."""
    root = work / "data"
    for cls in sorted(CLASSES):
        (root / cls).mkdir(parents=True)
        for i, source in enumerate(sorted((demo / "train" / cls).glob("*.png"))[:per_class]):
            shutil.copy(source, root / cls / f"{i}.png")
    change(root)
    return root


def _doctor(change: Callable[[Path], None], says: str, exits=(0,)) -> Case:
    def build(work, model, demo):
        root = _dataset(work, demo)
        change(root)
        return ["doctor", str(root), "-q", "--cache-dir", str(work / "cache")]
    return Case(build, exits, says)


def _plant_model(root: Path) -> None:
    for folder in (root / "brick-model", root / "grass" / "model"):
        (folder / "report").mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"format": "tlearn-bundle", "classes": ["a", "b"]}))
        shutil.copy(next((root / "brick").glob("*.png")), folder / "report" / "confusion.png")


def _plant_report(root: Path) -> None:
    (root / "report").mkdir()
    (root / "report" / "report.html").write_text("<!DOCTYPE html>\n<html><head><title>tlearn report: x</title>")
    shutil.copy(next((root / "brick").glob("*.png")), root / "report" / "confusion_test.png")


def _train(change: Callable[[Path], None], says: str, exits=(0,)) -> Case:
    def build(work, model, demo):
        root = _dataset(work, demo)
        change(root)
        return ["train", str(root), "--out", str(work / "out-model"), "-q"]
    return Case(build, exits, says)


def _hostile_class_names(work, model, demo):
    """Three classes named with bytes that are not UTF-8, markup and an escape sequence (each its own photos)."""
    root = work / "data"
    for cls, name in (("brick", b"b\xffes"), ("grass", b"[red]gr\x1b[2Jass"), ("gravel", "gravel $x$ ü".encode())):
        folder = Path(os.fsdecode(bytes(root) + b"/" + name))
        folder.mkdir(parents=True)
        for i, source in enumerate(sorted((demo / "train" / cls).glob("*.png"))[:6]):
            shutil.copy(source, folder / f"{i}.png")
    return ["train", str(root), "--out", str(work / "out-model"), "-q"]


def _hostile_names_in_train_output(work, model, demo):
    """A dataset folder and a broken file named with markup and escape sequences: train names them inertly."""
    root = _dataset(work, demo)
    hostile = root.rename(work / "[red]data\x1b[2J")
    (hostile / "brick" / "\x1b]0;owned\x07[bold]x.png").write_bytes(b"not a png")
    return ["train", str(hostile), "--out", str(work / "out-model"), "-q"]


def _evaluate_hostile_classes(work, model, demo):
    """A model trained on the hostile class names, evaluated: the per-class table shows the names inertly."""
    trained = runner.invoke(app, _hostile_class_names(work, model, demo))
    assert trained.exit_code == 0, trained.output
    return ["evaluate", str(work / "out-model"), str(work / "data"), "--split", "test"]


def _unreadable_files(root: Path) -> None:
    (root / "brick" / "broken.png").write_bytes(b"not a png")
    (root / "grass" / "cut.png").write_bytes((root / "grass" / "0.png").read_bytes()[:200])


def _tampered(change: Callable[[Path], None], says: str, args: tuple[str, ...] = (),
              command: Callable[[Path, Path, Path], list[str]] | None = None) -> Case:
    """A copy of the model folder, changed, asked to predict (or `command`): the problem must be named, exit 2."""
    def build(work, model, demo):
        copy = Path(shutil.copytree(model, work / "model"))
        change(copy)
        if command is not None:
            return command(copy, work, demo)
        return ["predict", str(copy), str(_inputs(work, demo, good=2)), *args]
    return Case(build, (2,), says, change=change)


def _edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        edit(config)
        (model / "config.json").write_text(json.dumps(config))
    return change


def _flip_bytes(model: Path) -> None:
    path = model / "model.safetensors"
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 64] = bytes(b ^ 0xFF for b in content[middle:middle + 64])
    path.write_bytes(bytes(content))


def _rehash(model: Path) -> None:
    """Re-write config.json's SHA-256 records after an edit, as someone covering their tracks would."""
    config = json.loads((model / "config.json").read_text())
    config["files"] = {name: hashlib.sha256((model / name).read_bytes()).hexdigest() for name in config["files"]}
    (model / "config.json").write_text(json.dumps(config))


def _edited(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """`change`, then every record re-hashed: only a check of meaning can tell."""
    return lambda model: (change(model), _rehash(model))


def _edit_tensors(edit: Callable[[dict], None], name: str = "model.safetensors") -> Callable[[Path], None]:
    from safetensors.numpy import load_file, save_file

    def change(model: Path) -> None:
        tensors = load_file(model / name)
        edit(tensors)
        save_file(tensors, model / name)
    return _edited(change)


def _edit_engine(model: Path) -> None:
    """The engine's last convolution's bias shifted (an engine that is not the one the model was verified with)."""
    import onnx
    from onnx import numpy_helper

    path = model / "engine" / "backbone.onnx"
    graph = onnx.load(str(path))
    last = max((i for i, init in enumerate(graph.graph.initializer) if len(init.dims) == 1 and init.dims[0] > 100),
               key=lambda i: i)
    array = numpy_helper.to_array(graph.graph.initializer[last]) + 0.5
    graph.graph.initializer[last].CopyFrom(numpy_helper.from_array(array, graph.graph.initializer[last].name))
    onnx.save(graph, str(path))
    _rehash(model)


def _other_models_file(name: str) -> Callable[[Path], None]:
    """A file of the hymenoptera model (another dataset, two classes) put in, records re-hashed."""
    def change(model: Path) -> None:
        shutil.copyfile(_OTHER_MODEL[0] / name, model / name)
        _rehash(model)
    return change


def _shift_backbone(tensors: dict) -> None:
    """The first convolution's weights shifted: backbone weights that are not the ones the engine was made of."""
    first = next(k for k in sorted(tensors) if k.startswith("backbone.") and tensors[k].ndim == 4)
    tensors[first] = tensors[first] + np.float32(0.05)


def _reverse_head(tensors: dict) -> None:
    """The head's rows in reverse order: a model of the same classes trained in another order."""
    tensors["head.weight"] = tensors["head.weight"][::-1].copy()
    tensors["head.bias"] = tensors["head.bias"][::-1].copy()


_OTHER_MODEL: list[Path] = []  # filled by the test from the hymenoptera_model fixture


def _split_collision(root: Path) -> None:
    for split in ("train", "Train"):
        for cls in CLASSES:
            shutil.copytree(root / cls, root / split / cls)


CASES: dict[str, Case] = {
    # files that are not usable images, inside a folder given to predict
    **{f"file_{kind}": _bad_file(kind, f"{kind}.jpg") for kind in (
        "corrupt_jpeg", "truncated_jpeg", "empty", "text", "html", "zip", "jpeg_header_only", "pickle")},
    **{f"file_{kind}": _bad_file(kind, f"{kind}.png") for kind in ("truncated_png", "header_100kx100k",
                                                                    "header_zero")},
    # too small to mean anything (issue 24: a 2x2 image was labelled at 0.91): unreadable, by name
    **{f"small_{kind}": _bad_file(kind, f"{kind}.png") for kind in ("one_pixel", "two_by_two", "strip_15x400")},
    "png_bomb_10000x10000": Case(lambda w, m, d: ["predict", str(m), str(_bomb(_inputs(w, d) / "bomb.png"))],
                                 (1,), r"bomb.png: image too large \(10000x10000", ("bomb.png",)),
    "bombs_under_threads_batch_2": Case(_bombs, (1,), r"(image too large.*\n.*){8}",
                                        tuple(f"bomb{i}.png" for i in range(8))),
    # unusual but valid images: a label, exit 0
    **{f"valid_{kind}": _valid_file(kind) for kind in (
        "cmyk", "sixteen_bit", "palette", "rgba", "grey", "one_bit", "animated_gif", "multipage_tiff", "bmp",
        "webp", "png_named_jpg", "bad_exif_orientation", "progressive_jpeg")},
    # paths that are not files
    "given_fifo": _given(_fifo, r"pipe.jpg: not a regular file \(a FIFO\)"),
    "given_dev_zero": _given(lambda w: Path("/dev/zero"), r"/dev/zero: not a regular file \(a character device\)"),
    "given_dev_stdin": _given(lambda w: Path("/dev/stdin"), r"/dev/stdin: (not a regular file|not an image)"),
    "given_folder_of_nothing": Case(lambda w, m, d: ["predict", str(m), str(w)], (2,), "nothing to predict"),
    "given_missing_and_good": _given(lambda w: w / "nope.jpg", r"nope.jpg: no such file"),
    "given_only_missing": Case(lambda w, m, d: ["predict", str(m), str(w / "a.jpg"), str(w / "b.jpg")], (2,),
                               r"nothing to predict: .*a.jpg: no such file"),
    "given_dangling_link": _given(lambda w: _link(w, "nowhere.jpg"), r"link.jpg: broken symbolic link"),
    "given_looping_link": _given(lambda w: _link(w, "link.jpg"), r"link.jpg: symbolic link loop"),
    "given_text_file": _given(lambda w: (w / "notes.txt", (w / "notes.txt").write_text("hi"))[0],
                              r"notes.txt: not an image"),
    "given_avif": _given(lambda w: (w / "x.avif", (w / "x.avif").write_bytes(b"\0\0\0 ftypavif"))[0],
                         r"x.avif: AVIF images are not supported"),
    "given_heic": _given(lambda w: (w / "x.HEIC", (w / "x.HEIC").write_bytes(b"\0\0\0 ftypheic"))[0],
                         r"x.HEIC: HEIC images are not supported"),
    "given_svg": _given(lambda w: (w / "x.svg", (w / "x.svg").write_text("<svg/>"))[0],
                        r"x.svg: SVG images are not supported"),
    # the same inside a folder
    "folder_symlink_loop": _in_folder(lambda f: (f / "loop").symlink_to(f, target_is_directory=True),
                                      r"loop: symbolic link loop"),
    "folder_dangling_link": _in_folder(lambda f: (f / "gone.png").symlink_to(f / "nowhere.png"),
                                       r"gone.png: broken symbolic link"),
    "folder_fifo": _in_folder(lambda f: os.mkfifo(f / "pipe.png"), r"pipe.png: not a regular file \(a FIFO\)"),
    "folder_heic": _in_folder(lambda f: (f / "p.heic").write_bytes(b"x"), r"p.heic: HEIC images are not supported"),
    "folder_linked_subfolder": _in_folder(
        lambda f: (f / "more").symlink_to(shutil.copytree(f, f.parent / "elsewhere"), target_is_directory=True),
        r"more/good0.png,(brick|grass|gravel)", (0,)),
    # hostile names
    "name_formula": _named('=HYPERLINK("http:evil","click").png', r"'=HYPERLINK"),
    "name_plus_minus_at": _named("+1-2@3.png", r"path,label"),
    "name_escape_sequences": _named("\x1b[2J\x1b]0;title\x07.png", r"\\x1b\[2J\\x1b\]0;title\\x07.png"),
    "name_markup_unreadable": _named("[bold red]shout[/bold red].png".replace("/", "_"),
                                     r"unreadable: .*\[bold red\]shout\[_bold red\].png", readable=False),
    "name_non_utf8": _named(b"caf\xe9\xff.png", r"caf"),
    "name_non_utf8_unreadable": _named(b"bad\xff.png", r"unreadable: .*bad\\xff.png", readable=False),
    "name_spaces": _named("  two  spaces .png", r"  two  spaces .png"),
    "name_unicode": _named("фото 写真 🐝.png", r"фото 写真 🐝.png"),
    "name_bidi_override": _named("photo\u202egnp.exe.png", r"photo\\u202egnp"),
    "name_newline": _named("two\nlines.png", r"two\\x0alines.png"),
    "name_very_long": _named("x" * 240 + ".png", r"x{240}\.png"),
    "name_leading_dash": _named("-rf.png", r"'-rf.png"),
    # options
    "batch_size_0": _option(["--batch-size", "0"], (2,), r"batch-size"),
    "batch_size_negative": _option(["--batch-size", "-1"], (2,), r"batch-size"),
    "top_k_0": _option(["--top-k", "0"], (2,), r"top-k"),
    "top_k_more_than_classes": _option(["--top-k", "50"], (0,), r"label_3,score_3\n"),
    "min_confidence_above_1": _option(["--min-confidence", "1.5"], (2,), r"min-confidence"),
    "min_confidence_nan": _option(["--min-confidence", "nan"], (2,), r"min-confidence"),
    "format_unknown": _option(["--format", "xml"], (2,), r"format"),
    "engine_unknown": _option(["--engine", "tpu"], (2,), r"engine"),
    "model_missing": Case(lambda w, m, d: ["predict", str(w / "no-model"), str(_inputs(w, d))], (2,),
                          r"no-model"),
    "model_is_a_data_folder": Case(lambda w, m, d: ["predict", str(_inputs(w, d)), str(_inputs(w, d))], (2,),
                                   r"config.json"),
    # where results go
    "output_over_an_image": _output_to(lambda w: w / "in" / "good0.png", r"refusing to overwrite"),
    "output_in_missing_folder": _output_to(lambda w: w / "no" / "such" / "p.csv", r"does not exist"),
    "output_is_a_folder": _output_to(lambda w: w / "in", r"is a folder"),
    "output_over_user_file": _output_to(lambda w: (w / "notes.txt", (w / "notes.txt").write_text("mine"))[0],
                                        r"refusing to overwrite"),
    "output_over_previous_result": _output_to(
        lambda w: (w / "p.csv", (w / "p.csv").write_text("path,label,score\nold.jpg,bee,0.9\n"))[0],
        r"wrote 2 prediction\(s\)", exits=(0,)),
    "output_over_users_csv": _output_to(lambda w: (w / "own.csv", (w / "own.csv").write_text("a,b\n1,2\n"))[0],
                                        r"not a previous tlearn result"),
    "output_over_users_json": _output_to(lambda w: (w / "own.json", (w / "own.json").write_text('{"a": 1}'))[0],
                                         r"not a previous tlearn result"),
    "output_forced": _output_to(lambda w: (w / "n.txt", (w / "n.txt").write_text("mine"))[0],
                                r"wrote 2 prediction\(s\)", exits=(0,), force=True),
    # datasets (doctor)
    "data_split_names_collide": _doctor(_split_collision, r"Train/ and train/|train/ and Train/", exits=(1,)),
    "data_model_folder_inside": _doctor(_plant_model, r"no errors"),
    "data_report_folder_inside": _doctor(_plant_report, r"no errors"),
    "data_symlink_loop": _doctor(lambda r: (r / "brick" / "loop").symlink_to(r, target_is_directory=True),
                                 r"symbolic link loop"),
    "data_dangling_link": _doctor(lambda r: (r / "brick" / "x.png").symlink_to(r / "nowhere"),
                                  r"broken symbolic link"),
    "data_fifo": _doctor(lambda r: os.mkfifo(r / "grass" / "p.png"), r"not a regular file \(a FIFO\)"),
    "data_avif_heic_svg": _doctor(lambda r: [(r / "brick" / n).write_bytes(b"x") for n in ("a.avif", "b.heic",
                                                                                          "c.svg")],
                                  r"AVIF(.|\n)*HEIC|HEIC(.|\n)*AVIF"),
    "data_corrupt_file": _doctor(lambda r: (r / "brick" / "bad.png").write_bytes(b"bad"), r"bad.png"),
    "data_empty_class": _doctor(lambda r: (r / "empty").mkdir(), r"'empty'.*has no images", exits=(1,)),
    "data_class_of_unreadable_files": _doctor(
        lambda r: [(r / "junk").mkdir(), (r / "junk" / "a.jpg").write_bytes(b"x"),
                   (r / "junk" / "b.jpg").write_bytes(b"y")], r"'junk'.*has no images tlearn can use", exits=(1,)),
    # copies of brick's photos under another name: conflicting labels (exit 1), the name shown as it is
    "data_non_utf8_class": _doctor(lambda r: shutil.copytree(r / "brick", os.fsdecode(bytes(r) + b"/b\xffes")),
                                   r"labelled b\\xffes and brick|labelled brick and b\\xffes", exits=(1,)),
    "data_markup_class": _doctor(lambda r: shutil.copytree(r / "brick", r / "[red]x"), r"labelled \[red\]x and",
                                 exits=(1,)),
    # datasets (train)
    "train_split_names_collide": _train(_split_collision, r"Train/ and train/|train/ and Train/", exits=(2,)),
    "train_beside_tlearn_outputs": _train(lambda r: (_plant_model(r), _plant_report(r)), r"classes\W+3\b"),
    "train_hostile_class_names": Case(_hostile_class_names, (0,), r"classes\W+3\b"),
    "train_hostile_names_on_terminal": Case(_hostile_names_in_train_output, (0,),
                                            r"\[red\]data\\x1b\[2J(.|\n)*\\x1b\]0;owned\\x07\[bold\]x.png"),
    "evaluate_hostile_class_names": Case(_evaluate_hostile_classes, (0,), r"b\\xffes(.|\n)*\[red\]gr\\x1b\[2Jass"),
    "train_with_unreadable_files": _train(_unreadable_files, r"skipped 2 unreadable(.|\n)*broken.png"),
    "data_is_a_file": Case(lambda w, m, d: ["doctor", str(_inputs(w, d) / "good0.png")], (2,), r"is a file"),
    "data_missing": Case(lambda w, m, d: ["doctor", str(w / "nothing")], (2,), r"does not exist"),
    # where other outputs go (issue 24)
    "export_out_over_a_photo": Case(lambda w, m, d: ["export", str(m), "--out", str(_inputs(w, d) / "good0.png")],
                                    (2,), r"good0.png exists and is not an ONNX file that tlearn exported"),
    "export_out_over_users_onnx": Case(
        lambda w, m, d: ["export", str(m), "--out", str((w / "theirs.onnx", (w / "theirs.onnx").write_bytes(
            b"\x08\x07\x12\x04mine"))[0])], (2,), r"theirs.onnx exists and is not an ONNX file that tlearn"),
    "export_out_is_a_folder": Case(lambda w, m, d: ["export", str(m), "--out", str(_inputs(w, d))], (2,),
                                   r"is a folder"),
    "quarantine_onto_a_file": Case(
        lambda w, m, d: ["doctor", str(_dataset(w, d, _unreadable_files)), "-q", "--quarantine",
                         str((w / "q.txt", (w / "q.txt").write_text("mine"))[0])], (2,),
        r"--quarantine .*q.txt is a file, not a folder"),
    "quarantine_inside_data": Case(lambda w, m, d: ["doctor", str(_dataset(w, d)), "-q", "--quarantine",
                                                    str(w / "data" / "brick" / "q")], (2,), r"inside the dataset"),
}


# The bundle side of issue 13 (the lead's checks): tampered model folders.
BUNDLE_CASES: dict[str, Case] = {
    "model_weights_flipped": _tampered(_flip_bytes, r"model.safetensors"),
    "model_weights_truncated": _tampered(
        lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:100_000]),
        r"model.safetensors"),
    "config_temperature_nan": _tampered(_edit_config(lambda c: c.update(temperature="NaN")),
                                        r"temperature"),
    "config_classes_a_string": _tampered(_edit_config(lambda c: c.update(classes="brickgrassgravel")),
                                         r"classes"),
    "config_input_size_huge": _tampered(_edit_config(lambda c: c["preprocessing"].update(input_size=100_000)),
                                        r"input_size"),
    "config_std_zero": _tampered(_edit_config(lambda c: c["preprocessing"].update(std=[0, 0, 0])), r"std"),
    "config_format_version_string": _tampered(_edit_config(lambda c: c.update(format_version="1")),
                                              r"format_version"),
    # edited with the records re-hashed (issue 24): refused by meaning
    "config_temperature_1e-300": _tampered(_edited(_edit_config(lambda c: c.update(temperature=1e-300))),
                                           r"temperature must be a number between 0.05 and 20"),
    "config_temperature_1e300": _tampered(_edited(_edit_config(lambda c: c.update(temperature=1e300))),
                                          r"temperature must be a number between"),
    "config_temperature_in_range": _tampered(_edited(_edit_config(lambda c: c.update(temperature=3.0))),
                                             r"does not give the answers recorded"),
    "config_classes_reordered": _tampered(_edited(_edit_config(lambda c: c["classes"].reverse())),
                                          r"does not give the answers recorded"),
    "config_classes_renamed": _tampered(_edited(_edit_config(lambda c: c["classes"].__setitem__(0, "cat"))),
                                        r"no valid probe"),
    "config_probe_removed": _tampered(_edited(_edit_config(lambda c: c.pop("probe"))), r"no valid probe"),
    "config_input_size_edited": _tampered(_edited(_edit_config(lambda c: c["preprocessing"].update(input_size=192))),
                                          r"192x192 images"),
    "weights_head_rows_swapped": _tampered(_edit_tensors(_reverse_head), r"does not give the answers recorded"),
    "weights_of_another_model": _tampered(_other_models_file("model.safetensors"), r"the head is \(2, \d+\)"),
    # refused by the load-time check, or (its verdicts recorded by an earlier load of a sibling) by the engine choice
    "engine_edited_rehashed": _tampered(_edit_engine, r"the engine .*backbone.onnx: other features|"
                                                      r"no engine runs backbone.onnx .*disagrees with torch"),
    "weights_backbone_edited_torch_engine": _tampered(
        _edit_tensors(_shift_backbone), r"the backbone weights in model.safetensors: other features",
        args=("--engine", "torch")),
    "weights_backbone_edited_export": _tampered(
        _edit_tensors(_shift_backbone), r"the backbone weights in model.safetensors: other features",
        command=lambda copy, work, demo: ["export", str(copy), "--out", str(work / "m.onnx")]),
    "config_feature_dim_edited": _tampered(_edited(_edit_config(lambda c: c["backbone"].update(feature_dim=1000))),
                                           r"the head is \(3, 1280\)"),
    "config_classes_twice": _tampered(_edited(_edit_config(lambda c: c["classes"].__setitem__(1, c["classes"][0]))),
                                      r"classes has the same name twice"),
    "config_temperature_true": _tampered(_edited(_edit_config(lambda c: c.update(temperature=True))),
                                         r"temperature must be a number"),
    "engine_reference_edited": _tampered(_edit_tensors(
        lambda t: t.__setitem__("outputs", t["outputs"] + np.random.default_rng(0).random(t["outputs"].shape,
                                                                                            np.float32)),
        "engine/reference.safetensors"), r"does not give the answers recorded"),
}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links not followed): file content hashes, link targets, special kinds."""
    seen = {}
    for directory, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                seen[path] = "link -> " + os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                seen[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                seen[path] = stat.filemode(info.st_mode)
    return seen


def _labelled(stdout: str) -> dict[str, str]:
    """File name -> label of the CSV rows in `stdout` (empty when it is not a prediction CSV)."""
    if not stdout.startswith("path,label"):
        return {}
    return {Path(row["path"].lstrip("'")).name: row["label"] for row in csv.DictReader(io.StringIO(stdout))}


@pytest.mark.parametrize("kind", list(CASES) + list(BUNDLE_CASES))
def test_hostile_input(kind, demo_model_dir, demo_data, cache_dir, tmp_path, monkeypatch, request):
    case = CASES.get(kind) or BUNDLE_CASES[kind]
    if "another_model" in kind and not _OTHER_MODEL:
        _OTHER_MODEL.append(request.getfixturevalue("hymenoptera_model"))
    monkeypatch.setenv("TLEARN_CACHE", str(cache_dir))  # the demo photos' features are cached there
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = case.build(work, demo_model_dir, demo_data)
    protected = _snapshot(work)
    result = runner.invoke(app, args)
    output = result.stdout + result.stderr
    flat = " ".join(output.split())  # the same text unwrapped, for messages a terminal width folded
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert "\x1b" not in output and "\x07" not in output  # no name's escape sequence reaches the terminal
    assert result.exit_code in case.exits, output[-2000:]
    assert re.search(case.says, output) or re.search(case.says, flat), output[-2000:]
    after = _snapshot(work)
    assert {path: after.get(path) for path in protected if "p.csv" not in path and "n.txt" not in path} == \
        {path: digest for path, digest in protected.items() if "p.csv" not in path and "n.txt" not in path}
    labelled = _labelled(result.stdout)
    assert not set(case.unlabelled) & set(labelled)
    assert set(labelled.values()) <= CLASSES | {"uncertain"}


def test_the_corpus_is_large_enough():
    assert len(CASES) + len(BUNDLE_CASES) >= 60
    assert len(all_kinds()) >= 140


def all_kinds() -> list[str]:
    """Every kind of fault in this corpus (each dict below is parametrised by its own test)."""
    kinds = [*CASES, *BUNDLE_CASES, *SERVER_CASES, *TOKEN_CASES, "server_model_card_without_paths",
             *SERVE_CLI_CASES, *SLOW_CASES, *DISK_CASES, *INTERRUPTS, *API_CASES]
    assert len(kinds) == len(set(kinds)), "a kind is named twice"
    return kinds


@pytest.mark.parametrize("kind", ["config_temperature_in_range", "config_classes_reordered",
                                  "weights_head_rows_swapped", "engine_edited_rehashed"])
def test_an_edited_model_is_refused_by_every_consumer(kind, demo_model_dir, demo_data, tmp_path):
    """Not only predict: evaluate, serve (before it binds) and the Predictor refuse it, exit 2 / BundleError."""
    from tlearn.errors import BundleError
    from tlearn.predict import Predictor

    model = Path(shutil.copytree(demo_model_dir, tmp_path / "model"))
    BUNDLE_CASES[kind].change(model)
    for args in (["evaluate", str(model), str(demo_data), "-q"], ["serve", str(model), "--port", "8765"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert re.search(r"other features|does not give the answers recorded", result.output), result.output
    with pytest.raises(BundleError):
        Predictor.load(model)


# ---- the Python API (issue 24): the same policy for images too small to mean anything ----------------------------
API_CASES: dict[str, Callable[[Path], object]] = {  # (a work folder) -> an input for Predictor.predict
    "api_array_2x2": lambda w: np.full((2, 2, 3), 128, np.uint8),
    "api_pil_image_1x1": lambda w: Image.new("RGB", (1, 1)),
    "api_png_bytes_3x300": lambda w: _encoded(Image.new("RGB", (300, 3)), "PNG"),
    "api_file_2x2": lambda w: (w / "tiny.png", (w / "tiny.png").write_bytes(_encoded(Image.new("RGB", (2, 2)),
                                                                                      "PNG")))[0],
}


@pytest.mark.parametrize("kind", list(API_CASES))
def test_hostile_api_input(kind, demo_model_dir, demo_data, tmp_path):
    from tlearn.predict import Predictor, Unreadable

    good = _photo(demo_data)
    rows = Predictor.load(demo_model_dir).predict([good, API_CASES[kind](tmp_path)])
    assert not isinstance(rows[0], Unreadable)
    assert isinstance(rows[1], Unreadable) and "image too small" in rows[1].reason, rows[1]


# ---- the server (issue 24): hostile requests get a 4xx JSON answer naming the check, never a 500 -------------------
@dataclass
class Request:
    method: str
    path: str
    build: Callable[[bytes], dict]  # a photo's JPEG bytes -> TestClient keyword arguments
    status: int
    limit: str
    says: str = ""


def _json(text: str | bytes) -> Callable[[bytes], dict]:
    return lambda jpeg: {"content": text, "headers": {"content-type": "application/json"}}


def _v2(change: Callable[[dict, bytes], dict]) -> Callable[[bytes], dict]:
    """A valid KServe v2 request for one image (binary tensor), changed."""
    def build(jpeg: bytes) -> dict:
        blob = len(jpeg).to_bytes(4, "little") + jpeg
        header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                              "parameters": {"binary_data_size": len(blob)}}]}
        header = change(header, blob)
        text = json.dumps(header).encode()
        return {"content": text + blob, "headers": {"content-type": "application/octet-stream",
                                                    "inference-header-content-length": str(len(text))}}
    return build


def _v2_input(key: str, value) -> Callable[[bytes], dict]:
    return _v2(lambda h, blob: (h["inputs"][0]["parameters"].__setitem__(key, value), h)[1])


def _png(width: int, height: int) -> bytes:
    return _encoded(Image.new("RGB", (width, height), (120, 80, 40)), "PNG")


V2 = "/v2/models/demo/infer"
DEEP = b"[" * 100_000 + b"]" * 100_000
SERVER_CASES: dict[str, Request] = {
    "server_json_nested_100000_v1": Request("POST", "/v1/predict", _json(DEEP), 400, "json", "nested too deeply"),
    "server_json_nested_100000_v2": Request("POST", V2, _json(DEEP), 400, "v2-request", "nested too deeply"),
    "server_json_objects_nested_v1": Request("POST", "/v1/predict", _json(b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
                                             400, "json"),
    "server_json_not_utf8_v1": Request("POST", "/v1/predict", _json(b'{"instances": "\xff\xfe"}'), 400, "json"),
    "server_json_a_list_v1": Request("POST", "/v1/predict", _json(b"[1, 2]"), 400, "json"),
    "server_v2_body_a_list": Request("POST", V2, _json(b"[1, 2]"), 400, "v2-request", "must be a JSON object"),
    "server_v2_parameters_a_list": Request("POST", V2, _v2(lambda h, b: {**h, "parameters": []}), 400, "v2-request"),
    "server_v2_input_parameters_a_list": Request(
        "POST", V2, _v2(lambda h, b: (h["inputs"][0].__setitem__("parameters", []), h)[1]), 400, "v2-inputs"),
    "server_v2_outputs_as_strings": Request("POST", V2, _v2(lambda h, b: {**h, "outputs": ["label"]}), 400,
                                            "v2-outputs", "list of objects"),
    "server_v2_outputs_an_object": Request("POST", V2, _v2(lambda h, b: {**h, "outputs": {"name": "label"}}), 400,
                                           "v2-outputs"),
    "server_v2_output_parameters_a_string": Request(
        "POST", V2, _v2(lambda h, b: {**h, "outputs": [{"name": "label", "parameters": "binary"}]}), 400,
        "v2-outputs"),
    "server_v2_binary_data_output_a_string": Request(
        "POST", V2, _v2(lambda h, b: {**h, "parameters": {"binary_data_output": "yes"}}), 400, "v2-request"),
    "server_v2_binary_data_size_string": Request("POST", V2, _v2_input("binary_data_size", "12"), 400, "v2-inputs",
                                                 "binary_data_size must be a whole number"),
    "server_v2_binary_data_size_float": Request("POST", V2, _v2_input("binary_data_size", 12.5), 400, "v2-inputs",
                                                "binary_data_size must be a whole number"),
    "server_v2_binary_data_size_negative": Request("POST", V2, _v2_input("binary_data_size", -4), 400, "v2-inputs"),
    "server_v2_binary_data_size_true": Request("POST", V2, _v2_input("binary_data_size", True), 400, "v2-inputs"),
    "server_v2_shape_of_booleans": Request(
        "POST", V2, _v2(lambda h, b: (h["inputs"][0].__setitem__("shape", [True]), h)[1]), 400, "v2-inputs"),
    "server_image_2x2_v1": Request("POST", "/v1/predict", lambda j: {"content": _png(2, 2),
                                                                     "headers": {"content-type": "image/png"}},
                                   422, "decodable-image", "too small"),
    "server_image_2x2_torchserve": Request("PUT", "/predictions/demo", lambda j: {"content": _png(2, 2)}, 422,
                                           "decodable-image", "too small"),
    "server_pixels_2x2_v2": Request("POST", V2, _json(json.dumps({"inputs": [{
        "name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [7] * 12}]})), 422,
        "decodable-image", "too small"),
}
TOKEN = "s3cret"
TOKEN_CASES: dict[str, tuple[str, int]] = {  # a GET without the token on a server that has one
    "server_openapi_without_token": ("/openapi.json", 401),
    "server_docs_without_token": ("/docs", 401),
}


@pytest.fixture(scope="module")
def served(demo_model_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tlearn.predict import Predictor
    from tlearn.serve import ServeSettings, create_app

    app = create_app(Predictor.load(demo_model_dir), ServeSettings(name="demo", token=TOKEN))
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["authorization"] = f"Bearer {TOKEN}"
        yield client


@pytest.mark.parametrize("kind", list(SERVER_CASES))
def test_hostile_request(kind, served, demo_data):
    case = SERVER_CASES[kind]
    answer = served.request(case.method, case.path, **case.build(_encoded(_photo(demo_data), "JPEG")))
    assert answer.status_code == case.status, answer.text[:500]
    body = answer.json()
    assert body["limit"] == case.limit and body["status"] == case.status, body
    assert case.says in body["error"], body
    assert served.get("/healthz").status_code == 200


@pytest.mark.parametrize("kind", list(TOKEN_CASES))
def test_hostile_request_without_token(kind, served):
    path, status = TOKEN_CASES[kind]
    answer = served.get(path, headers={"authorization": ""})
    assert answer.status_code == status and answer.json()["limit"] == "token"
    assert served.get(path).status_code == 200  # with the token


def test_server_model_card_without_paths(served):
    card = served.get("/v1/models/demo").json()["card"]
    assert "/" not in card["weights_source"] and card["weights_source"].endswith(")")
    assert str(Path.home()) not in json.dumps(card) and "site-packages" not in json.dumps(card)


def _serve_cli(args: list[str], env: dict | None = None):
    return runner.invoke(app, ["serve", *args], env=env)


SERVE_CLI_CASES: dict[str, tuple[Callable[[Path, socket.socket], tuple[list[str], dict | None]], str]] = {
    "serve_port_99999": (lambda m, s: ([str(m), "--port", "99999"], None), r"cannot listen on 127.0.0.1:99999"),
    "serve_port_in_use": (lambda m, s: ([str(m), "--port", str(s.getsockname()[1])], None),
                          r"cannot listen on .*Address already in use"),
    "serve_host_unknown": (lambda m, s: ([str(m), "--host", "300.1.1.1", "--port", "8000"], None),
                           r"cannot listen on 300.1.1.1"),
    "serve_token_env_empty": (lambda m, s: ([str(m)], {"TLEARN_TOKEN": ""}), r"token .*is empty"),
    "serve_token_blank": (lambda m, s: ([str(m), "--token", "  "], None), r"token .*is empty"),
}


@pytest.mark.parametrize("kind", list(SERVE_CLI_CASES))
def test_hostile_serve_command(kind, demo_model_dir):
    """Refused in one line, exit 2, before the model is loaded or the port is held."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args, env = SERVE_CLI_CASES[kind][0](demo_model_dir, taken)
        result = _serve_cli(args, env)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert re.search(SERVE_CLI_CASES[kind][1], " ".join(result.output.split())), result.output


@pytest.fixture(scope="module")
def real_server(demo_model_dir):
    from served_process import RealServer

    server = RealServer(demo_model_dir, "--timeout-s", str(SLOW_CLIENT_TIMEOUT))
    yield server
    server.stop()


SLOW_CLIENT_TIMEOUT = 2.0  # the server's --timeout-s in these cases: the bound on each client's reading time


def _closed_after(sock: socket.socket, trickle: bytes, bound: float) -> tuple[float, bytes]:
    """Send `trickle` a byte every 0.2 s (then nothing) until the server closes; (seconds it took, what it said)."""
    sock.settimeout(0.2)
    started, answer = time.monotonic(), b""
    for i in range(int(bound / 0.2) + 1):
        try:
            if i < len(trickle):
                sock.send(trickle[i:i + 1])
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            break
    return time.monotonic() - started, answer


SLOW_CASES: dict[str, tuple[bytes, str]] = {  # what the client sends, slowly; what the server answers (if anything)
    "server_headers_trickled": (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200, ""),
    "server_connects_and_says_nothing": (b"", ""),
    "server_body_stops_half_way": (b"", "408"),  # the headers at once, then half the body, then nothing
}


@pytest.mark.parametrize("kind", list(SLOW_CASES))
def test_hostile_slow_client(kind, real_server, demo_data):
    """A client that holds a connection without finishing its request is cut off within a bounded time, while other
    clients are answered."""
    trickle, says = SLOW_CASES[kind]
    jpeg = _encoded(_photo(demo_data), "JPEG")
    with socket.create_connection(("127.0.0.1", real_server.port)) as slow:
        if kind == "server_body_stops_half_way":
            slow.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: "
                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg[: len(jpeg) // 2])
        status, answer = real_server.post("/v1/predict", jpeg, "image/jpeg")  # another client meanwhile
        assert status == 200 and answer["predictions"][0]["label"] in CLASSES
        seconds, said = _closed_after(slow, trickle, bound=SLOW_CLIENT_TIMEOUT + 6)
    assert seconds < SLOW_CLIENT_TIMEOUT + 5, f"the connection was held {seconds:.1f} s"
    assert says.encode() in said.split(b"\r\n")[0], said[:200]
    if says:
        assert b'"limit":"timeout-s"' in said


# ---- disks and caches (issue 24): a full or read-only disk, a damaged cache --------------------------------------
class Disks:
    """Small tmpfs mounts (root only: the test is skipped elsewhere), unmounted at the end of the test."""

    def __init__(self):
        self.mounted: list[Path] = []

    def small(self, path: Path, size: str = "256k") -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a full disk is a small tmpfs here, which needs root")
        path.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        self.mounted.append(path)
        return path

    def full(self, path: Path, size: str = "256k") -> Path:
        """A disk with no space left: a user's file fills it."""
        self.small(path, size)
        fd = os.open(path / "users-big-file.bin", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        return path

    def read_only(self, path: Path, fill: Callable[[Path], object] = lambda p: None) -> Path:
        self.small(path, "64m")
        fill(path)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    def unmount(self) -> None:
        for path in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def disks():
    made = Disks()
    yield made
    made.unmount()


@dataclass
class DiskCase:
    build: Callable  # (work, disks, model, demo, cache) -> argv
    exits: tuple[int, ...]
    says: str
    after: Callable[[Path], None] = lambda work: None  # checks on what is left


def _both(warning: str) -> str:
    """The warning (on stderr) and a trained model's summary (on stdout), in either order."""
    return rf"(?s)(?=.*{warning})(?=.*classes\W+3\b)"


def _no_leftovers(folder: str, keep: tuple[str, ...] = ("users-big-file.bin",)) -> Callable[[Path], None]:
    def check(work: Path) -> None:
        left = sorted(p.name for p in (work / folder).iterdir() if p.name not in keep)
        assert left == [], f"left under {folder}: {left}"
    return check


def _all_there(*paths: Path) -> None:
    assert all(p.exists() for p in paths), [p for p in paths if not p.exists()]


def _copied_cache(cache: Path, work: Path) -> Path:
    """A copy of the session's feature cache (the demo photos' features, their engines) to damage."""
    return Path(shutil.copytree(cache, work / "cache", ignore=shutil.ignore_patterns("*.damaged-*")))


def _damage_middle(cache: Path) -> None:
    database = cache / "features.sqlite"
    content = bytearray(database.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 8192] = np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8).tobytes()
    database.write_bytes(bytes(content))


def _live_wal(cache: Path) -> None:
    """A WAL of uncommitted-to-the-file changes copied beside the database, from a writer that is still open."""
    import sqlite3

    writer_copy = cache.parent / "writer"
    writer_copy.mkdir()
    shutil.copy(cache / "features.sqlite", writer_copy / "features.sqlite")
    db = sqlite3.connect(writer_copy / "features.sqlite")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("DELETE FROM vectors WHERE rowid % 2 = 0")
    db.commit()
    wal = bytearray((writer_copy / "features.sqlite-wal").read_bytes())
    wal[len(wal) // 2: len(wal) // 2 + 4096] = b"\xff" * 4096  # and torn in the middle, as a copy mid-write is
    (cache / "features.sqlite-wal").write_bytes(bytes(wal))
    db.close()
    shutil.rmtree(writer_copy)


def _other_version(cache: Path) -> None:
    import sqlite3

    with sqlite3.connect(cache / "features.sqlite") as db:
        db.execute("PRAGMA user_version = 99")


def _train_into(out: Callable[[Path, Disks], Path], cache: Callable[[Path, Disks, Path], Path] | None = None):
    def build(work, disks, model, demo, session_cache):
        root = _dataset(work, demo)
        args = ["train", str(root), "--out", str(out(work, disks)), "-q"]
        return args + (["--cache-dir", str(cache(work, disks, session_cache))] if cache else [])
    return build


def _predict_output(work, disks, model, demo, cache):
    return ["predict", str(model), str(_inputs(work, demo, good=2)), "--output",
            str(disks.full(work / "disk") / "p.csv")]


def _read_only_model(work, disks, model, demo, cache):
    return disks.read_only(work / "disk", lambda d: shutil.copytree(model, d / "model")) / "model"


DISK_CASES: dict[str, DiskCase] = {
    "disk_train_out_full": DiskCase(_train_into(lambda w, d: d.full(w / "disk", "1m") / "model"), (2,),
                                    r"cannot write .*model \(--out\): No space left on device",
                                    _no_leftovers("disk")),
    "disk_train_out_read_only": DiskCase(_train_into(lambda w, d: d.read_only(w / "disk") / "model"), (2,),
                                         r"model \(--out\): Read-only file system", _no_leftovers("disk")),
    "disk_predict_output_full": DiskCase(_predict_output, (2,), r"p.csv \(--output\): No space left on device",
                                         _no_leftovers("disk")),
    "disk_report_model_read_only": DiskCase(lambda w, d, m, demo, c: ["report", str(_read_only_model(w, d, m, demo,
                                                                                                      c)), "-q"],
                                            (2,), r"report \(--out\): Read-only file system"),
    "disk_predict_model_read_only": DiskCase(lambda w, d, m, demo, c: ["predict", str(_read_only_model(w, d, m, demo,
                                                                                                        c)),
                                                                       str(_inputs(w, demo, good=2))],
                                             (0,), r"path,label,score\n.*,(brick|grass|gravel),"),
    "disk_predict_output_read_only": DiskCase(
        lambda w, d, m, demo, c: ["predict", str(m), str(_inputs(w, demo, good=2)), "--output",
                                  str(d.read_only(w / "disk") / "p.csv")],
        (2,), r"p.csv.*(--output|not writable|Read-only file system)", _no_leftovers("disk")),
    "disk_quarantine_read_only": DiskCase(
        lambda w, d, m, demo, c: ["doctor", str(_dataset(w, demo, _unreadable_files)), "-q", "--quarantine",
                                  str(d.read_only(w / "disk") / "q")],
        (2,), r"q \(--quarantine\): Read-only file system",
        lambda w: (_no_leftovers("disk")(w), _all_there(w / "data" / "brick" / "broken.png"))),
    "disk_export_out_full": DiskCase(lambda w, d, m, demo, c: ["export", str(m), "--out",
                                                               str(d.full(w / "disk", "1m") / "m.onnx")],
                                     (2,), r"cannot write .*No space left on device", _no_leftovers("disk")),
    "cache_disk_full": DiskCase(_train_into(lambda w, d: w / "model", lambda w, d, c: d.full(w / "cache", "128k")),
                                (0,), _both(r"warning: the feature cache in .*cannot store features")),
    "cache_dir_read_only": DiskCase(_train_into(lambda w, d: w / "model", lambda w, d, c: d.read_only(w / "cache")),
                                    (0,), _both(r"warning: the feature cache in .*cannot store")),
    "cache_read_only_with_features": DiskCase(
        _train_into(lambda w, d: w / "model",
                    lambda w, d, c: d.read_only(w / "cache", lambda p: shutil.copy(c / "features.sqlite", p))),
        (0,), _both(r"warning: the feature cache in .*cannot store")),
    "cache_damaged_mid_file": DiskCase(
        _train_into(lambda w, d: w / "model", lambda w, d, c: (_damage_middle(_copied_cache(c, w)), w / "cache")[1]),
        (0,), _both(r"warning: the feature cache .*features.sqlite is (damaged|not a readable database).*moved to "
                    r"features.sqlite.damaged-")),
    "cache_live_wal_beside": DiskCase(
        _train_into(lambda w, d: w / "model", lambda w, d, c: (_live_wal(_copied_cache(c, w)), w / "cache")[1]),
        (0,), r"classes\W+3\b"),
    "cache_of_another_version": DiskCase(
        _train_into(lambda w, d: w / "model", lambda w, d, c: (_other_version(_copied_cache(c, w)), w / "cache")[1]),
        (0,), _both(r"written by another version of tlearn")),
    "cache_overwritten_with_text": DiskCase(
        _train_into(lambda w, d: w / "model", lambda w, d, c: (
            (_copied_cache(c, w) / "features.sqlite").write_text("not a database " * 100), w / "cache")[1]),
        (0,), _both(r"moved to features.sqlite.damaged-")),
    "cache_dir_is_a_file": DiskCase(
        _train_into(lambda w, d: w / "model", lambda w, d, c: (w / "c", (w / "c").write_text("x"))[0]),
        (2,), r"feature cache in .*c: it is not a folder"),
}


@pytest.mark.parametrize("kind", list(DISK_CASES))
def test_hostile_disk(kind, disks, demo_model_dir, demo_data, cache_dir, tmp_path, monkeypatch):
    case = DISK_CASES[kind]
    monkeypatch.setenv("TLEARN_CACHE", str(cache_dir))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(app, case.build(work, disks, demo_model_dir, demo_data, cache_dir))
    output = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert result.exit_code in case.exits, output[-2000:]
    assert re.search(case.says, output) or re.search(case.says, " ".join(output.split())), output[-2000:]
    if result.exit_code == 2:
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    case.after(work)


# ---- Ctrl-C (issue 24): one line, exit 130, nothing half-written ------------------------------------------------
def _interrupt(args: list[str], ready: Callable[[str], bool], cwd: Path, env: dict) -> tuple[int, str]:
    """Run `tlearn ARGS` as a terminal does (its own process group), press Ctrl-C (SIGINT to the whole group) once
    `ready(stderr so far)`; (exit code, stderr)."""
    process = subprocess.Popen([sys.executable, "-m", "tlearn.cli", *args], cwd=cwd, env=env, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: process.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not ready("".join(seen)) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "".join(seen)  # still working when interrupted
    os.killpg(process.pid, signal.SIGINT)
    code = process.wait(timeout=120)
    reader.join(timeout=10)
    return code, "".join(seen)


def _served(port: int) -> Callable[[str], bool]:
    def ready(_: str) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200
        except OSError:
            return False
    return ready


INTERRUPTS: dict[str, Callable[[Path, Path, Path], tuple[list[str], Callable[[str], bool], Callable[[Path], None]]]] = {
    # (work, model, demo) -> (args, when to press Ctrl-C, what must not be there after)
    "ctrl_c_train_while_extracting": lambda w, m, d: (
        ["train", str(_dataset(w, d)), "--out", str(w / "model"), "--cache-dir", str(w / "fresh-cache")],
        lambda err: "building the" in err, _no_leftovers(".", keep=("data", "fresh-cache"))),
    "ctrl_c_predict_to_output": lambda w, m, d: (
        ["predict", str(m), str(_many_inputs(w, d)), "--output", str(w / "p.csv"), "--batch-size", "1"],
        _writing(w), _no_leftovers(".", keep=("in",))),
    "ctrl_c_serve": lambda w, m, d: (["serve", str(m), "--port", str(_free_port())], None, lambda w: None),
}


def _writing(work: Path) -> Callable[[str], bool]:
    """Ready once the output's temporary file beside it holds some rows: interrupted mid-write."""
    return lambda err: any(p.stat().st_size > 200 for p in work.glob(".p.csv.*.tmp"))


def _many_inputs(work: Path, demo: Path) -> Path:
    folder = _inputs(work, demo, good=6)
    for i in range(1000):
        shutil.copy(folder / f"good{i % 6}.png", folder / f"copy{i}.png")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", list(INTERRUPTS))
def test_hostile_interrupt(kind, demo_model_dir, demo_data, cache_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    args, ready, after = INTERRUPTS[kind](work, demo_model_dir, demo_data)
    ready = ready or _served(int(args[-1]))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "TLEARN_CACHE": str(cache_dir)}
    code, err = _interrupt(args, ready, work, env)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO:")
            and not line.startswith(("building the", "extracting", "predicting"))]
    assert len(ours) == 1 and ours[0].startswith("interrupted: nothing half-written"), err[-3000:]
    after(work)
