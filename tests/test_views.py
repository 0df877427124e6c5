"""The image's mirror for the head: its features cached per view, the choice made by cross-validation on train, and
test-time augmentation followed the same way by every prediction path."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tlearn.engines.views import MeanOfViews, Mirrored, mirror
from tlearn.train.choices import make_folds
from tlearn.train.views import RECIPES, choose_views


def test_mirror_flips_left_to_right_only():
    pixels = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    flipped = mirror(pixels)
    assert flipped.flags.c_contiguous and np.array_equal(flipped[..., 0], pixels[..., -1])
    assert np.array_equal(mirror(flipped), pixels)
    engine = lambda p: p.reshape(len(p), -1).astype(np.float32)  # noqa: E731 - features that see the flip
    assert np.array_equal(Mirrored(engine)(pixels), engine(flipped))
    assert np.allclose(MeanOfViews(engine)(pixels), (engine(pixels) + engine(flipped)) / 2)


def test_auto_keeps_the_cheapest_of_equals_and_records_every_score():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = (rng.normal(size=(120, 16)) + np.eye(3, 16)[y] * 3).astype(np.float32)
    # a mirror identical to the image: tta scores as off, both as train; the one forward pass is kept on the tie
    folds = make_folds(y, None, ["a", "b", "c"], seed=0)
    choice, head, candidate = choose_views("auto", x, x.copy(), y, folds, 3)
    assert set(choice.scores) == set(RECIPES) and choice.images == 120 and "5-fold" in choice.split
    assert choice.scores["tta"] == choice.scores["off"] and choice.scores["both"] == choice.scores["train"]
    assert choice.chosen in ("off", "train") and choice.to_dict()["forwards_per_image"] == 1
    assert candidate.name == head.candidate == choice.chosen and head.oof_logits.shape == (120, 3)
    asked, _, _ = choose_views("tta", x, x, y, folds, 3)
    assert asked.chosen == "tta" and not asked.scores and asked.to_dict()["forwards_per_image"] == 2


@pytest.fixture(scope="module")
def tta_model(hymenoptera_small, cache_dir, tmp_path_factory):
    import tlearn

    clf = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, mirror="tta").fit(hymenoptera_small)
    return clf, clf.save(tmp_path_factory.mktemp("tta") / "model", report=False)


def test_a_tta_model_says_so_and_every_prediction_path_follows_it(tta_model, hymenoptera_small):
    from tlearn.predict import Predictor, softmax

    clf, folder = tta_model
    config = json.loads((folder / "config.json").read_text())
    assert config["tta"] is True and config["format_version"] == (4 if "prior.weight" in clf.bundle_.state else 3)
    assert config["training"]["views"]["forwards_per_image"] == 2
    predictor = Predictor.load(folder)
    assert predictor.card.tta
    files = sorted((hymenoptera_small / "val").rglob("*.jpg"))
    pixels = np.stack([predictor.to_pixels(f) for f in files])
    image, mirrored = predictor.view_features(pixels, "image"), predictor.view_features(pixels, "mirror")
    assert not np.allclose(image, mirrored, atol=1e-3)  # the two views differ: the mean is not a no-op
    expected = softmax(predictor.bundle.head(calibrated=True).logits((image + mirrored) / 2))
    np.testing.assert_allclose(predictor.probabilities(pixels), expected, atol=1e-5)  # server and Ray actors
    streamed = np.array([r.probabilities for r in predictor.iter_files(files)])  # predict and the API
    np.testing.assert_allclose(streamed, expected, atol=1e-5)


def test_a_tta_model_evaluates_to_its_metrics_and_retrains_from_cache(tta_model, hymenoptera_small, cache_dir):
    import tlearn
    from tlearn.data.decode import content_hash
    from tlearn.features import FeatureCache
    from tlearn.features.views import view_key

    clf, folder = tta_model
    loaded = tlearn.load(folder, cache_dir=cache_dir, progress=False)
    assert loaded.evaluate(hymenoptera_small, "val")["accuracy"] == clf.metrics_["val"]["accuracy"]
    key = loaded.bundle_.backbone.feature_key
    hashes = [content_hash(f) for f in sorted((hymenoptera_small / "val").rglob("*.jpg"))]
    with FeatureCache(view_key(key, "mirror"), cache_dir) as mirrors, FeatureCache(key, cache_dir) as images:
        cached_mirrors, cached_images = mirrors.get_many(hashes), images.get_many(hashes)
    assert cached_mirrors.keys() == cached_images.keys() == set(hashes)  # each view cached, under its own key
    assert not np.allclose(cached_mirrors[hashes[0]], cached_images[hashes[0]], atol=1e-3)
    again = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, mirror="tta").fit(hymenoptera_small)
    assert again.summary_.extracted == 0
    assert again.metrics_["val"]["accuracy"] == clf.metrics_["val"]["accuracy"]


@pytest.mark.slow
def test_the_torch_classifier_of_a_tta_model_agrees_with_its_predictor(tta_model, hymenoptera_small):
    import torch

    from tlearn.predict import Predictor

    _, folder = tta_model
    predictor = Predictor.load(folder)
    files = sorted((hymenoptera_small / "val").rglob("*.jpg"))[:4]
    pixels = np.stack([predictor.to_pixels(f) for f in files])
    model = predictor.bundle.build_model()
    assert model.mirror_mean
    with torch.no_grad():
        logits = model(predictor.preprocessing.normalise(torch.from_numpy(pixels))).numpy()
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), predictor.probabilities(pixels),
                               atol=2e-3)


@pytest.mark.slow
def test_backbone_auto_keeps_the_best_lite_on_the_inner_split(hymenoptera_small, cache_dir, tmp_path):
    import tlearn

    clf = tlearn.ImageClassifier("auto", cache_dir=cache_dir, progress=False).fit(hymenoptera_small)
    choice = clf.summary_.backbone_choice
    trials = {t["name"]: t for t in choice["trials"]}
    assert list(trials) == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    best = max(trials.values(), key=lambda t: (t["accuracy"], -t["log_loss"]))
    assert choice["chosen"] == best["name"] == clf.bundle_.backbone.name
    assert all(t["seconds"] > 0 for t in trials.values())
    assert clf.bundle_.training["backbone_choice"] == choice
    folder = clf.save(tmp_path / "model", report=False)
    assert tlearn.load(folder).predict(sorted((hymenoptera_small / "val").rglob("*.jpg"))[:2])[0].label in \
        clf.classes_
    again = tlearn.ImageClassifier("auto", cache_dir=cache_dir, progress=False).fit(hymenoptera_small)
    assert all(t["extracted"] == 0 for t in again.summary_.backbone_choice["trials"])  # features cached per backbone


def test_mirror_rows_for_training_keep_one_forward_pass(hymenoptera_small, cache_dir, tmp_path):
    import tlearn

    # without the ImageNet prior, whose tensors make a folder of format 4 (what older versions cannot read)
    plain = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, imagenet_prior="off").fit(hymenoptera_small)
    clf = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, mirror="train",
                                 imagenet_prior="off").fit(hymenoptera_small)
    views = clf.bundle_.training["views"]
    assert views["train_mirror"] and not views["tta"] and not clf.bundle_.tta
    assert plain.bundle_.training["views"]["chosen"] == "off"
    assert not np.array_equal(clf.bundle_.state["head.weight"], plain.bundle_.state["head.weight"])
    config = json.loads((clf.save(tmp_path / "model", report=False) / "config.json").read_text())
    assert config["format_version"] == 2 and config["tta"] is False  # older tlearn versions read it alike


@pytest.mark.slow
@pytest.mark.parametrize("kept", ["head", "finetune"])
def test_a_fine_tuned_model_predicts_on_the_image_alone_and_says_so(hymenoptera_small, cache_dir, tmp_path,
                                                                    monkeypatch, kept):
    """The views were chosen for the frozen head: a kept fine-tune is measured, and predicts, on one view."""
    import tlearn
    from tlearn.train import recipe
    from tlearn.train.settings import FinetuneSettings

    original = recipe.fine_tune_stage

    def keeping(*args, **kwargs):  # on 12 images one epoch rarely beats the head: the stage is set here
        tuned = original(*args, **kwargs)
        tuned.choice.chosen = kept
        return tuned

    monkeypatch.setattr(recipe, "fine_tune_stage", keeping)

    clf = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, mirror="tta", recipe="finetune",
                                 finetune=FinetuneSettings(epochs=1, batch_size=8, views=2)).fit(hymenoptera_small)
    assert clf.bundle_.training["recipe"] == kept and clf.bundle_.tta == (kept == "head")
    assert clf.bundle_.training["views"]["forwards_per_image"] == (2 if kept == "head" else 1)
    folder = clf.save(tmp_path / "model", report=False)
    loaded = tlearn.load(folder, cache_dir=cache_dir, progress=False)
    assert loaded.predictor().card.tta == (kept == "head")
    assert loaded.evaluate(hymenoptera_small, "val")["accuracy"] == clf.metrics_["val"]["accuracy"]


def test_bad_mirror_and_auto_with_weights_are_refused_before_any_work(tmp_path):
    import tlearn
    from tlearn.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="mirror"):
        tlearn.ImageClassifier(mirror="sideways").settings()
    with pytest.raises(InvalidParameter, match="--weights"):
        tlearn.ImageClassifier("auto", weights=tmp_path / "w.pth").settings()
    assert tlearn.ImageClassifier("auto").settings().backbone == "auto"
