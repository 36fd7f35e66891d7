"""Small models built from a *spec*: a JSON-able dict of plain values, drawn by _strategies.py.

:func:`build_model` builds the model of a spec deterministically (its weights come from
``spec["seed"]``), so a spec doubles as ``arch_kwargs`` for :func:`dnn2bnn.save_bnn`
(``arch="_generated:build_model"``). :func:`example_input` gives a matching input.

Families (``spec["family"]``) and the layouts of their hidden stream:

* ``"vector"``: ``[B, D]``; Linear layers, subclasses with their own forward, shared and
  aliased layers, ``F.linear``/``@``/``einsum`` on the model's own parameters.
* ``"seq-batch-first"``, ``"seq-first"``: ``[B, T, D]`` or ``[T, B, D]`` (the layout every
  attention/recurrent layer of the model is built for); the vector blocks plus
  ``nn.MultiheadAttention``, ``nn.LSTM``, ``nn.GRU`` and a Conv1d along time; the input is
  either features or token ids (an ``nn.Embedding`` stem); the head pools over time or
  predicts per position.
* ``"conv1d"``, ``"conv2d"``: ``[B, C, L]``/``[B, C, H, W]``; convolutions, transposed
  convolutions, a subclass, shared/aliased convolutions and ``F.conv*`` on own parameters.
* ``"sequential"``: a plain ``nn.Sequential`` of torch.nn layers (an MLP or a CNN), possibly
  holding one layer twice; it needs no ``arch`` to be rebuilt.

A spec other than ``"sequential"`` lists ``blocks`` (``{"kind": ..., options}``) between a stem
and a head, held in an ``nn.Sequential``, ``nn.ModuleList`` or ``nn.ModuleDict`` (``container``).
Blocks that read one weight twice in a forward can *probe*: a block spec with
``"probe": True`` returns ``(first, first - second)``, and the model then returns
``(output, gaps)`` with one row ``[max |first - second|, max |first|]`` per probing block,
which is zero in its first column when both reads saw one weight sample.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OwnWeight", "build_model", "example_input"]

IN_FEATURES = 5  # vector and sequence inputs
SEQ_LEN = 4
VOCAB = 7
CONV_IN = {1: 2, 2: 1}  # input channels per spatial dimensionality
CONV_SIZE = {1: 6, 2: 5}  # input length / height and width


def example_input(spec: dict[str, Any], batch: int = 3, *, seed: int = 0) -> torch.Tensor:
    """An input batch for the model of ``spec`` (batch on dim 0, or dim 1 for seq-first)."""
    g = torch.Generator().manual_seed(seed)
    family = spec["family"]
    if family == "sequential":
        if spec["variant"] == "mlp":
            return torch.randn(batch, IN_FEATURES, generator=g)
        return torch.randn(batch, 1, CONV_SIZE[2], CONV_SIZE[2], generator=g)
    if family.startswith("seq"):
        shape = (batch, SEQ_LEN) if family == "seq-batch-first" else (SEQ_LEN, batch)
        if spec["tokens"]:
            return torch.randint(0, VOCAB, shape, generator=g)
        return torch.randn(*shape, IN_FEATURES, generator=g)
    if family.startswith("conv"):
        dims = int(family[-2])
        return torch.randn(batch, CONV_IN[dims], *[CONV_SIZE[dims]] * dims, generator=g)
    return torch.randn(batch, IN_FEATURES, generator=g)


# ---------------------------------------------------------------------------- layers and blocks
class ScaledLinear(nn.Linear):
    """A subclass with its own forward that reads ``self.weight`` once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class TwiceLinear(nn.Linear):
    """A subclass whose forward reads ``self.weight`` twice (a cosine-classifier-like pattern)."""

    def __init__(self, *args: Any, probe: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe = probe

    def forward(self, x: torch.Tensor) -> Any:
        first = F.linear(x, self.weight, self.bias)
        second = F.linear(x, self.weight, self.bias)
        return (first, first - second) if self.probe else (first + second) / 2


class ScaledConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class ScaledConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


def _square_layer(dims: int, width: int) -> nn.Module:
    """A width-preserving Linear (dims 0) or ConvNd."""
    if dims == 0:
        return nn.Linear(width, width)
    return (nn.Conv1d, nn.Conv2d)[dims - 1](width, width, 3, padding=1)


class Shared(nn.Module):
    """One layer called twice (and a third time in normal mode)."""

    def __init__(self, dims: int, width: int, probe: bool) -> None:
        super().__init__()
        self.layer = _square_layer(dims, width)
        self.probe = probe

    def forward(self, x: torch.Tensor) -> Any:
        first = self.layer(x)
        if self.probe:
            return first, first - self.layer(x)
        return self.layer(torch.tanh(first))


class Alias(nn.Module):
    """One layer object registered under two names, each name called once."""

    def __init__(self, dims: int, width: int, probe: bool) -> None:
        super().__init__()
        self.first = _square_layer(dims, width)
        self.second = self.first
        self.probe = probe

    def forward(self, x: torch.Tensor) -> Any:
        first = self.first(x)
        if self.probe:
            return first, first - self.second(x)
        return self.second(torch.tanh(first))


class Mixed(nn.Module):
    """A layer called as a module and its weight read functionally in the same forward."""

    def __init__(self, dims: int, width: int, probe: bool) -> None:
        super().__init__()
        self.layer = _square_layer(dims, width)
        self.probe = probe

    def forward(self, x: torch.Tensor) -> Any:
        first = self.layer(x)
        if isinstance(self.layer, nn.Linear):
            second = F.linear(x, self.layer.weight, self.layer.bias)
        else:
            second = self.layer._conv_forward(x, self.layer.weight, self.layer.bias)
        if self.probe:
            return first, first - second
        return first + 0.5 * torch.tanh(second)


class OwnWeight(nn.Module):
    """A model-owned ``nn.Parameter`` used as a weight: ``F.linear``, ``@``, einsum, ``F.conv*``."""

    def __init__(self, how: str, width: int, probe: bool) -> None:
        super().__init__()
        self.how = how
        self.probe = probe
        if how == "f_conv1d":
            shape: tuple[int, ...] = (width, width, 3)
        elif how == "f_conv2d":
            shape = (width, width, 3, 3)
        else:
            shape = (width, width)
        fan_in = math.prod(shape[1:])
        self.W = nn.Parameter(torch.randn(shape) / math.sqrt(fan_in))

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "f_linear":
            return F.linear(x, self.W)
        if self.how == "matmul":
            return x @ self.W
        if self.how == "einsum":
            return torch.einsum("...i,oi->...o", x, self.W)
        if self.how == "f_conv1d":
            return F.conv1d(x, self.W, padding=1)
        return F.conv2d(x, self.W, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        first = self._apply_weight(x)
        if self.probe:
            return first, first - self._apply_weight(x)
        return first


class Activation(nn.Module):
    def __init__(self, fn: str) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}[self.fn](x)


class Attention(nn.Module):
    """Self-attention with a residual, in the model's layout."""

    def __init__(self, width: int, batch_first: bool, **options: Any) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, batch_first=batch_first, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x, x, x, need_weights=False)[0]


class Recurrent(nn.Module):
    def __init__(
        self, kind: str, width: int, bidirectional: bool, layers: int, batch_first: bool
    ) -> None:
        super().__init__()
        hidden = width // 2 if bidirectional else width
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(
            width, hidden, layers, bidirectional=bidirectional, batch_first=batch_first
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class ConvOverTime(nn.Module):
    """A Conv1d along the time axis of a ``[B, T, D]`` or ``[T, B, D]`` stream."""

    def __init__(self, width: int, batch_first: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.conv(x.permute(1, 2, 0)).permute(2, 0, 1)


def _make_block(
    block: dict[str, Any], *, dims: int, width: int, batch_first: bool, probe: bool
) -> nn.Module:
    kind = block["kind"]
    conv = (nn.Conv1d, nn.Conv2d)[dims - 1] if dims else None
    conv_t = (nn.ConvTranspose1d, nn.ConvTranspose2d)[dims - 1] if dims else None
    if kind == "linear":
        return nn.Linear(width, width, bias=block["bias"])
    if kind == "linear_scaled":
        return ScaledLinear(width, width)
    if kind == "linear_twice":
        return TwiceLinear(width, width, probe=probe)
    if kind == "shared":
        return Shared(dims, width, probe)
    if kind == "alias":
        return Alias(dims, width, probe)
    if kind == "mixed":
        return Mixed(dims, width, probe)
    if kind in ("f_linear", "matmul", "einsum"):
        return OwnWeight(kind, width, probe)
    if kind == "f_conv":
        return OwnWeight(f"f_conv{dims}d", width, probe)
    if kind == "act":
        return Activation(block["fn"])
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "mha":
        return Attention(
            width, batch_first, num_heads=block["heads"], bias=block["bias"],
            add_bias_kv=block["add_bias_kv"],
        )
    if kind in ("lstm", "gru"):
        return Recurrent(kind, width, block["bidirectional"], block["layers"], batch_first)
    if kind == "conv_time":
        return ConvOverTime(width, batch_first)
    groups = width if block.get("depthwise") else 1
    if kind == "conv":
        return conv(
            width, width, 3, padding=1, bias=block["bias"], groups=groups,
            padding_mode=block["padding_mode"],
        )
    if kind == "conv_t":
        return conv_t(width, width, 3, padding=1, bias=block["bias"], groups=groups)
    if kind == "conv_scaled":
        return (ScaledConv1d, ScaledConv2d)[dims - 1](width, width, 3, padding=1)
    raise ValueError(f"unknown block kind {kind!r}")


# ---------------------------------------------------------------------------- models
class Generated(nn.Module):
    """stem -> blocks (in a Sequential, ModuleList or ModuleDict) -> head."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        family = spec["family"]
        width = spec["width"]
        self.probe = any(b.get("probe", False) for b in spec["blocks"])
        self.batch_first = family != "seq-first"
        self.seq = family.startswith("seq")
        self.dims = int(family[-2]) if family.startswith("conv") else 0
        self.per_position = spec.get("head") == "per_position"
        if self.seq and spec["tokens"]:
            self.stem: nn.Module = nn.Embedding(VOCAB, width)
        elif self.dims:
            conv = (nn.Conv1d, nn.Conv2d)[self.dims - 1]
            self.stem = conv(CONV_IN[self.dims], width, 3, padding=1)
        else:
            self.stem = nn.Linear(IN_FEATURES, width)
        blocks = [
            _make_block(
                b, dims=self.dims, width=width, batch_first=self.batch_first,
                probe=b.get("probe", False),
            )
            for b in spec["blocks"]
        ]
        self.container = spec["container"]
        if self.container == "sequential":
            self.body: nn.Module = nn.Sequential(*blocks)
        elif self.container == "modulelist":
            self.body = nn.ModuleList(blocks)
        else:
            self.body = nn.ModuleDict({f"block{i}": b for i, b in enumerate(blocks)})
        self.head = nn.Linear(width, spec["out"])

    def _blocks(self) -> list[nn.Module]:
        return list(self.body.values()) if isinstance(self.body, nn.ModuleDict) else list(self.body)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.stem(x)
        gaps = []
        if self.container == "sequential" and not self.probe:
            h = self.body(h)
        else:
            for block in self._blocks():
                out = block(h)
                if getattr(block, "probe", False):
                    h, gap = out
                    gaps.append(torch.stack([gap.abs().amax(), h.abs().amax()]))
                else:
                    h = out
        if self.dims:
            h = h.mean(dim=tuple(range(2, 2 + self.dims)))
        elif self.seq and not self.per_position:
            h = h.mean(dim=1 if self.batch_first else 0)
        y = self.head(h)
        return (y, torch.stack(gaps)) if self.probe else y


def _sequential(spec: dict[str, Any]) -> nn.Sequential:
    width = spec["width"]
    squares: list[nn.Module] = []
    if spec["variant"] == "mlp":
        layers: list[nn.Module] = [nn.Linear(IN_FEATURES, width)]
        for kind in spec["layers"]:
            if kind == "linear" or (kind == "reuse" and not squares):
                squares.append(nn.Linear(width, width))
                layers.append(squares[-1])
            elif kind == "reuse":
                layers.append(squares[-1])
            else:
                layers.append(nn.ReLU() if kind == "relu" else nn.Tanh())
        return nn.Sequential(*layers, nn.Linear(width, spec["out"]))
    size = CONV_SIZE[2]
    layers = [nn.Conv2d(1, width, 3, padding=1)]
    for kind in spec["layers"]:
        if kind == "conv" or (kind == "reuse" and not squares):
            squares.append(nn.Conv2d(width, width, 3, padding=1))
            layers.append(squares[-1])
        elif kind == "reuse":
            layers.append(squares[-1])
        elif kind == "conv_t":
            layers.append(nn.ConvTranspose2d(width, width, 3, padding=1))
        else:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, spec["out"]))


def build_model(**spec: Any) -> nn.Module:
    """The model of ``spec``, in eval mode, its weights drawn from ``spec["seed"]``.

    The global torch RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = _sequential(spec) if spec["family"] == "sequential" else Generated(spec)
    return model.eval()
