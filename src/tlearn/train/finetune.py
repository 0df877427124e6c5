"""Stage 2 of the fine-tune recipe: unfreeze the top of the backbone and train it with the head, on Lightning.

The recipe (this module): which modules learn, layer-wise decayed learning rates under AdamW, warm-up then cosine,
label smoothing, class weights for imbalanced data, BatchNorm statistics frozen, augmentation. The engineering
(loops, precision, devices, distributed strategies, atomic checkpoints, early stopping, CSV logs) is Lightning's.
"""
from __future__ import annotations

import gc
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from tlearn.backbones import Preprocessing
from tlearn.classifier import Classifier
from tlearn.data.decoded import DecodedImages
from tlearn.engines.runtimes import keep_freed_memory
from tlearn.train.augment import batch_mixer, eval_transform, train_transform
from tlearn.train.settings import FinetuneSettings  # noqa: F401  (part of this module's interface)

MONITOR = "val_accuracy"
LAST_CHECKPOINT = "last.ckpt"


@dataclass
class FinetuneResult:
    model: Classifier  # with the weights of the best epoch on val, in eval mode
    history: list[dict]  # one row per finished epoch: epoch, train_loss, val_loss, val_accuracy, lr
    best_epoch: int
    unfrozen: list[str]
    class_weights: list[float] | None
    precision: str
    seconds: float


def class_weights(labels: np.ndarray, n_classes: int, ratio_threshold: float) -> torch.Tensor | None:
    """'Balanced' loss weights (n / (k * count)) when the largest class outnumbers the smallest > ratio_threshold."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts[counts > 0]
    if present.max() / present.min() <= ratio_threshold:
        return None
    weights = np.where(counts > 0, counts.sum() / (len(present) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def unfreeze(backbone: nn.Module, names: list[str]) -> None:
    """Make only the named modules of `backbone` trainable (an empty name means the whole backbone)."""
    modules = dict(backbone.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        top = ", ".join(n for n, _ in backbone.named_children())
        raise ValueError(f"--unfreeze: {', '.join(unknown)} not in the backbone (its top-level modules: {top}; "
                         "deeper ones by dotted name, e.g. blocks.5)")
    backbone.requires_grad_(False)
    for name in names:
        modules[name].requires_grad_(True)


def resolve_unfreeze(choice: str, hint: str) -> list[str]:
    if choice == "all":
        return [""]
    names = hint if choice == "top" else choice
    return [n.strip() for n in names.split(",") if n.strip()]


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    # bf16 matmuls are native (AMX / AVX512-BF16) on such CPUs, emulated and slow elsewhere
    return "bf16-mixed" if on_cpu and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class _Augmented(TorchDataset):
    def __init__(self, images: DecodedImages, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images.pixels[i]), int(self.images.labels[i])


class FinetuneModule(L.LightningModule):
    """The classifier, its loss, optimiser and schedule; records one history row per validated epoch."""

    def __init__(self, model: Classifier, n_classes: int, settings: FinetuneSettings, unfrozen: list[str],
                 weights: torch.Tensor | None = None):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)
        self.settings, self.history = settings, []
        unfreeze(self.model.backbone, unfrozen)
        self.register_buffer("class_weights", weights)
        self.mixer = batch_mixer(n_classes, settings.mixup, settings.cutmix)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.val_accuracy = MulticlassAccuracy(n_classes, average="micro")

    def train(self, mode: bool = True):
        """Train mode, except BatchNorm: frozen statistics unless train_bn (and then only in unfrozen layers)."""
        super().train(mode)
        for m in self.model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(mode and self.settings.train_bn and any(p.requires_grad for p in m.parameters()))
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels.contiguous(memory_format=torch.channels_last))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.class_weights,
                               label_smoothing=self.settings.label_smoothing)

    def training_step(self, batch, batch_index):
        pixels, target = batch
        if self.mixer is not None:
            pixels, target = self.mixer(pixels, target)
        loss = self.loss(self(pixels), target)
        self.train_loss.update(loss.detach(), len(pixels))
        return loss

    def validation_step(self, batch, batch_index):
        pixels, target = batch
        logits = self(pixels).float()
        self.val_loss.update(F.cross_entropy(logits, target), len(pixels))
        self.val_accuracy.update(logits, target)

    def on_validation_epoch_end(self):
        row = {"val_loss": float(self.val_loss.compute()), "val_accuracy": float(self.val_accuracy.compute())}
        self.val_loss.reset()
        self.val_accuracy.reset()
        self.log_dict(row)
        if self.trainer.sanity_checking or self.train_loss.update_count == 0:
            return
        # recorded here, before ModelCheckpoint saves this epoch, so a checkpoint holds its own epoch's row
        self.history.append({"epoch": self.current_epoch + 1, "train_loss": float(self.train_loss.compute()), **row,
                             "lr": self.trainer.optimizers[0].param_groups[-1]["lr"]})
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
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup=warmup, total=total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

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


def fine_tune(model: Classifier, preprocessing: Preprocessing, train: DecodedImages, val: DecodedImages,
              settings: FinetuneSettings, unfreeze_hint: str, run_dir: str | Path, *, resume: bool = False,
              seed: int = 0, progress: bool = True) -> FinetuneResult:
    """Fine-tune `model` (head already fitted) on `train`, early-stopped and checkpointed on `val` accuracy.

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
    L.seed_everything(seed, workers=True, verbose=False)
    n_classes = model.head.out_features
    weights = class_weights(train.labels, n_classes, settings.imbalance_ratio)
    unfrozen = resolve_unfreeze(settings.unfreeze, unfreeze_hint)
    module = FinetuneModule(model, n_classes, settings, unfrozen, weights)
    precision = resolve_precision(settings.precision, settings.accelerator)
    trainer = _trainer(settings, precision, checkpoints, Path(run_dir), progress)
    loaders = [DataLoader(_Augmented(train, train_transform(preprocessing, settings.augment)),
                          batch_size=settings.batch_size, shuffle=True),
               DataLoader(_Augmented(val, eval_transform(preprocessing)), batch_size=settings.batch_size)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen BatchNorm, on purpose
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")  # Lightning vs torch 2.14
        trainer.fit(module, *loaders, ckpt_path=last_checkpoint(run_dir) if resume else None, weights_only=True)
    best_path, rank = trainer.checkpoint_callback.best_model_path, trainer.global_rank
    module.trainer = None
    del trainer
    _end_distributed()
    if rank != 0:
        raise SystemExit(0)
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    module.load_state_dict(best["state_dict"])
    return FinetuneResult(module.model.eval(), module.history, int(best["epoch"]) + 1, unfrozen,
                          None if weights is None else weights.tolist(), precision, time.perf_counter() - start)


def _trainer(settings: FinetuneSettings, precision: str, checkpoints: Path, run_dir: Path,
             progress: bool) -> L.Trainer:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU availability banner
    callbacks = [ModelCheckpoint(checkpoints, "best", monitor=MONITOR, mode="max", save_last=True,
                                 enable_version_counter=False),
                 EarlyStopping(MONITOR, mode="max", patience=settings.patience)]
    if progress:
        callbacks.append(RichProgressBar())
    devices = int(settings.devices) if settings.devices.isdigit() else settings.devices
    return L.Trainer(max_epochs=settings.epochs, precision=precision, accelerator=settings.accelerator,
                     devices=devices, num_nodes=settings.num_nodes, strategy=settings.strategy,
                     deterministic=settings.deterministic, callbacks=callbacks, default_root_dir=run_dir,
                     logger=CSVLogger(run_dir, name="logs"), enable_progress_bar=progress,
                     enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)


def _end_distributed() -> None:
    """Collect the dropped trainer (and any DDP wrapper), end the process group: gloo otherwise aborts at exit."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@torch.inference_mode()
def predict_logits(model: Classifier, images: DecodedImages, preprocessing: Preprocessing,
                   batch_size: int = 32) -> np.ndarray:
    """float32 logits of `model` on decoded images, through the eval transform (as prediction does)."""
    model = model.eval()
    transform = eval_transform(preprocessing)
    out = [model(torch.stack([transform(p) for p in images.pixels[i:i + batch_size]])).float()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.out_features), np.float32)
