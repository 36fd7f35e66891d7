"""Property-based tests: invariants of conversion, checkpoints and prediction over generated models.

The models are drawn by ``tests/_strategies.py`` and built by ``tests/_generated.py``: random
compositions of Linear/Conv/attention/Embedding/LSTM/GRU layers, shared and aliased layers,
own parameters used through ``F.linear``/``@``/``einsum``/``F.conv*``, subclasses with their
own forward, Sequential/ModuleList/ModuleDict containers, batch-first and sequence-first layouts.
Each invariant is one test, parametrized by model family (or by how the weights are used, or by
the kind of the block that reads a weight twice) so that a defect is marked exactly where it
shows.

The default hypothesis profile (registered in the root ``conftest.py``) is derandomized and
small; ``pytest tests/test_properties.py --hypothesis-profile=long`` explores far more models.
An invariant that today's code breaks is marked ``xfail(strict=True)`` with the issue 14 item
it belongs to (``OPEN_DEFECTS``), so the fix that makes it hold must delete that entry. A
failure prints the drawn ``spec``: ``_generated.build_model(**spec)`` rebuilds the model.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _generated import OwnWeight, build_model, example_input
from _strategies import (
    FAMILIES,
    OWN_WEIGHT_KINDS,
    PROBE_KINDS,
    conversion_options,
    kinds_of,
    model_specs,
    selected_types,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dnn2bnn
from dnn2bnn import CheckpointError, ConversionError

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "_generated:build_model"


#: Known defects that break an invariant today, each marked ``xfail(strict=True)`` where it
#: shows. The fix of one deletes its line here (its tests then must pass).
OPEN_DEFECTS: dict[str, str] = {}


def _xfail(*defects: str | None) -> list[Any]:
    """``xfail(strict=True)`` marks for those of ``defects`` that are still open."""
    return [
        pytest.mark.xfail(reason=OPEN_DEFECTS[d], strict=True)
        for d in defects
        if d in OPEN_DEFECTS
    ]


def _families(only: tuple[str, ...] = FAMILIES, **defects: str) -> list[Any]:
    """Model families as pytest params, those named in ``defects`` (``seq_first="D4"``)
    marked xfail while that defect is open."""
    return [
        pytest.param(f, id=f, marks=_xfail(defects.get(f.replace("-", "_"))))
        for f in only
    ]


# ---------------------------------------------------------------------------- helpers
def _convert(dnn: nn.Module, **options: Any) -> tuple[nn.Module, list[warnings.WarningMessage]]:
    """transform_to_bnn_model, with the warnings it issues returned instead of raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnn = dnn2bnn.transform_to_bnn_model(dnn, **options)
    return bnn.eval(), caught


def _all_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def _perturb_(bnn: nn.Module, seed: int) -> None:
    """Move every posterior mean and rho away from its converted value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bnn.named_parameters():
            if name.endswith("_rho"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("_mu"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _mean_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), dnn2bnn.set_mode(model, "mean"):
        return model(x)


def _state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _expected_bayesian(dnn: nn.Module, layer_types: list[type[nn.Module]]) -> list[str]:
    """Weight-bearing parameters of the DNN: every parameter of a layer of a targeted type,
    and every model-owned parameter used as the weight of a matmul/conv/einsum (``W``)."""
    names = []
    for module_name, module in dnn.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, tuple(layer_types)):
            names += [prefix + n for n, _ in module.named_parameters(recurse=False)]
        elif isinstance(module, OwnWeight):
            names.append(prefix + "W")
    return names


# ---------------------------------------------------------------------------- invariants
#: how the generated models use their weights: layers only, own parameters passed to
#: F.linear/F.conv*, own parameters used by `@`/einsum (model_specs keywords)
_USES = {
    "layers": {"exclude": OWN_WEIGHT_KINDS},
    "functional": {"require": ("f_linear", "f_conv"), "exclude": ("matmul", "einsum")},
    "matmul": {"require": ("matmul", "einsum")},
}


def _coverage_params() -> list[Any]:
    params = []
    for family in FAMILIES:
        for use, draw_options in _USES.items():
            needed = draw_options.get("require", ())
            if needed and not set(needed) & set(kinds_of(family)):
                continue
            marks = _xfail("D1" if use == "matmul" else None)
            params.append(pytest.param(family, use, id=f"{family}-{use}", marks=marks))
    return params


@pytest.mark.parametrize("family, use", _coverage_params())
@given(data=st.data())
def test_every_weight_bearing_parameter_is_bayesian_or_reported(family, use, data):
    spec = data.draw(model_specs((family,), **_USES[use]), label="spec")
    options = data.draw(conversion_options(), label="options")
    dnn = build_model(**spec)
    bnn, caught = _convert(dnn, **options)
    report = bnn.conversion_report
    bayesian = _all_params(bnn)
    layer_types = options.get("layer_types") or selected_types(opt_in=False)
    missing = []
    for name in _expected_bayesian(dnn, layer_types):
        if f"{name}_mu" in bayesian:
            continue
        owner = name.rpartition(".")[0]
        if any(s.reason and s.name in (name, owner) for s in report.skipped):
            continue
        missing.append(name)
    assert not missing, f"left deterministic without a word: {missing}\n{report}"
    # A skip is never silent: it is warned about, and strict=True turns it into an error
    # (and only a skip does).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if report.skipped:
            assert any(issubclass(w.category, dnn2bnn.ConversionWarning) for w in caught)
            with pytest.raises(ConversionError):
                dnn2bnn.transform_to_bnn_model(dnn, strict=True, **options)
        else:
            dnn2bnn.transform_to_bnn_model(dnn, strict=True, **options)


_NOT_SEQUENTIAL = tuple(f for f in FAMILIES if f != "sequential")


@pytest.mark.parametrize(
    "family",
    _families(_NOT_SEQUENTIAL, **{f.replace("-", "_"): "D2" for f in _NOT_SEQUENTIAL}),
)
@given(data=st.data())
def test_own_parameters_passed_to_f_linear_or_f_conv_become_bayesian(family, data):
    spec = data.draw(model_specs((family,), require=("f_linear", "f_conv")), label="spec")
    options = data.draw(conversion_options(), label="options")
    dnn = build_model(**spec)
    bnn, _ = _convert(dnn, **options)
    bayesian = _all_params(bnn)
    functional = [
        name
        for name, module in dnn.named_modules(remove_duplicate=False)
        if getattr(module, "how", "").startswith(("f_linear", "f_conv"))
    ]
    assert not [n for n in functional if f"{n}.W_mu" not in bayesian], bnn.conversion_report


@pytest.mark.parametrize("family", _families())
@given(data=st.data())
def test_mean_mode_equals_the_dnn(family, data):
    spec = data.draw(model_specs((family,)), label="spec")
    options = data.draw(conversion_options(), label="options")
    dnn = build_model(**spec)
    x = example_input(spec)
    bnn, _ = _convert(dnn, **options)
    with torch.no_grad():
        expected = dnn(x)
    torch.testing.assert_close(_mean_output(bnn, x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "family",
    _families(sequential="D3"),
)
@given(data=st.data(), suffix=st.sampled_from([".safetensors", ".pt"]))
def test_save_then_load_is_exact(family, data, suffix, tmp_path_factory):
    spec = data.draw(model_specs((family,)), label="spec")
    options = data.draw(conversion_options(), label="options")
    dnn = build_model(**spec)
    x = example_input(spec)
    bnn, _ = _convert(dnn, **options)
    _perturb_(bnn, spec["seed"])
    # A plain Sequential of torch.nn layers needs no arch; the generated classes come from
    # an importable factory called with the spec.
    arch = {} if family == "sequential" else {"arch": ARCH, "arch_kwargs": spec}
    folder = tmp_path_factory.mktemp("bnn")
    path = folder / f"bnn{suffix}"
    try:
        dnn2bnn.save_bnn(bnn, path, **arch)
    except CheckpointError as exc:
        # What load_bnn could not rebuild is refused at save time, with a message naming
        # arch= and nothing written. Allowed only where the module tree is not a tree: a
        # Sequential holding one layer twice; a plain tree and an arch= always round-trip.
        shares = len(list(dnn.named_modules(remove_duplicate=False))) > len(list(dnn.modules()))
        assert family == "sequential" and shares, exc
        assert "arch" in str(exc) and not list(folder.iterdir()), exc
        return
    loaded = dnn2bnn.load_bnn(path).eval()
    _state_equal(loaded.state_dict(), bnn.state_dict())
    torch.testing.assert_close(_mean_output(loaded, x), _mean_output(bnn, x), rtol=0, atol=0)


@pytest.mark.parametrize("family", _families())
@given(data=st.data())
def test_state_dict_loads_exactly_into_a_fresh_conversion(family, data):
    spec = data.draw(model_specs((family,)), label="spec")
    options = data.draw(conversion_options(), label="options")
    x = example_input(spec)
    bnn, _ = _convert(build_model(**spec), **options)
    _perturb_(bnn, spec["seed"])
    # The same architecture with other initial weights, converted with the same options.
    fresh, _ = _convert(build_model(**{**spec, "seed": spec["seed"] + 1}), **options)
    fresh.load_state_dict(bnn.state_dict())
    _state_equal(fresh.state_dict(), bnn.state_dict())
    torch.testing.assert_close(_mean_output(fresh, x), _mean_output(bnn, x), rtol=0, atol=0)


@pytest.mark.parametrize("family", _families())
@given(data=st.data())
def test_to_dnn_equals_mean_mode(family, data):
    spec = data.draw(model_specs((family,)), label="spec")
    options = data.draw(conversion_options(), label="options")
    x = example_input(spec)
    bnn, _ = _convert(build_model(**spec), **options)
    _perturb_(bnn, spec["seed"])
    plain = dnn2bnn.to_dnn(bnn)
    assert not any(dnn2bnn.is_bayesian_layer(m) for m in plain.modules())
    with torch.no_grad():
        deployed = plain(x)
    torch.testing.assert_close(deployed, _mean_output(bnn, x), rtol=0, atol=0)


def _predict_both(bnn: nn.Module, x: torch.Tensor, num_samples: int) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dnn2bnn.PredictionWarning)
        torch.manual_seed(0)
        auto = dnn2bnn.predict(bnn, x, num_samples, task="regression", return_samples=True)
        torch.manual_seed(1)
        loop = dnn2bnn.predict(
            bnn, x, num_samples, task="regression", return_samples=True, method="loop"
        )
    return auto, loop


@pytest.mark.parametrize("family", _families(seq_first="D4"))
@given(data=st.data())
def test_predict_with_a_collapsed_posterior_equals_the_dnn(family, data):
    """With sigma ~ 1e-18 every draw is the mean network: both predict paths must give the
    DNN's outputs; a vectorized path that mixes draws between inputs cannot."""
    spec = data.draw(model_specs((family,)), label="spec")
    options = data.draw(conversion_options(), label="options")
    dnn = build_model(**spec)
    x = example_input(spec)
    bnn, _ = _convert(dnn, **options)
    with torch.no_grad():
        for name, p in bnn.named_parameters():
            if name.endswith("_rho"):
                p.fill_(-40.0)
        expected = dnn(x)
    auto, loop = _predict_both(bnn, x, 3)
    for pred in (auto, loop):
        for sample in pred.samples:
            torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-5, msg=pred.method)


@pytest.mark.parametrize("family", _families())
@settings(max_examples=max(3, settings.default.max_examples // 3))  # 2 x 100 model calls each
@given(data=st.data())
def test_predict_vectorized_matches_the_loop_in_distribution(family, data):
    spec = data.draw(model_specs((family,)), label="spec")
    options = data.draw(conversion_options(), label="options")
    x = example_input(spec, batch=2)
    bnn, _ = _convert(build_model(**spec), **options)
    s = 100
    auto, loop = _predict_both(bnn, x, s)
    a, b = auto.samples.double(), loop.samples.double()
    var_a, var_b = a.var(0), b.var(0)
    se = ((var_a + var_b) / s).sqrt()
    # Means agree within 5 standard errors of their difference ...
    z = (a.mean(0) - b.mean(0)).abs() / se.clamp_min(1e-12)
    assert z.max() < 5.0, (auto.method, z.max())
    # ... and variances within 6 sd of their log ratio (sd ~ sqrt(2 / (S - 1)) each, doubled
    # for outputs that are not Gaussian in the weights).
    log_ratio = (var_a.clamp_min(1e-20) / var_b.clamp_min(1e-20)).log()
    assert log_ratio.abs().max() < 6 * 2 * math.sqrt(2 * 2 / (s - 1)), (auto.method, log_ratio)


_NEW_OPTIONS = {"prior_sigma": 0.3, "posterior_sigma_init": 0.07, "estimator": "flipout"}


@pytest.mark.parametrize(
    "family",
    _families(**{f.replace("-", "_"): "D5" for f in FAMILIES}),
)
@given(data=st.data(), function=st.sampled_from(["model", "layer"]))
def test_converting_again_applies_the_new_options_or_raises(family, data, function):
    spec = data.draw(model_specs((family,)), label="spec")
    options = data.draw(conversion_options(), label="options")
    bnn, _ = _convert(build_model(**spec), **options)
    means = {n: p.detach().clone() for n, p in bnn.named_parameters() if n.endswith("_mu")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if function == "model":
                again = dnn2bnn.transform_to_bnn_model(bnn, **_NEW_OPTIONS)
            else:
                again = dnn2bnn.transform_to_bnn_layer(bnn, nn.Linear, **_NEW_OPTIONS)
    except (ConversionError, TypeError, ValueError) as exc:
        assert str(exc)  # a clear refusal is one of the two allowed outcomes
        return
    targeted = [
        (name, m)
        for name, m in again.named_modules()
        if dnn2bnn.is_bayesian_layer(m) and (function == "model" or isinstance(m, nn.Linear))
    ]
    assert targeted
    # A layer used more than once per call keeps "reparam" (flipout/lrt would draw independent
    # noise at each use), said in a report note: the option is applied or refused, never dropped.
    notes = [str(note) for note in again.conversion_report.notes]
    kept_reparam = {
        name for name in again.conversion_report.shared
        if any(note.startswith(f"{name}: shared") and "'reparam'" in note for note in notes)
    }
    wrong = []
    for name, module in targeted:
        for key, value in module.named_buffers(recurse=False):
            if key.endswith("_prior_sigma") and not torch.all(value == 0.3):
                wrong.append(f"{name}.{key}")
        for key, value in module.named_parameters(recurse=False):
            if key.endswith("_rho"):
                sigma = module.posterior_sigma(key[: -len("_rho")]).detach()
                if not torch.allclose(sigma, torch.full_like(sigma, 0.07), rtol=1e-4):
                    wrong.append(f"{name}.{key}")
        if getattr(module, "supports_estimators", True) and name not in kept_reparam and str(
            getattr(module.estimator, "value", module.estimator)
        ) != "flipout":
            wrong.append(f"{name}.estimator")
    assert not wrong, f"new options not applied to {wrong}"
    for name, mu in means.items():  # the means are kept
        torch.testing.assert_close(_all_params(again)[name], mu, rtol=0, atol=0)


def _read_twice_params() -> list[Any]:
    params = []
    for kind, estimator in itertools.product(PROBE_KINDS, ("reparam", "flipout", "lrt")):
        if kind in OWN_WEIGHT_KINDS and estimator != "reparam":
            continue  # a converted own parameter is parameter-level: always "reparam"
        defect = None
        if kind == "linear_twice":
            defect = "D6"
        elif kind in ("shared", "alias", "mixed") and estimator != "reparam":
            defect = "D7"
        marks = _xfail(defect)
        params.append(pytest.param(kind, estimator, id=f"{kind}-{estimator}", marks=marks))
    return params


@pytest.mark.parametrize("kind, estimator", _read_twice_params())
@given(data=st.data())
def test_a_weight_read_twice_in_one_forward_uses_one_sample(kind, estimator, data):
    """Blocks that read one weight twice per call (a shared layer, one layer under two names,
    a module call plus ``F.linear(x, layer.weight)``, a subclass reading ``self.weight`` twice,
    an own parameter used twice) report ``max |first - second|``: it must be ~0 in sample mode.
    One block of ``kind`` probes, in a model of any family that has such blocks."""
    spec = data.draw(model_specs(probe=(kind,)), label="spec")
    options = data.draw(conversion_options((estimator,)), label="options")
    options["posterior_sigma_init"] = 0.2
    x = example_input(spec)
    bnn, _ = _convert(build_model(**spec), **options)
    torch.manual_seed(spec["seed"])
    with torch.no_grad():
        _, gaps = bnn(x)
    gap, scale = gaps[:, 0], gaps[:, 1]
    assert torch.all(gap <= 1e-5 * (1 + scale)), (spec["blocks"], gaps)
