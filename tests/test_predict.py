"""dnn2bnn.predict: uncertainty decomposition by hand, vectorized path against the plain loop."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dnn2bnn
from dnn2bnn import ClassificationPrediction, PredictionWarning, RegressionPrediction
from dnn2bnn.prediction._io import ModelInputs
from dnn2bnn.prediction._split import cached_plan, plan_split
from dnn2bnn.prediction._vectorized import WeightDraws

from tests.conftest import mlp


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- hand-computed results
def test_classification_decomposition_by_hand():
    # Two samples, probabilities (0.8, 0.2) and (0.2, 0.8): the mean is (0.5, 0.5).
    logits = torch.log(torch.tensor([[[0.8, 0.2]], [[0.2, 0.8]]]))
    pred = ClassificationPrediction.from_logits(logits, keep_samples=True)
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert pred.probs[0].tolist() == pytest.approx([0.5, 0.5])
    assert pred.predictive_entropy.item() == pytest.approx(math.log(2))
    assert pred.expected_entropy.item() == pytest.approx(h)
    assert pred.mutual_information.item() == pytest.approx(math.log(2) - h)
    assert pred.variance[0].tolist() == pytest.approx([0.18, 0.18])  # unbiased, S=2
    assert pred.samples.shape == (2, 1, 2) and pred.num_samples == 2


def test_agreeing_samples_have_no_epistemic_uncertainty():
    logits = torch.tensor([[3.0, 0.0, -1.0]]).expand(4, 1, 3)
    pred = ClassificationPrediction.from_logits(logits)
    assert pred.mutual_information.item() == pytest.approx(0.0, abs=1e-6)
    assert pred.expected_entropy.item() == pytest.approx(pred.predictive_entropy.item())
    assert pred.samples is None


def test_one_logit_is_binary_only_when_asked():
    logits = torch.tensor([[[0.0]], [[math.log(3.0)]]])
    pred = ClassificationPrediction.from_logits(logits, binary=True)
    assert pred.probs[0].tolist() == pytest.approx([0.375, 0.625])  # p1: mean of .5 and .75
    squeezed = ClassificationPrediction.from_logits(logits.squeeze(-1), binary=True)
    torch.testing.assert_close(squeezed.probs, pred.probs)
    with pytest.raises(ValueError, match="use task='binary'"):
        ClassificationPrediction.from_logits(logits)  # softmax over one logit: never guessed


def test_regression_conventions_by_hand():
    means = torch.tensor([[1.0], [3.0]])
    log_var = torch.log(torch.tensor([[1.0], [3.0]]))
    pred = RegressionPrediction.from_outputs((means, log_var))
    assert pred.mean.tolist() == [2.0]
    assert pred.epistemic_variance.tolist() == [2.0]
    assert pred.aleatoric_variance.tolist() == pytest.approx([2.0])
    assert pred.variance.tolist() == pytest.approx([4.0])
    normal = torch.distributions.Normal(means, log_var.exp().sqrt())
    assert RegressionPrediction.from_outputs(normal).variance.tolist() == pytest.approx([4.0])
    only_mean = RegressionPrediction.from_outputs(means)
    assert only_mean.aleatoric_variance is None and only_mean.variance.tolist() == [2.0]


# ---------------------------------------------------------------- the batched layers
@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(6, 4), (3, 6)),
        (nn.Linear(6, 4, bias=False), (3, 5, 6)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 9)),
        (nn.Conv2d(2, 4, 3, padding="same", dilation=2, padding_mode="reflect"), (3, 2, 7, 7)),
        (nn.Conv2d(3, 5, 2, stride=2, bias=False, padding_mode="circular", padding=1), (3, 3, 6, 6)),
        (nn.Conv3d(2, 3, 3, padding=1), (2, 2, 4, 4, 4)),
    ],
    ids=["linear", "linear-3d-input", "conv1d-groups", "conv2d-reflect", "conv2d-circular", "conv3d"],
)
@pytest.mark.parametrize("conv_path", ["grouped", "per-draw"])
def test_weight_draws_apply_each_draw_to_its_rows(layer, shape, conv_path, monkeypatch):
    from dnn2bnn.prediction import _vectorized

    monkeypatch.setattr(_vectorized, "CPU_PER_DRAW_CONV", conv_path == "per-draw")
    bnn = dnn2bnn.transform_to_bnn_layer(nn.Sequential(layer), type(layer), posterior_sigma_init=0.3)[0]
    draws = WeightDraws(5)
    x = torch.randn(shape[0] * 5, *shape[1:])
    out = draws.apply(bnn, x)
    sampled = draws.draws(bnn)
    plain = bnn.to_dnn()
    for s in range(5):
        with torch.no_grad():
            plain.weight.copy_(sampled["weight"][s])
            if plain.bias is not None:
                plain.bias.copy_(sampled["bias"][s])
        rows = torch.arange(shape[0]) * 5 + s  # batch-major folding
        torch.testing.assert_close(out[rows], plain(x[rows]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sampled["weight"][0], sampled["weight"][1])


# ---------------------------------------------------------------- vectorized == loop in distribution
class Residual(nn.Module):
    """A deterministic branch joins the stochastic one after the Bayesian layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(10, 16)
        self.head = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        return self.out(h + torch.relu(self.head(h)))


class Shared(nn.Module):
    """One layer applied twice: both uses must see the same weight sample."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.cls = nn.Linear(8, 3)

    def forward(self, x):
        return self.cls(self.fc(torch.relu(self.fc(x))))


class OwnForward(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * 2.0


class CustomLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.top = OwnForward(8, 3)

    def forward(self, x):
        return self.top(torch.relu(self.body(x)))


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3),
    )


def cnn_one_position():
    """The last convolution has one output position (6x6 input, 6x6 kernel): ``predict``
    samples its outputs by local reparameterization, exact there."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 6), nn.ReLU(), nn.Flatten(), nn.Linear(6, 3),
    )


CASES = {
    "mlp": (lambda: mlp((10, 16, 16, 3)), {}, lambda: torch.randn(6, 10)),
    "last-layer": (lambda: mlp((10, 16, 16, 3)), {"include": "4"}, lambda: torch.randn(6, 10)),
    "cnn": (small_cnn, {}, lambda: torch.randn(4, 1, 8, 8)),
    "cnn-one-position": (cnn_one_position, {}, lambda: torch.randn(4, 1, 8, 8)),
    "residual": (Residual, {"exclude": "stem"}, lambda: torch.randn(6, 10)),
    "shared": (Shared, {}, lambda: torch.randn(6, 8)),
    "own-forward": (CustomLayer, {}, lambda: torch.randn(6, 8)),
    # The loop runs the layers' estimators; the vectorized path draws weights explicitly.
    "mlp-flipout": (lambda: mlp((10, 16, 16, 3)), {"estimator": "flipout"}, lambda: torch.randn(6, 10)),
    "cnn-lrt": (small_cnn, {"estimator": "lrt"}, lambda: torch.randn(4, 1, 8, 8)),
}


@pytest.mark.parametrize("fold", ["at once", "in chunks"])
@pytest.mark.parametrize("case", list(CASES))
def test_vectorized_matches_loop_in_distribution(case, fold, monkeypatch):
    if fold == "in chunks":  # a 1-byte budget: CPU chunks of one draw each
        from dnn2bnn.prediction import _predict

        monkeypatch.setattr(_predict, "CPU_FOLD_BYTES", 1)
    build, options, make_input = CASES[case]
    bnn = dnn2bnn.transform_to_bnn_model(build(), posterior_sigma_init=0.1, **options)
    x = make_input()
    s = 200
    # task="regression" returns the raw output samples, the quantity compared here.
    fast = dnn2bnn.predict(bnn, x, s, task="regression", return_samples=True)
    slow = dnn2bnn.predict(bnn, x, s, task="regression", return_samples=True, method="loop")
    assert (fast.method, slow.method) == ("vectorized", "loop")
    a, b = fast.samples, slow.samples
    var_a, var_b = a.var(0), b.var(0)
    assert var_b.min() > 0
    # Means agree within 5 standard errors of their difference ...
    z = (a.mean(0) - b.mean(0)) / ((var_a + var_b) / s).sqrt()
    assert z.abs().max() < 5.0, z.abs().max()
    # ... and variances within 6 sd of a log-variance ratio (sd ~ sqrt(2/(S-1)) each, doubled
    # for the heavier tails of outputs that are nonlinear in the weights).
    log_ratio = (var_a / var_b).log()
    assert log_ratio.abs().max() < 6 * 2 * math.sqrt(2 * 2 / (s - 1)), log_ratio.abs().max()


# ---------------------------------------------------------------- batch axis: model families (issue 14 item 1)
class SeqFirstTagger(nn.Module):
    """The reproducer of issue 14 item 1: ``nn.LSTM`` defaults to ``[T, B, D]``."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=batch_first)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.lstm(torch.tanh(self.proj(x)))[0])


class BatchFirstClassifier(nn.Module):
    """A batch-first LSTM read at its last step: every value keeps the batch on dim 0."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.lstm(torch.tanh(self.proj(x)))[0][:, -1])


class PoolDim0(nn.Module):
    """A sequence-first model that pools over dim 0 (time) after a Bayesian layer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):  # x: [T, B, 8]
        return self.head(torch.tanh(self.proj(x)).mean(0))


class Encoder(nn.Module):
    """A Bayesian projection, then a transformer encoder, seq-first or batch-first."""

    def __init__(self, batch_first, bayesian_encoder=True):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)))


class CausalEncoder(nn.Module):
    """A batch-first causal (GPT-like) encoder: the mask ``[T, T]`` comes from the input's
    length and crosses into the stochastic part without a batch dim (D2-5)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.layer(self.proj(x), src_mask=mask, is_causal=True))


class CausalAttention(nn.Module):
    """Hand-written causal attention: the mask meets Bayesian scores in ``masked_fill``."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        future = nn.Transformer.generate_square_subsequent_mask(x.shape[1]).isinf()
        scores = (self.q(x) @ self.k(x).transpose(1, 2)).masked_fill(future, float("-inf"))
        return self.head(scores.softmax(-1) @ x)


class WholeBatchScale(nn.Module):
    """A statistic of the whole batch computed before the first Bayesian layer: the loop and
    the folded pass both use its value on the real batch."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)) / x.std())


class AlwaysOnDropout(nn.Module):
    """MC dropout written into forward: random, so the row probe cannot judge it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(F.dropout(torch.relu(self.proj(x)), 0.5, training=True))


def test_a_random_operation_is_named_as_random_not_as_mixing_rows():
    # D2-9: the warning blamed "a sequence-first layout, attention, a recurrence ..." for dropout.
    bnn = dnn2bnn.transform_to_bnn_model(AlwaysOnDropout())
    with pytest.warns(PredictionWarning, match="node dropout .* gives another result each time it runs"):
        assert dnn2bnn.predict(bnn, torch.randn(4, 8), 4).method == "loop"
    # in-place operations (add_, ReLU(inplace=True)) are run again on copies: still vectorized
    resnet = dnn2bnn.transform_to_bnn_model(Residual())
    assert dnn2bnn.predict(resnet, torch.randn(4, 8), 4).method == "vectorized"


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out = self.fc(x).add_(x)  # in place (fx records `out += x` as an out-of-place add)
        return self.head(self.relu(out))


FAMILIES = {
    # name: (build, conversion options, input, expected method of "auto")
    "mlp": (lambda: mlp((10, 16, 16, 3)), {}, (6, 10), "vectorized"),
    "cnn": (small_cnn, {}, (4, 1, 8, 8), "vectorized"),
    "lstm-seq-first": (SeqFirstTagger, {}, (5, 3, 8), "loop"),
    "lstm-batch-first": (BatchFirstClassifier, {}, (3, 5, 8), "vectorized"),
    "lstm-seq-first-bayesian": (SeqFirstTagger, {"layer_types": (nn.Linear, nn.LSTM)}, (5, 3, 8), "vectorized"),
    "pool-dim-0": (PoolDim0, {}, (5, 3, 8), "loop"),
    # the encoder is Bayesian: called once per draw, each draw sees its own [T, B, D] batch
    "encoder-seq-first": (lambda: Encoder(False), {}, (5, 3, 8), "vectorized"),
    "encoder-batch-first": (lambda: Encoder(True), {}, (3, 5, 8), "vectorized"),
    # the encoder is deterministic: it runs on the folded batch and mixes dim 0 (time)
    "encoder-seq-first-deterministic": (lambda: Encoder(False), {"exclude": "encoder.*"}, (5, 3, 8), "loop"),
    "encoder-batch-first-deterministic": (lambda: Encoder(True), {"exclude": "encoder.*"}, (3, 5, 8), "vectorized"),
    # values of the input that are not per row: passed whole to the folded part (D2-5)
    "causal-encoder": (CausalEncoder, {}, (3, 5, 8), "vectorized"),
    "causal-attention-len-3": (CausalAttention, {}, (4, 3, 8), "vectorized"),  # T = the probe's 3 rows
    "whole-batch-statistic": (WholeBatchScale, {}, (4, 8), "vectorized"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_matches_the_loop_in_distribution_for_every_layout(family):
    """Vectorized where the batch is on dim 0 and rows stay apart, else the loop with a
    warning; never different from the loop in distribution (the reproducer's means were
    4-5 standard errors apart)."""
    build, options, shape, expected = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)
        bnn = dnn2bnn.transform_to_bnn_model(build(), posterior_sigma_init=0.2, **options)
    x = torch.randn(*shape)
    s = 300
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = dnn2bnn.predict(bnn, x, s, task="regression", return_samples=True)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, PredictionWarning)]
    slow = dnn2bnn.predict(bnn, x, s, task="regression", return_samples=True, method="loop")
    assert fast.method == expected, fallbacks
    if expected == "loop":
        assert len(fallbacks) == 1 and "dim 0" in fallbacks[0], fallbacks
    else:
        assert not fallbacks
    a, b = fast.samples, slow.samples
    var_a, var_b = a.var(0), b.var(0)
    assert var_b.min() > 0
    z = (a.mean(0) - b.mean(0)) / ((var_a + var_b) / s).sqrt()
    assert z.abs().max() < 5.0, z.abs().max()
    log_ratio = (var_a / var_b).log()
    assert log_ratio.abs().max() < 6 * 2 * math.sqrt(2 * 2 / (s - 1)), log_ratio.abs().max()


def test_chunked_folding_runs_the_deterministic_part_once(monkeypatch):
    from dnn2bnn.prediction import _predict

    bnn = dnn2bnn.transform_to_bnn_model(mlp((10, 16, 16, 3)), include="4", posterior_sigma_init=0.1)
    calls = []
    bnn[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    x = torch.randn(6, 10)
    # the fc output is 12 bytes a row: a 100-byte budget gives chunks of one draw
    monkeypatch.setattr(_predict, "CPU_FOLD_BYTES", 100)
    dnn2bnn.predict(bnn, x, 2)  # traces and probes the plan (on 3 and 2 rows)
    calls.clear()
    pred = dnn2bnn.predict(bnn, x, 9, return_samples=True)
    assert pred.method == "vectorized" and pred.samples.shape == (9, 6, 3)
    assert calls == [6]  # the prefix ran once, at batch size, for all chunks
    assert not torch.allclose(pred.samples[0], pred.samples[1])


def test_shared_layer_uses_one_sample_per_pass():
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(4, 4)), posterior_sigma_init=0.5)
    layer = bnn[0]

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer

        def forward(self, x):
            return self.fc(x) - self.fc(x)  # zero only if both uses share the sample

    out = dnn2bnn.predict(Twice(), torch.randn(3, 4), 8, task="regression", return_samples=True)
    assert out.method == "vectorized" and torch.equal(out.samples, torch.zeros(8, 3, 4))


def test_a_single_bayesian_layer_is_vectorized():
    layer = dnn2bnn.BayesConv2d(2, 3, 3, posterior_sigma_init=0.1)
    pred = dnn2bnn.predict(layer, torch.randn(2, 2, 5, 5), 4, task="regression", return_samples=True)
    assert pred.method == "vectorized" and pred.samples.shape == (4, 2, 3, 3, 3)


def test_last_layer_plan_runs_the_prefix_once():
    bnn = dnn2bnn.transform_to_bnn_model(mlp((10, 16, 16, 3)), include="4")
    plan = plan_split(bnn, ModelInputs.of(torch.randn(3, 10)))
    assert plan.vectorized == ["4"] and plan.per_draw == []
    assert plan.single_use == {id(bnn[4])}  # a Linear called once: local reparameterization
    full = plan_split(dnn2bnn.transform_to_bnn_model(CustomLayer()), ModelInputs.of(torch.randn(3, 8)))
    assert full.vectorized == ["body"] and full.per_draw == ["top"]
    deterministic = [n.target for n in plan.graph.nodes if n not in plan.stochastic]
    assert deterministic[1:] == ["0", "1", "2", "3"]  # after the placeholder: run once


def test_the_plan_is_traced_once_per_model_structure():
    import gc
    import weakref

    bnn = dnn2bnn.transform_to_bnn_model(mlp((10, 16, 16, 3)), posterior_sigma_init=0.1)
    x = torch.randn(3, 10)
    inputs = ModelInputs.of(x)
    first = cached_plan(bnn, inputs)
    assert cached_plan(bnn, ModelInputs.of(torch.randn(7, 10))) is first  # same structure: no new trace
    assert dnn2bnn.predict(bnn, x, 4).method == "vectorized" and cached_plan(bnn, inputs) is first
    with dnn2bnn.set_mode(bnn[0], "mean"):  # a mode change: traced again
        changed = cached_plan(bnn, inputs)
        assert changed is not first and changed.vectorized == ["2", "4"]
    handle = bnn[2].register_forward_hook(lambda m, i, o: o)  # a hook: traced again
    hooked = cached_plan(bnn, inputs)
    assert hooked not in (first, changed) and "2" in hooked.per_draw
    handle.remove()
    bnn[4] = dnn2bnn.transform_to_bnn_model(nn.Linear(16, 5))  # a replaced layer
    replaced = cached_plan(bnn, inputs)
    assert dnn2bnn.predict(bnn, x, 4).probs.shape == (3, 5)
    dnn2bnn.prediction.clear_plan_cache(bnn)
    assert cached_plan(bnn, inputs) is not replaced
    ref = weakref.ref(bnn)
    del bnn, first, changed, hooked, replaced
    gc.collect()
    assert ref() is None  # the cache does not keep the model alive


class _SoftmaxOverDimMinus2(nn.Module):
    """Row-wise for [B, T, D] inputs (softmax over T), mixing rows for [B, D] (over B)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.fc(x).softmax(dim=-2))


def test_the_plan_cache_is_keyed_on_the_input_rank():
    # D2-1: a probe that passed for [B, T, D] was reused for [B, D], where the same softmax
    # mixes the folded rows: vectorized, silently different from the loop.
    bnn = dnn2bnn.transform_to_bnn_model(_SoftmaxOverDimMinus2(), posterior_sigma_init=0.3)
    assert dnn2bnn.predict(bnn, torch.randn(6, 5, 4), 4, class_dim=-1).method == "vectorized"
    with pytest.warns(PredictionWarning, match="node softmax"):
        result = dnn2bnn.predict(bnn, torch.randn(6, 4), 4)
    assert result.method == "loop"
    inputs = ModelInputs.of(torch.randn(2, 5, 4))
    assert cached_plan(bnn, inputs) is cached_plan(bnn, ModelInputs.of(torch.randn(3, 7, 4)))
    assert cached_plan(bnn, inputs) is not cached_plan(bnn, ModelInputs.of(torch.randn(2, 5, 4).double()))


def test_mean_mode_layers_are_deterministic():
    bnn = dnn2bnn.transform_to_bnn_model(mlp(), posterior_sigma_init=0.1)
    x = torch.randn(5, 20)
    with dnn2bnn.set_mode(bnn, "mean"), pytest.warns(PredictionWarning, match="no Bayesian layer"):
        pred = dnn2bnn.predict(bnn, x, 4)
        expected = bnn(x).softmax(-1)
    assert pred.mutual_information.abs().max() < 1e-6
    torch.testing.assert_close(pred.probs, expected)


# ---------------------------------------------------------------- fallbacks
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > -1e9 else -self.fc(x)


class UsesBatchSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        b = x.shape[0]
        return self.fc(x).view(b, 2, 3).sum(1)


class FunctionalRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(x, self.fc.weight) + self.fc(x)


class ConstantInput(nn.Module):
    """A Bayesian layer applied to a learned embedding, not to the input."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(5, 4))
        self.proj = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x + self.proj(self.query).mean(0))


class MixesRows(nn.Module):
    """After its Bayesian layer, an operation that mixes the rows of dim 0."""

    def __init__(self, mix):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.mix = mix

    def forward(self, x):
        return self.mix(self.fc(x))


ROW_MIXERS = {  # name: (operation, what the warning says)
    "softmax-dim-0": (lambda h: h.softmax(0), "mixes rows"),
    "centred-over-dim-0": (lambda h: h - h.mean(0), "node mean .* does not have the batch on dim 0"),
    "batch-statistics": (lambda h: F.batch_norm(h, None, None, training=True), "mixes rows"),
    "cumsum-dim-0": (lambda h: h.cumsum(0), "mixes rows"),
    "view-minus-1": (lambda h: h.view(-1).reshape(-1, 3), "node view .* does not have the batch on dim 0"),
}


@pytest.mark.parametrize(
    "model, reason",
    [
        (DataDependent, "could not trace"),
        (UsesBatchSize, "batch size"),
        (FunctionalRead, "read outside"),
        (ConstantInput, "does not depend on the input"),
        *[(lambda mix=mix: MixesRows(mix), reason) for mix, reason in ROW_MIXERS.values()],
    ],
    ids=["data-dependent", "batch-size", "functional-read", "constant-input", *ROW_MIXERS],
)
def test_falls_back_to_the_loop_with_a_warning(model, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)  # DataDependent: not traced
        bnn = dnn2bnn.transform_to_bnn_model(model(), posterior_sigma_init=0.1)
    x = torch.randn(5, 4)
    with pytest.warns(PredictionWarning, match=reason):
        pred = dnn2bnn.predict(bnn, x, 3)
    assert pred.method == "loop" and pred.probs.shape == (5, 3)
    with pytest.raises(ValueError, match="cannot vectorize"):
        dnn2bnn.predict(bnn, x, 3, method="vectorized")


# ---------------------------------------------------------------- inputs, options, errors
def test_tensor_batches_and_dataloader_give_the_same_shapes(capsys):
    bnn = dnn2bnn.transform_to_bnn_model(mlp())
    x = torch.randn(10, 20)
    whole = dnn2bnn.predict(bnn, x, 4, return_samples=True)
    split = dnn2bnn.predict(bnn, x, 4, batch_size=3, return_samples=True)
    loader = DataLoader(TensorDataset(x, torch.zeros(10)), batch_size=4)
    looped = dnn2bnn.predict(bnn, loader, 4, return_samples=True, progress=True)
    for pred in (whole, split, looped):
        assert pred.probs.shape == (10, 5) and pred.samples.shape == (4, 10, 5)
        assert pred.predictive_entropy.shape == (10,) and pred.method == "vectorized"
    assert "predict" in capsys.readouterr().err  # the tqdm bar


def test_restores_training_flags_and_runs_without_grad():
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)))
    bnn.train()
    pred = dnn2bnn.predict(bnn, torch.randn(3, 4), 2)
    assert all(m.training for m in bnn.modules()) and not pred.probs.requires_grad


def test_regression_with_log_variance_head():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 8)
            self.mean = nn.Linear(8, 2)
            self.log_var = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.mean(h), self.log_var(h)

    bnn = dnn2bnn.transform_to_bnn_model(Head(), posterior_sigma_init=0.1)
    pred = dnn2bnn.predict(bnn, torch.randn(7, 3), 16, task="regression")
    assert pred.method == "vectorized" and pred.mean.shape == (7, 2)
    torch.testing.assert_close(pred.variance, pred.epistemic_variance + pred.aleatoric_variance)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"task": "segmentation"}, ValueError, "task must be one of"),
        ({"method": "fast"}, ValueError, "method must be one of"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"inputs": 3}, TypeError, "a mapping of keyword inputs or an iterable of batches"),
        # R4: a whole array was iterated row by row and blamed as "each batch ... got ndarray"
        ({"inputs": np.zeros((2, 20), np.float32)}, TypeError, r"got a numpy ndarray: convert it with torch.from_numpy"),
        ({"inputs": [{"x": torch.ones(1, 20)}]}, TypeError, "do not match Sequential.forward"),
        ({"inputs": [[3]]}, TypeError, "each batch must be a tensor, a mapping"),
        ({"inputs": {"input": torch.ones(2, 20), "x": torch.ones(3, 1)}}, TypeError, "do not match"),
        ({"class_dim": 1, "task": "regression"}, ValueError, "class_dim applies"),
        ({"class_dim": 0}, ValueError, "is the batch dim"),
        ({"class_dim": 2}, ValueError, "out of range"),
        ({"class_dim": 1.0}, TypeError, "class_dim must be an int"),
        ({"output_fn": 3}, TypeError, "output_fn must be callable"),
        ({"num_samples": True}, ValueError, "num_samples must be a positive int, got bool"),
        ({"num_samples": 2.0}, ValueError, "num_samples must be a positive int, got float"),
        ({"inputs": torch.randn(0, 20)}, ValueError, "has 0 rows"),  # D2-4: not torch's var() warning
        # D2-10: one example without its batch dim was told to use task='binary'
        ({"inputs": torch.randn(20)}, ValueError, r"returned shape \(5,\) for a batch of 20 inputs.*unsqueeze\(0\)"),
    ],
)
def test_mistakes_raise(kwargs, error, match):
    bnn = dnn2bnn.transform_to_bnn_model(mlp())
    args = {"inputs": torch.randn(2, 20), "num_samples": 2, **kwargs}
    with pytest.raises(error, match=match):
        dnn2bnn.predict(bnn, args.pop("inputs"), args.pop("num_samples"), **args)


def test_numpy_and_0d_tensor_sample_counts_are_accepted():
    # D2-4: np.int64(4) (a count from numpy arithmetic) was refused, unlike torch's own APIs.
    bnn = dnn2bnn.transform_to_bnn_model(mlp())
    x = torch.randn(5, 20)
    assert dnn2bnn.predict(bnn, x, np.int64(3), batch_size=np.int64(2)).num_samples == 3
    assert dnn2bnn.predict(bnn, x, torch.tensor(3)).num_samples == 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_results_keep_float64_and_widen_half_precision(dtype):
    # D2-3: a float64 model's probabilities were rounded to float32 (errors ~1e-8 instead of ~1e-16).
    dnn = mlp((6, 8, 3)).to(dtype)
    x = torch.randn(4, 6, dtype=dtype)
    bnn = dnn2bnn.transform_to_bnn_model(dnn, posterior_sigma_init=1e-6)
    with torch.no_grad():
        for name, p in bnn.named_parameters():
            if name.endswith("rho"):
                p.fill_(-40.0)  # collapsed posterior: every sample is the DNN
        expected = dnn(x).double().softmax(1)
    wide = torch.promote_types(dtype, torch.float32)
    for method in ("auto", "loop"):
        pred = dnn2bnn.predict(bnn, x, 3, method=method, return_samples=True)
        assert pred.probs.dtype == pred.samples.dtype == pred.mutual_information.dtype == wide
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(pred.samples.double(), expected.expand(3, -1, -1), rtol=0, atol=tol)
    regression = dnn2bnn.predict(bnn, x, 3, task="regression")
    assert regression.mean.dtype == regression.variance.dtype == wide


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(3, 5), RuntimeError, "cannot be multiplied"),  # wrong feature size
        (torch.ones(3, 20, dtype=torch.long), RuntimeError, "dtype"),
    ],
)
def test_inputs_the_model_rejects_raise_its_error_without_a_fallback_warning(x, error, match):
    # D2-6: a PredictionWarning "the folded batch failed (... While executing %_0 ...)" came
    # first, as if vectorizing were the problem; then the loop raised the same error.
    bnn = dnn2bnn.transform_to_bnn_model(mlp())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(error, match=match):
            dnn2bnn.predict(bnn, x, 4)
    assert not [w for w in caught if issubclass(w.category, PredictionWarning)]


def test_compiled_and_data_parallel_models_are_vectorized_through_the_module_inside():
    # D2-6: torch.compile(bnn) fell back to the loop ("OptimizedModule.forward takes
    # *args/**kwargs"); the folded pass now traces bnn itself (nothing is compiled here).
    dnn = mlp((6, 8, 3))
    bnn = dnn2bnn.transform_to_bnn_model(dnn, posterior_sigma_init=0.1)
    compiled = torch.compile(bnn)
    x = torch.randn(5, 6)
    pred = dnn2bnn.predict(compiled, x, 4, return_samples=True)
    assert pred.method == "vectorized"
    with torch.no_grad():
        for name, p in bnn.named_parameters():
            if name.endswith("rho"):
                p.fill_(-40.0)
        expected = dnn(x).softmax(1)
    collapsed = dnn2bnn.predict(compiled, x, 3, return_samples=True)
    torch.testing.assert_close(collapsed.samples, expected.expand(3, -1, -1))
    parallel = dnn2bnn.predict(nn.DataParallel(bnn), x, 3, return_samples=True)  # the same for .module
    assert parallel.method == "vectorized"
    torch.testing.assert_close(parallel.samples, expected.expand(3, -1, -1))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_batches_of_different_lengths_are_refused_clearly(task):
    # D2-8: a loader padding each batch to its own length (per-token outputs [N, T, C]) ran
    # every batch, then failed in torch.cat ("Sizes of tensors must match except in dim 0").
    bnn = dnn2bnn.transform_to_bnn_model(CausalEncoder())
    loader = [torch.randn(3, 4, 8), torch.randn(2, 7, 8)]
    options = {"class_dim": -1} if task == "classification" else {}
    with pytest.raises(ValueError, match=r"batch 1 gives results of shape \(2, 7, 2\) .*padding='max_length'"):
        dnn2bnn.predict(bnn, loader, 2, task=task, **options)
    assert dnn2bnn.predict(bnn, loader[:1] * 2, 2, task=task, **options).method == "vectorized"


# ---------------------------------------------------------------- output conventions (issue 14 item 10)
class SqueezedBinary(nn.Module):
    """The BCEWithLogitsLoss pattern: one logit per input, squeezed to ``[N]``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x).squeeze(-1)


def _mean_mode_predict(bnn, x, **kwargs):
    """predict and the output with every layer in "mean" mode (the deterministic network)."""
    with dnn2bnn.set_mode(bnn, "mean"), pytest.warns(PredictionWarning, match="no Bayesian layer"):
        return dnn2bnn.predict(bnn, x, 2, **kwargs), bnn(x)


@pytest.mark.parametrize("batch_size", [None, 1, 2])
def test_squeezed_binary_logits(batch_size):
    bnn = dnn2bnn.transform_to_bnn_model(SqueezedBinary(), posterior_sigma_init=0.1)
    x = torch.randn(5, 4)
    pred, out = _mean_mode_predict(bnn, x, task="binary", batch_size=batch_size)
    p1 = torch.sigmoid(out)
    torch.testing.assert_close(pred.probs, torch.stack([1 - p1, p1], dim=1))
    assert pred.predictive_entropy.shape == (5,) and pred.predictions.shape == (5,)
    sampled = dnn2bnn.predict(bnn, x, 8, task="binary", batch_size=batch_size)
    assert sampled.method == "vectorized" and sampled.mutual_information.shape == (5,)
    with pytest.raises(ValueError, match="use task='binary'"):
        dnn2bnn.predict(bnn, x, 2, batch_size=batch_size)


def test_binary_logits_with_a_class_dim_of_size_one():
    net = nn.Sequential(nn.Conv2d(2, 1, 3, padding=1))  # [N, 1, H, W]: binary segmentation
    bnn = dnn2bnn.transform_to_bnn_model(net, posterior_sigma_init=0.1)
    x = torch.randn(3, 2, 5, 6)
    pred, out = _mean_mode_predict(bnn, x, task="binary")
    p1 = torch.sigmoid(out)[:, 0]
    torch.testing.assert_close(pred.probs, torch.stack([1 - p1, p1], dim=1))
    assert pred.probs.shape == (3, 2, 5, 6) and pred.predictive_entropy.shape == (3, 5, 6)
    with pytest.raises(ValueError, match="has size 5"):
        dnn2bnn.predict(bnn, x, 2, task="binary", class_dim=2)


def test_segmentation_softmax_is_over_the_class_dim_and_keeps_the_spatial_dims():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    bnn = dnn2bnn.transform_to_bnn_model(net, posterior_sigma_init=0.1)
    x = torch.randn(2, 2, 5, 7)
    pred, out = _mean_mode_predict(bnn, x)
    torch.testing.assert_close(pred.probs, out.softmax(1))  # the class dim 1, not W
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(2, 5, 7))
    assert pred.class_dim == 1 and pred.predictions.shape == (2, 5, 7)
    torch.testing.assert_close(pred.predictions, out.argmax(1))
    sampled = dnn2bnn.predict(bnn, x, 6, return_samples=True, batch_size=1)
    assert sampled.probs.shape == sampled.variance.shape == (2, 3, 5, 7)
    for field in ("predictive_entropy", "expected_entropy", "mutual_information", "confidence"):
        assert getattr(sampled, field).shape == (2, 5, 7), field
    assert sampled.samples.shape == (6, 2, 3, 5, 7)
    torch.testing.assert_close(sampled.probs, sampled.samples.mean(0))
    assert (sampled.mutual_information >= 0).all() and sampled.mutual_information.max() > 0


def test_class_dim_last_for_token_logits():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))  # [N, T, C] token logits
    bnn = dnn2bnn.transform_to_bnn_model(net, posterior_sigma_init=0.1)
    x = torch.randn(3, 6, 4)
    pred, out = _mean_mode_predict(bnn, x, class_dim=-1)
    torch.testing.assert_close(pred.probs, out.softmax(-1))
    assert pred.predictive_entropy.shape == (3, 6) and pred.class_dim == 2
    torch.testing.assert_close(pred.confidence, out.softmax(-1).max(-1).values)


# ---------------------------------------------------------------- inputs and outputs of real models (issue 16)
class KeywordModel(nn.Module):
    """Keyword inputs (an optional mask) and a dict output, as Hugging Face models have."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, features, mask=None):
        h = torch.relu(self.emb(features))
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return {"scores": self.head(h), "hidden": h}


def test_dict_inputs_dataloaders_and_output_fn():
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(KeywordModel(), posterior_sigma_init=0.1)
    x, mask, y = torch.randn(6, 6), (torch.rand(6) > 0.3).float(), torch.randint(0, 3, (6,))
    scores = lambda out: out["scores"]  # noqa: E731
    with dnn2bnn.set_mode(bnn, "mean"):
        expected = bnn(x, mask=mask)["scores"].softmax(-1)
        unmasked = bnn(x)["scores"].softmax(-1)
    dicts = [{"features": x[i:i + 2], "mask": mask[i:i + 2], "labels": y[i:i + 2]} for i in range(0, 6, 2)]
    pairs = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=lambda b: (
        {"features": torch.stack([r[0] for r in b])}, torch.stack([r[1] for r in b])
    ))
    with dnn2bnn.set_mode(bnn, "mean"), pytest.warns(PredictionWarning, match="no Bayesian layer"):
        for inputs, kwargs, reference in [
            ({"features": x, "mask": mask}, {}, expected),
            ({"features": x, "mask": mask}, {"batch_size": 4}, expected),
            (dicts, {}, expected),  # the "labels" key is left out of the forward
            (pairs, {}, unmasked),  # (inputs, labels) batches: the inputs
            (x, {}, unmasked),
        ]:
            pred = dnn2bnn.predict(bnn, inputs, 2, output_fn=scores, **kwargs)
            torch.testing.assert_close(pred.probs, reference)
    with pytest.raises(TypeError, match="output_fn= to pick the logits"):
        dnn2bnn.predict(bnn, x, 2)


@pytest.mark.parametrize("with_mask", [False, True])
def test_keyword_inputs_are_vectorized_and_match_the_loop(with_mask):
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(KeywordModel(), posterior_sigma_init=0.2)
    inputs = {"features": torch.randn(5, 6)}
    if with_mask:
        inputs["mask"] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5])
    s = 200
    options = dict(task="regression", return_samples=True, output_fn=lambda out: out["scores"])
    fast = dnn2bnn.predict(bnn, inputs, s, **options)
    slow = dnn2bnn.predict(bnn, inputs, s, method="loop", **options)
    assert fast.method == "vectorized"
    a, b = fast.samples, slow.samples
    z = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / s).sqrt()
    assert z.abs().max() < 5.0
    log_ratio = (a.var(0) / b.var(0)).log()
    assert log_ratio.abs().max() < 6 * 2 * math.sqrt(2 * 2 / (s - 1))


def _tiny_hugging_face(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32, num_labels=3,
        )
        model = transformers.BertForSequenceClassification(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=60, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config)
    with warnings.catch_warnings():  # HF forwards defeat torch.fx: converted from the module tree
        warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)
        return transformers, dnn2bnn.transform_to_bnn_model(model.eval(), posterior_sigma_init=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hugging_face_models_predict_from_batch_encodings_and_dataloaders(kind):
    transformers, bnn = _tiny_hugging_face(kind)
    ids = torch.randint(1, 60, (4, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    with dnn2bnn.set_mode(bnn, "mean"):
        logits = bnn(**batch).logits
    classes = 3 if kind == "bert" else 60
    assert logits.shape[-1] == classes
    with dnn2bnn.set_mode(bnn, "mean"), pytest.warns(PredictionWarning) as caught:
        pred = dnn2bnn.predict(bnn, batch, 2)
    torch.testing.assert_close(pred.probs, logits.softmax(-1))  # ModelOutput: classes last
    assert any("**kwargs" in str(w.message) for w in caught)  # why it is not vectorized
    loader = [{**batch, "labels": torch.zeros(4, dtype=torch.long)}]
    with pytest.warns(PredictionWarning, match="separate forward passes"):
        sampled = dnn2bnn.predict(bnn, loader, 4, return_samples=True)
    assert sampled.method == "loop" and sampled.probs.shape == logits.shape
    assert sampled.mutual_information.shape == logits.shape[:-1]
    assert sampled.mutual_information.max() > 0
    pick = (lambda out: out.logits) if kind == "bert" else (lambda out: out.logits[:, -1])
    with pytest.warns(PredictionWarning):  # the next-token logits of GPT-2: [N, V]
        last = dnn2bnn.predict(bnn, ids, 2, output_fn=pick)
    assert last.probs.shape == (4, classes)


@pytest.mark.slow  # imports transformers
def test_hugging_face_class_dim_follows_the_output_type():
    """HF token/LM logits are [N, T, C]; segmentation logits [N, C, H, W]; others: ask."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import (
        CausalLMOutput, SemanticSegmenterOutput, TokenClassifierOutput,
    )

    class Wrapped(nn.Module):
        def __init__(self, output_type, conv):
            super().__init__()
            self.layer = nn.Conv2d(2, 3, 1) if conv else nn.Linear(2, 3)
            self.output_type = output_type

        def forward(self, x):
            return self.output_type(logits=self.layer(x))

    for output_type, conv, dim in [
        (TokenClassifierOutput, False, -1), (CausalLMOutput, False, -1), (SemanticSegmenterOutput, True, 1)
    ]:
        bnn = dnn2bnn.transform_to_bnn_model(Wrapped(output_type, conv), posterior_sigma_init=0.1)
        x = torch.randn(2, 2, 4, 4) if conv else torch.randn(2, 5, 2)
        pred, out = _mean_mode_predict(bnn, x)
        torch.testing.assert_close(pred.probs, out.logits.softmax(dim))
    bnn = dnn2bnn.transform_to_bnn_model(Wrapped(transformers.utils.ModelOutput, False))
    with pytest.raises(ValueError, match="pass class_dim="):
        dnn2bnn.predict(bnn, torch.randn(2, 5, 2), 2)
    assert dnn2bnn.predict(bnn, torch.randn(2, 5, 2), 2, class_dim=-1).probs.shape == (2, 5, 3)


def test_the_probe_is_not_blinded_by_identical_rows():
    """Left-padded sequence-first inputs: the first time steps are all zeros. The probe
    searches distinct rows and completes them with noise, so the recurrence is still found."""
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(SeqFirstTagger(), posterior_sigma_init=0.2)
    x = torch.randn(6, 3, 8)
    x[:4] = 0.0  # only rows 4 and 5 differ from the padding: one distinct row short
    with pytest.raises(ValueError, match="mixes rows"):
        dnn2bnn.predict(bnn, x, 4, task="regression", method="vectorized")
    dnn2bnn.prediction.clear_plan_cache(bnn)
    x[:] = 0.0  # a single distinct row
    with pytest.raises(ValueError, match="mixes rows"):
        dnn2bnn.predict(bnn, x, 4, task="regression", method="vectorized")


def test_dataloader_batches_with_several_positional_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, x1, x2):
            return self.a(x1) + self.b(x2)

    bnn = dnn2bnn.transform_to_bnn_model(TwoInputs(), posterior_sigma_init=0.1)
    x1, x2, y = torch.randn(5, 3), torch.randn(5, 2), torch.zeros(5)
    loader = DataLoader(TensorDataset(x1, x2, y), batch_size=2, collate_fn=lambda rows: (
        (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])), torch.stack([r[2] for r in rows])
    ))
    pred = dnn2bnn.predict(bnn, loader, 4)
    assert pred.method == "vectorized" and pred.probs.shape == (5, 4)
    with dnn2bnn.set_mode(bnn, "mean"), pytest.warns(PredictionWarning, match="no Bayesian layer"):
        torch.testing.assert_close(dnn2bnn.predict(bnn, loader, 2).probs, bnn(x1, x2).softmax(1))
        torch.testing.assert_close(
            dnn2bnn.predict(bnn, {"x1": x1, "x2": x2}, 2).probs, bnn(x1, x2).softmax(1)
        )


@pytest.mark.parametrize(
    "net, shape",
    [
        (lambda: nn.Sequential(nn.Linear(6, 5)), (4, 6)),
        (lambda: nn.Sequential(nn.Conv2d(3, 5, 4), nn.Flatten()), (4, 3, 4, 4)),  # one position
    ],
    ids=["linear", "conv-one-position"],
)
def test_a_loader_that_refills_one_input_tensor_gets_each_batchs_own_prediction(net, shape, monkeypatch):
    """Local reparameterization's moments of an input from the deterministic part are reused by
    the chunks of draws of ONE batch; a loader that copies each batch into the same tensor must
    not get the previous batch's moments back (they were keyed on the tensor's identity)."""
    from dnn2bnn.prediction import _vectorized

    monkeypatch.setattr(_vectorized, "linear_plan", lambda **kw: "local")
    torch.manual_seed(0)
    dnn = net()
    bnn = dnn2bnn.transform_to_bnn_model(dnn, posterior_sigma_init=1e-5)
    data = [torch.randn(shape) for _ in range(3)]

    def refilled():
        buffer = torch.empty(shape)
        for batch in data:
            buffer.copy_(batch)
            yield buffer

    pred = dnn2bnn.predict(bnn, refilled(), 4, task="regression", method="vectorized")
    with torch.no_grad():
        expected = torch.cat([dnn(batch) for batch in data])
    torch.testing.assert_close(pred.mean, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("method", ["auto", "vectorized"])
def test_inputs_the_model_rejects_raise_the_models_own_error_whatever_the_method(method):
    """A wrong input shape is the user's mistake, not a limit of vectorization: with
    ``method="vectorized"`` it was reported as "cannot vectorize ... the folded batch failed"."""
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Conv2d(3, 4, 4), nn.Flatten(), nn.Linear(4, 3)))
    with pytest.raises(RuntimeError, match="expected input.*to have 3 channels, but got 5"):
        dnn2bnn.predict(bnn, torch.randn(2, 5, 4, 4), 3, method=method)


def _temperature(module, args, output):
    return output / 100.0


def _zero_first_linear(module, args, output):
    return output * 0 if isinstance(module, nn.Linear) and output.shape[-1] == 6 else None


@pytest.mark.parametrize("where", ["model", "global"])
def test_forward_hooks_the_trace_would_skip_send_predict_to_the_loop(where):
    """torch.fx traces the model's forward, not its __call__: a hook on the model itself (a
    temperature-scaling hook) was skipped by the vectorized path, and global module hooks were
    skipped for the batched Bayesian layers; both silently. Now predict warns and loops."""
    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(
        nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), posterior_sigma_init=1e-4
    )
    x = torch.randn(3, 4)
    if where == "model":
        handle = bnn.register_forward_hook(_temperature)
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(_zero_first_linear)
    try:
        with torch.no_grad():
            with dnn2bnn.set_mode(bnn, "mean"):
                expected = bnn(x)  # the hooks run in an ordinary call
        with pytest.warns(PredictionWarning, match="hooks"):
            pred = dnn2bnn.predict(bnn, x, 4, task="regression")
        assert pred.method == "loop"
        torch.testing.assert_close(pred.mean, expected, atol=1e-3, rtol=0)
        with pytest.raises(ValueError, match="cannot vectorize.*hooks"):
            dnn2bnn.predict(bnn, x, 4, task="regression", method="vectorized")
    finally:
        handle.remove()
    assert dnn2bnn.predict(bnn, x, 4, task="regression").method == "vectorized"


def test_hooks_on_submodules_are_traced_and_keep_the_vectorized_path():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Linear(6, 3))
    bnn = dnn2bnn.transform_to_bnn_model(net, posterior_sigma_init=1e-4)
    bnn[0].register_forward_hook(_temperature)  # a non-leaf block: inlined in the trace
    x = torch.randn(3, 4)
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"):
        expected = bnn(x)
    pred = dnn2bnn.predict(bnn, x, 4, task="regression")
    assert pred.method == "vectorized"
    torch.testing.assert_close(pred.mean, expected, atol=1e-3, rtol=0)


def test_dnn2bnns_own_hooks_on_the_model_keep_the_vectorized_path():
    """The sample-scope hooks of shared layers and the batched training draws are known: the
    vectorized path shares draws per pass itself, and the batched draws do nothing without
    gradients."""
    bnn = dnn2bnn.transform_to_bnn_model(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)))
    dnn2bnn.layers.install_batched_sampling(bnn)
    assert bnn._forward_hooks and bnn._forward_pre_hooks
    assert dnn2bnn.predict(bnn, torch.randn(3, 4), 4).method == "vectorized"


def test_a_model_class_overriding_call_sends_predict_to_the_loop():
    """fx traces ``forward``: work done in an overridden ``__call__`` of the model's class was
    skipped by the vectorized path (outputs 100x off here), silently."""

    class Scaled(nn.Sequential):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs) / 100.0

    torch.manual_seed(0)
    bnn = dnn2bnn.transform_to_bnn_model(Scaled(nn.Linear(4, 3)), posterior_sigma_init=1e-4)
    x = torch.randn(2, 4)
    with pytest.warns(PredictionWarning, match="overrides __call__"):
        pred = dnn2bnn.predict(bnn, x, 4, task="regression")
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"):
        expected = bnn(x)
    assert pred.method == "loop"
    torch.testing.assert_close(pred.mean, expected, atol=1e-3, rtol=0)
