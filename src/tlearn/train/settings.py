"""Settings of the fine-tuning stage: a plain dataclass, importable without Lightning (which costs seconds)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class FinetuneSettings:
    """Every setting of stage 2; all are saved with the model."""

    epochs: int = 10
    lr: float = 1e-3  # the head's and the top backbone layer's; lower layers get lr * layer_decay ** depth
    batch_size: int = 32
    unfreeze: str = "top"  # "top" (the registry's choice for the backbone), "all", or module names "a,b,c"
    layer_decay: float = 0.7
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: str = "flip"  # see augment.POLICIES
    mixup: float = 0.0  # Beta(alpha, alpha) strength; 0 = off
    cutmix: float = 0.0
    patience: int = 4  # epochs without a better inner-split accuracy before stopping
    train_bn: bool = False  # update BatchNorm statistics of the unfrozen layers
    imbalance_ratio: float = 3.0  # class weights when max/min train images per class exceeds this
    precision: str = "auto"  # Lightning precision; "auto" = bf16-mixed on a CPU with bf16 support, else 32-true
    accelerator: str = "auto"
    devices: str = "1"
    num_nodes: int = 1
    strategy: str = "auto"
    deterministic: bool = False
    trunk_cache: bool = True  # train the top on cached trunk activations of fixed views, when the trunk is frozen
    views: int = 6  # fixed views per train image with the trunk cache (augment "flip"): image, mirror, 4 crops
    inner_fraction: float = 0.15  # of train, held out to choose the epoch and the stage (val only reports)

    def to_dict(self) -> dict:
        return asdict(self)
