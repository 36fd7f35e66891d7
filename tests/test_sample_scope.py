"""One weight sample per call, checkpoint recomputation, read-only samples (issue 14: 7, 9, 12)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import dnn2bnn
from dnn2bnn import BayesLinear


class TwiceLinear(nn.Linear):
    """Reads ``self.weight`` twice in its own forward."""

    def forward(self, x):
        return F.linear(x, self.weight) - F.linear(x, self.weight)


class CosineClassifier(nn.Linear):
    """Normalises the rows of its weight: two reads of ``self.weight``."""

    def forward(self, x):
        rows = self.weight / self.weight.norm(dim=1, keepdim=True)
        self.used = rows.detach()
        return F.linear(F.normalize(x, dim=1), rows)


class TwoReadsFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(x, self.fc.weight) - F.linear(x, self.fc.weight)


def _sigma(model):
    return dnn2bnn.transform_to_bnn_model(model, posterior_sigma_init=0.3)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_a_subclass_reading_weight_twice_gets_one_sample(grad):
    bnn = _sigma(nn.Sequential(TwiceLinear(4, 3)))
    with torch.set_grad_enabled(grad):
        assert bnn(torch.randn(2, 4)).abs().max() == 0
    layer = BayesLinear.from_dnn(TwiceLinear(4, 3), posterior_sigma_init=0.3)
    assert layer(torch.randn(2, 4)).abs().max() == 0


def test_functional_reads_in_the_parent_share_one_sample():
    bnn = _sigma(TwoReadsFunctional())
    assert bnn(torch.randn(2, 4)).abs().max() == 0


def test_cosine_classifier_rows_have_unit_norm():
    layer = BayesLinear.from_dnn(CosineClassifier(6, 5), posterior_sigma_init=0.3)
    layer(torch.randn(3, 6))
    torch.testing.assert_close(layer.used.norm(dim=1), torch.ones(5))
    assert layer._sample_cache is None  # dropped when the call ends


def test_each_call_draws_a_new_sample():
    layer = BayesLinear(4, 3, posterior_sigma_init=0.3)
    x = torch.randn(2, 4)
    assert not torch.equal(layer(x), layer(x))


class Block(nn.Module):
    """Uses ``fc`` twice, with dropout in between (RNG consumed after the first draw)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.fc(self.drop(torch.tanh(self.fc(x))))


class Net(nn.Module):
    def __init__(self, checkpointed):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = Block()
        self.head = nn.Linear(4, 2)
        self.checkpointed = checkpointed

    def forward(self, x):
        h = torch.relu(self.pre(x))
        h = checkpoint(self.block, h, use_reentrant=False) if self.checkpointed else self.block(h)
        h = self.block.fc(h)  # the shared layer used again, outside the checkpointed block
        return self.head(h)


@pytest.mark.parametrize("batched", [False, True], ids=["lazy", "batched"])
def test_checkpoint_recomputation_sees_the_same_samples(batched):
    """Issue 14 item 9: gradients with and without checkpointing are identical."""
    torch.manual_seed(0)
    reference = Net(False)
    grads = []
    for checkpointed in (False, True):
        dnn = Net(checkpointed)
        dnn.load_state_dict(reference.state_dict())
        bnn = _sigma(dnn)
        if batched:
            dnn2bnn.layers.install_batched_sampling(bnn)
        torch.manual_seed(1)
        loss = bnn(torch.randn(8, 4)).pow(2).sum() + dnn2bnn.kl_divergence(bnn)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in bnn.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_checkpoint_of_a_bayesian_layer_called_twice_in_a_row():
    torch.manual_seed(0)
    layer = BayesLinear(4, 4, posterior_sigma_init=0.3)
    x = torch.randn(3, 4)

    def twice(h):
        return layer(torch.tanh(layer(h)))

    torch.manual_seed(2)
    twice(x).sum().backward()
    expected = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    torch.manual_seed(2)
    checkpoint(twice, x, use_reentrant=False).sum().backward()
    for got, want in zip((p.grad for p in layer.parameters()), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "write",
    [
        lambda w: nn.init.zeros_(w),
        lambda w: w.data.fill_(0.0),
        lambda w: w.copy_(torch.zeros_like(w)),
        lambda w: w.__setitem__(0, 1.0),
        lambda w: w.add_(1.0),
    ],
    ids=["init.zeros_", "data.fill_", "copy_", "setitem", "add_"],
)
def test_writes_to_a_sample_raise_naming_the_mean(write):
    """Issue 14 item 12: a write to ``layer.weight`` would be lost: it raises instead."""
    layer = BayesLinear(3, 2)
    before = layer.weight_mu.detach().clone()
    with pytest.raises(RuntimeError, match="weight_mu"):
        write(layer.weight)
    torch.testing.assert_close(layer.weight_mu, before)


def test_reads_of_a_sample_outside_a_call_give_plain_tensors():
    layer = BayesLinear(3, 2, posterior_sigma_init=0.1)
    w = layer.weight
    out = F.linear(torch.ones(1, 3), w) + w.sum()
    assert type(out) is torch.Tensor and type(w * 2) is torch.Tensor
    w.sum().backward()
    assert layer.weight_mu.grad is not None and layer.weight_rho.grad is not None


def test_writes_in_mean_mode_land_on_the_mean():
    layer = BayesLinear(3, 2)
    with dnn2bnn.set_mode(layer, "mean"):
        nn.init.zeros_(layer.weight)
    assert layer.weight_mu.abs().sum() == 0


def test_assigning_a_parameter_to_weight_names_weight_mu():
    layer = BayesLinear(3, 2)
    with pytest.raises(AttributeError, match="weight_mu"):
        layer.weight = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(AttributeError, match="bias_mu"):
        layer.bias = nn.Parameter(torch.zeros(2))


class DirectTwice(BayesLinear):
    """A user's subclass of the Bayesian layer itself, reading ``self.weight`` twice."""

    def forward(self, x):
        return F.linear(x, self.weight) - F.linear(x, self.weight)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_a_direct_subclass_of_a_bayesian_layer_gets_one_sample_per_call(grad):
    layer = DirectTwice(4, 3, posterior_sigma_init=0.3)
    with torch.set_grad_enabled(grad):
        assert layer(torch.randn(2, 4)).abs().max() == 0
    assert layer._sample_cache is None
    assert not DirectTwice.supports_estimators
    x = torch.randn(2, 4)
    assert not torch.equal(F.linear(x, layer.weight), F.linear(x, layer.weight))  # outside a call


class InnerNet(nn.Module):
    """The shared layer is used twice, both times inside the checkpointed block."""

    def __init__(self, reentrant):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = Block()
        self.head = nn.Linear(4, 2)
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.relu(self.pre(x))
        if self.reentrant is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("batched", [False, True], ids=["lazy", "batched"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpoint_of_a_block_using_a_shared_layer_twice(reentrant, batched):
    """The reentrant recomputation runs outside the model call's scope: it drew a second
    sample for the second use, so gradients were silently wrong (output unchanged)."""
    torch.manual_seed(0)
    reference = InnerNet(None)
    grads = []
    for mode in (None, reentrant):
        dnn = InnerNet(mode)
        dnn.load_state_dict(reference.state_dict())
        bnn = _sigma(dnn)
        if batched:
            dnn2bnn.layers.install_batched_sampling(bnn)
        torch.manual_seed(1)
        x = torch.randn(8, 4, requires_grad=True)
        loss = bnn(x).pow(2).sum() + dnn2bnn.kl_divergence(bnn)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in bnn.named_parameters()} | {"x": x.grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
