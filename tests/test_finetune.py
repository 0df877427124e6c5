"""Stage 2 (fine-tuning on Lightning): loss weights, frozen BatchNorm, schedule, kill -9 + resume, 2-process DDP."""
from __future__ import annotations

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
from torch import nn

from tlearn.backbones import create_backbone, get_spec, state_sha256
from tlearn.classifier import Classifier
from tlearn.data.decoded import decode_resized
from tlearn.train.augment import eval_transform, train_transform
from tlearn.train.finetune import (
    FinetuneModule,
    FinetuneSettings,
    class_weights,
    resolve_unfreeze,
    unfreeze,
    warmup_cosine,
)

TLEARN = [sys.executable, "-m", "tlearn.cli"]
SPEC = get_spec("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0() -> Classifier:
    backbone, _ = create_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    return Classifier(backbone, nn.Linear(1280, 3))


@pytest.fixture(scope="module")
def demo_images(demo_data):
    paths = sorted((demo_data / "train").rglob("*.png"))[::4]
    labels = np.array([["brick", "grass", "gravel"].index(p.parent.name) for p in paths])
    return decode_resized(paths, labels, SPEC.preprocessing.resize_size(), progress=False)


def test_decoded_images_are_resized_once_and_centre_crop_is_the_eval_input(demo_images):
    assert len(demo_images) == 12 and set(demo_images.labels.tolist()) == {0, 1, 2}
    for pixels in demo_images.pixels:
        assert pixels.dtype == torch.uint8 and min(pixels.shape[1:]) == SPEC.preprocessing.resize_size()
    x = eval_transform(SPEC.preprocessing)(demo_images.pixels[0])
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    augmented = train_transform(SPEC.preprocessing, "trivial")
    assert augmented(demo_images.pixels[0]).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="unknown augmentation"):
        train_transform(SPEC.preprocessing, "wild")


def test_class_weights_switch_on_above_the_ratio_only():
    assert class_weights(np.array([0] * 9 + [1] * 3), 2, ratio_threshold=3.0) is None
    weights = class_weights(np.array([0] * 10 + [1] * 2), 2, ratio_threshold=3.0)
    assert weights is not None and weights[1] / weights[0] == pytest.approx(5.0)


def test_class_weights_reach_the_loss(lite0, demo_images):
    labels = np.array([0] * 20 + [1] * 4 + [2] * 2)
    weights = class_weights(labels, 3, 3.0)
    module = FinetuneModule(lite0, 3, FinetuneSettings(), resolve_unfreeze("top", SPEC.unfreeze_hint), weights)
    module.train()
    transform = eval_transform(SPEC.preprocessing)
    pixels = torch.stack([transform(p) for p in demo_images.pixels[:6]])
    target = torch.from_numpy(demo_images.labels[:6])
    loss = module.training_step((pixels, target), 0)
    with torch.no_grad():
        logits = module(pixels).float()
    weighted = F.cross_entropy(logits, target, weight=weights, label_smoothing=0.1)
    plain = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-4)
    assert abs(weighted.item() - plain.item()) > 1e-3


def test_batchnorm_statistics_stay_frozen_while_top_blocks_learn(lite0, demo_images):
    module = FinetuneModule(lite0, 3, FinetuneSettings(), resolve_unfreeze("top", SPEC.unfreeze_hint))
    module.train()
    bn = module.model.backbone.bn2
    assert module.model.head.training and not bn.training
    trainable = {n.split(".")[1] for n, p in module.model.named_parameters() if p.requires_grad and
                 n.startswith("backbone.")}
    assert trainable == {"blocks", "conv_head", "bn2"}
    assert not module.model.backbone.blocks[4][0].conv_pw.weight.requires_grad
    before = bn.running_mean.clone()
    transform = train_transform(SPEC.preprocessing, "flip")
    pixels = torch.stack([transform(p) for p in demo_images.pixels[:4]])
    module.training_step((pixels, torch.from_numpy(demo_images.labels[:4])), 0).backward()
    assert torch.equal(bn.running_mean, before)
    assert module.model.backbone.blocks[6][0].conv_pw.weight.grad is not None
    assert module.model.backbone.blocks[4][0].conv_pw.weight.grad is None


def test_unknown_module_to_unfreeze_is_named(lite0):
    with pytest.raises(ValueError, match="blocks.99 not in the backbone"):
        unfreeze(lite0.backbone, ["blocks.99"])


def test_warmup_then_cosine_to_zero():
    factors = [warmup_cosine(step, warmup=4, total=20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:])) and factors[-1] < 0.01


def test_fine_tuned_weights_get_a_new_digest(lite0):
    state = {k: v.clone() for k, v in lite0.backbone.state_dict().items()}
    digest = state_sha256(state)
    state["conv_head.weight"][0, 0] += 1e-3
    assert state_sha256(state) != digest


def _train(data: Path, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*TLEARN, "train", str(data), "--out", str(out), "--cache-dir", str(cache), "--quiet",
                             "--fine-tune", "--batch-size", "4", *extra], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
