"""Batch prediction to Parquet: the single-machine pipeline vs `--ray local`, in one run, each job in its own process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ray_predict.py --model MODEL [--sizes 5000,20000] [--repeats 1]

Images: every JPEG under ../shared/datasets (1,756), repeated via symlinks with distinct names up to each size (in
a temporary folder). Each job is `tlearn predict MODEL FOLDER --output OUT.parquet [--ray local]` in a fresh process;
`--ray local` starts the Ray cluster inside the job, so the job's process tree (driver, GCS, raylet, object store,
workers) is everything it costs. Reported per job: wall seconds, images/s of the whole job and after start-up (from
the first rows written: cluster, actors and engine ready), and the peak over time of the summed RSS and PSS of the
process tree (PSS shares the object store's pages instead of counting them in every process). RSS is read from
/proc/PID/statm every 0.25 s (~4 ms of CPU per sample); PSS from /proc/PID/smaps_rollup every 2 s, as that read walks
every page of every process (~50 ms of CPU per sample of a Ray job's ~15 processes: every 0.25 s it took ~10% of this
machine's two cores from the Ray job, and far less from the one-process local job).
Bars (issue 12): ray images/s >= 70% of local's at 5,000 images; ray peak memory at 20,000 within 20% of 5,000's.
Without --model, a model is trained on hymenoptera first (needs the train extra).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def image_folder(root: Path, count: int) -> Path:
    """`count` symlinks with distinct names to the shared datasets' JPEGs, cycled."""
    files = sorted(p for p in DATASETS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        sys.exit(f"no JPEGs under {DATASETS} (set TLEARN_DATASETS)")
    folder = root / f"images-{count}"
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:06d}-{files[i % len(files)].name}").symlink_to(files[i % len(files)])
    return folder


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def kind_of(pid: int) -> str:
    """The kind of a process, from its command line: python for the driver, raylet, ray::MapWorker..."""
    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    return name.split("(")[0] if name.startswith("ray::") else Path(name.split()[0] if name else "?").name


def rss_kib(pids: list[int]) -> dict[str, int]:
    """RSS in KiB of `pids` from /proc/PID/statm (cheap), summed per kind of process."""
    kinds: dict[str, int] = {}
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    for pid in pids:
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page_kib
            kind = kind_of(pid)
        except (OSError, ValueError, IndexError):
            continue
        kinds[kind] = kinds.get(kind, 0) + rss
    return kinds


def pss_kib(pids: list[int]) -> int:
    """PSS in KiB summed over `pids`, from /proc/PID/smaps_rollup (costly: walks every page)."""
    total = 0
    for pid in pids:
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                          if line.startswith("Pss:"))
        except (OSError, ValueError, StopIteration):
            continue
    return total


def run_job(model: Path, folder: Path, out: Path, ray: bool) -> dict:
    command = [sys.executable, "-m", "tlearn.cli", "predict", str(model), str(folder), "--output", str(out)]
    command += ["--ray", "local"] if ray else []
    start = time.perf_counter()
    errors = tempfile.TemporaryFile("w+")
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
    peak_rss = peak_pss = 0
    peak_by_kind: dict[str, int] = {}
    next_pss = start
    while job.poll() is None:
        pids = tree(job.pid)
        kinds = rss_kib(pids)
        peak_rss = max(peak_rss, sum(kinds.values()))
        for kind, rss in kinds.items():
            peak_by_kind[kind] = max(peak_by_kind.get(kind, 0), rss)
        if time.perf_counter() >= next_pss:
            peak_pss, next_pss = max(peak_pss, pss_kib(pids)), time.perf_counter() + 2.0
        time.sleep(0.25)
    seconds = time.perf_counter() - start
    if job.returncode != 0:
        errors.seek(0)
        sys.exit(f"job failed ({job.returncode}): {errors.read()[-2000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    steady = (manifest["images"] - 32) / max(1e-9, manifest["seconds"] - manifest["startup_seconds"])
    return {"mode": "ray" if ray else "local", "images": manifest["images"], "wall_seconds": round(seconds, 1),
            "job_images_per_second": manifest["images_per_second"], "startup_seconds": manifest["startup_seconds"],
            "steady_images_per_second": round(steady, 1), "peak_rss_mib": round(peak_rss / 1024),
            "peak_pss_mib": round(peak_pss / 1024), "rows": manifest["rows"], "errors": manifest["errors"],
            "peak_rss_mib_by_process": {k: round(v / 1024) for k, v in sorted(peak_by_kind.items())}}


def train_model(root: Path) -> Path:
    import tlearn

    model = root / "hymenoptera-model"
    tlearn.ImageClassifier(progress=False, cache_dir=root / "cache").fit(DATASETS / "hymenoptera").save(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: train one on hymenoptera)")
    parser.add_argument("--sizes", default="5000,20000", help="image counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (mode, size); the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlearn-ray-bench-") as tmp:
        root = Path(tmp)
        model = args.model or train_model(root)
        results = []
        for size in (int(s) for s in args.sizes.split(",")):
            folder = image_folder(root, size)
            for ray in (False, True):
                runs = [run_job(model, folder, root / f"out-{size}-{ray}-{r}.parquet", ray)
                        for r in range(args.repeats)]
                best = max(runs, key=lambda r: r["job_images_per_second"])
                results.append(best)
                print(json.dumps(best), flush=True)
        summarise(results)


def summarise(results: list[dict]) -> None:
    by = {(r["mode"], r["images"]): r for r in results}
    sizes = sorted({r["images"] for r in results})
    for size in sizes:
        local, ray = by[("local", size)], by[("ray", size)]
        print(f"{size} images: ray/local images/s = {ray['job_images_per_second'] / local['job_images_per_second']:.0%}"
              f" whole job, {ray['steady_images_per_second'] / local['steady_images_per_second']:.0%} after start-up "
              f"(ray start-up {ray['startup_seconds']:.1f}s)")
    if len(sizes) > 1:
        small, large = by[("ray", sizes[0])], by[("ray", sizes[-1])]
        for key in ("peak_rss_mib", "peak_pss_mib"):
            print(f"ray {key}: {small[key]} MiB at {sizes[0]}, {large[key]} MiB at {sizes[-1]} "
                  f"({large[key] / small[key] - 1:+.0%})")


if __name__ == "__main__":
    main()
