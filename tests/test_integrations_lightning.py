"""dnn2bnn.integrations.lightning: ELBO training, MC evaluation and checkpoints in Lightning.

Small CNN and synthetic data on CPU; multi-process DDP runs in tests/test_examples.py
(examples/lightning_cnn.py with --devices 2).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dnn2bnn
from tests.conftest import state_equal

lightning = pytest.importorskip("dnn2bnn.integrations.lightning", exc_type=ImportError)
pl = lightning.pl

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN = 48


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    dnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    return dnn2bnn.transform_to_bnn_model(dnn)


def _data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return torch.utils.data.TensorDataset(x, y)


def _trainer(tmp_path, **options) -> "pl.Trainer":
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **options})


def _loader(dataset, **options):
    return torch.utils.data.DataLoader(dataset, batch_size=16, **options)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|smaller than the logging interval).*")
        yield


def test_training_step_is_data_loss_plus_kl_over_n_and_logs_both(tmp_path):
    module = lightning.BayesLightningModule(_cnn(), lr=1e-2)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, _loader(_data(N_TRAIN, 0)))
    assert module.num_train_examples == N_TRAIN  # taken from the training dataset
    logged = trainer.logged_metrics
    assert logged["train/kl"] > 0
    assert logged["train/loss"].item() == pytest.approx(
        logged["train/data_loss"].item() + logged["train/kl"].item() / N_TRAIN, rel=1e-5
    )
    # the step's loss is the model's cross entropy plus the closed-form KL (same sample: mean mode)
    x, y = _data(4, 1).tensors
    with dnn2bnn.set_mode(module.model, "mean"), torch.no_grad():
        loss = module.elbo_loss((x, y))[0]
        expected = nn.functional.cross_entropy(module.model(x), y) + dnn2bnn.kl_divergence(module.model) / N_TRAIN
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_optimizer_gives_rho_its_learning_rate():
    module = lightning.BayesLightningModule(_cnn(), lr=1e-3, rho_lr=0.05, optimizer_cls=torch.optim.SGD)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("means", 1e-3), ("rho", 0.05)]


def test_mc_validation_of_a_collapsed_posterior_is_the_deterministic_model(tmp_path):
    bnn = _cnn()
    with torch.no_grad():
        for name, p in bnn.named_parameters():
            if name.endswith("_rho"):
                p.fill_(-40.0)  # sigma ~ 4e-18
    module = lightning.BayesLightningModule(bnn, mc_samples=3)
    data = _data(40, 2)
    result = _trainer(tmp_path).validate(module, _loader(data), verbose=False)[0]
    x, y = data.tensors
    with dnn2bnn.set_mode(bnn, "mean"), torch.no_grad():
        probs = torch.softmax(bnn(x), -1)
    assert result["val/accuracy"] == pytest.approx(dnn2bnn.metrics.accuracy(probs, y))
    assert result["val/nll"] == pytest.approx(dnn2bnn.metrics.nll(probs, y), rel=1e-5)
    assert result["val/ece"] == pytest.approx(dnn2bnn.metrics.ece(probs, y), abs=1e-5)


def test_mc_predictions_average_samples():
    module = lightning.BayesLightningModule(_cnn(), mc_samples=64)
    x = _data(8, 3).tensors[0]
    probs = module.predict_step(x, 0)
    assert torch.allclose(probs.sum(-1), torch.ones(8))
    single = lightning.BayesLightningModule(module.model, mc_samples=1)
    spread = torch.stack([single.predict_step(x, 0) for _ in range(64)])
    assert spread.std(0).max() > 0  # the posterior is sampled
    assert (probs - spread.mean(0)).abs().max() < 4 * spread.std(0).max() / 8 + 1e-6


def test_dict_batches_and_hugging_face_style_outputs():
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return {"logits": self.inner(pixel_values)}

    module = lightning.BayesLightningModule(Wrapped(_cnn()), num_train_examples=10)
    x, y = _data(4, 4).tensors
    loss = module.elbo_loss({"pixel_values": x, "labels": y})[0]
    assert loss.shape == () and loss.requires_grad
    with pytest.raises(ValueError, match="'labels'"):
        module.elbo_loss({"pixel_values": x})


def test_checkpoint_reloads_into_a_converted_model(tmp_path):
    module = lightning.BayesLightningModule(_cnn(), lr=1e-2, num_train_examples=N_TRAIN)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, _loader(_data(N_TRAIN, 0)))
    path = tmp_path / "bnn.ckpt"
    trainer.save_checkpoint(path)
    again = lightning.BayesLightningModule.load_from_checkpoint(path, model=_cnn(), weights_only=True)
    assert state_equal(again.model, module.model)
    assert again.hparams.num_train_examples == N_TRAIN


def test_options_are_checked():
    with pytest.raises(TypeError, match="without Bayesian layer"):
        lightning.BayesLightningModule(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mc_samples"):
        lightning.BayesLightningModule(_cnn(), mc_samples=0)
    with pytest.raises(ValueError, match="num_train_examples"):
        lightning.BayesLightningModule(_cnn(), num_train_examples=0)


def test_mixin_works_with_the_pytorch_lightning_package_name(tmp_path):
    pytorch_lightning = pytest.importorskip("pytorch_lightning")

    class Module(lightning.BayesLightningMixin, pytorch_lightning.LightningModule):
        def __init__(self, bnn):
            super().__init__()
            self.setup_bayes(bnn, lr=1e-2)

    module = Module(_cnn())
    trainer = pytorch_lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    before = module.model[-1].weight_rho.detach().clone()
    trainer.fit(module, _loader(_data(N_TRAIN, 0)))
    assert not torch.equal(module.model[-1].weight_rho, before)  # it trained
    assert trainer.logged_metrics["train/kl"] > 0 and module.num_train_examples == N_TRAIN


def test_a_model_returning_a_tuple_gets_an_error_that_says_what_to_return():
    # was: "expected logits (a tensor, or .logits) from the model, got tuple", no way out named
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            out = self.fc(x)
            return out, out.sum()

    module = lightning.BayesLightningModule(dnn2bnn.transform_to_bnn_model(Pair()), num_train_examples=8)
    with pytest.raises(TypeError, match=r"got tuple; .*return_dict=True.* \(the output has 2 elements\)"):
        module.elbo_loss((torch.randn(2, 4), torch.tensor([0, 1])))
    with pytest.raises(TypeError, match="got tuple"):
        module.mc_probs(torch.randn(2, 4))


def test_float_targets_in_validation_get_an_error_naming_the_step():
    # was: "labels must be integer class indices, got dtype torch.float32" from dnn2bnn.metrics
    module = lightning.BayesLightningModule(
        dnn2bnn.transform_to_bnn_model(nn.Linear(4, 1)), nn.functional.mse_loss, num_train_examples=8
    )
    batch = (torch.randn(3, 4), torch.randn(3, 1))
    module.elbo_loss(batch)  # training a regression is fine
    with pytest.raises(TypeError, match=r"BayesLightningModule\.validation_step: .* got torch\.float32"):
        module.validation_step(batch, 0)
    with pytest.raises(TypeError, match=r"test_step: .*task=\"regression\""):
        module.test_step(batch, 0)
