"""Hugging Face transformers models built from small configs (no downloads) convert.

Their forwards defeat plain torch.fx tracing, so conversion falls back to the module tree
(warned once, in the report) and must still convert every Linear, and GPT-2's Conv1D.
"""

import pytest
import torch

from dnn2bnn import BayesianLayer
from tests._zoo import check_conversion

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _bert():
    config = transformers.BertConfig(vocab_size=100, max_position_embeddings=32, num_labels=3, **SMALL)
    inputs = torch.randint(0, 100, (2, 12))
    return transformers.BertForSequenceClassification(config), (inputs,)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config), (torch.randint(0, 100, (2, 12)),)


def _vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=3, **SMALL)
    return transformers.ViTForImageClassification(config), (torch.randn(1, 3, 32, 32),)


@pytest.mark.slow
@pytest.mark.parametrize("make", [_bert, _gpt2, _vit], ids=["bert", "gpt2", "vit"])
def test_hugging_face_model(make):
    torch.manual_seed(0)
    dnn, inputs = make()
    warns = ("could not trace",)
    if make is _gpt2:  # GPT-2 ties lm_head to the token embedding: the head gets its own mean
        warns += ("lm_head.weight was tied to transformer.wte.weight",)
    bnn = check_conversion(dnn, inputs, traced=False, warns=warns)
    if make is _gpt2:
        conv1d = [m for m in bnn.modules() if type(m).__name__ == "BayesConv1D"]
        assert len(conv1d) == 4 * 2 and all(isinstance(m, BayesianLayer) for m in conv1d)
        assert str(bnn.conversion_report).count("Conv1D -> BayesConv1D [weight, bias]") == 8
