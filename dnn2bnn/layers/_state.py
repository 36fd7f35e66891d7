"""The parametrization of ``rho``, recorded in a state_dict and checked when it is loaded.

``sigma`` is ``softplus(rho)`` or ``exp(rho)`` (the layer's ``parametrization``), so a
state_dict written by an ``"exp"`` layer and loaded into a ``"softplus"`` one (or the reverse)
would give other sigmas without any error: the keys and shapes agree. The state_dict keys
stay as they are; the parametrization goes into the state_dict's per-module metadata
(``state_dict._metadata[module name]``, which ``torch.save``/``torch.load`` keep, like
the ``version`` torch writes there), and loading compares it with the layer's own.

A state_dict that torch wrote (its per-module metadata holds torch's ``version``) without the
record was written by a dnn2bnn from before the record, whose only parametrization was
``"softplus"``: it is read as softplus, and a layer of the ``"exp"`` parametrization (the
default since issue 17) receives ``rho = log(softplus(rho))``, the same sigmas. A state_dict
without any per-module metadata (rebuilt as a plain ``dict``, or read from a ``.safetensors``
file) is accepted as it is: nothing says how its ``rho`` was meant (``dnn2bnn.load_bnn`` and
``from_pretrained`` restore the parametrization from their own records first).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LEGACY_PARAMETRIZATION",
    "METADATA_KEY",
    "check_parametrization",
    "exp_rho_of_softplus_rho",
    "record_parametrization",
]

#: Key of the parametrization (``"softplus"``/``"exp"``) in a module's state_dict metadata.
METADATA_KEY = "dnn2bnn_parametrization"
#: How ``rho`` is read where nothing records it: the only parametrization before the record.
LEGACY_PARAMETRIZATION = "softplus"


def record_parametrization(destination: Any, prefix: str, parametrization: str) -> None:
    """Write ``parametrization`` into ``destination``'s metadata of the module at ``prefix``."""
    metadata = getattr(destination, "_metadata", None)
    if metadata is None:  # a plain dict passed as destination: nowhere to record it
        return
    metadata.setdefault(prefix[:-1], {})[METADATA_KEY] = parametrization


def check_parametrization(
    *,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    rho_names: list[str],
    parametrization: str,
    error_msgs: list[str],
) -> None:
    """Append to ``error_msgs`` when the loaded ``rho`` was written under another parametrization.

    Only when the state_dict holds one of this module's ``rho_names`` (a partial load
    without them loads no sigma) and records a parametrization. A torch state_dict without
    the record (written before it existed: softplus) loaded into an ``"exp"`` layer has its
    ``rho`` entries replaced, in the state_dict that ``load_state_dict`` copied, by the
    ``rho`` of the same sigmas under exp.
    """
    recorded = local_metadata.get(METADATA_KEY)
    if recorded is None and local_metadata:  # torch wrote metadata: a dnn2bnn before the record
        if parametrization == "exp":
            for name in rho_names:
                if isinstance(state_dict.get(prefix + name), torch.Tensor):
                    state_dict[prefix + name] = exp_rho_of_softplus_rho(state_dict[prefix + name])
        return
    if recorded is None or recorded == parametrization:
        return
    if not any(prefix + name in state_dict for name in rho_names):
        return
    name = prefix[:-1] or "<root>"
    error_msgs.append(
        f"{name}: the state_dict's {', '.join(rho_names)} were written under "
        f"parametrization={recorded!r} (sigma = {_formula(recorded)}), this layer uses "
        f"parametrization={parametrization!r} (sigma = {_formula(parametrization)}); load it "
        f"into a model converted with parametrization={recorded!r}, or convert this "
        f"one again with it (transform_to_bnn_model(..., parametrization={recorded!r}))"
    )


def _formula(parametrization: str) -> str:
    return f"{parametrization}(rho)"


def exp_rho_of_softplus_rho(rho: torch.Tensor) -> torch.Tensor:
    """``log(softplus(rho))`` (the exp parametrization's ``rho`` of the same sigma), computed in
    float64 and returned in ``rho``'s dtype; ``rho`` itself below -30, where the two agree."""
    wide = rho.detach().to(torch.float64)
    return torch.where(wide < -30.0, wide, torch.log(F.softplus(wide))).to(rho.dtype)
