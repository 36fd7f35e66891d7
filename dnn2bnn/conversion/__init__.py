"""Conversion of trained torch.nn models into Bayesian models."""

from dnn2bnn.conversion._mapping import default_mapping, opt_in_mapping
from dnn2bnn.conversion.deploy import to_dnn
from dnn2bnn.conversion.report import (
    ConversionReport,
    ConvertedModule,
    ReconfiguredModule,
    SkippedModule,
)
from dnn2bnn.conversion.transform import transform_to_bnn_layer, transform_to_bnn_model

__all__ = [
    "ConversionReport",
    "ConvertedModule",
    "ReconfiguredModule",
    "SkippedModule",
    "default_mapping",
    "opt_in_mapping",
    "to_dnn",
    "transform_to_bnn_layer",
    "transform_to_bnn_model",
]
