"""Framework-specific finishing of a converted model, called at the end of every conversion.

Kept import-light: a framework is only touched when it is already imported, which it must
be when the converted model is one of its classes.
"""

from __future__ import annotations

import sys

from torch import nn


def adopt_(model: nn.Module) -> None:
    """Give a converted framework model the behaviour its framework methods need, in place.

    Today: a Hugging Face ``PreTrainedModel`` (see :mod:`dnn2bnn.integrations._hf_model`).
    """
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None or not isinstance(model, modeling_utils.PreTrainedModel):
        return
    from dnn2bnn.integrations._hf_model import adopt_pretrained_

    adopt_pretrained_(model)
