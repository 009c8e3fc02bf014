# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""configs/multi_gpu_train.json under torchrun: 2 CPU processes with gloo, teacher identical on both ranks; a run
killed with SIGKILL and resumed ends with the weights of the uninterrupted run on every rank."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from cpcl_bundle.resume import ResumableDistributedSampler, ResumableSampler, latest_checkpoint
from tests.helpers import TINY_FEATURES
from tests.test_bundle import LOGGING, META, ROOT, TRAIN

MULTI = str(ROOT / "configs" / "multi_gpu_train.json")


@pytest.mark.slow
def test_torchrun_two_ranks_keep_the_teacher_in_sync(tiny_dataset, tmp_path):
    override = {
        "dataset_dir": str(tiny_dataset),
        "output_dir": str(tmp_path),
        "ckpt_dir": str(tmp_path / "models"),
        "max_iterations": 3,
        "patch_size": [32, 32, 32],
        "sw_roi_size": [32, 32, 32],
        "labeled_ratio": 0.34,  # 2 labeled cases: one per rank
        "batch_size": 1,
        "unlabeled_batch_size": 1,
        "cache_workers": 1,
        "validate#dataset#data": "$@datalist['validation'] + @datalist['test']",  # >= 1 case per rank
        "finalize": [
            "$torch.save(@train#trainer.teacher.state_dict(), @output_dir + '/teacher_rank%d.pt' % dist.get_rank())",
            "$torch.save(@network.module.state_dict(), @output_dir + '/student_rank%d.pt' % dist.get_rank())",
            "$dist.is_initialized() and dist.destroy_process_group()",
        ],
    }
    override_file = tmp_path / "test_override.json"
    override_file.write_text(json.dumps(override))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = _torchrun([TRAIN, MULTI, str(override_file)])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    t0, t1 = (torch.load(tmp_path / f"teacher_rank{r}.pt", weights_only=True) for r in (0, 1))
    s0 = torch.load(tmp_path / "student_rank0.pt", weights_only=True)
    assert t0.keys() == t1.keys()
    assert all(torch.equal(t0[k], t1[k]) for k in t0)  # the EMA of DDP-synchronised students is identical
    assert any(not torch.equal(t0[k], s0[k]) for k in t0)  # and it is an EMA, not a copy
    assert (tmp_path / "models" / "model.pt").is_file()  # rank 0 saved the plain state dict
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)


STEPS = 8


def _torchrun(configs):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        json.dumps(configs),
        "--meta_file",
        META,
        "--logging_file",
        LOGGING,
        "--bundle_root",
        str(ROOT),
    ]


def _launch(dataset, out, resume=False):
    """torchrun of 2 ranks on a tiny network: STEPS iterations, a resume checkpoint every 2; its log in out/."""
    out.mkdir(parents=True, exist_ok=True)
    override = {
        "dataset_dir": str(dataset),
        "output_dir": str(out),
        "ckpt_dir": str(out / "models"),
        "max_iterations": STEPS,
        "iterations_per_epoch": 2,
        "checkpoint_interval": 2,
        "val_interval": 2,
        "method": "mt_cpcl",  # a teacher, an unlabeled stream and the teacher's input noise (torch's RNG)
        "network_def#features": list(TINY_FEATURES),
        "patch_size": [32, 32, 32],
        "sw_roi_size": [32, 32, 32],
        "labeled_ratio": 0.34,  # 2 labeled cases: one per rank
        "batch_size": 1,
        "unlabeled_batch_size": 1,
        "cache_workers": 1,
        "validate#dataset#data": "$@datalist['validation'] + @datalist['test']",
        "resume": resume,
        "finalize": [
            "$torch.save(@train#trainer.teacher.state_dict(), @output_dir + '/teacher_rank%d.pt' % dist.get_rank())",
            "$torch.save(@network.module.state_dict(), @output_dir + '/student_rank%d.pt' % dist.get_rank())",
            "$dist.is_initialized() and dist.destroy_process_group()",
        ],
    }
    override_file = out / f"override_{int(resume)}.json"
    override_file.write_text(json.dumps(override))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(out / f"log_{int(resume)}.txt", "w") as log:
        return subprocess.Popen(
            _torchrun([TRAIN, MULTI, str(override_file)]),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _descendants(pid):
    """Every process below ``pid`` (torchrun starts each rank in a session of its own: killpg of torchrun's group
    does not reach them)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(proc):
    """SIGKILL to the ranks' process groups, then torchrun's: the whole job at once, nothing left behind."""
    own = os.getpgid(0)
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            group = os.getpgid(pid)
            if group != own:
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _finish(proc, out, resume=False):
    proc.wait(timeout=300)
    log = (out / f"log_{int(resume)}.txt").read_text()
    assert proc.returncode == 0, log[-6000:]
    return log


def _weights(out, rank):
    return {part: torch.load(out / f"{part}_rank{rank}.pt", weights_only=True) for part in ("student", "teacher")}


@pytest.mark.slow
def test_torchrun_killed_and_resumed_equals_the_straight_run_on_every_rank(tiny_dataset, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    procs = []
    try:
        procs.append(_launch(tiny_dataset, straight))
        procs.append(_launch(tiny_dataset, killed))  # both at once: 2 ranks each share the 2 cores anyway
        deadline = time.time() + 300
        while time.time() < deadline:
            found = latest_checkpoint(killed / "checkpoints")
            if found is not None and int(found.stem.rsplit("_", 1)[1]) >= 2:
                break
            assert procs[1].poll() is None, (killed / "log_0.txt").read_text()[-6000:]
            time.sleep(0.02)
        _kill(procs[1])
        killed_at = int(latest_checkpoint(killed / "checkpoints").stem.rsplit("_", 1)[1])
        assert 2 <= killed_at < STEPS
        _finish(procs[0], straight)
        procs.append(_launch(tiny_dataset, killed, resume=True))
        log = _finish(procs[2], killed, resume=True)
    finally:
        for proc in procs:
            if proc.poll() is None:  # still running (an exited one is reaped: its pid may be another's now)
                _kill(proc)
    assert log.count(f"at iteration {killed_at}") == 2, log[-6000:]  # both ranks resumed, from the same file
    for rank in (0, 1):
        a, c = _weights(straight, rank), _weights(killed, rank)
        for part in ("student", "teacher"):
            assert a[part].keys() == c[part].keys()
            differ = [k for k in a[part] if not torch.equal(a[part][k], c[part][k])]
            assert not differ, f"rank {rank} {part}: {differ}"
    # one file holds every rank's random state, and the ranks' states differ: a mix-up would not go unseen
    name = f"checkpoints/resume_checkpoint_{STEPS}.pt"
    final = [torch.load(out / name, weights_only=True) for out in (straight, killed)]
    for checkpoint in final:
        assert checkpoint["rng"]["world_size"] == 2 and len(checkpoint["rng"]["ranks"]) == 2
        ranks = checkpoint["rng"]["ranks"]
        assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    for rank in (0, 1):
        a, c = final[0]["rng"]["ranks"][rank], final[1]["rng"]["ranks"][rank]
        assert torch.equal(a["torch"], c["torch"]) and a["samplers"] == c["samplers"]
    assert not list((killed / "checkpoints").glob("tmp*"))  # rank 0 wrote, atomically; no other writer


def test_resumable_distributed_sampler_splits_pads_and_resumes_mid_pass():
    # DistributedSampler's split and padding (7 indices, 3 ranks: 9 = the pass + its first 2), pass by pass
    for rank in range(3):
        ours = ResumableDistributedSampler(range(7), seed=4, num_replicas=3, rank=rank)
        for p in range(3):
            torch_sampler = DistributedSampler(range(7), num_replicas=3, rank=rank, shuffle=True, seed=4)
            torch_sampler.set_epoch(p)
            assert list(iter(ours)) == list(torch_sampler) and len(ours) == 3
    split = [list(ResumableSampler(range(7), seed=4, num_replicas=3, rank=r)) for r in range(3)]
    order = torch.randperm(7, generator=torch.Generator().manual_seed(4)).tolist()
    assert split == [(order + order[:2])[r::3] for r in range(3)]  # one shuffled pass, padded, rank r takes r::3
    assert split[0] != split[1]

    # state round trip mid-pass, into the next pass
    sampler = ResumableSampler(range(7), seed=4, num_replicas=2, rank=1)
    it = iter(sampler)
    first = [next(it) for _ in range(2)]
    state = sampler.state_dict()
    assert state["num_replicas"] == 2
    rest = list(it) + list(iter(sampler))
    restored = ResumableSampler(range(7), seed=4, num_replicas=2, rank=1)
    restored.load_state_dict(state)
    assert list(iter(restored)) + list(iter(restored)) == rest and len(first + rest[:2]) == 4
    with pytest.raises(ValueError, match="same number of processes"):
        ResumableSampler(range(7), seed=4).load_state_dict(state)
    assert "num_replicas" not in ResumableSampler(range(7)).state_dict()  # the single-process format, unchanged
    with pytest.raises(RuntimeError, match="no initialised process group"):
        ResumableDistributedSampler(range(7))


def test_a_checkpoint_of_another_world_size_is_refused_naming_the_file(tmp_path):
    from ignite.engine import Engine

    from cpcl_bundle.resume import ResumeCheckpoint, TrainingRNG

    local = TrainingRNG().state_dict()
    two_ranks = {"world_size": 2, "ranks": [local, local]}
    path = tmp_path / "resume_checkpoint_4.pt"
    torch.save({"rng": two_ranks}, path)
    handler = ResumeCheckpoint(tmp_path, objects={"rng": TrainingRNG()}, resume=True)
    with pytest.raises(ValueError, match=rf"{path}: .*saved by 2 processes under torchrun.*--nproc_per_node 2"):
        handler._load(Engine(lambda e, b: None), {"rng": handler.objects["rng"]})
    with pytest.raises(ValueError, match="saved by a single-process run"):
        TrainingRNG(distributed=True).load_state_dict(local)
    with pytest.raises(ValueError, match="saved by 2 processes, this run has 1"):
        TrainingRNG(distributed=True).load_state_dict(two_ranks)  # no process group: a world of one
    assert TrainingRNG(distributed=True).state_dict()["world_size"] == 1
    with pytest.raises(TypeError, match="DistributedSampler.*no state_dict"):
        TrainingRNG(samplers=[DistributedSampler(range(4), num_replicas=2, rank=0)])
