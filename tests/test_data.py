import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from conftest import shared_dataset
from tlearn.data import DatasetError, DecodeError, find_dataset, load_image

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
    img = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
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


def test_unsplit_folder_gets_train_val_test(tmp_path):
    _class_tree(tmp_path, {"x": 20, "y": 20, "z": 7})
    ds = find_dataset(tmp_path)
    sizes = {k: len(v) for k, v in ds.splits.items()}
    assert sum(sizes.values()) == 47 and sizes["train"] > sizes["val"] + sizes["test"]
    for split in ("val", "test"):
        assert set(ds.labels(split).tolist()) == {0, 1, 2}
    recorded = ds.describe()["files"]
    assert sum(len(v) for v in recorded.values()) == 47
    assert recorded["test"][0][0].startswith(("x/", "y/", "z/"))


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
    (lambda root: _class_tree(root / "train", {"a": 3, "b": 1}), "'b' has only 1 image"),
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
