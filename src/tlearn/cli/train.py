"""`tlearn train`: a model folder from a dataset folder."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlearn.cli.common import USER_ERRORS, CacheDir, Device, Engine, EngineName, Precision, Quiet, app, fail
from tlearn.console import out, print_summary
from tlearn.evaluate import painter
from tlearn.outputs import terminal_text


class Recipe(str, Enum):
    head = "head"
    finetune = "finetune"
    auto = "auto"


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="Dataset folder: one sub-folder per class, or train/ val/ test/.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Model folder to write "
                                                    "(default: ./<data folder name>-model).")] = None,
    backbone: Annotated[str, typer.Option(help="Backbone name (see `tlearn backbones`), or auto: a head on each of "
                                          "efficientnet_lite0/1/2 (features cached per backbone), the best on an "
                                          "inner split of train kept.")] = "efficientnet_lite0",
    weights: Annotated[Optional[Path], typer.Option(help="Backbone weights file instead of the registry's.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits and training.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    cache_dir: CacheDir = None,
    quiet: Quiet = False,
    engine: Engine = EngineName.auto,
    device: Device = "auto",
    precision: Precision = None,
    recipe: Annotated[Recipe, typer.Option(help="head: linear head on frozen features (seconds). finetune: then "
                                           "unfreeze the top of the backbone and train it (minutes), keeping the "
                                           "stage that does better on an inner split of train (val only reports). "
                                           "auto: fine-tune when there are >= 20 train images "
                                           "per class and the head's val accuracy is below 0.995. The default, head, "
                                           "makes a re-run on the same data take seconds (cached features).")
                    ] = Recipe.head,
    fine_tune: Annotated[bool, typer.Option("--fine-tune", help="Same as --recipe finetune.")] = False,
    epochs: Annotated[int, typer.Option(help="Fine-tuning: most epochs (early stopping may end sooner).")] = 10,
    lr: Annotated[float, typer.Option(help="Fine-tuning: peak learning rate of the head and top layer.")] = 1e-3,
    unfreeze: Annotated[str, typer.Option(help="Fine-tuning: 'top' (the backbone's top blocks), 'all', or module "
                                          "names, e.g. blocks.5,blocks.6,conv_head,bn2.")] = "top",
    augment: Annotated[str, typer.Option(help="Fine-tuning augmentation: none, flip (random resized crop + "
                                         "flip), trivial (+TrivialAugment), randaugment.")] = "flip",
    mixup: Annotated[float, typer.Option(help="Fine-tuning: MixUp alpha (0 = off).")] = 0.0,
    cutmix: Annotated[float, typer.Option(help="Fine-tuning: CutMix alpha (0 = off).")] = 0.0,
    patience: Annotated[int, typer.Option(help="Fine-tuning: stop after this many epochs without a better "
                                          "accuracy on the inner split of train.")] = 4,
    train_bn: Annotated[bool, typer.Option("--train-bn", help="Fine-tuning: train BatchNorm (statistics and "
                                           "weights) in the unfrozen layers (default: frozen).")] = False,
    trunk_cache: Annotated[bool, typer.Option("--trunk-cache/--no-trunk-cache", help="Fine-tuning: train the top on "
                                              "cached activations of the frozen trunk for fixed views of each "
                                              "image (much faster; falls back to whole images when it cannot).")
                           ] = True,
    views: Annotated[int, typer.Option(help="Fine-tuning with the trunk cache: fixed views per train image.")] = 6,
    inner_fraction: Annotated[float, typer.Option(help="Fine-tuning: share of train held out to choose the epoch "
                                                  "and the stage.")] = 0.15,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic torch algorithms.")] = False,
    train_precision: Annotated[str, typer.Option(help="Fine-tuning: Lightning precision: auto (bf16-mixed on a CPU "
                                                 "with bf16 "
                                           "support, else 32-true), 32-true, bf16-mixed, 16-mixed.")] = "auto",
    accelerator: Annotated[str, typer.Option(help="Lightning accelerator: cpu, gpu, tpu, auto.")] = "auto",
    devices: Annotated[str, typer.Option(help="Lightning devices: a count, a list, or auto.")] = "1",
    num_nodes: Annotated[int, typer.Option(help="Lightning: number of nodes.")] = 1,
    strategy: Annotated[str, typer.Option(help="Lightning strategy, e.g. ddp.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted fine-tune from the last "
                                         "checkpoint in OUT/run (same command otherwise).")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="local|auto|ADDRESS", help="Extract the features on "
                                               "Ray Data (the ray extra): 'local', 'auto' or a cluster address.")
                   ] = None,
    mirror: Annotated[str, typer.Option(metavar="off|train|tta|both|auto", help="The head and the image's mirror: "
                                        "train: its features as extra training rows; tta: predict on the mean of "
                                        "the image's and its mirror's features (2 forward passes per image); both; "
                                        "auto: the best of the four by cross-validation on train.")] = "off",
    imagenet_prior: Annotated[str, typer.Option(metavar="auto|on|off", help="The backbone's own ImageNet class "
                                                "probabilities as extra inputs of the head (no extra forward "
                                                "pass); auto: kept when cross-validation on train says they "
                                                "help.")] = "auto",
    relabel: Annotated[Optional[Path], typer.Option(help="A CSV path,label (paths relative to DATA) whose labels "
                                                         "replace the folders' for this train; no file is moved "
                                                         "(see `tlearn doctor DATA --labels`).")] = None,
) -> None:
    """Train a classifier on DATA and write a model folder (fine-tuning checkpoints and logs in OUT/run)."""
    import tlearn
    from tlearn.train.settings import FinetuneSettings

    out_dir = out_dir or Path(f"{data.resolve().name}-model")
    settings = FinetuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, unfreeze=unfreeze, augment=augment,
                                mixup=mixup, cutmix=cutmix, patience=patience, train_bn=train_bn,
                                precision=train_precision, accelerator=accelerator, devices=devices,
                                num_nodes=num_nodes, strategy=strategy, deterministic=deterministic,
                                trunk_cache=trunk_cache, views=views, inner_fraction=inner_fraction)
    painter.start()  # the report's figures: a second process imports matplotlib while this one trains
    try:
        clf = tlearn.ImageClassifier(backbone, weights=weights, seed=seed, batch_size=batch_size,
                                     cache_dir=cache_dir, progress=not quiet, engine=engine.value,
                                     precision=precision and precision.value,
                                     recipe="finetune" if fine_tune else recipe.value, finetune=settings,
                                     run_dir=out_dir / "run", ray=ray, mirror=mirror,
                                     relabel=relabel, device=device,
                                     imagenet_prior=imagenet_prior).fit(data, resume=resume)
        clf.save(out_dir)
    except USER_ERRORS as exc:
        fail(exc)
    print_summary(clf, out_dir)
    out.print(f"report: {terminal_text(out_dir / 'report' / 'report.html')}", highlight=False)
