"""Faster R-CNN's parts (RPN, RoI heads, their sampler and box coder, the RoI pooler) as
torchvision has them, rebuilt to make the host wait for the GPU less.

A GPU step is fastest when the host queues kernels far ahead of the GPU. Every time the
host needs a value from the GPU (a count, an index list) or copies a tensor made from
Python numbers to it, it waits until the GPU has caught up, and the GPU then idles while
the host queues the next kernels. torchvision's detection code does that hundreds of times
per semi-supervised step. The classes here do the same work with fewer waits, and give
torchvision's values (same operations, same random draws; ``tests/models/test_rcnn.py``
compares each with torchvision's own):

- ``ConstantWeightsBoxCoder``: box-coder weights made on the device once, not per call.
- ``LevelSortedRoIAlign``: one wait per pooling call instead of one per pyramid level.
- ``OneWaitSampler``: one wait per sampling call instead of two per image, and indices
  that ``OneWaitRPN.compute_loss`` and ``OneWaitRoIHeads.subsample`` use without another
  wait each (torchvision turns them into masks and back with ``torch.where``).
- ``OneWaitRPN.filter_proposals``: the small-box and score rules in one selection, one
  wait fewer per image.
- ``indices_where_all``: ``torch.where`` of many masks with one wait; the sampler, the
  regression positives, pseudo-label filtering and projection all select with it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, encode_boxes
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from ssod.models.boxes import device_constant


class ConstantWeightsBoxCoder(BoxCoder):
    """torchvision's box coder with its weights made once per device (see ``device_constant``)."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        weights = device_constant(tuple(self.weights), reference_boxes.device, reference_boxes.dtype)
        return encode_boxes(reference_boxes, proposals, weights)


class LevelSortedRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` with one host-device synchronisation per call.

    torchvision selects each pyramid level's boxes with ``torch.where``, a wait for the GPU
    per level. Here the boxes are sorted by level and split with counts that come to the
    host once. Each box is pooled by the same ``roi_align`` call on the same level, so the
    values (and gradients) are torchvision's.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = self.pyramid(x, image_shapes)
        return self.pool_level_sorted(features, boxes)

    def pyramid(self, x: dict[str, Tensor], image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """The pooled levels of ``x``; sets up their scales and level mapping on the first call."""
        features = [feature for name, feature in x.items() if name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale, self.canonical_level)
        return features

    def pool_level_sorted(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """``[sum N_i, C, R, R]``: each box by ``roi_align`` on its level, levels in one sorted pass."""
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        order = torch.argsort(levels, stable=True)
        # The one wait (bincount would add two: it reads the minimum and maximum first).
        counts = (levels[:, None] == torch.arange(len(features), device=levels.device)).sum(0).tolist()
        pooled = [
            roi_align(feature, level_rois, self.output_size, scale, self.sampling_ratio).to(features[0].dtype)
            for feature, level_rois, scale in zip(features, rois[order].split(counts), self.scales)
        ]
        # Row i of the sorted result belongs to box order[i]; the dtype is the first level's,
        # as torchvision's.
        merged = torch.cat(pooled)
        return merged.index_copy(0, order, merged)


class OneWaitSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced sampler with one wait per call: the counts of candidates.

    Knowing the counts, ``torch.nonzero_static`` lists them without a wait, and the random
    permutations are torchvision's (same sizes, same order: positives, then negatives, image
    by image), so the same samples are drawn.
    """

    def indices(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image the indices of the sampled positives (``>= 1``) and negatives (``== 0``), unsorted."""
        # The one wait: every image's positive and negative candidates.
        candidates = indices_where_all([mask for m in matched_idxs for mask in (m >= 1, m == 0)])
        positives, negatives = [], []
        for matched, positive, negative in zip(matched_idxs, candidates[0::2], candidates[1::2]):
            num_positive, num_negative = len(positive), len(negative)
            keep_positive = min(num_positive, int(self.batch_size_per_image * self.positive_fraction))
            keep_negative = min(num_negative, self.batch_size_per_image - keep_positive)
            positives.append(positive[torch.randperm(num_positive, device=matched.device)[:keep_positive]])
            negatives.append(negative[torch.randperm(num_negative, device=matched.device)[:keep_negative]])
        return positives, negatives

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's interface: per image uint8 masks of the sampled positives and negatives."""
        positives, negatives = self.indices(matched_idxs)
        masks: tuple[list[Tensor], list[Tensor]] = ([], [])
        for matched, positive, negative in zip(matched_idxs, positives, negatives):
            for out, chosen in zip(masks, (positive, negative)):
                mask = torch.zeros_like(matched, dtype=torch.uint8)
                mask[chosen] = 1
                out.append(mask)
        return masks


def indices_where_all(masks: list[Tensor]) -> list[Tensor]:
    """``torch.where(mask)[0]`` of each 1-d mask, with one wait for all of them (their counts).

    Knowing a count, ``torch.nonzero_static`` lists the indices without a wait (CUDA has it
    from torch 2.6; it crashed on empty input before 2.9, so an empty selection is made here).
    """
    if not masks:
        return []
    counts = torch.stack([mask.sum() for mask in masks]).tolist()
    return [
        torch.nonzero_static(mask, size=count).squeeze(1) if count else torch.zeros(0, dtype=torch.int64, device=mask.device)
        for mask, count in zip(masks, counts)
    ]


def _sorted_batch_indices(per_image: list[Tensor], lengths: list[int]) -> Tensor:
    """Per-image indices as ascending indices into the images' concatenation (what
    ``torch.where`` of the concatenated masks gives, without its wait)."""
    offsets = itertools.accumulate([0] + lengths[:-1])
    return torch.sort(torch.cat([index + offset for index, offset in zip(per_image, offsets)])).values


class OneWaitRPN(RegionProposalNetwork):
    """torchvision's RPN with fewer waits: proposal filtering (``_proposals_per_image``) and a
    loss whose anchors ``OneWaitSampler`` samples (one wait instead of 2 per image + 2)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.box_coder = ConstantWeightsBoxCoder(self.box_coder.weights)
        self.fg_bg_sampler = OneWaitSampler(self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction)

    def filter_proposals(
        self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]], num_anchors_per_level: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's proposal filtering: the top scores of each level, then per image
        ``_proposals_per_image`` (one wait fewer per image)."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([
            torch.full((count,), level, dtype=torch.int64, device=proposals.device)
            for level, count in enumerate(num_anchors_per_level)
        ]).reshape(1, -1).expand_as(objectness)
        top = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch = torch.arange(num_images, device=proposals.device)[:, None]
        selected = zip(proposals[batch, top], torch.sigmoid(objectness[batch, top]), levels[batch, top], image_shapes)
        final_boxes, final_scores = [], []
        for image in selected:
            image_boxes, image_scores = _proposals_per_image(self, *image)
            final_boxes.append(image_boxes)
            final_scores.append(image_scores)
        return final_boxes, final_scores

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's RPN loss (the same sampled anchors, in the same order)."""
        positives, negatives = self.fg_bg_sampler.indices(labels)
        lengths = [len(image_labels) for image_labels in labels]
        sampled_positive = _sorted_batch_indices(positives, lengths)
        sampled = torch.cat([sampled_positive, _sorted_batch_indices(negatives, lengths)])
        labels_all, targets_all = torch.cat(labels), torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(
            pred_bbox_deltas[sampled_positive], targets_all[sampled_positive], beta=1 / 9, reduction="sum"
        ) / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_all[sampled])
        return objectness_loss, box_loss


def _proposals_per_image(rpn: RegionProposalNetwork, boxes: Tensor, scores: Tensor, levels: Tensor, image_size) -> tuple[Tensor, Tensor]:
    """torchvision's per-image proposal filtering with one wait fewer.

    Its clipping, small-box and score rules and its per-level NMS, in its order; the two
    rules select with one mask (torchvision waits for each).
    """
    boxes = box_ops.clip_boxes_to_image(boxes, image_size)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = torch.where((widths >= rpn.min_size) & (heights >= rpn.min_size) & (scores >= rpn.score_thresh))[0]
    boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
    keep = box_ops.batched_nms(boxes, scores, levels, rpn.nms_thresh)[: rpn.post_nms_top_n()]
    return boxes[keep], scores[keep]


class OneWaitRoIHeads(RoIHeads):
    """torchvision's RoI heads; proposals are subsampled with ``OneWaitSampler`` (one wait instead of 3 per image)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.box_coder = ConstantWeightsBoxCoder(self.box_coder.weights)
        self.fg_bg_sampler = OneWaitSampler(self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction)

    def subsample(self, labels: list[Tensor]) -> list[Tensor]:
        """Per image the ascending indices of the sampled proposals, as torchvision's."""
        positives, negatives = self.fg_bg_sampler.indices(labels)
        return [torch.sort(torch.cat([positive, negative])).values for positive, negative in zip(positives, negatives)]
