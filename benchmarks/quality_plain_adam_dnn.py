"""The deterministic parent fine-tuned as the "plain Adam" BNN row is: is the accuracy lost the BNN's or the optimizer's?

    python benchmarks/quality_mnist.py --mnist ../shared/data/mnist.pkl.gz --parts posthoc --parent parent.pt
    python benchmarks/quality_plain_adam_dnn.py --mnist ../shared/data/mnist.pkl.gz --parent parent.pt

Loads the LeNet-5 parent that ``quality_mnist.py --parent`` saved and trains it, deterministic, exactly as
``_quality_posthoc._finetune(plain=True)`` trains the fitted BNN: ``torch.optim.Adam(model.parameters(),
lr=1e-3)``, batch 128, one epoch, no schedule, same seed and example order. Prints the parent's and the
fine-tuned network's rows (accuracy, NLL, ECE, AUROC by predictive entropy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _quality_data import load_mnist, ood_sets  # noqa: E402
from _quality_eval import evaluate, markdown_table  # noqa: E402
from _quality_models import LeNet5  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, required=True, help="mnist.pkl.gz")
    parser.add_argument("--parent", type=Path, required=True, help="state_dict saved by quality_mnist.py --parent")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    data = load_mnist(args.mnist)
    oods = ood_sets(data.x_test)

    def parent() -> LeNet5:
        net = LeNet5()
        net.load_state_dict(torch.load(args.parent, weights_only=True))
        return net

    rows = {"parent": evaluate(parent().eval(), data.x_test, data.y_test, oods, samples=1)[0]}
    net = parent().train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    n = len(data.y_train)
    for _ in range(args.epochs):
        for idx in torch.randperm(n, generator=g).split(128):
            loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    rows[f"parent + {args.epochs} ep. plain Adam (deterministic)"] = evaluate(
        net.eval(), data.x_test, data.y_test, oods, samples=1
    )[0]
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
