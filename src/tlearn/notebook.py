"""How tlearn's results look in a Jupyter notebook: the `_repr_html_` of a trained classifier, of predictions, of
the doctor's report and of a Predictor, as plain HTML (tables, and figures as inline PNGs), with every name from
the user's data escaped. Nothing here is needed outside a notebook; matplotlib is imported only for a figure.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tlearn.api import ImageClassifier
    from tlearn.data.doctor import DoctorReport
    from tlearn.predict import Prediction, Predictor, Unreadable

THUMBNAIL = 96  # px, the longest side of a prediction's thumbnail
MOST_ROWS = 50  # rows of a predictions table (the rest are counted)
STYLE = ("<style>.tlearn table{border-collapse:collapse;margin:4px 0}.tlearn td,.tlearn th{padding:2px 8px;"
         "border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}.tlearn .ci{color:#777}</style>")


def _e(value) -> str:
    return html.escape(str(value))


def _table(rows: Iterable[tuple[str, str]]) -> str:
    """Two columns of already-escaped HTML."""
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _block(title: str, body: str) -> str:
    return f"<div class='tlearn'>{STYLE}<h4>{_e(title)}</h4>{body}</div>"


def shown_inline(fig: Figure) -> Figure:
    """`fig`, with IPython told (once) to show matplotlib Figures as PNG: tlearn draws on Figures of their own,
    not pyplot's, which is what the notebook's inline backend would otherwise need to have been started."""
    try:
        from IPython import get_ipython
    except ImportError:
        return fig
    shell = get_ipython()
    if shell is not None:
        from matplotlib.figure import Figure

        formatter = shell.display_formatter.formatters["image/png"]
        if not _has_type(formatter, Figure):  # the inline backend's own, when it is running, stays
            formatter.for_type(Figure, _png)
    return fig


def _has_type(formatter, kind) -> bool:
    try:
        formatter.lookup_by_type(kind)
        return True
    except KeyError:
        return False


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def figure_html(fig: Figure) -> str:
    """`fig` as an inline PNG."""
    return f"<img src='data:image/png;base64,{base64.b64encode(_png(fig)).decode()}'/>"


def _interval(m: dict, key: str) -> str:
    """The figure and its bootstrap interval (as the command line prints it), the interval greyed."""
    from tlearn.console import interval

    return f"{m[key]:.4f} <span class='ci'>{interval(m, key)}</span>"


def classifier_html(clf: ImageClassifier) -> str:
    """A trained classifier: what it was trained on and how, its metrics with bootstrap intervals, and its
    curves (a fine-tune) and confusion matrix inline; an untrained one: its settings."""
    from tlearn.console import head_text

    if not hasattr(clf, "bundle_"):
        return _block("tlearn.ImageClassifier (not trained)", _table(
            (_e(k), _e(v)) for k, v in (("backbone", clf.backbone), ("recipe", clf.recipe), ("device", clf.device),
                                        ("cache", clf.cache_dir or "default"))) + "<p>call <code>fit(data)</code></p>")
    bundle, metrics = clf.bundle_, clf.metrics_
    rows = [("backbone", _e(bundle.backbone.name)), ("classes", _e(", ".join(bundle.classes))),
            ("recipe", _e(bundle.training.get("recipe", "head")))]
    summary = getattr(clf, "summary_", None)
    if summary is not None:
        rows.insert(0, ("data", _e(summary.data)))
        rows.append(("images", _e(", ".join(f"{k} {v}" for k, v in summary.images.items()))))
        rows.append(("head", _e(head_text(summary.cv or {}, summary.head_C, bundle.training.get("head", {})))))
        rows.append(("time", f"{summary.seconds:.1f} s"))
    device = bundle.training.get("device")
    if device:
        rows.append(("device", _e(f"{device['name']} ({device['reason']})")))
    if metrics.get("cv"):
        cv = metrics["cv"]
        rows.append(("cross-validated", f"accuracy {cv['accuracy']:.4f}, balanced {cv['balanced_accuracy']:.4f} "
                                        f"(out of fold, n={cv['n']})"))
    for split in ("val", "test"):
        if split in metrics and metrics[split].get("n"):
            m = metrics[split]
            rows.append((f"{split} accuracy", f"{_interval(m, 'accuracy')}, mean class "
                                              f"{_interval(m, 'mean_class_accuracy')} (n={m['n']})"))
    figures = []
    if bundle.extra.get("history"):
        figures.append(figure_html(clf.plot_training_curves()))
    split = next((s for s in ("test", "val") if s in metrics and metrics[s].get("n")), None)
    if split is not None:
        figures.append(figure_html(clf.plot_confusion_matrix(split)))
    where = f"<p>model folder: <code>{_e(clf.directory_)}</code></p>" if hasattr(clf, "directory_") else ""
    return _block("tlearn.ImageClassifier", _table(rows) + where + "".join(figures))


def _thumbnail(source: str) -> str:
    """An inline JPEG thumbnail of the file at `source` ('' when it is not a readable file)."""
    from PIL import Image

    from tlearn.data.decode import DecodeError, load_image

    if not os.path.isfile(source):
        return ""
    try:
        picture = load_image(Path(source), draft_size=(THUMBNAIL, THUMBNAIL))
    except (DecodeError, OSError):
        return ""
    picture.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=80)
    return f"<img src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}'/>"


def predictions_html(rows: list[Prediction | Unreadable]) -> str:
    """Predictions as a table: thumbnail, file, label and probability, the other top-k labels; unreadable files
    with their reason."""
    from tlearn.predict import Unreadable

    body = []
    for row in rows[:MOST_ROWS]:
        name = _e(Path(row.source).name if os.path.isfile(row.source) else row.source)
        if isinstance(row, Unreadable):
            body.append(f"<tr><td></td><td>{name}</td><td colspan='2'>unreadable: {_e(row.reason)}</td></tr>")
            continue
        others = ", ".join(f"{_e(label)} {p:.3f}" for label, p in row.top[1:])
        body.append(f"<tr><td>{_thumbnail(row.source)}</td><td>{name}</td><td><b>{_e(row.label)}</b> "
                    f"{row.score:.3f}</td><td>{others}</td></tr>")
    more = f"<p>... {len(rows) - MOST_ROWS} more</p>" if len(rows) > MOST_ROWS else ""
    table = ("<table><tr><th></th><th>image</th><th>label (calibrated probability)</th><th>next</th></tr>"
             + "".join(body) + "</table>")
    return _block(f"{len(rows)} prediction(s)", table + more)


def doctor_html(report: DoctorReport) -> str:
    """The doctor's report: images per class and split, then each finding with its files."""
    head = "".join(f"<th>{_e(c)}</th>" for c in report.classes)
    counts = "".join(f"<tr><td>{_e(split)}</td>" + "".join(f"<td>{c.get(k, 0)}</td>" for k in report.classes)
                     + f"<td>{report.imbalance[split]:.2f}</td></tr>" for split, c in report.counts.items())
    findings = "".join(
        f"<li><b style='color:{'#b00' if f.severity == 'error' else '#a60'}'>{_e(f.severity)} {_e(f.kind)}</b>: "
        f"{_e(f.message)}" + ("<br><code>" + "</code><br><code>".join(_e(p) for p in f.paths[:10]) + "</code>"
                              if f.paths else "") + "</li>" for f in report.findings)
    verdict = (f"<p><b>{len(report.errors)} error(s)</b>, {len(report.warnings)} warning(s) in "
               f"{report.files_checked} files</p>")
    return _block(f"tlearn doctor: {report.root}", f"<table><tr><th>split</th>{head}<th>imbalance</th></tr>{counts}"
                                                   f"</table>{verdict}<ul>{findings}</ul>")


def predictor_html(predictor: Predictor) -> str:
    """A Predictor: what it runs and how."""
    card = predictor.card
    device = getattr(predictor.engine, "device", None)
    rows = [("model", _e(card.name)), ("backbone", _e(f"{card.backbone} ({card.input_size} px)")),
            ("classes", _e(", ".join(card.classes))), ("engine", _e(f"{card.engine} {card.precision}")),
            ("device", _e(device if device is not None else "cpu")), ("recipe", _e(card.recipe)),
            ("mirror at prediction", "yes" if card.tta else "no"), ("temperature", f"{card.temperature:.3f}")]
    for split in ("val", "test"):
        m = card.metrics.get(split)
        if m and m.get("n"):
            rows.append((f"{split} accuracy", _interval(m, "accuracy")))
    return _block("tlearn.Predictor", _table(rows))
