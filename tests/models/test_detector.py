"""Detector construction: architectures, frozen stages, no internal resize, offline weights."""

import pytest
import torch

from ssod.config import ModelConfig
from ssod.models.detector import build_detector, resolve_backbone_weights

TINY = ModelConfig(arch="resnet18_fpn", fpn_channels=16, box_head_dim=32, anchor_sizes=[8, 16, 32, 64, 128])


@pytest.mark.parametrize("arch", ["resnet18_fpn", "mobilenet_v3_fpn"])
def test_small_architectures_predict_in_input_pixels(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, fpn_channels=16, box_head_dim=32, anchor_sizes=[8, 16, 32, 64, 128])
    model = build_detector(cfg, num_classes=4).eval()
    image = torch.rand(3, 70, 90)
    with torch.no_grad():
        out = model([image])[0]
    assert model.roi_heads.box_predictor.cls_score.out_features == 5  # 4 classes + background
    if len(out["boxes"]):
        assert out["boxes"][:, 2].max() <= 90 and out["boxes"][:, 3].max() <= 70
    images, _ = model.transform([image])
    assert tuple(images.image_sizes[0]) == (70, 90)  # padded, never resized


def test_resnet50_paper_model_freezes_first_stage_without_weights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = ModelConfig(arch="resnet50_fpn", weights_backbone="IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_detector(cfg, num_classes=80)


def test_resnet50_trainable_layers(monkeypatch):
    cfg = ModelConfig(arch="resnet50_fpn", trainable_backbone_layers=3)
    model = build_detector(cfg, num_classes=2)
    body = model.backbone.body
    # Without pretrained weights every stage trains; the paper freezes only with weights.
    assert all(p.requires_grad for p in body.layer1.parameters())
    assert model.backbone.out_channels == 256


def test_frozen_stages_with_cached_weights(tmp_path, monkeypatch):
    """A weights file in TORCH_HOME is used offline and the first stage is frozen."""
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(resnet18().state_dict(), cached)
    assert resolve_backbone_weights("resnet18_fpn", "IMAGENET1K_V1") is weights
    model = build_detector(ModelConfig(arch="resnet18_fpn", weights_backbone="IMAGENET1K_V1", trainable_backbone_layers=3), 2)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert torch.equal(body.conv1.weight, torch.load(cached)["conv1.weight"])


def test_unknown_weights_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not one of"):
        resolve_backbone_weights("resnet18_fpn", "NOPE")


def test_unknown_architecture():
    with pytest.raises(ValueError, match="model.arch"):
        build_detector(ModelConfig(arch="vgg"), 2)


def test_transform_and_box_coder_give_torchvision_values():
    """Normalisation and box encoding with constants made once per device: torchvision's values."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    detector = build_detector(TINY, num_classes=3).eval()
    images = [torch.rand(3, 40, 56), torch.rand(3, 48, 32)]
    reference = GeneralizedRCNNTransform(1, 10**4, detector.transform.image_mean, detector.transform.image_std)
    for image in images:
        assert torch.equal(detector.transform.normalize(image), reference.normalize(image))
    with pytest.raises(TypeError, match="float"):
        detector.transform.normalize(torch.zeros(3, 4, 4, dtype=torch.uint8))
    detections = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]])}]
    assert torch.equal(detector.transform.postprocess(detections, [(48, 32)], [(48, 32)])[0]["boxes"], detections[0]["boxes"])
    boxes, proposals = [torch.tensor([[0.0, 0, 10, 20], [5, 5, 9, 30]])], [torch.tensor([[1.0, 1, 12, 18], [4, 6, 10, 28]])]
    for coder in (detector.rpn.box_coder, detector.roi_heads.box_coder):
        expected = BoxCoder(coder.weights).encode(boxes, proposals)[0]
        assert torch.equal(coder.encode(boxes, proposals)[0], expected)


def test_a_pretrained_mobilenet_has_frozen_batchnorm_with_its_statistics(tmp_path, monkeypatch):
    """Trainable BatchNorm at 1-4 images per GPU drifts, and its running statistics never
    reach the teacher (the EMA averages parameters): pretrained, it is frozen."""
    from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large
    from torchvision.ops import FrozenBatchNorm2d

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = MobileNet_V3_Large_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    net = mobilenet_v3_large()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), cached)
    model = build_detector(ModelConfig(arch="mobilenet_v3_fpn", weights_backbone="IMAGENET1K_V1"), 2)
    body = model.backbone.body
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in body.modules())
    frozen = [module for module in body.modules() if isinstance(module, FrozenBatchNorm2d)]
    assert frozen and all(module.eps == 0.001 for module in frozen)
    assert torch.equal(body["0"][1].running_var, net.features[0][1].running_var)
