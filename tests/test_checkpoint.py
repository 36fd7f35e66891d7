"""save_bnn/load_bnn round trips, safe reading of checkpoint files, .pt2 graph lifting."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
import torch.nn.functional as F
from _models import TinyNet, trained_tiny
from torch import nn

import dnn2bnn
from dnn2bnn.checkpoint import FORMAT_VERSION
from dnn2bnn.checkpoint._arch import build_arch, spec_of
from dnn2bnn.checkpoint._bnn import bnn_metadata, write_state
from dnn2bnn.checkpoint._export import lift_program
from dnn2bnn.checkpoint._read import match_state, read_checkpoint
from dnn2bnn.errors import CheckpointError

X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
ARCH = {"arch": "_models:TinyNet", "arch_kwargs": {"width": 6}}


def _mean_output(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad(), dnn2bnn.set_mode(model, "mean"):
        return model(x)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_replays_every_option(tmp_path, suffix):
    dnn = trained_tiny(width=6)
    bnn = dnn2bnn.transform_to_bnn_model(dnn, layer_types=[nn.Linear], prior_sigma=0.25)
    bnn = dnn2bnn.transform_to_bnn_layer(
        bnn, nn.Conv2d, include="features", posterior_sigma_init=0.01
    )
    with torch.no_grad():
        bnn.head.weight_rho.add_(torch.rand_like(bnn.head.weight_rho))  # "trained" sigma
    path = dnn2bnn.save_bnn(bnn, tmp_path / f"bnn{suffix}", **ARCH)
    loaded = dnn2bnn.load_bnn(path).eval()
    assert type(loaded) is TinyNet
    assert {
        n: type(m).__name__ for n, m in loaded.named_modules() if dnn2bnn.is_bayesian_layer(m)
    } == {
        "features.0": "BayesConv2d",
        "head": "BayesLinear",
    }
    assert loaded.head.prior.sigma == 0.25 and loaded.features[0].posterior_sigma_init == 0.01
    saved, restored = bnn.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(
        torch.equal(saved[k], restored[k]) for k in saved
    )
    torch.testing.assert_close(_mean_output(loaded), dnn(X), rtol=0, atol=0)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_replays_parameter_level_conversion(tmp_path, suffix):
    """params= (issue 4) is recorded with the call, so load_bnn rebuilds those layers too."""
    dnn = trained_tiny(width=6)
    bnn = dnn2bnn.transform_to_bnn_model(dnn, layer_types=[nn.Linear], params="features.1.weight")
    assert bnn.conversion_report.calls[0]["params"] == ["features.1.weight"]
    path = dnn2bnn.save_bnn(bnn, tmp_path / f"bnn{suffix}", **ARCH)
    loaded = dnn2bnn.load_bnn(path).eval()
    assert isinstance(loaded.features[1], dnn2bnn.BayesianParameters)
    assert loaded.state_dict().keys() == bnn.state_dict().keys()
    torch.testing.assert_close(_mean_output(loaded), _mean_output(bnn.eval()), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt2"])
def test_round_trip_of_config_objects_and_prior_objects(tmp_path, suffix):
    config = (
        dnn2bnn.BayesConfigMapping()
        .set_module_type(nn.Conv2d, dnn2bnn.BayesConfig(estimator="lrt", moped_delta=0.1))
        .set_module_name("head", dnn2bnn.BayesConfig(prior=dnn2bnn.ScaleMixturePrior(0.3)))
    )
    dnn = trained_tiny()
    bnn = dnn2bnn.transform_to_bnn_model(dnn, config=config)
    with pytest.warns(dnn2bnn.ConversionWarning, match="nothing in TinyNet was converted"):
        bnn = dnn2bnn.transform_to_bnn_layer(
            bnn, nn.Linear, exclude="head", prior=dnn2bnn.EmpiricalPrior(0.2)
        )  # converts nothing new: checks an options object next to a config
    path = dnn2bnn.save_bnn(bnn, tmp_path / f"bnn{suffix}", example_inputs=X)
    loaded = dnn2bnn.load_bnn(path)
    if suffix != ".pt2":  # an exported module keeps the mode it was exported in
        loaded.eval()
    for name in ("features.0", "head"):
        old, new = bnn.get_submodule(name), loaded.get_submodule(name)
        assert (new.estimator, new.prior) == (old.estimator, old.prior)
    saved, restored = bnn.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    torch.testing.assert_close(_mean_output(loaded), dnn(X), rtol=0, atol=0)


def test_arch_defaults_to_the_model_class(tmp_path):
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny())
    path = dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors")
    metadata = read_checkpoint(path).metadata
    assert metadata["arch"] == {"spec": "_models:TinyNet", "kwargs": {}}
    assert (
        metadata["format_version"] == FORMAT_VERSION
        and metadata["dnn2bnn_version"] == dnn2bnn.__version__
    )
    assert metadata["converted"] == ["features.0", "head"]
    assert metadata["calls"][0]["converted"] == ["features.0", "head"]
    torch.testing.assert_close(_mean_output(dnn2bnn.load_bnn(path).eval()), _mean_output(bnn))


@pytest.mark.parametrize("parametrization", ["exp", "softplus"])
def test_pt2_round_trip_through_save_bnn(tmp_path, parametrization):
    dnn = trained_tiny()
    bnn = dnn2bnn.transform_to_bnn_model(dnn, prior_sigma=0.5, parametrization=parametrization)
    with torch.no_grad():
        bnn.head.weight_rho.add_(2.0)  # sigmas where exp and softplus differ
    path = dnn2bnn.save_bnn(bnn, tmp_path / "bnn.pt2", example_inputs=X)
    program = torch.export.load(path)
    ops = {str(n.target) for n in program.graph.nodes}
    assert "aten.randn_like.default" in ops and f"aten.{parametrization}.default" in ops
    loaded = dnn2bnn.load_bnn(path)
    assert sorted(c.name for c in loaded.conversion_report.converted) == ["features.0", "head"]
    assert loaded.head.prior.sigma == 0.5 and loaded.head.parametrization.value == parametrization
    torch.testing.assert_close(loaded.head.posterior_sigma(), bnn.head.posterior_sigma())
    torch.testing.assert_close(_mean_output(loaded), dnn(X), rtol=0, atol=0)
    # and back to .pt2 without example inputs: the lifted module remembers them
    again = dnn2bnn.save_bnn(loaded, tmp_path / "again.pt2")
    torch.testing.assert_close(_mean_output(dnn2bnn.load_bnn(again)), dnn(X), rtol=0, atol=0)


def test_lift_program_turns_calls_into_layers_and_notes_the_rest():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(2, 4))

        def forward(self, x):
            return F.linear(self.fc(x) + self.fc(x), self.w * 2)  # fc shared; w computed

    model = Functional()
    x = torch.randn(3, 4)
    gm, notes = lift_program(torch.export.export(model, (x,)))
    assert isinstance(gm.fc, nn.Linear) and len(notes) == 1 and "computed" in notes[0]
    torch.testing.assert_close(gm(x), model(x))
    bnn = dnn2bnn.transform_to_bnn_model(gm)
    assert bnn.conversion_report.shared == ["fc"]  # one sample for both calls


def test_load_bnn_refuses_a_plain_checkpoint_and_a_newer_format(tmp_path):
    plain = tmp_path / "dnn.pt"
    torch.save(trained_tiny().state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a dnn2bnn BNN checkpoint"):
        dnn2bnn.load_bnn(plain)
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny())
    path = dnn2bnn.save_bnn(bnn, tmp_path / "bnn.pt")
    blob = torch.load(path, weights_only=True)
    metadata = json.loads(blob["dnn2bnn"])
    metadata["format_version"] = FORMAT_VERSION + 1
    blob["dnn2bnn"] = json.dumps(metadata)
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="upgrade dnn2bnn"):
        dnn2bnn.load_bnn(path)


def test_save_bnn_refuses_existing_files_and_cleans_up_on_failure(tmp_path, monkeypatch):
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny())
    path = dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors")
    with pytest.raises(CheckpointError, match="already exists"):
        dnn2bnn.save_bnn(bnn, path)
    before = path.read_bytes()

    def broken(tmp, state, metadata):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("dnn2bnn.checkpoint._bnn.write_state", broken)
    with pytest.raises(OSError, match="disk full"):
        dnn2bnn.save_bnn(bnn, path, force=True)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    with pytest.raises(CheckpointError, match="unsupported output extension '.h5'"):
        dnn2bnn.save_bnn(bnn, tmp_path / "bnn.h5")


def test_options_that_json_cannot_hold_are_refused(tmp_path):
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny())
    bnn.conversion_report.calls[0]["options"]["prior_sigma"] = object()
    with pytest.raises(TypeError, match="prior_sigma"):
        dnn2bnn.save_bnn(bnn, tmp_path / "bnn.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp", "compiled"])
def test_state_dicts_are_unwrapped(tmp_path, wrap):
    state = trained_tiny().state_dict()
    obj = {
        "plain": state,
        "state_dict": {"epoch": 3, "state_dict": state},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "ddp": {"module." + k: v for k, v in state.items()},
        "compiled": {"module._orig_mod." + k: v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "ckpt.pth")
    found = read_checkpoint(tmp_path / "ckpt.pth").state
    model = TinyNet()
    model.load_state_dict(match_state(model, found, source="ckpt", target="TinyNet"))
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_pickled_modules_need_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(trained_tiny(), path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        read_checkpoint(path)
    assert isinstance(read_checkpoint(path, trust_pickle=True).module, TinyNet)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pt2"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_files_are_one_clear_error(tmp_path, suffix, damage):
    path = tmp_path / f"model{suffix}"
    model = trained_tiny()
    if suffix == ".pt2":
        torch.export.save(torch.export.export(model, (X,)), path)
    else:
        write_state(path, model.state_dict(), None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 4)
    with pytest.raises(CheckpointError, match=f"{path.name}: (not a|corrupt)"):
        read_checkpoint(path)


def test_match_state_names_the_first_mismatches():
    state = TinyNet(width=4).state_dict()
    with pytest.raises(
        CheckpointError, match=r"shape mismatch.*features\.0\.weight is \(4, 1, 3, 3\)"
    ):
        match_state(TinyNet(width=6), state, source="f", target="t")
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    with pytest.raises(
        CheckpointError, match=r"1 missing key \(head\.bias\); 1 unexpected key \(extra\.weight\)"
    ):
        match_state(TinyNet(width=4), state, source="f", target="t")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet18", "malformed"),
        ("torchvision:resnet1", "did you mean resnet18"),
        ("timm:no_such_net", "unknown timm model|needs the timm package"),
        ("no_such_package.mod:Net", "cannot import 'no_such_package.mod'"),
        ("_models:TinyNett", "did you mean TinyNet"),
        ("_models:trained_tiny.__doc__", "not callable"),
        ("torch:zeros", "not a torch.nn.Module class or a function annotated to return one"),
        ("builtins:open", "a builtin_function_or_method, not a torch.nn.Module class"),
    ],
)
def test_bad_arch_specs(spec, message):
    with pytest.raises(CheckpointError, match=message):
        build_arch(spec, {"size": (1,)} if spec == "torch:zeros" else None)


def test_arch_specs_build_models():
    assert type(build_arch("torchvision:resnet18")).__name__ == "ResNet"
    assert build_arch("_models:TinyNet", {"width": 2}).head.in_features == 8
    with pytest.raises(CheckpointError, match="unexpected keyword argument 'depth'"):
        build_arch("_models:TinyNet", {"depth": 2})
    with pytest.raises(CheckpointError, match="cannot be\\s+imported"):
        spec_of(type("Local", (nn.Module,), {"__module__": "__main__"})())


def test_to_dnn_of_a_checkpointed_model_keeps_shared_layers_shared():
    shared = nn.Linear(3, 3)
    dnn = nn.Sequential(shared, nn.ReLU(), shared)
    bnn = dnn2bnn.transform_to_bnn_model(dnn, prior_sigma=0.1)
    back = dnn2bnn.to_dnn(bnn)
    assert type(back[0]) is nn.Linear and back[0] is back[2]
    x = torch.randn(2, 3)
    torch.testing.assert_close(back(x), _mean_output(bnn, x))
    assert set(back.state_dict()) == set(dnn.state_dict())


def test_pt2_input_is_not_a_zip(tmp_path):
    path = tmp_path / "x.pt2"
    path.write_bytes(b"PK")
    assert not zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError, match="not a torch.export archive"):
        read_checkpoint(path)


# ------------------------------- issue 14 item 4: save never writes what load cannot read
def _assert_round_trip(bnn: nn.Module, path, x, **save_kwargs) -> nn.Module:
    dnn2bnn.save_bnn(bnn, path, **save_kwargs)
    loaded = dnn2bnn.load_bnn(path)
    saved, restored = bnn.state_dict(), loaded.state_dict()
    assert list(saved) == list(restored)
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    bnn.eval(), loaded.eval()
    a, b = _mean_output(bnn, x), _mean_output(loaded, x)
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    assert torch.equal(a, b)
    return loaded


def _trees() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    quickstart = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    nested = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4, eps=1e-3, momentum=0.2),
        nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(4 * 4 * 4, 3, dtype=torch.float64).float(),
    )
    shared = nn.Linear(4, 4)
    return {
        "shared": (nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2)), torch.randn(3, 4)),
        "quickstart": (quickstart, torch.randn(2, 784)),
        "nested": (nested, X),
        "bare_layer": (nn.Conv1d(2, 3, 5, stride=2, padding="valid"), torch.randn(2, 2, 9)),
    }


@pytest.mark.parametrize("name", ["quickstart", "nested", "bare_layer", "shared"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torch_nn_trees_round_trip_without_arch(tmp_path, name, suffix):
    """Regression: the README quickstart BNN saved; load_bnn raised "not rebuilt: ['0', '2']"."""
    torch.manual_seed(0)
    dnn, x = _trees()[name]
    bnn = dnn2bnn.transform_to_bnn_model(dnn, prior_sigma=0.3)
    loaded = _assert_round_trip(bnn, tmp_path / f"bnn{suffix}", x)
    assert type(loaded) is type(bnn)
    if name == "shared":  # a layer used twice is rebuilt once, in both places
        assert loaded[0] is loaded[2]
    assert json.loads(_raw_metadata(tmp_path / f"bnn{suffix}"))["arch"]["spec"] == (
        "dnn2bnn:module_tree"
    )


def test_module_list_and_dict_trees_round_trip(tmp_path):
    torch.manual_seed(0)
    tree = nn.ModuleDict(
        {
            "blocks": nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 4, bias=False)]),
            "out": nn.Linear(4, 2),
        }
    )
    with pytest.warns(dnn2bnn.ConversionWarning, match="could not trace ModuleDict"):
        bnn = dnn2bnn.transform_to_bnn_model(tree)
    dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors")
    loaded = dnn2bnn.load_bnn(tmp_path / "bnn.safetensors")
    assert type(loaded) is nn.ModuleDict and type(loaded["blocks"]) is nn.ModuleList
    x = torch.randn(2, 3)

    def run(model):
        with torch.no_grad(), dnn2bnn.set_mode(model, "mean"):
            h = model["blocks"][1](model["blocks"][0](x))
            return model["out"](h)

    assert torch.equal(run(bnn), run(loaded))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in bnn.state_dict().items())


def _raw_metadata(path) -> str:
    return read_checkpoint(path).metadata and json.dumps(read_checkpoint(path).metadata)


def test_custom_class_with_arch_round_trips(tmp_path):
    _assert_round_trip(
        dnn2bnn.transform_to_bnn_model(trained_tiny(width=6)), tmp_path / "bnn.pt", X, **ARCH
    )


def test_params_on_root_parameters_records_the_original_class(tmp_path):
    """Regression: the ViT of docs/conversion.md recorded a dynamic BayesVisionTransformer class."""
    torchvision = pytest.importorskip("torchvision")
    kwargs = dict(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(**kwargs)
    bnn = dnn2bnn.transform_to_bnn_model(vit, params=["class_token", "encoder.pos_embedding"])
    assert type(bnn).__name__ == "BayesVisionTransformer"
    path = tmp_path / "vit.safetensors"
    loaded = _assert_round_trip(bnn, path, torch.randn(2, 3, 16, 16), arch_kwargs=kwargs)
    assert read_checkpoint(path).metadata["arch"]["spec"] == (
        "torchvision.models.vision_transformer:VisionTransformer"
    )
    assert type(loaded).__name__ == "BayesVisionTransformer"


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2},
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


@pytest.mark.parametrize("build", [_tiny_gpt2, _tiny_bert], ids=["gpt2", "bert"])
def test_hugging_face_models_round_trip_without_arch(tmp_path, build):
    """Regression: GPT2LMHeadModel saved without arch failed to load with "missing 'config'"."""
    torch.manual_seed(0)
    model = build()
    with pytest.warns(dnn2bnn.ConversionWarning):  # HF models are not traceable by torch.fx
        bnn = dnn2bnn.transform_to_bnn_model(model, posterior_sigma_init=0.01)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "hf.safetensors"
    loaded = _assert_round_trip(bnn, path, ids)
    assert type(loaded) is type(bnn) and isinstance(loaded, type(model))
    assert loaded.config.to_dict() == bnn.config.to_dict()
    spec = read_checkpoint(path).metadata["arch"]["spec"]
    assert spec == f"transformers:{type(model).__name__}"


def test_hugging_face_config_dict_with_int_keys_is_accepted_as_arch_kwargs(tmp_path):
    """Regression: arch_kwargs={'config': cfg.to_dict()} was refused (id2label has int keys)."""
    torch.manual_seed(0)
    model = _tiny_bert()
    with pytest.warns(dnn2bnn.ConversionWarning):
        bnn = dnn2bnn.transform_to_bnn_model(model)
    ids = torch.randint(0, 40, (2, 6))
    loaded = _assert_round_trip(
        bnn, tmp_path / "hf.pt", ids, arch_kwargs={"config": model.config.to_dict()}
    )
    assert loaded.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}


def test_codec_round_trips_non_string_keys_and_dtypes():
    from dnn2bnn.checkpoint._codec import decode, encode

    value = {"id2label": {0: "a", 1: "b"}, "m": {1.5: None, True: 2}, "dtype": torch.float16}
    assert decode(json.loads(json.dumps(encode(value, "x")))) == value


class _NotTorchNN(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (
            lambda: nn.Sequential(nn.Linear(3, 3), _NotTorchNN()),
            {},
            r"^1 is a test_checkpoint._NotTorchNN.*arch=",
        ),
        (lambda: trained_tiny(width=6), {"arch_kwargs": {"width": 5}}, r"shape.*arch="),
        (
            lambda: trained_tiny(width=6),
            {"arch": "torch.nn:Identity"},
            r"not rebuilt.*not written.*arch=",
        ),
    ],
    ids=["custom child", "wrong kwargs", "wrong arch"],
)
def test_save_refuses_what_load_cannot_rebuild_and_writes_nothing(
    tmp_path, make, kwargs, message
):
    bnn = dnn2bnn.transform_to_bnn_model(make())
    path = tmp_path / "bnn.safetensors"
    path.write_bytes(b"the user's file")
    with pytest.raises(CheckpointError, match=message):
        dnn2bnn.save_bnn(bnn, path, force=True, **kwargs)
    assert path.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bnn.safetensors"]


def test_a_model_changed_after_construction_is_refused(tmp_path):
    model = trained_tiny(width=6)
    model.head = nn.Linear(24, 7)  # a new head: TinyNet(width=6) does not build this
    bnn = dnn2bnn.transform_to_bnn_model(model)
    with pytest.raises(CheckpointError, match=r"head.weight_mu: \(7, 24\).*vs \(3, 24\)"):
        dnn2bnn.save_bnn(bnn, tmp_path / "bnn.pt", **ARCH)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------- issue 14 item 11: estimator and mode are stored
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_set_estimator_and_set_mode_are_stored(tmp_path, suffix):
    """Regression: a loaded model came back with the estimator of the conversion call."""
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny(width=6), estimator="flipout")
    dnn2bnn.set_estimator(bnn, "lrt")
    dnn2bnn.set_mode(bnn.head, "mean")
    path = dnn2bnn.save_bnn(bnn, tmp_path / f"bnn{suffix}", **ARCH)
    loaded = dnn2bnn.load_bnn(path)
    for name in ("features.0", "head"):
        assert loaded.get_submodule(name).estimator.value == "lrt"
    assert loaded.head.bayes_mode == "mean" and loaded.features[0].bayes_mode == "sample"


def test_checkpoints_without_layer_states_load_with_the_conversion_defaults(tmp_path):
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny(width=6), estimator="flipout")
    metadata = bnn_metadata(bnn, arch=ARCH["arch"], arch_kwargs={"width": 6})
    del metadata["layers"]  # as written by dnn2bnn before layer states were stored
    write_state(tmp_path / "old.safetensors", bnn.state_dict(), metadata)
    loaded = dnn2bnn.load_bnn(tmp_path / "old.safetensors")
    assert loaded.head.estimator.value == "flipout" and loaded.head.bayes_mode == "sample"


# ------------------------------------------------- fuzzed and hostile files (issue 14)
def _fuzz():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent / "fuzz" / "fuzz_checkpoint.py"
    spec = importlib.util.spec_from_file_location("fuzz_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fuzzed_checkpoints_fail_only_with_checkpoint_error(tmp_path):
    """A short seeded run of tests/fuzz/fuzz_checkpoint.py (atheris runs it for longer)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fuzz = _fuzz()
    fuzz.seeds()

    @settings(
        max_examples=60,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(min_size=2, max_size=64))
    def run(data):
        fuzz.check(data, tmp_path)

    run()
    assert not fuzz.MARKER.exists()


@pytest.mark.parametrize("kind", range(7))
def test_each_fuzz_mutation_kind_is_rejected_cleanly(tmp_path, kind):
    fuzz = _fuzz()
    for seed in range(len(fuzz.seeds())):
        for extra in (b"", b"\x03\x07\x11\x00\xff", bytes(range(40))):
            fuzz.check(bytes([seed, kind]) + extra, tmp_path)


@pytest.mark.parametrize("index", range(9))
def test_hostile_metadata_is_refused_without_running_anything(tmp_path, index):
    fuzz = _fuzz()
    bnn = fuzz._bnn()
    metadata = bnn_metadata(bnn, arch="dnn2bnn:module_tree", arch_kwargs={})
    value = fuzz.HOSTILE_VALUES[index]
    for keys in (("arch",), ("arch", "kwargs"), ("calls", 0, "config"), ("calls", 0, "options")):
        hostile = fuzz._inject(metadata, keys, value)
        write_state(tmp_path / "bnn.safetensors", bnn.state_dict(), hostile)
        with pytest.raises(CheckpointError):
            dnn2bnn.load_bnn(tmp_path / "bnn.safetensors")
        assert not fuzz.MARKER.exists()


def test_hostile_pickles_are_refused(tmp_path):
    """A torch.save file and a legacy pickle whose __reduce__ would create a marker file."""
    fuzz = _fuzz()
    for suffix, data in fuzz.seeds()[-2:]:
        path = tmp_path / f"hostile{suffix}"
        path.write_bytes(data)
        for read in (dnn2bnn.load_bnn, read_checkpoint):
            with pytest.raises(CheckpointError, match="unpickling can run arbitrary code"):
                read(path)
    assert not fuzz.MARKER.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hostile.pt"]


def test_parametrization_round_trips_and_old_checkpoints_read_as_softplus(tmp_path):
    """The parametrization (softplus|exp) is stored and restored; the default is exp (issue 17),
    and a checkpoint that records none (written before parametrizations existed) is softplus."""
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny(width=6))
    with torch.no_grad():
        bnn.head.weight_rho.add_(2.0)  # sigmas where exp and softplus differ
    path = dnn2bnn.save_bnn(bnn, tmp_path / "exp.safetensors", **ARCH)
    assert read_checkpoint(path).metadata["layers"]["head"]["parametrization"] == "exp"
    loaded = dnn2bnn.load_bnn(path)
    assert loaded.head.parametrization.value == "exp"
    torch.testing.assert_close(loaded.head.posterior_sigma(), bnn.head.posterior_sigma())
    softplus = dnn2bnn.transform_to_bnn_model(trained_tiny(width=6), parametrization="softplus")
    with torch.no_grad():
        softplus.head.weight_rho.add_(2.0)
    old = bnn_metadata(softplus, **_arch_args())
    del old["layers"]  # written before parametrizations existed
    for call in old["calls"]:
        call["options"].pop("parametrization", None)
    write_state(tmp_path / "old.pt", softplus.state_dict(), old)
    back = dnn2bnn.load_bnn(tmp_path / "old.pt")
    assert back.head.parametrization.value == "softplus"
    torch.testing.assert_close(back.head.posterior_sigma(), softplus.head.posterior_sigma())
    torch.testing.assert_close(back.head.weight_rho, softplus.head.weight_rho)
    # a model converted with the old default (softplus recorded, no option in the call)
    recorded = bnn_metadata(softplus, **_arch_args())
    for call in recorded["calls"]:
        call["options"].pop("parametrization", None)
    write_state(tmp_path / "recorded.pt", softplus.state_dict(), recorded)
    back = dnn2bnn.load_bnn(tmp_path / "recorded.pt")
    assert back.head.parametrization.value == "softplus" and back.features[0].parametrization.value == "softplus"
    torch.testing.assert_close(back.head.posterior_sigma(), softplus.head.posterior_sigma())
    tampered = read_checkpoint(path).metadata
    tampered["layers"]["head"]["parametrization"] = "log"
    write_state(tmp_path / "tampered.pt", bnn.state_dict(), tampered)
    with pytest.raises(CheckpointError, match=r"head.parametrization: expected one of \['softplus', 'exp'\], got 'log'"):
        dnn2bnn.load_bnn(tmp_path / "tampered.pt")


def test_legacy_calls_make_the_old_default_explicit():
    """A record without per-layer states meant softplus wherever a call set no parametrization."""
    from dnn2bnn.checkpoint._codec import encode
    from dnn2bnn.checkpoint._rebuild import legacy_calls

    old_config = encode(dnn2bnn.BayesConfig(), "c")
    del old_config["fields"]["parametrization"]  # a BayesConfig recorded before the field existed
    calls = [
        {"function": "transform_to_bnn_model", "options": {}},
        {"function": "transform_to_bnn_model", "options": {"parametrization": "exp"}},
        {"function": "transform_to_bnn_model", "options": {}, "config": old_config},
        {"function": "transform_to_bnn_model", "options": {}, "config": encode(dnn2bnn.BayesConfig(), "c")},
    ]
    fixed = legacy_calls(calls)
    assert fixed[0]["options"] == {"parametrization": "softplus"}
    assert fixed[1]["options"] == {"parametrization": "exp"}
    assert fixed[2]["config"]["fields"]["parametrization"] == "softplus" and fixed[2]["options"] == {}
    assert fixed[3]["config"]["fields"]["parametrization"] == "exp"  # recorded: kept
    assert "parametrization" not in calls[0]["options"] and "parametrization" not in old_config["fields"]


def _arch_args() -> dict:
    return {"arch": ARCH["arch"], "arch_kwargs": ARCH["arch_kwargs"]}


def test_a_prior_written_after_conversion_is_stored(tmp_path):
    """A posterior fit writes rho and a new prior object; load_bnn restores both."""
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny(width=6), prior_sigma=1.0)
    with torch.no_grad():
        bnn.head.weight_prior_sigma.fill_(0.2)
        bnn.head.bias_prior_sigma.fill_(0.2)
    bnn.head.prior = dnn2bnn.NormalPrior(0.0, 0.2)
    loaded = dnn2bnn.load_bnn(dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors", **ARCH))
    assert loaded.head.prior == dnn2bnn.NormalPrior(0.0, 0.2)
    assert loaded.features[0].prior == dnn2bnn.NormalPrior(0.0, 1.0)
    torch.testing.assert_close(dnn2bnn.kl_divergence(loaded), dnn2bnn.kl_divergence(bnn))


def test_tree_of_attention_and_recurrent_layers_round_trips(tmp_path):
    """Constructor arguments read back for layers with unusual signatures (bias, *args)."""
    torch.manual_seed(0)
    tree = nn.ModuleList(
        [
            nn.MultiheadAttention(8, 2, bias=False, batch_first=True, kdim=6, vdim=4),
            nn.LSTM(3, 4, num_layers=2, bidirectional=True),
            nn.Linear(3, 2).double(),
        ]
    )
    with pytest.warns(dnn2bnn.ConversionWarning, match="could not trace ModuleList"):
        bnn = dnn2bnn.transform_to_bnn_model(
            tree, layer_types=[nn.MultiheadAttention, nn.LSTM, nn.Linear]
        )
    loaded = dnn2bnn.load_bnn(dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors"))
    assert [repr(m) for m in loaded] == [repr(m) for m in bnn]
    saved, restored = bnn.state_dict(), loaded.state_dict()
    for key, value in saved.items():
        assert torch.equal(value, restored[key]) and value.dtype == restored[key].dtype, key
    q = torch.randn(1, 5, 8)
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"), dnn2bnn.set_mode(loaded, "mean"):
        k, v = torch.randn(1, 5, 6), torch.randn(1, 5, 4)
        assert torch.equal(bnn[0](q, k, v)[0], loaded[0](q, k, v)[0])
        x = torch.randn(5, 2, 3)
        assert torch.equal(bnn[1](x)[0], loaded[1](x)[0])


def test_a_half_precision_model_is_rebuilt_in_its_dtype(tmp_path):
    torch.manual_seed(0)
    model = _tiny_gpt2().to(torch.bfloat16)
    with pytest.warns(dnn2bnn.ConversionWarning):
        bnn = dnn2bnn.transform_to_bnn_model(model)
    path = dnn2bnn.save_bnn(bnn, tmp_path / "bf16.safetensors")
    assert read_checkpoint(path).metadata["arch"]["dtype"] == "bfloat16"
    restored = dnn2bnn.load_bnn(path).state_dict()
    for key, value in bnn.state_dict().items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key


class _ReadsItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) + x @ self.fc.weight.T


def test_a_pt2_archive_that_load_bnn_cannot_rebuild_is_not_written(tmp_path):
    """Regression: the archive was written, and load_bnn then failed on it."""
    bnn = dnn2bnn.transform_to_bnn_model(_ReadsItsWeight())
    with pytest.raises(CheckpointError, match="could not be read back, so it was not written"):
        dnn2bnn.save_bnn(bnn, tmp_path / "bnn.pt2", example_inputs=torch.randn(2, 3))
    assert list(tmp_path.iterdir()) == []


def test_saving_a_torchvision_model_without_arch_names_the_torchvision_spec(tmp_path):
    """Regression: the error told a torchvision user to pass 'package.module:callable'."""
    import torchvision

    bnn = dnn2bnn.transform_to_bnn_model(torchvision.models.mobilenet_v3_small(num_classes=3))
    with pytest.raises(dnn2bnn.CheckpointError, match=r"arch='torchvision:NAME'"):
        dnn2bnn.save_bnn(bnn, tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()
    dnn2bnn.save_bnn(bnn, tmp_path / "b.pt", arch="torchvision:mobilenet_v3_small", arch_kwargs={"num_classes": 3})
    back = dnn2bnn.load_bnn(tmp_path / "b.pt").state_dict()
    assert back.keys() == bnn.state_dict().keys()
    assert all(torch.equal(v, back[k]) for k, v in bnn.state_dict().items())


def test_pt2_of_a_model_in_training_mode_is_exported_for_inference(tmp_path):
    """Regression: a BNN saved as .pt2 right after training (train mode) baked BatchNorm's
    batch statistics into the archive, and the loaded module refuses eval()."""
    torch.manual_seed(0)
    dnn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        dnn[1].running_mean.normal_()
        dnn[1].running_var.uniform_(0.5, 2.0)
    bnn = dnn2bnn.transform_to_bnn_model(dnn)
    x = torch.randn(3, 4)
    dnn2bnn.save_bnn(bnn, tmp_path / "b.pt2", example_inputs=x)
    assert bnn.training and bnn[1].training  # the model's modes are restored
    back = dnn2bnn.load_bnn(tmp_path / "b.pt2")
    with torch.no_grad(), dnn2bnn.set_mode(back, "mean"):
        torch.testing.assert_close(back(x), dnn.eval()(x), rtol=0, atol=1e-6)


class _SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_pt2_refusal_of_a_shared_layer_says_what_to_use_instead(tmp_path):
    """A shared layer cannot be rebuilt from an archive's graph yet (A2-6): the refusal
    names the formats that work, and nothing is written."""
    bnn = dnn2bnn.transform_to_bnn_model(_SharedTwice())
    arch = f"{__name__}:_SharedTwice"
    with pytest.raises(CheckpointError, match=r"save it as \.safetensors or \.pt instead"):
        dnn2bnn.save_bnn(bnn, tmp_path / "s.pt2", arch=arch, example_inputs=torch.randn(3, 4))
    assert list(tmp_path.iterdir()) == []
    dnn2bnn.save_bnn(bnn, tmp_path / "s.safetensors", arch=arch)
    back = dnn2bnn.load_bnn(tmp_path / "s.safetensors")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in bnn.state_dict().items())
