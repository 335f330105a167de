from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    SegmentationLoss,
    class_weight_tensor,
    logit_adjustment,
    lovasz_softmax_loss,
    soft_dice_loss,
)

IGNORE = 255


def perfect_logits(target: torch.Tensor, num_classes: int, scale: float = 50.0) -> torch.Tensor:
    """(N,H,W) ids -> (N,C,H,W) logits that put all probability on the right class."""
    safe = torch.where(target == IGNORE, torch.zeros_like(target), target)
    return F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float() * scale


def test_perfect_prediction_gives_about_zero() -> None:
    target = torch.tensor([[[0, 1], [2, 1]]])
    loss = soft_dice_loss(perfect_logits(target, 3), target)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_completely_wrong_prediction_gives_about_one() -> None:
    target = torch.tensor([[[0, 0], [1, 1]]])
    wrong = perfect_logits(1 - target, 2)  # every pixel gets the other class
    # Each class: intersection 0, cardinality 4 -> dice = smooth / (4 + smooth) = 0.2 (smooth 1)
    assert soft_dice_loss(wrong, target).item() == pytest.approx(0.8, abs=1e-4)
    assert soft_dice_loss(wrong, target, smooth=1e-6).item() == pytest.approx(1.0, abs=1e-4)


def test_uniform_logits_by_hand() -> None:
    # 2 classes, 4 pixels: two of each. Probabilities are all 0.5.
    target = torch.tensor([[[0, 0, 1, 1]]])
    logits = torch.zeros(1, 2, 1, 4)
    # per class: intersection 2 * 0.5 = 1, cardinality 4 * 0.5 + 2 = 4 -> dice (2+1)/(4+1) = 0.6
    assert soft_dice_loss(logits, target, smooth=1.0).item() == pytest.approx(0.4, abs=1e-6)


def test_ignored_pixels_change_nothing() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 6))
    target[..., 3:] = IGNORE  # right half unlabelled
    loss = soft_dice_loss(logits, target)
    cropped = soft_dice_loss(logits[..., :3], target[..., :3])
    assert loss.item() == pytest.approx(cropped.item(), abs=1e-6)
    # Whatever the logits say on ignored pixels, the loss does not move.
    other = logits.detach().clone()
    other[..., 3:] = torch.randn_like(other[..., 3:]) * 100
    assert soft_dice_loss(other, target).item() == pytest.approx(loss.item(), abs=1e-6)
    loss.backward()
    assert torch.all(logits.grad[..., 3:] == 0)
    assert torch.any(logits.grad[..., :3] != 0)


def test_gradients_are_finite_even_for_extreme_logits() -> None:
    logits = torch.tensor([[[[1e4, -1e4]], [[-1e4, 1e4]], [[0.0, 0.0]]]], requires_grad=True)
    target = torch.tensor([[[2, 0]]])
    loss = soft_dice_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(logits.grad))


def test_all_ignored_batch_gives_zero_with_finite_gradients() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), IGNORE)
    loss = SegmentationLoss("dice+ce", num_classes=3)(logits, target)[0]
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(torch.isfinite(logits.grad))


def test_classes_absent_from_the_target_are_left_out() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 3, 3)
    target = torch.randint(0, 2, (1, 3, 3))  # no class 2
    full = soft_dice_loss(logits, target)
    # Same as weighting classes 0 and 1 only.
    only01 = soft_dice_loss(logits, target, class_weights=torch.tensor([1.0, 1.0, 0.0]))
    assert full.item() == pytest.approx(only01.item(), abs=1e-6)


def test_class_weights_select_classes() -> None:
    target = torch.tensor([[[0, 0, 1, 1]]])
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0, 0, :] = 50.0  # every pixel predicted as class 0
    class0 = soft_dice_loss(logits, target, class_weights=torch.tensor([1.0, 0.0]))
    class1 = soft_dice_loss(logits, target, class_weights=torch.tensor([0.0, 1.0]))
    # class 0: I=2, card=4+2 -> 1 - 5/7; class 1: I=0, card=0+2 -> 1 - 1/3
    assert class0.item() == pytest.approx(1 - 5 / 7, abs=1e-4)
    assert class1.item() == pytest.approx(1 - 1 / 3, abs=1e-4)


def test_combined_loss_adds_its_parts_and_the_aux_head() -> None:
    torch.manual_seed(2)
    out, aux = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, 0] = IGNORE
    both = SegmentationLoss("dice+ce", num_classes=3, aux_weight=0.5)
    total, parts = both({"out": out, "aux": aux}, target)
    ce = F.cross_entropy(out, target, ignore_index=IGNORE)
    dice = soft_dice_loss(out, target)
    aux_total = F.cross_entropy(aux, target, ignore_index=IGNORE) + soft_dice_loss(aux, target)
    assert parts["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert parts["dice"].item() == pytest.approx(dice.item(), abs=1e-6)
    assert total.item() == pytest.approx((ce + dice + 0.5 * aux_total).item(), abs=1e-5)
    only_dice, parts = SegmentationLoss("dice", num_classes=3)(out, target)
    assert set(parts) == {"dice", "total"}
    assert only_dice.item() == pytest.approx(dice.item(), abs=1e-6)


def test_class_weight_tensor_fills_unlisted_classes_with_one() -> None:
    assert class_weight_tensor({}, ["a", "b"]) is None
    assert class_weight_tensor({"lake": 5}, ["ocean", "land", "lake"]).tolist() == [1, 1, 5]


def test_logit_adjustment_recovers_the_class_frequencies_weighted_cross_entropy_distorts() -> None:
    # One pixel seen 10 times: 7 times ocean, 3 times lake. Cross-entropy with lake weighted 6x
    # is minimised by p(lake) = 3*6 / (7 + 3*6) = 0.72, not 0.3; after the adjustment the
    # softmax gives back 0.3, and the argmax goes back from lake to ocean.
    names = ["ocean", "land", "lake"]
    weights = {"lake": 6.0}
    offsets = logit_adjustment(weights, names)
    assert offsets == pytest.approx([0.0, 0.0, -1.791759], abs=1e-6)
    assert json.dumps(offsets[:2]) == "[0.0, 0.0]"  # not -0.0, which /model would print
    target = torch.tensor([0] * 7 + [2] * 3)
    logits = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(
            logits.expand(10, 3), target, weight=class_weight_tensor(weights, names)
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    learnt = logits.detach()
    assert learnt.softmax(0)[2].item() == pytest.approx(18 / 25, abs=1e-3)
    adjusted = learnt + torch.tensor(offsets)
    assert adjusted.softmax(0)[[0, 2]].tolist() == pytest.approx([0.7, 0.3], abs=1e-3)
    assert learnt.argmax().item() == 2 and adjusted.argmax().item() == 0
    assert logit_adjustment({}, names) is None


def test_bf16_logits_are_scored_in_float32() -> None:
    target = torch.tensor([[[0, 1], [2, 1]]])
    logits = perfect_logits(target, 3).to(torch.bfloat16)
    loss = soft_dice_loss(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_lovasz_of_hard_predictions_is_one_minus_iou_by_hand() -> None:
    # One image, 2 classes, 6 pixels: truth 0 0 0 1 1 1, prediction 0 1 1 1 1 0 (confident).
    target = torch.tensor([[[0, 0, 0, 1, 1, 1]]])
    predicted = torch.tensor([[[0, 1, 1, 1, 1, 0]]])
    logits = F.one_hot(predicted, 2).permute(0, 3, 1, 2).float() * 50.0
    # IoU class 0 = 1/4, class 1 = 2/5: the surrogate equals 1 - IoU on 0/1 predictions.
    expected = ((1 - 1 / 4) + (1 - 2 / 5)) / 2
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)


def test_lovasz_leaves_out_ignored_pixels_and_absent_classes() -> None:
    target = torch.tensor([[[0, 0, 255, 255]]])
    predicted = torch.tensor([[[0, 0, 1, 2]]])
    logits = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 50.0
    # Only class 0 is present and its two labelled pixels are right: a perfect score.
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def lake_crops() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1x8 crops, land 0 and lake 1, predicted with confidence: the first holds a large lake,
    found whole; the second a one-pixel lake, missed."""
    target = torch.tensor([[[1, 1, 1, 1, 1, 1, 1, 0]], [[0, 0, 0, 0, 0, 0, 0, 1]]])
    predicted = torch.tensor([[[1, 1, 1, 1, 1, 1, 1, 0]], [[0, 0, 0, 0, 0, 0, 0, 0]]])
    return F.one_hot(predicted, 2).permute(0, 3, 1, 2).float() * 50.0, target


def test_lovasz_per_image_gives_a_missed_small_lake_its_crops_whole_weight() -> None:
    logits, target = lake_crops()
    # Pooled: land IoU 8/9, lake 7/8 over both crops. Per image: the first crop is perfect (0);
    # the second has land 7/8 and lake 0, so (1/8 + 1) / 2; the mean of the two crops.
    pooled = ((1 - 8 / 9) + (1 - 7 / 8)) / 2
    per_image = (0.0 + (1 / 8 + 1.0) / 2) / 2
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(pooled, abs=1e-6)
    assert lovasz_softmax_loss(logits, target, per_image=True).item() == pytest.approx(
        per_image, abs=1e-6
    )
    loss = SegmentationLoss("lovasz", num_classes=2, lovasz_per_image=True)
    assert loss(logits, target)[1]["lovasz"].item() == pytest.approx(per_image, abs=1e-6)


def test_lovasz_per_image_leaves_out_crops_with_nothing_labelled() -> None:
    logits, target = lake_crops()
    blank = torch.full((1, 1, 8), IGNORE)
    with_blank = lovasz_softmax_loss(
        torch.cat([logits, logits[:1]]), torch.cat([target, blank]), per_image=True
    )
    assert with_blank.item() == pytest.approx((1 / 8 + 1.0) / 4, abs=1e-6)
    nothing = lovasz_softmax_loss(logits, torch.full_like(target, IGNORE), per_image=True)
    assert nothing.item() == 0.0


def reference_lovasz(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Berman's lovasz_softmax_flat, class by class, over one set of pixels (ignore 255)."""
    probs = logits.float().softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    probs, labels = probs[labels != IGNORE], labels[labels != IGNORE]
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).float()
        if fg.sum() == 0:
            continue
        errors, order = (fg - probs[:, c]).abs().sort(descending=True)
        fg_sorted = fg[order]
        jaccard = 1.0 - (fg.sum() - fg_sorted.cumsum(0)) / (fg.sum() + (1 - fg_sorted).cumsum(0))
        losses.append(torch.dot(errors, torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_matches_the_class_by_class_reference_on_soft_predictions(per_image: bool) -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 3, 12, 10) * 2.0
    target = torch.randint(0, 3, (4, 12, 10))
    target[0, :4] = IGNORE  # some pixels ignored
    target[1][target[1] == 2] = 0  # an image without lake
    target[2] = IGNORE  # an image with nothing labelled
    ours = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    if per_image:
        images = (0, 1, 3)  # image 2 has nothing labelled: left out of the mean
        per_image_losses = [reference_lovasz(ref[i : i + 1], target[i : i + 1]) for i in images]
        expected = torch.stack(per_image_losses).mean()
    else:
        expected = reference_lovasz(ref, target)
    loss = lovasz_softmax_loss(ours, target, per_image=per_image)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    expected.backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-6)
    assert ours.grad[2].abs().sum() == 0  # nothing labelled: no gradient


def test_lovasz_term_joins_the_sum_with_finite_gradients() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    total, parts = SegmentationLoss("dice+ce+lovasz", num_classes=3)(logits, target)
    assert set(parts) == {"ce", "dice", "lovasz", "total"}
    assert total.item() == pytest.approx(sum(parts[k].item() for k in ("ce", "dice", "lovasz")))
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
