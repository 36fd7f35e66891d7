"""Train a LeNet-5 with DistributedDataParallel, convert it, fine-tune the BNN under DDP.

    torchrun --nproc-per-node 2 examples/ddp_train.py                 # scikit-learn digits
    torchrun --nproc-per-node 2 examples/ddp_train.py --mnist PATH    # MNIST gzip pickle
    torchrun --nproc-per-node 2 examples/ddp_train.py --quick         # a few seconds (CI)
    python examples/ddp_train.py                                      # one process

The user's training loop is the usual DDP loop; the BNN-specific lines are marked "BNN:".
Rank 0 prints per-epoch metrics (averaged over all ranks) and saves the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import dnn2bnn
from bayesian_lenet import LeNet5, load_data  # the sibling example


def setup() -> tuple[int, int, torch.device]:
    """Join the process group started by torchrun (or make a one-process group)."""
    if "RANK" not in os.environ:  # plain `python examples/ddp_train.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def run_epoch(model, criterion, loader, optimizer, device) -> tuple[float, float]:
    """One epoch; returns (loss, cross-entropy) averaged over the examples of ALL ranks."""
    model.train()
    sums = torch.zeros(3, device=device)  # loss * n, cross-entropy * n, n
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = criterion(x, y)
        loss.backward()  # DDP averages the gradients over the ranks here
        optimizer.step()
        nll = getattr(criterion, "last_data_loss", loss)
        n = torch.tensor(float(len(y)), device=device)
        sums += torch.stack([loss.detach() * n, nll.detach() * n, n])
    dist.all_reduce(sums)
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, device: torch.device, samples: int) -> float:
    """Accuracy of the Monte Carlo predictive (mean of ``samples`` softmax outputs)."""
    model.eval()
    x, y = (t.to(device) for t in data.tensors)
    probs = torch.stack([model(x).softmax(-1) for _ in range(samples)]).mean(0)
    return (probs.argmax(-1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mnist", metavar="PATH", help="MNIST gzip pickle (default: digits)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per stage (default 5 digits, 1 MNIST)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    parser.add_argument("--samples", type=int, default=8, help="Monte Carlo samples for accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="where rank 0 saves the BNN state_dict")
    parser.add_argument("--quick", action="store_true", help="512 training images, 1 epoch each")
    args = parser.parse_args()

    rank, world, device = setup()
    log = print if rank == 0 else (lambda *a, **k: None)
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # identical data split and model on every rank
    train_set, val_set = load_data(args.mnist)
    if args.quick:
        train_set = Subset(train_set, range(512))
        val_set = TensorDataset(*(t[:256] for t in val_set.tensors))
    epochs = 1 if args.quick else args.epochs or (1 if args.mnist else 5)
    n = len(train_set)  # the GLOBAL training-set size; each rank sees about n / world of it
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    log(f"{world} rank(s) on {device}; {n} training / {len(val_set)} validation images "
        f"({'MNIST' if args.mnist else 'sklearn digits'}); global batch {args.batch_size * world}")

    def train(model: nn.Module, criterion: nn.Module, lr: float, samples: int, stage: str) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for epoch in range(1, epochs + 1):
            sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every rank
            loss, nll = run_epoch(model, criterion, loader, optimizer, device)
            acc = accuracy(model.module, val_set, device, samples) if rank == 0 else float("nan")
            log(f"  {stage} epoch {epoch:2d}  loss {loss:8.4f}  cross-entropy {nll:.4f}  "
                f"val acc {acc:.4f}")

    log("\n(1) the deterministic LeNet-5 under DDP")
    dnn = DistributedDataParallel(LeNet5().to(device))
    train(dnn, _CrossEntropy(dnn), 3e-3, 1, "DNN")

    log("\n(2) converted to a BNN, fine-tuned under DDP")
    bnn = dnn2bnn.transform_to_bnn_model(dnn.module)  # BNN: convert the trained replica
    dnn2bnn.distributed.seed_rank(args.seed)  # BNN: each rank draws its own weight noise
    ddp_bnn = DistributedDataParallel(bnn)
    # BNN: the KL is divided by the GLOBAL number of training examples (not len(sampler)).
    criterion = dnn2bnn.WithBNNLoss.elbo(ddp_bnn, nn.CrossEntropyLoss(), num_train_examples=n)
    train(ddp_bnn, criterion, 1e-3, args.samples, "BNN")

    if rank == 0:
        with dnn2bnn.set_mode(bnn, "mean"):
            mean_acc = accuracy(bnn, val_set, device, 1)
        kl = dnn2bnn.kl_divergence(bnn).item()
        log(f"BNN posterior-mean val acc {mean_acc:.4f}; KL {kl:.1f}")
        if args.checkpoint is not None:
            torch.save(bnn.state_dict(), args.checkpoint)  # the replica, without "module."
            log(f"saved {args.checkpoint}")
    dist.barrier()
    log(f"done in {time.perf_counter() - start:.1f}s")
    dist.destroy_process_group()


class _CrossEntropy(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


if __name__ == "__main__":
    main()
