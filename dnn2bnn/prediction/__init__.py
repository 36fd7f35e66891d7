"""Monte Carlo prediction with uncertainty: :func:`predict` and its result types."""

from dnn2bnn.prediction._predict import PredictionWarning, Task, predict
from dnn2bnn.prediction._split import clear_plan_cache
from dnn2bnn.prediction.results import ClassificationPrediction, RegressionPrediction

__all__ = [
    "ClassificationPrediction",
    "PredictionWarning",
    "RegressionPrediction",
    "Task",
    "clear_plan_cache",
    "predict",
]
