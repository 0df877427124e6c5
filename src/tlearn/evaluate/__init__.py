"""Predictions -> numbers people can act on."""
from tlearn.evaluate.metrics import classification_metrics

__all__ = ["classification_metrics"]
