"""Forward hooks that the vectorized path of :func:`dnn2bnn.predict` would not run.

torch.fx traces a model by calling its ``forward``, not the module itself: hooks registered
on the model (or on the ``torch.compile``/``DataParallel`` wrapper around it) are not part of
the trace, while hooks of its submodules are (they run inside the submodule calls that the
trace follows). Global module hooks (``torch.nn.modules.module.register_module_forward_hook``)
run on every module call of the plain loop, but the vectorized path applies Bayesian layers
without calling them. Either way the two paths would compute different things, silently (a
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


def untraced_hooks(*models: nn.Module) -> str | None:
    """Why the vectorized path cannot follow the forward hooks in force for ``models`` (the
    model passed to ``predict`` and the module it traces), or ``None`` when it can."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return (
            "global module forward hooks are registered (register_module_forward_hook / "
            "register_module_forward_pre_hook); the batched Bayesian layers would not run them"
        )
    for model in dict.fromkeys(models):  # a single Bayesian layer runs its own hooks
        if not is_bayesian_layer(model) and (
            _foreign(model._forward_hooks) or _foreign(model._forward_pre_hooks)
        ):
            return (
                f"{type(model).__name__} has forward hooks on the model itself, which a torch.fx "
                "trace of its forward does not run (hooks on its submodules are kept: register "
                "the hook on a submodule to keep the vectorized path)"
            )
    return None
