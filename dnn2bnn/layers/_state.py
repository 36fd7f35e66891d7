"""The parametrization of ``rho``, recorded in a state_dict and checked when it is loaded.

``sigma`` is ``softplus(rho)`` or ``exp(rho)`` (the layer's ``parametrization``), so a
state_dict written by an ``"exp"`` layer and loaded into a ``"softplus"`` one (or the reverse)
would give other sigmas without any error: the keys and shapes agree. The state_dict keys
stay as they are; the parametrization goes into the state_dict's per-module metadata
(``state_dict._metadata[module name]``, which ``torch.save``/``torch.load`` keep, like
the ``version`` torch writes there), and loading compares it with the layer's own.

A state_dict without it (written before this record existed, rebuilt as a plain ``dict``,
or read from a ``.safetensors`` file, which has no per-module metadata) is accepted as it is:
nothing says how its ``rho`` was meant.
"""

from __future__ import annotations

from typing import Any

__all__ = ["METADATA_KEY", "check_parametrization", "record_parametrization"]

#: Key of the parametrization (``"softplus"``/``"exp"``) in a module's state_dict metadata.
METADATA_KEY = "dnn2bnn_parametrization"


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
    without them loads no sigma) and records a parametrization.
    """
    recorded = local_metadata.get(METADATA_KEY)
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
