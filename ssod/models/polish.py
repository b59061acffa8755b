"""The two polishing networks of Polishing Teacher (docs/method.md 4) and their data.

Conventions: boxes ``[N, 4]`` float, xyxy, absolute pixels of the (padded-batch) input
image; labels int64 in ``1..C`` with 0 = background (torchvision's convention). The
category network therefore outputs ``C + 1`` logits with **index 0 = background**,
unlike the reference (mmdetection), whose last logit is background.

Follows the reference code (``snowdusky/DualPolishLearning``,
``ssod/models/polish_teacher.py``: ``Merger``, ``PolishNet``, ``train_rfnet_reg``,
``train_rfnet_cls``, ``polish``, ``second_reg``, ``second_cls``) where docs/method.md is
silent or differs:

- Layers use PyTorch's default initialisation (the reference never re-initialises
  ``PolishNet``), so the box network does not start at the identity.
- The category network has no ReLU after its second FC layer (as docs/method.md says and
  the reference's ``cls_merger`` does).
- Each voted box is pooled on the FPN level chosen by its own size, as mmdetection's
  ``SingleRoIExtractor`` does with the flat roi list of the reference. (The pooler is
  the detector's: both torchvision and mmdetection map sqrt(area) < 112 to P2, < 224
  to P3, < 448 to P4; torchvision samples 2x2 points, mmdetection samples adaptively
  and uses ``aligned=True``.)
- Polished boxes are clipped to the image (the reference decodes with ``max_shape``).
- Keep rule: kept if best foreground probability ``>= rf_cls_thr`` or detector score
  ``> det_score_thr``; relabelled if that probability ``>= rf_cls_thr`` and score
  ``< det_score_thr`` (the reference hard-codes 0.9 for the score).

Deliberate departures from the reference: it reshapes the pooled features of a whole
batch as ``[7, sum N, ...]`` although they are laid out per image, which mixes the
votes of different boxes whenever a batch holds more than one image; here the seven
votes of each box are grouped per box. Images without ground truth give no box
samples and all-background category samples (the reference fails on them). The box
statistics average IoU with the assigned target over all boxes of the batch (the
reference averages, per image, the best IoU with any ground truth, then over images).
"""


import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss

from ssod.models.boxes import (
    NUM_VOTES,
    best_overlap,
    clip_boxes,
    decode_deltas,
    jitter_boxes,
    paired_box_iou,
    valid_boxes_mask,
    vote_boxes,
)
from ssod.models.teacher import PseudoLabels


class BoxPolishNet(nn.Module):
    """Regresses deltas for a box from the RoI features of its seven voted boxes.

    ``[N, V, C, R, R]`` -> concat votes along channels ``[N, V*C, R, R]`` (vote-major)
    -> 1x1 conv to C -> ReLU -> flatten -> FC hidden -> ReLU -> FC hidden -> ReLU
    -> FC 4 deltas ``[N, 4]`` (centre/size coding, means 0, stds 1).
    """

    def __init__(self, in_channels: int, num_votes: int = NUM_VOTES, roi_size: int = 7, hidden: int = 1024):
        super().__init__()
        self.num_votes = num_votes
        self.merge = nn.Conv2d(num_votes * in_channels, in_channels, kernel_size=1)
        self.fc1 = nn.Linear(in_channels * roi_size * roi_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.deltas = nn.Linear(hidden, 4)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 5 or features.shape[1] != self.num_votes:
            raise ValueError(f"expected [N, {self.num_votes}, C, R, R], got {tuple(features.shape)}")
        x = F.relu(self.merge(features.flatten(1, 2))).flatten(1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.deltas(x)


class CategoryPolishNet(nn.Module):
    """Classifies a box from its own RoI features.

    ``[N, C, R, R]`` -> flatten -> FC hidden -> ReLU -> FC hidden -> FC ``num_classes + 1``
    logits ``[N, num_classes + 1]``, index 0 = background, index k = label k.
    """

    def __init__(self, in_channels: int, num_classes: int, roi_size: int = 7, hidden: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * roi_size * roi_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.logits = nn.Linear(hidden, num_classes + 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.logits(self.fc2(F.relu(self.fc1(features.flatten(1)))))


def pool_voted_features(
    features: dict[str, Tensor],
    boxes: list[Tensor],
    image_sizes: list[tuple[int, int]],
    roi_pool: MultiScaleRoIAlign,
    frac: float = 0.06,
    extra_boxes: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """RoI features of every box and its six voted boxes, and of extra boxes, in one pooling call.

    Args:
        features: FPN maps ``{name: [B, C, H_l, W_l]}``.
        boxes: per image ``[N_i, 4]``.
        image_sizes: per image ``(height, width)``.
        extra_boxes: optional per image ``[M_i, 4]``, pooled alone (no votes).

    Returns:
        ``[sum N_i, 7, C, R, R]``, boxes in image order, votes as in ``vote_boxes``, and
        ``[sum M_i, C, R, R]`` for the extra boxes (empty without them). Each box is pooled
        on the FPN level of its own size, so sharing the call changes no value.
    """
    counts = [image_boxes.shape[0] * NUM_VOTES for image_boxes in boxes]
    votes = vote_boxes(torch.cat(boxes), frac).reshape(-1, 4).split(counts)
    if extra_boxes is None:
        extra_boxes = [image_boxes.new_zeros((0, 4)) for image_boxes in boxes]
    pooled = roi_pool(features, [torch.cat([v, e.to(v.dtype)]) for v, e in zip(votes, extra_boxes)], image_sizes)
    # Rows are per image: that image's votes, then its extra boxes.
    chunks = pooled.split([n for v, e in zip(votes, extra_boxes) for n in (v.shape[0], e.shape[0])])
    total = sum(image_boxes.shape[0] for image_boxes in boxes)
    voted = torch.cat(chunks[0::2]).reshape(total, NUM_VOTES, *pooled.shape[1:])
    return voted, torch.cat(chunks[1::2])


def box_polish_samples(
    gt_boxes_per_image: list[Tensor], num: int = 150, scale: float = 0.2, generator: torch.Generator | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Training boxes for the box network: ``num`` jittered copies of each gt, then the gt.

    Degenerate boxes are dropped; each box's target is the gt box it overlaps most.
    Returns per image ``boxes [M_i, 4]`` and ``targets [M_i, 4]`` (empty without gt).
    """
    boxes_per_image, targets_per_image = [], []
    for gt_boxes in gt_boxes_per_image:
        candidates = torch.cat([jitter_boxes(gt_boxes, num, scale, generator), gt_boxes])
        candidates = candidates[valid_boxes_mask(candidates)]
        _, index = best_overlap(candidates, gt_boxes)
        boxes_per_image.append(candidates)
        targets_per_image.append(gt_boxes[index])
    return boxes_per_image, targets_per_image


def category_polish_samples(
    gt_boxes_per_image: list[Tensor],
    gt_labels_per_image: list[Tensor],
    proposals_per_image: list[Tensor],
    nums: tuple[int, ...] = (50, 50),
    scales: tuple[float, ...] = (0.06, 0.2),
    pos_iou: float = 0.7,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Training boxes for the category network.

    Per image: ``nums[k]`` jittered copies of each gt at ``scales[k]``, the proposals
    (``[P_i, >=4]``, first four columns used), the gt; degenerate boxes dropped. Label =
    label of the best-overlapping gt if its IoU ``>= pos_iou``, else 0 (background).
    Returns per image ``boxes [M_i, 4]`` and ``labels [M_i]`` int64.
    """
    boxes_per_image, labels_per_image = [], []
    for gt_boxes, gt_labels, proposals in zip(gt_boxes_per_image, gt_labels_per_image, proposals_per_image):
        jittered = [jitter_boxes(gt_boxes, n, s, generator) for n, s in zip(nums, scales)]
        candidates = torch.cat(jittered + [proposals[:, :4].to(gt_boxes.dtype), gt_boxes])
        candidates = candidates[valid_boxes_mask(candidates)]
        iou, index = best_overlap(candidates, gt_boxes)
        labels = torch.zeros_like(index)
        if gt_boxes.shape[0] > 0:
            labels = torch.where(iou >= pos_iou, gt_labels[index], labels)
        boxes_per_image.append(candidates)
        labels_per_image.append(labels)
    return boxes_per_image, labels_per_image


def _mean(values: Tensor) -> Tensor:
    """Mean that is 0 for an empty tensor, without a host-device sync."""
    return values.float().sum() / max(values.numel(), 1)


def box_polish_loss(
    pred_boxes: Tensor, target_boxes: Tensor, input_boxes: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """GIoU loss (mean) of polished boxes against targets, and IoU statistics.

    Args: all ``[M, 4]``: polished boxes, their targets, the boxes before polishing.
    Returns: the loss (float32; for ``M == 0`` the zero sum of the empty prediction,
    still connected to the network), and detached stats ``polish/box/iou_before``,
    ``polish/box/iou_after``: mean IoU with the target (0 when ``M == 0``).
    """
    pred_boxes, target_boxes = pred_boxes.float(), target_boxes.float()
    if pred_boxes.shape[0] == 0:
        loss = pred_boxes.sum()
    else:
        loss = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="mean")
    with torch.no_grad():
        stats = {
            "polish/box/iou_before": _mean(paired_box_iou(input_boxes.float(), target_boxes)),
            "polish/box/iou_after": _mean(paired_box_iou(pred_boxes, target_boxes)),
        }
    return loss, stats


def category_polish_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy (mean) of ``logits [M, C+1]`` against ``labels [M]`` (0 = background).

    Returns the loss (zero sum of the empty logits when ``M == 0``) and detached stats
    ``polish/cls/acc``, ``polish/cls/fg_recall`` (accuracy on labels > 0),
    ``polish/cls/bg_recall`` (accuracy on label 0); each is 0 when it has no sample.
    """
    logits = logits.float()
    loss = F.cross_entropy(logits, labels) if logits.shape[0] > 0 else logits.sum()
    with torch.no_grad():
        correct = logits.argmax(dim=1) == labels
        foreground = labels > 0
        stats = {
            "polish/cls/acc": _mean(correct),
            "polish/cls/fg_recall": (correct & foreground).sum() / foreground.sum().clamp(min=1),
            "polish/cls/bg_recall": (correct & ~foreground).sum() / (~foreground).sum().clamp(min=1),
        }
    return loss, stats


def polish_pseudo_labels(
    det_scores: Tensor, det_labels: Tensor, cls_probs: Tensor, rf_cls_thr: float = 0.9, det_score_thr: float = 0.9
) -> tuple[Tensor, Tensor]:
    """Which detections become classification pseudo labels, and with which label.

    Args:
        det_scores: ``[K]`` detector scores. det_labels: ``[K]`` int64 in ``1..C``.
        cls_probs: ``[K, C+1]`` softmax of the category network, index 0 = background.

    Returns:
        keep ``[K]`` bool: best foreground probability ``>= rf_cls_thr`` or score
        ``> det_score_thr``. labels ``[K]`` int64: the network's best foreground class
        where that probability ``>= rf_cls_thr`` and score ``< det_score_thr``, else
        the detector's label. The background probability itself is never compared.
    """
    fg_prob, fg_index = cls_probs[:, 1:].max(dim=1)
    confident = fg_prob >= rf_cls_thr
    relabel = confident & (det_scores < det_score_thr)
    labels = torch.where(relabel, fg_index + 1, det_labels)
    keep = confident | (det_scores > det_score_thr)
    return keep, labels


class Polisher(nn.Module):
    """The box and category polishing networks with their sampling and keep settings.

    The trained (student) copy computes ``losses``; an EMA copy made elsewhere with
    ``copy.deepcopy`` calls ``polish``. ``roi_pool`` is the detector's RoI pooler
    (``MultiScaleRoIAlign`` over FPN levels '0'..'3', output 7, sampling ratio 2);
    ``in_channels`` is the FPN width.
    """

    def __init__(
        self,
        roi_pool: MultiScaleRoIAlign,
        in_channels: int,
        num_classes: int,
        hidden: int = 1024,
        vote_frac: float = 0.06,
        box_samples: int = 150,
        box_scale: float = 0.2,
        category_samples: tuple[int, ...] = (50, 50),
        category_scales: tuple[float, ...] = (0.06, 0.2),
        pos_iou: float = 0.7,
        rf_cls_thr: float = 0.9,
        det_score_thr: float = 0.9,
    ):
        super().__init__()
        roi_size = roi_pool.output_size[0]
        self.roi_pool = roi_pool
        self.box_net = BoxPolishNet(in_channels, NUM_VOTES, roi_size, hidden)
        self.category_net = CategoryPolishNet(in_channels, num_classes, roi_size, hidden)
        self.vote_frac, self.pos_iou = vote_frac, pos_iou
        self.box_samples, self.box_scale = box_samples, box_scale
        self.category_samples, self.category_scales = tuple(category_samples), tuple(category_scales)
        self.rf_cls_thr, self.det_score_thr = rf_cls_thr, det_score_thr

    def _polished_boxes(self, boxes: list[Tensor], pooled: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
        """Decode the box network's deltas on ``cat(boxes)`` and clip per image -> ``[sum N_i, 4]``."""
        decoded = decode_deltas(torch.cat(boxes), self.box_net(pooled).float())
        parts = decoded.split([image_boxes.shape[0] for image_boxes in boxes])
        return torch.cat([clip_boxes(part, size) for part, size in zip(parts, image_sizes)])

    def losses(
        self,
        features: dict[str, Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Training losses on labeled images (docs/method.md 4.2, 4.3).

        Args:
            features: teacher FPN maps (detached here: no gradient reaches the detector).
            gt_boxes, gt_labels, proposals: per image ``[G_i, 4]``, ``[G_i]``, ``[P_i, >=4]``;
                proposals are the teacher RPN's (the reference uses its test-time settings).

        Returns:
            losses ``{'polish/box', 'polish/cls'}`` (unweighted) and detached stats.
        """
        features = {name: feature.detach() for name, feature in features.items()}
        boxes, targets = box_polish_samples(gt_boxes, self.box_samples, self.box_scale, generator)
        proposals = [image_proposals.detach()[:, :4] for image_proposals in proposals]
        cls_boxes, labels = category_polish_samples(
            gt_boxes, gt_labels, proposals, self.category_samples, self.category_scales, self.pos_iou, generator
        )
        # One RoIAlign call for both networks: every box with its votes, then the category
        # samples (the category network sees only the box itself, so no votes for those).
        pooled, cls_pooled = pool_voted_features(features, boxes, image_sizes, self.roi_pool, self.vote_frac, cls_boxes)
        polished = self._polished_boxes(boxes, pooled, image_sizes)
        box_loss, box_stats = box_polish_loss(polished, torch.cat(targets), torch.cat(boxes))
        logits = self.category_net(cls_pooled)
        cls_loss, cls_stats = category_polish_loss(logits, torch.cat(labels))
        return {"polish/box": box_loss, "polish/cls": cls_loss}, {**box_stats, **cls_stats}

    @torch.no_grad()
    def polish(
        self,
        features: dict[str, Tensor],
        det_boxes: list[Tensor],
        det_labels: list[Tensor],
        det_scores: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[PseudoLabels]:
        """Polish teacher detections (docs/method.md 4.4 steps 2-3); per image ``[K_i, ...]`` inputs.

        Per image: ``reg_boxes`` are the boxes the box network moved (clipped to the image;
        ``reg_keep`` drops the degenerate ones), ``cls_keep``/``cls_labels`` the keep/relabel
        rule of the category network."""
        pooled, _ = pool_voted_features(features, det_boxes, image_sizes, self.roi_pool, self.vote_frac)
        reg_boxes = self._polished_boxes(det_boxes, pooled, image_sizes)
        probs = self.category_net(pooled[:, 0]).float().softmax(dim=1)
        keep, cls_labels = polish_pseudo_labels(
            torch.cat(det_scores), torch.cat(det_labels), probs, self.rf_cls_thr, self.det_score_thr
        )
        counts = [image_boxes.shape[0] for image_boxes in det_boxes]
        per_image = zip(det_boxes, det_labels, det_scores, *(t.split(counts) for t in (reg_boxes, keep, cls_labels)))
        return [PseudoLabels(boxes, labels, scores, reg, valid_boxes_mask(reg), kept, relabelled)
                for boxes, labels, scores, reg, kept, relabelled in per_image]
