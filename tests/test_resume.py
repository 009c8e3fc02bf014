# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Exact resume after SIGKILL, and determinism: the same seed gives the same weights and metrics."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from cpcl_bundle.resume import ResumableSampler, TrainingRNG, latest_checkpoint
from tests.test_bundle import LOGGING, META, ROOT, TRAIN

STEPS = 6


def _cmd(dataset, out, *extra):
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        TRAIN,
        "--meta_file",
        META,
        "--logging_file",
        LOGGING,
        "--bundle_root",
        str(ROOT),
        "--dataset_dir",
        str(dataset),
        "--output_dir",
        str(out),
        "--ckpt_dir",
        str(out / "models"),
        "--max_iterations",
        str(STEPS),
        "--iterations_per_epoch",
        "2",
        "--val_interval",
        "1",
        "--checkpoint_interval",
        "1",
        "--method",
        "mt_cpcl",
        "--labeled_ratio",
        "0.34",
        "--patch_size",
        "[32,32,32]",
        "--sw_roi_size",
        "[32,32,32]",
        "--cache_workers",
        "1",
        *extra,
    ]


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _state(out):
    return torch.load(out / "checkpoints" / f"resume_checkpoint_{STEPS}.pt", map_location="cpu", weights_only=True)


def _val_dice(log):
    return [float(v) for v in re.findall(r"Metrics -- val_mean_dice: ([0-9.]+)", log)]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_straight_run_and_runs_are_deterministic(tiny_dataset, tmp_path):
    straight, again, killed = tmp_path / "straight", tmp_path / "again", tmp_path / "killed"
    log_a = _run(_cmd(tiny_dataset, straight))
    log_b = _run(_cmd(tiny_dataset, again))

    # determinism: same seed, same data, CPU -> the same checkpoint and the same metrics
    a, b = _state(straight), _state(again)
    for part in ("model", "teacher", "optimizer"):
        assert json.dumps(str(a[part].keys())) == json.dumps(str(b[part].keys()))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _val_dice(log_a) == _val_dice(log_b) and len(_val_dice(log_a)) == STEPS // 2

    # SIGKILL half-way, then resume with one setting
    proc = subprocess.Popen(
        _cmd(tiny_dataset, killed),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        found = latest_checkpoint(killed / "checkpoints")
        if found is not None and int(found.stem.rsplit("_", 1)[1]) >= STEPS // 2:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(killed / "checkpoints").stem.rsplit("_", 1)[1])
    assert killed_at < STEPS
    torch.load(latest_checkpoint(killed / "checkpoints"), weights_only=True)  # never a truncated file
    log_c = _run(_cmd(tiny_dataset, killed, "--resume", "true"))
    assert "resumed from" in log_c and f"at iteration {killed_at}" in log_c
    c = _state(killed)
    for part in ("model", "teacher"):
        assert all(torch.equal(a[part][k], c[part][k]) for k in a[part]), part
    assert c["trainer"]["iteration"] == STEPS
    final_a = torch.load(straight / "models" / "model.pt", weights_only=True)
    final_c = torch.load(killed / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(final_a[k], final_c[k]) for k in final_a)


def test_resumable_sampler_continues_mid_pass():
    sampler = ResumableSampler(range(7), seed=3)
    it = iter(sampler)
    first = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    rest = list(it) + list(iter(sampler))[:3]
    restored = ResumableSampler(range(7), seed=3)
    restored.load_state_dict(state)
    assert list(iter(restored)) + list(iter(restored))[:3] == rest
    assert sorted(first + rest[:3]) == list(range(7))


def test_training_rng_restores_every_generator():
    from monai.transforms import Compose, RandFlipd, RandSpatialCropd

    compose = Compose([RandSpatialCropd("image", roi_size=(2, 2, 2), random_size=False), RandFlipd("image", prob=0.5)])
    rng = TrainingRNG([compose], [ResumableSampler(range(5))])
    assert len(rng.transforms) >= 2
    state = rng.state_dict()

    def draw():
        return (torch.rand(3).tolist(), [float(t.R.rand()) for t in rng.transforms], __import__("numpy").random.rand())

    first = draw()
    rng.load_state_dict(state)
    assert draw() == first
    with pytest.raises(ValueError, match="same configuration"):
        TrainingRNG([], []).load_state_dict(state)


def test_resume_setting_typed_on_the_command_line_means_what_it_says(tmp_path):
    """python-fire hands `--resume false` over as the string 'false': it must not switch resuming on."""
    from cpcl_bundle.resume import ResumeCheckpoint

    assert ResumeCheckpoint(tmp_path, resume="false").resume is False
    assert ResumeCheckpoint(tmp_path, resume="True").resume is True
    assert ResumeCheckpoint(tmp_path, resume=False).resume is False
    with pytest.raises(ValueError, match="resume must be true or false"):
        ResumeCheckpoint(tmp_path, resume="maybe")


@pytest.mark.parametrize(
    "method, amp, protocol",
    [
        ("dan", False, {}),
        ("dtml", False, {}),
        ("uamt", False, {}),
        ("ict", False, {}),
        ("cpcl", True, {}),
        ("mt", True, {}),
        ("uamt", True, {"dropout": 0.5, "ema_warmup": True}),
        ("cpcl", False, {"dropout": 0.3, "dropout_kind": "element", "ema_warmup": True}),
    ],
)
def test_terms_with_their_own_state_or_randomness_resume_exactly(method, amp, protocol, tmp_path):
    """In process: a run stopped after 2 of 4 steps and resumed from its checkpoint ends with the weights of the
    straight run, the student, the teacher and the term's own module and optimiser (DAN's discriminator,
    DTML's distance network) alike; in bf16 (``amp``) as in fp32, and with the LA code bases' backbone dropout
    (random masks on student and teacher) and EMA warm-up."""
    from cpcl_bundle.precision import cpu_has_bf16
    from tests.helpers import resumable_trainer

    if amp and not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions: amp trains in fp32 here")

    def trainer(folder, resume=False, stop_at=None, amp=amp):
        return resumable_trainer(folder, 4, resume, stop_at, method, amp, **protocol)[0]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    torch.manual_seed(0)
    straight = trainer(tmp_path / "a")
    straight.run()
    trainer(tmp_path / "b", stop_at=2).run()
    resumed = trainer(tmp_path / "b", resume=True)
    resumed.run()
    assert resumed.state.iteration == 4
    assert resumed.amp_dtype == (torch.bfloat16 if amp else None)
    with_teacher = method in ("uamt", "ict", "cpcl", "mt")
    pairs = [(straight.network, resumed.network)] + [(straight.teacher, resumed.teacher)] * with_teacher
    for a, b in pairs:
        assert same(a, b)
    term_a, term_b = straight.terms[0], resumed.terms[0]
    if term_a.has_state:
        state_a, state_b = term_a.module.state_dict(), term_b.module.state_dict()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    if amp:  # and the bf16 run is not the fp32 run under another name
        torch.manual_seed(0)
        fp32 = trainer(tmp_path / "c", amp=False)
        fp32.run()
        assert not same(straight.network, fp32.network)
