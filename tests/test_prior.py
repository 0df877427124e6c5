"""The ImageNet prior (tlearn.train.head.ImageNetPrior): the backbone's own ImageNet probabilities beside the
features, chosen by cross-validation on train; on real ants and bees photos and real weights. The numpy head, the
torch network, the exported ONNX engine and the heat maps must all give the same model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from tlearn.cli import app
from tlearn.errors import BundleError
from tlearn.predict import Predictor

runner = CliRunner()


@pytest.fixture(scope="module")
def prior_model(hymenoptera_small, cache_dir, tmp_path_factory):
    import tlearn

    clf = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, imagenet_prior="on").fit(hymenoptera_small)
    return clf, clf.save(tmp_path_factory.mktemp("prior") / "model", report=False)


@pytest.fixture(scope="module")
def photos(hymenoptera_small):
    return sorted((hymenoptera_small / "val").rglob("*.jpg"))


def test_the_prior_is_the_backbones_imagenet_classifier_and_is_recorded(prior_model):
    import torch

    from tlearn.backbones import create_backbone

    clf, folder = prior_model
    bundle = Predictor.load(folder).bundle
    record = bundle.training["head"]["imagenet_prior"]
    assert record["used"] is True and record["asked"] == "on" and record["scale"] == 0.5
    # a tlearn that reads format 3 at most refuses the folder as newer instead of as another model's weights
    assert json.loads((folder / "config.json").read_text())["format_version"] == 4
    assert bundle.state["head.weight"].shape == (2, bundle.backbone.feature_dim + 1000)
    network, _ = create_backbone("efficientnet_lite0", imagenet_head=True)
    assert np.array_equal(bundle.state["prior.weight"], network.classifier.weight.detach().numpy())
    # the prior's probabilities are those of the full ImageNet network on the same pixels
    pixels = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        imagenet = torch.softmax(network(pixels), -1).numpy()
        network.reset_classifier(0)
        features = network(pixels).numpy()
    inputs = bundle.head().prior.inputs(features)
    assert np.allclose(inputs[:, -1000:] ** 2 / 0.25, imagenet, atol=1e-6)


def test_numpy_head_torch_network_and_onnx_export_agree(prior_model, photos, tmp_path):
    import torch

    from tlearn.predict import softmax

    clf, folder = prior_model
    predictor = Predictor.load(folder)
    pixels = np.stack([predictor.to_pixels(p) for p in photos[:4]])
    numpy_probabilities = predictor.probabilities(pixels)
    model = predictor.bundle.build_model()
    with torch.no_grad():
        normalised = predictor.preprocessing.normalise(torch.from_numpy(pixels))
        torch_probabilities = softmax(model(normalised).numpy().astype(np.float64))
    assert np.allclose(numpy_probabilities, torch_probabilities, atol=1e-4)
    result = runner.invoke(app, ["export", str(folder), "--out", str(tmp_path / "model.onnx")])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and (tmp_path / "model.onnx").stat().st_size > 5_000_000


def test_heat_map_shares_sum_to_the_class_logit(prior_model, photos):
    clf, folder = prior_model
    predictor = Predictor.load(folder)
    head = predictor.bundle.head(calibrated=True)
    for photo in photos[:3]:
        logits = head.logits(predictor.features(predictor.to_pixels(photo)[None]))[0]
        for c, name in enumerate(predictor.classes):
            explanation = predictor.explain(photo, name)
            assert float(explanation.grid.sum()) == pytest.approx(float(logits[c] - head.bias[c]), abs=1e-3)
            assert np.ptp(explanation.grid) > 0


def test_auto_keeps_the_prior_only_when_its_out_of_fold_score_is_better(hymenoptera_small, cache_dir):
    import tlearn

    clf = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False).fit(hymenoptera_small)
    record = clf.bundle_.training["head"]["imagenet_prior"]
    plain, with_prior = record["scores"]["off"], record["scores"]["off+imagenet-prior-0.5"]
    assert record["asked"] == "auto"
    assert record["gain"] == pytest.approx(plain["log_loss"] - with_prior["log_loss"], abs=1e-4)
    assert record["standard_error"] > 0
    assert record["used"] == (record["gain"] > record["standard_error"])  # one standard error: ties stay plain
    kept = with_prior if record["used"] else plain
    assert clf.metrics_["cv"]["log_loss"] == pytest.approx(kept["log_loss"])
    assert ("prior.weight" in clf.bundle_.state) == record["used"]
    off = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, imagenet_prior="off").fit(hymenoptera_small)
    assert "prior.weight" not in off.bundle_.state
    assert off.bundle_.training["head"]["imagenet_prior"]["used"] is False
    assert off.metrics_["cv"]["log_loss"] == pytest.approx(plain["log_loss"])


def test_a_changed_prior_scale_or_missing_prior_tensors_are_refused(prior_model, tmp_path):
    from safetensors.numpy import load_file, save_file

    from tlearn.files import sha256_file

    clf, folder = prior_model
    edited = tmp_path / "scale"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    config["training"]["head"]["imagenet_prior"]["scale"] = 0.25
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="does not give the answers recorded"):
        Predictor.load(edited)
    stripped = tmp_path / "stripped"
    shutil.copytree(folder, stripped)
    tensors = load_file(stripped / "model.safetensors")
    del tensors["prior.weight"]
    save_file(tensors, stripped / "model.safetensors", metadata={"format": "tlearn"})
    config = json.loads((stripped / "config.json").read_text())
    config["files"]["model.safetensors"] = sha256_file(stripped / "model.safetensors")
    (stripped / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="disagree on the head's ImageNet prior"):
        Predictor.load(stripped)


def test_cli_refuses_an_unknown_prior_setting_in_one_line(hymenoptera_small, tmp_path):
    result = runner.invoke(app, ["train", str(hymenoptera_small), "--out", str(tmp_path / "m"),
                                 "--imagenet-prior", "maybe"])
    assert result.exit_code == 2
    assert "imagenet_prior" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()
