"""Lightning: convert a trained CNN, fine-tune it with the ELBO, evaluate with Monte Carlo, save and reload.

A small CNN is trained as a plain network on scikit-learn's digits (bundled, no download),
converted with one call, and fine-tuned as a Bayesian network by ``BayesLightningModule``
(loss + KL / len(train), ``rho`` at 10x the learning rate, ``train/kl`` and
``train/data_loss`` logged); validation and test use Monte Carlo predictions
(``val/accuracy``, ``val/nll``, ``val/ece``). ``--devices 2`` trains with Lightning's own
DDP strategy (CPU processes talking over gloo). The checkpoint is reloaded into a freshly
converted CNN.

    python examples/lightning_cnn.py                       # about a minute on a CPU
    python examples/lightning_cnn.py --quick               # a smoke run (CI)
    python examples/lightning_cnn.py --quick --devices 2   # DDP, 2 processes
    python examples/lightning_cnn.py --out DIR             # where the checkpoint goes (default: .)
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dnn2bnn
from dnn2bnn.integrations.lightning import BayesLightningModule, pl


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x4x4
        nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def load_digits(quick: bool) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train, val, test = (slice(0, 1200), slice(1200, 1500), slice(1500, None))
    if quick:
        train, val, test = slice(0, 256), slice(1200, 1328), slice(1500, 1628)
    return tuple(TensorDataset(x[s], y[s]) for s in (train, val, test))  # type: ignore[return-value]


def train_dnn(dnn: nn.Module, data: TensorDataset, epochs: int) -> None:
    """Plain training, standing in for the network you already have."""
    optimizer = torch.optim.Adam(dnn.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=32, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(dnn(x), y).backward()
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs on a subset")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when > 1)")
    parser.add_argument("--out", type=Path, default=Path("."), help="output directory")
    args = parser.parse_args()
    torch.manual_seed(0)  # every DDP process builds and trains the same DNN
    torch.set_num_threads(1)
    train, val, test = load_digits(args.quick)

    dnn = small_cnn()
    train_dnn(dnn, train, epochs=3 if args.quick else 10)
    bnn = dnn2bnn.transform_to_bnn_model(dnn)  # every Conv2d and Linear: trained weights = means

    module = BayesLightningModule(bnn, lr=1e-3, mc_samples=4 if args.quick else 16)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=2 if args.quick else 10, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(args.out),
        log_every_n_steps=1,
    )
    loader = dict(batch_size=32, num_workers=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, DataLoader(train, shuffle=True, **loader), DataLoader(val, **loader))
        logged = dict(trainer.logged_metrics)
        tested = trainer.test(module, DataLoader(test, **loader), verbose=False)[0]
    path = args.out / "bnn.ckpt"
    trainer.save_checkpoint(path)  # written by rank 0 only
    if not trainer.is_global_zero:
        return
    print(f"trained on {trainer.world_size} process(es); KL weight 1/{module.num_train_examples}")
    print(f"last step: train/loss {logged['train/loss']:.4f} = data_loss "
          f"{logged['train/data_loss']:.4f} + kl {logged['train/kl']:.1f} / {module.num_train_examples}")
    print(f"test (MC, {module.mc_samples} samples): accuracy {tested['test/accuracy']:.4f}, "
          f"NLL {tested['test/nll']:.4f}, ECE {tested['test/ece']:.4f}")

    # Reload: convert the same architecture again, then load the checkpoint into it.
    again = BayesLightningModule.load_from_checkpoint(
        path, model=dnn2bnn.transform_to_bnn_model(small_cnn()), weights_only=True
    )
    x = test.tensors[0][:64]
    with torch.no_grad(), dnn2bnn.set_mode(again.model, "mean"), dnn2bnn.set_mode(module.model, "mean"):
        difference = (again.model(x) - module.model(x)).abs().max().item()
    print(f"reloaded {path.name}: max |difference| in mean mode = {difference:.1e}")


if __name__ == "__main__":
    main()
