"""What the HTML report adds to every `tlearn train`: importing its modules, then `write_report`, in fresh processes.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/report_speed.py [--repeats 5] [--src before=/tmp/old/src ...]

A model is fitted once per dataset (`ImageClassifier(cache_dir=WORK/cache).fit`; the first run extracts features,
about a minute each) and the report's inputs are stored in WORK as JSON + NPZ. Then, per repeat and per `--src` tree
(interleaved, so every version sees the same load), fresh interpreters time `import tlearn.evaluate.report` alone,
and per dataset the import and one `write_report` call as a re-train pays them (see `time_once`). The `tlearn`
package's `__init__` (which imports the API and with it torch) is bypassed, so the figures are the report's own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TLEARN_DATASETS") or REPO.parent / "shared" / "datasets")
HEAVY = ("torch", "timm", "sklearn", "scipy.stats", "scipy.optimize", "matplotlib.pyplot", "matplotlib", "PIL.Image")


def store_inputs(data: Path, cache: Path, folder: Path) -> None:
    """Fit on `data` and store what `ImageClassifier.report` would hand to `write_report`."""
    import numpy as np

    import tlearn

    clf = tlearn.ImageClassifier(cache_dir=cache, progress=False).fit(data)
    bundle = clf.bundle_
    scored = clf.scored_splits()
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "scored.npz", **{f"{name}_{part}": getattr(s, part) for name, s in scored.items()
                                       for part in ("labels", "logits")})
    (folder / "inputs.json").write_text(json.dumps({
        "classes": bundle.classes, "seed": clf.seed, "paths": {n: [str(p) for p in s.paths] for n, s in scored.items()},
        "calibration": bundle.extra.get("calibration", {}), "history": bundle.extra.get("history", []),
        "data_checks": bundle.extra.get("data_checks", {}),
        "facts": {"backbone": bundle.backbone.name,
                  "recipe": bundle.training.get("recipe", "?"), "layout": bundle.split.get("layout", "?")}}))


def time_once(src: Path, folder: Path | None, out: Path | None) -> dict:
    """In a fresh interpreter: seconds to import the report modules, then (with `folder`) to write one report.

    Without `folder` nothing else is loaded first: the report modules' own import cost and the heavy modules they
    pull in. With it, `tlearn.evaluate.metrics` (scikit-learn, scipy.stats) is imported first, untimed, as `train`
    has done by the time it writes the report (metrics.json), and the inputs are read before the clock starts.
    """
    import types

    import numpy as np

    package = types.ModuleType("tlearn")  # the package without its __init__ (which imports torch via the API)
    package.__path__ = [str(src / "tlearn")]
    sys.modules["tlearn"] = package
    if folder is not None:
        from tlearn.evaluate.metrics import ScoredSplit
    already = set(sys.modules)
    start = time.perf_counter()
    from tlearn.evaluate.report import ReportInputs, write_report
    result = {"import_s": time.perf_counter() - start,
              "loaded": [name for name in HEAVY if name in sys.modules and name not in already]}
    if folder is None:
        return result
    stored = json.loads((folder / "inputs.json").read_text())
    arrays = np.load(folder / "scored.npz")
    scored = {name: ScoredSplit(name, [Path(p) for p in paths], arrays[f"{name}_labels"], arrays[f"{name}_logits"])
              for name, paths in stored["paths"].items()}
    inputs = ReportInputs(classes=stored["classes"], scored=scored, seed=stored["seed"],
                          calibration=stored["calibration"], history=stored["history"],
                          data_checks=stored["data_checks"], facts=stored["facts"])
    start = time.perf_counter()
    write_report(out, inputs)
    result["write_s"] = time.perf_counter() - start
    result["png_kb"] = round(sum(p.stat().st_size for p in out.glob("*.png")) / 1024)
    return result


def run_child(src: str, folder: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, __file__, "--child", src, str(folder or "-"), out],
                              capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(done.stdout)


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["oxford17flowers", "hymenoptera"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlearn-report-speed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--src", action="append", default=[], metavar="LABEL=PATH",
                        help="a src/ tree to time (repeatable, e.g. a `git archive main src` for before/after); "
                             "default: this checkout's src")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        src, folder, out = args.child
        print(json.dumps(time_once(Path(src), None if folder == "-" else Path(folder), Path(out))))
        return
    trees = dict(s.split("=", 1) for s in args.src) or {"this": str(REPO / "src")}
    for name in args.datasets:
        if not (args.work / name / "inputs.json").is_file():
            print(f"fitting {name} (first time: extracts features) ...", flush=True)
            store_inputs(SHARED / name, args.work / "cache", args.work / name)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    alone: dict[str, list[dict]] = {}
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so that every tree sees the same load
        for label, src in trees.items():
            alone.setdefault(label, []).append(run_child(src))
            for name in args.datasets:
                runs.setdefault((name, label), []).append(run_child(src, args.work / name))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\nmedian (min-max) of {args.repeats} fresh processes, seconds\n")
    print("| src | import of the report, nothing loaded before | heavy modules it loads |")
    print("|---|---|---|")
    for label, rows in alone.items():
        print(f"| {label} | {median_range([r['import_s'] for r in rows])} | {', '.join(rows[0]['loaded']) or '-'} |")
    print("\n| dataset | src | import (metrics loaded) | write_report | sum of medians | PNGs |")
    print("|---|---|---|---|---|---|")
    for (name, label), rows in runs.items():
        imports, writes = [r["import_s"] for r in rows], [r["write_s"] for r in rows]
        print(f"| {name} | {label} | {median_range(imports)} | {median_range(writes)} | "
              f"{statistics.median(imports) + statistics.median(writes):.3f} | {rows[0]['png_kb']} KB |")


if __name__ == "__main__":
    main()
