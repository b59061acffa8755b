import copy

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from ssod.models.boxes import NUM_VOTES, box_iou, decode_deltas, vote_boxes
from ssod.models.teacher import PseudoLabels
from ssod.models.polish import (
    BoxPolishNet,
    CategoryPolishNet,
    Polisher,
    box_polish_loss,
    box_polish_samples,
    category_polish_loss,
    category_polish_samples,
    polish_pseudo_labels,
    pool_voted_features,
)

CHANNELS, NUM_CLASSES = 4, 3
IMAGE_SIZES = [(64, 64), (60, 56)]


def make_pool() -> MultiScaleRoIAlign:
    return MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)


def make_features(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {str(level): torch.randn(2, CHANNELS, 64 >> level, 64 >> level, generator=generator) for level in range(4)}


def make_gt():
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]), torch.tensor([[8.0, 8.0, 40.0, 30.0]])]
    labels = [torch.tensor([1, 3]), torch.tensor([2])]
    return boxes, labels


def test_network_output_shapes():
    box_net = BoxPolishNet(CHANNELS, hidden=16)
    category_net = CategoryPolishNet(CHANNELS, NUM_CLASSES, hidden=16)
    assert box_net(torch.randn(5, NUM_VOTES, CHANNELS, 7, 7)).shape == (5, 4)
    assert category_net(torch.randn(5, CHANNELS, 7, 7)).shape == (5, NUM_CLASSES + 1)
    assert box_net(torch.randn(0, NUM_VOTES, CHANNELS, 7, 7)).shape == (0, 4)
    with pytest.raises(ValueError):
        box_net(torch.randn(5, 6, CHANNELS, 7, 7))


def test_pool_voted_features_groups_votes_per_box_across_images():
    pool, features = make_pool(), make_features()
    boxes = [torch.tensor([[2.0, 2.0, 20.0, 30.0], [10.0, 5.0, 60.0, 60.0], [0.0, 0.0, 8.0, 8.0]]),
             torch.tensor([[5.0, 5.0, 50.0, 25.0]])]
    pooled, _ = pool_voted_features(features, boxes, IMAGE_SIZES, pool, frac=0.06)
    assert pooled.shape == (4, NUM_VOTES, CHANNELS, 7, 7)
    for vote in range(NUM_VOTES):
        alone = pool(features, [vote_boxes(b, 0.06)[:, vote] for b in boxes], IMAGE_SIZES)
        torch.testing.assert_close(pooled[:, vote], alone)
    empty, _ = pool_voted_features(features, [torch.zeros(0, 4), torch.zeros(0, 4)], IMAGE_SIZES, pool)
    assert empty.shape == (0, NUM_VOTES, CHANNELS, 7, 7)


def test_one_pooling_call_for_both_networks_equals_separate_calls():
    pool, features = make_pool(), make_features()
    boxes = [torch.tensor([[2.0, 2.0, 20.0, 30.0], [10.0, 5.0, 60.0, 60.0]]), torch.zeros(0, 4)]
    extra = [torch.tensor([[0.0, 0.0, 40.0, 40.0]]), torch.tensor([[5.0, 5.0, 50.0, 25.0], [1.0, 1.0, 9.0, 9.0]])]
    voted, alone = pool_voted_features(features, boxes, IMAGE_SIZES, pool, 0.06, extra)
    assert torch.equal(voted, pool_voted_features(features, boxes, IMAGE_SIZES, pool, 0.06)[0])
    assert torch.equal(alone, pool(features, extra, IMAGE_SIZES))


def test_polisher_losses_equal_pooling_each_network_separately():
    """The shared RoIAlign call changes no loss or gradient (reference: the old two-call path)."""
    torch.manual_seed(0)
    polisher = Polisher(make_pool(), CHANNELS, NUM_CLASSES, hidden=32, box_samples=20, category_samples=(5, 5))
    features = make_features()
    gt_boxes, gt_labels = make_gt()
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.tensor([[5.0, 5.0, 50.0, 20.0]])]
    losses, stats = polisher.losses(features, gt_boxes, gt_labels, proposals, IMAGE_SIZES, torch.Generator().manual_seed(1))
    sum(losses.values()).backward()
    grads = [p.grad.clone() for p in polisher.parameters()]
    polisher.zero_grad()

    generator = torch.Generator().manual_seed(1)
    boxes, targets = box_polish_samples(gt_boxes, 20, polisher.box_scale, generator)
    cls_boxes, labels = category_polish_samples(gt_boxes, gt_labels, proposals, (5, 5), polisher.category_scales,
                                                polisher.pos_iou, generator)
    pooled, _ = pool_voted_features(features, boxes, IMAGE_SIZES, polisher.roi_pool, polisher.vote_frac)
    box_loss, _ = box_polish_loss(polisher._polished_boxes(boxes, pooled, IMAGE_SIZES), torch.cat(targets), torch.cat(boxes))
    cls_loss, _ = category_polish_loss(polisher.category_net(polisher.roi_pool(features, cls_boxes, IMAGE_SIZES)),
                                       torch.cat(labels))
    (box_loss + cls_loss).backward()
    assert torch.equal(losses["polish/box"], box_loss) and torch.equal(losses["polish/cls"], cls_loss)
    for shared, separate in zip(grads, (p.grad for p in polisher.parameters())):
        torch.testing.assert_close(shared, separate, rtol=0, atol=1e-6)


def test_box_samples_counts_targets_and_empty_image():
    gt_boxes, _ = make_gt()
    gt_boxes.append(torch.zeros(0, 4))
    boxes, targets = box_polish_samples(gt_boxes, num=10, scale=0.05, generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in boxes] == [22, 11, 0]  # no copy is degenerate at this small scale
    torch.testing.assert_close(boxes[0][-2:], gt_boxes[0])  # the gt boxes themselves come last
    assert targets[2].shape == (0, 4)
    # Each target is the gt box with the highest IoU.
    best = box_iou(boxes[0], gt_boxes[0]).argmax(dim=1)
    torch.testing.assert_close(targets[0], gt_boxes[0][best])


def test_box_samples_drop_degenerate_boxes():
    gt = [torch.tensor([[10.0, 10.0, 12.0, 12.0]])]
    boxes, _ = box_polish_samples(gt, num=200, scale=1.0, generator=torch.Generator().manual_seed(0))
    assert 1 <= len(boxes[0]) < 201
    assert ((boxes[0][:, 2] > boxes[0][:, 0]) & (boxes[0][:, 3] > boxes[0][:, 1])).all()


def test_category_samples_labels_at_iou_threshold():
    gt_boxes = [torch.tensor([[0.0, 0.0, 100.0, 100.0]])]
    gt_labels = [torch.tensor([2])]
    proposals = [torch.tensor([[0.0, 0.0, 75.0, 100.0, 0.9], [0.0, 0.0, 74.0, 100.0, 0.8], [0.0, 0.0, 72.0, 100.0, 0.7],
                               [0.0, 0.0, 68.0, 100.0, 0.6], [5.0, 5.0, 5.0, 9.0, 0.5]])]
    boxes, labels = category_polish_samples(gt_boxes, gt_labels, proposals, nums=(0, 0), scales=(0.06, 0.2))
    assert len(boxes[0]) == 5  # four valid proposals + the gt; the degenerate proposal is dropped
    assert labels[0].tolist() == [2, 2, 2, 0, 2]
    _, labels = category_polish_samples(gt_boxes, gt_labels, proposals, nums=(0, 0), scales=(0.06, 0.2), pos_iou=0.75)
    assert labels[0].tolist() == [2, 0, 0, 0, 2]  # IoU exactly 0.75 counts as positive


def test_category_samples_counts_and_zero_gt_image():
    gt_boxes, gt_labels = make_gt()
    gt_boxes.append(torch.zeros(0, 4))
    gt_labels.append(torch.zeros(0, dtype=torch.int64))
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4), torch.tensor([[1.0, 1.0, 9.0, 9.0]] * 3)]
    boxes, labels = category_polish_samples(gt_boxes, gt_labels, proposals, nums=(5, 4), scales=(0.01, 0.01),
                                            generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in boxes] == [2 * 9 + 1 + 2, 9 + 1, 3]
    assert labels[2].tolist() == [0, 0, 0]
    assert set(labels[0][:18].tolist()) == {1, 3}  # tiny jitter keeps every copy positive
    assert labels[0][-2:].tolist() == [1, 3] and labels[0][-3] == 0


def test_box_loss_stats_and_empty_batch():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    inputs = torch.tensor([[0.0, 0.0, 5.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    loss, stats = box_polish_loss(boxes.clone().requires_grad_(), boxes, inputs)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert stats["polish/box/iou_before"].item() == pytest.approx(0.75)
    assert stats["polish/box/iou_after"].item() == pytest.approx(1.0)
    net = BoxPolishNet(CHANNELS, hidden=8)
    pred = net(torch.zeros(0, NUM_VOTES, CHANNELS, 7, 7))
    loss, stats = box_polish_loss(pred, torch.zeros(0, 4), torch.zeros(0, 4))
    loss.backward()
    assert loss.item() == 0.0 and net.deltas.weight.grad is not None
    assert stats["polish/box/iou_after"].item() == 0.0


def test_category_loss_stats_and_empty_batch():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    loss, stats = category_polish_loss(logits, torch.tensor([0, 1, 1]))
    assert loss.item() > 0 and not stats["polish/cls/acc"].requires_grad
    assert stats["polish/cls/acc"].item() == pytest.approx(2 / 3)
    assert stats["polish/cls/fg_recall"].item() == pytest.approx(0.5)
    assert stats["polish/cls/bg_recall"].item() == pytest.approx(1.0)
    net = CategoryPolishNet(CHANNELS, NUM_CLASSES, hidden=8)
    loss, _ = category_polish_loss(net(torch.zeros(0, CHANNELS, 7, 7)), torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and net.logits.weight.grad is not None


def test_keep_and_relabel_rule():
    # Columns: background, class 1, class 2, class 3.
    probs = torch.tensor([
        [0.05, 0.05, 0.05, 0.85],  # detector confident: kept, label unchanged
        [0.02, 0.03, 0.95, 0.00],  # network confident, detector not: kept, relabelled to 2
        [0.20, 0.30, 0.30, 0.20],  # neither: dropped
        [0.96, 0.01, 0.02, 0.01],  # background is the max, detector not confident: dropped
        [0.00, 0.00, 0.00, 1.00],  # both confident: kept, detector label stays (score > 0.9)
        [0.05, 0.00, 0.95, 0.00],  # score exactly 0.9: kept only through the network, not relabelled
        [0.97, 0.01, 0.01, 0.01],  # background max but detector confident: kept
    ])
    scores = torch.tensor([0.95, 0.6, 0.7, 0.8, 0.99, 0.9, 0.93])
    labels = torch.tensor([1, 1, 3, 2, 2, 1, 3])
    keep, new_labels = polish_pseudo_labels(scores, labels, probs, rf_cls_thr=0.9, det_score_thr=0.9)
    assert keep.tolist() == [True, True, False, False, True, True, True]
    assert new_labels.tolist() == [1, 2, 3, 2, 2, 1, 3]
    keep, new_labels = polish_pseudo_labels(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert keep.shape == (0,) and new_labels.shape == (0,)


def test_few_steps_decrease_each_network_loss():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(32, NUM_VOTES, CHANNELS, 7, 7, generator=generator)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0]]).repeat(32, 1) + torch.randn(32, 4, generator=generator)
    targets = boxes + torch.randn(32, 4, generator=generator) * 4
    targets[:, 2:] = torch.maximum(targets[:, 2:], targets[:, :2] + 5)
    labels = torch.randint(0, NUM_CLASSES + 1, (32,), generator=generator)
    box_net = BoxPolishNet(CHANNELS, hidden=64)
    category_net = CategoryPolishNet(CHANNELS, NUM_CLASSES, hidden=64)
    optimizer = torch.optim.Adam([*box_net.parameters(), *category_net.parameters()], lr=1e-3)
    history = []
    for _ in range(25):
        box_loss, _ = box_polish_loss(decode_deltas(boxes, box_net(features)), targets, boxes)
        cls_loss, _ = category_polish_loss(category_net(features[:, 0]), labels)
        optimizer.zero_grad()
        (box_loss + cls_loss).backward()
        optimizer.step()
        history.append((box_loss.item(), cls_loss.item()))
    assert history[-1][0] < 0.7 * history[0][0]
    assert history[-1][1] < 0.7 * history[0][1]


def test_polisher_losses_decrease_on_a_fixed_batch():
    torch.manual_seed(0)
    polisher = Polisher(make_pool(), CHANNELS, NUM_CLASSES, hidden=32, box_samples=20, category_samples=(5, 5))
    features = make_features()
    gt_boxes, gt_labels = make_gt()
    proposals = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0]]), torch.tensor([[5.0, 5.0, 50.0, 20.0]])]
    optimizer = torch.optim.Adam(polisher.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        losses, stats = polisher.losses(features, gt_boxes, gt_labels, proposals, IMAGE_SIZES,
                                        generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({name: loss.item() for name, loss in losses.items()})
    assert set(losses) == {"polish/box", "polish/cls"}
    assert set(stats) == {"polish/box/iou_before", "polish/box/iou_after", "polish/cls/acc",
                          "polish/cls/fg_recall", "polish/cls/bg_recall"}
    assert history[-1]["polish/box"] < history[0]["polish/box"]
    assert history[-1]["polish/cls"] < history[0]["polish/cls"]


def test_polisher_losses_without_gt_are_zero_and_connected():
    polisher = Polisher(make_pool(), CHANNELS, NUM_CLASSES, hidden=16)
    empty_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    empty_labels = [torch.zeros(0, dtype=torch.int64)] * 2
    losses, _ = polisher.losses(make_features(), empty_boxes, empty_labels, empty_boxes, IMAGE_SIZES)
    sum(losses.values()).backward()
    assert all(loss.item() == 0.0 for loss in losses.values())
    assert all(parameter.grad is not None for parameter in polisher.parameters())


def test_polish_on_an_ema_copy_under_no_grad():
    teacher = copy.deepcopy(Polisher(make_pool(), CHANNELS, NUM_CLASSES, hidden=16))
    det_boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 63.0, 50.0]]), torch.zeros(0, 4)]
    det_labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64)]
    det_scores = [torch.tensor([0.95, 0.6]), torch.zeros(0)]
    with torch.no_grad():
        results = teacher.polish(make_features(), det_boxes, det_labels, det_scores, IMAGE_SIZES)
    assert len(results) == 2 and all(isinstance(r, PseudoLabels) for r in results)
    first, second = results
    assert first.reg_boxes.shape == (2, 4) and first.cls_keep.dtype == torch.bool and first.reg_keep.dtype == torch.bool
    assert (first.reg_boxes >= 0).all() and (first.reg_boxes[:, [0, 2]] <= 64).all()
    assert first.cls_keep[0]  # detector score 0.95 > 0.9 is always kept
    assert first.cls_labels[0] == 1 and first.classification_target(0.0)["boxes"].shape[1] == 4
    assert second.reg_boxes.shape == (0, 4) and second.classification_target(0.0)["labels"].shape == (0,)
