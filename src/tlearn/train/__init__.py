"""Features -> head: training recipes."""
from tlearn.train.head import HeadFit, balanced_class_weight, fit_head, normalise_features

__all__ = ["HeadFit", "balanced_class_weight", "fit_head", "normalise_features"]
