# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""scripts/device_check.sh --dry-run: the GPU check's every step on the CPU at tiny sizes (synthetic LA-like cases
packed as the real ones are, the step table of every method, the loaders, a time-limited CPCL run and its
evaluation), and the files it leaves for the device tool to bring back."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_goes_through_every_step_and_leaves_its_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1500,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "packed 10 cases (near=1" in log and "MiB (la2018" in log
    variants = load_script("bench_step").DEFAULT_VARIANTS.split(",")
    table = [line for line in log.splitlines() if line.startswith("| ")]
    assert {line.split(" | ")[0][2:] for line in table} >= {*variants, "prototypes", "prototypes_naive"}
    assert {"main", "workers (1 per stream)", "thread"} <= {line.split(" | ")[0][2:] for line in table}
    assert "CPCL reached 6 of 6 steps" in log and "device_check: done" in log.splitlines()[-1]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        ["device_check.log", "steps.json", "loaders.json", "results_table.md", "per_case_metrics.csv"]
        + ["run.json", "train.log", "summary.json"]
    )  # the eight files the device tool brings back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["cases"] == 4 and 0 <= summary["mean_dice"] <= 1
    assert json.loads((out / "run.json").read_text())["overrides"]["amp"] is True


def test_usage_is_one_line():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "device_check.sh"), "--dry"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("[--dry-run]")
