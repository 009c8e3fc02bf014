# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""KiTS19 (kidney tumour segmentation challenge, CT) to the bundle's layout, with a seeded 150/10/50 split.

    python scripts/prepare_kits19.py --source_dir kits19/data --dataset_dir data/kits19
    # the challenge's test images (case_00210 .. case_00299, no segmentation) as the unlabeled list too:
    python scripts/prepare_kits19.py --source_dir kits19/data --dataset_dir data/kits19 --include_unlabeled true
    # only part of the 210 segmented cases at hand: the split scaled to the cases present
    python scripts/prepare_kits19.py --source_dir kits19/data --dataset_dir data/kits19 --allow_missing true

Input: the ``data/`` folder of the kits19 repository (https://github.com/neheller/kits19) after its
``starter_code/get_imaging.py``: ``<source_dir>/case_XXXXX/imaging.nii.gz`` (CT in HU) and, for case_00000
.. case_00209, ``segmentation.nii.gz`` (0 background, 1 kidney, 2 tumour). ``source_dir`` may also be the
repository itself (the folder above ``data``). The arrays store the slice axis first, (z, y, x), and the
affine's spacing entries are negative (not RAS); each file's array and affine are written unchanged (the
bundle's ``Orientationd`` puts them in RAS, ``Invertd`` puts predictions back into this geometry).

Output (``cpcl_tools.prepare``): the 210 segmented cases, sorted by id, cut by a permutation seeded by
``--seed`` into ``training`` (150), ``validation`` (10) and ``test`` (50); with fewer cases present
(``--allow_missing true``) the same 150:10:50 proportions, at least one validation and one test case. The
labels keep the data set's values 0, 1, 2 (uint8; the kits19 preset maps kidney = 1 and 2, so a multi-class
preset can use the tumour label); a value outside them is an error naming the file. The image keeps its
HU values: as int16 when that is exact (KiTS19 stores whole HU numbers, as float64 in some releases; int16
is lossless for them and a quarter of the size), as float32 otherwise. ``--include_unlabeled true`` writes
the cases without a segmentation (ids from 210) to ``imagesUn/`` as the ``unlabeled`` list. The label ratios
of the study (5 % and 10 %) are recorded in ``dataset.json`` with the labeled counts they give.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpcl_tools.prepare import (  # noqa: E402
    PrepareError,
    case_entry,
    convert_all,
    folder_arg,
    num_labeled,
    read_nifti_case,
    run_cli,
    seeded_split,
    select_listed,
    write_datalist,
    write_nifti_case,
)

IMAGE_NAME = "imaging.nii.gz"
LABEL_NAME = "segmentation.nii.gz"
#: case_00000 .. case_00209 have a segmentation; the challenge's test cases (from case_00210) have none.
NUM_SEGMENTED = 210
#: training, validation, test
SPLIT = (150, 10, 50)
LABEL_RATIOS = (0.05, 0.1)
LABELS = {"0": "background", "1": "kidney", "2": "tumour"}
CASE_PATTERN = re.compile(r"^case_(\d{5})$")
CITATION = (
    "Heller, N. et al. The KiTS19 challenge data: 300 kidney tumor cases with clinical context, CT semantic "
    "segmentations, and surgical outcomes. arXiv:1904.00445, 2019"
)


def find_source(source_dir: str | os.PathLike) -> Path:
    """The folder holding the ``case_XXXXX`` folders: ``source_dir``, its ``data`` or ``kits19/data``."""
    source = folder_arg(source_dir, "source_dir")
    if not source.is_dir():
        raise PrepareError(f"{source}: source folder does not exist")
    for folder in (source, source / "data", source / "kits19" / "data"):
        if folder.is_dir() and any(CASE_PATTERN.match(p.name) and p.is_dir() for p in folder.iterdir()):
            return folder
    raise PrepareError(f"{source}: no case folders (case_XXXXX/{IMAGE_NAME}) in it, nor in its data/ folder")


def split_sizes(num_cases: int) -> tuple[int, int, int]:
    """(training, validation, test) sizes: 150/10/50 of 210 cases, scaled to fewer cases in the same
    proportions (rounded, at least one validation and one test case)."""
    if num_cases < 3:
        raise PrepareError(f"{num_cases} segmented case(s): a split needs at least 3 (training, validation, test)")
    total = sum(SPLIT)
    validation = max(1, math.floor(num_cases * SPLIT[1] / total + 0.5))
    test = max(1, math.floor(num_cases * SPLIT[2] / total + 0.5))
    return num_cases - validation - test, validation, test


def convert_case(job: tuple[str, str, str | None, str, str | None]) -> str:
    """Write one case's image (and label) NIfTI with the files' own affines; returns the image dtype written."""
    case, image_path, label_path, images, labels = job
    labels_meaning = "0 background, 1 kidney, 2 tumour"
    return write_nifti_case(case, *read_nifti_case(image_path, label_path, (0, 1, 2), labels_meaning), images, labels)


def _skip_or_fail(cases: list[str], source: Path, name: str, allow_missing: bool, what: str) -> None:
    """Error naming the first ``<case>/<name>`` that does not exist, unless ``allow_missing`` (then a count)."""
    if not cases:
        return
    if not allow_missing:
        raise PrepareError(
            f"{source / cases[0] / name}: file does not exist ({len(cases)} {what} case folder(s) without "
            f"{name}; --allow_missing true skips them)"
        )
    shown = ", ".join(cases[:3]) + (", ..." if len(cases) > 3 else "")
    print(f"skipping {len(cases)} {what} case folder(s) without {name} ({shown})")


def main(
    source_dir: str,
    dataset_dir: str = "data/kits19",
    allow_missing: bool = False,
    include_unlabeled: bool = False,
    seed: int = 0,
    workers: int = 2,
) -> None:
    """Convert the KiTS19 cases found in ``source_dir`` into ``dataset_dir`` and write its ``dataset.json``."""
    from cpcl_bundle.validation import as_bool

    allow_missing = as_bool(allow_missing, "allow_missing")
    include_unlabeled = as_bool(include_unlabeled, "include_unlabeled")
    source = find_source(source_dir)
    out = folder_arg(dataset_dir, "dataset_dir")
    folders = sorted(p.name for p in source.iterdir() if p.is_dir() and CASE_PATTERN.match(p.name))
    segmented_ids = {c for c in folders if int(CASE_PATTERN.match(c).group(1)) < NUM_SEGMENTED}
    no_image = [c for c in folders if not (source / c / IMAGE_NAME).is_file()]
    _skip_or_fail([c for c in no_image if c in segmented_ids], source, IMAGE_NAME, allow_missing, "segmented")
    no_label = [
        c for c in folders if c in segmented_ids and c not in no_image and not (source / c / LABEL_NAME).is_file()
    ]
    _skip_or_fail(no_label, source, LABEL_NAME, allow_missing, "segmented")
    present = [c for c in folders if c in segmented_ids and c not in no_image and c not in no_label]
    listed = [f"case_{i:05d}" for i in range(NUM_SEGMENTED)]
    cases = select_listed(listed, present, f"the {NUM_SEGMENTED} segmented KiTS19 cases", str(source), allow_missing)
    unlabeled = []
    if include_unlabeled:
        others = [c for c in folders if c not in segmented_ids]
        _skip_or_fail([c for c in others if c in no_image], source, IMAGE_NAME, allow_missing, "unlabeled")
        unlabeled = [c for c in others if c not in no_image]
        if not unlabeled:
            print(f"--include_unlabeled: no case folders from case_{NUM_SEGMENTED:05d} on in {source}")
    sizes = split_sizes(len(cases))
    training, validation, test = seeded_split(cases, sizes, int(seed))
    start = time.perf_counter()
    jobs = [
        (c, str(source / c / IMAGE_NAME), str(source / c / LABEL_NAME), str(out / "imagesTr"), str(out / "labelsTr"))
        for c in training + validation
    ]
    jobs += [
        (c, str(source / c / IMAGE_NAME), str(source / c / LABEL_NAME), str(out / "imagesTs"), str(out / "labelsTs"))
        for c in test
    ]
    jobs += [(c, str(source / c / IMAGE_NAME), None, str(out / "imagesUn"), None) for c in unlabeled]
    dtypes = convert_all(convert_case, jobs, int(workers), desc="kits19")
    info = {
        "name": "kits19",
        "description": "KiTS19 kidney tumour CT (arterial phase), original spacing and orientation, HU",
        "reference": CITATION,
        "labels": LABELS,
        "label_ratios": list(LABEL_RATIOS),
        "num_labeled": {str(r): num_labeled(r, len(training)) for r in LABEL_RATIOS},
        "split": {
            "training": len(training),
            "validation": len(validation),
            "test": len(test),
            "unlabeled": len(unlabeled),
        },
        "prepared_with": {
            "script": "scripts/prepare_kits19.py",
            "source_dir": str(Path(str(source_dir)).resolve()),
            "allow_missing": allow_missing,
            "include_unlabeled": include_unlabeled,
            "seed": int(seed),
            "image_dtypes": {d: dtypes.count(d) for d in sorted(set(dtypes))},
        },
    }
    lists = {
        "training": [case_entry(c, "imagesTr", "labelsTr") for c in training],
        "validation": [case_entry(c, "imagesTr", "labelsTr") for c in validation],
        "test": [case_entry(c, "imagesTs", "labelsTs") for c in test],
        "unlabeled": [case_entry(c, "imagesUn", None) for c in unlabeled],
    }
    path = write_datalist(out, lists, info)
    print(
        f"{len(jobs)} cases in {time.perf_counter() - start:.1f} s: {len(training)} training, {len(validation)} "
        f"validation, {len(test)} test, {len(unlabeled)} unlabeled -> {path}"
    )


if __name__ == "__main__":
    run_cli(main)
