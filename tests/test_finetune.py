"""Stage 2 (fine-tuning on Lightning): fixed views and the cached trunk, loss weights, frozen BatchNorm, schedule,
the inner split that chooses, the one pixel pipeline, kill -9 + resume, 2-process DDP."""
from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from tlearn.backbones import create_backbone, get_spec, state_sha256
from tlearn.classifier import Classifier
from tlearn.data import find_dataset
from tlearn.data.decode import content_hash, load_image
from tlearn.data.decoded import decode_resized
from tlearn.data.far_sets import make_digits_dataset
from tlearn.engines import stream_pixels
from tlearn.train.augment import ViewSpec, train_transform, view_pixels
from tlearn.train.finetune import (
    FinetuneModule,
    FinetuneSettings,
    class_weights,
    resolve_unfreeze,
    unfreeze,
    warmup_cosine,
)
from tlearn.train.head import LinearHead
from tlearn.train.recipe import fine_tune_stage, inner_split, val_score
from tlearn.train.trunk import TrunkCache, cut_backbone, trunk_key, trunk_outputs

TLEARN = [sys.executable, "-m", "tlearn.cli"]
SPEC = get_spec("efficientnet_lite0")
PREP = SPEC.preprocessing


@pytest.fixture(scope="module")
def lite0_backbone() -> nn.Module:
    return create_backbone("efficientnet_lite0")[0]


@pytest.fixture()
def lite0(lite0_backbone) -> Classifier:
    torch.manual_seed(0)
    return Classifier(copy.deepcopy(lite0_backbone), nn.Linear(1280, 3))


@pytest.fixture(scope="module")
def demo_images(demo_data):
    paths = sorted((demo_data / "train").rglob("*.png"))[::4]
    labels = np.array([["brick", "grass", "gravel"].index(p.parent.name) for p in paths])
    return decode_resized(paths, labels, PREP.resize_size(), progress=False)


def test_decoded_images_are_resized_once_and_augmented_to_the_input_size(demo_images):
    assert len(demo_images) == 12 and set(demo_images.labels.tolist()) == {0, 1, 2}
    for pixels in demo_images.pixels:
        assert pixels.dtype == torch.uint8 and min(pixels.shape[1:]) == PREP.resize_size()
    for policy in ("none", "flip", "trivial"):
        x = train_transform(PREP, policy)(demo_images.pixels[0])
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown augmentation"):
        train_transform(PREP, "wild")


def test_view_zero_is_the_prediction_pixels_and_views_are_seeded_by_content(demo_data):
    path = min((demo_data / "train" / "brick").glob("*.png"))
    image, key = load_image(path), content_hash(path)
    views = view_pixels(image, PREP, ViewSpec(6), key)
    assert views.shape == (6, 3, 224, 224) and views.dtype == np.uint8
    predicted = next(iter(stream_pixels([path], PREP))).pixels[0]
    assert np.array_equal(views[0], predicted)  # the one pixel pipeline: what prediction sees
    assert np.array_equal(views[1], PREP.to_pixels(ImageOps.mirror(image)))
    assert np.array_equal(views, view_pixels(image, PREP, ViewSpec(6), key))  # same image, same views
    other = view_pixels(image, PREP, ViewSpec(6), "another-hash")
    assert np.array_equal(other[:2], views[:2]) and not np.array_equal(other[2:], views[2:])
    assert len({views[k].tobytes() for k in range(6)}) == 6


def test_trunk_cut_below_the_first_unfrozen_block_gives_the_backbone_output(lite0):
    cut = cut_backbone(lite0.backbone, resolve_unfreeze("top", SPEC.unfreeze_hint), 224)
    assert cut is not None and cut.name == "blocks.5.0"
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(cut.top(cut.trunk(x)), lite0.backbone(x), atol=1e-5)
        assert cut.trunk(x).shape == (2, 112, 14, 14)
    assert cut_backbone(lite0.backbone, [""], 224) is None  # --unfreeze all: nothing frozen to cache
    assert cut_backbone(lite0.backbone, ["conv_stem"], 224) is None


def test_trunk_activations_are_computed_once_then_read_from_the_cache(lite0, demo_data, tmp_path):
    FinetuneModule(lite0, 3, FinetuneSettings(), resolve_unfreeze("top", SPEC.unfreeze_hint))  # freezes
    cut = cut_backbone(lite0.backbone, resolve_unfreeze("top", SPEC.unfreeze_hint), 224)
    paths = sorted((demo_data / "val").rglob("*.png"))[:3] + [tmp_path / "missing.png"]
    views = ViewSpec(3)
    cache = TrunkCache(trunk_key(SPEC.architecture, cut, PREP, views, "float16"), tmp_path)
    first = trunk_outputs(cut, PREP, paths, views, cache, progress=False)
    again = trunk_outputs(cut, PREP, paths, views, cache, progress=False)
    assert first.computed == 3 and again.computed == 0 and first.kept.tolist() == [0, 1, 2]
    assert first.activations.shape == (3, 3, 112, 14, 14) and first.activations.dtype == torch.float16
    assert torch.equal(first.activations, again.activations) and len(first.failures) == 1
    with torch.inference_mode():
        exact = cut.trunk(PREP.normalise(torch.from_numpy(next(iter(stream_pixels(paths[:1], PREP))).pixels)))
    assert torch.allclose(first.activations[0, 0].float(), exact[0], atol=2e-2, rtol=2e-3)  # float16 storage
    assert trunk_key(SPEC.architecture, cut, PREP, ViewSpec(4), "float16") != cache.directory.name


def test_an_exported_trunk_runs_only_where_it_gives_torchs_activations(lite0, demo_data, tmp_path):
    FinetuneModule(lite0, 3, FinetuneSettings(), resolve_unfreeze("top", SPEC.unfreeze_hint))
    cut = cut_backbone(lite0.backbone, resolve_unfreeze("top", SPEC.unfreeze_hint), 224)
    paths = sorted((demo_data / "val").rglob("*.png"))[:4]
    views = ViewSpec(2)
    cache = TrunkCache(trunk_key(SPEC.architecture, cut, PREP, views, "float32"), tmp_path)
    # one image per forward: the first batch chooses the engine, the next three run on the one chosen
    out = trunk_outputs(cut, PREP, paths, views, cache, "float32", batch_size=2, progress=False)
    assert out.engine.startswith(("OpenVINO fp32", "eager torch (faster here")), out.engine
    with torch.inference_mode():
        for i, path in enumerate(paths):
            pixels = torch.from_numpy(view_pixels(load_image(path, PREP.draft_size()), PREP, views,
                                                  content_hash(path)))
            exact = cut.trunk(PREP.normalise(pixels))
            assert torch.allclose(out.activations[i], exact, atol=1e-3, rtol=0)


def test_class_weights_switch_on_above_the_ratio_only():
    assert class_weights(np.array([0] * 9 + [1] * 3), 2, ratio_threshold=3.0) is None
    weights = class_weights(np.array([0] * 10 + [1] * 2), 2, ratio_threshold=3.0)
    assert weights is not None and weights[1] / weights[0] == pytest.approx(5.0)


def test_class_weights_reach_the_loss(lite0, demo_images):
    labels = np.array([0] * 20 + [1] * 4 + [2] * 2)
    weights = class_weights(labels, 3, 3.0)
    module = FinetuneModule(lite0, 3, FinetuneSettings(), resolve_unfreeze("top", SPEC.unfreeze_hint), weights)
    module.train()
    transform = train_transform(PREP, "none")
    pixels = torch.stack([transform(p) for p in demo_images.pixels[:6]])
    target = torch.from_numpy(demo_images.labels[:6])
    loss = module.training_step((pixels, target), 0)
    with torch.no_grad():
        logits = module(pixels).float()
    weighted = F.cross_entropy(logits, target, weight=weights, label_smoothing=0.1)
    plain = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-4)
    assert abs(weighted.item() - plain.item()) > 1e-3


def test_batchnorm_stays_frozen_while_top_blocks_learn(lite0, demo_images):
    module = FinetuneModule(lite0, 3, FinetuneSettings(), resolve_unfreeze("top", SPEC.unfreeze_hint))
    module.train()
    bn = module.model.backbone.bn2
    assert module.model.head.training and type(bn).__name__ == "FrozenBatchNormAct2d"
    trainable = {n.split(".")[1] for n, p in module.model.named_parameters() if p.requires_grad and
                 n.startswith("backbone.")}
    assert trainable == {"blocks", "conv_head"}
    assert not module.model.backbone.blocks[4][0].conv_pw.weight.requires_grad
    before = bn.running_mean.clone()
    transform = train_transform(PREP, "flip")
    pixels = torch.stack([transform(p) for p in demo_images.pixels[:4]])
    module.training_step((pixels, torch.from_numpy(demo_images.labels[:4])), 0).backward()
    assert torch.equal(bn.running_mean, before)
    assert module.model.backbone.blocks[6][0].conv_pw.weight.grad is not None
    assert module.model.backbone.blocks[4][0].conv_pw.weight.grad is None


def test_train_bn_lets_the_unfrozen_batchnorm_learn_only(lite0):
    FinetuneModule(lite0, 3, FinetuneSettings(train_bn=True), resolve_unfreeze("top", SPEC.unfreeze_hint))
    backbone = lite0.backbone
    assert isinstance(backbone.bn2, nn.BatchNorm2d) and backbone.bn2.weight.requires_grad
    assert isinstance(backbone.blocks[6][0].bn1, nn.BatchNorm2d)
    assert type(backbone.blocks[4][0].bn1).__name__ == "FrozenBatchNormAct2d"


def test_unknown_module_to_unfreeze_is_named(lite0):
    with pytest.raises(ValueError, match="blocks.99 not in the backbone"):
        unfreeze(lite0.backbone, ["blocks.99"])


def test_warmup_then_cosine_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup=4, total=20)
    factors = []
    for _ in range(20):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(factors[3:])) and factors[-1] < 0.01


def test_fine_tuned_weights_get_a_new_digest(lite0):
    state = {k: v.clone() for k, v in lite0.backbone.state_dict().items()}
    digest = state_sha256(state)
    state["conv_head.weight"][0, 0] += 1e-3
    assert state_sha256(state) != digest


def test_inner_split_is_stratified_seeded_and_leaves_every_class_in_train():
    labels = np.array([0] * 40 + [1] * 20 + [2] * 2 + [3])
    mask = inner_split(labels, 0.15, seed=0)
    assert np.array_equal(mask, inner_split(labels, 0.15, seed=0))
    assert [int(mask[labels == c].sum()) for c in range(4)] == [6, 3, 1, 0]
    assert not np.array_equal(mask, inner_split(labels, 0.15, seed=1))


def test_val_score_is_accuracy_and_log_loss_without_scikit_learn():
    from scipy.special import softmax
    from sklearn.metrics import log_loss  # the reference only

    logits = np.random.default_rng(0).normal(size=(30, 4)) * 3
    y = np.arange(30) % 4
    accuracy, neg_loss = val_score(logits, y)
    assert accuracy == pytest.approx((logits.argmax(1) == y).mean())
    assert -neg_loss == pytest.approx(log_loss(y, softmax(logits, axis=1), labels=range(4)), rel=1e-9)
    recipe = Path(sys.modules[val_score.__module__].__file__).read_text()
    assert "sklearn" not in recipe


def test_far_from_imagenet_digits_are_shipped_offline(tmp_path):
    root = make_digits_dataset(tmp_path / "digits", per_class=3)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 30 and sorted(p.name for p in root.iterdir()) == [str(d) for d in range(10)]
    image = Image.open(files[0])
    assert image.size == (64, 64) and image.mode == "L"
    assert len(np.unique(np.asarray(image))) > 2  # grey levels, not a blank


def test_cached_trunk_stage_scores_with_the_prediction_pixels_and_chooses_on_the_inner_split(
        lite0_backbone, demo_data, tmp_path, capfd):
    dataset = find_dataset(demo_data, 0, 0.15, 0.15)
    head = LinearHead(np.zeros((3, 1280), np.float32), np.zeros(3, np.float32))
    settings = FinetuneSettings(epochs=1, batch_size=8, views=3)
    tuned = fine_tune_stage(dataset, SPEC, copy.deepcopy(lite0_backbone), head, settings, tmp_path / "run",
                            batch_size=8, cache_dir=tmp_path / "cache")
    assert tuned.result.inputs.startswith("trunk activations below blocks.5.0")
    assert tuned.result.precision == "32-true" and [r["epoch"] for r in tuned.result.history] == [1]
    choice = tuned.choice
    assert choice.chosen in ("head", "finetune") and choice.images == 6  # two per class of the 16 train images
    assert set(choice.scores) == {"head", "finetune"} and choice.scores["head"]["accuracy"] == 1.0
    assert "fine-tune epoch 1/1" in capfd.readouterr().err  # one line per epoch: stderr is not a terminal here
    # the fine-tuned model as a bundle rebuilds it (timm model, strict state) reproduces the stage's test logits
    import timm

    rebuilt = Classifier(timm.create_model(SPEC.architecture, pretrained=False, num_classes=0), nn.Linear(1280, 3))
    rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in tuned.result.model.numpy_state().items()})
    paths = tuned.paths["test"]
    assert paths == dataset.paths("test")
    pixels = torch.from_numpy(np.concatenate([b.pixels for b in stream_pixels(paths, PREP)]))
    with torch.inference_mode():
        logits = rebuilt.eval()(PREP.normalise(pixels)).numpy()
    assert np.abs(logits - tuned.logits["test"]).max() < 1e-3


def test_augmentation_that_cannot_be_cached_falls_back_to_the_full_image_loop(lite0_backbone, demo_data, tmp_path):
    dataset = find_dataset(demo_data, 0, 0.15, 0.15)
    head = LinearHead(np.zeros((3, 1280), np.float32), np.zeros(3, np.float32))
    settings = FinetuneSettings(epochs=1, batch_size=8, augment="trivial")
    tuned = fine_tune_stage(dataset, SPEC, copy.deepcopy(lite0_backbone), head, settings, None, batch_size=8,
                            progress=False, cache_dir=tmp_path)
    assert tuned.result.inputs == "images" and "draws new pixels" in tuned.result.notes[0]
    assert tuned.logits["val"].shape == (18, 3) and not (tmp_path / "trunk").exists()


def _train(data: Path, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*TLEARN, "train", str(data), "--out", str(out), "--cache-dir", str(cache), "--quiet",
                             "--fine-tune", "--batch-size", "4", *extra], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_9_during_fine_tuning_then_resume_loses_no_finished_epoch(hymenoptera_small, cache_dir, tmp_path):
    out = tmp_path / "model"
    last = out / "run" / "checkpoints" / "last.ckpt"
    run = _train(hymenoptera_small, out, cache_dir, "--epochs", "2", "--patience", "9")
    deadline = time.monotonic() + 300
    while not last.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), run.communicate()[0][-3000:]
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL
    assert not (out / "config.json").exists()
    saved = torch.load(last, map_location="cpu", weights_only=True)["tlearn_history"]
    assert len(saved) >= 1

    resumed = _train(hymenoptera_small, out, cache_dir, "--epochs", "2", "--patience", "9", "--resume")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log[-3000:]
    history = json.loads((out / "config.json").read_text())["extra"]["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[:len(saved)] == saved  # the epochs finished before the kill, exactly as they were
    csv_logs = sorted((out / "run" / "logs").glob("version_*/metrics.csv"))
    assert len(csv_logs) == 2  # one CSV per run; the resumed one continues the epoch count
    first_resumed_epoch = min(int(line.split(",")[0]) for line in csv_logs[1].read_text().splitlines()[1:]
                              if line.split(",")[0].isdigit())
    assert first_resumed_epoch == len(saved)  # Lightning counts epochs from 0
    import tlearn

    clf = tlearn.load(out, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"head", "finetune"} and metrics["stages"]["finetune"]["val"]["n"] == 8
    assert len(clf.predict([next((hymenoptera_small / "val" / "ants").iterdir())])) == 1


def test_resume_without_a_checkpoint_says_so_before_any_work(hymenoptera_small, tmp_path):
    import tlearn

    clf = tlearn.ImageClassifier(recipe="finetune", run_dir=tmp_path / "run", cache_dir=tmp_path / "no-cache")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        clf.fit(hymenoptera_small, resume=True)
    assert not (tmp_path / "no-cache").exists()


@pytest.mark.slow
def test_two_process_ddp_fine_tune_on_cpu(hymenoptera_small, cache_dir, tmp_path):
    out = tmp_path / "model"
    run = _train(hymenoptera_small, out, cache_dir, "--epochs", "1", "--devices", "2", "--strategy", "ddp",
                 "--accelerator", "cpu")
    log = run.communicate(timeout=600)[0]
    assert run.returncode == 0, log[-3000:]
    import tlearn

    clf = tlearn.load(out, progress=False)
    assert clf.bundle_.training["finetune"]["strategy"] == "ddp"
    assert [row["epoch"] for row in clf.bundle_.extra["history"]] == [1]
    assert len(clf.predict([next((hymenoptera_small / "train" / "bees").iterdir())])) == 1
