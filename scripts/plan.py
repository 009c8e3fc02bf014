# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Plan a preset for your own data from its fingerprint (cpcl_tools/plan.py), print each choice and why, write it.

    python scripts/plan.py --dataset_dir data/mine --out configs/presets/mine.json
    python scripts/plan.py --dataset_dir data/mine --device cuda --memory_gb 40 --method cpcl --num_labeled 8
    python -m monai.bundle run training --meta_file configs/metadata.json --logging_file configs/logging.conf \\
        --config_file "['configs/train.json','configs/presets/mine.json']"

``dataset_dir`` holds a Decathlon-style ``dataset.json`` (docs/README.md "Your own data"). The patch size is the
largest whose training step of ``--method`` fits ``--memory_gb`` (default: 90 % of the GPU's memory on CUDA,
half of the RAM on a CPU), measured with a real step per candidate (2 to 4 of them, a process each: a minute or
a few on a CPU). ``--out`` defaults to ``<dataset_dir>/plan.json``. A folder that cannot be planned ends with
one line naming the file, exit status 1. ``--probe_features`` (a smaller U-Net for the probes) is for tests.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpcl_tools import plan as planner  # noqa: E402
from cpcl_tools.prepare import folder_arg, run_cli  # noqa: E402


def main(
    dataset_dir: Any = None,
    out: str | None = None,
    device: str | None = None,
    memory_gb: float | None = None,
    method: str = "cpcl",
    num_labeled: int | None = None,
    labeled_ratio: float | None = None,
    max_iterations: int | None = None,
    max_probes: int = 4,
    workers: int = 0,
    probe_features: Any = None,
) -> None:
    """Fingerprint ``dataset_dir``, plan, print each choice with its reason, write the preset to ``out``."""
    from cpcl_bundle.methods import METHODS

    folder = folder_arg(dataset_dir, "dataset_dir")
    if method not in METHODS:
        raise planner.PlanError(f"--method {method}: not one of {sorted(METHODS)}")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = float(memory_gb) if memory_gb is not None else planner.default_memory_gb(device)
    start = time.perf_counter()
    fp = planner.fingerprint(folder, workers=int(workers))
    print(f"fingerprint of {fp.dataset_dir} ({time.perf_counter() - start:.0f} s, MONAI DataAnalyzer)", flush=True)
    features = None if probe_features is None else [int(f) for f in probe_features]
    if features is not None:
        print(f"  probes use a U-Net of features {features} (a test option: the sizes are not the real network's)")
    measure = planner.probe_step(method, device, features)
    choices = planner.plan(fp, measure, memory, method, num_labeled, labeled_ratio, max_iterations, int(max_probes))
    for choice in choices:
        print(f"{choice.name}: {choice.why}")
    target = planner.write_preset(planner.preset(choices), out or folder / "plan.json")
    print(f"wrote {target} ({time.perf_counter() - start:.0f} s); train with")
    print(f"  python -m monai.bundle run training --config_file \"['configs/train.json','{target}']\" \\")
    print("      --meta_file configs/metadata.json --logging_file configs/logging.conf")


if __name__ == "__main__":
    run_cli(main)
