# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Mixed precision: which dtype a device gets, forward passes under autocast, prototypes and losses in fp32,
and the fp16 scaler (exact resume in bf16: tests/test_resume.py)."""

import logging
import math

import pytest
import torch

import cpcl_bundle.terms as terms_module
from cpcl_bundle import precision
from tests.test_trainer import make_trainer, record_terms

needs_bf16 = pytest.mark.skipif(not precision.cpu_has_bf16(), reason="this CPU has no bf16 instructions")


def test_amp_dtype_per_device(monkeypatch, caplog):
    assert precision.amp_dtype("cpu", False) is None
    assert precision.amp_dtype("cuda", False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.amp_dtype("cuda:0", True) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.amp_dtype(torch.device("cuda", 0), True) is torch.float16
    assert precision.amp_dtype("cuda", True, {"dtype": torch.bfloat16}) is torch.bfloat16
    assert precision.amp_dtype("cpu", True, {"dtype": torch.float16}) is torch.float16

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.amp_dtype("cpu", True) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="cpcl_bundle.precision"):
        assert precision.amp_dtype("cpu", True) is None
    assert [r.getMessage() for r in caplog.records] == [
        "amp: this CPU has no bf16 instructions (avx512_bf16 or AMX); training runs in float32"
    ]


def test_only_fp16_gets_a_scaler():
    assert precision.grad_scaler("cpu", None) is None
    assert precision.grad_scaler("cpu", torch.bfloat16) is None
    assert isinstance(precision.grad_scaler("cpu", torch.float16), torch.amp.GradScaler)
    assert [precision.describe(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def _record_precision(trainer, monkeypatch):
    """Dtypes of the networks' convolutions and, for each loss call, its inputs' dtypes and whether autocast
    was on."""
    seen = {"conv": set(), "losses": []}

    def hook(module, inputs, output):
        seen["conv"].add(output.dtype)

    for module in trainer.network.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(hook)

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            seen["losses"].append((name, {t.dtype for t in tensors}, torch.is_autocast_enabled("cpu")))
            return fn(*args, **kwargs)

        return wrapped

    for name in ("forward_prototype_loss", "backward_prototype_loss"):
        monkeypatch.setattr(terms_module, name, spy(name, getattr(terms_module, name)))
    trainer.loss_function = spy("supervised", trainer.loss_function)
    return seen


@needs_bf16
def test_bf16_forward_passes_with_fp32_prototypes_and_losses(tiny_net, monkeypatch):
    trainer = make_trainer(tiny_net, "cpcl", max_epochs=3, amp=True, rampup="constant")
    assert trainer.amp_dtype is torch.bfloat16 and trainer.scaler is None
    seen = _record_precision(trainer, monkeypatch)
    history = record_terms(trainer)
    trainer.run()
    assert seen["conv"] == {torch.bfloat16}  # student and teacher alike
    assert {name for name, _, _ in seen["losses"]} == {
        "forward_prototype_loss",
        "backward_prototype_loss",
        "supervised",
    }
    assert all(dtypes == {torch.float32} and not autocast for _, dtypes, autocast in seen["losses"])
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert all(h["loss_fpc"] > 0 and h["loss_bpc"] > 0 for h in history)


@needs_bf16
def test_bf16_prototype_terms_train_the_encoder(tiny_net):
    """Under autocast, L_fpc and L_bpc each still send a gradient into the student's encoder (the method's
    Decision on gradient flow), through the fp32 cast of the bf16 features."""
    from cpcl_bundle.terms import Step

    trainer = make_trainer(tiny_net, "cpcl", amp=True)
    batch = next(iter(trainer.data_loader))
    unlabeled = next(iter(trainer.unlabeled_stream.loader))
    encoder = tiny_net.conv_0.conv_0.conv.weight
    for term in trainer.terms:
        step = Step(
            tiny_net,
            trainer.teacher,
            batch["image"],
            batch["label"],
            unlabeled["image"],
            trainer.run_network,
            trainer.layers,
        )
        step.teacher()
        value, _ = term.loss(step)
        assert value.dtype == torch.float32
        (grad,) = torch.autograd.grad(value, encoder)
        assert grad.abs().sum() > 0, term.name


def test_cpu_without_bf16_trains_in_fp32(tiny_net, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    trainer = make_trainer(tiny_net, "cpcl", max_epochs=1, amp=True)
    assert trainer.amp_dtype is None and trainer.scaler is None
    seen = _record_precision(trainer, monkeypatch)
    trainer.run()
    assert seen["conv"] == {torch.float32}


def test_fp16_steps_through_its_scaler_and_resume_saves_it(tiny_net, tmp_path):
    """fp16 (what an older GPU gets) on the CPU: backward through the GradScaler, whose state the resume
    checkpoint carries."""
    from cpcl_bundle.resume import ResumeCheckpoint

    handler = ResumeCheckpoint(tmp_path, interval=1)
    trainer = make_trainer(tiny_net, "mt", max_epochs=2, amp=True, amp_kwargs={"dtype": torch.float16})
    handler.attach(trainer)
    assert trainer.amp_dtype is torch.float16 and isinstance(trainer.scaler, torch.amp.GradScaler)
    calls = []
    trainer.scaler.scale = (lambda scale: lambda loss: calls.append(loss) or scale(loss))(trainer.scaler.scale)
    before = [p.detach().clone() for p in tiny_net.parameters()]
    trainer.run()
    assert len(calls) == 2 and trainer.scaler is not None  # MONAI's Trainer.run did not replace it
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_net.parameters()))
    saved = torch.load(tmp_path / "resume_checkpoint_2.pt", weights_only=True)
    assert saved["scaler"]["scale"] == trainer.scaler.get_scale()
