"""Features -> head: training recipes."""
from tlearn.train.head import HeadFit, LinearHead, balanced_class_weight, fit_head, normalise_features

__all__ = ["HeadFit", "LinearHead", "balanced_class_weight", "fit_head", "normalise_features"]
