# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""configs/multi_gpu_train.json under torchrun: 2 CPU processes with gloo, teacher identical on both ranks."""

import json
import os
import subprocess
import sys

import pytest
import torch

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
    configs = json.dumps([TRAIN, MULTI, str(override_file)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
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
        configs,
        "--meta_file",
        META,
        "--logging_file",
        LOGGING,
        "--bundle_root",
        str(ROOT),
    ]
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
