"""The diagonal curvature of the per-example negative log-likelihood at the posterior means.

For a network ``f(x; theta)`` and a per-example negative log-likelihood ``l(f, y)`` the
generalized Gauss-Newton matrix of one example is ``J^T H J`` with ``J = df/dtheta`` and
``H`` the Hessian of ``l`` in the outputs. ``H`` is written as a weighted sum of outer
products of output cotangents, ``H = sum_j w_j v_j v_j^T``, so that the GGN diagonal is
``sum_j w_j (J^T v_j)^2``, and each ``J^T v_j`` is one vector-Jacobian product:

* softmax cross-entropy, exact: ``v_c = p - e_c`` with weight ``p_c`` for each class ``c``
  (``sum_c p_c (p - e_c)(p - e_c)^T = diag(p) - p p^T``); C products per example;
* softmax cross-entropy, Fisher: ``v = p - e_y`` for labels ``y`` drawn from the model
  (one product per example and sample: an unbiased estimate of the same diagonal);
* Gaussian likelihood with noise ``sigma``: ``v_k = e_k / sigma`` for each output (exact)
  or ``v = z / sigma`` with ``z ~ N(0, I)`` (Fisher).

The products run at the posterior means (the model in "mean" and eval mode), per layer:

* Linear and convolution layers: from one batched forward pass and one backward pass per
  cotangent, through forward and tensor hooks (:mod:`dnn2bnn.posterior._per_example`);
  checked against ``torch.func`` on the first two examples of the data, a layer that
  disagrees takes the path below for the whole fit;
* every other layer: per example under ``torch.func.vmap`` (vjp), for its own parameters
  only, in chunks whose per-example gradients fit ``memory_budget`` bytes.

:attr:`CurvatureResult.methods` says which path each layer took. The per-example squares
are summed at once: this is not the square of mini-batch gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from dnn2bnn.posterior._per_example import PerExampleSquares, _NotHookable, hook_reason

__all__ = ["Curvature", "CurvatureResult", "Likelihood", "diagonal_curvature"]

#: Default bound on the per-example gradients held at once (bytes).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


class Likelihood(str, Enum):
    """The per-example likelihood: softmax cross-entropy (class dim 1) or a Gaussian."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class Curvature(str, Enum):
    """Exact GGN diagonal, or the Fisher diagonal with targets sampled from the model."""

    GGN = "ggn"
    FISHER = "fisher"


@dataclass
class CurvatureResult:
    """Sums over the examples seen (all ranks under torch.distributed)."""

    #: Qualified name of each posterior mean (``"fc.weight_mu"``) -> summed GGN diagonal.
    diag: dict[str, Tensor]
    num_examples: int
    #: Summed negative log-likelihood of the examples at the posterior means.
    nll: float
    #: Per Bayesian layer (qualified name): ``"hooks"`` (per-example squares from one batched
    #: backward pass) or ``"vmap (reason)"`` (``torch.func`` per example).
    methods: dict[str, str] = field(default_factory=dict)


def diagonal_curvature(
    model: nn.Module,
    means: dict[str, Tensor],
    batches: Iterable[tuple[Any, Tensor]],
    *,
    likelihood: Likelihood,
    curvature: Curvature,
    mc_samples: int = 1,
    noise_sigma: float = 1.0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    generator: torch.Generator | None = None,
) -> CurvatureResult:
    """Sum of per-example diagonal GGN (or sampled Fisher) over ``batches``.

    The model must already be in eval mode with its Bayesian layers in "mean" mode; the
    tensors in ``means`` (keyed by qualified parameter name) are the point of expansion.

    Args:
        model: the network.
        means: the parameters to differentiate, by qualified name (other parameters fixed).
        batches: ``(input, target)`` pairs, input a tensor whose dim 0 is the batch.
        likelihood: see :class:`Likelihood`.
        curvature: see :class:`Curvature`.
        mc_samples: targets drawn per example for the Fisher.
        noise_sigma: standard deviation of the Gaussian likelihood (regression).
        memory_budget: bytes of per-example gradients held at once on the vmap path, and of
            per-example products per layer on the hook path (sets the chunk sizes).
        generator: random generator for the Fisher's sampled targets.

    Returns:
        A :class:`CurvatureResult`.
    """
    params = {k: v.detach() for k, v in means.items()}
    diag = {k: torch.zeros_like(v, dtype=torch.promote_types(v.dtype, torch.float32)) for k, v in params.items()}
    methods: dict[str, str] = {}
    hooks = PerExampleSquares(model, _hookable_layers(model, params, methods), memory_budget=memory_budget)
    count, nll = 0, 0.0
    probed = not hooks.layers

    def cotangents(out: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal nll
        out = _check_output(out, x)
        nll += float(_nll(out.detach(), y, likelihood, noise_sigma))
        return _cotangents(out.detach(), likelihood, curvature, mc_samples, noise_sigma, generator)

    with hooks.hooked():
        for x, y in batches:
            if not probed:
                _probe(model, params, hooks, x, methods, memory_budget)
                probed = True
            squares: dict[str, Tensor] = {}
            if hooks.layers:
                squares, (vs, ws) = _hooked_squares(hooks, params, x, lambda out: cotangents(out, x, y), methods)
            else:
                with torch.no_grad():
                    out = functional_call(model, params, (x,), strict=False)
                vs, ws = cotangents(out, x, y)
            hooked = set(hooks.keys)
            rest = [k for k in params if k not in hooked]
            if rest:
                squares.update(_vmap_squares(model, params, rest, x, vs, ws, memory_budget))
            for k, value in squares.items():
                diag[k] += value
            count += x.shape[0]
    for name in {k.rsplit(".", 1)[0] if "." in k else "" for k in params}:
        methods.setdefault(name, "vmap")
    result = CurvatureResult(diag=diag, num_examples=count, nll=nll, methods=dict(sorted(methods.items())))
    return _all_reduce(result)


def _hookable_layers(
    model: nn.Module, params: dict[str, Tensor], methods: dict[str, str]
) -> dict[str, tuple[nn.Module, list[str]]]:
    """The layers whose keys in ``params`` the hooks can compute; ``methods`` gets the others' reasons."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    layers = {}
    for name, layer in model.named_modules():
        prefix = f"{name}." if name else ""
        keys = [f"{prefix}{p}_mu" for p in getattr(layer, "bayes_params", ()) if f"{prefix}{p}_mu" in params]
        if not keys:
            continue
        reason = hook_reason(layer)
        if reason is None and any(counts.get(id(layer._parameters[k[len(prefix):]]), 0) > 1 for k in keys):
            reason = "its posterior mean is shared with another module"
        if reason is None:
            layers[name] = (layer, keys)
        else:
            methods[name] = f"vmap ({reason})"
    return layers


def _hooked_squares(
    hooks: PerExampleSquares,
    params: dict[str, Tensor],
    x: Tensor,
    cotangents: Callable[[Tensor], tuple[Tensor, Tensor]],
    methods: dict[str, str],
) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor]]:
    """Hooked squares of one batch and its cotangents.

    A layer found unfit for hooks here goes to vmap and the batch reruns (with the same
    cotangents: ``cotangents`` is called once, so the sampled targets and the NLL count once).
    """
    cached: list[tuple[Tensor, Tensor]] = []

    def once(out: Tensor) -> tuple[Tensor, Tensor]:
        if not cached:
            cached.append(cotangents(out))
        return cached[0]

    while True:
        try:
            _, squares, silent = hooks.run(params, x, once)
        except _NotHookable as exc:
            _to_vmap(hooks, methods, exc.name, exc.reason)
            if not hooks.layers:
                if not cached:
                    with torch.no_grad():
                        once(functional_call(hooks.model, params, (x,), strict=False))
                return {}, cached[0]
            continue
        if silent:
            raise RuntimeError(
                f"fit_posterior: the gradient hooks of layer(s) {sorted(silent)} did not fire on this batch "
                "although they did on the first one; expected the same graph for every batch"
            )
        return squares, cached[0]


def _probe(
    model: nn.Module,
    params: dict[str, Tensor],
    hooks: PerExampleSquares,
    x: Tensor,
    methods: dict[str, str],
    memory_budget: int,
) -> None:
    """Check the hooks against ``torch.func`` on the first examples; layers that disagree go to vmap.

    The cotangent is a fixed random one (its own generator: the caller's sampled targets are
    not touched). With 2+ examples this also catches networks that mix the examples of a batch.
    """
    part = x[: min(2, x.shape[0])]
    with torch.no_grad():
        out = functional_call(model, params, (part,), strict=False)
    if not (isinstance(out, Tensor) and bool(torch.isfinite(out).all())):
        return  # the batch's own output check names the problem
    local = torch.Generator(device=part.device).manual_seed(1234)

    def cotangents(out: Tensor) -> tuple[Tensor, Tensor]:
        noise = torch.randn(out.shape, generator=local, dtype=torch.float32, device=out.device).to(out.dtype)
        return noise.unsqueeze(1), torch.ones(out.shape[0], 1, dtype=out.dtype, device=out.device)

    while hooks.layers:
        local.manual_seed(1234)
        try:
            _, squares, silent = hooks.run(params, part, cotangents)
        except _NotHookable as exc:
            _to_vmap(hooks, methods, exc.name, exc.reason)
            continue
        if silent - hooks.needs_leaf:
            hooks.needs_leaf |= silent
            continue
        for name in silent:
            _to_vmap(hooks, methods, name, "its gradient hooks did not fire")
        break
    if not hooks.layers:
        return
    local.manual_seed(1234)
    vs, ws = cotangents(out)
    reference = _vmap_squares(model, params, hooks.keys, part, vs, ws, memory_budget)
    for name in list(hooks.layers):
        keys = hooks.layers[name][1]
        if all(_close(squares[k], reference[k]) for k in keys):
            methods[name] = "hooks"
        else:
            _to_vmap(hooks, methods, name, "hooks disagreed with torch.func on the first examples")


def _to_vmap(hooks: PerExampleSquares, methods: dict[str, str], name: str, reason: str) -> None:
    """Take layer ``name`` off the hooks for the rest of the fit and record why."""
    hooks.drop(name)
    methods[name] = f"vmap ({reason})"


def _close(value: Tensor, reference: Tensor) -> bool:
    """Agreement up to the precision of ``reference``'s dtype (float16/bfloat16 models: the
    hooks sum in float32, ``torch.func`` in the model's dtype, about ``eps`` of the scale apart)."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    eps = torch.finfo(reference.dtype).eps if reference.is_floating_point() else 0.0
    rtol = max(1e-3, 4 * eps)
    atol = max(1e-5, 4 * eps) * scale + 1e-30
    return bool(torch.allclose(value.to(reference.dtype), reference, rtol=rtol, atol=atol))


def _vmap_squares(
    model: nn.Module,
    params: dict[str, Tensor],
    keys: list[str],
    x: Tensor,
    vs: Tensor,
    ws: Tensor,
    memory_budget: int,
) -> dict[str, Tensor]:
    """``sum_n sum_j w_j (grad_n^T v_j)^2`` of ``keys`` by ``torch.func`` (vmap over examples of vjp)."""
    wrt = {k: params[k] for k in keys}
    numel = sum(v.numel() for v in wrt.values())
    itemsize = max(v.element_size() for v in wrt.values())

    def single(p: dict[str, Tensor], xn: Tensor) -> Tensor:
        return functional_call(model, {**params, **p}, (xn.unsqueeze(0),), strict=False).squeeze(0)

    def per_example(xn: Tensor, v: Tensor, w: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda p: single(p, xn), wrt)
        (grads,) = vmap(pullback)(v)
        return {k: torch.tensordot(w, g.to(w.dtype).square(), dims=1) for k, g in grads.items()}

    batched = vmap(per_example)
    chunk = max(1, memory_budget // max(1, vs.shape[1] * numel * itemsize * 2))
    totals: dict[str, Tensor] = {}
    for start in range(0, x.shape[0], chunk):
        part = slice(start, start + chunk)
        with torch.no_grad():  # torch.func's vjp still runs; no graph for other parameters
            squares = batched(x[part], vs[part], ws[part])
        for k, value in squares.items():
            totals[k] = totals[k] + value.sum(0) if k in totals else value.sum(0)
    return totals


def _check_output(out: Any, x: Tensor) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            "fit_posterior: the model must return a tensor (logits or the regression mean), "
            f"got {type(out).__name__}"
        )
    if out.dim() == 0 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"fit_posterior: expected an output with the batch dimension {x.shape[0]} first, "
            f"got shape {tuple(out.shape)}"
        )
    require_finite_output(out, x, "inputs", "(check the inputs for NaN/inf), else every sigma would be NaN")
    return out


def require_finite_output(out: Tensor, x: Tensor, inputs: str, advice: str) -> None:
    """Raise ``ValueError`` when the model's output at the posterior means on the batch ``x``
    of ``inputs`` holds NaN or inf; ``advice`` ends the message (what to check, what follows)."""
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(
            f"fit_posterior: the model's output at the posterior means holds {bad} NaN or infinite "
            f"value(s) of {out.numel()} for a batch of {x.shape[0]} {inputs}; expected finite outputs "
            f"{advice}"
        )


def _cotangents(
    out: Tensor,
    likelihood: Likelihood,
    curvature: Curvature,
    mc_samples: int,
    noise_sigma: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Output cotangents ``[B, J, *out]`` and their weights ``[B, J]`` (see the module doc)."""
    batch = out.shape[0]
    out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    if likelihood is Likelihood.CLASSIFICATION:
        if out.dim() < 2:
            raise ValueError(
                "fit_posterior: a classifier must return logits [batch, classes, ...], got "
                f"shape {tuple(out.shape)}"
            )
        probs = out.softmax(dim=1)
        classes = out.shape[1]
        if curvature is Curvature.GGN:
            if out.dim() != 2:
                raise ValueError(
                    "fit_posterior: the exact GGN needs logits [batch, classes], got shape "
                    f"{tuple(out.shape)}; use curvature='fisher' for outputs with more dimensions"
                )
            eye = torch.eye(classes, dtype=probs.dtype, device=probs.device)
            vs = probs.unsqueeze(1) - eye  # [B, C(j), C]
            return vs, probs
        flat = probs.movedim(1, -1).reshape(-1, classes)
        draws = torch.multinomial(flat, mc_samples, replacement=True, generator=generator)
        onehot = F.one_hot(draws.T, classes).to(probs.dtype)  # [S, B*..., C]
        onehot = onehot.reshape(mc_samples, *probs.movedim(1, -1).shape).movedim(-1, 2)
        vs = probs.unsqueeze(1) - onehot.transpose(0, 1)
        ws = torch.full((batch, mc_samples), 1.0 / mc_samples, dtype=probs.dtype, device=out.device)
        return vs, ws
    if curvature is Curvature.GGN:
        size = out[0].numel()
        eye = torch.eye(size, dtype=out.dtype, device=out.device) / noise_sigma
        vs = eye.reshape(size, *out.shape[1:]).expand(batch, size, *out.shape[1:])
        return vs, torch.ones(batch, size, dtype=out.dtype, device=out.device)
    shape = (batch, mc_samples, *out.shape[1:])
    noise = torch.randn(shape, dtype=out.dtype, device=out.device, generator=generator)
    ws = torch.full((batch, mc_samples), 1.0 / mc_samples, dtype=out.dtype, device=out.device)
    return noise / noise_sigma, ws


def check_class_targets(out: Tensor, target: Tensor, *, what: str = "data") -> Tensor:
    """Raise unless ``out`` holds logits of 2+ classes on dim 1 and ``target`` class indices.

    Without this a regression model fitted with the default likelihood is silently wrong:
    ``F.cross_entropy`` reads float targets as class probabilities, and a single logit has
    zero softmax curvature, so every sigma becomes the prior's width. Returns the targets as
    ``int64`` (any integer dtype is accepted, as class indices).
    """
    if out.dim() < 2 or out.shape[1] < 2:
        raise ValueError(
            "fit_posterior: likelihood='classification' expects logits with at least 2 classes "
            f"on dim 1, got output shape {tuple(out.shape)} (a single logit has no softmax "
            "curvature); for a regression model pass likelihood='regression'"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"fit_posterior: likelihood='classification' expects {what} targets of class indices "
            f"(an integer tensor), got {target.dtype} targets of shape {tuple(target.shape)}; "
            "for a regression model pass likelihood='regression'"
        )
    expected = (out.shape[0], *out.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"fit_posterior: {what} targets must be class indices of shape {expected} (the logits' "
            f"shape {tuple(out.shape)} without the class dim 1), got shape {tuple(target.shape)}"
            + ("; one-hot targets need target.argmax(1)" if tuple(target.shape) == tuple(out.shape) else "")
            + (
                "; the classes are read on dim 1 (as F.cross_entropy): for logits with the classes "
                "last ([N, T, C]) fit a wrapper whose forward returns logits.movedim(-1, 1)"
                if out.dim() > 2 and tuple(target.shape) == tuple(out.shape[:-1])
                else ""
            )
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= out.shape[1]):
        raise ValueError(
            f"fit_posterior: {what} targets must be class indices in [0, {out.shape[1] - 1}] "
            f"(the model has {out.shape[1]} classes on dim 1), got values in "
            f"[{int(target.min())}, {int(target.max())}]"
        )
    return target.long()


def check_regression_targets(out: Tensor, target: Tensor, *, what: str = "data") -> Tensor:
    """``target`` as a finite float tensor shaped like ``out``; raise when it cannot be.

    Targets with the output's number of elements per example are reshaped (``[N]`` for an
    output ``[N, 1]``); NaN or infinite targets would make the held-out NLL NaN, and a NaN
    gain is never significant, so the temperature rule would keep the parent silently.
    """
    if target.shape[:1] != out.shape[:1] or target.numel() != out.numel():
        raise ValueError(
            f"fit_posterior: likelihood='regression' expects {what} targets shaped like the model's "
            f"output {tuple(out.shape)}, got shape {tuple(target.shape)}"
        )
    target = target.to(out.device, out.dtype).reshape(out.shape)
    if not bool(torch.isfinite(target).all()):
        bad = int((~torch.isfinite(target)).sum())
        raise ValueError(
            f"fit_posterior: {what} targets hold {bad} NaN or infinite value(s) of {target.numel()}; "
            "expected finite regression targets"
        )
    return target


def _nll(out: Tensor, target: Tensor, likelihood: Likelihood, noise_sigma: float) -> Tensor:
    """Summed negative log-likelihood of a batch."""
    return -log_likelihood(out.float(), target, likelihood, noise_sigma).sum()


def log_likelihood(
    out: Tensor, target: Tensor, likelihood: Likelihood, noise_sigma: float, *, what: str = "data"
) -> Tensor:
    """Per-example log-likelihood ``[B]`` of one network's outputs (targets checked first)."""
    target = target.to(out.device)
    if likelihood is Likelihood.CLASSIFICATION:
        target = check_class_targets(out, target, what=what)
        per = -F.cross_entropy(out, target, reduction="none")
        return per.reshape(out.shape[0], -1).sum(1)
    z = (check_regression_targets(out, target, what=what) - out) / noise_sigma
    per = -0.5 * z.square() - math.log(noise_sigma) - 0.5 * math.log(2 * math.pi)
    return per.reshape(out.shape[0], -1).sum(1)


def _all_reduce(result: CurvatureResult) -> CurvatureResult:
    """Sum the curvature, the count and the NLL across ranks under torch.distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return result
    for value in result.diag.values():
        dist.all_reduce(value)
    first = next(iter(result.diag.values()))
    totals = torch.tensor([float(result.num_examples), result.nll], dtype=torch.float64, device=first.device)
    dist.all_reduce(totals)
    return CurvatureResult(
        diag=result.diag, num_examples=int(totals[0]), nll=float(totals[1]), methods=result.methods
    )


def progress_bar(
    batches: Iterable[Any], *, total: int | None, enabled: bool, desc: str
) -> Iterator[Any]:
    """A tqdm bar over ``batches`` when ``enabled`` (on rank 0 only)."""
    from dnn2bnn.distributed import get_rank

    if not enabled or get_rank() != 0:
        yield from batches
        return
    from tqdm.auto import tqdm

    yield from tqdm(batches, total=total, desc=desc, unit="batch")

