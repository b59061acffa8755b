"""The trained detector in torchvision's own parts, for TorchScript and ONNX.

The training detector (``ssod.models.detector``) swaps some of torchvision's Faster R-CNN
parts for faster ones (one GPU wait per call, a CPU RoIAlign as one weighted sum, float32
heads under autocast). They compute torchvision's values but cannot be scripted or traced.
``DeployableDetector`` puts the same weights and settings into torchvision's own
``RegionProposalNetwork``, ``RoIHeads``, ``MultiScaleRoIAlign``, ``RPNHead`` and
``FastRCNNPredictor``, behind one image in and three tensors out.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, pad to a multiple of 32) without its resizing, as
    ``ssod.models.detector.PaddingOnlyTransform`` but scriptable and traceable."""

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        return result


def standard_detector(detector: GeneralizedRCNN) -> GeneralizedRCNN:
    """A copy of ``detector`` (``ssod.models.detector.build_detector``) in torchvision's own
    parts: the same weights, anchors, box coding, thresholds and NMS; in eval mode."""
    rpn, heads = detector.rpn, detector.roi_heads
    standard_rpn = RegionProposalNetwork(
        AnchorGenerator(rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios),
        RPNHead(rpn.head.conv[0][0].in_channels, rpn.head.cls_logits.out_channels),
        # Matching and sampling settings only matter to training losses.
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=1, positive_fraction=0.5,
        pre_nms_top_n=dict(rpn._pre_nms_top_n), post_nms_top_n=dict(rpn._post_nms_top_n),
        nms_thresh=rpn.nms_thresh, score_thresh=rpn.score_thresh)
    standard_rpn.min_size = rpn.min_size
    pool, predictor = heads.box_roi_pool, heads.box_predictor
    standard_heads = RoIHeads(
        MultiScaleRoIAlign(list(pool.featmap_names), pool.output_size, pool.sampling_ratio),
        heads.box_head, FastRCNNPredictor(predictor.cls_score.in_features, predictor.cls_score.out_features),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=1, positive_fraction=0.25,
        bbox_reg_weights=tuple(heads.box_coder.weights), score_thresh=heads.score_thresh,
        nms_thresh=heads.nms_thresh, detections_per_img=heads.detections_per_img)
    transform = NoResizeTransform(min_size=1, max_size=1, image_mean=list(detector.transform.image_mean),
                                  image_std=list(detector.transform.image_std))
    standard = GeneralizedRCNN(detector.backbone, standard_rpn, standard_heads, transform)
    standard.load_state_dict(detector.state_dict())  # strict: every weight has found its place
    return standard.eval()


class DeployableDetector(nn.Module):
    """One RGB image in, its detections out, as TorchScript and ONNX can hold it.

    forward(image [3, H, W] float32 RGB in [0, 1]) -> (boxes [K, 4] float32 xyxy in the
    image's pixels, scores [K] float32, labels [K] int64 contiguous 1..C: label ``i`` is the
    checkpoint's category ``i - 1``). The image is not resized: the detector sees it at the
    size it is given (it was trained and evaluated on images whose short side is
    ``data.test_size``, long side at most ``data.test_max_size``).
    """

    def __init__(self, detector: GeneralizedRCNN) -> None:
        super().__init__()
        self.detector = standard_detector(detector)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        images, _ = self.detector.transform([image])
        features = self.detector.backbone(images.tensors)
        proposals, _ = self.detector.rpn(images, features)
        detections, _ = self.detector.roi_heads(features, proposals, images.image_sizes)
        return detections[0]["boxes"], detections[0]["scores"], detections[0]["labels"]
