# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The baselines' loss terms (UA-MT, entropy minimisation, ICT, DAN, DTML, the released stability term).

Every pure function of :mod:`cpcl_bundle.baselines` is checked against a literal computation written here
(numpy and explicit loops, never the same torch expression); every term's loss inside a real
:class:`~cpcl_bundle.terms.Step` against the same literal computation on the same tensors; and through
:class:`~cpcl_bundle.trainer.CPCLTrainer`: that each term alone trains the student, and that nothing of a term
(hooks, second networks) is left in the network that is exported.
"""

import copy
import dataclasses
import itertools
import math
import types

import numpy as np
import pytest
import torch
from monai.engines import IterationEvents
from torch.utils.data import DataLoader

from cpcl_bundle.baselines import (
    AdversarialTerm,
    Discriminator3D,
    DualTaskMutualTerm,
    EntropyMinimisationTerm,
    InterpolationConsistencyTerm,
    ReleasedStabilityTerm,
    UncertaintyAwareMeanTeacherTerm,
    entropy_loss,
    heaviside,
    masked_mse,
    mc_dropout,
    mix,
    predictive_entropy,
    raw_mse,
    soft_dice_loss,
    uamt_threshold,
)
from cpcl_bundle.methods import METHODS
from cpcl_bundle.terms import TERMS, Step
from cpcl_bundle.trainer import CPCLTrainer
from cpcl_tools import train_objects
from tests.helpers import TINY_FEATURES, blob_batch

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- literal helpers
def _np(t):
    return t.detach().double().cpu().numpy()


def _np_softmax(logits):
    """Softmax over axis 1, written out."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _np_entropy(probs, eps=1e-6):
    """``-sum_k p_k log(p_k + eps)`` per voxel, ``[B, *S]``."""
    return -(probs * np.log(probs + eps)).sum(axis=1)


def _np_sigmoid_neg(z):
    """``sigmoid(-z)`` without overflow: ``exp(-log(1 + exp(z)))``."""
    return np.exp(-np.logaddexp(0.0, z))


def _logits(net, x):
    with torch.no_grad():
        return _np(net(x))


def _spatial(shape):
    return itertools.product(*(range(s) for s in shape))


# ---------------------------------------------------------------------------------------------- pure functions
def test_predictive_entropy_is_the_per_voxel_entropy_over_classes():
    rng = np.random.default_rng(0)
    raw = rng.random((2, 3, 2, 3, 2)) + 0.01
    probs = raw / raw.sum(1, keepdims=True)
    out = predictive_entropy(torch.from_numpy(probs))
    assert tuple(out.shape) == (2, 1, 2, 3, 2)
    for b in range(2):
        for s in _spatial((2, 3, 2)):
            expected = -sum(probs[(b, k) + s] * math.log(probs[(b, k) + s] + 1e-6) for k in range(3))
            assert out[(b, 0) + s].item() == pytest.approx(expected, rel=1e-12)
    uniform = torch.full((1, 4, 2, 2, 2), 0.25, dtype=torch.float64)
    assert predictive_entropy(uniform).flatten().tolist() == pytest.approx([math.log(4)] * 8, abs=1e-5)
    onehot = torch.zeros(1, 2, 2, 2, 2, dtype=torch.float64)
    onehot[:, 0] = 1
    assert predictive_entropy(onehot).abs().max().item() < 1e-5


def test_entropy_loss_is_the_mean_entropy_normalised_by_ln_k():
    rng = np.random.default_rng(1)
    raw = rng.random((2, 3, 2, 2, 3)) + 0.01
    probs = raw / raw.sum(1, keepdims=True)
    total, count = 0.0, 0
    for b in range(2):
        for s in _spatial((2, 2, 3)):
            h = -sum(probs[(b, k) + s] * math.log(probs[(b, k) + s] + 1e-6) for k in range(3))
            total, count = total + h / math.log(3), count + 1
    assert entropy_loss(torch.from_numpy(probs)).item() == pytest.approx(total / count, rel=1e-12)
    # the normalisation is by ln K of the input, not ln 2: a uniform prediction is 1 for any K
    for k in (2, 3, 5):
        uniform = torch.full((2, k, 2, 2, 2), 1.0 / k, dtype=torch.float64)
        assert entropy_loss(uniform).item() == pytest.approx(1.0, abs=1e-5)


def test_uamt_threshold_ramps_from_three_quarters_to_ln_k():
    assert uamt_threshold(0, 100) == pytest.approx((0.75 + 0.25 * math.exp(-5.0)) * LN2, rel=1e-12)
    assert uamt_threshold(100, 100) == pytest.approx(LN2, rel=1e-12)
    assert uamt_threshold(250, 100) == pytest.approx(LN2, rel=1e-12)  # clipped at the end of the run
    assert uamt_threshold(50, 100) == pytest.approx((0.75 + 0.25 * math.exp(-5.0 * 0.25)) * LN2, rel=1e-12)
    assert uamt_threshold(100, 100, num_classes=3) == pytest.approx(math.log(3), rel=1e-12)
    assert uamt_threshold(0, 100, num_classes=4) == pytest.approx((0.75 + 0.25 * math.exp(-5.0)) * math.log(4))


def test_masked_mse_averages_over_the_masked_voxels_and_the_classes():
    rng = np.random.default_rng(2)
    student, teacher = rng.random((2, 3, 2, 2, 2)), rng.random((2, 3, 2, 2, 2))
    mask = (rng.random((2, 1, 2, 2, 2)) > 0.5).astype(np.float64)
    mask[0, 0, 0, 0, 0], mask[1, 0, 1, 1, 1] = 1.0, 0.0  # at least one kept and one dropped voxel
    num, kept = 0.0, 0.0
    for b in range(2):
        for s in _spatial((2, 2, 2)):
            kept += mask[(b, 0) + s]
            for k in range(3):
                num += mask[(b, 0) + s] * (student[(b, k) + s] - teacher[(b, k) + s]) ** 2
    out = masked_mse(torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(mask))
    assert out.item() == pytest.approx(num / (3 * kept + 1e-16), rel=1e-12)
    # a dropped voxel does not count, whatever its error
    changed = teacher.copy()
    changed[1, :, 1, 1, 1] += 100.0
    again = masked_mse(torch.from_numpy(student), torch.from_numpy(changed), torch.from_numpy(mask))
    assert again.item() == pytest.approx(out.item(), rel=1e-12)
    nothing = masked_mse(torch.from_numpy(student), torch.from_numpy(teacher), torch.zeros(2, 1, 2, 2, 2).double())
    assert nothing.item() == 0.0


def test_mix_interpolates_each_image_with_its_own_factor():
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 1, 2, 2, 2)), rng.random((3, 1, 2, 2, 2))
    lam = np.array([0.0, 0.3, 1.0]).reshape(3, 1, 1, 1, 1)
    out = mix(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(lam)).numpy()
    for i in range(3):
        for s in _spatial((2, 2, 2)):
            l = float(lam[i, 0, 0, 0, 0])
            assert out[(i, 0) + s] == pytest.approx((1 - l) * a[(i, 0) + s] + l * b[(i, 0) + s], rel=1e-12)
    assert np.array_equal(out[0], a[0]) and np.array_equal(out[2], b[2])


def test_heaviside_is_a_steep_sigmoid_of_minus_the_distance():
    sdf = [-0.02, -0.005, -0.001, 0.0, 0.001, 0.005, 0.02]
    out = heaviside(torch.tensor(sdf, dtype=torch.float64)).tolist()
    assert out == pytest.approx([1.0 / (1.0 + math.exp(1500.0 * s)) for s in sdf], rel=1e-9, abs=1e-300)
    assert out[0] > 0.9999 and out[3] == 0.5 and out[-1] < 1e-4  # inside (negative) is foreground
    soft = heaviside(torch.tensor(sdf, dtype=torch.float64), k=10.0).tolist()
    assert soft == pytest.approx([1.0 / (1.0 + math.exp(10.0 * s)) for s in sdf], rel=1e-12)


def test_soft_dice_loss_over_the_whole_batch():
    rng = np.random.default_rng(4)
    score = rng.random((2, 1, 3, 3, 3))
    target = rng.random((2, 1, 3, 3, 3)) > 0.6
    inter = sq_score = sq_target = 0.0
    for b in range(2):
        for s in _spatial((3, 3, 3)):
            inter += score[(b, 0) + s] * float(target[(b, 0) + s])
            sq_score += score[(b, 0) + s] ** 2
            sq_target += float(target[(b, 0) + s]) ** 2
    expected = 1.0 - (2.0 * inter + 1e-5) / (sq_score + sq_target + 1e-5)
    assert soft_dice_loss(torch.from_numpy(score), torch.from_numpy(target)).item() == pytest.approx(
        expected, rel=1e-10
    )
    perfect = torch.from_numpy(target.astype(np.float64))
    assert soft_dice_loss(perfect, torch.from_numpy(target)).item() == pytest.approx(0.0, abs=1e-12)


def test_raw_mse_is_the_mean_squared_difference_of_logits():
    rng = np.random.default_rng(5)
    student, teacher = rng.normal(size=(2, 2, 2, 3, 2)) * 3, rng.normal(size=(2, 2, 2, 3, 2)) * 3
    total = 0.0
    for idx in _spatial(student.shape):
        total += (teacher[idx] - student[idx]) ** 2
    out = raw_mse(torch.from_numpy(student).float(), torch.from_numpy(teacher))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(total / student.size, rel=1e-5)


def test_mc_dropout_hooks_act_only_inside_the_context(tiny_net):
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        plain = tiny_net(x)
        with mc_dropout(tiny_net, ("bottleneck", "decoder_full"), 0.0):
            assert tiny_net.down_4._forward_hooks and tiny_net.upcat_1._forward_hooks
            same = tiny_net(x)
        with mc_dropout(tiny_net, ("bottleneck", "decoder_full"), 0.5):
            dropped = tiny_net(x)
    assert torch.allclose(same, plain) and not torch.allclose(dropped, plain)
    with pytest.raises(ValueError, match="not in"):
        with mc_dropout(tiny_net, ("bottleneck", "no_such_layer"), 0.5):
            pass
    assert all(not m._forward_hooks for m in tiny_net.modules())


# ---------------------------------------------------------------------------------------------- terms in a step
def _stack(items, key):
    return torch.stack([item[key] for item in items])


def make_step(student, teacher, n_unlabeled=2, iteration=1, total_iterations=1, smooth_labeled=False):
    labeled = blob_batch(2, seed=1)
    unlabeled = blob_batch(n_unlabeled, seed=2, with_label=False)
    x_l = _stack(labeled, "image")
    return Step(
        student,
        teacher,
        torch.nn.functional.avg_pool3d(x_l, 3, 1, 1) if smooth_labeled else x_l,
        _stack(labeled, "label"),
        _stack(unlabeled, "image"),
        forward=lambda net, x: net(x),
        iteration=iteration,
        total_iterations=total_iterations,
    )


def run_term(term, step):
    for name, inputs in term.student_inputs(step).items():
        step.add_student_input(name, inputs)
    return term.loss(step)


@pytest.fixture
def teacher(tiny_net):
    """A teacher that is not the student: its weights perturbed, no gradient."""
    net = copy.deepcopy(tiny_net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
            p.requires_grad_(False)
    return net


def test_uamt_loss_is_masked_mse_to_the_teacher_on_its_certain_voxels(tiny_net, teacher):
    term = UncertaintyAwareMeanTeacherTerm(noise_std=0.0, uamt_dropout=0.0, uamt_passes=4)
    step = make_step(tiny_net, teacher, iteration=3, total_iterations=5)
    loss, logs = run_term(term, step)

    p_t = _np_softmax(_logits(teacher, step.x_u))
    uncertainty = _np_entropy(p_t)
    threshold = (0.75 + 0.25 * math.exp(-5.0 * (1.0 - 2.0 / 5.0) ** 2)) * LN2  # t = iteration - 1 = 2 of 5
    mask = (uncertainty < threshold)[:, None].astype(np.float64)
    p_s = _np_softmax(_logits(tiny_net, step.x_u))
    expected = (mask * (p_s - p_t) ** 2).sum() / (2 * mask.sum() + 1e-16)

    assert 0.0 < mask.mean() < 1.0  # the mask selects: some voxels kept, some dropped
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert logs["uamt_threshold"] == pytest.approx(threshold, rel=1e-12)
    assert logs["uamt_certain"] == pytest.approx(mask.mean(), abs=1e-3)
    target, unc = term.targets(step)
    assert np.allclose(_np(target), p_t, atol=1e-5) and np.allclose(_np(unc)[:, 0], uncertainty, atol=1e-5)
    assert loss.requires_grad and all(not m._forward_hooks for m in teacher.modules())


def test_uamt_teacher_passes_are_stochastic_with_dropout(tiny_net, teacher):
    term = UncertaintyAwareMeanTeacherTerm(noise_std=0.0, uamt_dropout=0.5, uamt_passes=2)
    step = make_step(tiny_net, teacher)
    target, uncertainty = term.targets(step)
    clean = _np_softmax(_logits(teacher, step.x_u))
    assert not np.allclose(_np(target), clean, atol=1e-3)
    assert not np.allclose(_np(uncertainty)[:, 0], _np_entropy(clean), atol=1e-3)
    assert all(not m._forward_hooks for m in teacher.modules())


def test_entropy_min_loss_is_the_normalised_entropy_of_the_students_softmax(tiny_net):
    term = EntropyMinimisationTerm()
    step = make_step(tiny_net, None, smooth_labeled=True)  # labeled images of another mean entropy
    loss, _ = run_term(term, step)
    probs = _np_softmax(_logits(tiny_net, torch.cat([step.x_l, step.x_u])))
    normalised = _np_entropy(probs) / LN2
    assert abs(normalised[:2].mean() - normalised[2:].mean()) > 1e-3  # so both halves must be in the mean
    assert loss.item() == pytest.approx(normalised.mean(), rel=1e-5)
    assert loss.requires_grad


def test_ict_loss_is_mse_of_the_student_on_mixed_images_to_the_mixed_teacher(tiny_net, teacher):
    term = InterpolationConsistencyTerm()
    step = make_step(tiny_net, teacher, n_unlabeled=4)
    torch.manual_seed(123)
    inputs = term.student_inputs(step)
    for name, tensor in inputs.items():
        step.add_student_input(name, tensor)
    loss, logs = term.loss(step)

    torch.manual_seed(123)
    lam = torch.distributions.Beta(torch.tensor(0.2), torch.tensor(0.2)).sample((2,)).double().numpy()
    x_u = _np(step.x_u)
    mixed = np.empty_like(x_u[:2])
    for i in range(2):  # image i of the first half with image i of the second half
        mixed[i] = (1.0 - lam[i]) * x_u[i] + lam[i] * x_u[2 + i]
    assert set(inputs) == {"ict_mixed"} and np.allclose(_np(inputs["ict_mixed"]), mixed, atol=1e-6)
    p_t = _np_softmax(_logits(teacher, step.x_u))
    target = np.stack([(1.0 - lam[i]) * p_t[i] + lam[i] * p_t[2 + i] for i in range(2)])
    p_s = _np_softmax(_logits(tiny_net, torch.from_numpy(mixed).float()))
    assert loss.item() == pytest.approx(((p_s - target) ** 2).mean(), rel=1e-4)
    assert logs["ict_lambda"] == pytest.approx(lam.mean(), rel=1e-6)
    assert loss.requires_grad


def test_dan_loss_and_discriminator_step(tiny_net):
    term = AdversarialTerm(dan_lr=1e-3)
    step = make_step(tiny_net, None)
    loss, logs = run_term(term, step)
    disc = term.module
    assert isinstance(disc, Discriminator3D) and not disc.training
    assert logs["dan_d_loss"] == 0.0  # nothing trained yet

    probs = torch.from_numpy(_np_softmax(_logits(tiny_net, step.x_u))).float()
    with torch.no_grad():
        d_logits = _np(disc(probs, step.x_u))
    log_softmax = d_logits - d_logits.max(1, keepdims=True)
    log_softmax = log_softmax - np.log(np.exp(log_softmax).sum(1, keepdims=True))
    assert loss.item() == pytest.approx(-log_softmax[:, 1].mean(), rel=1e-4)

    loss.backward()  # the segmenter's backward reaches the discriminator too
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    before_d = [p.detach().clone() for p in disc.parameters()]
    before_s = [p.detach().clone() for p in tiny_net.parameters()]
    tiny_net.train()
    term.after_step(step, True)
    assert any(not torch.equal(a, p) for a, p in zip(before_d, disc.parameters()))
    assert all(p.grad is None for p in disc.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before_s, tiny_net.parameters())) and tiny_net.training
    assert term.d_loss > 0.0

    # a skipped step: the discriminator's gradients are dropped, its weights stay
    step = make_step(tiny_net, None)
    loss, logs = run_term(term, step)
    assert logs["dan_d_loss"] == term.d_loss  # the previous step's discriminator loss
    loss.backward()
    after_first = [p.detach().clone() for p in disc.parameters()]
    term.after_step(step, False)
    assert all(torch.equal(a, p) for a, p in zip(after_first, disc.parameters()))
    assert all(p.grad is None for p in disc.parameters())


def test_dtml_loss_and_auxiliary_dice(tiny_net):
    term = DualTaskMutualTerm()
    trainer = types.SimpleNamespace(optimizer=train_objects.optimizer(tiny_net), network=tiny_net)
    term.attach(trainer)
    step = make_step(tiny_net, None)
    loss, _ = run_term(term, step)
    aux = term.auxiliary_loss(step)

    sdf_net = term.module
    assert sdf_net.final_conv.out_channels == 1  # K - 1 signed distances
    assert set(tiny_net.state_dict()) == set(train_objects.network_def(features=TINY_FEATURES).state_dict())
    assert not {id(p) for p in sdf_net.parameters()} & {id(p) for p in tiny_net.parameters()}
    assert all(m is not sdf_net for m in tiny_net.modules())

    images = torch.cat([step.x_l, step.x_u])
    sdf = _logits(sdf_net, images)
    assert sdf.shape[1] == 1
    mask = _np_sigmoid_neg(1500.0 * np.tanh(sdf))
    fg = _np_softmax(_logits(tiny_net, images))[:, 1:]
    assert loss.item() == pytest.approx(((mask - fg) ** 2).mean(), rel=1e-4)

    score, target = mask[:2], _np(step.y_l) == 1
    dice = 1.0 - (2.0 * (score * target).sum() + 1e-5) / ((score**2).sum() + target.sum() + 1e-5)
    assert aux.detach().item() == pytest.approx(dice, rel=1e-4)

    (loss + aux).backward()
    assert all(p.grad is not None for p in sdf_net.final_conv.parameters())
    # trained by the segmenter's optimiser (its LR schedule, AMP scaling and non-finite guard): a group of it
    group = trainer.optimizer.param_groups[-1]
    assert len(trainer.optimizer.param_groups) == 2 and {id(p) for p in group["params"]} == {
        id(p) for p in sdf_net.parameters()
    }
    assert group["lr"] == 0.01
    before = [p.detach().clone() for p in sdf_net.parameters()]
    trainer.optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, sdf_net.parameters()))


def test_released_stability_is_the_mse_of_raw_logits_on_all_images(tiny_net, teacher):
    term = ReleasedStabilityTerm(noise_std=0.0)
    step = make_step(tiny_net, teacher)
    loss, _ = run_term(term, step)
    images = torch.cat([step.x_l, step.x_u])
    expected = ((_logits(teacher, images) - _logits(tiny_net, images)) ** 2).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert loss.requires_grad


# ---------------------------------------------------------------------------------------------- through the trainer
def make_trainer(net, method, n_labeled=2, loss_function=None, **kwargs):
    labeled = DataLoader(blob_batch(n_labeled, seed=1), batch_size=2)
    unlabeled = DataLoader(blob_batch(4, seed=2, with_label=False), batch_size=2, shuffle=False)
    return CPCLTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=labeled,
        network=net,
        optimizer=train_objects.optimizer(net),
        loss_function=loss_function or (lambda pred, target: pred.sum() * 0.0),
        unlabeled_data_loader=unlabeled,
        method=method,
        **kwargs,
    )


def student_gradient(net, method, **kwargs):
    """One step with L_s = 0: the total |gradient| the student gets from the method's terms, and the logs."""
    trainer = make_trainer(net, method, rampup="constant", **kwargs)
    seen = {}

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def grab(engine):
        seen["grad"] = sum(p.grad.abs().sum().item() for p in net.parameters() if p.grad is not None)
        seen["output"] = {k: v for k, v in engine.state.output.items() if isinstance(v, float)}

    trainer.run()
    return seen["grad"], seen["output"]


@pytest.mark.parametrize(
    "method,options",
    [
        ("uamt", {"uamt_passes": 2}),
        ("entropy_min", {}),
        ("ict", {}),
        ("dan", {}),
        ("dtml", {}),
        ("mt", {}),
        ("supervised", {}),  # the control: without a term, no gradient at all
    ],
)
def test_each_term_alone_trains_the_student(tiny_net, method, options):
    grad, out = student_gradient(tiny_net, method, **options)
    assert out["loss_sup"] == 0.0
    if method == "supervised":
        assert grad == 0.0
        return
    term = next(iter(METHODS[method].terms))
    assert out["lambda"] == pytest.approx(0.1) and out[f"loss_{term}"] > 0.0
    assert grad > 0.0


def test_cpcl_released_gradient_comes_from_the_stability_term_only(tiny_net):
    released = METHODS["cpcl_released"]
    prototypes_only = dataclasses.replace(released, name="released_prototypes", terms=frozenset({"fpc", "bpc"}))
    net_copy = copy.deepcopy(tiny_net)
    grad, out = student_gradient(tiny_net, released)
    assert out["loss_fpc"] > 0.0 and out["loss_bpc"] > 0.0 and out["loss_stability_released"] > 0.0
    assert out["lambda"] == pytest.approx(0.1 * math.exp(-5.0))  # the method's sigmoid ramp-up, not "constant"
    assert grad > 0.0
    grad, out = student_gradient(net_copy, prototypes_only)
    assert out["loss_fpc"] > 0.0 and out["loss_bpc"] > 0.0
    assert grad == 0.0  # detached features and weights: the prototype terms give the student no gradient


@pytest.mark.parametrize("method", ["uamt", "dan", "dtml"])
def test_nothing_leaks_into_the_exported_network(tiny_net, method):
    trainer = make_trainer(tiny_net, method, n_labeled=4)
    trainer.run()
    assert trainer.state.iteration == 2
    fresh = train_objects.network_def(features=TINY_FEATURES)
    assert list(tiny_net.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(tiny_net.state_dict(), strict=True)
    modules = list(tiny_net.modules())
    if trainer.teacher is not None:
        modules += list(trainer.teacher.modules())
    for term in trainer.terms:
        if getattr(term, "module", None) is not None:
            modules += list(term.module.modules())
            assert not {id(p) for p in term.module.parameters()} & {id(p) for p in tiny_net.parameters()}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


# ---------------------------------------------------------------------------------------------- registry
def test_baseline_methods_are_registered_and_cpcl_released_fixes_its_options():
    names = {"uamt", "entropy_min", "ict", "dan", "dtml", "cpcl_released"}
    assert names <= set(METHODS)
    for name in names - {"cpcl_released"}:
        assert METHODS[name].terms == {name} and name in TERMS
    released = METHODS["cpcl_released"]
    assert released.terms == {"fpc", "bpc", "stability_released"}
    assert dict(released.options) == {
        "prototype_grad": False,
        "confidence_weighting": True,
        "per_image_prototypes": True,
        "feature_layer": "decoder_half",
        "rampup": "sigmoid",
        "rampup_length": 40,
        "rampup_step_size": 150,
    }
    terms = released.build(prototype_grad=True, feature_layer="encoder")  # the method's settings win
    prototype_terms = [t for t in terms if t.name in ("fpc", "bpc")]
    assert len(prototype_terms) == 2
    assert all(not t.grad and t.confidence_weighting and t.per_image for t in prototype_terms)
    assert all(t.layers == ("decoder_half",) for t in prototype_terms)
