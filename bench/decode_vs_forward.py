"""Decode vs forward on photos of 2-12 megapixels, and how well tlearn's pipeline overlaps them (issue 15).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/decode_vs_forward.py [--images 64] [--sizes 2,5,8,12]

Photos: real JPEGs from ../shared/datasets, resized to each size (4:3) and saved as JPEG quality 90 in a temporary
folder (a decoder's cost follows the pixel count and the JPEG settings, not what is in the picture). Model:
EfficientNet-Lite0 + a head trained on the built-in demo set, through the Predictor and its exported engine.
Per size, in one process:
- full decode: PIL decodes every pixel, then the same resize and crop (what a loader without draft mode does),
  one thread, ms per image;
- draft decode: tlearn's `Predictor.to_pixels` (JPEG DCT scaling to about twice the resize target first), one
  thread, ms per image;
- decode only: the pipeline's threaded decoding alone (`Predictor.pixel_batches`), images/s;
- forward only: the engine on pre-decoded batches, images/s (independent of the photo size);
- end to end: `Predictor.iter_files`, images/s. Both stages use both cores, so the best possible is their CPU
  times added (1 / (1/decode + 1/forward)): "overlap" is end to end over that bound (100% = no core ever idle).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def photos(folder: Path, megapixels: float, count: int) -> list[Path]:
    from PIL import Image

    sources = sorted(p for p in DATASETS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[::7][:count]
    if not sources:
        sys.exit(f"no JPEGs under {DATASETS} (set TLEARN_DATASETS)")
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    size = (width, width * 3 // 4)
    made = []
    for i, source in enumerate(sources):
        with Image.open(source) as image:
            path = folder / f"{megapixels:g}mpx-{i:03d}.jpg"
            image.convert("RGB").resize(size, Image.Resampling.BILINEAR).save(path, quality=90)
            made.append(path)
    return made


def per_image_ms(function, paths: list[Path]) -> float:
    function(paths[0])
    start = time.perf_counter()
    for path in paths:
        function(path)
    return (time.perf_counter() - start) / len(paths) * 1000


def full_decode(predictor):
    from PIL import Image

    def decode(path: Path):
        with Image.open(path) as image:
            return predictor.preprocessing.to_pixels(image.convert("RGB"))
    return decode


def rate(function, paths: list[Path]) -> float:
    start = time.perf_counter()
    done = function(paths)
    return done / (time.perf_counter() - start)


def decode_only(predictor, paths: list[Path]) -> int:
    return sum(len(b.indices) for b in predictor.pixel_batches(paths))


def forward_only(predictor, paths: list[Path], seconds: float = 10.0) -> float:
    from tlearn.engines import run_batches

    batch = next(iter(predictor.pixel_batches(paths[:32])))
    predictor.engine(batch.pixels)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += sum(len(b.indices) for b, _ in run_batches(predictor.engine, [batch] * 8))
    return done / (time.perf_counter() - start)


def end_to_end(predictor, paths: list[Path]) -> int:
    return sum(1 for _ in predictor.iter_files(paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="photos per size")
    parser.add_argument("--sizes", default="2,5,8,12", help="megapixels, comma-separated")
    args = parser.parse_args()
    import tlearn
    from tlearn.data.demo import make_demo_dataset

    print(f"load average at start: {os.getloadavg()}  cpus: {os.cpu_count()}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = tlearn.ImageClassifier(cache_dir=scratch / "cache", progress=False).fit(
            make_demo_dataset(scratch / "demo")).save(scratch / "model")
        predictor = tlearn.Predictor.load(model)
        forward = None
        print("| photo | full decode, 1 thread | draft decode, 1 thread | decode only (threads) | forward only | "
              "end to end | overlap |")
        print("|---|---|---|---|---|---|---|")
        for megapixels in (float(s) for s in args.sizes.split(",")):
            paths = photos(scratch, megapixels, args.images)
            full = per_image_ms(full_decode(predictor), paths[:16])
            draft = per_image_ms(predictor.to_pixels, paths)
            decoded = rate(lambda p: decode_only(predictor, p), paths)
            forward = forward or forward_only(predictor, paths)
            whole = rate(lambda p: end_to_end(predictor, p), paths)
            bound = 1 / (1 / decoded + 1 / forward)
            print(f"| {megapixels:g} Mpx | {full:.1f} ms | {draft:.1f} ms | {decoded:.0f} img/s | "
                  f"{forward:.0f} img/s | {whole:.0f} img/s | {whole / bound:.0%} |", flush=True)
            for path in paths:
                path.unlink()
    print(f"engine: {predictor.card.engine} {predictor.card.precision}; load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
