"""Check, on the traced graph, that the stochastic part keeps the batch on dim 0, row by row.

Folding ``S`` draws into the batch (``[B * S, ...]``) is exact only if every value of the
stochastic part has the batch on dim 0 and computes row ``b`` from input row ``b`` alone.
Sequence-first models (``nn.LSTM``/``nn.Transformer`` default to ``[T, B, D]``: dim 0 is
time), pooling or a softmax over dim 0, ``x.view(-1)`` and batch statistics break this, and
folding them would mix the draws. The graph is run in "mean" mode (deterministic) on small
batches built from the caller's rows:

* a *shape* probe at 3 and at 2 rows: dim 0 of every checked tensor must be 3, then 2;
* a *row* probe: rows ``[a, b, c]`` against ``[a, c, c]`` (row 0 of every checked tensor must
  not change) and against ``[b, b, c]`` (row 2 must not change): this finds recurrences and
  attention along dim 0, which keep the shapes.

Checked are the tensors computed in the stochastic part (their rows), the tensors that cross
into it from the deterministic part (their shapes: mixing rows there is harmless, it runs
once on the real batch) and the tensors in the model output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx
from torch.utils._pytree import tree_leaves

from dnn2bnn.prediction._io import ModelInputs

if TYPE_CHECKING:
    from dnn2bnn.prediction._split import SplitPlan

__all__ = ["check_batch_axis"]

#: Relative tolerance of the row probe (the same row computed in two batches of equal size).
ROW_RTOL = 1e-4


def check_batch_axis(plan: SplitPlan, inputs: ModelInputs) -> str | None:
    """``None`` if folding is exact for ``plan`` on inputs like ``inputs``, else why not."""
    pool = _pool(inputs)
    try:
        base = _values(plan, _rows(pool, [0, 1, 2]))
        two = _values(plan, _rows(pool, [0, 1]))
        first_changed = _values(plan, _rows(pool, [0, 2, 2]))
        last_changed = _values(plan, _rows(pool, [1, 1, 2]))
    except Exception as exc:  # noqa: BLE001 - any failure: the loop is the reference
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"the batch-axis probe (3 and 2 rows, 'mean' mode) failed ({type(exc).__name__}: {first})"
    for node, value in base.items():
        for index, leaf in enumerate(_tensors(value) if node.op == "output" else [value]):
            if not isinstance(leaf, Tensor):
                continue
            where = _where(node, index)
            small = _leaf(two[node], node, index)
            if leaf.dim() == 0 or leaf.shape[0] != 3 or small.dim() == 0 or small.shape[0] != 2:
                return (
                    f"{where} does not have the batch on dim 0 (shape {tuple(leaf.shape)} for a "
                    f"batch of 3 rows, {tuple(small.shape)} for 2): folding the samples into "
                    "dim 0 would mix them (sequence-first layout [T, B, ...], a reduction or "
                    "view over dim 0, ...)"
                )
            if node not in plan.stochastic:
                continue
            for row, other in ((0, first_changed), (2, last_changed)):
                if not _same(leaf[row], _leaf(other[node], node, index)[row]):
                    return (
                        f"{where} (shape {tuple(leaf.shape)}) mixes rows along dim 0: its row "
                        f"{row} changes when another input row changes (a sequence-first "
                        "layout [T, B, ...], attention, pooling or batch statistics over dim 0), "
                        "so the samples cannot be folded into dim 0"
                    )
    return None


def _where(node: fx.Node, index: int) -> str:
    if node.op == "output":
        return f"the model output (tensor {index})"
    if node.op == "call_module":
        return f"the output of {node.target} (node {node.name})"
    return f"node {node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"


def _leaf(value: Any, node: fx.Node, index: int) -> Any:
    return _tensors(value)[index] if node.op == "output" else value


def _tensors(value: Any) -> list[Tensor]:
    return [v for v in tree_leaves(value) if isinstance(v, Tensor)]


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return bool(torch.equal(a, b))
    scale = a.abs().max().item() if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=ROW_RTOL, atol=ROW_RTOL * scale + 1e-6, equal_nan=True))


def _pool(inputs: ModelInputs) -> ModelInputs:
    """At least three rows: the caller's, then copies rolled along the last dim."""
    def grow(v: Any) -> Any:
        if not isinstance(v, Tensor) or v.dim() == 0:
            return v
        rows = [v[:3]]
        shift = 1
        while sum(r.shape[0] for r in rows) < 3:
            rows.append(v.roll(shift, dims=-1)[: 3 - sum(r.shape[0] for r in rows)])
            shift += 1
        return torch.cat(rows)

    return ModelInputs(
        tuple(grow(a) for a in inputs.args), {k: grow(v) for k, v in inputs.kwargs.items()}
    )


def _rows(pool: ModelInputs, index: list[int]) -> ModelInputs:
    def take(v: Any) -> Any:
        return v[index] if isinstance(v, Tensor) and v.dim() > 0 else v

    return ModelInputs(tuple(take(a) for a in pool.args), {k: take(v) for k, v in pool.kwargs.items()})


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of the nodes to check."""

    def __init__(self, plan: SplitPlan, keep: set[fx.Node]) -> None:
        super().__init__(plan.module, graph=plan.graph)
        self.keep = keep
        self.seen: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.keep:
            self.seen[n] = value
        if n.op == "output":
            self.seen[n] = value
        return value


def _values(plan: SplitPlan, inputs: ModelInputs) -> dict[fx.Node, Any]:
    from dnn2bnn.prediction._split import means_for_tracing

    keep = {n for n in plan.stochastic if n.op != "output"} | {
        n for n in plan.frontier if n in plan.batched
    }
    recorder = _Recorder(plan, keep)
    with torch.no_grad(), means_for_tracing(plan.module):
        recorder.run(*plan.placeholder_values(inputs))
    return recorder.seen
