import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tlearn.backbones import create_backbone, get_spec
from tlearn.data import load_image
from tlearn.engines import PixelsToOutputs, TorchEngine
from tlearn.features import FeatureCache, extract_features, feature_key


def _extract(model, prep, files, cache, **options):
    return extract_features(files, cache, lambda: TorchEngine(PixelsToOutputs(model, prep)), prep, progress=False,
                            **options)


def _setup(tmp_path, demo_data, n=6):
    files = sorted((demo_data / "train").rglob("*.png"))[::8][:n]
    folder = tmp_path / "imgs"
    folder.mkdir()
    local = []
    for f in files:
        shutil.copy(f, folder / f"{f.parent.name}_{f.name}")
        local.append(folder / f"{f.parent.name}_{f.name}")
    model, info = create_backbone("efficientnet_lite0")
    prep = get_spec("efficientnet_lite0").preprocessing
    return local, model, prep, FeatureCache(feature_key("tf_efficientnet_lite0", info.sha256, prep), tmp_path / "c")


def test_features_match_a_direct_forward_and_are_cached(tmp_path, demo_data):
    files, model, prep, cache = _setup(tmp_path, demo_data)
    first = _extract(model, prep, files, cache, batch_size=4)
    assert first.computed == len(files) and first.vectors.shape == (len(files), 1280)
    with torch.no_grad():
        direct = model(prep.eval_transform()(load_image(files[0]))[None])[0].numpy()
    np.testing.assert_allclose(first.vectors[0], direct, rtol=1e-3, atol=1e-3)

    again = _extract(model, prep, files, cache)
    assert again.computed == 0
    np.testing.assert_array_equal(again.vectors, first.vectors)


def test_only_changed_and_added_files_are_recomputed(tmp_path, demo_data):
    files, model, prep, cache = _setup(tmp_path, demo_data)
    _extract(model, prep, files, cache)
    Image.open(files[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(files[0])  # new content
    added = files[0].with_name("added.png")
    shutil.copy(sorted((demo_data / "val").rglob("*.png"))[0], added)
    result = _extract(model, prep, files + [added], cache)
    assert result.computed == 2
    assert len(result.kept) == len(files) + 1


def test_bad_files_are_reported_and_skipped(tmp_path, demo_data):
    files, model, prep, cache = _setup(tmp_path, demo_data, n=3)
    broken = files[0].with_name("broken.png")
    broken.write_bytes(files[0].read_bytes()[:200])
    missing = files[0].with_name("missing.png")
    result = _extract(model, prep, [broken, *files, missing], cache)
    assert result.kept.tolist() == [1, 2, 3]
    assert [p.name for p, _ in result.failures] == ["broken.png", "missing.png"]
    assert broken.exists()  # reported, never deleted
    again = extract_features([broken, *files], cache, lambda: (_ for _ in ()).throw(AssertionError("engine opened")),
                             prep, progress=False)
    assert again.computed == 0 and [p.name for p, _ in again.failures] == ["broken.png"]  # the failure is cached


def test_cache_key_depends_on_weights_and_preprocessing():
    prep = get_spec("efficientnet_lite0").preprocessing
    other = get_spec("efficientnet_lite1").preprocessing
    assert feature_key("a", "w1", prep) != feature_key("a", "w2", prep)
    assert feature_key("a", "w1", prep) != feature_key("a", "w1", other)


def test_damaged_cache_entries_are_computed_again_not_trusted(tmp_path, demo_data):
    import sqlite3

    files, model, prep, cache = _setup(tmp_path, demo_data, n=3)
    first = _extract(model, prep, files, cache)
    with sqlite3.connect(cache.directory / "features.sqlite") as db:  # zero one vector, flip bytes of another
        rows = db.execute("SELECT content, vector FROM vectors ORDER BY content").fetchall()
        db.execute("UPDATE vectors SET vector = ? WHERE content = ?", (bytes(len(rows[0][1])), rows[0][0]))
        flipped = bytearray(rows[1][1])
        flipped[10] ^= 0xFF
        db.execute("UPDATE vectors SET vector = ? WHERE content = ?", (bytes(flipped), rows[1][0]))
    again = _extract(model, prep, files, cache)
    assert again.computed == 2
    np.testing.assert_allclose(again.vectors, first.vectors, atol=1e-4)


def test_a_truncated_database_is_moved_aside_and_an_unusable_folder_named(tmp_path):
    from tlearn.errors import TlearnError

    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "features.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)  # truncated
    with FeatureCache("k", folder) as cache:
        assert cache.get_many(["a"]) == {}
    assert [p.name.startswith("features.sqlite.damaged-") for p in folder.iterdir()].count(True) == 1
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(TlearnError, match="cannot open the feature cache in .*a-file"):
        FeatureCache("k", tmp_path / "a-file")


def test_a_changed_exported_engine_is_exported_again(tmp_path, demo_data):
    from tlearn.engines import open_engine, open_exported, state_key

    _, model, prep, _ = _setup(tmp_path, demo_data, n=1)
    folder = tmp_path / "engines"
    open_engine(model, prep, folder, "onnx")
    key = state_key({k: v.numpy() for k, v in model.state_dict().items()}, prep)
    onnx_file = folder / key / "model-fp32.onnx"
    assert open_exported(key, folder, "onnx") is not None
    data = bytearray(onnx_file.read_bytes())
    data[-200] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    assert open_exported(key, folder, "onnx") is None  # not trusted: its SHA-256 changed
    open_engine(model, prep, folder, "onnx")  # exports and verifies it again
    assert open_exported(key, folder, "onnx") is not None
