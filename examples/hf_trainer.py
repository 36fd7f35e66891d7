"""Hugging Face: convert a BERT classifier, fine-tune it with Trainer, predict with uncertainty, save and reload.

The BERT is built from a config (no download) and first trained as a plain network on a
synthetic task (are most tokens in the lower half of the vocabulary?), as if it came
from the Hub already fine-tuned. One call converts it; ``BayesTrainer`` fine-tunes the BNN
with the ELBO (logging ``kl`` and ``data_loss``) and evaluates it with Monte Carlo
predictions; ``dnn2bnn.predict`` gives the predictive and its uncertainty for a tokenizer-
style dict batch; ``save_pretrained`` and ``from_pretrained`` round-trip the posterior.

    python examples/hf_trainer.py           # a few minutes on a CPU
    python examples/hf_trainer.py --quick   # a smoke run (CI)
    python examples/hf_trainer.py --out DIR # where the Trainer and save_pretrained write (default: .)

For a real model, replace ``make_dnn`` by ``BertForSequenceClassification.from_pretrained(...)``
and the synthetic dataset by your tokenized one.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import transformers

import dnn2bnn
from dnn2bnn.integrations.transformers import BayesTrainer, from_pretrained

VOCAB, LENGTH = 200, 16


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; label 1 when most tokens are in the lower half of the vocabulary."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
        self.input_ids[:, 0] = 1  # a [CLS]-like start token
        self.labels = ((self.input_ids[:, 1:] < VOCAB // 2).sum(1) > (LENGTH - 1) // 2).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def make_dnn(quick: bool) -> transformers.BertForSequenceClassification:
    size = 32 if quick else 64
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=size, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * size, max_position_embeddings=LENGTH, num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def training_args(out: Path, *, steps: int, lr: float) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        str(out), max_steps=steps, learning_rate=lr, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, logging_steps=max(1, steps // 4), save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on a tiny model")
    parser.add_argument("--out", type=Path, default=Path("."), help="output directory")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    transformers.logging.set_verbosity_error()
    train, val = Tokens(256 if args.quick else 4096, 0), Tokens(128 if args.quick else 512, 1)
    dnn_steps, bnn_steps = (30, 8) if args.quick else (200, 100)

    # 1. A trained deterministic classifier (stands in for a fine-tuned Hub checkpoint).
    dnn = make_dnn(args.quick)
    transformers.Trainer(
        model=dnn, args=training_args(args.out / "dnn", steps=dnn_steps, lr=3e-3), train_dataset=train
    ).train()

    # 2. One call converts every Linear; the posterior means are the trained weights.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)  # "could not trace": module tree
        bnn = dnn2bnn.transform_to_bnn_model(dnn)
    print(f"converted: {len(bnn.conversion_report.converted)} Bayesian layers "
          f"({bnn.conversion_report.method})")

    # 3. Fine-tune with the ELBO: loss + KL / len(train); rho gets 10x the learning rate.
    trainer = BayesTrainer(
        model=bnn, args=training_args(args.out / "bnn", steps=bnn_steps, lr=1e-4),
        train_dataset=train, eval_dataset=val, mc_samples=8,
    )
    trainer.train()
    log = [entry for entry in trainer.state.log_history if "kl" in entry][-1]
    print(f"last training log: loss {log['loss']:.4f} = data_loss {log['data_loss']:.4f} "
          f"+ kl {log['kl']:.1f} / {trainer.num_train_examples}")
    result = trainer.evaluate()
    print(f"MC evaluation ({trainer.mc_samples} samples): accuracy {result['eval_accuracy']:.4f}, "
          f"NLL {result['eval_nll']:.4f}, ECE {result['eval_ece']:.4f}")

    # 4. Predict with uncertainty from a tokenizer-style dict batch.
    bnn.eval()
    batch = {"input_ids": val.input_ids[:4]}
    prediction = dnn2bnn.predict(bnn, batch, num_samples=32)
    for i in range(len(batch["input_ids"])):
        print(f"  input {i}: p(label=1) {prediction.probs[i, 1]:.3f}, "
              f"mutual information {prediction.mutual_information[i]:.2e} "
              f"(label {val.labels[i].item()})")

    # 5. save_pretrained writes the HF files plus dnn2bnn_config.json; reload the posterior.
    folder = args.out / "bert-bnn"
    bnn.save_pretrained(folder)
    again = from_pretrained(folder)
    ids = val.input_ids[:8]
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"), dnn2bnn.set_mode(again, "mean"):
        difference = (again(input_ids=ids).logits - bnn(input_ids=ids).logits).abs().max().item()
    print(f"reloaded from {folder.name}/: max |difference| in mean mode = {difference:.1e}")


if __name__ == "__main__":
    main()
