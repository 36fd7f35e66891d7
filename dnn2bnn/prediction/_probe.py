"""Check, on the traced graph, that the stochastic part keeps the batch on dim 0, row by row.

Folding ``S`` draws into the batch (``[B * S, ...]``) is exact only if every operation of
the stochastic part has the batch on dim 0 and computes row ``b`` from input row ``b``
alone. Sequence-first models (``nn.LSTM``/``nn.Transformer`` default to ``[T, B, D]``: dim 0
is time), pooling or a softmax over dim 0, ``x.view(-1)`` and batch statistics break this,
and folding them would mix the draws. The graph is run in "mean" mode (deterministic) on
small batches built from the caller's rows:

* a *shape* probe at 3 and at 2 rows: dim 0 of every tensor computed in the stochastic part,
  crossing into it from the deterministic part, or returned, must be 3, then 2;
* a *row* probe of each operation of the stochastic part on its own: its batched inputs
  with rows ``[a, b, c]`` replaced by ``[a, c, c]`` must leave row 0 of its output unchanged,
  and by ``[b, b, c]`` row 2. This finds recurrences and attention along dim 0, which keep
  the shapes. Bayesian layers applied with batched draws are row-wise by construction, and
  a stochastic module called once per draw sees each draw's batch as the loop does: only
  their output shapes are checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx
from torch.fx.node import map_aggregate, map_arg
from torch.utils._pytree import tree_leaves

from dnn2bnn.prediction._io import ModelInputs, is_model_output
from dnn2bnn.prediction._vectorized import is_stochastic

if TYPE_CHECKING:
    from dnn2bnn.prediction._split import SplitPlan

__all__ = ["check_batch_axis", "model_output_type"]

#: Relative tolerance of the row probe (the same row computed in two batches of equal size).
ROW_RTOL = 1e-4

#: Rows ``[a, b, c]`` become these, and this row of the output must not change.
_PERTURBATIONS = (([0, 2, 2], 0), ([1, 1, 2], 2))


def check_batch_axis(plan: SplitPlan, inputs: ModelInputs) -> str | None:
    """``None`` if folding is exact for ``plan`` on inputs like ``inputs``, else why not."""
    pool = _pool(inputs)
    try:
        two = _Recorder(plan, check_rows=False)
        two.probe(_rows(pool, [0, 1]))
        three = _Recorder(plan, check_rows=True, at_two=two.seen)
        three.probe(_rows(pool, [0, 1, 2]))
    except Exception as exc:  # noqa: BLE001 - any failure: the loop is the reference
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return (
            "the batch-axis probe (the graph on 3 and 2 rows in 'mean' mode) failed "
            f"({type(exc).__name__}: {first})"
        )
    plan.shared = frozenset(three.shared)
    for node, value in three.seen.items():
        if node in three.shared:
            continue
        for index, leaf in enumerate(_tensors(value) if node.op == "output" else [value]):
            if not isinstance(leaf, Tensor):
                continue
            small = _leaf(two.seen[node], node, index)
            if leaf.dim() == 0 or leaf.shape[0] != 3 or small.dim() == 0 or small.shape[0] != 2:
                return (
                    f"{_where(node, index)} does not have the batch on dim 0 (shape "
                    f"{tuple(leaf.shape)} for a batch of 3 rows, {tuple(small.shape)} for 2): "
                    "folding the samples into dim 0 would mix them (sequence-first layout "
                    "[T, B, ...], a reduction or view over dim 0, ...)"
                )
    if three.mixing is not None:
        node, row = three.mixing
        if row is None:
            return (
                f"{_where(node, 0)} gives another result each time it runs on the same input "
                "(random: dropout with training=True, sampling), so the probe cannot check that "
                "it keeps the rows apart"
            )
        return (
            f"{_where(node, 0)} mixes rows along dim 0: row {row} of its output changes when "
            "another row of its input changes (a sequence-first layout [T, B, ...], attention, "
            "a recurrence, pooling or batch statistics over dim 0), so the samples cannot be "
            "folded into dim 0"
        )
    return None


def model_output_type(plan: SplitPlan, inputs: ModelInputs) -> type | None:
    """The Hugging Face ``ModelOutput`` class the model returns, or ``None``.

    torch.fx records such an output as a plain dict; the real model, called once on two rows
    in "mean" mode, says which class to rebuild (so that its ``logits`` are found).
    """
    from dnn2bnn.prediction._split import means_for_tracing

    with torch.no_grad(), means_for_tracing(plan.module):
        out = _rows(_pool(inputs), [0, 1])(plan.module)
    return type(out) if is_model_output(out) else None


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


#: How many of the caller's rows are searched for three distinct ones.
POOL_SEARCH_ROWS = 64


def _pool(inputs: ModelInputs) -> ModelInputs:
    """Three distinct rows: the caller's first distinct ones, completed by perturbed copies.

    Identical rows would hide a mixing operation (a recurrence over left-padded sequences):
    a float row is completed with Gaussian noise of its own scale, an integer row (token
    ids) is rolled along its last dim. The noise comes from a local generator: the caller's
    random stream is not touched.
    """
    tensors = [v for v in (*inputs.args, *inputs.kwargs.values()) if _batched(v)]
    picked: list[int] = []
    for i in range(min(inputs.batch_size, POOL_SEARCH_ROWS)):
        if all(not all(torch.equal(t[i], t[j]) for t in tensors) for j in picked):
            picked.append(i)
        if len(picked) == 3:
            break
    generator = torch.Generator().manual_seed(0)

    def complete(v: Any) -> Any:
        if not _batched(v):
            return v
        rows = [v[picked]]
        for k in range(1, 4 - len(picked)):
            first = v[picked[0]:picked[0] + 1]
            if first.is_floating_point():
                scale = first.float().std(correction=0).nan_to_num(0.0).item() or 1.0
                noise = torch.randn(first.shape, generator=generator).to(first.device, first.dtype)
                rows.append(first + noise * scale)
            else:
                rows.append(first.roll(k, dims=-1))
        return torch.cat(rows)

    return ModelInputs(
        tuple(complete(a) for a in inputs.args), {k: complete(v) for k, v in inputs.kwargs.items()}
    )


def _batched(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0


def _rows(pool: ModelInputs, index: list[int]) -> ModelInputs:
    def take(v: Any) -> Any:
        return v[index] if isinstance(v, Tensor) and v.dim() > 0 else v

    return ModelInputs(tuple(take(a) for a in pool.args), {k: take(v) for k, v in pool.kwargs.items()})


class _Recorder(fx.Interpreter):
    """Runs the graph, keeps the values whose shapes are checked and row-probes each
    operation of the stochastic part (see the module docstring)."""

    def __init__(
        self, plan: SplitPlan, *, check_rows: bool, at_two: dict[fx.Node, Any] | None = None
    ) -> None:
        super().__init__(plan.module, graph=plan.graph)
        self.plan = plan
        self.check_rows = check_rows
        #: the values kept by the probe on 2 rows (which frontier values follow the batch)
        self.at_two = at_two or {}
        #: frontier values of the input whose shapes do not follow the batch (see _shared)
        self.shared: set[fx.Node] = set()
        self.keep = {n for n in plan.stochastic if n.op != "output"} | {
            n for n in plan.frontier if n in plan.batched
        }
        self.seen: dict[fx.Node, Any] = {}
        # found before the probe switches every layer to "mean" mode
        modules = dict(plan.module.named_modules())
        self.sampled_calls = {
            n for n in plan.stochastic
            if n.op == "call_module" and is_stochastic(modules[str(n.target)])
        }
        #: the first node found mixing rows, and the row that changed (None: the node is random)
        self.mixing: tuple[fx.Node, int | None] | None = None

    def probe(self, inputs: ModelInputs) -> None:
        from dnn2bnn.prediction._split import means_for_tracing

        with torch.no_grad(), means_for_tracing(self.plan.module):
            self.run(*self.plan.placeholder_values(inputs))

    def run_node(self, n: fx.Node) -> Any:
        probe = self.check_rows and self.mixing is None and self._row_probed(n)
        saved = {a: map_aggregate(self.env[a], _clone) for a in n.all_input_nodes} if probe else {}
        value = super().run_node(n)
        if n in self.keep or n.op == "output":
            self.seen[n] = map_aggregate(value, _clone)
            if n in self.at_two and n not in self.plan.stochastic and _shared(value, self.at_two[n]):
                self.shared.add(n)
        if probe:
            row = self._mixed_row(n, saved, value)
            if row is not None:  # the op mixes rows, or is random (judged only then: cheap)
                self.mixing = (n, row if self._repeatable(n, saved, value) else None)
        return value

    def _row_probed(self, n: fx.Node) -> bool:
        if n not in self.plan.stochastic or n.op not in ("call_function", "call_method", "call_module"):
            return False
        return n not in self.sampled_calls

    def _repeatable(self, n: fx.Node, saved: dict[fx.Node, Any], value: Any) -> bool:
        """Whether ``n`` run again on the same inputs gives the same result (not random)."""
        def fresh(a: fx.Node) -> Any:  # copies: an in-place op (out += x) must not change saved
            return map_aggregate(saved[a], _clone)

        args = map_arg(n.args, fresh)
        kwargs = map_arg(n.kwargs, fresh)
        with self._set_current_node(n):
            try:
                again = getattr(self, n.op)(n.target, args, kwargs)
            except Exception:  # noqa: BLE001 - judged by the row probe
                return True
        return all(_same(a, b) for a, b in zip(_tensors(value), _tensors(again)))

    def _mixed_row(self, n: fx.Node, saved: dict[fx.Node, Any], value: Any) -> int | None:
        batched = self.plan.batched
        for index, row in _PERTURBATIONS:
            def fetch(a: fx.Node, index: list[int] = index) -> Any:
                v = saved[a]
                if a in batched and a not in self.shared:
                    return map_aggregate(v, lambda t: _take(t, index))
                return v

            args = map_arg(n.args, fetch)
            kwargs = map_arg(n.kwargs, fetch)
            with self._set_current_node(n):
                try:
                    changed = getattr(self, n.op)(n.target, args, kwargs)
                except Exception:  # noqa: BLE001 - an op that needs its own rows: not row-wise
                    return row
            for before, after in zip(_tensors(value), _tensors(changed)):
                if before.dim() and before.shape[0] == 3 and not _same(before[row], after[row]):
                    return row
        return None


def _shared(at_three: Any, at_two: Any) -> bool:
    """Whether a value crossing into the stochastic part has the same tensor shapes for 3
    and 2 rows: computed from the input's shape (a causal mask ``[T, T]``, positions
    ``[T]``) or a statistic of the whole batch, not per row. It is passed to the folded
    part as it is (computed once on the real batch, as in each pass of the loop), not
    repeated per draw."""
    three, two = _tensors(at_three), _tensors(at_two)
    if not three or len(three) != len(two) or len(three) != len(tree_leaves(at_three)):
        return False
    return all(a.shape == b.shape for a, b in zip(three, two))


def _take(value: Any, index: list[int]) -> Any:
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == 3:
        return value[index]
    return value


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value
