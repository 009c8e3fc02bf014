# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""From a public data set's raw download to the bundle's datalist layout (docs/design/architecture.md, data contract).

What every ``scripts/prepare_<name>.py`` shares: the published case lists shipped in ``configs/splits/``,
seeded splits, NIfTI writing, the ``dataset.json`` written last and atomically (so a folder with one is
complete), and errors that name the file and the cause in one line (:class:`PrepareError`, printed by
:func:`run_cli` as the last line with exit status 1).

Layout written into ``dataset_dir``::

    imagesTr/<case>.nii.gz   labelsTr/<case>.nii.gz   (training, validation)
    imagesTs/<case>.nii.gz   labelsTs/<case>.nii.gz   (test)
    dataset.json             training / validation / test lists (paths relative to it) and how they were made
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SPLITS_DIR",
    "PrepareError",
    "read_case_list",
    "shipped_split",
    "select_listed",
    "seeded_split",
    "check_label_values",
    "num_labeled",
    "as_int16_if_exact",
    "read_image",
    "folder_arg",
    "read_nifti_case",
    "write_nifti_case",
    "save_nifti",
    "case_entry",
    "write_datalist",
    "convert_all",
    "run_cli",
]

#: The published case lists shipped with the bundle (``configs/splits/<data set>/``).
SPLITS_DIR = Path(__file__).resolve().parents[1] / "configs" / "splits"


class PrepareError(ValueError):
    """A raw file or folder the preparation cannot use; the message is one line, ``<path>: <cause>``."""


def read_case_list(path: str | os.PathLike) -> list[str]:
    """Case ids of a list file: one per line, blank lines and surrounding whitespace ignored."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: case list does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def shipped_split(dataset: str, name: str) -> list[str]:
    """The case ids of ``configs/splits/<dataset>/<name>`` (a published list shipped with the bundle)."""
    return read_case_list(SPLITS_DIR / dataset / name)


def select_listed(
    listed: Sequence[str], present: Iterable[str], list_name: str, source: str, allow_missing: bool
) -> list[str]:
    """The listed cases in list order; a listed case absent from ``present`` is an error naming it, unless
    ``allow_missing`` (then the cases present are used and the count of missing ones is reported)."""
    present = set(present)
    missing = [case for case in listed if case not in present]
    if missing and not allow_missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise PrepareError(
            f"{source}: {len(missing)} case(s) of {list_name} missing ({shown}); "
            "--allow_missing true uses the cases present"
        )
    if missing:
        print(
            f"{list_name}: {len(missing)} of {len(listed)} listed cases are not in {source},"
            f" using the {len(listed) - len(missing)} present"
        )
    return [case for case in listed if case in present]


def seeded_split(cases: Sequence[str], sizes: Sequence[int], seed: int) -> list[list[str]]:
    """Cut a seeded permutation of ``cases`` into consecutive parts of ``sizes`` (the last part takes the
    rest when the sizes add up to less). Each part keeps the input order, so the lists read sorted."""
    if sum(sizes) > len(cases):
        raise PrepareError(f"a split of {list(sizes)} needs {sum(sizes)} cases, only {len(cases)} found")
    order = np.random.default_rng(seed).permutation(len(cases))
    parts, start = [], 0
    for size in sizes:
        chosen = set(order[start : start + size].tolist())
        parts.append([c for i, c in enumerate(cases) if i in chosen])
        start += size
    return parts


def check_label_values(label: np.ndarray, allowed: Iterable[int], path: str | os.PathLike, meaning: str) -> None:
    """:class:`PrepareError` naming ``path`` if ``label`` holds a value outside ``allowed``."""
    values = np.unique(label)
    bad = sorted(set(values.tolist()) - {int(v) for v in allowed})
    if bad:
        raise PrepareError(f"{path}: label values {bad[:5]} are not mapped by this data set's preset ({meaning})")


def num_labeled(ratio: float, num_training: int) -> int:
    """Labeled cases a ``labeled_ratio`` gives (as ``cpcl_bundle.data.semi_supervised_split`` counts them)."""
    return max(1, math.floor(ratio * num_training + 0.5))


def as_int16_if_exact(array: np.ndarray) -> np.ndarray | None:
    """``array`` as int16 when that changes no value (whole numbers within the int16 range), else None."""
    if array.dtype == np.int16:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)) or not array.size:
        return None
    if array.min() < np.iinfo(np.int16).min or array.max() > np.iinfo(np.int16).max:
        return None
    converted = array.astype(np.int16)
    return converted if np.array_equal(converted, array) else None


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(array as stored, affine) of a 3-D NIfTI; errors name the file."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported, with its type
        raise PrepareError(f"{path}: unreadable NIfTI ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if array.ndim != 3:
        raise PrepareError(f"{path}: shape {array.shape}, expected a 3-D volume")
    return array, np.asarray(image.affine, dtype=np.float64)


def folder_arg(value: Any, name: str) -> Path:
    """A folder given on the command line; fire turns a bare ``--name`` into True and digits into a number."""
    if isinstance(value, bool) or value is None or str(value) == "":
        raise PrepareError(f"--{name}: expected a folder, got {value!r}")
    return Path(str(value))


def read_nifti_case(
    image_path: str, label_path: str | None, allowed: Iterable[int], meaning: str, image_name: str = "image"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """(image, its affine, label uint8 or None, its affine) of one NIfTI case, checked: finite image, label of the
    image's shape and affine, label values in ``allowed`` (``meaning`` says what they are); errors name the file."""
    image, image_affine = read_image(image_path)
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise PrepareError(f"{image_path}: {int((~np.isfinite(image)).sum())} NaN/Inf voxels")
    if label_path is None:
        return image, image_affine, None, image_affine
    label, label_affine = read_image(label_path)
    if label.shape != image.shape:
        raise PrepareError(
            f"{label_path}: shape {label.shape} differs from the {image_name}'s {image.shape} ({image_path})"
        )
    if not np.allclose(label_affine, image_affine, atol=1e-3):
        raise PrepareError(
            f"{label_path}: affine {np.round(label_affine[:3], 4).tolist()} differs from the {image_name}'s "
            f"{np.round(image_affine[:3], 4).tolist()} ({image_path})"
        )
    check_label_values(label, allowed, label_path, meaning)
    return image, image_affine, label.astype(np.uint8), label_affine


def write_nifti_case(
    case: str,
    image: np.ndarray,
    image_affine: np.ndarray,
    label: np.ndarray | None,
    label_affine: np.ndarray,
    images: str | os.PathLike,
    labels: str | os.PathLike | None,
) -> str:
    """Write ``<images>/<case>.nii.gz`` (int16 when that is exact, else float32) and, with a label,
    ``<labels>/<case>.nii.gz`` (uint8), each with its own affine; returns the image dtype written."""
    exact = as_int16_if_exact(image)
    if exact is not None:
        save_nifti(exact, image_affine, Path(images) / f"{case}.nii.gz", np.int16)
    else:
        save_nifti(image, image_affine, Path(images) / f"{case}.nii.gz", np.float32)
    if label is not None:
        save_nifti(label, label_affine, Path(labels) / f"{case}.nii.gz", np.uint8)
    return "int16" if exact is not None else "float32"


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: Any) -> None:
    """Write ``array`` as NIfTI with ``affine`` (voxel to RAS mm), through a temporary name."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(dtype)
    tmp = path.with_name(f".{path.name[:-7]}.{os.getpid()}.tmp.nii.gz")
    nib.save(image, str(tmp))
    os.replace(tmp, path)


def case_entry(case: str, images: str, labels: str | None) -> dict[str, str]:
    """A datalist entry with paths relative to ``dataset_dir``."""
    entry = {"image": f"{images}/{case}.nii.gz"}
    if labels is not None:
        entry["label"] = f"{labels}/{case}.nii.gz"
    return entry


def write_datalist(dataset_dir: str | os.PathLike, lists: dict[str, list[dict]], info: dict[str, Any]) -> Path:
    """Write ``<dataset_dir>/dataset.json`` (the lists plus ``info``) atomically and return its path."""
    target = Path(dataset_dir) / "dataset.json"
    content = {**info, **{key: lists.get(key, []) for key in ("training", "validation", "test", "unlabeled")}}
    tmp = target.with_name(f".dataset.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=4) + "\n")
    os.replace(tmp, target)
    return target


def convert_all(convert: Callable[[Any], Any], jobs: Sequence[Any], workers: int, desc: str) -> list[Any]:
    """``convert`` applied to every job, ``workers`` processes at a time, with a progress bar; results in job
    order. ``convert`` must be a module-level function (it is pickled); the first error stops the run."""
    from tqdm import tqdm

    results: list[Any] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=desc, unit="case") as bar:
        if workers <= 1:
            for i, job in enumerate(jobs):
                results[i] = convert(job)
                bar.update(1)
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(convert, job): i for i, job in enumerate(jobs)}
            from concurrent.futures import as_completed

            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    return results


def run_cli(main: Callable[..., Any]) -> None:
    """``fire.Fire(main)``; a :class:`PrepareError` (or a missing file) ends the run with its one-line message
    as the last line printed and exit status 1, not a traceback."""
    import fire

    try:
        fire.Fire(main)
    except (PrepareError, FileNotFoundError) as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
