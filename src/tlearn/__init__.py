"""tlearn: transfer learning for image classification on an ordinary CPU, offline."""
from tlearn.api import ImageClassifier, load
from tlearn.errors import NotFittedError, TlearnError
from tlearn.predict import Prediction, Predictor, Unreadable

__version__ = "0.2.0"
__all__ = ["ImageClassifier", "NotFittedError", "Prediction", "Predictor", "TlearnError", "Unreadable", "load",
           "__version__"]
