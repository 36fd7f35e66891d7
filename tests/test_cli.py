"""The ``dnn2bnn`` command line: subprocess runs of the main flows, in-process error cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from _models import TinyNet, trained_tiny

import dnn2bnn
from dnn2bnn.cli import main
from dnn2bnn.cli._convert import supports_option

REPO = Path(__file__).resolve().parents[1]
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def _run(*args, cwd=None, code=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    command = (
        [sys.executable, "-c", code] if code else [sys.executable, "-m", "dnn2bnn", *map(str, args)]
    )
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _mean(model, x=X):
    with torch.no_grad(), dnn2bnn.set_mode(model, "mean"):
        return model(x)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ subprocess runs
def test_version_in_a_real_process():
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dnn2bnn {dnn2bnn.__version__}"


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: dnn2bnn" in out and all(c in out for c in ("convert", "inspect", "to-dnn"))


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--bogus"])
    assert (
        exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_convert_resnet18_state_dict(tmp_path):
    torch.manual_seed(0)
    dnn = torchvision.models.resnet18(weights=None).eval()
    # as a DDP training script saves it: nested, with the "module." prefix
    state = {"module." + k: v for k, v in dnn.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state}, tmp_path / "resnet18.pt")
    result = _run(
        "convert",
        "resnet18.pt",
        "bnn.safetensors",
        "--arch",
        "torchvision:resnet18",
        "--exclude",
        "layer4.*",
        "--prior-sigma",
        "0.1",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["arch"] == "torchvision:resnet18" and summary["options"] == {"prior_sigma": 0.1}
    converted = [c["name"] for c in summary["converted"]]
    assert (
        "fc" in converted
        and "conv1" in converted
        and not any(n.startswith("layer4") for n in converted)
    )
    assert len(converted) == 16 and len(summary["skipped"]) == 5
    bnn = dnn2bnn.load_bnn(tmp_path / "bnn.safetensors").eval()
    assert bnn.fc.prior.sigma == 0.1
    dnn2bnn.save_bnn(bnn, tmp_path / "copy.pt")  # remembers torchvision:resnet18
    bnn = dnn2bnn.load_bnn(tmp_path / "copy.pt").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_mean(bnn, x), dnn(x), rtol=0, atol=0)


def test_custom_model_safetensors_in_pt_out_then_inspect_and_to_dnn(tmp_path):
    dnn = trained_tiny(width=6)
    from safetensors.torch import save_file

    save_file(dnn.state_dict(), tmp_path / "tiny.safetensors")
    result = _run(
        "convert",
        "tiny.safetensors",
        "bnn.pt",
        "--arch",
        "_models:TinyNet",
        "--arch-kwargs",
        '{"width": 6}',
        "--layers",
        "linear,conv2d",
        "--include",
        "head",
        "--posterior-sigma-init",
        "0.01",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Bayesian layers: 1 (1 BayesLinear)" in result.stdout and "load_bnn" in result.stdout
    bnn = dnn2bnn.load_bnn(tmp_path / "bnn.pt").eval()
    assert isinstance(bnn, TinyNet) and dnn2bnn.is_bayesian_layer(bnn.head)
    assert not dnn2bnn.is_bayesian_layer(bnn.features[0])
    torch.testing.assert_close(_mean(bnn), dnn(X), rtol=0, atol=0)

    info = _run("inspect", "bnn.pt", "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    info = json.loads(info.stdout)
    assert info["kind"] == "BNN" and info["arch"] == {
        "spec": "_models:TinyNet",
        "kwargs": {"width": 6},
    }
    (layer,) = info["bayesian_layers"]
    assert layer["name"] == "head" and layer["prior"] == {"mu": 0.0, "sigma": 1.0}
    assert layer["posterior_sigma_mean"] == pytest.approx(0.01, rel=1e-5)
    assert layer["estimator"] == "reparam" and layer["mean_elements"] == 6 * 4 * 3 + 3

    result = _run("to-dnn", "bnn.pt", "mean.safetensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    plain = TinyNet(width=6).eval()
    plain.load_state_dict(load_file(tmp_path / "mean.safetensors"))  # the original keys
    torch.testing.assert_close(plain(X), dnn(X), rtol=0, atol=0)


def test_pt2_round_trip_runs_without_dnn2bnn(tmp_path):
    dnn = trained_tiny()
    program = torch.export.export(dnn, (X,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "tiny.pt2")
    result = _run("convert", "tiny.pt2", "bnn.pt2", "--prior-sigma", "0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(exported graph)" in result.stdout
    # The BNN archive samples its weights in plain torch: dnn2bnn is made unimportable.
    check = (
        "import sys; sys.modules['dnn2bnn'] = None\n"
        "import torch\n"
        "m = torch.export.load('bnn.pt2').module()\n"
        "x = torch.randn(7, 1, 8, 8)\n"
        "a, b = m(x), m(x)\n"
        "print(tuple(a.shape), bool((a != b).any()))\n"
    )
    standalone = _run(cwd=tmp_path, code=check)
    assert standalone.returncode == 0, standalone.stderr
    assert standalone.stdout.split() == ["(7,", "3)", "True"]
    bnn = dnn2bnn.load_bnn(tmp_path / "bnn.pt2")
    assert bnn.head.prior.sigma == 0.2
    torch.testing.assert_close(_mean(bnn), dnn(X), rtol=0, atol=0)


def test_errors_in_a_real_process_are_one_line_without_traceback(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x80garbage")
    result = _run(
        "convert", "broken.pt", "out.safetensors", "--arch", "_models:TinyNet", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dnn2bnn: error: broken.pt")
    assert "Traceback" not in result.stderr and _files(tmp_path) == ["broken.pt"]


# ------------------------------------------------------------------ in-process runs
@pytest.mark.parametrize("command", ["convert", "inspect", "to-dnn"])
def test_each_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: dnn2bnn {command}" in out and f"dnn2bnn {command} " in out.split("examples:")[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with tiny.pt (state_dict), whole.pt (pickled module) and tiny.pt2."""
    monkeypatch.chdir(tmp_path)
    model = trained_tiny()
    torch.save({"model": model.state_dict()}, "tiny.pt")
    torch.save(model, "whole.pt")
    torch.export.save(torch.export.export(model, (X,)), "tiny.pt2")
    return tmp_path


ARCH = ["--arch", "_models:TinyNet"]


def _damaged(path: str, keep: float) -> str:
    data = Path(path).read_bytes()
    name = f"damaged{Path(path).suffix}"
    Path(name).write_bytes(data[: int(len(data) * keep)])
    return name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["convert", "TRUNCATED:tiny.pt", "out.safetensors", *ARCH],
            "damaged.pt: not a torch checkpoint",
        ),
        (["convert", "TRUNCATED:tiny.pt2", "out.pt2"], "damaged.pt2: not a torch.export archive"),
        (
            ["convert", "tiny.pt", "out.safetensors", "--arch", "torchvision:resnet1"],
            "unknown torchvision model 'resnet1'",
        ),
        (
            ["convert", "tiny.pt", "out.safetensors", "--arch", "torchvision:resnet18"],
            "missing key",
        ),
        (
            ["convert", "tiny.pt", "out.safetensors", *ARCH, "--arch-kwargs", '{"width": 5}'],
            "7 shape mismatches: ",  # regression: "mismatchs"
        ),
        (
            ["convert", "tiny.pt", "out.safetensors", "--arch", "torch.nn:Sequential"],
            "unexpected keys (features.0.weight",
        ),
        (["convert", "tiny.pt", "out.safetensors"], "pass --arch"),
        (
            ["convert", "tiny.pt", "out.safetensors", *ARCH, "--layers", "linear,lstm"],
            "unknown layer type lstm",
        ),
        (
            ["convert", "tiny.pt", "out.safetensors", *ARCH, "--include", "body.*"],
            "matches no module",
        ),
        (["convert", "tiny.pt", "out.h5", *ARCH], "unsupported output extension '.h5'"),
        (["convert", "tiny.pt", "tiny.pt", *ARCH, "--force"], "is the input file"),
        (["convert", "tiny.pt", "tiny.pt2", *ARCH], "tiny.pt2 already exists; pass --force"),
        (["convert", "whole.pt", "out.safetensors", *ARCH], "unpickling can run arbitrary code"),
        (["convert", "tiny.pt2", "out.safetensors"], "write it as .pt2"),
        (["convert", "tiny.pt", "out.pt2", *ARCH], "needs --input-shape"),
        (
            ["convert", "tiny.pt", "out.safetensors", *ARCH, "--prior-sigma", "-1"],
            "sigma must be > 0, got -1.0",
        ),
        (
            ["convert", "tiny.pt", "out.pt", *ARCH, "--exclude", "*"],
            "no layer of tiny.pt was converted (features.0: excluded",
        ),
        (["inspect", "missing.safetensors"], "missing.safetensors: no such file"),
        (["convert", ".", "out.pt", *ARCH], ". is a directory; expected a checkpoint file"),
        (["inspect", "."], ". is a directory; expected a checkpoint file"),
        (["inspect", "whole.pt"], "only `dnn2bnn convert --trust-pickle` unpickles"),
        (["to-dnn", "tiny.pt", "mean.pt"], "not a dnn2bnn BNN checkpoint"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_no_output(workdir, capsys, args, message):
    args = [_damaged(a.split(":", 1)[1], 0.5) if a.startswith("TRUNCATED:") else a for a in args]
    before = _files(workdir)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dnn2bnn: error: ") and message in err, err
    assert _files(workdir) == before


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "tiny.pt", "out.pt", "--arch-kwargs", "{not json"],
        ["convert", "tiny.pt", "out.pt", "--estimator", "mcmc"],
        ["convert", "tiny.pt"],
        ["convert", "tiny.pt", "out.pt", "--input-shape", "1,x"],
    ],
)
def test_usage_errors_exit_2(workdir, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "usage: dnn2bnn convert" in capsys.readouterr().err


def test_estimator_flag_is_passed_through_only_when_supported(workdir, capsys):
    code = main(["convert", "tiny.pt", "out.pt", *ARCH, "--estimator", "flipout"])
    if supports_option("estimator", "flipout"):
        assert code == 0
        calls = dnn2bnn.checkpoint._read.read_checkpoint("out.pt").metadata["calls"]
        assert calls[0]["options"]["estimator"] == "flipout"
    else:
        assert code == 1 and "no estimator option" in capsys.readouterr().err
        assert not Path("out.pt").exists()


@pytest.mark.parametrize("flag", [[], ["--parametrization", "softplus"], ["--parametrization", "exp"]])
def test_parametrization_flag_defaults_to_exp(workdir, flag):
    """Issue 17: exp is the default; --parametrization softplus keeps the old meaning of rho."""
    assert main(["convert", "tiny.pt", "out.pt", *ARCH, *flag]) == 0
    expected = flag[1] if flag else "exp"
    layers = dnn2bnn.checkpoint._read.read_checkpoint("out.pt").metadata["layers"]
    assert {state["parametrization"] for state in layers.values()} == {expected}
    bnn = dnn2bnn.load_bnn("out.pt")
    sigma_of = torch.exp if expected == "exp" else torch.nn.functional.softplus
    torch.testing.assert_close(bnn.head.posterior_sigma(), sigma_of(bnn.head.weight_rho.detach()))
    torch.testing.assert_close(bnn.head.posterior_sigma(), torch.full_like(bnn.head.weight_mu, 1e-3))


def test_trusted_pickle_and_force(workdir, capsys):
    assert main(["convert", "whole.pt", "out.pt", "--trust-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "_models:TinyNet"
    assert main(["convert", "tiny.pt", "out.pt", *ARCH, "--layers", "linear", "--force"]) == 0
    bnn = dnn2bnn.load_bnn("out.pt").eval()
    assert [n for n, m in bnn.named_modules() if dnn2bnn.is_bayesian_layer(m)] == ["head"]
    torch.testing.assert_close(_mean(bnn), trained_tiny()(X), rtol=0, atol=0)


def test_debug_shows_the_traceback(workdir):
    with pytest.raises(dnn2bnn.CheckpointError, match="pass --arch"):
        main(["convert", "tiny.pt", "out.pt", "--debug"])


def test_inspect_and_to_dnn_of_pt2_files(workdir, capsys):
    assert main(["inspect", "tiny.pt2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "DNN" and info["convertible_layers"] == {"Conv2d": 1, "Linear": 1}
    assert main(["convert", "tiny.pt2", "bnn.pt2"]) == 0
    assert main(["to-dnn", "bnn.pt2", "mean.pt2"]) == 0
    mean = torch.export.load("mean.pt2").module()
    assert "randn" not in mean.code
    torch.testing.assert_close(mean(X), trained_tiny()(X), rtol=0, atol=0)
    assert main(["inspect", "tiny.pt"]) == 0
    assert "DNN checkpoint (torch)" in capsys.readouterr().out


def test_inspect_of_a_pickle_does_not_suggest_an_option_inspect_rejects(workdir, capsys):
    """Regression: inspect said 'pass --trust-pickle', then rejected --trust-pickle."""
    assert main(["inspect", "whole.pt"]) == 1
    err = capsys.readouterr().err
    assert "pass --trust-pickle" not in err
    assert main(["convert", "whole.pt", "out.pt", *ARCH]) == 1
    assert "or pass --trust-pickle if you trust" in capsys.readouterr().err


def test_pickled_torch_nn_tree_is_converted_and_loads(workdir, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    torch.save(model, "seq.pt")
    assert main(["convert", "seq.pt", "bnn.safetensors", "--trust-pickle"]) == 0
    assert "recorded as its tree of torch.nn modules" in capsys.readouterr().out
    bnn = dnn2bnn.load_bnn("bnn.safetensors")
    x = torch.randn(5, 3)
    torch.testing.assert_close(_mean(bnn, x), model(x), rtol=0, atol=0)
    assert main(["inspect", "bnn.safetensors"]) == 0
    assert "architecture: a tree of torch.nn modules (4 modules)" in capsys.readouterr().out


@pytest.mark.slow
def test_pickled_torchvision_resnet18_is_converted_with_its_inferred_arch(tmp_path):
    """Regression: 'cannot record how to rebuild the pickled ResNet ... pass --arch'."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    torch.save(model, tmp_path / "r18.pt")
    result = _run("convert", "r18.pt", "bnn.pt", "--trust-pickle", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["arch"] == "torchvision:resnet18" and report["arch_kwargs"] == {"num_classes": 7}
    bnn = dnn2bnn.load_bnn(tmp_path / "bnn.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_mean(bnn, x), model(x), rtol=0, atol=0)


def test_docs_layers_default_is_the_help_default():
    """Regression: docs/cli.md listed 4 default layer types, --help 8."""
    from dnn2bnn.cli._convert import _layer_names

    docs = (REPO / "docs" / "cli.md").read_text()
    line = next(row for row in docs.splitlines() if row.startswith("| `--layers"))
    assert f"(default: all of `{', '.join(_layer_names())}`)" in line


@pytest.mark.slow
def test_pickled_timm_model_is_converted_with_its_registry_name(workdir, capsys):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    torch.save(model, "timm.pt")
    assert main(["convert", "timm.pt", "bnn.safetensors", "--trust-pickle", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "timm:resnet10t" and report["arch_kwargs"] == {"num_classes": 5}
    bnn = dnn2bnn.load_bnn("bnn.safetensors").eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_mean(bnn, x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
def test_inspect_reports_sigma_under_the_recorded_parametrization(tmp_path, capsys, suffix, parametrization):
    """Regression: inspect read every rho as softplus(rho); an exp layer's sigma was wrong."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    bnn = dnn2bnn.transform_to_bnn_model(model, posterior_sigma_init=0.5, parametrization=parametrization)
    with torch.no_grad():
        bnn[2].weight_rho.add_(0.3)
    path = dnn2bnn.save_bnn(bnn, tmp_path / f"bnn{suffix}")
    assert main(["inspect", str(path), "--json"]) == 0
    layers = {layer["name"]: layer for layer in json.loads(capsys.readouterr().out)["bayesian_layers"]}
    for name in ("0", "2"):
        expected = bnn[int(name)].posterior_sigma().mean().item()
        assert layers[name]["posterior_sigma_mean"] == pytest.approx(expected, rel=1e-6)
        assert layers[name]["parametrization"] == parametrization
    assert layers["0"]["posterior_sigma_mean"] == pytest.approx(0.5, rel=1e-6)


def test_layers_conv1d_is_torch_conv1d_even_when_transformers_is_imported():
    """Regression: with transformers imported, GPT-2's Conv1D took the name 'conv1d' from
    nn.Conv1d in --layers (silently converting the wrong type) and in the help text."""
    pytest.importorskip("transformers.pytorch_utils")
    from transformers.pytorch_utils import Conv1D

    from dnn2bnn.cli._convert import _layer_names, parse_layers

    assert parse_layers("conv1d") == [torch.nn.Conv1d]
    assert parse_layers("transformers.conv1d") == [Conv1D]
    assert _layer_names().count("conv1d") == 1


def test_to_dnn_of_a_state_dict_bnn_exports_for_inference(workdir, capsys):
    """Regression: to-dnn exported the freshly rebuilt model in training mode, so the
    archive's BatchNorm used batch statistics (a different answer for every batch)."""
    assert main(["convert", "tiny.pt", "bnn.safetensors", *ARCH]) == 0
    assert main(["to-dnn", "bnn.safetensors", "mean.pt2"]) == 1
    assert "needs --input-shape" in capsys.readouterr().err
    assert not Path("mean.pt2").exists()
    assert main(["to-dnn", "bnn.safetensors", "mean.pt2", "--input-shape", "2,1,8,8"]) == 0
    mean = torch.export.load("mean.pt2").module()  # exported for a batch of 2
    torch.testing.assert_close(mean(X[:2]), trained_tiny()(X[:2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean(X[2:]), trained_tiny()(X[2:]), rtol=0, atol=1e-6)
