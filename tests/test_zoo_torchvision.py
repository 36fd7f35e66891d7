"""Every torchvision classification model, plus detection and segmentation models, converts.

Models are built with ``weights=None`` (no downloads) and 10 classes. The zoo holds ~5
billion parameters, far too many to run within the test budget, so it runs in two forms:

* every model is converted at full size on the ``meta`` device (no memory, no data): all
  targeted parameters Bayesian (counted), no Linear/Conv/attention layer left
  deterministic, traced by torch.fx without a skip, attention checks for ViT and Swin;
* the numeric checks (mean mode reproduces the DNN, sample mode is stochastic, finite KL,
  one backward pass reaching every layer) run on every model of up to ``RUN_MAX_PARAMS``
  parameters, on a few larger representatives, and on reduced-width instances of the
  architecture classes whose every member is large (``REDUCED``), so that every
  architecture class and block type of the list runs numerically except VGG and AlexNet
  (plain Conv/Linear stacks whose fixed 100M-parameter classifiers exceed the budget).

Inputs are the smallest each model accepts (``INPUT``), batch 1.
"""

import pytest
import torch
from torchvision import models
from functools import partial

from torchvision.models import convnext, efficientnet, maxvit, regnet, swin_transformer, vision_transformer

from dnn2bnn import BayesianLayer, BayesMultiheadAttention
from tests._zoo import check_conversion, convert_checked

CLASSIFICATION = models.list_models(module=models)
RUN_MAX_PARAMS = 8_000_000
#: Larger models run numerically too: one per architecture class not otherwise covered.
REPRESENTATIVES = {"resnet18", "resnet50", "inception_v3", "googlenet"}
#: Smallest input side each model accepts (default 32).
INPUT = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 224}
#: Builder arguments: ViTs fix their input size when built; skip the slow scipy init.
BUILD = {
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 32},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32},
    "vit_h_14": {"image_size": 28},
    "googlenet": {"init_weights": False},
    "inception_v3": {"init_weights": False},
}
#: Reduced-width instances of the classes whose smallest torchvision member is large.
REDUCED = {
    "VisionTransformer": (
        lambda: vision_transformer.VisionTransformer(
            image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        ),
        32,
    ),
    "SwinTransformer-v1": (
        lambda: swin_transformer.SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[1, 2], window_size=[4, 4], num_classes=10
        ),
        32,
    ),
    "SwinTransformer-v2": (
        lambda: swin_transformer.SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[1, 2], window_size=[4, 4], num_classes=10,
            block=swin_transformer.SwinTransformerBlockV2, downsample_layer=swin_transformer.PatchMergingV2,
        ),
        32,
    ),
    "ConvNeXt": (
        lambda: convnext.ConvNeXt(
            [convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)], num_classes=10
        ),
        32,
    ),
    "EfficientNet-v2": (
        lambda: efficientnet.EfficientNet(
            [efficientnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.FusedMBConvConfig(4, 3, 2, 8, 16, 1),
             efficientnet.MBConvConfig(4, 3, 2, 16, 24, 1)],
            dropout=0.1, last_channel=64, num_classes=10,
            norm_layer=partial(torch.nn.BatchNorm2d, eps=1e-03),
        ),
        32,
    ),
    "MaxVit": (
        lambda: maxvit.MaxVit(
            input_size=(64, 64), stem_channels=8, partition_size=2, block_channels=[8, 16, 32, 32],
            block_layers=[1, 1, 1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10,
        ),
        64,
    ),
}
#: Architecture classes that run numerically (here or in REDUCED), by class name.
RUN_NUMERICALLY = {
    "ResNet", "Inception3", "EfficientNet", "DenseNet", "RegNet", "GoogLeNet", "MobileNetV2",
    "MobileNetV3", "MNASNet", "ShuffleNetV2", "SqueezeNet", "VisionTransformer", "SwinTransformer",
    "ConvNeXt", "MaxVit",
}
NOT_RUN = {"VGG", "AlexNet"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def _regnet_on_meta(monkeypatch):
    """RegNet computes its widths with torch ops; on the meta device they have no values."""
    build = regnet.BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return build(cls, *args, **kwargs)

    monkeypatch.setattr(regnet.BlockParams, "from_init_params", classmethod(on_cpu))


def _check_architecture(name, bnn):
    if name.startswith("vit_"):
        attention = [m for m in bnn.modules() if isinstance(m, torch.nn.MultiheadAttention)]
        assert attention and all(isinstance(m, BayesMultiheadAttention) for m in attention)
        assert all(isinstance(m.out_proj, BayesianLayer) for m in attention)
    if name.startswith("swin"):
        # Swin passes qkv.weight/proj.weight to a function: the trace sees those reads.
        windows = [m for m in bnn.modules() if type(m).__name__.startswith("ShiftedWindowAttention")]
        assert windows and all(isinstance(w.qkv, BayesianLayer) and isinstance(w.proj, BayesianLayer) for w in windows)
        used = {c.name: c.traced_use for c in bnn.conversion_report.converted}
        assert all(used[n] for n in used if n.endswith((".qkv", ".proj")))


def test_the_list_is_the_whole_classification_zoo():
    assert len(CLASSIFICATION) >= 80 and {"resnet50", "vit_b_16", "swin_v2_b", "maxvit_t"} <= set(CLASSIFICATION)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_model(name, _regnet_on_meta):
    torch.manual_seed(0)
    with torch.device("meta"):
        full = models.get_model(name, weights=None, num_classes=10, **BUILD.get(name, {}))
    size = INPUT.get(name, BUILD.get(name, {}).get("image_size", 32))
    run = sum(p.numel() for p in full.parameters()) <= RUN_MAX_PARAMS or name in REPRESENTATIVES
    full = None if run else full
    if run:
        dnn = models.get_model(name, weights=None, num_classes=10, **BUILD.get(name, {}))
        bnn = check_conversion(dnn, (torch.randn(1, 3, size, size),))
    else:
        bnn = convert_checked(full)
        assert type(full).__name__ in RUN_NUMERICALLY | NOT_RUN
    _check_architecture(name, bnn)


@pytest.mark.slow
@pytest.mark.parametrize("name", REDUCED)
def test_reduced_instance_of_a_large_architecture(name):
    torch.manual_seed(0)
    make, size = REDUCED[name]
    bnn = check_conversion(make(), (torch.randn(1, 3, size, size),))
    _check_architecture({"VisionTransformer": "vit_", "SwinTransformer-v1": "swin", "SwinTransformer-v2": "swin"}.get(name, ""), bnn)


def _detection_loss(bnn):
    bnn.train()
    images = [torch.rand(3, 64, 80)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    losses = bnn(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness"}
    return sum(losses.values())


@pytest.mark.slow
def test_detection_model_falls_back_to_the_module_tree():
    torch.manual_seed(0)
    dnn = models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=96,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10,
    )
    bnn = check_conversion(
        dnn, ([torch.rand(3, 64, 80)],), traced=False, warns=("torch.fx could not trace",), loss=_detection_loss
    )
    assert "tracing failed" in str(bnn.conversion_report)


@pytest.mark.slow
def test_segmentation_model():
    torch.manual_seed(0)
    dnn = models.get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3)
    check_conversion(dnn, (torch.randn(1, 3, 64, 64),))


@pytest.mark.slow
def test_large_segmentation_model_converts_at_full_size():
    with torch.device("meta"):
        dnn = models.get_model("fcn_resnet50", weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    bnn = convert_checked(dnn)
    assert {"classifier.4", "aux_classifier.4"} <= {c.name for c in bnn.conversion_report.converted}
