import shutil

import numpy as np
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
