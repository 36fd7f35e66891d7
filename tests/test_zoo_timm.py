"""A representative set of timm models converts (pretrained=False, small inputs)."""

import pytest
import torch

from dnn2bnn import BayesianLayer
from tests._zoo import check_conversion

timm = pytest.importorskip("timm")

# (name, input side, builder arguments): CNNs, EfficientNet, ConvNeXt, RegNet, ViT/DeiT,
# MLP-Mixer/ResMLP, LeViT, PVT, EVA-02 (rotary attention), CoAtNet, MaxViT.
MODELS = [
    ("resnet10t", 32, {}),
    ("efficientnet_b0", 32, {}),
    ("mobilenetv3_small_050", 32, {}),
    ("regnetx_002", 32, {}),
    ("convnext_atto", 32, {}),
    ("vit_tiny_patch16_224", 32, {"img_size": 32}),
    ("deit_tiny_distilled_patch16_224", 32, {"img_size": 32}),
    ("mixer_s16_224", 32, {"img_size": 32}),
    ("resmlp_12_224", 32, {"img_size": 32}),
    ("levit_128s", 64, {"img_size": 64}),
    ("pvt_v2_b0", 32, {}),
    ("eva02_tiny_patch14_224", 28, {"img_size": 28}),
    ("test_coatnet", 64, {"img_size": 64}),
    ("test_maxvit", 64, {"img_size": 64}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("name, size, kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_timm_model(name, size, kwargs):
    torch.manual_seed(0)
    dnn = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    bnn = check_conversion(dnn, (torch.randn(1, 3, size, size),))
    # attention projections (a Linear, or LeViT's Linear+BatchNorm) hold Bayesian weights
    qkv = [m for n, m in bnn.named_modules() if n.endswith(".qkv")]
    assert all(any(isinstance(x, BayesianLayer) for x in m.modules()) for m in qkv)
