# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""BraTS 2019 training data (FLAIR) to the bundle's layout, with the SSL4MIS 250/25/60 split.

    python scripts/prepare_brats2019.py --source_dir RAW/MICCAI_BraTS_2019_Data_Training --dataset_dir data/brats2019
    # only part of the listed cases at hand:
    python scripts/prepare_brats2019.py --source_dir RAW --dataset_dir data/brats2019 --allow_missing true

Input: the BraTS 2019 training release, ``<source_dir>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``
(co-registered, skull-stripped, 1 mm, 240 x 240 x 155; seg: 0 background, 1 necrotic / non-enhancing tumour
core, 2 peritumoural oedema, 4 enhancing tumour). ``source_dir`` may also be the folder above
``MICCAI_BraTS_2019_Data_Training`` (or above any one folder holding ``HGG`` / ``LGG``).

Output (``cpcl_tools.prepare``): the FLAIR image and the seg of the cases of
``configs/splits/brats2019/{train,val,test}.txt`` (the 250/25/60 split of SSL4MIS) as ``training``,
``validation`` and ``test``, each file with its own affine. The labels keep the data set's values 0, 1, 2, 4
(uint8; the brats2019 preset maps them to the whole tumour, a multi-class preset can use the sub-regions); a
value outside them is an error naming the file. The FLAIR is written as int16 when that is exact (the release
stores whole numbers), as float32 otherwise. The label ratios of the study (10, 30, 50 %) are recorded in
``dataset.json`` with the labeled counts they give. The T1, T1ce and T2 images are not used.
"""

from __future__ import annotations

import os
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
    select_listed,
    shipped_split,
    write_datalist,
    write_nifti_case,
)

RELEASE_FOLDER = "MICCAI_BraTS_2019_Data_Training"
GRADES = ("HGG", "LGG")
#: datalist key, shipped list of configs/splits/brats2019/
LISTS = (("training", "train.txt"), ("validation", "val.txt"), ("test", "test.txt"))
FOLDERS = {
    "training": ("imagesTr", "labelsTr"),
    "validation": ("imagesTr", "labelsTr"),
    "test": ("imagesTs", "labelsTs"),
}
LABEL_RATIOS = (0.1, 0.3, 0.5)
LABELS = {
    "0": "background",
    "1": "necrotic/non-enhancing tumour core",
    "2": "peritumoural oedema",
    "4": "enhancing tumour",
}
CITATION = (
    "Menze, B. H. et al. The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS). IEEE Transactions on "
    "Medical Imaging 34(10), 2015; Bakas, S. et al. Advancing The Cancer Genome Atlas glioma MRI collections "
    "with expert segmentation labels and radiomic features. Scientific Data 4:170117, 2017"
)
SPLIT_CITATION = "Luo, X. SSL4MIS. https://github.com/HiLab-git/SSL4MIS, 2020"


def find_source(source_dir: str | os.PathLike) -> Path:
    """The folder holding ``HGG`` and/or ``LGG``: ``source_dir``, its ``MICCAI_BraTS_2019_Data_Training``, or
    the one folder in it that has them."""
    source = folder_arg(source_dir, "source_dir")
    if not source.is_dir():
        raise PrepareError(f"{source}: source folder does not exist")
    candidates = [source, source / RELEASE_FOLDER] + sorted(p for p in source.iterdir() if p.is_dir())
    for folder in candidates:
        if any((folder / grade).is_dir() for grade in GRADES):
            return folder
    raise PrepareError(f"{source}: no HGG or LGG folder in it (nor in {RELEASE_FOLDER}/ or a folder below it)")


def case_folders(root: Path) -> dict[str, Path]:
    """``{case id: folder}`` of every case folder in ``root/HGG`` and ``root/LGG``."""
    found: dict[str, Path] = {}
    for grade in GRADES:
        if not (root / grade).is_dir():
            continue
        for folder in sorted(p for p in (root / grade).iterdir() if p.is_dir()):
            if folder.name in found:
                raise PrepareError(f"{folder}: case {folder.name} is also in {found[folder.name].parent}")
            found[folder.name] = folder
    if not found:
        raise PrepareError(f"{root}: no case folders in its {' or '.join(GRADES)} folder")
    return found


def modality_file(folder: Path, modality: str, meaning: str) -> Path:
    """``<folder>/<case>_<modality>.nii.gz`` (or ``.nii``, or the one ``*_<modality>.nii.gz`` there); an error
    naming the folder when there is none."""
    for name in (f"{folder.name}_{modality}.nii.gz", f"{folder.name}_{modality}.nii"):
        if (folder / name).is_file():
            return folder / name
    matches = sorted(folder.glob(f"*_{modality}.nii.gz")) or sorted(folder.glob(f"*_{modality}.nii"))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise PrepareError(f"{folder}: {len(matches)} files *_{modality}.nii.gz ({meaning}), expected one")
    raise PrepareError(f"{folder}: no {folder.name}_{modality}.nii.gz ({meaning}) in the case folder")


def convert_case(job: tuple[str, str, str, str, str]) -> str:
    """Write one case's FLAIR and seg NIfTI with the files' own affines; returns the image dtype written."""
    case, image_path, label_path, images, labels = job
    meaning = "0 background, 1 tumour core, 2 oedema, 4 enhancing tumour"
    case_arrays = read_nifti_case(image_path, label_path, (0, 1, 2, 4), meaning, image_name="FLAIR")
    return write_nifti_case(case, *case_arrays, images, labels)


def main(source_dir: str, dataset_dir: str = "data/brats2019", allow_missing: bool = False, workers: int = 2) -> None:
    """Convert the listed cases found in ``source_dir`` into ``dataset_dir`` and write its ``dataset.json``."""
    from cpcl_bundle.validation import as_bool

    allow_missing = as_bool(allow_missing, "allow_missing")
    source = find_source(source_dir)
    out = folder_arg(dataset_dir, "dataset_dir")
    folders = case_folders(source)
    lists = {}
    for key, name in LISTS:
        lists[key] = select_listed(shipped_split("brats2019", name), folders, name, str(source), allow_missing)
    if not lists["training"]:
        raise PrepareError(f"{source}: none of the 250 cases of configs/splits/brats2019/train.txt is there")
    used = {case for cases in lists.values() for case in cases}
    unused = sorted(set(folders) - used)
    if unused:
        print(f"{len(unused)} case folder(s) in none of the lists, not used ({', '.join(unused[:3])})")
    files = {
        case: (modality_file(folders[case], "flair", "FLAIR image"), modality_file(folders[case], "seg", "label"))
        for case in sorted(used)
    }
    start = time.perf_counter()
    jobs = []
    for key, cases in lists.items():
        images, labels = FOLDERS[key]
        jobs += [(c, str(files[c][0]), str(files[c][1]), str(out / images), str(out / labels)) for c in cases]
    dtypes = convert_all(convert_case, jobs, int(workers), desc="brats2019")
    grades = {grade: sum(folders[c].parent.name == grade for c in used) for grade in GRADES}
    info = {
        "name": "brats2019",
        "description": "BraTS 2019 training data, FLAIR only, 1 mm, skull-stripped; labels as released",
        "reference": CITATION,
        "split_reference": SPLIT_CITATION,
        "labels": LABELS,
        "label_ratios": list(LABEL_RATIOS),
        "num_labeled": {str(r): num_labeled(r, len(lists["training"])) for r in LABEL_RATIOS},
        "split": {key: len(cases) for key, cases in lists.items()},
        "grades": grades,
        "prepared_with": {
            "script": "scripts/prepare_brats2019.py",
            "source_dir": str(Path(str(source_dir)).resolve()),
            "allow_missing": allow_missing,
            "image_dtypes": {d: dtypes.count(d) for d in sorted(set(dtypes))},
        },
    }
    datalist = {key: [case_entry(c, *FOLDERS[key]) for c in cases] for key, cases in lists.items()}
    path = write_datalist(out, datalist, info)
    print(
        f"{len(jobs)} cases in {time.perf_counter() - start:.1f} s: {len(lists['training'])} training, "
        f"{len(lists['validation'])} validation, {len(lists['test'])} test -> {path}"
    )


if __name__ == "__main__":
    run_cli(main)
