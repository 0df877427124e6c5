"""Heat maps (class activation maps) on real photos and real weights: Predictor.explain, `tlearn explain`, the
server's /v1/explain; and a model folder without a feature-map engine."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlearn.errors import BundleError, InvalidParameter
from tlearn.explain import PNG_TAG, Explanation
from tlearn.predict import Predictor


def tlearn_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "tlearn.cli"]


@pytest.fixture(scope="module")
def hym(hymenoptera_model) -> Predictor:
    return Predictor.load(hymenoptera_model)


@pytest.fixture(scope="module")
def hym_photos(hymenoptera_small) -> list[Path]:
    return sorted((hymenoptera_small / "val").rglob("*.jpg"))[::2]


@pytest.fixture(scope="module")
def fine_tuned_model(hymenoptera_small, cache_dir, tmp_path_factory) -> Path:
    """One epoch of fine-tuning, kept whatever the inner split says (it decides between the stages; here the
    tuned weights are what is tested)."""
    import tlearn
    import tlearn.train.recipe as recipe
    from tlearn.train.settings import FinetuneSettings

    kept = recipe.StageChoice
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "StageChoice", lambda chosen, *rest: kept("finetune", *rest))
        clf = tlearn.ImageClassifier(recipe="finetune", cache_dir=cache_dir, progress=False,
                                     finetune=FinetuneSettings(epochs=1, batch_size=8)).fit(hymenoptera_small)
    assert clf.bundle_.training["recipe"] == "finetune"
    return clf.save(tmp_path_factory.mktemp("fine-tuned") / "model")


def test_map_has_the_image_size_and_explains_the_top1_of_predict(hym, hym_photos):
    rows = hym.predict(hym_photos)
    for photo, row in zip(hym_photos, rows):
        explanation = hym.explain(photo)
        with Image.open(photo) as image:
            assert explanation.heat.shape == (image.height, image.width)
            assert explanation.size == image.size
        assert explanation.label == explanation.top_label == row.top_label
        assert explanation.probability == pytest.approx(row.score, abs=1e-3)
        heat = explanation.heat
        left, top, right, bottom = explanation.box
        assert heat.min() == 0 and heat.max() == pytest.approx(1, abs=1e-5)
        assert not heat[:, :left].any() and not heat[:, right:].any()  # outside the crop the model saw nothing


def test_grid_sums_to_the_class_logit_and_a_named_class_is_explained(hym, hym_photos):
    photo = hym_photos[0]
    pixels = hym.to_pixels(photo)[None]
    head = hym.bundle.head(calibrated=True)
    logits = head.logits(hym.features(pixels))[0]
    for name in hym.classes:
        explanation = hym.explain(photo, name)
        c = hym.classes.index(name)
        assert explanation.label == name
        assert float(explanation.grid.sum()) == pytest.approx(float(logits[c] - head.bias[c]), abs=1e-3)
    other = [c for c in hym.classes if c != hym.explain(photo).label][0]
    assert not np.allclose(hym.explain(photo, other).heat, hym.explain(photo).heat)


def test_heat_follows_the_object_when_it_moves(hym, hym_photos):
    """The same photo pasted at the left and at the right of a grey canvas: the heat moves with it."""
    with Image.open(hym_photos[0]) as image:
        photo = image.convert("RGB").resize((200, 200))
    maps = []
    for x in (0, 400):
        canvas = Image.new("RGB", (600, 600), (128, 128, 128))
        canvas.paste(photo, (x, 200))
        heat = hym.explain(np.asarray(canvas)).heat
        maps.append(heat[:, :300].sum() / heat.sum())
    assert maps[0] > 0.5 > maps[1]


def test_unknown_class_and_undecodable_image_raise_user_errors(hym, hym_photos, tmp_path):
    with pytest.raises(InvalidParameter, match="no class 'wasps'"):
        hym.explain(hym_photos[0], "wasps")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    from tlearn.data.decode import DecodeError

    with pytest.raises(DecodeError, match="bad.jpg"):
        hym.explain(bad)


def test_explain_with_test_time_augmentation_matches_predict(hymenoptera_model, hym_photos, tmp_path):
    """A model predicting on the mean of the image's and its mirror's features: the map is too."""
    from tlearn.bundle import Bundle

    bundle = Bundle.load(hymenoptera_model)
    bundle.tta = True
    predictor = Predictor.from_bundle(bundle)
    for photo, row in zip(hym_photos[:3], predictor.predict(hym_photos[:3])):
        explanation = predictor.explain(photo)
        assert explanation.label == row.top_label
        assert explanation.probability == pytest.approx(row.score, abs=1e-3)


def test_a_model_folder_without_a_feature_map_says_what_to_do(hymenoptera_model, hym_photos, tmp_path,
                                                              monkeypatch):
    old = tmp_path / "old"
    shutil.copytree(hymenoptera_model, old)
    config = json.loads((old / "config.json").read_text())
    del config["files"]["engine/feature-map.onnx"]
    (old / "engine" / "feature-map.onnx").unlink()
    (old / "config.json").write_text(json.dumps(config))
    predictor = Predictor.load(old)
    assert predictor.bundle.feature_map_file is None
    assert predictor.predict(hym_photos[:1])[0].label  # predicting is untouched

    import tlearn.errors

    real = tlearn.errors.require

    def no_torch(module, extra, purpose):
        if module == "torch":
            raise tlearn.errors.MissingExtra(f"{purpose} needs torch")
        real(module, extra, purpose)

    monkeypatch.setattr(tlearn.errors, "require", no_torch)
    monkeypatch.setenv("TLEARN_CACHE", str(tmp_path / "cache"))
    with monkeypatch.context() as no_onnx:  # neither torch nor onnx: nothing can make the file
        no_onnx.setitem(sys.modules, "onnx", None)
        with pytest.raises(BundleError, match="train it again .*tlearn\\[train\\]"):
            predictor.explain(hym_photos[0])
    # onnx without torch: the map is cut from the folder's fp32 engine graph, into the cache
    explanation = Predictor.load(old).explain(hym_photos[0])
    expected = Predictor.load(hymenoptera_model).explain(hym_photos[0])
    assert explanation.label == expected.label
    np.testing.assert_allclose(explanation.grid, expected.grid, atol=1e-4)
    assert list((tmp_path / "cache" / "engines").glob("*/feature-map.onnx"))
    assert not (old / "engine" / "feature-map.onnx").exists()


def test_the_cut_graph_gives_the_maps_the_torch_export_gives(hymenoptera_model, tmp_path):
    """The feature-map file cut from the backbone's ONNX graph (no torch) and the one exported from the network
    compute the same maps; a graph that does not end in a global average pool is not cut."""
    import onnx
    from onnx import TensorProto, helper

    from tlearn.bundle import Bundle
    from tlearn.engines import read_reference
    from tlearn.engines.feature_map import derive_feature_map, export_feature_map
    from tlearn.engines.runtimes import OnnxEngine

    bundle = Bundle.load(hymenoptera_model)
    cut, exported = tmp_path / "cut", tmp_path / "exported"
    for folder in (cut, exported):
        folder.mkdir()
        shutil.copyfile(bundle.engine_files[1], folder / "reference.safetensors")
    cut_file = derive_feature_map(bundle.engine_files[0], cut)
    exported_file = export_feature_map(bundle.build_model().backbone, bundle.preprocessing, exported)
    pixels, pooled = read_reference(cut / "reference.safetensors")
    maps = OnnxEngine(cut_file)(pixels)
    assert maps.ndim == 4 and maps.shape[2] * maps.shape[3] > 1
    np.testing.assert_allclose(maps, OnnxEngine(exported_file)(pixels), atol=1e-4)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), pooled, atol=1e-3)

    # a classifier graph (a Gemm at the end, as VGG's fully connected layers): nothing is cut, nothing written
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("outputs", TensorProto.FLOAT, [1, 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 4], [0.1] * 8)
    graph = helper.make_graph([helper.make_node("Gemm", ["pixels", "w"], ["outputs"], transB=1)], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph), tmp_path / "gemm.onnx")
    other = tmp_path / "other"
    other.mkdir()
    assert derive_feature_map(tmp_path / "gemm.onnx", other) is None
    assert not list(other.iterdir())

    # a pool over a map of one place (VGG's fully connected layers run as convolutions): no map, and that is kept
    from safetensors.numpy import save_file

    from tlearn.engines.feature_map import exported_feature_map, known_or_cut

    single = tmp_path / "single"
    single.mkdir()
    save_file({"pixels": pixels, "outputs": pixels.astype(np.float32).mean(axis=(2, 3))},
              single / "reference.safetensors")
    x = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["n", 3, 224, 224])
    y = helper.make_tensor_value_info("outputs", TensorProto.FLOAT, ["n", 3])
    nodes = [helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("GlobalAveragePool", ["f"], ["one_place"]),
             helper.make_node("GlobalAveragePool", ["one_place"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["outputs"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "single.onnx")
    assert known_or_cut(single, tmp_path / "single.onnx") is False
    assert not (single / "feature-map.onnx").exists() and exported_feature_map(single) is False


def test_fine_tuned_model_explains_with_its_own_weights(fine_tuned_model, hymenoptera_small):
    predictor = Predictor.load(fine_tuned_model)
    assert predictor.bundle.backbone.fine_tuned_sha256 is not None
    photos = sorted((hymenoptera_small / "val").rglob("*.jpg"))[:3]
    for photo, row in zip(photos, predictor.predict(photos)):
        explanation = predictor.explain(photo)
        assert explanation.label == row.top_label
        assert explanation.probability == pytest.approx(row.score, abs=1e-3)


# ---------------------------------------------------------------- the command line

def run_explain(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*tlearn_command(), "explain", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_one_tagged_overlay_per_image_and_replaces_only_its_own(hymenoptera_model, hym_photos,
                                                                          tmp_path):
    out = tmp_path / "heat"
    done = run_explain(hymenoptera_model, *hym_photos[:2], "--out", out)
    assert done.returncode == 0, done.stderr
    written = sorted(out.iterdir())
    assert [p.name for p in written] == sorted(f"{p.stem}.heat.png" for p in hym_photos[:2])
    for path, photo in zip(sorted(written), sorted(hym_photos[:2], key=lambda p: p.stem)):
        with Image.open(path) as overlay, Image.open(photo) as image:
            assert overlay.size == image.size and PNG_TAG in overlay.text
    again = run_explain(hymenoptera_model, *hym_photos[:2], "--out", out)  # its own files: replaced
    assert again.returncode == 0, again.stderr

    mine = out / f"{hym_photos[0].stem}.heat.png"
    Image.new("RGB", (8, 8)).save(mine)  # a user's file of the same name
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = run_explain(hymenoptera_model, *hym_photos[:2], "--out", out)
    assert refused.returncode == 2 and "refusing to replace" in refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("case", ["unknown class", "undecodable image"])
def test_cli_bad_input_is_one_line_exit_2_and_nothing_written(hymenoptera_model, hym_photos, tmp_path, case):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    args = [*hym_photos[:2], "--class", "wasps"] if case == "unknown class" else [hym_photos[0], bad]
    done = run_explain(hymenoptera_model, *args, "--out", tmp_path / "heat")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert ("no class 'wasps'" if case == "unknown class" else "broken.jpg") in done.stderr
    assert not (tmp_path / "heat").exists()


# ---------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def client(hym):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tlearn.serve import ServeSettings, create_app

    with TestClient(create_app(hym, ServeSettings(name="hym")), raise_server_exceptions=False) as client:
        yield client


def test_server_explain_gives_the_map_as_json_and_the_overlay_as_png(client, hym, hym_photos):
    content = hym_photos[1].read_bytes()
    expected = hym.explain(hym_photos[1])
    answer = client.post("/v1/explain", content=content, headers={"content-type": "image/jpeg"})
    assert answer.status_code == 200, answer.text
    body = answer.json()["explanation"]
    assert body["label"] == expected.label and body["probability"] == pytest.approx(expected.probability)
    assert np.allclose(body["grid"], expected.grid, atol=1e-5) and body["size"] == list(expected.size)
    overlay = Image.open(io.BytesIO(base64.b64decode(answer.json()["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == expected.size

    other = [c for c in hym.classes if c != expected.label][0]
    png = client.post(f"/v1/explain?format=png&class={other}", files={"image": ("x.jpg", content, "image/jpeg")})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == expected.size


def test_server_explain_refuses_bad_requests(client, hym_photos):
    content = hym_photos[0].read_bytes()
    unknown = client.post("/v1/explain?class=wasps", content=content, headers={"content-type": "image/jpeg"})
    assert unknown.status_code == 400 and "no class 'wasps'" in unknown.json()["error"]
    broken = client.post("/v1/explain", content=content[:200], headers={"content-type": "image/jpeg"})
    assert broken.status_code in (415, 422) and broken.json()["limit"] in ("decodable-image", "image-format")
    two = client.post("/v1/explain", files=[("a", ("a.jpg", content, "image/jpeg")),
                                            ("b", ("b.jpg", content, "image/jpeg"))])
    assert two.status_code == 400 and "one image" in two.json()["error"]


def test_explanation_record_round_trips_to_json(hym, hym_photos):
    explanation = hym.explain(hym_photos[0])
    assert isinstance(explanation, Explanation)
    data = json.loads(json.dumps(explanation.to_dict()))
    assert np.asarray(data["grid"]).shape == explanation.grid.shape


def test_report_shows_heat_maps_for_mistakes_and_least_confident(hymenoptera_model, tmp_path):
    import tlearn

    page = tlearn.load(hymenoptera_model, progress=False).report(tmp_path / "report").read_text()
    heat = sorted(p.name for p in (tmp_path / "report" / "gallery").glob("*_heat.jpg"))
    assert "Least confident images" in page and [n for n in heat if n.startswith("unsure_")]
    assert all(f"gallery/{name}" in page for name in heat)
    mistakes = [p for p in (tmp_path / "report" / "gallery").glob("mistake_*.jpg") if "_heat" not in p.name]
    assert len([n for n in heat if n.startswith("mistake_")]) == len(mistakes)


def test_int8_model_explains_the_class_its_predictions_give(hymenoptera_small, cache_dir, tmp_path):
    """The feature-map file is fp32; the class and probability of an int8 model come from its own engine."""
    import tlearn

    folder = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, precision="int8").fit(
        hymenoptera_small).save(tmp_path / "int8")
    predictor = Predictor.load(folder)
    assert predictor.card.precision == "int8"
    photos = sorted((hymenoptera_small / "val").rglob("*.jpg"))[:4]
    for photo, row in zip(photos, predictor.predict(photos)):
        explanation = predictor.explain(photo)
        assert explanation.label == row.top_label and explanation.probability == pytest.approx(row.score, abs=1e-6)
