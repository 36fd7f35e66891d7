"""Distributed training of converted models: rank seeding, DDP and FSDP2 on CPU with gloo.

One spawn of 2 processes (torch.multiprocessing, gloo, a file store in ``tmp_path``) trains
the same converted MLP under DDP, then under FSDP2, on the same data with the same per-rank
noise and plain SGD, so FSDP2 must reach the parameters DDP reaches.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dnn2bnn
from dnn2bnn import WithBNNLoss, transform_to_bnn_model
from dnn2bnn.distributed import get_rank, seed_rank
from tests.conftest import mlp, state_equal

WORLD = 2
KINDS = ("ddp", "fsdp")
EPOCHS = 6
SIZES = (20, 32, 5)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


# ------------------------------------------------------------------------ seed_rank
def test_get_rank_reads_torchrun_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert get_rank() == 0
    monkeypatch.setenv("RANK", "3")
    assert get_rank() == 3
    monkeypatch.setenv("RANK", "three")
    with pytest.raises(ValueError, match="RANK must be an integer, got 'three'"):
        get_rank()


def test_seed_rank_differs_per_rank_and_is_reproducible(monkeypatch):
    layer = dnn2bnn.BayesLinear(6, 4, posterior_sigma_init=0.1)
    draws = {}
    for rank in (0, 1, 0):
        monkeypatch.setenv("RANK", str(rank))
        assert seed_rank(10) == 10 + rank
        draws.setdefault(rank, []).append(layer.weight.detach())
    assert torch.equal(draws[0][0], draws[0][1])  # same seed and rank: same noise
    assert not torch.equal(draws[0][0], draws[1][0])  # another rank: other noise


@pytest.mark.parametrize("seed, error", [(1.5, TypeError), (True, TypeError), (-1, ValueError)])
def test_seed_rank_rejects_bad_seed(seed, error):
    with pytest.raises(error, match="seed must be"):
        seed_rank(seed)


# ------------------------------------------------------------------- spawned training
def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, SIZES[0], generator=generator)
    teacher = torch.randn(SIZES[0], SIZES[-1], generator=generator)
    return TensorDataset(x, (x @ teacher).argmax(1))


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for kind in KINDS:
            _train(rank, kind, out)
    finally:
        dist.destroy_process_group()


def _train(rank: int, kind: str, out: str) -> None:
    """One rank: convert, wrap (DDP or fully_shard), train with a DistributedSampler, save."""
    torch.manual_seed(0)  # the same model on every rank
    bnn = transform_to_bnn_model(mlp(SIZES), posterior_sigma_init=0.05)
    dataset = _dataset()
    if kind == "ddp":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(bnn)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in bnn:
            if isinstance(layer, dnn2bnn.BayesianLayer):
                fully_shard(layer)
        wrapped = fully_shard(bnn)
    # The KL is scaled by the GLOBAL number of examples, not by len(sampler).
    criterion = WithBNNLoss.elbo(wrapped, nn.CrossEntropyLoss(), num_train_examples=len(dataset))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler)
    seed_rank(100)
    losses, data_losses = [], []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(x, y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            data_losses.append(criterion.last_data_loss.item())
    if kind == "ddp":
        state = bnn.state_dict()
        noise = (bnn[0].weight - bnn[0].weight_mu).detach()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(bnn, options=options)  # collective; full on rank 0
        noise = None
    torch.save(
        {"state": state, "losses": losses, "data_losses": data_losses, "noise": noise},
        Path(out) / f"{kind}{rank}.pt",
    )
    if rank == 0:
        torch.save(state, Path(out) / f"{kind}_checkpoint.pt")
    dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """Spawn the ranks once for all tests (starting processes dominates the cost)."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    return tmp_path, {
        kind: [torch.load(tmp_path / f"{kind}{r}.pt", weights_only=True) for r in range(WORLD)]
        for kind in KINDS
    }


def _reload(path: Path) -> nn.Module:
    fresh = transform_to_bnn_model(mlp(SIZES))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    return fresh


@pytest.mark.slow
def test_ddp_replicas_stay_identical_and_learn(runs):
    ranks = runs[1]["ddp"]
    states = [r["state"] for r in ranks]
    names = [k for k in states[0] if k.endswith(("_mu", "_rho")) and "prior" not in k]
    assert len(names) == 8  # weight/bias mu/rho of both layers
    for name in names:  # gradients were averaged: every replica holds the same posterior
        assert torch.equal(states[0][name], states[1][name]), name
    sigma = torch.exp(states[0]["0.weight_rho"])  # exp: the default
    assert not torch.allclose(sigma, torch.full_like(sigma, 0.05))  # sigma was trained too
    # Each rank drew its own noise (seed_rank), not the same sample twice.
    assert not torch.allclose(ranks[0]["noise"], ranks[1]["noise"])
    for rank in ranks:
        first, last = rank["data_losses"][:4], rank["data_losses"][-4:]
        assert sum(last) < 0.8 * sum(first), rank["data_losses"]
        assert rank["losses"][-1] < rank["losses"][0]


@pytest.mark.slow
def test_ddp_checkpoint_from_rank0_reloads(runs):
    tmp_path, ranks = runs[0], runs[1]["ddp"]
    fresh = _reload(tmp_path / "ddp_checkpoint.pt")
    trained = transform_to_bnn_model(mlp(SIZES))
    trained.load_state_dict(ranks[1]["state"])  # another rank's replica
    assert state_equal(fresh, trained)
    x = torch.randn(7, SIZES[0])
    with dnn2bnn.set_mode(fresh, "mean"), dnn2bnn.set_mode(trained, "mean"):
        assert torch.equal(fresh(x), trained(x))


@pytest.mark.slow
def test_fsdp2_fully_shard_matches_ddp(runs):
    tmp_path, ranks, ddp_ranks = runs[0], runs[1]["fsdp"], runs[1]["ddp"]
    # Same data, same per-rank noise, plain SGD: FSDP2 reaches DDP's posterior (up to the
    # order of floating-point reductions), so the sharded KL and its gradient are right.
    for a, b in zip(ranks[0]["losses"], ddp_ranks[0]["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    fsdp_state, ddp_state = ranks[0]["state"], ddp_ranks[0]["state"]
    assert fsdp_state.keys() == ddp_state.keys()
    for name in ddp_state:
        torch.testing.assert_close(fsdp_state[name], ddp_state[name], rtol=1e-4, atol=1e-5)
    _reload(tmp_path / "fsdp_checkpoint.pt")  # the gathered full state dict loads
