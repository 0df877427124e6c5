"""tlearn: transfer learning for image classification on an ordinary CPU, offline."""
import os

# No network is configured here by default: without this a Hugging Face hub lookup hangs ~50 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tlearn.api import ImageClassifier, NotFittedError, load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ImageClassifier", "NotFittedError", "load", "__version__"]
