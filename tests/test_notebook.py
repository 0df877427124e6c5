"""tlearn where most of its users work: a Jupyter notebook (docs/notebook.ipynb run headless on a real kernel, and
the HTML each result shows there)."""
import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import tlearn
from tlearn.errors import TlearnError
from tlearn.predict import Prediction, Predictions, Unreadable

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.ipynb"
ESCAPE = "\x1b["


def test_the_notebook_is_stored_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_the_notebook_runs_headless_with_html_results_and_no_escape_codes(tmp_path, cache_dir, monkeypatch):
    """The example notebook, executed by nbclient on this environment's own kernel: every cell runs, the doctor's
    report, the trained classifier, the predictions and the Predictor show as HTML, the figures as PNG, and no
    output (streams included) carries a terminal escape code."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("TLEARN_CACHE", str(cache_dir))  # the kernel inherits this process's environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    for o in outputs:
        text = o.get("text", "") + "".join(str(v) for v in o.get("data", {}).values())
        assert ESCAPE not in text, text[:200]
    results = [o for o in outputs if o.output_type == "execute_result"]
    html = [o["data"]["text/html"] for o in results if "text/html" in o["data"]]
    assert len(html) >= 3
    assert any("tlearn doctor" in h for h in html) and any("tlearn.ImageClassifier" in h and "test accuracy" in h
                                                             for h in html)
    assert any("prediction(s)" in h and "data:image/jpeg;base64" in h for h in html)
    assert sum("image/png" in o["data"] for o in results) >= 3  # confusion matrix, curves, heat map overlay
    epochs = [o["text"] for o in outputs if o.output_type == "stream" and "fine-tune epoch" in o.get("text", "")]
    assert epochs and all(line.count("fine-tune epoch") == 1 for text in epochs for line in text.splitlines())
    assert (tmp_path / "demo-model" / "model.safetensors").is_file() and (tmp_path / "demo-model.onnx").is_file()


def test_names_from_the_data_are_escaped_in_the_html(tmp_path):
    hostile = "<script>alert(1)</script>"
    rows = Predictions([Prediction(str(tmp_path / "missing.png"), ((hostile, 0.9), ("b&b", 0.1))),
                        Unreadable("<img src=x onerror=alert(1)>", "cannot decode <b>")])
    page = rows._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<img src=x" not in page
    assert "b&amp;b" in page and "unreadable: cannot decode &lt;b&gt;" in page


def test_the_classifier_and_predictor_show_what_they_are(demo_model, demo_data):
    page = demo_model._repr_html_()
    assert "efficientnet_lite0" in page and "test accuracy" in page and "data:image/png;base64" in page
    for name in demo_model.classes_:
        assert name in page
    card = demo_model.predictor()._repr_html_()
    assert "tlearn.Predictor" in card and demo_model.predictor().card.engine in card
    assert "call <code>fit(data)</code>" in tlearn.ImageClassifier()._repr_html_()
    report = tlearn.doctor(demo_data)
    assert "tlearn doctor" in report._repr_html_() and "imbalance" in report._repr_html_()


def test_plot_helpers_return_figures(demo_model):
    from matplotlib.figure import Figure

    figure = demo_model.plot_confusion_matrix("test", normalised=True)
    assert isinstance(figure, Figure)
    counts = np.asarray(demo_model.metrics_["test"]["confusion_matrix"])
    assert figure.axes[0].images[0].get_array().shape == counts.shape
    with pytest.raises(TlearnError, match="head-only"):
        demo_model.plot_training_curves()
    with pytest.raises(TlearnError, match="no metrics of split 'nope'"):
        demo_model.plot_confusion_matrix("nope")


def test_predict_returns_a_list_that_renders(demo_model, demo_data):
    files = sorted((demo_data / "test").rglob("*.png"))[:2]
    rows = demo_model.predict(files)
    assert isinstance(rows, list) and isinstance(rows, Predictions) and len(rows) == 2
    assert rows[0].label in demo_model.classes_ and "<table>" in rows._repr_html_()
