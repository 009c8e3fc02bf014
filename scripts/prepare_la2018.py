# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Left Atrium 2018 (processed h5 of the UA-MT code base) to the bundle's layout, with the standard 80/20 split.

    python scripts/prepare_la2018.py --source_dir "RAW/2018LA_Seg_Training Set" --dataset_dir data/la2018
    # only part of the listed cases at hand (e.g. the 80 training cases without the 20 test cases),
    # 20 of the 80 held out (seeded) as the validation list for reporting:
    python scripts/prepare_la2018.py --source_dir RAW --dataset_dir data/la2018 --allow_missing true --holdout 20

Input: ``<source_dir>/<case id>/mri_norm2.h5`` with ``image`` (float32, z-scored) and ``label`` (uint8: 0
background, 1 left atrium), axes in the original NRRD (x, y, z) order, 0.625 mm isotropic voxels (not stored
in the file). ``source_dir`` may also be the folder above ``2018LA_Seg_Training Set``.

Output (``cpcl_tools.prepare``): ``training`` = the cases of ``configs/splits/la2018/train.list`` (80),
``test`` = those of ``test.list`` (20), both as they are found; ``--holdout N`` moves N seeded training cases
to ``validation``. The image is written unchanged (float32, already normalised: the la2018 preset rescales
nothing), the label as uint8, with the affine written explicitly: 0.625 mm, the NRRD axes taken as
left-posterior-superior (the NRRD convention), i.e. ``diag(-0.625, -0.625, 0.625)`` in NIfTI's RAS. The
labeled subsets (8 = 10 %, 16 = 20 %) are the preset's ``num_labeled``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpcl_tools.prepare import (  # noqa: E402
    PrepareError,
    case_entry,
    check_label_values,
    convert_all,
    run_cli,
    save_nifti,
    seeded_split,
    select_listed,
    shipped_split,
    write_datalist,
)

SPACING_MM = 0.625
#: NRRD axes (left, posterior, superior) at 0.625 mm, as a NIfTI (RAS) affine.
AFFINE = np.diag([-SPACING_MM, -SPACING_MM, SPACING_MM, 1.0])
H5_NAME = "mri_norm2.h5"
CITATION = (
    "Xiong, Z. et al. A Global Benchmark of Algorithms for Segmenting Late Gadolinium-Enhanced Cardiac "
    "Magnetic Resonance Imaging. Medical Image Analysis 67, 2021"
)


def read_case(h5_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) of one ``mri_norm2.h5``; errors name the file and the cause."""
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            missing = [name for name in ("image", "label") if name not in f]
            if missing:
                raise PrepareError(f"{h5_path}: no '{missing[0]}' dataset (found: {sorted(f.keys())})")
            image, label = np.asarray(f["image"]), np.asarray(f["label"])
    except OSError as e:
        raise PrepareError(f"{h5_path}: unreadable h5 file ({e})") from None
    if image.ndim != 3:
        raise PrepareError(f"{h5_path}: 'image' has shape {image.shape}, expected a 3-D volume")
    if label.shape != image.shape:
        raise PrepareError(f"{h5_path}: 'label' shape {label.shape} differs from 'image' shape {image.shape}")
    if not np.isfinite(image).all():
        raise PrepareError(f"{h5_path}: 'image' has {int((~np.isfinite(image)).sum())} NaN/Inf voxels")
    check_label_values(label, (0, 1), h5_path, "0 background, 1 left atrium")
    return image.astype(np.float32), label.astype(np.uint8)


def convert_case(job: tuple[str, str, str, str]) -> str:
    """Write one case's image and label NIfTI; returns the case id."""
    case, h5_path, images, labels = job
    image, label = read_case(h5_path)
    save_nifti(image, AFFINE, Path(images) / f"{case}.nii.gz", np.float32)
    save_nifti(label, AFFINE, Path(labels) / f"{case}.nii.gz", np.uint8)
    return case


def main(
    source_dir: str,
    dataset_dir: str = "data/la2018",
    allow_missing: bool = False,
    holdout: int = 0,
    seed: int = 0,
    workers: int = 2,
) -> None:
    """Convert the listed cases found in ``source_dir`` into ``dataset_dir`` and write its ``dataset.json``."""
    from cpcl_bundle.validation import as_bool

    allow_missing = as_bool(allow_missing, "allow_missing")
    source = Path(source_dir)
    if (source / "2018LA_Seg_Training Set").is_dir():
        source = source / "2018LA_Seg_Training Set"
    if not source.is_dir():
        raise PrepareError(f"{source}: source folder does not exist")
    present = {p.name for p in source.iterdir() if p.is_dir()}
    if not present:
        raise PrepareError(f"{source}: no case folders (<case id>/{H5_NAME}) in it")
    no_h5 = sorted(case for case in present if not (source / case / H5_NAME).is_file())
    if no_h5:
        raise PrepareError(
            f"{source / no_h5[0] / H5_NAME}: file does not exist ({len(no_h5)} case folder(s) without it)"
        )
    train = select_listed(shipped_split("la2018", "train.list"), present, "train.list", str(source), allow_missing)
    test = select_listed(shipped_split("la2018", "test.list"), present, "test.list", str(source), allow_missing)
    if not train:
        raise PrepareError(f"{source}: none of the 80 cases of configs/splits/la2018/train.list is there")
    validation, training = seeded_split(train, [int(holdout), len(train) - int(holdout)], seed)
    out = Path(dataset_dir)
    start = time.perf_counter()
    jobs = [(c, str(source / c / H5_NAME), str(out / "imagesTr"), str(out / "labelsTr")) for c in train]
    jobs += [(c, str(source / c / H5_NAME), str(out / "imagesTs"), str(out / "labelsTs")) for c in test]
    convert_all(convert_case, jobs, workers, desc="la2018")
    info = {
        "name": "la2018",
        "description": "Left Atrium 2018 (LGE-MRI), processed h5 of the UA-MT code base; 0.625 mm, z-scored",
        "reference": CITATION,
        "labels": {"0": "background", "1": "left atrium"},
        "prepared_with": {
            "script": "scripts/prepare_la2018.py",
            "source_dir": str(Path(source_dir).resolve()),
            "allow_missing": allow_missing,
            "holdout": int(holdout),
            "seed": int(seed),
        },
    }
    lists = {
        "training": [case_entry(c, "imagesTr", "labelsTr") for c in training],
        "validation": [case_entry(c, "imagesTr", "labelsTr") for c in validation],
        "test": [case_entry(c, "imagesTs", "labelsTs") for c in test],
    }
    path = write_datalist(out, lists, info)
    print(
        f"{len(jobs)} cases in {time.perf_counter() - start:.1f} s: {len(training)} training, {len(validation)} "
        f"validation, {len(test)} test -> {path}"
    )


if __name__ == "__main__":
    run_cli(main)
