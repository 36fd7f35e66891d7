"""Sums of squared per-example gradients of Linear and convolution weights, from batched passes.

A Linear or convolution layer's weight gradient for one example is a contraction of two
tensors that an ordinary batched forward and backward pass already computes: the layer's
input ``a_n`` (unfolded into patches for a convolution, ``[K, L]`` with ``L`` output
positions) and the gradient of the output ``g_n`` (``[C_out, L]``)::

    grad_n = g_n @ a_n^T                     (per group of a grouped convolution)
    sum_n grad_n^2 = sum_n sum_{l,l'} (g_nl g_nl') (a_nl a_nl')^T

So one forward pass at the posterior means records every such layer's input (a forward
hook) and one backward pass per output cotangent records its output gradient (a tensor
hook); the squares are then summed per layer, either by materializing ``grad_n`` for a
chunk of examples (``bmm``, when ``L`` is large) or through the second form above (one
matrix product over ``(n, l, l')``, when ``L`` is small: the fully connected layers and
the last stages of a CNN, where most weights are). Nothing is differentiated twice and no
per-example gradient of the whole network is ever held.

This is exact for examples that the network treats independently (any network in eval
mode: BatchNorm uses its running statistics). :class:`PerExampleSquares` only takes layers
whose forward is the plain ``F.linear`` / ``conv`` of their (mean) weights; the caller
checks the result against ``torch.func`` on a few examples before trusting it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dnn2bnn.layers._base import BayesianLayer
from dnn2bnn.layers.conv import _BayesConvNd, _BayesConvTransposeNd
from dnn2bnn.layers.linear import BayesLinear

__all__ = ["PerExampleSquares", "hook_reason"]

#: Use the ``(n, l, l')`` product when ``L * L <= L + QUADRATIC_MARGIN`` (``L <= 6``);
#: beyond that, materializing a chunk of per-example gradients is cheaper (measured on CPU
#: for ResNet-18's layers: at L = 4 the product takes 0.14 s against 0.39 s, at L = 16
#: 0.65 s against 0.09 s).
QUADRATIC_MARGIN = 40

_CONV_FORWARD = {1: nn.Conv1d._conv_forward, 2: nn.Conv2d._conv_forward, 3: nn.Conv3d._conv_forward}


def hook_reason(layer: nn.Module) -> str | None:
    """Why ``layer``'s curvature cannot come from hooks (None when it can)."""
    if isinstance(layer, _BayesConvTransposeNd):
        return "transposed convolution"
    if not isinstance(layer, (BayesLinear, _BayesConvNd)):
        return f"{type(layer).__name__} is not a Bayesian Linear or convolution"
    cls = type(layer)
    conv = isinstance(layer, _BayesConvNd)
    op = _BayesConvNd._op if conv else BayesLinear._op
    if cls.forward is not BayesianLayer.forward or cls._op is not op or (
        conv and getattr(cls, "_conv_forward", None) is not _CONV_FORWARD.get(len(layer.kernel_size))  # type: ignore[arg-type]
    ):
        return f"{cls.__name__} overrides the layer's forward"
    extra = set(layer.bayes_params) - {"weight", "bias"}
    if extra:
        return f"Bayesian parameters {sorted(extra)} besides weight and bias"
    return None


@dataclass
class _Call:
    """One call of a hooked layer: its input and the gradients of its output."""

    input: Tensor  # detached
    version: int
    #: whether the input was in the graph (else only the layer's own weights lead to its hooks)
    connected: bool
    grads: list[Tensor] = field(default_factory=list)


class PerExampleSquares:
    """Per-example squared gradients of the hookable Bayesian layers of a model.

    Args:
        model: the network (eval and "mean" mode, as :func:`diagonal_curvature` expects).
        layers: qualified layer name -> (layer, the parameter keys of it to compute,
            e.g. ``["fc.weight_mu", "fc.bias_mu"]``).
        memory_budget: bytes of per-example intermediate results held at once per layer.
    """

    def __init__(self, model: nn.Module, layers: dict[str, tuple[nn.Module, list[str]]], *, memory_budget: int) -> None:
        self.model = model
        self.layers = dict(layers)
        self.memory_budget = memory_budget
        #: layers whose weights must be among the backward pass's inputs for their hooks to fire
        self.needs_leaf: set[str] = set()
        self._calls: dict[str, list[_Call]] | None = None

    @property
    def keys(self) -> list[str]:
        return [k for _, keys in self.layers.values() for k in keys]

    def drop(self, name: str) -> list[str]:
        """Stop hooking layer ``name``; returns its keys."""
        return self.layers.pop(name)[1]

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """Forward hooks on the layers for the duration (removed on exit, whatever happens)."""
        handles = [layer.register_forward_hook(self._recorder(name)) for name, (layer, _) in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._calls = None

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            calls = self._calls
            if calls is None or name not in calls:
                return
            if not (args and isinstance(args[0], Tensor) and isinstance(output, Tensor) and output.requires_grad):
                raise _NotHookable(name, "its input or output is not a tensor in the graph")
            call = _Call(args[0].detach(), args[0]._version, args[0].requires_grad)
            output.register_hook(call.grads.append)
            calls[name].append(call)

        return record

    def run(
        self,
        params: dict[str, Tensor],
        x: Tensor,
        cotangents: Callable[[Tensor], tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, dict[str, Tensor], set[str]]:
        """One forward at ``params`` and one backward per cotangent.

        ``cotangents(out)`` returns ``vs [B, J, *out]`` and weights ``ws [B, J]``. Returns
        the output (detached), ``key -> sum_n sum_j w_j (grad_n^T v_j)^2`` for the keys of
        the layers that were hooked, and the names of layers whose hooks did not fire.
        """
        batch = x.shape[0]
        floating = x.is_floating_point()
        x_leaf = x.detach().requires_grad_(floating)
        leaves = {k: params[k].detach().requires_grad_() for k in self.keys}
        self._calls = {name: [] for name in self.layers}
        try:
            with torch.enable_grad():
                out = functional_call(self.model, {**params, **leaves}, (x_leaf.clone() if floating else x_leaf,), strict=False)
            vs, ws = cotangents(out)  # checks that out is a tensor
            if not out.requires_grad:
                raise _NotHookable(next(iter(self.layers)), "the output does not depend on the hooked weights")
            calls = self._calls
            # The backward pass goes to the input (no weight gradients are computed), plus the
            # weights of layers that the input does not reach: their hooks fire only then.
            inputs = [x_leaf] if floating else []
            for name, (_, keys) in self.layers.items():
                if not floating or name in self.needs_leaf or any(not c.connected for c in calls[name]):
                    inputs += [leaves[k] for k in keys]
            for name, layer_calls in calls.items():
                for c in layer_calls:
                    if c.input.shape[:1] != (batch,):
                        raise _NotHookable(name, f"its input has shape {tuple(c.input.shape)}, not batch {batch} first")
            squares: dict[str, Tensor] = {}
            silent: set[str] = set()
            count = vs.shape[1]
            for j in range(count):
                scale = ws[:, j].sqrt().reshape(-1, *([1] * (vs.dim() - 2)))
                cot = (vs[:, j] * scale).to(out.dtype)
                torch.autograd.backward(out, cot, inputs=inputs, retain_graph=j < count - 1)
                for name, layer_calls in calls.items():
                    layer, keys = self.layers[name]
                    if not layer_calls or any(len(c.grads) != 1 for c in layer_calls):
                        silent.add(name)
                    else:
                        for c in layer_calls:
                            if c.input._version != c.version:
                                raise _NotHookable(name, "its input was modified in place after the call")
                        result = layer_squares(layer, layer_calls, memory_budget=self.memory_budget)
                        for key in keys:
                            value = result[key.rsplit(".", 1)[-1][: -len("_mu")]]
                            squares[key] = squares[key] + value if key in squares else value
                    for c in layer_calls:  # the next cotangent's gradients
                        c.grads.clear()
            for name in silent:
                for key in self.layers[name][1]:
                    squares.pop(key, None)
            return out.detach(), squares, silent
        finally:
            self._calls = None


class _NotHookable(RuntimeError):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def layer_squares(layer: nn.Module, calls: list[_Call], *, memory_budget: int) -> dict[str, Tensor]:
    """``sum_n grad_n^2`` of ``weight`` (and ``bias``) from the recorded calls of one layer."""
    cols = _cat([_columns(layer, c.input) for c in calls])  # [B, K, L]
    grads = _cat([_output_grads(layer, c.grads[0]) for c in calls])  # [B, C_out, L]
    dtype = torch.promote_types(cols.dtype, torch.float32)
    cols, grads = cols.to(dtype), grads.to(dtype)
    batch, k, length = cols.shape
    c_out = grads.shape[1]
    if grads.shape[-1] != length:
        raise RuntimeError(f"internal: {length} input patches and {grads.shape[-1]} output positions")
    groups = getattr(layer, "groups", 1)
    a = cols.reshape(batch, groups, k // groups, length)
    g = grads.reshape(batch, groups, c_out // groups, length)
    quadratic = length * length <= length + QUADRATIC_MARGIN
    per_example = (length * length * (k + c_out)) if quadratic else (c_out * k // groups + k + c_out)
    chunk = max(1, memory_budget // max(1, per_example * cols.element_size()))
    total = torch.zeros(groups, c_out // groups, k // groups, dtype=dtype, device=cols.device)
    for start in range(0, batch, chunk):
        a_part, g_part = a[start : start + chunk], g[start : start + chunk]
        if quadratic:
            aa = (a_part.unsqueeze(-1) * a_part.unsqueeze(-2)).flatten(-2)
            gg = (g_part.unsqueeze(-1) * g_part.unsqueeze(-2)).flatten(-2)
            total += torch.einsum("bgos,bgks->gok", gg, aa)
        else:
            total += torch.einsum("bgol,bgkl->bgok", g_part, a_part).square_().sum(0)
    weight = layer._parameters["weight_mu"]
    out = {"weight": total.reshape(weight.shape)}  # type: ignore[union-attr]
    if layer._parameters.get("bias_mu") is not None:
        out["bias"] = grads.sum(-1).square().sum(0)
    return out


def _cat(parts: list[Tensor]) -> Tensor:
    """The calls of a layer side by side on the position axis (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _columns(layer: nn.Module, a: Tensor) -> Tensor:
    """The layer's input as ``[B, K, L]``: features for Linear, unfolded patches for a conv."""
    batch = a.shape[0]
    if isinstance(layer, BayesLinear):
        return a.reshape(batch, -1, a.shape[-1]).transpose(1, 2)
    conv: nn.Conv2d = layer  # type: ignore[assignment]
    pad = list(conv._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, pad, mode=mode)
    return _patches(a, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))  # type: ignore[arg-type]


def _patches(a: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
    """Unfold a padded ``[B, C, *spatial]`` input into ``[B, C * prod(kernel), L]``.

    One strided slice per kernel position, stacked: a plain copy (``F.unfold`` is several
    times slower on CPU, and 2-d only). The order matches the flattened weight ``[C, *kernel]``.
    """
    batch, channels = a.shape[:2]
    sizes = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(a.shape[2:], kernel, stride, dilation)]
    views = []
    for offsets in itertools.product(*(range(k) for k in kernel)):
        index = tuple(
            slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offsets, dilation, stride, sizes)
        )
        views.append(a[(slice(None), slice(None), *index)])
    return torch.stack(views, 2).reshape(batch, channels * len(views), -1)


def _output_grads(layer: nn.Module, g: Tensor) -> Tensor:
    """The output gradient as ``[B, C_out, L]``."""
    batch = g.shape[0]
    if isinstance(layer, BayesLinear):
        return g.reshape(batch, -1, g.shape[-1]).transpose(1, 2)
    return g.reshape(batch, g.shape[1], -1)
