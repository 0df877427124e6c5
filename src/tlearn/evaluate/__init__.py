"""Predictions -> numbers people can act on."""
__all__ = ["classification_metrics"]


def __getattr__(name: str):
    # metrics imports scikit-learn and scipy.stats (~1 s): loaded on first use, so that importing the report or the
    # calibration module does not pay for it
    if name == "classification_metrics":
        from tlearn.evaluate.metrics import classification_metrics
        return classification_metrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
