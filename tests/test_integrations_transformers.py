"""dnn2bnn.integrations.transformers: Trainer fine-tuning, save_pretrained/from_pretrained,
tie_weights and resize_token_embeddings of converted Hugging Face models.

Tiny BERT and GPT-2 built from configs, synthetic data, CPU, no download.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

import dnn2bnn
from dnn2bnn import CheckpointError
from tests.conftest import state_equal

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
from dnn2bnn.integrations import transformers as hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN = 32


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences; the class is the first token mod 3 (learnable)."""

    def __init__(self, n: int, seed: int, *, lm: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 100, (n, 12), generator=g)
        self.lm = lm

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i]
        return {"input_ids": x, "labels": x.clone() if self.lm else x[0] % 3}


def _bert(**extra):
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=32, num_labels=3, **extra,
    )
    torch.manual_seed(0)
    return _convert(transformers.BertForSequenceClassification(config))


def _convert(model):
    with warnings.catch_warnings():  # HF models defeat torch.fx (warned); GPT-2 ties lm_head to wte
        warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)
        return dnn2bnn.transform_to_bnn_model(model)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return _convert(transformers.GPT2LMHeadModel(config))


def _args(out, **options):
    defaults = dict(
        per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-3,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=2, save_strategy="no",
        dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(str(out), **{**defaults, **options})


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


@pytest.mark.slow  # a fresh interpreter importing torch
def test_importing_dnn2bnn_imports_no_framework():
    code = (
        "import sys, dnn2bnn, dnn2bnn.integrations; "
        "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- save / load
@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_save_pretrained_then_from_pretrained_restores_the_posterior(make, tmp_path):
    bnn = make()
    with torch.no_grad():
        for p in bnn.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial values
    bnn.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "dnn2bnn_config.json").read_text())
    assert record["converted"] and record["model_class"].endswith(type(bnn).__name__)
    again = hf.from_pretrained(tmp_path)
    assert type(again) is type(bnn) and not again.training
    assert state_equal(again, bnn)
    ids = torch.randint(0, 100, (2, 10))
    bnn.eval()
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"), dnn2bnn.set_mode(again, "mean"):
        assert torch.equal(again(ids).logits, bnn(ids).logits)


def test_from_pretrained_restores_each_parametrization_and_reads_an_old_record_as_softplus(tmp_path):
    """Issue 17: exp is the default now; a record without parametrizations (written when softplus
    was the only one) must not be replayed under the new default."""
    bnn = _bert()
    classifier = bnn.classifier
    with torch.no_grad():
        classifier.weight_rho.add_(3.0)  # sigmas where exp and softplus differ
    bnn.save_pretrained(tmp_path)
    record_path = tmp_path / "dnn2bnn_config.json"
    record = json.loads(record_path.read_text())
    assert record["layers"]["classifier"] == {"parametrization": "exp"}
    again = hf.from_pretrained(tmp_path)
    assert again.classifier.parametrization.value == "exp"
    torch.testing.assert_close(again.classifier.posterior_sigma(), classifier.posterior_sigma())
    # the same weights under a record from before: their rho meant softplus(rho)
    del record["layers"]
    record_path.write_text(json.dumps(record))
    old = hf.from_pretrained(tmp_path)
    assert old.classifier.parametrization.value == "softplus"
    torch.testing.assert_close(old.classifier.weight_rho, classifier.weight_rho)
    torch.testing.assert_close(
        old.classifier.posterior_sigma(), torch.nn.functional.softplus(classifier.weight_rho.detach())
    )
    # a record without them whose call chose exp explicitly (dnn2bnn before issue 17's default)
    config = bnn.config
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dnn2bnn.ConversionWarning)
        chosen = dnn2bnn.transform_to_bnn_model(
            transformers.BertForSequenceClassification(config), parametrization="exp"
        )
    chosen.save_pretrained(tmp_path / "chosen")
    record = json.loads((tmp_path / "chosen" / "dnn2bnn_config.json").read_text())
    del record["layers"]
    (tmp_path / "chosen" / "dnn2bnn_config.json").write_text(json.dumps(record))
    assert hf.from_pretrained(tmp_path / "chosen").classifier.parametrization.value == "exp"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_save_bnn_of_a_converted_model_loads_without_arch(make, suffix, tmp_path):
    # was: load_bnn -> CheckpointError "BertForSequenceClassification.__init__() missing
    # 1 required positional argument: 'config'" (save_bnn recorded the class, not its config)
    bnn = make()
    with torch.no_grad():
        for p in bnn.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if hasattr(bnn, "lm_head"):  # the config recorded is the one at save time
        bnn.resize_token_embeddings(110)
    dnn2bnn.save_bnn(bnn, tmp_path / f"bnn{suffix}")
    again = dnn2bnn.load_bnn(tmp_path / f"bnn{suffix}")
    assert type(again) is type(bnn) and again.config.vocab_size == bnn.config.vocab_size
    assert state_equal(again, bnn)
    ids = torch.randint(0, 100, (2, 10))
    bnn.eval(), again.eval()
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"), dnn2bnn.set_mode(again, "mean"):
        assert torch.equal(again(ids).logits, bnn(ids).logits)
    dnn2bnn.save_bnn(again, tmp_path / f"again{suffix}")  # and again, without arch
    assert state_equal(dnn2bnn.load_bnn(tmp_path / f"again{suffix}"), bnn)


def test_plain_from_pretrained_loses_the_posterior_so_ours_is_needed(tmp_path):
    bnn = _bert()
    bnn.save_pretrained(tmp_path)
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    assert not any(dnn2bnn.is_bayesian_layer(m) for m in plain.modules())
    assert not torch.equal(plain.classifier.weight, bnn.classifier.weight_mu)  # re-initialised


def test_from_pretrained_refuses_a_directory_without_record(tmp_path):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16)
    transformers.BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="dnn2bnn_config.json"):
        hf.from_pretrained(tmp_path)


def test_from_pretrained_refuses_weights_that_do_not_fit(tmp_path):
    bnn = _bert()
    bnn.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    del state["classifier.weight_rho"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="classifier.weight_rho"):
        hf.from_pretrained(tmp_path)


def test_converted_model_pickles_and_copies_with_its_class():
    import copy
    import pickle

    bnn = _bert()
    for other in (copy.deepcopy(bnn), pickle.loads(pickle.dumps(bnn))):
        assert type(other) is type(bnn) and state_equal(other, bnn)


def test_to_dnn_model_saves_without_a_record(tmp_path):
    bnn = _bert()
    (tmp_path / "dnn2bnn_config.json").write_text("{}")  # stale
    dnn2bnn.to_dnn(bnn).save_pretrained(tmp_path)
    assert not (tmp_path / "dnn2bnn_config.json").exists()


# ---------------------------------------------------------------------- tie / resize
def test_gpt2_tie_weights_is_a_no_op_after_conversion_and_refuses_a_forced_tie():
    bnn = _gpt2()
    assert bnn.config.tie_word_embeddings is False  # the conversion untied lm_head and wte
    before = bnn.lm_head.weight_mu.detach().clone()
    bnn.tie_weights()  # was KeyError: "attribute 'weight' already exists"
    assert torch.equal(bnn.lm_head.weight_mu, before)
    bnn.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match=r"lm_head \(BayesLinear\) is a Bayesian layer"):
        bnn.tie_weights()


def test_gpt2_resize_token_embeddings_keeps_the_head_bayesian(tmp_path):
    bnn = _gpt2()
    head = bnn.lm_head
    with torch.no_grad():
        head.weight_rho.add_(torch.randn_like(head.weight_rho))
    mu, rho = head.weight_mu.detach().clone(), head.weight_rho.detach().clone()
    init_rho = rho.new_full((), math.log(head.posterior_sigma_init))  # exp: the default
    bnn.resize_token_embeddings(120)
    new = bnn.lm_head
    assert isinstance(new, dnn2bnn.BayesLinear) and new.out_features == 120
    assert torch.equal(new.weight_mu[:100], mu) and torch.equal(new.weight_rho[:100], rho)
    assert torch.allclose(new.weight_rho[100:], init_rho.expand(20, 32))
    assert new.weight_prior_sigma.shape in ((), (120, 32), (1,))
    assert bnn.transformer.wte.weight.shape == (120, 32) and bnn.config.vocab_size == 120
    assert bnn(torch.randint(0, 120, (2, 6))).logits.shape == (2, 6, 120)
    bnn.resize_token_embeddings(90)  # shrinking keeps the first rows
    assert torch.equal(bnn.lm_head.weight_rho, rho[:90])
    bnn.save_pretrained(tmp_path)
    assert state_equal(hf.from_pretrained(tmp_path), bnn)


def test_bert_mlm_head_tied_by_pattern_is_untied_saved_and_resized(tmp_path):
    # BertForMaskedLM ties decoder.weight/bias by patterns that Transformers expands against
    # the parameter names: without untying, tie_weights() would tie decoder.weight_rho and
    # weight_mu to the word embeddings, and save_pretrained would drop the decoder's tensors.
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    bnn = _convert(transformers.BertForMaskedLM(config))
    assert bnn.config.tie_word_embeddings is False
    assert bnn.get_expanded_tied_weights_keys(all_submodels=True) == {}
    rho = bnn.cls.predictions.decoder.weight_rho.detach().clone()
    bnn.tie_weights()
    assert torch.equal(bnn.cls.predictions.decoder.weight_rho, rho)
    bnn.save_pretrained(tmp_path / "a")
    assert state_equal(hf.from_pretrained(tmp_path / "a"), bnn)
    bnn.resize_token_embeddings(110)  # BERT's set_output_embeddings also assigns the head's bias
    decoder = bnn.cls.predictions.decoder
    assert isinstance(decoder, dnn2bnn.BayesLinear) and decoder.bias_rho.shape == (110,)
    assert bnn(input_ids=torch.randint(0, 110, (2, 6))).logits.shape == (2, 6, 110)


# ---------------------------------------------------------------------- Trainer
def test_trainer_loss_is_data_loss_plus_kl_over_n(tmp_path):
    bnn = _bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path), train_dataset=_Tokens(N_TRAIN, 0))
    assert trainer.num_train_examples == N_TRAIN and trainer.kl_weight == 1 / N_TRAIN
    batch = {"input_ids": torch.randint(0, 100, (4, 12)), "labels": torch.tensor([0, 1, 2, 0])}
    bnn.train()
    with dnn2bnn.set_mode(bnn, "mean"), torch.no_grad():
        loss = trainer.compute_loss(bnn, dict(batch))
        expected = bnn(**batch).loss + dnn2bnn.kl_divergence(bnn) / N_TRAIN
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    bnn.eval()  # evaluation losses carry no KL
    with dnn2bnn.set_mode(bnn, "mean"), torch.no_grad():
        assert trainer.compute_loss(bnn, dict(batch)).item() == pytest.approx(bnn(**batch).loss.item())


def test_trainer_optimizer_gives_rho_its_learning_rate_and_no_weight_decay(tmp_path):
    bnn = _bert()
    trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path, weight_decay=0.1),
                              train_dataset=_Tokens(N_TRAIN, 0), rho_lr=0.05)
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    rho_ids = {id(p) for n, p in bnn.named_parameters() if n.endswith("_rho")}
    assert {id(p) for p in groups["rho"]["params"]} == rho_ids
    assert groups["rho"]["lr"] == 0.05 and groups["rho"]["weight_decay"] == 0.0
    assert groups["means"]["lr"] == 1e-3 and groups["means"]["weight_decay"] == 0.1
    assert any(p is bnn.classifier.weight_mu for p in groups["means"]["params"])
    assert any(p is bnn.classifier.bias_mu for p in groups["means_no_decay"]["params"])
    default = hf.BayesTrainer(model=_bert(), args=_args(tmp_path), train_dataset=_Tokens(8, 0))
    rho = next(g for g in default.create_optimizer().param_groups if g["name"] == "rho")
    assert rho["lr"] == pytest.approx(dnn2bnn.DEFAULT_RHO_LR_FACTOR * 1e-3)


def test_trainer_logs_kl_and_data_loss_and_evaluates_with_mc(tmp_path):
    bnn = _bert()
    trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path, max_steps=2), mc_samples=3,
                              train_dataset=_Tokens(N_TRAIN, 0), eval_dataset=_Tokens(16, 1))
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "kl" in entry)
    assert log["kl"] > 0
    assert log["loss"] == pytest.approx(log["data_loss"] + log["kl"] / N_TRAIN, rel=1e-6)
    assert 0.5 < log["data_loss"] < 2.0  # a 3-class cross entropy, not the KL-dominated ELBO
    result = trainer.evaluate()
    assert 0 <= result["eval_accuracy"] <= 1 and 0 <= result["eval_ece"] <= 1
    assert result["eval_nll"] == pytest.approx(result["eval_loss"], rel=1e-5)


def test_mc_evaluation_of_a_collapsed_posterior_is_the_deterministic_model(tmp_path):
    bnn = _bert()
    with torch.no_grad():
        for n, p in bnn.named_parameters():
            if n.endswith("_rho"):
                p.fill_(-40.0)  # sigma = softplus(-40) ~ 4e-18
    data = _Tokens(16, 1)
    trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path), mc_samples=2, eval_dataset=data)
    result = trainer.evaluate()
    bnn.eval()
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"):
        probs = torch.softmax(bnn(input_ids=data.x).logits, -1)
    labels = data.x[:, 0] % 3
    assert result["eval_accuracy"] == dnn2bnn.metrics.accuracy(probs, labels)
    assert result["eval_nll"] == pytest.approx(dnn2bnn.metrics.nll(probs, labels), rel=1e-5)
    assert result["eval_ece"] == pytest.approx(dnn2bnn.metrics.ece(probs, labels), abs=1e-5)


def test_predict_without_labels_is_monte_carlo_too(tmp_path):
    class Unlabeled(_Tokens):
        def __getitem__(self, i):
            return {"input_ids": self.x[i]}

    bnn = _bert()
    trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path), mc_samples=4)
    output = trainer.predict(Unlabeled(8, 1))
    log_probs = torch.as_tensor(output.predictions)
    assert log_probs.shape == (8, 3) and output.label_ids is None
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(8), atol=1e-5)
    again = torch.as_tensor(trainer.predict(Unlabeled(8, 1)).predictions)
    assert not torch.equal(again, log_probs)  # sampled weights, not one deterministic pass


def test_gpt2_lm_trains_and_evaluates_shifted_tokens(tmp_path):
    bnn = _gpt2()
    trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path, max_steps=2), mc_samples=2,
                              train_dataset=_Tokens(16, 0, lm=True), eval_dataset=_Tokens(8, 1, lm=True))
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "kl" in entry)
    assert log["loss"] == pytest.approx(log["data_loss"] + log["kl"] / 16, rel=1e-6)
    assert 3.0 < log["data_loss"] < 6.0  # ~log(100) for untrained token prediction
    result = trainer.evaluate()
    assert result["eval_nll"] == pytest.approx(result["eval_loss"], rel=1e-5)
    assert 3.0 < result["eval_nll"] < 6.0


def test_trainer_checkpoint_resumes_exactly_and_reloads(tmp_path):
    def trainer(out):
        args = _args(out, max_steps=4, save_strategy="steps", save_steps=2)
        return hf.BayesTrainer(model=_bert(), args=args, train_dataset=_Tokens(N_TRAIN, 0))

    straight = trainer(tmp_path / "a")
    straight.train()
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert state_equal(resumed.model, straight.model)
    reloaded = hf.from_pretrained(tmp_path / "a" / "checkpoint-4")
    assert state_equal(reloaded, straight.model)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37,
                                     max_position_embeddings=32, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "plain")
    trainer = hf.BayesTrainer(model=_bert(), args=_args(tmp_path, max_steps=1),
                              train_dataset=_Tokens(8, 0))
    with pytest.raises(CheckpointError, match="weight_mu"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain"))


def test_trainer_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="num_train_examples"):
        hf.BayesTrainer(model=_bert(), args=_args(tmp_path), num_train_examples=0)
    with pytest.raises(ValueError, match="mc_samples"):
        hf.BayesTrainer(model=_bert(), args=_args(tmp_path), mc_samples=-1)
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_Tokens(8, 0))

    stream = Stream()
    trainer = hf.BayesTrainer(model=_bert(), args=_args(tmp_path, max_steps=1), train_dataset=stream)
    with pytest.raises(ValueError, match="pass num_train_examples"):
        trainer.num_train_examples


@pytest.mark.parametrize("items", [None, 24], ids=["trainer-divides", "loss-already-scaled"])
def test_kl_counts_once_per_optimizer_step_under_gradient_accumulation(items, tmp_path):
    bnn = _gpt2()  # accepts num_items_in_batch: its loss may already be scaled for accumulation
    args = _args(tmp_path, gradient_accumulation_steps=2)
    trainer = hf.BayesTrainer(model=bnn, args=args, train_dataset=_Tokens(16, 0, lm=True))
    trainer.current_gradient_accumulation_steps = 2
    assert trainer.model_accepts_loss_kwargs
    ids = torch.randint(0, 100, (2, 12))
    bnn.train()
    with dnn2bnn.set_mode(bnn, "mean"), torch.no_grad():
        torch.manual_seed(1)
        loss = trainer.compute_loss(bnn, {"input_ids": ids, "labels": ids}, num_items_in_batch=items)
        torch.manual_seed(1)  # the same dropout
        kwargs = {} if items is None else {"num_items_in_batch": items}
        data = bnn(input_ids=ids, labels=ids, **kwargs).loss
        kl = dnn2bnn.kl_divergence(bnn)
    # the Trainer divides an unscaled micro-batch loss by the 2 steps itself; a scaled one it does not
    expected = data + kl / 16 / (1 if items is None else 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_seq2seq_trainer_trains_and_evaluates_a_tiny_t5(tmp_path):
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=37, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    bnn = _convert(transformers.T5ForConditionalGeneration(config))
    args = transformers.Seq2SeqTrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1, save_strategy="no",
    )
    trainer = hf.BayesSeq2SeqTrainer(model=bnn, args=args, mc_samples=2,
                                     train_dataset=_Tokens(16, 0, lm=True), eval_dataset=_Tokens(8, 1, lm=True))
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "kl" in entry)
    assert log["loss"] == pytest.approx(log["data_loss"] + log["kl"] / 16, rel=1e-6)
    result = trainer.evaluate()  # labels are the decoder targets: no shift
    assert result["eval_nll"] == pytest.approx(result["eval_loss"], rel=1e-5)
    assert 3.0 < result["eval_nll"] < 6.0 and 0 <= result["eval_ece"] <= 1


# ---------------------------------------------------------------------- F2 review: bad inputs
class _Spans(torch.utils.data.Dataset):
    """Question answering examples: two label names, start and end positions."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "start_positions": i % 12, "end_positions": (i + 3) % 12}


def test_several_label_names_get_no_mc_metrics_of_raw_logits(tmp_path):
    # was: mc_metrics applied to the Trainer's (start_logits, end_logits): a silent
    # eval_accuracy 0.125, eval_nll 0.013, eval_ece 0.98 that meant nothing
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    bnn = _convert(transformers.BertForQuestionAnswering(config))
    with pytest.warns(UserWarning, match=r"several label names \['start_positions', 'end_positions'\]"):
        trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path), train_dataset=_Spans(),
                                  eval_dataset=_Spans(), mc_samples=2)
    assert trainer.compute_metrics is None
    result = trainer.evaluate()
    assert "eval_loss" in result and not {"eval_accuracy", "eval_nll", "eval_ece"} & set(result)


def test_predict_with_generate_gets_no_mc_metrics_of_token_ids(tmp_path):
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=37, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    bnn = _convert(transformers.T5ForConditionalGeneration(config))
    args = transformers.Seq2SeqTrainingArguments(str(tmp_path), report_to=[], use_cpu=True,
                                                 predict_with_generate=True)
    with pytest.warns(UserWarning, match="predict_with_generate=True evaluates by generation"):
        trainer = hf.BayesSeq2SeqTrainer(model=bnn, args=args, mc_samples=2)
    assert trainer.compute_metrics is None


def test_an_unconverted_model_is_refused(tmp_path):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37)
    with pytest.raises(TypeError, match="BertForSequenceClassification without Bayesian layer"):
        hf.BayesTrainer(model=transformers.BertForSequenceClassification(config), args=_args(tmp_path))


def test_a_user_optimizer_is_checked_for_the_rho_learning_rate(tmp_path):
    bnn = _bert()
    plain = torch.optim.SGD(bnn.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"rho_lr=0.5 .* optimizers=\(optimizer, \.\.\.\) was passed"):
        hf.BayesTrainer(model=bnn, args=_args(tmp_path), optimizers=(plain, None), rho_lr=0.5)
    with pytest.warns(UserWarning, match="rho parameters train at the means' learning rate"):
        hf.BayesTrainer(model=bnn, args=_args(tmp_path), optimizers=(plain, None))
    groups = dnn2bnn.bayes_param_groups(bnn, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path),
                                  optimizers=(torch.optim.SGD(groups, lr=0.1), None))
    assert trainer.create_optimizer() is trainer.optimizer


def test_generate_in_mean_mode_is_the_deterministic_posterior_mean_model():
    # the documented way to generate reproducibly from a converted GPT-2
    bnn = _gpt2().eval()
    prompt = torch.randint(0, 100, (2, 4), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    dnn = dnn2bnn.to_dnn(bnn).eval()
    with dnn2bnn.set_mode(bnn, "mean"):
        first = bnn.generate(prompt, **options)
        assert torch.equal(bnn.generate(prompt, **options), first)
    assert first.shape == (2, 9) and torch.equal(dnn.generate(prompt, **options), first)


class _Targets(torch.utils.data.Dataset):
    """Float targets: one per sequence (regression) or three (multi-label)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(i))
        target = (ids[: self.width] % 2).float()
        return {"input_ids": ids, "labels": target[0] if self.width == 1 else target}


@pytest.mark.parametrize("width", [1, 3], ids=["regression", "multi-label"])
def test_float_targets_are_evaluated_as_the_trainer_does_with_a_warning(width, tmp_path):
    # was: RuntimeError "gather(): Expected dtype int32/int64 for index" (regression) and
    # IndexError "The shape of the mask [24] ... does not match" (multi-label) in evaluate()
    problem = None if width == 1 else "multi_label_classification"  # regression: found at forward
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37,
                                     num_labels=width, problem_type=problem)
    torch.manual_seed(0)
    bnn = _convert(transformers.BertForSequenceClassification(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = hf.BayesTrainer(model=bnn, args=_args(tmp_path), train_dataset=_Targets(width),
                                  eval_dataset=_Targets(width), mc_samples=2)
        result = trainer.evaluate()
    messages = [str(w.message) for w in caught if "BayesTrainer" in str(w.message)]
    assert len(messages) == 1 and ("float32" in messages[0] or "multi_label" in messages[0])
    assert "eval_loss" in result and "eval_accuracy" not in result
    assert trainer.compute_metrics is None


@pytest.mark.parametrize("how", ["save_pretrained", "save_bnn"])
def test_a_bfloat16_model_reloads_in_bfloat16(how, tmp_path):
    # was: from_pretrained built the model in float32 (config.dtype is a torch.dtype in
    # Transformers 5, not a string), so mean-mode outputs differed from the saved model's
    bnn = _gpt2().to(torch.bfloat16).eval()
    if how == "save_pretrained":
        bnn.save_pretrained(tmp_path)
        again = hf.from_pretrained(tmp_path)
    else:
        dnn2bnn.save_bnn(bnn, tmp_path / "bnn.safetensors")
        again = dnn2bnn.load_bnn(tmp_path / "bnn.safetensors").eval()
    assert again.lm_head.weight_mu.dtype == torch.bfloat16 and state_equal(again, bnn)
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad(), dnn2bnn.set_mode(bnn, "mean"), dnn2bnn.set_mode(again, "mean"):
        assert torch.equal(again(ids).logits, bnn(ids).logits)
