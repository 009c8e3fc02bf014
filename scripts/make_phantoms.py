# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Write the embedded default data set: CT-like kidney phantoms (NIfTI) and their ``dataset.json``.

    python scripts/make_phantoms.py --dataset_dir data/phantoms
    python scripts/make_phantoms.py --dataset_dir /tmp/ph --num_training 8 --num_test 2 --seed 1 --overwrite
    python scripts/make_phantoms.py --dataset_dir data/phantoms3 --tumour_label true   # kidney 1, tumour 2

Same arguments, same bytes (cpcl_bundle.synthetic). Prints one line per case, then the time taken, the size on
disk, the mean voxel count per case and the mean kidney fraction.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpcl_bundle.synthetic import generate_dataset  # noqa: E402
from cpcl_bundle.validation import as_bool  # noqa: E402


def main(
    dataset_dir: str,
    num_training: int = 40,
    num_validation: int = 4,
    num_test: int = 20,
    num_unlabeled: int = 0,
    seed: int = 0,
    workers: int = 2,
    overwrite: bool = False,
    scale: float = 1.0,
    tumour_label: bool = False,
) -> None:
    """Generate the phantom data set in ``dataset_dir`` (kept as is when its dataset.json exists, unless
    ``--overwrite``). ``--tumour_label true``: the renal tumour is label 2, the kidney stays 1 (three classes;
    train with ``--classes "['background','kidney','tumour']"``)."""
    tumour_label = as_bool(tumour_label, "tumour_label")  # "--tumour_label false" is a string to fire
    cases: list[dict[str, Any]] = []

    def progress(done: int, total: int, info: dict[str, Any]) -> None:
        cases.append(info)
        shape = "x".join(map(str, info["shape"]))
        tumour = f"  tumour {100 * info['tumour_fraction']:.2f}%" if tumour_label else ""
        print(
            f"[{done:3d}/{total}] {info['image']}  {shape}  kidney {100 * info['kidney_fraction']:.2f}%{tumour}",
            flush=True,
        )

    start = time.perf_counter()
    datalist = generate_dataset(
        dataset_dir,
        num_training=num_training,
        num_validation=num_validation,
        num_test=num_test,
        num_unlabeled=num_unlabeled,
        seed=seed,
        workers=workers,
        overwrite=overwrite,
        progress=progress,
        **({} if scale == 1.0 else {"scale": scale}),
        **({"tumour_label": True} if tumour_label else {}),
    )
    seconds = time.perf_counter() - start
    if not cases:
        print(f"{datalist} exists: kept (--overwrite to regenerate)")
        return
    size = sum(f.stat().st_size for f in Path(dataset_dir).rglob("*") if f.is_file())
    voxels = sum(int(a) * int(b) * int(c) for a, b, c in (info["shape"] for info in cases)) / len(cases)
    fraction = sum(info["kidney_fraction"] for info in cases) / len(cases)
    print(
        f"{len(cases)} cases in {seconds:.1f} s ({workers} workers), {size / 2**20:.0f} MiB on disk, "
        f"{voxels / 1e6:.2f} M voxels per case, kidney fraction {100 * fraction:.2f}%: {datalist}"
    )


if __name__ == "__main__":
    fire.Fire(main)
