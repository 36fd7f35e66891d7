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
from dnn2bnn.checkpoint._bnn import write_state
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


def test_pt2_round_trip_through_save_bnn(tmp_path):
    dnn = trained_tiny()
    bnn = dnn2bnn.transform_to_bnn_model(dnn, prior_sigma=0.5)
    path = dnn2bnn.save_bnn(bnn, tmp_path / "bnn.pt2", example_inputs=X)
    program = torch.export.load(path)
    ops = {str(n.target) for n in program.graph.nodes}
    assert "aten.randn_like.default" in ops and "aten.softplus.default" in ops
    loaded = dnn2bnn.load_bnn(path)
    assert sorted(c.name for c in loaded.conversion_report.converted) == ["features.0", "head"]
    assert loaded.head.prior.sigma == 0.5
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
        ("torch:zeros", "returned Tensor; expected a torch.nn.Module"),
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
