"""The data of a conversion plan: one :class:`Candidate` per module or parameter, with its
:class:`Action` and reason, and the names of a model's modules and parameters."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from dnn2bnn.config import BayesConfig
from dnn2bnn.conversion._trace import TraceInfo
from dnn2bnn.layers._base import BayesianLayer
from dnn2bnn.layers.params import BayesianParameters

__all__ = ["Action", "Candidate", "ConversionPlan", "ModelIndex", "bayes_param_names"]


class Action(str, Enum):
    """What the conversion does with one candidate."""

    #: Made Bayesian.
    CONVERT = "convert"
    #: Already Bayesian; the new options are applied to it.
    RECONFIGURE = "reconfigure"
    #: Already Bayesian and no option was given: left as it is.
    KEEP = "keep"
    #: Left deterministic as asked (include/exclude, layer_types, a config of None).
    SKIP = "skip"
    #: Left deterministic although it carries weights: warned about; ``strict`` raises.
    REFUSE = "refuse"


@dataclass
class Candidate:
    """One module (or one parameter, ``parameter=True``) and what happens to it."""

    module: nn.Module
    #: Qualified names: the module's (all of them when it is shared), or the parameter's.
    names: tuple[str, ...]
    type_name: str
    action: Action
    reason: str = ""
    #: The converter (CONVERT) and, for parameter-level ones, the parameters it converts.
    bnn_cls: type[nn.Module] | None = None
    params: tuple[str, ...] | None = None
    #: The configuration (CONVERT, RECONFIGURE); ``None`` for a user-written converter.
    config: BayesConfig | None = None
    #: RECONFIGURE: whether sigma is re-initialised from the new configuration.
    reset_sigma: bool = False
    parameter: bool = False
    #: Whether include/exclude left it out (SKIP, or KEEP for a Bayesian layer).
    left_out: bool = False
    notes: list[str] = field(default_factory=list)
    #: Filled in by apply_plan: the module after conversion, and what a re-configuration changed.
    result: nn.Module | None = None
    changes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class ConversionPlan:
    """Every decision of one conversion call, in module-tree order."""

    candidates: list[Candidate]
    trace: TraceInfo
    #: Notes about the model as a whole (broken weight tying).
    notes: list[str] = field(default_factory=list)
    #: The requested layer types, for messages.
    requested: tuple[str, ...] = ()

    def having(self, *actions: Action) -> list[Candidate]:
        """The candidates with one of ``actions``."""
        return [c for c in self.candidates if c.action in actions]


def bayes_param_names(candidate: Candidate) -> tuple[str, ...]:
    """The parameters of ``candidate.module`` that the conversion makes Bayesian."""
    cls = candidate.bnn_cls
    if cls is None:
        return ()
    if issubclass(cls, BayesianParameters):
        return candidate.params or cls.select_params(candidate.module)
    if issubclass(cls, BayesianLayer):
        return tuple(cls.bayes_params)
    return ()



class ModelIndex:
    """Names of the modules and parameters of a model (a module or tensor may have several)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.module_names: dict[int, list[str]] = defaultdict(list)
        self._modules: dict[int, nn.Module] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.module_names[id(module)].append(name)
            self._modules.setdefault(id(module), module)
        self.param_names: dict[int, list[str]] = defaultdict(list)
        self.param_owner: dict[str, tuple[nn.Module, str]] = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            for attr, value in module._parameters.items():
                if value is not None:
                    full = f"{prefix}.{attr}" if prefix else attr
                    self.param_names[id(value)].append(full)
                    self.param_owner[full] = (module, attr)

    def modules(self) -> Iterator[tuple[nn.Module, tuple[str, ...]]]:
        for key, module in self._modules.items():
            yield module, tuple(self.module_names[key])
