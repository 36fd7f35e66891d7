"""Several Monte Carlo weight draws of one Bayesian layer, applied in one batched call.

Layout: a *folded* batch holds ``S`` copies of a batch of ``B`` inputs, batch-major, as
``[B * S, ...]`` (row ``b * S + s`` is input ``b`` under weight draw ``s``). This layout
makes a convolution over all draws free of copies: ``[B * S, C, ...]`` is viewed as
``[B, S * C, ...]`` and convolved with the ``S`` weight draws stacked as ``S * groups``
groups (on CPU, where oneDNN's grouped kernels are slower, one ordinary convolution per
draw on a strided slice instead). A linear layer applies the draws with one batched matrix
product.

Only the built-in layers whose ``forward`` is torch's own are handled here; any other
stochastic module is run once per draw on its slice of the folded batch
(:func:`per_draw_call`), which is exact but not batched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import map_aggregate

from dnn2bnn.layers._base import BayesianLayer, BayesMode, is_bayesian_layer

__all__ = ["FoldError", "WeightDraws", "is_stochastic", "per_draw_call", "vectorizable"]

_CONV_FUNCTIONS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}
_SUPPORTED: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV_FUNCTIONS)


class FoldError(RuntimeError):
    """The model cannot run on a folded batch; the caller falls back to the plain loop."""


class Shared:
    """A value of the folded pass that is the same for every draw (not folded: a causal
    mask computed from the input's shape); :func:`per_draw_call` passes it whole."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    @staticmethod
    def unwrap(value: Any) -> Any:
        return value.value if isinstance(value, Shared) else value


def _samples(layer: nn.Module) -> bool:
    """Whether ``layer`` is a Bayesian layer that draws weights (not in "mean" mode)."""
    if isinstance(layer, BayesianLayer):
        return layer.bayes_mode != BayesMode.MEAN
    return is_bayesian_layer(layer)


def is_stochastic(module: nn.Module) -> bool:
    """Whether calling ``module`` draws from a posterior (it or a submodule samples)."""
    return any(_samples(m) for m in module.modules())


def _torch_base(layer: nn.Module) -> type[nn.Module] | None:
    """The torch.nn class whose ``forward`` ``layer`` runs, or ``None`` if it runs its own.

    ``BayesianLayer.forward`` (the estimators' dispatch) counts as the torch forward: any
    estimator samples from the same per-input predictive as explicit weight draws.
    """
    allowed = {vars(BayesianLayer).get("forward"), *(t.forward for t in _SUPPORTED)}
    for cls in type(layer).__mro__:
        if cls in _SUPPORTED:
            return cls
        forward = vars(cls).get("forward")
        if forward is not None and forward not in allowed:
            return None
    return None


def vectorizable(layer: nn.Module) -> bool:
    """Whether :class:`WeightDraws` can apply several draws of ``layer`` in one call."""
    return (
        isinstance(layer, BayesianLayer)
        and layer.bayes_mode != BayesMode.MEAN
        and _torch_base(layer) is not None
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
    )


class WeightDraws:
    """``S`` weight draws per Bayesian layer for one forward pass over a folded batch.

    ``softplus(rho)`` is computed once per layer for the lifetime of this object (one
    :func:`dnn2bnn.predict` call); the ``S`` draws of a layer come from one ``randn`` call and
    are shared by every use of the layer within a pass (:meth:`new_pass` starts a new one).
    """

    def __init__(self, num_samples: int, sigmas: dict[int, dict[str, Tensor]] | None = None) -> None:
        self.num_samples = num_samples
        #: softplus(rho) per layer; pass the dict of another WeightDraws to share it.
        self._sigmas: dict[int, dict[str, Tensor]] = {} if sigmas is None else sigmas
        self._draws: dict[int, dict[str, Tensor | None]] = {}
        self._caches: dict[int, list[dict[str, Tensor]]] = {}
        #: ids of Linear layers called once per pass: sampled by local reparameterization.
        self.local: frozenset[int] = frozenset()

    def new_pass(self) -> None:
        """Forget the draws of the previous pass (the sigmas are kept)."""
        self._draws.clear()
        self._caches.clear()

    def draws(self, layer: BayesianLayer) -> dict[str, Tensor | None]:
        """``{name: [S, *shape] tensor}`` for each Bayesian parameter of ``layer``."""
        key = id(layer)
        if key not in self._draws:
            sigmas = self._sigmas.setdefault(key, {})
            out: dict[str, Tensor | None] = {}
            for name in layer.bayes_params:
                mu = layer._parameters[name + "_mu"]
                if mu is None:
                    out[name] = None
                    continue
                if name not in sigmas:  # float32 or wider, as the layer's own sampling
                    sigmas[name] = layer.posterior_sigma(name)
                sigma = sigmas[name]
                shape = (self.num_samples, *mu.shape)
                eps = torch.randn(shape, dtype=sigma.dtype, device=mu.device)
                out[name] = eps.mul_(sigma).add_(mu).to(mu.dtype)
            self._draws[key] = out
        return self._draws[key]

    def apply(self, layer: BayesianLayer, x: Tensor) -> Tensor:
        """``layer`` on the folded batch ``x`` (``[B * S, ...]``), draw ``s`` on rows ``b*S+s``."""
        base = _torch_base(layer)
        s = self.num_samples
        if x.dim() < 2 or x.shape[0] % s:
            raise FoldError(f"{type(layer).__name__} got an input of shape {tuple(x.shape)}")
        if base is nn.Linear and x.dim() == 2 and id(layer) in self.local:
            return self._linear_local(layer, x)
        draws = self.draws(layer)
        weight, bias = draws["weight"], draws.get("bias")
        if weight is None:
            raise FoldError(f"{type(layer).__name__} has no weight")
        if base is nn.Linear:
            return _linear(x, weight, bias, s)
        return _conv(layer, _CONV_FUNCTIONS[base], x, weight, bias, s)  # type: ignore[index]

    def _linear_local(self, layer: BayesianLayer, x: Tensor) -> Tensor:
        """Local reparameterization: each output unit ``N(x mu^T, x^2 (sigma^2)^T)``.

        For a 2-d input this is the exact distribution of each row's output under a weight
        draw of its own, at the cost of two matrix products and one normal per output
        instead of ``S`` weight draws. Rows of the same draw ``s`` then no longer share one
        weight sample, which does not change any per-input predictive statistic.
        """
        sigmas = self._sigmas.setdefault(id(layer), {})
        squares: dict[str, Tensor | None] = {}
        for name in ("weight", "bias"):
            mu = layer._parameters.get(name + "_mu")
            if mu is None:
                squares[name] = None
                continue
            if name not in sigmas:
                sigmas[name] = layer.posterior_sigma(name)
            squares[name] = sigmas[name].square().to(x.dtype)
        mean = F.linear(x, layer._parameters["weight_mu"], layer._parameters.get("bias_mu"))
        var = F.linear(x.square(), squares["weight"], squares["bias"])  # type: ignore[arg-type]
        return mean + var.clamp_min(0).sqrt() * torch.randn_like(mean)

    def sample_caches(self, layer: BayesianLayer) -> list[dict[str, Tensor]]:
        """One ``_sample_cache`` per draw, so a layer used twice in a pass reuses its sample."""
        return self._caches.setdefault(id(layer), [{} for _ in range(self.num_samples)])


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, s: int) -> Tensor:
    b = x.shape[0] // s
    inner = x.shape[1:-1]
    # [B, S, M, in] -> [S, B*M, in]: one batched product per draw.
    xs = x.reshape(b, s, -1, x.shape[-1]).transpose(0, 1).reshape(s, -1, x.shape[-1])
    wt = weight.transpose(1, 2)
    out = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, wt)
    out = out.reshape(s, b, -1, weight.shape[1]).transpose(0, 1)
    return out.reshape(b * s, *inner, weight.shape[1])


def _conv(
    layer: nn.Module,
    conv: Callable[..., Tensor],
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    s: int,
) -> Tensor:
    b = x.shape[0] // s
    xg = x.reshape(b, s * x.shape[1], *x.shape[2:])  # a view: folding is batch-major
    padding: Any = layer.padding
    if layer.padding_mode != "zeros":
        xg = F.pad(xg, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    if _per_draw_conv(x):
        xs = xg.reshape(b, s, -1, *xg.shape[2:])
        outs = [
            conv(xs[:, i], weight[i], None if bias is None else bias[i], layer.stride, padding,
                 layer.dilation, layer.groups)
            for i in range(s)
        ]
        out = torch.stack(outs, dim=1)  # [B, S, C_out, ...]
        return out.reshape(b * s, *out.shape[2:])
    out = conv(
        xg,
        weight.reshape(-1, *weight.shape[2:]),
        None if bias is None else bias.reshape(-1),
        layer.stride,
        padding,
        layer.dilation,
        layer.groups * s,
    )
    return out.reshape(b * s, weight.shape[1], *out.shape[2:])


#: On CPU a convolution's S draws run as S ordinary convolutions on strided slices of the
#: folded batch: oneDNN's grouped kernels (one convolution of ``S * groups`` groups, the
#: path on other devices) were slower there for every layer shape of LeNet-5 and ResNet-18
#: measured (``benchmarks/bench_predict.py``).
CPU_PER_DRAW_CONV = True


def _per_draw_conv(x: Tensor) -> bool:
    return CPU_PER_DRAW_CONV and x.device.type == "cpu"


def per_draw_call(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], draws: WeightDraws
) -> Any:
    """Call ``module`` once per draw on its slice of the folded batch and fold the results.

    Bayesian layers inside ``module`` draw their own sample on each call; one drawn for
    draw ``s`` is reused if the same layer is read again during this pass.
    """
    s = draws.num_samples
    folded: list[int] = []

    def slice_of(index: int) -> Callable[[Any], Any]:
        def take(value: Any) -> Any:
            if isinstance(value, Shared):
                return value.value
            if isinstance(value, Tensor) and value.dim() > 0:
                if value.shape[0] % s:
                    raise FoldError(
                        f"{type(module).__name__} got an input of shape {tuple(value.shape)}"
                    )
                folded.append(1)
                draws_view = value.reshape(value.shape[0] // s, s, *value.shape[1:])
                return draws_view[:, index].contiguous()
            return value

        return take

    layers = [m for m in module.modules() if isinstance(m, BayesianLayer)]
    previous = [m._sample_cache for m in layers]
    results = []
    try:
        for index in range(s):
            for layer in layers:
                layer._sample_cache = draws.sample_caches(layer)[index]
            take = slice_of(index)
            results.append(module(*map_aggregate(args, take), **map_aggregate(kwargs, take)))
    finally:
        for layer, cache in zip(layers, previous):
            layer._sample_cache = cache
    if not folded:
        raise FoldError(f"{type(module).__name__} got no batched tensor input")
    return _stack_draws(results)


def _stack_draws(results: list[Any]) -> Any:
    first = results[0]
    if isinstance(first, Tensor):
        stacked = torch.stack(results, dim=1)  # [B, S, ...]
        return stacked.reshape(-1, *stacked.shape[2:])
    if isinstance(first, (tuple, list)):
        return type(first)(_stack_draws([r[i] for r in results]) for i in range(len(first)))
    if first is None:
        return None
    raise FoldError(f"cannot fold a module output of type {type(first).__name__}")
