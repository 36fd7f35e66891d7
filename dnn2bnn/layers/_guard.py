"""Weight samples read outside a forward call: reading works, writing raises.

``layer.weight`` of a Bayesian layer is a fresh draw from the posterior, so a write to it
(``nn.init.zeros_(layer.weight)``, ``layer.weight.data.fill_(0.)``, ``layer.weight.copy_(w)``)
would change a temporary and be lost. Outside a forward call such a read returns a
:class:`PosteriorSample`: every read-only operation works as on a plain tensor (and
returns plain tensors), every in-place one raises ``RuntimeError`` naming ``<name>_mu``.
Inside a forward call the sample is a plain tensor (no overhead on the hot path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["PosteriorSample", "guard"]

#: In-place methods that do not write data.
_ALLOWED = frozenset({"requires_grad_", "share_memory_", "retain_grad", "detach_"})
_IN_PLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
    "__imatmul__",
})
_DATA = Tensor.data


class PosteriorSample(Tensor):
    """A posterior sample of parameter ``_bnn_name`` of a ``_bnn_owner`` layer (read-only)."""

    _bnn_what: str

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else None
        if isinstance(target, PosteriorSample):
            on_data = getattr(func, "__self__", None) is _DATA
            if on_data and name == "__get__":  # .data of a sample: still read-only
                return target
            if (on_data and name == "__set__") or _writes(name):
                raise RuntimeError(
                    f"{target._bnn_what} is a fresh sample of the posterior on every read; "
                    f"{name or 'the write'} on it would be lost. Write to "
                    f"{target._bnn_what}_mu (the posterior mean) or {target._bnn_what}_rho instead, "
                    "e.g. `with torch.no_grad(): layer.weight_mu.zero_()`"
                )
        if "out" in kwargs and isinstance(kwargs["out"], PosteriorSample):
            raise RuntimeError(f"{kwargs['out']._bnn_what} cannot be an out= argument")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _writes(name: str) -> bool:
    if name in _IN_PLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.endswith("__") and name not in _ALLOWED


def guard(sample: Tensor, what: str) -> Tensor:
    """``sample`` as a :class:`PosteriorSample` (same data, same autograd history)."""
    out = sample.as_subclass(PosteriorSample)
    out._bnn_what = what
    return out
