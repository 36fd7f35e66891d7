"""Several Monte Carlo weight draws of one Bayesian layer, applied in one batched call.

Layout: a *folded* batch holds ``S`` copies of a batch of ``B`` inputs, batch-major, as
``[B * S, ...]`` (row ``b * S + s`` is input ``b`` under weight draw ``s``). This layout
makes a convolution over all draws free of copies: ``[B * S, C, ...]`` is viewed as
``[B, S * C, ...]`` and convolved with the ``S`` weight draws stacked as ``S * groups``
groups (on CPU, where oneDNN's grouped kernels are slower, one ordinary convolution per
draw on a strided slice instead). A linear layer applies the draws with one batched matrix
product, or samples its outputs by local reparameterization when a cost model of FLOPs,
normals and elementwise passes says that is cheaper (:func:`linear_plan`).

A layer whose input comes straight from the deterministic part (the same ``[B, ...]`` value
for every draw) gets that value unrepeated: local reparameterization then computes its two
matrix products on ``B`` rows instead of ``B * S``, and a per-draw convolution reads it
contiguously.

Only the built-in layers whose ``forward`` is torch's own are handled here; any other
stochastic module is run once per draw on its slice of the folded batch
(:func:`per_draw_call`), which is exact but not batched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import map_aggregate

from dnn2bnn.layers._base import BayesianLayer, BayesMode, is_bayesian_layer

__all__ = [
    "DeviceCosts",
    "FoldError",
    "WeightDraws",
    "is_stochastic",
    "linear_plan",
    "per_draw_call",
    "vectorizable",
]

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


@dataclass(frozen=True)
class DeviceCosts:
    """Rough seconds per unit of work on one device type, for :func:`linear_plan`.

    Only their ratios matter. Fixed constants, not timings taken at run time, so that the
    same seed always takes the same path and draws the same numbers.
    """

    #: one floating-point operation of a matrix product (a multiply-add counts 2)
    flop: float
    #: one standard normal drawn by ``torch.randn``
    normal: float
    #: one element of an elementwise pass (read + write)
    element: float


#: Measured on the benchmark CPU (one thread, AVX-512, torch 2.14): matrix products at about
#: 80 GFLOP/s, ``torch.randn`` about 4 ns per number (a Mersenne twister feeding Box-Muller),
#: elementwise passes about 0.5 ns per element. On CUDA ``randn`` (Philox) is memory-bound.
COSTS: dict[str, DeviceCosts] = {
    "cpu": DeviceCosts(flop=1.25e-11, normal=4e-9, element=5e-10),
    "cuda": DeviceCosts(flop=2e-14, normal=1e-11, element=5e-12),
}


def linear_plan(
    *, rows: int, input_rows: int, samples: int, in_features: int, out_features: int,
    device: str = "cpu",
) -> Literal["local", "weights"]:
    """How a Bayesian Linear layer applies ``samples`` draws to ``rows`` folded rows: the cheaper
    of local reparameterization (``"local"``) and per-draw weights (``"weights"``).

    ``input_rows`` is ``rows // samples`` when the input is the same deterministic value for
    every draw (local reparameterization then multiplies only those rows), else ``rows``.
    ``device`` is a ``torch.device`` type; other accelerators than CUDA use its constants.

    * local: two matrix products of ``input_rows x in x out``, ``rows x out`` normals, about
      five elementwise passes over the output and one over the input;
    * weights: ``samples x in x out`` normals and two elementwise passes over the drawn
      weights (scale, shift), one batched product of ``rows x in x out``, a copy of the input
      and of the output to and from the draw-major layout.

    Example:
        >>> linear_plan(rows=16 * 8, input_rows=16 * 8, samples=16, in_features=1200, out_features=1200)
        'local'
        >>> linear_plan(rows=16 * 4096, input_rows=16 * 4096, samples=16, in_features=64, out_features=64)
        'weights'
    """
    c = COSTS.get(device, COSTS["cuda"])
    io = in_features * out_features
    local = (
        c.flop * 4 * input_rows * io
        + c.normal * rows * out_features
        + c.element * (5 * rows * out_features + input_rows * in_features)
    )
    weights = (
        (c.normal + 2 * c.element) * samples * io
        + c.flop * 2 * rows * io
        + c.element * (rows * in_features + rows * out_features)
    )
    return "local" if local <= weights else "weights"


class WeightDraws:
    """``S`` weight draws per Bayesian layer for one forward pass over a folded batch.

    ``sigma(rho)`` is computed once per layer for the lifetime of this object (one
    :func:`dnn2bnn.predict` call); the ``S`` draws of a layer come from one ``randn`` call and
    are shared by every use of the layer within a pass (:meth:`new_pass` starts a new one).
    """

    def __init__(
        self,
        num_samples: int,
        sigmas: dict[int, dict[str, Tensor]] | None = None,
        moments: dict[int, tuple[Tensor, Tensor, Tensor]] | None = None,
    ) -> None:
        self.num_samples = num_samples
        #: sigma(rho) per layer; pass the dict of another WeightDraws to share it.
        self._sigmas: dict[int, dict[str, Tensor]] = {} if sigmas is None else sigmas
        #: per layer, (input, mean, std) of local reparameterization on an unrepeated input;
        #: share it only between the chunks of draws of ONE batch: it is keyed on the input
        #: tensor's identity, which a loader that refills one buffer keeps for new values.
        self._moments: dict[int, tuple[Tensor, Tensor, Tensor]] = {} if moments is None else moments
        self._draws: dict[int, dict[str, Tensor | None]] = {}
        self._caches: dict[int, list[dict[str, Tensor]]] = {}
        #: ids of Linear and Conv layers called once per pass: local reparameterization is
        #: exact for a Linear on 2-d input and a Conv with one output position per example,
        #: and used there where :func:`linear_plan` finds it cheaper.
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
                if name not in sigmas:
                    sigmas[name] = _layer_sigma(layer, name)
                out[name] = _draw(mu, sigmas[name], self.num_samples, self._buffer(sigmas, name))
            self._draws[key] = out
        return self._draws[key]

    def _buffer(self, sigmas: dict[str, Tensor], name: str) -> Tensor:
        """``[S, *shape]`` storage for the draws of parameter ``name``, kept with its sigma for
        the whole :func:`dnn2bnn.predict` call: every chunk of draws and every batch writes
        into the same memory (a fresh allocation of this size costs page faults on the CPU
        that made ResNet-18's draws 1.35x slower than the same normals drawn into fresh
        tensors by a plain loop). The draws of a
        pass are consumed within that pass, before the next one overwrites them."""
        key = "draws:" + name
        sigma = sigmas[name]
        buffer = sigmas.get(key)
        if buffer is None or buffer.shape[0] < self.num_samples:
            buffer = torch.empty((self.num_samples, *sigma.shape), dtype=sigma.dtype, device=sigma.device)
            sigmas[key] = buffer
        return buffer[: self.num_samples]

    def apply(self, layer: BayesianLayer, x: Tensor, *, repeated: bool = False) -> Tensor:
        """``layer`` on the folded batch ``x`` (``[B * S, ...]``), draw ``s`` on rows ``b*S+s``.

        With ``repeated=True``, ``x`` is the unfolded ``[B, ...]`` value that every draw reads
        (a value from the deterministic part); the result is folded all the same.
        """
        base = _torch_base(layer)
        s = self.num_samples
        if x.dim() < 2 or (not repeated and x.shape[0] % s):
            raise FoldError(f"{type(layer).__name__} got an input of shape {tuple(x.shape)}")
        op = _exact_local_op(layer, base, x) if id(layer) in self.local else None
        if op is not None:
            weight_mu = layer._parameters["weight_mu"]
            plan = linear_plan(
                rows=x.shape[0] * (s if repeated else 1), input_rows=x.shape[0], samples=s,
                in_features=weight_mu[0].numel(), out_features=weight_mu.shape[0],
                device=x.device.type,
            )
            if plan == "local":
                return self._local(layer, x, repeated, op)
        draws = self.draws(layer)
        weight, bias = draws["weight"], draws.get("bias")
        if weight is None:
            raise FoldError(f"{type(layer).__name__} has no weight")
        if base is nn.Linear:
            return _linear(_repeat(x, s) if repeated else x, weight, bias, s)
        return _conv(layer, _CONV_FUNCTIONS[base], x, weight, bias, s, repeated)  # type: ignore[index]

    def _local(
        self, layer: BayesianLayer, x: Tensor, repeated: bool,
        op: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    ) -> Tensor:
        """Local reparameterization: each output unit ``N(op(x, mu), op(x^2, sigma^2))``.

        For a Linear layer on 2-d input, and for a convolution with ONE output position per
        example (:func:`_one_position`), this is the exact distribution of each row's output
        under a weight draw of its own: every output unit of a row reads weights of its own
        (no weight is shared between two outputs of one row), so under a mean-field posterior
        the units are independent and their joint distribution is exact too. It costs two
        products (``op``) and one normal per output instead of ``S`` weight draws. Rows of
        the same draw ``s`` then no longer share one weight sample: every per-input
        predictive statistic is unchanged, joint statistics across inputs are not. With
        ``repeated`` the two products run on the ``B`` unrepeated rows (once per batch:
        later chunks of draws of the same batch reuse them).
        """
        sigmas = self._sigmas.setdefault(id(layer), {})
        held = self._moments.get(id(layer)) if repeated else None
        if held is not None and held[0] is x:
            mean, std = held[1], held[2]
        else:
            # The variance in float32 or wider, as the layer's own sampling, also under
            # autocast: sigma^2 underflows in float16 (1e-4 squared is 0: no spread at all).
            wide = torch.promote_types(x.dtype, torch.float32)
            squares: dict[str, Tensor | None] = {}
            for name in ("weight", "bias"):
                mu = layer._parameters.get(name + "_mu")
                if mu is None:
                    squares[name] = None
                    continue
                if name not in sigmas:
                    sigmas[name] = _layer_sigma(layer, name)
                if name + "^2" not in sigmas:  # once per predict call, as the sigmas
                    sigmas[name + "^2"] = sigmas[name].square().to(wide)
                squares[name] = sigmas[name + "^2"]
            mean = op(x, layer._parameters["weight_mu"], layer._parameters.get("bias_mu"))
            with torch.autocast(x.device.type, enabled=False):  # not recast to float16
                var = op(x.to(wide).square(), squares["weight"], squares["bias"])  # type: ignore[arg-type]
            std = var.clamp_min_(0).sqrt_().to(x.dtype)
            if repeated:  # keyed on the input tensor itself (held, so its id is not reused)
                self._moments[id(layer)] = (x, mean, std)
        if not repeated:
            return torch.randn_like(mean).mul_(std).add_(mean)
        s = self.num_samples
        eps = torch.randn(mean.shape[0], s, *mean.shape[1:], dtype=mean.dtype, device=mean.device)
        return eps.mul_(std.unsqueeze(1)).add_(mean.unsqueeze(1)).reshape(-1, *mean.shape[1:])

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


def _layer_sigma(layer: BayesianLayer, name: str) -> Tensor:
    """The posterior standard deviation of ``layer``'s parameter ``name``, float32 or wider
    (as the layer's own sampling), in the layer's own parametrization."""
    sigma = layer.posterior_sigma(name)
    assert sigma is not None  # callers skip parameters without a mean
    return sigma


#: A tensor of at least this many elements is drawn one draw at a time (each draw's noise,
#: scale and shift stay in cache instead of three passes over ``S`` copies in memory; on the
#: benchmark CPU one ``randn`` over 16 draws of a ResNet-18 layer cost 1.5x 16 per-draw ones).
SLICED_DRAW_NUMEL = 2**16


def _draw(mu: Tensor, sigma: Tensor, s: int, out: Tensor | None = None) -> Tensor:
    """``[S, *mu.shape]`` draws ``mu + sigma * eps`` in the dtype of ``mu``, written into
    ``out`` (``[S, *mu.shape]`` in the dtype of ``sigma``) if given."""
    if torch.is_grad_enabled() and mu.requires_grad:  # differentiable: no out= arguments
        eps = torch.randn((s, *mu.shape), dtype=sigma.dtype, device=mu.device)
        return (mu + sigma * eps).to(mu.dtype)
    if out is None:
        out = torch.empty((s, *mu.shape), dtype=sigma.dtype, device=mu.device)
    if mu.numel() < SLICED_DRAW_NUMEL or mu.device.type != "cpu":
        return torch.addcmul(mu, sigma, out.normal_(), out=out).to(mu.dtype)
    for draw in out:
        torch.addcmul(mu, sigma, draw.normal_(), out=draw)
    return out.to(mu.dtype)


def _exact_local_op(
    layer: nn.Module, base: type[nn.Module] | None, x: Tensor
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor] | None:
    """``(x, weight, bias) -> output`` of ``layer`` where local reparameterization is exact for
    the input ``x`` (a Linear on 2-d input, a convolution with one output position), else None."""
    if base is nn.Linear and x.dim() == 2:
        return F.linear
    if base in _CONV_FUNCTIONS and _one_position(layer, x):
        return _conv_function(layer, base)  # type: ignore[arg-type]
    return None


def _one_position(layer: nn.Module, x: Tensor) -> bool:
    """Whether the convolution ``layer`` gives ONE output position per example of ``x``
    (``[N, C, *spatial]``): each output channel then reads every weight of its own once."""
    spatial = x.shape[2:]
    if len(spatial) != len(layer.kernel_size):
        return False
    padding = layer.padding
    if isinstance(padding, str):  # "same" keeps the input's size, "valid" pads nothing
        if padding == "same":
            return all(n == 1 for n in spatial)
        padding = (0,) * len(spatial)
    for n, k, st, p, d in zip(spatial, layer.kernel_size, layer.stride, padding, layer.dilation):
        if (n + 2 * p - d * (k - 1) - 1) // st + 1 != 1:
            return False
    return True


def _conv_function(layer: nn.Module, base: type[nn.Module]) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """``(x, weight, bias) -> layer's convolution`` with its stride, padding and groups."""
    conv = _CONV_FUNCTIONS[base]

    def op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x, padding = _padded(layer, x)
        return conv(x, weight, bias, layer.stride, padding, layer.dilation, layer.groups)

    return op


def _padded(layer: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
    """``x`` padded as the convolution ``layer`` pads it, and the padding left to the
    convolution itself (all of it for "zeros", none for the other padding modes)."""
    if layer.padding_mode == "zeros":
        return x, layer.padding
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0


def _repeat(x: Tensor, s: int) -> Tensor:
    """``[B, ...]`` -> ``[B * S, ...]``, each row ``S`` times (batch-major folding)."""
    return x.unsqueeze(1).expand(x.shape[0], s, *x.shape[1:]).reshape(-1, *x.shape[1:])


def _conv(
    layer: nn.Module,
    conv: Callable[..., Tensor],
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    s: int,
    repeated: bool = False,
) -> Tensor:
    if repeated and layer.groups == 1:
        # Every draw reads the same input: ONE ordinary convolution with the S draws stacked
        # as output channels gives [B, S * C_out, ...], which is the folded [B * S, C_out, ...]
        # as it is (batch-major), without repeating the input or stacking the outputs.
        x, padding = _padded(layer, x)
        out = conv(
            x,
            weight.reshape(-1, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            layer.stride,
            padding,
            layer.dilation,
            1,
        )
        return out.reshape(x.shape[0] * s, weight.shape[1], *out.shape[2:])
    if repeated:
        x = _repeat(x, s)
    b = x.shape[0] // s
    xg, padding = _padded(layer, x.reshape(b, s * x.shape[1], *x.shape[2:]))  # a view: batch-major
    if _per_draw_conv(x):
        if s == 1:  # one draw (a CPU chunk of one): an ordinary convolution, no stacking copy
            return conv(xg, weight[0], None if bias is None else bias[0], layer.stride, padding,
                        layer.dilation, layer.groups)
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
