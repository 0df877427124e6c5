import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from conftest import shared_dataset
from tlearn.data import DatasetError, DecodeError, decode_bytes, find_dataset, load_image

PHOTO = skdata.astronaut()  # a real 512x512 RGB photo
PHOTOS = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.immunohistochemistry(),
          skdata.hubble_deep_field(), skdata.retina()]


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _photo(size=(64, 48)) -> Image.Image:
    return Image.fromarray(PHOTO).resize(size)


_distinct = iter(range(10**6))


def _distinct_photo(size=(64, 48)) -> Image.Image:
    """A crop of a real photo that no other call returns (no two are near-duplicates)."""
    i = next(_distinct)
    array = PHOTOS[i % len(PHOTOS)]
    k, (h, w) = i // len(PHOTOS), array.shape[:2]
    x, y = (k * 53) % (w - 160), (k * 37) % (h - 120)
    return Image.fromarray(array[y:y + 120, x:x + 160]).resize(size)


def _class_tree(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        for i in range(n):
            _save(root / cls / f"{i}.jpg", _distinct_photo())
    return root


# ---- decoding -------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = _save(tmp_path / "rotated.jpg", _photo((60, 30)), exif=exif)
    assert load_image(path).size == (30, 60)


@pytest.mark.parametrize("mode,ext", [("L", ".png"), ("RGBA", ".png"), ("P", ".gif"), ("CMYK", ".jpg"),
                                      ("I;16", ".png"), ("RGB", ".webp"), ("RGB", ".BMP"), ("RGB", ".TIFF")])
def test_every_mode_and_format_decodes_to_rgb(tmp_path, mode, ext):
    path = _save(tmp_path / f"img{ext}", _photo().convert(mode))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert np.asarray(img).std() > 10  # still a photo, not a blank


def test_sixteen_bit_greyscale_keeps_its_contrast(tmp_path):
    arr = (np.asarray(_photo().convert("L"), dtype=np.uint16) * 257)
    path = _save(tmp_path / "deep.png", Image.fromarray(arr))
    assert np.asarray(load_image(path))[..., 0].max() >= 250


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    assert np.asarray(load_image(_save(tmp_path / "t.png", img))).min() == 255


@pytest.mark.parametrize("content,reason", [
    (b"this is a text file, not a photo", "not an image"),
    (b"", "not an image"),
])
def test_non_images_are_decode_errors(tmp_path, content, reason):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason) as info:
        load_image(path)
    assert info.value.path == str(path)


def test_truncated_jpeg_is_a_decode_error(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(PHOTO).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DecodeError, match="truncated"):
        load_image(path)


def test_huge_image_is_refused_before_decoding(tmp_path):
    path = _save(tmp_path / "huge.png", Image.new("1", (12000, 12000)))
    with pytest.raises(DecodeError, match="too large"):
        load_image(path)


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="cannot read"):
        load_image(tmp_path / "gone.jpg")


def test_hymenoptera_oddities_decode():
    root = shared_dataset("hymenoptera")
    assert load_image(root / "train/ants/imageNotFound.gif").size == (300, 300)
    assert load_image(root / "train/ants/formica.jpeg").mode == "RGB"


# ---- layouts and splits ----------------------------------------------------------------------------------------
def test_train_val_test_folders(tmp_path):
    for split in ("train", "validation", "test"):
        _class_tree(tmp_path / split, {"cat": 3, "dog": 2})
    ds = find_dataset(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 5, "val": 5, "test": 5}
    assert ds.labels("train").tolist() == [0, 0, 0, 1, 1]


def test_val_is_carved_from_train_stratified_and_seeded(tmp_path):
    _class_tree(tmp_path / "train", {"a": 20, "b": 10})
    _class_tree(tmp_path / "test", {"a": 2, "b": 2})
    ds = find_dataset(tmp_path, seed=3, val_fraction=0.2)
    assert set(ds.labels("val").tolist()) == {0, 1}  # stratified: each class is drawn on its own
    assert len(ds.paths("val")) + len(ds.paths("train")) == 30
    assert not set(ds.paths("val")) & set(ds.paths("train"))
    assert ds.paths("val") == find_dataset(tmp_path, seed=3, val_fraction=0.2).paths("val")
    assert ds.paths("val") != find_dataset(tmp_path, seed=4, val_fraction=0.2).paths("val")
    assert "carved" in ds.layout and "carved" in ds.describe()["layout"]


def test_unsplit_folder_gets_train_test_and_val_when_asked(tmp_path):
    _class_tree(tmp_path, {"x": 20, "y": 20, "z": 7})
    plain = find_dataset(tmp_path)  # choices are cross-validated on train: only a test split is carved to report
    assert set(plain.splits) == {"train", "test"} and "train/test carved 85%/15%" in plain.layout
    assert set(plain.labels("test").tolist()) == {0, 1, 2}
    ds = find_dataset(tmp_path, val_fraction=0.15)
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sum(sizes.values()) == 47 and sizes["train"] > sizes["val"] + sizes["test"]
    for split in ("val", "test"):
        assert set(ds.labels(split).tolist()) == {0, 1, 2}
    recorded = ds.describe()["files"]
    assert sum(len(v) for v in recorded.values()) == 47
    assert recorded["test"][0][0].startswith(("x/", "y/", "z/"))


def test_a_train_folder_alone_gets_a_test_split_carved_as_unsplit_data_does(tmp_path):
    _class_tree(tmp_path / "train", {"a": 20, "b": 13})
    ds = find_dataset(tmp_path, seed=1)
    assert set(ds.splits) == {"train", "test"} and "train/test carved 85%/15% from train" in ds.layout
    assert set(ds.labels("test").tolist()) == {0, 1} and len(ds.paths("train")) + len(ds.paths("test")) == 33
    assert not set(ds.paths("test")) & set(ds.paths("train"))
    assert ds.paths("test") == find_dataset(tmp_path, seed=1).paths("test")
    everything = find_dataset(tmp_path, test_fraction=0)
    assert set(everything.splits) == {"train"} and "nothing carved to report on" in everything.layout


def test_files_without_image_extension_are_ignored_and_listed(tmp_path):
    _class_tree(tmp_path / "train", {"a": 2, "b": 2})
    (tmp_path / "train/a/notes.txt").write_text("hello")
    ds = find_dataset(tmp_path)
    assert [p.name for p in ds.ignored] == ["notes.txt"]


@pytest.mark.parametrize("build,message", [
    (lambda root: None, "does not exist"),
    (lambda root: _class_tree(root, {"only": 3}), "only one class"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (_class_tree(root, {"a": 3}), (root / "b").mkdir()), "'b' .* has no images"),
    (lambda root: (_class_tree(root / "train", {"a": 3, "b": 3}), _class_tree(root / "val", {"a": 2})),
     "missing classes that train has: b"),
    (lambda root: (_class_tree(root / "train", {"a": 3, "b": 3}), _class_tree(root / "val", {"a": 2, "b": 1, "c": 1})),
     "classes that train does not: c"),
    (lambda root: _class_tree(root, {"a": 3, "b": 1}), "'b' has only 1 image"),
    (lambda root: _class_tree(root / "val", {"a": 3, "b": 3}), "no train/ folder"),
])
def test_unusable_layouts_say_what_to_fix(tmp_path, build, message):
    root = tmp_path / "data"
    build(root)
    with pytest.raises(DatasetError, match=message):
        find_dataset(root)


def test_file_instead_of_folder(tmp_path):
    path = _save(tmp_path / "x.jpg", _photo())
    with pytest.raises(DatasetError, match="is a file"):
        find_dataset(path)
    shutil.rmtree(tmp_path)


# ---- decoding: hostile files -----------------------------------------------------------------------------------
def _bomb_png(path: Path, side: int = 10_000) -> Path:
    """A tiny PNG file whose header says side x side pixels (1-bit: about 12 kB on disk)."""
    return _save(path, Image.new("1", (side, side)), optimize=True)


def test_bomb_guard_is_per_call_and_uses_no_warning_filters(tmp_path, monkeypatch):
    import warnings

    bomb = _bomb_png(tmp_path / "bomb.png").read_bytes()

    def forbidden(*args, **kwargs):
        raise AssertionError("warnings.catch_warnings is process-wide: threads race on it")

    monkeypatch.setattr(warnings, "catch_warnings", forbidden)
    with pytest.raises(DecodeError, match="too large"):
        decode_bytes(bomb, "bomb.png")
    small = _save(tmp_path / "small.png", _distinct_photo((300, 200))).read_bytes()
    assert decode_bytes(small, "small.png").size == (300, 200)
    with pytest.raises(DecodeError, match="too large .*300x200.*limit 10,000"):
        decode_bytes(small, "small.png", max_pixels=10_000)
    with pytest.raises(DecodeError, match="limit 10,000"):
        load_image(tmp_path / "small.png", max_pixels=10_000)


def test_no_bomb_is_decoded_under_threads(tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    bombs = [_bomb_png(tmp_path / f"bomb{i}.png") for i in range(6)]
    photos = [_save(tmp_path / f"p{i}.png", _distinct_photo()) for i in range(6)]
    decoded, lock = [], threading.Lock()

    def attempt(path: Path) -> None:
        try:
            load_image(path)
            with lock:
                decoded.append(path)
        except DecodeError:
            pass

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(attempt, (bombs + photos) * 4))
    assert sorted(set(decoded)) == sorted(photos)


@pytest.mark.parametrize("make", ["fifo", "device", "folder"])
def test_special_files_are_refused_by_name(tmp_path, make):
    if make == "fifo":
        path = tmp_path / "pipe.jpg"
        os.mkfifo(path)
        kind = "a FIFO"
    elif make == "device":
        path, kind = Path("/dev/zero"), "a character device"
    else:
        path, kind = tmp_path, "a folder"
    with pytest.raises(DecodeError, match=f"not a regular file \\({kind}\\)"):
        load_image(path)


# ---- discovery -------------------------------------------------------------------------------------------------
def _skipped(ds) -> dict[str, str]:
    return {s.path.name: s.reason for s in ds.skipped}


def test_symlinked_class_folders_are_followed_and_loops_named(tmp_path):
    outside = _class_tree(tmp_path / "elsewhere", {"b": 4})
    root = _class_tree(tmp_path / "data", {"a": 4})
    (root / "b").symlink_to(outside / "b", target_is_directory=True)
    (root / "a" / "again").symlink_to(root / "a", target_is_directory=True)  # a loop
    (root / "a" / "up").symlink_to(root, target_is_directory=True)  # another, through the root
    (root / "a" / "way-up").symlink_to(tmp_path, target_is_directory=True)  # the folder that holds the dataset
    (root / "root-again").symlink_to(root, target_is_directory=True)  # a class folder that is the root itself
    (root / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "a" / "self.jpg").symlink_to(root / "a" / "self.jpg")
    ds = find_dataset(root)
    assert ds.classes == ["a", "b"]
    assert sum(len(v) for v in ds.splits.values()) == 8
    skipped = _skipped(ds)
    assert "loop" in skipped["again"] and "loop" in skipped["up"] and "loop" in skipped["way-up"]
    assert "loop" in skipped["root-again"]
    assert "broken symbolic link" in skipped["gone.jpg"] and "loop" in skipped["self.jpg"]


def test_unsupported_and_special_files_are_named_as_skipped(tmp_path):
    root = _class_tree(tmp_path / "data", {"a": 4, "b": 4})
    for name in ("photo.avif", "photo.HEIC", "drawing.svg"):
        (root / "a" / name).write_bytes(b"not really")
    os.mkfifo(root / "b" / "pipe.jpg")
    skipped = _skipped(find_dataset(root))
    assert "AVIF images are not supported" in skipped["photo.avif"]
    assert "HEIC" in skipped["photo.HEIC"] and "SVG" in skipped["drawing.svg"]
    assert skipped["pipe.jpg"] == "not a regular file (a FIFO)"


def test_unreadable_sub_folder_is_named(tmp_path, monkeypatch):
    root = _class_tree(tmp_path / "data", {"a": 4, "b": 4})
    locked = root / "a" / "locked"
    _class_tree(locked, {"x": 1})
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:  # chmod cannot stop root, who runs these tests in CI
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ds = find_dataset(root)
    assert _skipped(ds)["locked"] == "cannot list folder (Permission denied)"
    assert sum(len(v) for v in ds.splits.values()) == 8


@pytest.mark.parametrize("classes", [("valid", "invalid"), ("train", "bus"), ("Test", "other")])
def test_classes_named_like_splits_in_a_flat_layout(tmp_path, classes):
    root = _class_tree(tmp_path / "data", {c: 4 for c in classes})
    ds = find_dataset(root)
    assert ds.classes == sorted(classes) and "one folder per class" in ds.layout


def test_folder_names_keep_their_case_and_split_names_must_not_collide(tmp_path):
    root = _class_tree(tmp_path / "data" / "train", {"Cat": 3, "cat": 3, "Dog": 3})
    _class_tree(tmp_path / "data" / "Val", {"Cat": 1, "cat": 1, "Dog": 1})
    ds = find_dataset(root.parent)
    assert ds.classes == ["Cat", "Dog", "cat"] and set(ds.splits) == {"train", "val"}
    _class_tree(tmp_path / "data" / "Train", {"Cat": 3, "cat": 3, "Dog": 3})
    with pytest.raises(DatasetError, match="Train/ and train/|train/ and Train/"):
        find_dataset(root.parent)


def test_non_utf8_file_names_survive(tmp_path):
    import json

    root = _class_tree(tmp_path / "data", {"a": 4, "b": 4})
    odd = Path(os.fsdecode(bytes(root / "a") + b"/caf\xe9.jpg"))
    _save(odd, _distinct_photo())
    ds = find_dataset(root)
    assert odd in [p for split in ds.splits for p in ds.paths(split)]
    recorded = json.loads(json.dumps(ds.describe()))
    names = [os.fsencode(path) for files in recorded["files"].values() for path, _ in files]
    assert b"a/caf\xe9.jpg" in names


def test_tlearn_outputs_inside_the_dataset_are_not_data(tmp_path):
    import json

    root = _class_tree(tmp_path / "data", {"a": 4, "b": 4})
    for model in (root / "a-model", root / "a" / "model"):
        _class_tree(model / "report", {"figures": 2})
        (model / "config.json").write_text(json.dumps({"format": "tlearn-bundle", "classes": ["a", "b"]}))
    report = root / "report"
    _save(report / "confusion.png", _distinct_photo())
    (report / "report.html").write_text("<!DOCTYPE html>\n<html><head><title>tlearn report: x</title>")
    ds = find_dataset(root)
    assert ds.classes == ["a", "b"] and sum(len(v) for v in ds.splits.values()) == 8
    assert {"a-model", "model", "report"} <= set(_skipped(ds))


# ---- stable, leak-free splits ----------------------------------------------------------------------------------
def _split_of(ds) -> dict[Path, str]:
    return {p: split for split in ds.splits for p in ds.paths(split)}


def test_a_files_split_depends_on_its_content_only(tmp_path):
    root = _class_tree(tmp_path / "data", {"x": 30, "y": 30, "z": 30})
    before = _split_of(find_dataset(root, seed=1))
    for i in range(4):
        _save(root / "x" / f"new{i}.jpg", _distinct_photo())
        _save(root / "z" / f"new{i}.jpg", _distinct_photo())
    for name in ("broken1.jpg", "broken2.jpg", "broken3.jpg"):
        (root / "y" / name).write_bytes(b"this is not a photo")
    (root / "x" / "0.jpg").unlink()
    ds = find_dataset(root, seed=1)
    after = _split_of(ds)
    assert {p: s for p, s in before.items() if p in after} == {p: s for p, s in after.items() if p in before}
    assert not any(p.name.startswith("broken") for p in after)  # never counted as images
    assert {s.path.name for s in ds.skipped} == {"broken1.jpg", "broken2.jpg", "broken3.jpg"}
    assert _split_of(find_dataset(root, seed=2)) != after


def test_near_duplicates_land_in_one_carved_split(tmp_path):
    root = _class_tree(tmp_path / "data", {"x": 40, "y": 40})
    for i in range(0, 40, 2):
        original = Image.open(root / "x" / f"{i}.jpg")
        original.resize((56, 42)).save(root / "x" / f"{i}-smaller.png")  # another encoding of the same picture
        shutil.copy(root / "x" / f"{i}.jpg", root / "x" / f"{i}-copy.jpg")  # the same bytes
    ds = find_dataset(root, seed=0, val_fraction=0.15)
    where = _split_of(ds)
    for i in range(0, 40, 2):
        assert where[root / "x" / f"{i}-smaller.png"] == where[root / "x" / f"{i}.jpg"] == \
            where[root / "x" / f"{i}-copy.jpg"]
    assert ds.leaks == []
    assert len({where[root / "x" / f"{i}.jpg"] for i in range(0, 40, 2)}) >= 2  # groups still spread out
    # the folds of cross-validation keep them together too: one group id for the three files in train
    group = dict(zip(ds.paths("train"), ds.train_groups()))
    kept = [i for i in range(0, 40, 2) if where[root / "x" / f"{i}.jpg"] == "train"]
    assert kept and all(group[root / "x" / f"{i}.jpg"] == group[root / "x" / f"{i}-copy.jpg"] ==
                        group[root / "x" / f"{i}-smaller.png"] for i in kept)
    assert len(set(group.values())) == len(group) - 2 * len(kept)  # every other image is a group of its own


def test_leaks_across_given_splits_are_listed(tmp_path):
    _class_tree(tmp_path / "train", {"a": 5, "b": 5})
    _class_tree(tmp_path / "val", {"a": 2, "b": 2})
    Image.open(tmp_path / "train/a/1.jpg").resize((60, 45)).save(tmp_path / "val/a/seen.png")
    ds = find_dataset(tmp_path)
    assert [(leak.paths, leak.splits) for leak in ds.leaks] == [
        ((tmp_path / "train/a/1.jpg", tmp_path / "val/a/seen.png"), ("train", "val"))]
    recorded = ds.describe_leaks()
    assert recorded["count"] == 1 and recorded["examples"][0]["paths"] == ["train/a/1.jpg", "val/a/seen.png"]
    assert recorded["examples"][0]["splits"] == ["train", "val"] and recorded["examples"][0]["bits"] <= 4


def test_fingerprints_are_cached_by_content(tmp_path, monkeypatch):
    from tlearn.data import fingerprints

    root = _class_tree(tmp_path / "data", {"a": 4, "b": 4})
    first = find_dataset(root, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "fingerprints.sqlite").is_file()
    monkeypatch.setattr(fingerprints, "decode_bytes", lambda *a, **k: pytest.fail("decoded again"))
    assert _split_of(find_dataset(root, cache_dir=tmp_path / "cache")) == _split_of(first)


def test_near_pairs_finds_what_comparing_every_pair_finds():
    from tlearn.data.fingerprints import near_pairs

    rng = np.random.default_rng(0)
    codes = [int(c) for c in rng.integers(0, 2**63, 300, dtype=np.int64)]
    codes += [c ^ (1 << int(b)) ^ (1 << int(b2)) for c, b, b2 in zip(codes[:50], rng.integers(0, 64, 50),
                                                                     rng.integers(0, 64, 50))]
    codes += [codes[7] ^ 0b11111]  # 5 bits away: not a near-duplicate
    brute = [(i, j, bin(a ^ b).count("1")) for i, a in enumerate(codes) for j, b in enumerate(codes)
             if i < j and bin(a ^ b).count("1") <= 4]
    assert near_pairs(codes) == brute and len(brute) >= 50
