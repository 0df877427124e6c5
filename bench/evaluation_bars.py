"""Measure the bars of the evaluation issue: doctor on a spoiled hymenoptera copy, ECE before/after temperature
scaling on oxford17flowers, and the oxford17flowers report in headless Chromium.

Usage (from the repository root, with ../shared/datasets present):
    .venv/bin/python bench/evaluation_bars.py [--work /tmp/tlearn-eval-bench]
Prints a markdown summary; the model, report and screenshot stay under --work.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
TLEARN = str(Path(sys.executable).with_name("tlearn"))
sys.path.insert(0, str(REPO / "tests"))


def doctor_bar(work: Path) -> list[str]:
    data = work / "hymenoptera-spoiled"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(DATASETS / "hymenoptera", data)
    shutil.copy(data / "train/ants/0013035.jpg", data / "val/ants/leaked_0013035.jpg")
    shutil.copy(data / "train/bees/16838648_415acd9e3f.jpg", data / "train/ants/mislabelled_16838648.jpg")
    start = time.perf_counter()
    run = subprocess.run([TLEARN, "doctor", str(data), "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    findings = json.loads(run.stdout)["findings"]
    named = lambda kind: [f["paths"] for f in findings if f["kind"] == kind]  # noqa: E731
    return [f"- `tlearn doctor` on the spoiled copy: exit code {run.returncode}, {seconds:.1f}s for "
            f"{json.loads(run.stdout)['files_checked']} files",
            f"- leakage: {named('leakage')}", f"- conflicting_labels: {named('conflicting_labels')}",
            f"- suspicious: {named('suspicious')}"]


def calibration_bar(work: Path) -> tuple[list[str], Path]:
    model = work / "oxford17flowers-model"
    start = time.perf_counter()
    subprocess.run([TLEARN, "train", str(DATASETS / "oxford17flowers"), "--out", str(model), "-q"], check=True,
                   capture_output=True)
    seconds = time.perf_counter() - start
    config = json.loads((model / "config.json").read_text())
    metrics = json.loads((model / "metrics.json").read_text())
    cal = config["extra"]["calibration"]
    lines = [f"- `tlearn train oxford17flowers` ({seconds:.0f}s incl. report; features from the cache when warm)",
             f"- temperature {cal['temperature']:.3f} fitted on val (n={metrics['val']['n']})"]
    for split in ("val", "test"):
        lines.append(f"- {split} ECE ({cal['bins']} bins): {cal['ece_before'][split]:.4f} before -> "
                     f"{cal['ece_after'][split]:.4f} after")
    test = metrics["test"]
    lines.append(f"- test accuracy {test['accuracy']:.4f} (95% CI {test['ci95']['accuracy'][0]:.3f}-"
                 f"{test['ci95']['accuracy'][1]:.3f}), mean class accuracy {test['mean_class_accuracy']:.4f} "
                 f"(95% CI {test['ci95']['mean_class_accuracy'][0]:.3f}-{test['ci95']['mean_class_accuracy'][1]:.3f})")
    return lines, model / "report" / "report.html"


def render_bar(html: Path, work: Path) -> list[str]:
    from chromium_page import chromium_binary, render

    images = render(html, work / "oxford17flowers-report.png", chromium_binary())
    broken = [i["src"] for i in images if not i["width"]]
    return [f"- headless Chromium: {len(images)} images in the page, {len(broken)} not loaded {broken}; "
            f"screenshot {work / 'oxford17flowers-report.png'}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/tlearn-eval-bench"))
    work = parser.parse_args().work
    work.mkdir(parents=True, exist_ok=True)
    lines = ["### Doctor (hymenoptera copy: one train image copied into val, one bee copied into ants)"]
    lines += doctor_bar(work)
    lines.append("### Calibration (oxford17flowers)")
    calibration, html = calibration_bar(work)
    lines += calibration
    lines.append("### Report")
    lines += render_bar(html, work)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
