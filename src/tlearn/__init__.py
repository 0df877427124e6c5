"""tlearn: transfer learning for image classification on an ordinary CPU, offline.

The names below are loaded on first use (PEP 562): `tlearn --help` and `import tlearn.errors` stay fast.
"""
__version__ = "0.2.0"
__all__ = ["ImageClassifier", "NotFittedError", "doctor", "Prediction", "Predictor", "TlearnError", "Unreadable",
           "load", "suspect_labels", "__version__"]
_HOME = {"ImageClassifier": "tlearn.api", "load": "tlearn.api", "doctor": "tlearn.api", "suspect_labels": "tlearn.api",
         "NotFittedError": "tlearn.errors",
         "TlearnError": "tlearn.errors", "Prediction": "tlearn.predict", "Predictor": "tlearn.predict",
         "Unreadable": "tlearn.predict"}


def __getattr__(name: str):
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'tlearn' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
