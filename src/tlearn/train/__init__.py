"""Features -> head: training recipes."""
from tlearn.train.head import HeadFit, fit_head

__all__ = ["HeadFit", "fit_head"]
