"""Prediction throughput: tlearn's pipeline vs the naive loop, in one run, each in its own process (own peak RSS).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/throughput.py [--images 2000] [--naive-images 2000] [--engine auto]

Images: every JPEG under ../shared/datasets (1,756), repeated to --images. Model: EfficientNet-Lite0 + a linear head
(2 classes). naive = PIL decode one by one + timm eval transform + eager torch fp32, batches of 32, one process.
tlearn = tlearn.Predictor.iter_files on a model trained on the built-in demo set (threaded decode, engine forward
overlapped). forward-only = the same Predictor's engine on one pre-decoded batch of 32, repeated: the ceiling the
end-to-end figure is compared to. Predictor call = the second and later `Predictor.predict([one image])` calls in
one process (issue 10's bar: under 30 ms).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def jpegs(count: int) -> list[Path]:
    files = sorted(p for p in DATASETS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        sys.exit(f"no JPEGs under {DATASETS} (set TLEARN_DATASETS)")
    return [files[i % len(files)] for i in range(count)]


def classifier():
    import torch

    from tlearn.backbones import create_backbone
    from tlearn.classifier import Classifier

    backbone, _ = create_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    return Classifier(backbone, torch.nn.Linear(1280, 2)).eval()


def run_naive(paths: list[Path], model) -> int:
    import torch

    from tlearn.backbones import get_spec
    from tlearn.data.decode import load_image

    transform = get_spec("efficientnet_lite0").preprocessing.eval_transform()
    done = 0
    with torch.inference_mode():
        for start in range(0, len(paths), 32):
            batch = torch.stack([transform(load_image(p)) for p in paths[start:start + 32]])
            done += int(model(batch).softmax(-1).argmax(-1).numel())
    return done


def run_tlearn(paths: list[Path], predictor) -> int:
    from tlearn.predict import Prediction

    return sum(isinstance(r, Prediction) for r in predictor.iter_files(paths))


def run_forward(paths: list[Path], predictor, seconds: float = 20.0) -> int:
    """The engine alone on one pre-decoded batch, fed as tlearn feeds it (run_batches: OpenVINO keeps several
    batches in flight), for `seconds`: the ceiling of the end-to-end figure."""
    from tlearn.engines import run_batches

    batch = next(iter(predictor.pixel_batches(paths[:32])))
    run = predictor.engine
    run(batch.pixels)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += sum(len(b.indices) for b, _ in run_batches(run, [batch] * 8))
    return done


def run_single_calls(paths: list[Path], predictor, calls: int = 50) -> float:
    """Mean milliseconds of Predictor.predict([one image]) after a first call."""
    predictor.predict(paths[:1])
    start = time.perf_counter()
    for path in paths[1:calls + 1]:
        predictor.predict([path])
    return (time.perf_counter() - start) / calls * 1000


def child(args) -> None:
    """One measurement in this process; prints one JSON line. Loading the model and opening the engine happen
    before the clock starts."""
    paths = jpegs(args.images)
    extra = {}
    if args.mode == "naive":
        engine, model = "eager torch fp32", classifier()
    else:
        import tlearn

        predictor = tlearn.Predictor.load(args.model, engine=args.engine, precision=args.precision)
        engine = f"{predictor.card.engine} {predictor.card.precision}"
    start = time.perf_counter()
    if args.mode == "naive":
        done = run_naive(paths, model)
    elif args.mode == "tlearn":
        done = run_tlearn(paths, predictor)
    else:
        done = run_forward(paths, predictor)
        extra["single_call_ms"] = run_single_calls(jpegs(60), predictor)
        start += extra["single_call_ms"] * 50 / 1000  # not part of the forward-only figure
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": args.mode, "engine": engine, "images": done, "seconds": seconds,
                      "images_per_second": done / seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))


def demo_model(folder: Path) -> Path:
    """A model trained on the built-in demo set (the throughput does not depend on what it learned)."""
    import tlearn
    from tlearn.data.demo import make_demo_dataset

    data = make_demo_dataset(folder / "data")
    return tlearn.ImageClassifier(cache_dir=folder / "cache", progress=False).fit(data).save(folder / "model")


def measure(mode: str, images: int, args) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--images", str(images), "--engine", args.engine,
               "--precision", args.precision, "--model", str(args.model)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images for the tlearn pipeline")
    parser.add_argument("--naive-images", type=int, default=None, help="images for the naive loop [= --images]")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--skip-naive", action="store_true", help="only tlearn (for the RSS check at 20,000)")
    parser.add_argument("--child", choices=("naive", "tlearn", "forward"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="tlearn-throughput-"))
    args.model = demo_model(scratch)
    print(f"load average at start: {os.getloadavg()}  cpus: {os.cpu_count()}", flush=True)
    results = {"tlearn": measure("tlearn", args.images, args), "forward": measure("forward", 64, args)}
    if not args.skip_naive:
        results["naive"] = measure("naive", args.naive_images or args.images, args)
    for name, r in results.items():
        print(f"{name:8s} {r['engine']:16s} {r['images']:6d} images  {r['images_per_second']:7.1f} img/s  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
    tlearn, forward = results["tlearn"]["images_per_second"], results["forward"]["images_per_second"]
    print(f"tlearn end to end / engine forward-only: {tlearn / forward:.0%}")
    print(f"Predictor.predict([one image]), second and later calls: {results['forward']['single_call_ms']:.1f} ms")
    if "naive" in results:
        print(f"tlearn / naive: {tlearn / results['naive']['images_per_second']:.1f}x")
    print(f"engine: {args.engine} {args.precision}; load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
