# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Loss terms (Eq. 6, 10, 12), ramp-ups (Eq. 11) and the gradient flow the method page specifies."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cpcl_bundle.losses import (
    backward_prototype_loss,
    consistency_weight,
    covers,
    forward_prototype_loss,
    gaussian_rampup,
    sigmoid_rampup,
    softmax_mse_consistency,
)
from cpcl_bundle.networks import forward_with_features
from cpcl_bundle.prototypes import prototype_probabilities
from cpcl_tools import train_objects
from tests.test_prototypes import brute_probabilities, brute_prototypes


def test_gaussian_rampup_values():
    assert gaussian_rampup(0, 1000, 0.1) == pytest.approx(0.1 * math.exp(-5))
    assert gaussian_rampup(500, 1000, 0.1) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert gaussian_rampup(1000, 1000, 0.1) == pytest.approx(0.1)
    assert gaussian_rampup(5000, 1000, 0.1) == pytest.approx(0.1)  # t clipped at t_max
    assert gaussian_rampup(10, 0, 0.1) == 0.1


def test_sigmoid_rampup_is_the_mt_staircase():
    # UA-MT: weight(iteration // 150) with a length of 40 such units
    assert sigmoid_rampup(149, 40, 0.1, step_size=150) == pytest.approx(0.1 * math.exp(-5))
    assert sigmoid_rampup(150 * 20, 40, 0.1, step_size=150) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert sigmoid_rampup(150 * 40 + 7, 40, 0.1, step_size=150) == pytest.approx(0.1)
    assert consistency_weight(3, 10, 0.1, "constant") == 0.1
    with pytest.raises(ValueError, match="unknown ramp-up"):
        consistency_weight(0, 10, 0.1, "cosine")


def test_supervised_loss_is_half_ce_half_dice():
    logits = torch.randn(2, 2, 8, 8, 8)
    labels = torch.randint(0, 2, (2, 1, 8, 8, 8))
    from monai.losses import DiceLoss

    dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, labels)
    ce = F.cross_entropy(logits, labels[:, 0])
    assert train_objects.loss()(logits, labels).item() == pytest.approx((0.5 * dice + 0.5 * ce).item(), rel=1e-5)


def _inputs(k=2, b=2):
    f_l = torch.randn(b, 6, 3, 3, 3)
    y_l = torch.randint(0, k, (b, 1, 12, 12, 12))
    f_u = torch.randn(b, 6, 3, 3, 3)
    p_u = torch.softmax(torch.randn(b, k, 12, 12, 12), 1)
    return f_l, y_l, f_u, p_u


def test_forward_loss_is_mse_of_l2u_against_teacher():
    f_l, y_l, f_u, p_u = _inputs()
    loss, classes = forward_prototype_loss(f_l, y_l, f_u, p_u)
    protos, _ = brute_prototypes(f_l, y_l, 2)
    ref = F.mse_loss(brute_probabilities(f_u, protos, (12, 12, 12)), p_u)
    assert classes.all() and loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_backward_loss_is_ce_of_u2l_against_real_labels():
    f_l, y_l, f_u, p_u = _inputs(k=3)
    loss, classes = backward_prototype_loss(f_l, y_l, f_u, p_u)
    protos, _ = brute_prototypes(f_u, p_u.argmax(1, keepdim=True), 3)
    ref = F.nll_loss(torch.log(brute_probabilities(f_l, protos, (12, 12, 12))), y_l[:, 0])
    assert classes.all() and loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_undefined_prototypes_skip_the_term_without_nan():
    f_l, y_l, f_u, p_u = _inputs()
    f_l.requires_grad_(True)
    no_fg = torch.zeros_like(y_l)
    loss, classes = forward_prototype_loss(f_l, no_fg, f_u, p_u)
    assert classes.tolist() == [True, False] and not covers(classes) and loss.item() == 0.0
    all_bg = torch.stack([torch.ones_like(p_u[:, 0]), torch.zeros_like(p_u[:, 1])], 1)  # teacher: no foreground
    loss_b, classes_b = backward_prototype_loss(f_l, y_l, f_u, all_bg)
    assert classes_b.tolist() == [True, False] and loss_b.item() == 0.0
    (loss + loss_b).backward()
    assert torch.equal(f_l.grad, torch.zeros_like(f_l))


def test_an_absent_class_is_masked_out_of_l_fpc_not_the_whole_term():
    """K = 3, class 2 in no labeled image: L2U runs over classes 0 and 1 (softmax over their two prototypes),
    compared on those channels at the voxels the teacher gives to them; literal computation."""
    torch.manual_seed(0)
    f_l, y_l, f_u, p_u = _inputs(k=3)
    y_l = y_l % 2  # classes 0 and 1 only
    f_l.requires_grad_(True)
    loss, classes = forward_prototype_loss(f_l, y_l, f_u, p_u)
    assert classes.tolist() == [True, True, False] and covers(classes)
    protos, _ = brute_prototypes(f_l.detach(), y_l, 3)
    p_l2u = brute_probabilities(f_u, protos[:2], (12, 12, 12))  # no zero prototype for class 2 in the softmax
    keep = p_u.argmax(1) != 2  # [B, *S]
    assert 0 < keep.float().mean() < 1
    ref = sum(((p_l2u[:, c] - p_u[:, c]) ** 2)[keep].sum() for c in range(2)) / (2 * keep.sum())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    leaked = F.mse_loss(prototype_probabilities(f_u, protos, (12, 12, 12)), p_u)  # a zero class-2 prototype in it
    assert abs(loss.item() - leaked.item()) > 1e-3
    loss.backward()
    assert f_l.grad.abs().sum() > 0  # the term stays on: it trains the labeled features


def test_an_absent_class_is_masked_out_of_l_bpc_not_the_whole_term():
    """K = 3, the teacher predicts class 1 nowhere: U2L runs over the prototypes of classes 0 and 2, and the
    cross entropy over the labeled voxels whose real label is 0 or 2 (as positions 0 and 1); literal computation."""
    torch.manual_seed(1)
    f_l, y_l, f_u, _ = _inputs(k=3)
    logits_u = torch.randn(2, 3, 12, 12, 12)
    logits_u[:, 1] = -10.0  # class 1: never the teacher's argmax
    p_u = torch.softmax(logits_u, 1)
    loss, classes = backward_prototype_loss(f_l, y_l, f_u, p_u)
    assert classes.tolist() == [True, False, True]
    protos, _ = brute_prototypes(f_u, p_u.argmax(1, keepdim=True), 3)
    p_u2l = brute_probabilities(f_l, protos[[0, 2]], (12, 12, 12))  # [B, 2, *S]
    target = y_l[:, 0]
    keep = target != 1
    picked = torch.where(target == 0, p_u2l[:, 0], p_u2l[:, 1])
    ref = -torch.log(picked[keep]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss.item() > 0


def test_per_image_pairing_skips_only_images_without_a_class():
    f_l, y_l, f_u, p_u = _inputs()
    y_l[1] = 0  # image 1 has no foreground: its pair is dropped, image 0's pair stays
    loss, classes = forward_prototype_loss(f_l, y_l, f_u, p_u, per_image=True)
    protos, _ = brute_prototypes(f_l[:1], y_l[:1], 2)
    ref = F.mse_loss(brute_probabilities(f_u[:1], protos, (12, 12, 12)), p_u[:1])
    assert covers(classes) and loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_softmax_mse_consistency():
    s, t = torch.randn(2, 2, 4, 4, 4), torch.softmax(torch.randn(2, 2, 4, 4, 4), 1)
    assert softmax_mse_consistency(s, t).item() == pytest.approx(((torch.softmax(s, 1) - t) ** 2).mean().item())


@pytest.mark.parametrize("term", ["fpc", "bpc"])
@pytest.mark.parametrize("prototype_grad", [True, False])
def test_gradient_flow(tiny_net, term, prototype_grad):
    """Default: each prototype loss trains the student's encoder; the teacher is never differentiated.
    prototype_grad=False (released code, detached features): neither loss gives any gradient."""
    student, teacher = tiny_net, copy.deepcopy(tiny_net)
    x_l, x_u = torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 32, 32, 32)
    y_l = torch.zeros(2, 1, 32, 32, 32, dtype=torch.long)
    y_l[:, :, 8:20, 8:20, 8:20] = 1
    with torch.no_grad():
        logits_u, f_u = forward_with_features(teacher, x_u)
    p_u = torch.softmax(logits_u, 1)
    p_u[:, :, :16] = torch.tensor([0.1, 0.9]).view(1, 2, 1, 1, 1)  # make sure the teacher "sees" both classes
    _, f_l = forward_with_features(student, x_l)
    if not prototype_grad:
        f_l = f_l.detach()
    fn = forward_prototype_loss if term == "fpc" else backward_prototype_loss
    loss, classes = fn(f_l, y_l, f_u, p_u)
    assert classes.all()
    if prototype_grad:
        loss.backward()
        encoder_grad = sum(p.grad.abs().sum() for n, p in student.named_parameters() if n.startswith("down_"))
        assert encoder_grad > 0
        assert all(p.grad is None for p in teacher.parameters())
    else:
        assert not loss.requires_grad  # nothing to differentiate: the released code's inert loss


@pytest.mark.parametrize("term", ["fpc", "bpc"])
def test_per_image_pairing_with_a_short_labeled_batch_pairs_the_first_images(term):
    """A last labeled batch of 1 beside 2 unlabeled images (3 labeled cases, batch 2): image 0 pairs with image 0."""
    f_l, y_l, f_u, p_u = _inputs()
    fn = forward_prototype_loss if term == "fpc" else backward_prototype_loss
    short, classes = fn(f_l[:1], y_l[:1], f_u, p_u, per_image=True)
    first, _ = fn(f_l[:1], y_l[:1], f_u[:1], p_u[:1], per_image=True)
    assert covers(classes) and short.item() == pytest.approx(first.item(), rel=1e-6) and short.item() > 0


def test_fig6_maps_cover_the_classes_present():
    """K = 3 with class 2 in no labeled image: P_l2u is the softmax over the two labeled prototypes, with a zero
    channel for class 2, not None (a small tumour class would otherwise blank Fig. 6 on most steps)."""
    from cpcl_bundle.losses import prototype_predictions

    f_l, y_l, f_u, p_u = _inputs(k=3)
    y_l = y_l % 2
    maps = prototype_predictions(f_l, y_l, f_u, p_u)
    protos, _ = brute_prototypes(f_l, y_l, 3)
    expected = brute_probabilities(f_u, protos[:2], (12, 12, 12))
    assert torch.allclose(maps["p_l2u"][:, :2], expected, atol=1e-5) and maps["p_l2u"][:, 2].abs().max() == 0
    assert maps["p_u2l"] is not None and maps["p_u2l"].shape == (2, 3, 12, 12, 12)
    none = prototype_predictions(f_l, torch.zeros_like(y_l), f_u, p_u)  # background only: nothing to tell apart
    assert none["p_l2u"] is None


def test_ema_warmup_is_the_code_bases_update_variables():
    """min(1 - 1/(t + 1), alpha), t = updates before this one (UA-MT's update_ema_variables): 0, 1/2, 2/3, ...,
    0.99 from the 100th update on; without the warm-up the paper's constant alpha (Eq. 2)."""
    from cpcl_bundle.losses import ema_decay_at

    warm = [ema_decay_at(i, 0.99, warmup=True) for i in range(1, 203)]
    assert warm[:3] == [0.0, 0.5, pytest.approx(2 / 3)]
    assert all(a == pytest.approx(1 - 1 / i) for i, a in enumerate(warm[:99], start=1))
    assert warm[99:] == [0.99] * 103
    assert {ema_decay_at(i, 0.99) for i in range(1, 50)} == {0.99}
