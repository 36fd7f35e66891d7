"""fit_posterior at the edges: the checkpoint keeps the fit, `dnn2bnn convert --fit-data`, data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dnn2bnn
from dnn2bnn.posterior.data_file import load_fit_data
from tests._models import trained_tiny

REPO = Path(__file__).resolve().parents[1]


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_save_and_load_keep_the_posterior_and_the_fit_record(tmp_path):
    bnn = dnn2bnn.transform_to_bnn_model(trained_tiny())
    fit = dnn2bnn.fit_posterior(bnn, _data(), temperature=0.5, progress=False)
    dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors", arch="tests._models:TinyNet")
    loaded = dnn2bnn.load_bnn(tmp_path / "bnn.safetensors")
    assert loaded.conversion_report.posterior_fit == json.loads(json.dumps(fit.to_dict()))
    torch.testing.assert_close(loaded.head.posterior_sigma(), bnn.head.posterior_sigma())
    torch.testing.assert_close(loaded.head.weight_prior_sigma, bnn.head.weight_prior_sigma)
    torch.testing.assert_close(dnn2bnn.kl_divergence(loaded), dnn2bnn.kl_divergence(bnn))
    assert "posterior fitted by fit_posterior" in str(loaded.conversion_report)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_fit_data_reads_tensor_files(tmp_path, suffix):
    x, y = _data(8)
    path = tmp_path / f"fit{suffix}"
    if suffix == ".pt":
        torch.save({"inputs": x, "labels": y}, path)
    else:
        from safetensors.torch import save_file

        save_file({"input": x, "target": y}, str(path))
    got_x, got_y = load_fit_data(str(path))
    assert torch.equal(got_x, x) and torch.equal(got_y, y)


def test_load_fit_data_calls_a_named_callable(tmp_path, monkeypatch):
    (tmp_path / "fit_loader_mod.py").write_text(
        "import torch\n"
        "def loader():\n"
        "    ds = torch.utils.data.TensorDataset(torch.zeros(6, 2), torch.zeros(6, dtype=torch.long))\n"
        "    return torch.utils.data.DataLoader(ds, batch_size=3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loader = load_fit_data("fit_loader_mod:loader")
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 2


def test_load_fit_data_errors_name_what_was_expected(tmp_path):
    torch.save({"images": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"found \['images'\]"):
        load_fit_data(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_fit_data(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="cannot import 'no_such_module:f'"):
        load_fit_data("no_such_module:f")
    with pytest.raises(ValueError, match="expected a .pt/.safetensors file"):
        load_fit_data("data.csv")


def test_cli_convert_with_fit_data_in_a_real_process(tmp_path):
    dnn = trained_tiny()
    torch.save(dnn.state_dict(), tmp_path / "tiny.pt")
    x, y = _data()
    torch.save({"input": x, "target": y}, tmp_path / "fit.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    command = [
        sys.executable, "-m", "dnn2bnn", "convert", "tiny.pt", "bnn.pt", "--arch", "_models:TinyNet",
        "--fit-data", "fit.pt", "--fit-options", '{"temperature": 0.5}', "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    fit = json.loads(result.stdout)["posterior_fit"]
    assert fit["temperature"] == 0.5 and fit["num_train_examples"] == 64
    assert sorted(fit["prior_precision"]) == ["features.0", "head"]
    bnn = dnn2bnn.load_bnn(tmp_path / "bnn.pt")
    assert type(bnn).__name__ == "TinyNet" and bnn.conversion_report.posterior_fit == fit
    # sigma follows the fitted prior: bounded by sqrt(T / lambda), above the converted 1e-3
    sigma, lam = bnn.head.posterior_sigma().detach(), fit["prior_precision"]["head"]
    assert float(sigma.max()) <= (0.5 / lam) ** 0.5 * (1 + 1e-5)
    assert float(sigma.min()) > 1e-3

    bad = subprocess.run(
        [*command[:8], "--fit-data", "nothing.pt", "--force"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert bad.returncode != 0 and "--fit-data nothing.pt" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_quality_benchmark_posthoc_rows_on_synthetic_data(tmp_path):
    """benchmarks/quality_mnist.py --parts posthoc: the rows exist, the fit is cached and reused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_mnist", REPO / "benchmarks" / "quality_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_mnist"] = module
    try:
        spec.loader.exec_module(module)
        args = ["--synthetic", "--quick", "--parts", "posthoc", "--samples", "2", "--threads", "1",
                "--out", str(tmp_path / "q.json"), "--fit-cache", str(tmp_path / "fit.pt")]
        first = module.main(args)
        second = module.main(args)  # the cached fit: the same posterior, the same numbers
    finally:
        del sys.modules["quality_mnist"]
    names = list(first["models"])
    assert names[0] == "LeNet-5 (deterministic parent)"
    assert names[1] == "LeNet-5 + fit_posterior (defaults, no training)"
    assert any("ELBO (plain Adam)" in n for n in names) and any("ELBO (recipe)" in n for n in names)
    posthoc = first["models"][names[1]]
    assert posthoc["temperature"] <= max(dnn2bnn.posterior.DEFAULT_TEMPERATURES) and posthoc["choice"]
    assert second["models"][names[1]]["nll"] == posthoc["nll"]
