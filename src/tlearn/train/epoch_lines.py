"""One line per fine-tuning epoch on stderr, for runs without a terminal (CI, nohup), where no progress bar shows."""
from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import Callback


class EpochLines(Callback):
    """After each training epoch and its validation: epoch, train loss, inner-split and val accuracy, seconds."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # after the epoch's validation (Lightning validates inside the training epoch), which wrote its history row
        if not trainer.is_global_zero or not getattr(pl_module, "history", None):
            return
        row = pl_module.history[-1]
        if row["epoch"] != trainer.current_epoch + 1:
            return
        parts = [f"epoch {row['epoch']}/{trainer.max_epochs}", f"loss {row['train_loss']:.4f}",
                 f"inner acc {row['inner_accuracy']:.4f}"]
        if "val_accuracy" in row:
            parts.append(f"val acc {row['val_accuracy']:.4f}")
        parts.append(f"{time.perf_counter() - self.started:.1f} s")
        print("fine-tune " + "  ".join(parts), file=self.stream, flush=True)


def wants_epoch_lines(progress: bool) -> bool:
    """Lines when progress is wanted but stderr is not a terminal (the rich bar shows otherwise)."""
    return progress and not sys.stderr.isatty()
