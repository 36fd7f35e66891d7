import warnings

import numpy as np
import pytest
import torch
from torch import nn

import dnn2bnn
from dnn2bnn import WithBNNLoss, kl_divergence, transform_to_bnn_model
from tests.conftest import LeNet5, mlp


def test_kl_divergence_sums_every_layer():
    bnn = transform_to_bnn_model(LeNet5())
    layers = [m for m in bnn.modules() if isinstance(m, dnn2bnn.BayesianLayer)]
    torch.testing.assert_close(kl_divergence(bnn), sum(layer.kl() for layer in layers))
    assert kl_divergence(mlp()).item() == 0.0


def test_with_bnn_loss_arithmetic():
    bnn = transform_to_bnn_model(mlp((6, 4, 3)), posterior_sigma_init=0.1)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    criterion = WithBNNLoss(bnn, loss_fn, dnn_factor=0.7, bnn_factor=0.01)
    with dnn2bnn.set_mode(bnn, "mean"):  # deterministic forward to compare the arithmetic
        loss = criterion(x, y)
        expected = 0.7 * loss_fn(bnn(x), y) + 0.01 * kl_divergence(bnn)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(criterion.last_kl, kl_divergence(bnn).detach())
    assert criterion.backbone is bnn and "bnn_factor=0.01" in repr(criterion)


def test_elbo_scaling():
    bnn = transform_to_bnn_model(mlp())
    criterion = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=50_000)
    assert criterion.dnn_factor == 1.0 and criterion.bnn_factor == pytest.approx(2e-5)
    with pytest.raises(ValueError, match="num_train_examples must be >= 1"):
        WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=0)
    with pytest.raises(TypeError, match="num_train_examples must be an int"):
        WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=5.0)


def test_the_kl_of_a_float16_model_is_scaled_before_it_is_cast():
    # D2-2: KL ~1.3e6 cast to float16 (max 65504) before the 1/N factor made the loss inf.
    bnn = transform_to_bnn_model(nn.Linear(256, 256), prior_sigma=0.01).half()
    criterion = WithBNNLoss.elbo(bnn, nn.MSELoss(), num_train_examples=60_000)
    loss = criterion(torch.randn(4, 256).half(), torch.zeros(4, 256).half())
    assert criterion.last_kl.item() > 65504 and loss.dtype == torch.float16
    expected = criterion.last_data_loss.float() + criterion.last_kl / 60_000
    assert torch.isfinite(loss) and loss.float().item() == pytest.approx(expected.item(), rel=1e-2)


def test_a_per_example_loss_is_refused():
    # D2-7: reduction="none" gave a [B] loss with the KL added to every element; its .sum()
    # counted the KL B times, silently.
    bnn = transform_to_bnn_model(mlp((6, 4, 3)))
    criterion = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(reduction="none"), num_train_examples=100)
    with pytest.raises(ValueError, match=r"scalar data loss .* got shape \(5,\) from CrossEntropyLoss"):
        criterion(torch.randn(5, 6), torch.randint(0, 3, (5,)))
    summed = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(reduction="sum"), num_train_examples=100)
    assert summed(torch.randn(5, 6), torch.randint(0, 3, (5,))).shape == ()


def test_bad_factors_and_arguments():
    bnn = transform_to_bnn_model(mlp())
    with pytest.raises(ValueError, match="bnn_factor must be finite and >= 0"):
        WithBNNLoss(bnn, nn.MSELoss(), bnn_factor=-1)
    with pytest.raises(TypeError, match="dnn_factor must be a real number"):
        WithBNNLoss(bnn, nn.MSELoss(), dnn_factor="1")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        WithBNNLoss(bnn, 3)
    with pytest.warns(UserWarning, match="has no Bayesian layer"):
        WithBNNLoss(mlp(), nn.MSELoss())


def test_gradients_flow_through_loss_to_every_posterior_parameter():
    bnn = transform_to_bnn_model(LeNet5())
    criterion = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=100)
    criterion(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))).backward()
    for name, param in bnn.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_kl_divergence_batches_small_parameters_without_changing_the_result(monkeypatch):
    """Small float32 parameters with a closed-form KL share one multi-tensor node; the value
    and every gradient equal the per-layer sum, whatever the prior and size mix."""
    from dnn2bnn.layers import _kl

    monkeypatch.setattr(_kl, "SMALL_KL_NUMEL", 500)  # some large, some small here
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 30), nn.ReLU(),
        nn.Linear(30, 10), nn.Linear(10, 3), nn.Linear(3, 2, dtype=torch.float64),
    )
    bnn = dnn2bnn.transform_to_bnn_model(
        net,
        config=dnn2bnn.BayesConfigMapping()
        .set_global(dnn2bnn.BayesConfig(prior=dnn2bnn.NormalPrior(0.1, 0.5), posterior_sigma_init=0.05))
        .set_module_name("4", dnn2bnn.BayesConfig(prior=dnn2bnn.EmpiricalPrior(0.3)))
        .set_module_name("5", dnn2bnn.BayesConfig(prior=dnn2bnn.ScaleMixturePrior(0.5, 1.0, 0.1))),
    )
    with torch.no_grad():
        for p in bnn.parameters():
            p.add_(torch.rand_like(p) * 0.3)
    x = torch.randn(2, 1, 8, 8)
    torch.manual_seed(1)
    bnn[:6](x)  # a forward pass, so the scale-mixture layer has its sample
    total = dnn2bnn.kl_divergence(bnn)
    total.backward()
    grads = [p.grad.clone() for p in bnn.parameters()]
    bnn.zero_grad()
    torch.manual_seed(1)
    bnn[:6](x)  # the same Monte Carlo sample for the reference
    reference = sum(m.kl().to(torch.float64) for m in bnn.modules() if dnn2bnn.is_bayesian_layer(m))
    reference.backward()
    torch.testing.assert_close(total.to(torch.float64), reference, rtol=1e-6, atol=1e-3)
    for (name, p), got in zip(bnn.named_parameters(), grads):
        torch.testing.assert_close(got, p.grad, msg=name)


@pytest.mark.parametrize("parametrization", ["softplus", "exp"])
def test_kl_divergence_small_parameters_match_torch_distributions_under_a_scaled_loss(parametrization):
    """Issue 17: the multi-tensor KL node with the default zero prior mean (no difference
    tensor) and a KL scaled by a factor (folded into its per-tensor scalars on the CPU): value
    and gradients equal autograd of the torch.distributions formula."""
    torch.manual_seed(0)
    bnn = transform_to_bnn_model(
        nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), prior_sigma=0.7,
        posterior_sigma_init=0.05, parametrization=parametrization,
    )
    with torch.no_grad():
        for name, p in bnn.named_parameters():
            p.add_(torch.rand_like(p) * (0.5 if name.endswith("_rho") else 0.2))
    (0.37 * kl_divergence(bnn)).backward()
    got = {n: p.grad.clone() for n, p in bnn.named_parameters()}
    bnn.zero_grad()
    sigma = torch.exp if parametrization == "exp" else nn.functional.softplus
    reference = 0.37 * sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(getattr(m, n + "_mu"), sigma(getattr(m, n + "_rho"))),
            torch.distributions.Normal(0.0, 0.7),
        ).sum()
        for m in bnn for n in ("weight", "bias")
    )
    reference.backward()
    for name, p in bnn.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


def test_kl_divergence_sees_data_writes_to_prior_buffers_of_small_parameters():
    """The scalar prior buffers of the multi-tensor node are read each call (in one transfer)."""
    bnn = transform_to_bnn_model(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    before = kl_divergence(bnn).item()
    bnn[1].weight_prior_sigma.data.fill_(0.1)
    bnn[0].bias_prior_mu.data.fill_(2.0)
    expected = sum(m.kl() for m in bnn)
    assert kl_divergence(bnn).item() != before
    torch.testing.assert_close(kl_divergence(bnn), expected)
    mu, sigma = bnn[0].bias_mu, bnn[0].posterior_sigma("bias")
    own = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(2.0, 1.0)
    ).sum()
    torch.testing.assert_close(bnn[0]._kl_term("bias"), own)


# ---------------------------------------------------------------- num_train_examples (issue 14 item 13)
@pytest.mark.parametrize(
    "value", [np.int64(50_000), np.int32(50_000), torch.tensor(50_000), 50_000], ids=repr
)
def test_num_train_examples_accepts_numpy_and_0d_tensor_integers(value):
    bnn = transform_to_bnn_model(mlp())
    criterion = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=value)
    assert criterion.bnn_factor == pytest.approx(2e-5)
    loss = torch.tensor(0.5)
    torch.testing.assert_close(
        dnn2bnn.elbo(loss, bnn, num_train_examples=value), loss + kl_divergence(bnn) / 50_000
    )


@pytest.mark.parametrize(
    "value, error, match",
    [
        (True, TypeError, "must be an int"),
        (np.bool_(True), TypeError, "must be an int"),
        (5.0, TypeError, "must be an int"),
        (np.float64(5.0), TypeError, "must be an int"),
        (torch.tensor(5.0), TypeError, "must be an int"),
        (torch.tensor([5]), TypeError, "must be an int"),
        ("5", TypeError, "must be an int"),
        (0, ValueError, "must be >= 1"),
        (np.int64(-3), ValueError, "must be >= 1"),
        (torch.tensor(0), ValueError, "must be >= 1"),
    ],
    ids=repr,
)
def test_num_train_examples_rejects_bools_non_integers_and_non_positive(value, error, match):
    bnn = transform_to_bnn_model(mlp())
    with pytest.raises(error, match=match):
        WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=value)
    with pytest.raises(error, match=match):
        dnn2bnn.elbo(torch.tensor(1.0), bnn, num_train_examples=value)


def test_factors_accept_numpy_and_0d_tensor_reals():
    bnn = transform_to_bnn_model(mlp())
    criterion = WithBNNLoss(bnn, nn.MSELoss(), dnn_factor=np.float32(0.5), bnn_factor=torch.tensor(0.25))
    assert (criterion.dnn_factor, criterion.bnn_factor) == (0.5, 0.25)
    with pytest.raises(TypeError, match="bnn_factor must be a real number"):
        WithBNNLoss(bnn, nn.MSELoss(), bnn_factor=np.bool_(True))


# ---------------------------------------------------------------- keyword inputs, own loss (issue 16)
class KeywordNet(nn.Module):
    """Takes keyword inputs and returns a dict, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, features, mask=None, labels=None):
        h = torch.relu(self.emb(features))
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def test_dict_and_keyword_inputs_reach_the_model():
    bnn = transform_to_bnn_model(KeywordNet(), posterior_sigma_init=0.1)
    x, m, y = torch.randn(5, 6), torch.ones(5), torch.randint(0, 3, (5,))
    criterion = WithBNNLoss.elbo(
        bnn, nn.CrossEntropyLoss(), num_train_examples=100, output_fn=lambda out: out["logits"]
    )
    with dnn2bnn.set_mode(bnn, "mean"):
        expected = nn.functional.cross_entropy(bnn(x)["logits"], y) + kl_divergence(bnn) / 100
        torch.testing.assert_close(criterion({"features": x, "mask": m}, y), expected)
        torch.testing.assert_close(criterion(x, y, mask=m), expected)
        torch.testing.assert_close(criterion(x, y), expected)
    with dnn2bnn.set_mode(bnn, "mean"):  # the mask reaches the model: all-zero features
        criterion({"features": x, "mask": torch.zeros(5)}, y)
        zeroed = nn.functional.cross_entropy(bnn.head.bias_mu.expand(5, 3), y)
    torch.testing.assert_close(criterion.last_data_loss, zeroed.detach())
    criterion({"features": x, "mask": m}, y).backward()
    assert bnn.emb.weight_rho.grad is not None


def test_own_loss_mode_and_elbo_function_add_the_scaled_kl():
    bnn = transform_to_bnn_model(KeywordNet(), posterior_sigma_init=0.1)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    criterion = WithBNNLoss.elbo(bnn, None, num_train_examples=np.int64(200))
    with dnn2bnn.set_mode(bnn, "mean"):
        own = bnn(features=x, labels=y)["loss"]
        expected = own + kl_divergence(bnn) / 200
        torch.testing.assert_close(criterion({"features": x, "labels": y}), expected)
        torch.testing.assert_close(dnn2bnn.elbo(own, bnn, num_train_examples=200), expected)
    torch.testing.assert_close(criterion.last_data_loss, own.detach())
    assert "loss_fn=None" in repr(criterion)
    with pytest.raises(TypeError, match="pass the labels in the model inputs"):
        criterion({"features": x}, y)
    with pytest.raises(TypeError, match="without a loss tensor"):
        criterion({"features": x})
    with pytest.raises(TypeError, match="label is missing"):
        WithBNNLoss(bnn, nn.CrossEntropyLoss(), bnn_factor=0.0)({"features": x})
    with pytest.raises(TypeError, match="scalar data loss"):
        dnn2bnn.elbo(torch.ones(3), bnn, num_train_examples=10)
    assert "elbo" in dnn2bnn.__all__


@pytest.mark.slow  # imports transformers
def test_hugging_face_model_output_gives_its_logits_to_the_loss():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():  # HF forwards defeat torch.fx: converted from the module tree
        warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)
        bnn = transform_to_bnn_model(transformers.BertForSequenceClassification(config).eval())
    ids = torch.randint(1, 50, (4, 7))
    mask = torch.ones_like(ids)
    y = torch.randint(0, 3, (4,))
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    criterion = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=1000)
    own = WithBNNLoss.elbo(bnn, None, num_train_examples=1000)
    with dnn2bnn.set_mode(bnn, "mean"):
        loss = criterion(batch, y)
        reference = own({**batch, "labels": y})
    torch.testing.assert_close(loss, reference)
    loss.backward()


def test_data_and_label_can_still_be_passed_by_keyword():
    bnn = transform_to_bnn_model(mlp((6, 4, 3)), posterior_sigma_init=0.1)
    criterion = WithBNNLoss.elbo(bnn, nn.CrossEntropyLoss(), num_train_examples=10)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with dnn2bnn.set_mode(bnn, "mean"):
        torch.testing.assert_close(criterion(data=x, label=y), criterion(x, y))
