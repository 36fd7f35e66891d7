"""Forward hooks (and a ``__call__`` override) that the vectorized path of
:func:`dnn2bnn.predict` would not run.

torch.fx traces a model by calling its ``forward``, not the module itself: hooks registered
on the model (or on the ``torch.compile``/``DataParallel`` wrapper around it) are not part of
the trace, while hooks of its submodules are (they run inside the submodule calls that the
trace follows). Global module hooks (``torch.nn.modules.module.register_module_forward_hook``)
run on every module call of the plain loop, but the vectorized path applies Bayesian layers
without calling them. A ``__call__`` overridden in the model's class is not traced either.
Either way the two paths would compute different things, silently (a
temperature-scaling hook on the model was skipped), so such a model runs the reference loop.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

from dnn2bnn.conversion._sharing import _close_sample_scope, _open_sample_scope
from dnn2bnn.layers._base import is_bayesian_layer
from dnn2bnn.layers._batched import _draw_all, _drop_all

__all__ = ["untraced_hooks"]

#: dnn2bnn's own hooks on a converted model, which the vectorized path does not need: the
#: sample scope of shared layers (its weight draws are shared per pass already) and the
#: batched training draws (they do nothing without gradients, as in ``predict``).
KNOWN_HOOKS = frozenset({_open_sample_scope, _close_sample_scope, _draw_all, _drop_all})


def _foreign(hooks: dict[int, object]) -> bool:
    return any(hook not in KNOWN_HOOKS for hook in hooks.values())


def untraced_hooks(model: nn.Module, traced: nn.Module) -> str | None:
    """Why the vectorized path cannot follow the forward hooks in force for ``model`` (passed
    to ``predict``) and ``traced`` (the module it traces: ``model`` or the module inside its
    ``torch.compile``/``DataParallel`` wrapper), or ``None`` when it can."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return (
            "global module forward hooks are registered (register_module_forward_hook / "
            "register_module_forward_pre_hook); the batched Bayesian layers would not run them"
        )
    if type(traced).__call__ is not nn.Module.__call__:  # a wrapper's own computes the same
        return (
            f"{type(traced).__name__} overrides __call__, which a torch.fx trace of its "
            "forward does not run"
        )
    for module in dict.fromkeys((model, traced)):  # a single Bayesian layer runs its own hooks
        if not is_bayesian_layer(module) and (
            _foreign(module._forward_hooks) or _foreign(module._forward_pre_hooks)
        ):
            return (
                f"{type(module).__name__} has forward hooks on the model itself, which a torch.fx "
                "trace of its forward does not run (hooks on its submodules are kept: register "
                "the hook on a submodule to keep the vectorized path)"
            )
    return None
