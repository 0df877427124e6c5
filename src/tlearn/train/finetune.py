"""Stage 2 of the fine-tune recipe: train the top of the backbone with the head, on Lightning.

The recipe (this module): which modules learn, layer-wise decayed learning rates under AdamW, warm-up then cosine,
label smoothing, class weights for imbalanced data, frozen BatchNorm. The inputs are either images (the
full-image loop, augmented anew every epoch) or the frozen trunk's cached activations of fixed views of them
(train/trunk.py: the loop then runs only the top). The engineering (loops, precision, devices, distributed
strategies, atomic checkpoints, early stopping, CSV logs) is Lightning's.
"""
from __future__ import annotations

import gc
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    EarlyStopping,
    ModelCheckpoint,
    RichProgressBar,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from timm.layers import freeze_batch_norm_2d, unfreeze_batch_norm_2d
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tlearn.classifier import Classifier
from tlearn.engines.runtimes import keep_freed_memory
from tlearn.train.augment import batch_mixer
from tlearn.train.epoch_lines import EpochLines, wants_epoch_lines
from tlearn.train.settings import FinetuneSettings

MONITOR = "inner_accuracy"  # early stopping and the best checkpoint: on the inner split carved from train, never val
LAST_CHECKPOINT = "last.ckpt"
SCORED = ("inner", "val")  # validation loaders, in this order; val is logged every epoch and chooses nothing


@dataclass
class StageData:
    """What the loop learns from: `train` (augmented), `inner` (chooses the epoch), `val` (reported only).

    Items are (input, label); inputs are normalised pixels, or trunk activations when `top` is given."""

    train: TorchDataset
    inner: TorchDataset
    val: TorchDataset | None = None
    inputs: str = "images"  # what the items are, for the record: "images" or "trunk activations at <module>"


@dataclass
class FinetuneResult:
    model: Classifier  # with the weights of the best epoch on the inner split, in eval mode
    history: list[dict]  # per epoch: epoch, train_loss, inner_/val_ loss and accuracy, lr, seconds
    best_epoch: int
    unfrozen: list[str]
    class_weights: list[float] | None
    precision: str
    seconds: float
    inputs: str = "images"
    notes: list[str] = field(default_factory=list)


def class_weights(labels: np.ndarray, n_classes: int, ratio_threshold: float) -> torch.Tensor | None:
    """'Balanced' loss weights (n / (k * count)) when the largest class outnumbers the smallest > ratio_threshold."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts[counts > 0]
    if present.max() / present.min() <= ratio_threshold:
        return None
    weights = np.where(counts > 0, counts.sum() / (len(present) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def resolve_unfreeze(choice: str, hint: str) -> list[str]:
    if choice == "all":
        return [""]
    names = hint if choice == "top" else choice
    return [n.strip() for n in names.split(",") if n.strip()]


def unfreeze(backbone: nn.Module, names: list[str], train_bn: bool = False) -> None:
    """Only the named modules of `backbone` learn (an empty name: all of it). BatchNorm layers keep their
    pretrained statistics and affine parameters (timm's FrozenBatchNorm2d), except in the named modules when
    `train_bn`. Idempotent."""
    modules = dict(backbone.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        top = ", ".join(n for n, _ in backbone.named_children())
        raise ValueError(f"--unfreeze: {', '.join(unknown)} not in the backbone (its top-level modules: {top}; "
                         "deeper ones by dotted name, e.g. blocks.5)")
    BaseFinetuning.freeze(backbone, train_bn=False)
    BaseFinetuning.make_trainable([modules[n] for n in names])
    _freeze_batch_norm(backbone, "", names if train_bn else [])


def _freeze_batch_norm(module: nn.Module, prefix: str, learning: list[str]) -> None:
    """timm's freeze_batch_norm_2d on every part of `module` outside the `learning` modules."""
    for name, child in module.named_children():
        dotted = prefix + name
        if any(dotted == n or dotted.startswith(n + ".") or n == "" for n in learning):
            continue
        if any(n.startswith(dotted + ".") for n in learning):
            _freeze_batch_norm(child, dotted + ".", learning)
        else:
            setattr(module, name, freeze_batch_norm_2d(child))


def resolve_precision(precision: str, accelerator: str, cached_trunk: bool = False) -> str:
    if precision != "auto":
        return precision
    if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"  # tensor cores; fp32 master weights
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    # bf16 matmuls are native (AMX / AVX512-BF16) on such CPUs, emulated and slow elsewhere. The top blocks alone
    # (cached trunk) are small 7x7/14x14 convolutions: there fp32 measured faster than bf16-mixed (bench/README.md)
    return "bf16-mixed" if on_cpu and not cached_trunk and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR: linear warm-up over `warmup` steps (factor (step + 1) / warmup), then cosine to 0 at `total`."""
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup <= 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


class FinetuneModule(L.LightningModule):
    """The classifier, its loss, optimiser and schedule; records one history row per validated epoch.

    With `top` (the upper part of the backbone, train/trunk.py), inputs are trunk activations and only the top runs.
    """

    def __init__(self, model: Classifier, n_classes: int, settings: FinetuneSettings, unfrozen: list[str],
                 weights: torch.Tensor | None = None):
        super().__init__()
        unfreeze(model.backbone, unfrozen, settings.train_bn)
        self.model = model.to(memory_format=torch.channels_last)
        self.settings, self.history, self.top = settings, [], None
        self.register_buffer("class_weights", weights)
        self.mixer = batch_mixer(n_classes, settings.mixup, settings.cutmix)
        self.train_loss = MeanMetric()
        self.scored_loss = nn.ModuleList(MeanMetric() for _ in SCORED)
        self.scored_accuracy = nn.ModuleList(MulticlassAccuracy(n_classes, average="micro") for _ in SCORED)
        self._epoch_start = time.perf_counter()

    def run_top_only(self, top: nn.Sequential) -> None:
        """Inputs become trunk activations: `top` (modules of this model's backbone, not copies) runs on them."""
        self.__dict__["top"] = top  # a plain attribute: its modules are registered under `model` already

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        features = self.top(inputs) if self.top is not None else self.model.backbone(inputs)
        return self.model.classify_features(features)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.class_weights,
                               label_smoothing=self.settings.label_smoothing)

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def training_step(self, batch, batch_index):
        inputs, target = batch
        if self.mixer is not None:
            inputs, target = self.mixer(inputs, target)
        loss = self.loss(self(inputs), target)
        self.train_loss.update(loss.detach(), len(inputs))
        return loss

    def validation_step(self, batch, batch_index, dataloader_idx: int = 0):
        inputs, target = batch
        logits = self(inputs).float()
        self.scored_loss[dataloader_idx].update(F.cross_entropy(logits, target), len(inputs))
        self.scored_accuracy[dataloader_idx].update(logits, target)

    def on_validation_epoch_end(self):
        row = {}
        for name, loss, accuracy in zip(SCORED, self.scored_loss, self.scored_accuracy):
            if loss.update_count:
                row.update({f"{name}_loss": float(loss.compute()), f"{name}_accuracy": float(accuracy.compute())})
            loss.reset()
            accuracy.reset()
        self.log_dict(row, add_dataloader_idx=False)
        if self.trainer.sanity_checking or self.train_loss.update_count == 0:
            return
        # recorded here, before ModelCheckpoint saves this epoch, so a checkpoint holds its own epoch's row
        self.history.append({"epoch": self.current_epoch + 1, "train_loss": float(self.train_loss.compute()), **row,
                             "lr": self.trainer.optimizers[0].param_groups[-1]["lr"],
                             "seconds": round(time.perf_counter() - self._epoch_start, 2)})
        self.train_loss.reset()

    def configure_optimizers(self):
        groups = param_groups_layer_decay(self.model.backbone, self.settings.weight_decay,
                                          layer_decay=self.settings.layer_decay)
        groups.append({"params": list(self.model.head.parameters()), "lr_scale": 1.0,
                       "weight_decay": self.settings.weight_decay})
        for group in groups:
            group["lr"] = self.settings.lr * group["lr_scale"]
        optimizer = torch.optim.AdamW(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(self.settings.warmup_epochs * total / self.settings.epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup_cosine(optimizer, warmup, total),
                                                         "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tlearn_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("tlearn_history", []))


def last_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint a resumed run continues from; FileNotFoundError when there is none."""
    path = Path(run_dir) / "checkpoints" / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist (train without --resume to start afresh)")
    return path


def fine_tune(module: FinetuneModule, data: StageData, settings: FinetuneSettings, run_dir: str | Path, *,
              precision: str, unfrozen: list[str], resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Train `module` on `data.train`, early-stopped and checkpointed on `data.inner` accuracy; val is only logged.

    Checkpoints and CSV logs go to `run_dir`; `resume` continues from its last checkpoint. Under a distributed
    strategy, the processes other than rank 0 end (SystemExit 0) once training is done.
    """
    start = time.perf_counter()
    keep_freed_memory()  # training allocates the same activation buffers every step: keep them mapped
    checkpoints = Path(run_dir) / "checkpoints"
    if resume:
        last_checkpoint(run_dir)
    if not resume and rank_zero_only.rank == 0 and checkpoints.exists():
        shutil.rmtree(checkpoints)  # a fresh run must not pick up an older run's best checkpoint
    trainer = _trainer(settings, precision, checkpoints, Path(run_dir), progress)
    module.train()  # Lightning keeps the mode it is given; frozen BatchNorm layers ignore it (timm's frozen kind)
    scored = [DataLoader(d, batch_size=settings.batch_size) for d in (data.inner, data.val) if d is not None]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")  # Lightning vs torch 2.14
        trainer.fit(module, DataLoader(data.train, batch_size=settings.batch_size, shuffle=True), scored,
                    ckpt_path=last_checkpoint(run_dir) if resume else None, weights_only=True)
    best_path, rank = trainer.checkpoint_callback.best_model_path, trainer.global_rank
    module.trainer = None
    del trainer
    _end_distributed()
    if rank != 0:
        raise SystemExit(0)
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    weights = module.class_weights
    return FinetuneResult(module.model.eval(), module.history, int(best["epoch"]) + 1, unfrozen,
                          None if weights is None else weights.tolist(), precision, time.perf_counter() - start,
                          data.inputs)


def _trainer(settings: FinetuneSettings, precision: str, checkpoints: Path, run_dir: Path,
             progress: bool) -> L.Trainer:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU availability banner
    callbacks = [ModelCheckpoint(checkpoints, "best", monitor=MONITOR, mode="max", save_last=True,
                                 enable_version_counter=False),
                 EarlyStopping(MONITOR, mode="max", patience=settings.patience)]
    lines = wants_epoch_lines(progress)
    if progress:
        callbacks.append(EpochLines() if lines else RichProgressBar())
    devices = int(settings.devices) if settings.devices.isdigit() else settings.devices
    return L.Trainer(max_epochs=settings.epochs, precision=precision, accelerator=settings.accelerator,
                     devices=devices, num_nodes=settings.num_nodes, strategy=settings.strategy,
                     deterministic=settings.deterministic, callbacks=callbacks, default_root_dir=run_dir,
                     logger=CSVLogger(run_dir, name="logs"), enable_progress_bar=progress and not lines,
                     enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)


def _end_distributed() -> None:
    """Collect the dropped trainer (and any DDP wrapper), end the process group: gloo otherwise aborts at exit."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def plain_batch_norm(model: Classifier) -> Classifier:
    """The model with timm's frozen BatchNorm layers turned back into standard ones (the bundle's tensor names)."""
    unfreeze_batch_norm_2d(model.backbone)
    return model.eval()


@torch.inference_mode()
def predict_logits(module: FinetuneModule, inputs: TorchDataset, batch_size: int = 32) -> np.ndarray:
    """float32 logits of the module on a dataset of (input, label) items: eval pixels or trunk activations."""
    module = module.eval()
    out = [module(x).float() for x, _ in DataLoader(inputs, batch_size=batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, module.model.head.out_features), np.float32)
