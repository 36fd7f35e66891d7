"""dnn2bnn: turn a trained deterministic PyTorch network into a Bayesian neural network.

Example:
    >>> import torch, dnn2bnn
    >>> dnn = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> bnn = dnn2bnn.transform_to_bnn_model(dnn)
    >>> loss_fn = dnn2bnn.WithBNNLoss.elbo(bnn, torch.nn.CrossEntropyLoss(), num_train_examples=100)
"""

from dnn2bnn import distributed
from dnn2bnn._version import __version__
from dnn2bnn.checkpoint import load_bnn, save_bnn
from dnn2bnn.config import BayesConfig, BayesConfigMapping, Estimator, Parametrization
from dnn2bnn.conversion import (
    ConversionReport,
    ConvertedModule,
    ReconfiguredModule,
    SkippedModule,
    default_mapping,
    opt_in_mapping,
    to_dnn,
    transform_to_bnn_layer,
    transform_to_bnn_model,
)
from dnn2bnn.errors import CheckpointError, ConversionError, ConversionWarning, Dnn2BnnError
from dnn2bnn.layers import (
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesConvTranspose1d,
    BayesConvTranspose2d,
    BayesConvTranspose3d,
    BayesianLayer,
    BayesianParameters,
    BayesLinear,
    BayesMode,
    BayesMultiheadAttention,
    ConvReparam,
    DenseReparam,
    is_bayesian_layer,
)
from dnn2bnn.loss import WithBNNLoss, elbo, kl_divergence
from dnn2bnn.mindspore import TransformToBNN
from dnn2bnn.modes import get_mode, set_estimator, set_mode
from dnn2bnn.prediction import (
    ClassificationPrediction,
    PredictionWarning,
    RegressionPrediction,
    predict,
)
from dnn2bnn.priors import EmpiricalPrior, NormalPrior, ScaleMixturePrior
from dnn2bnn.recipe import DEFAULT_RHO_LR_FACTOR, bayes_param_groups
from dnn2bnn import metrics, plots  # noqa: E402  (submodules: dnn2bnn.metrics.ece, ...)

__all__ = [
    "DEFAULT_RHO_LR_FACTOR",
    "BayesConfig",
    "BayesConfigMapping",
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesConvTranspose1d",
    "BayesConvTranspose2d",
    "BayesConvTranspose3d",
    "BayesLinear",
    "BayesMode",
    "BayesMultiheadAttention",
    "BayesianLayer",
    "BayesianParameters",
    "CheckpointError",
    "ClassificationPrediction",
    "ConversionError",
    "ConversionReport",
    "ConversionWarning",
    "ConvReparam",
    "ConvertedModule",
    "DenseReparam",
    "Dnn2BnnError",
    "EmpiricalPrior",
    "Estimator",
    "NormalPrior",
    "Parametrization",
    "PredictionWarning",
    "ReconfiguredModule",
    "RegressionPrediction",
    "ScaleMixturePrior",
    "SkippedModule",
    "TransformToBNN",
    "WithBNNLoss",
    "__version__",
    "bayes_param_groups",
    "default_mapping",
    "distributed",
    "elbo",
    "get_mode",
    "is_bayesian_layer",
    "kl_divergence",
    "opt_in_mapping",
    "load_bnn",
    "save_bnn",
    "metrics",
    "plots",
    "predict",
    "set_estimator",
    "set_mode",
    "to_dnn",
    "transform_to_bnn_layer",
    "transform_to_bnn_model",
]
