"""A self-contained HTML report of a trained model: numbers with intervals, figures and its worst mistakes.

Everything the page shows is a file next to it (PNGs, JPEG thumbnails), so it opens from disk offline.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from tlearn.data.decode import DecodeError, load_image
from tlearn.evaluate import painter as painters
from tlearn.evaluate.calibration import accuracy_coverage, expected_calibration_error, reliability_bins
from tlearn.files import disk_refusals

if TYPE_CHECKING:  # metrics imports scikit-learn and scipy.stats: only write_report needs it, and imports it there
    from PIL import Image

    from tlearn.evaluate.metrics import ScoredSplit
    from tlearn.evaluate.suspects import SuspectReport

GALLERY_SIZE = 12
UNSURE_SIZE = 6  # least confident images shown with their heat maps
THUMBNAIL_PX = 200


@dataclass
class ReportInputs:
    classes: list[str]
    scored: dict[str, ScoredSplit]  # "val" and/or "test"
    seed: int = 0
    calibration: dict = field(default_factory=dict)  # the bundle's "calibration" section
    history: list[dict] = field(default_factory=list)  # per-epoch rows, when the recipe has epochs
    data_checks: dict = field(default_factory=dict)  # DoctorReport.to_dict() of the training data
    facts: dict = field(default_factory=dict)  # short "name: value" lines for the header
    # the overlay of an image's heat map for its top-1 class (tlearn.explain), when the model has one
    heat_map: Callable[[Path, int], Image.Image] | None = None
    # training images whose label the out-of-fold probabilities contradict (tlearn.evaluate.suspects), and the
    # dataset folder their paths are relative to
    suspects: SuspectReport | None = None
    data_root: Path | None = None


def write_report(directory: str | Path, inputs: ReportInputs) -> Path:
    """Write DIRECTORY/report.html and its images; the figures are of the test split (val when there is none).

    The figures are drawn by the painter process when one was started (painter.start), while this process writes
    the gallery and the page; the report is complete when this returns."""
    painter = painters.take()
    try:
        with disk_refusals(directory, "--out"):  # a full or read-only disk (a model folder on a read-only mount)
            return _write(Path(directory), inputs, painter)
    finally:
        painter.close()


def _write(directory: Path, inputs: ReportInputs, painter: painters.Painter) -> Path:
    from tlearn.evaluate.metrics import classification_metrics


    (directory / "gallery").mkdir(parents=True, exist_ok=True)
    if not inputs.scored:
        return _write_unscored(directory, inputs, painter)
    split = "test" if "test" in inputs.scored else "val"
    scored = inputs.scored[split]
    temperature = float(inputs.calibration.get("temperature", 1.0))
    metrics = {name: classification_metrics(s.labels, s.logits.argmax(1), inputs.classes, inputs.seed)
               for name, s in inputs.scored.items()}
    sections = [_header(inputs, split), _data_section(inputs.data_checks), _metrics_section(metrics, split)]
    if inputs.history:
        painter.draw("training_curves", inputs.history, directory / "training_curves.png")
        sections.append(_figure("training_curves.png", "Training curves", "Loss and validation accuracy per epoch."))
    m = metrics[split]
    painter.draw("confusion_matrices", m["confusion_matrix"], inputs.classes, directory / "confusion_counts.png",
                 directory / "confusion_normalised.png")
    sections.append(_figure("confusion_counts.png", f"Confusion matrix ({split})", "Counts of images."))
    sections.append(_figure("confusion_normalised.png", f"Confusion matrix, normalised ({split})",
                            "Each row divided by its true-class total."))
    painter.draw("per_class_bars", m["per_class"], directory / "per_class.png")
    sections.append(_figure("per_class.png", f"Per-class precision, recall and F1 ({split})", ""))
    sections.append(_calibration_section(directory, scored, temperature, inputs.calibration, painter))
    sections.append(_gallery(directory, scored, temperature, inputs.classes, inputs.heat_map))
    return _finish(directory, inputs, sections, painter)


def _write_unscored(directory: Path, inputs: ReportInputs, painter: painters.Painter) -> Path:
    """The page of a model trained on all of its data (nothing carved to report on): what it is, the data, the
    suspect labels; no held-out figure, and a line that says why."""
    sections = [_header(inputs, None), _data_section(inputs.data_checks),
                "<h2>Held-out figures</h2><p>None: every image was used to train (no val or test split, and none "
                "carved). The cross-validated figures on train that chose the head are in metrics.json; "
                "<code>tlearn evaluate MODEL DATA</code> scores the model on images it has not seen.</p>"]
    return _finish(directory, inputs, sections, painter)


def _finish(directory: Path, inputs: ReportInputs, sections: list[str], painter: painters.Painter) -> Path:
    """The suspect labels' section, the figures the painter draws waited for, and the page written."""
    if inputs.suspects is not None and inputs.data_root is not None:
        sections.append(_suspect_section(directory, inputs.suspects, inputs.data_root))
    painter.finish()
    page = _PAGE.format(title=html.escape(f"tlearn report: {inputs.facts.get('backbone', 'model')}"),
                        body="\n".join(sections))
    path = directory / "report.html"
    path.write_text(page, encoding="utf-8", errors="backslashreplace")  # names that are not UTF-8
    return path


def _header(inputs: ReportInputs, split: str | None) -> str:
    facts = dict(inputs.facts)
    facts["classes"] = f"{len(inputs.classes)}: " + ", ".join(inputs.classes)
    facts["figures show"] = ("no held-out split (all of the data trained the model)" if split is None else
                             f"the {split} split" + ("" if split == "test" else
                             " (no test split: val was used to choose the model, so these are optimistic)"))
    facts["written"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    return f"<h1>tlearn model report</h1><table class='facts'>{rows}</table>"


def _data_section(checks: dict) -> str:
    if not checks:
        return ""
    errors = [f for f in checks.get("findings", []) if f["severity"] == "error"]
    counts = ", ".join(f"{split} {sum(c.values())}" for split, c in checks.get("counts", {}).items())
    imbalance = ", ".join(f"{s} {r:.2f}" for s, r in checks.get("imbalance", {}).items())
    text = f"<p>Images: {html.escape(counts)}. Imbalance (largest / smallest class): {html.escape(imbalance)}.</p>"
    if not checks.get("decoded", True):
        text += ("<p>Checked at training time: exact duplicates only. <code>tlearn doctor DATA</code> also finds "
                 "near-duplicates, unreadable and placeholder images.</p>")
    if errors:
        items = "".join(f"<li><b>{html.escape(f['kind'])}</b>: {html.escape(f['message'])}<br><code>"
                        f"{html.escape(' , '.join(f['paths']))}</code></li>" for f in errors[:30])
        more = f"<p>... and {len(errors) - 30} more.</p>" if len(errors) > 30 else ""
        text = (f"<div class='alarm'><h2>Warning: {len(errors)} data problem(s) that corrupt the evaluation</h2>"
                f"<p>The numbers below are not trustworthy until these are fixed (see <code>tlearn doctor</code>)."
                f"</p><ul>{items}</ul>{more}</div>") + text
    return f"<h2>Data</h2>{text}"


def _ci(m: dict, key: str) -> str:
    low_high = m.get("ci95", {}).get(key)
    return f"{m[key]:.3f} <span class='ci'>[{low_high[0]:.3f}, {low_high[1]:.3f}]</span>" if low_high else \
        f"{m[key]:.3f}"


def _metrics_section(metrics: dict[str, dict], split: str) -> str:
    rows = "".join(f"<tr><td>{name}</td><td>{m['n']}</td><td>{_ci(m, 'accuracy')}</td>"
                   f"<td>{_ci(m, 'mean_class_accuracy')}</td><td>{m['balanced_accuracy']:.3f}</td>"
                   f"<td>{m['macro_f1']:.3f}</td></tr>" for name, m in metrics.items() if m["n"])
    per_class = metrics[split]["per_class"]
    class_rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td>"
                         f"<td>{r['f1']:.3f}</td><td>{r['support']}</td></tr>" for c, r in per_class.items())
    return ("<h2>Metrics</h2><p>Brackets: bootstrap 95% confidence intervals (images resampled, seeded). "
            "The val split chose the model and the temperature; only test is an unbiased estimate.</p>"
            "<table><tr><th>split</th><th>n</th><th>accuracy</th><th>mean class accuracy</th>"
            f"<th>balanced accuracy</th><th>macro F1</th></tr>{rows}</table>"
            f"<h3>Per class ({split})</h3><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
            f"<th>n</th></tr>{class_rows}</table>")


def _calibration_section(directory: Path, scored: ScoredSplit, temperature: float, calibration: dict,
                         painter: painters.Painter) -> str:
    before, after = scored.proba(), scored.proba(temperature)
    ece_b, ece_a = expected_calibration_error(before, scored.labels), expected_calibration_error(after, scored.labels)
    painter.draw("reliability", reliability_bins(before, scored.labels), reliability_bins(after, scored.labels),
                 ece_b, ece_a, directory / "reliability.png", scored.name)
    painter.draw("coverage", accuracy_coverage(after, scored.labels), directory / "coverage.png", scored.name)
    note = (f"Temperature T = {temperature:.3f}, fitted on {calibration.get('fitted_on', 'val')} "
            "(probabilities = softmax(logits / T)). Expected calibration error on "
            f"{scored.name}: {ece_b:.4f} before, {ece_a:.4f} after." if calibration else
            "This model has no calibration temperature (T = 1).")
    return (f"<h2>Calibration</h2><p>{html.escape(note)}</p>"
            + _figure("reliability.png", "Reliability diagram",
                      "Bars: accuracy in each confidence bin; the dashed diagonal is a perfectly calibrated model.")
            + _figure("coverage.png", "Accuracy vs coverage",
                      "With <code>tlearn predict --min-confidence P</code>, images below P are labelled uncertain: "
                      "fewer answers, more of them right."))


def _gallery(directory: Path, scored: ScoredSplit, temperature: float, classes: list[str],
             heat_map: Callable[[Path, int], Image.Image] | None) -> str:
    proba = scored.proba(temperature)
    predicted, confidence = proba.argmax(1), proba.max(1)
    wrong = np.flatnonzero(predicted != scored.labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:GALLERY_SIZE]
    unsure = np.argsort(confidence, kind="stable")[:UNSURE_SIZE]
    if hasattr(heat_map, "prefetch"):  # every heat map the gallery shows, in batched engine calls
        heat_map.prefetch([Path(scored.paths[i]) for i in (*worst, *unsure)], THUMBNAIL_PX)
    cards = _cards(directory, scored, classes, predicted, confidence, worst, "mistake", heat_map)
    body = "".join(cards) or "<p>No mistakes on this split.</p>"
    heat_note = ("" if heat_map is None else " Each with its heat map: where the model found the evidence for "
                 "the class it predicted (a class activation map, red the strongest; the part of the photo "
                 "outside the centre crop the model sees is left uncoloured).")
    section = (f"<h2>Most confident mistakes ({scored.name})</h2><p>{len(wrong)} of {len(scored.labels)} images "
               f"are misclassified; the {len(cards)} with the highest (calibrated) confidence.{heat_note}</p>"
               f"<div class='gallery'>{body}</div>")
    if heat_map is not None:
        cards = _cards(directory, scored, classes, predicted, confidence, unsure, "unsure", heat_map)
        section += (f"<h2>Least confident images ({scored.name}), with heat maps</h2><p>The {len(cards)} images "
                    f"whose top (calibrated) probability is lowest.</p><div class='gallery'>{''.join(cards)}</div>")
    return section


def _cards(directory: Path, scored: ScoredSplit, classes: list[str], predicted: np.ndarray, confidence: np.ndarray,
           chosen: np.ndarray, kind: str, heat_map: Callable[[Path, int], Image.Image] | None) -> list[str]:
    """A thumbnail card per chosen image (with its heat map's overlay beside it, when there is one)."""
    cards = []
    for rank, i in enumerate(chosen):
        try:
            image = load_image(scored.paths[i], draft_size=(THUMBNAIL_PX, THUMBNAIL_PX))
        except DecodeError:
            continue
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        name = f"gallery/{kind}_{rank:02d}.jpg"
        image.save(directory / name, quality=85)
        pictures = f"<img src='{name}' alt='{kind} {rank + 1}'>"
        heat = _heat(heat_map, Path(scored.paths[i]))
        if heat is not None:
            heat.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            heat.save(directory / f"gallery/{kind}_{rank:02d}_heat.jpg", quality=85)
            pictures += f"<img src='gallery/{kind}_{rank:02d}_heat.jpg' alt='heat map of {kind} {rank + 1}'>"
        cards.append(f"<figure class='card'>{pictures}<figcaption>"
                     f"true <b>{html.escape(classes[scored.labels[i]])}</b><br>predicted "
                     f"<b>{html.escape(classes[predicted[i]])}</b> ({confidence[i]:.0%})<br>"
                     f"<small>{html.escape(Path(scored.paths[i]).name)}</small></figcaption></figure>")
    return cards


def _suspect_section(directory: Path, report: SuspectReport, root: Path) -> str:
    """Thumbnails of the most suspect training labels, with the label the model suggests."""
    cards = []
    for s in report.suspects[:GALLERY_SIZE]:
        try:
            image = load_image(root / s.path, draft_size=(THUMBNAIL_PX, THUMBNAIL_PX))
        except DecodeError:  # moved or changed since the train: the table still lists it
            continue
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        name = f"gallery/suspect_{s.rank:02d}.jpg"
        image.convert("RGB").save(directory / name, quality=85)
        cards.append(f"<figure class='card'><img src='{name}' alt='suspect label {s.rank}'><figcaption>"
                     f"labelled <b>{html.escape(s.given)}</b> ({s.self_confidence:.0%})<br>looks like "
                     f"<b>{html.escape(s.suggested)}</b> ({s.suggested_probability:.0%})<br>"
                     f"<small>{html.escape(s.path)}</small></figcaption></figure>")
    body = "".join(cards) or "<p>No training label is contradicted by the out-of-fold probabilities.</p>"
    return (f"<h2>Labels to check (train)</h2><p>{len(report.suspects)} of {report.images} training images have a "
            "label that a head which never saw them contradicts (confident learning on the out-of-fold "
            f"probabilities; about {report.estimated_errors} wrong labels estimated). The "
            f"{len(cards)} most suspect, lowest probability of their given label first; all of them: "
            "<code>tlearn doctor DATA --labels</code>.</p>"
            f"<div class='gallery'>{body}</div>")


def _heat(heat_map: Callable[[Path, int], Image.Image] | None, path: Path) -> Image.Image | None:
    from tlearn.errors import TlearnError

    try:
        return None if heat_map is None else heat_map(path, THUMBNAIL_PX)
    except TlearnError:  # an image the explainer refuses (too large, say) keeps its card, without a heat map
        return None


def _figure(name: str, title: str, caption: str) -> str:
    return (f"<h2>{html.escape(title)}</h2><figure><img src='{html.escape(name)}' alt='{html.escape(title)}'>"
            f"<figcaption>{caption}</figcaption></figure>")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
table.facts th {{ background: #f3f3f3; }}
.ci {{ color: #666; font-size: 0.9em; }}
.alarm {{ border: 3px solid #c00; background: #fee; padding: 0.5em 1em; }}
.alarm h2 {{ color: #c00; }}
figure img {{ max-width: 100%; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 0.8em; }}
.card {{ margin: 0; width: 210px; border: 1px solid #ddd; padding: 4px; }}
.card img {{ display: block; margin: auto; }}
.card img + img {{ margin-top: 4px; }}
</style></head>
<body>
{body}
</body></html>
"""
