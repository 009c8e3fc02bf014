# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Pre-flight checks: a precise one-line error at minute 0 rather than a crash at hour 5.

Every problem found is reported as ``<case file>: <cause>``; all problems of a run are collected and raised
together as one :class:`InputError`. Handled, documented paths (not errors): a label with no foreground (the
prototype terms leave a class without a prototype out for that step), volumes smaller than the crop or the window
(padded).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError, MissingInputError, input_error_in, report_input_errors  # noqa: F401

if TYPE_CHECKING:  # torch is imported where a checkpoint is read: the preparation scripts start without it
    import torch

__all__ = [
    "as_bool",
    "InputError",
    "MissingInputError",
    "input_error_in",
    "report_input_errors",
    "label_values",
    "check_case",
    "check_cases",
    "check_writable",
    "check_checkpoint",
    "preflight",
    "preflight_inference",
]


def as_bool(value: Any, name: str) -> bool:
    """A setting that may arrive from the command line as text (python-fire passes ``--resume false`` on as
    the string 'false', which ``bool`` would take for True)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return text in ("true", "1", "yes")
    return bool(value)


def _load(path: str):
    """(array, affine) read with MONAI's reader for the format; errors name the file."""
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(path)
    return np.asarray(img), np.asarray(img.affine, dtype=np.float64)


def label_values(num_classes: int = 2, label_mapping: dict | None = None) -> dict[int, int]:
    """The label file values a run accepts, each with the class it becomes: ``label_mapping`` (a preset's
    ``{"file value": class}``, keys may be text as JSON has them) or, without one, ``0 .. num_classes - 1``
    as they are. A mapping onto a class outside ``0 .. num_classes - 1`` is a configuration error."""
    if label_mapping is None:
        return {v: v for v in range(int(num_classes))}
    mapping = {int(k): int(v) for k, v in dict(label_mapping).items()}
    wrong = {k: v for k, v in mapping.items() if not 0 <= v < num_classes}
    if wrong:
        raise InputError([f"label_mapping {wrong} maps onto classes outside 0..{num_classes - 1} (the classes)"])
    return mapping


def check_case(
    item: dict, num_classes: int = 2, in_channels: int = 1, check_values: bool = True, label_mapping: dict | None = None
) -> list[str]:
    """Problems of one datalist entry (``{"image": path, "label": path?}``), as ``"<file>: <cause>"`` lines.
    Label values must be those of :func:`label_values` (``label_mapping``'s keys when given)."""
    problems: list[str] = []
    image_path, label_path = item.get("image"), item.get("label")
    if image_path is not None and os.path.isdir(image_path):  # a DICOM series folder (cpcl_bundle.dicom)
        from .dicom import check_series_folder, holds_dicom

        if not holds_dicom(image_path):
            return [f"{image_path}: image folder holds no DICOM files (a folder input must be one DICOM series)"]
        problems += check_series_folder(image_path)
    elif image_path is not None and os.path.isfile(image_path):
        from .dicom import is_dicom_file

        if is_dicom_file(image_path):
            return [f"{image_path}: one DICOM file is one slice; give the folder that holds its series"]
    for kind, path in (("image", image_path), ("label", label_path)):
        if path is not None and not os.path.exists(path):
            problems.append(f"{path}: {kind} file does not exist")
        elif path is not None and kind == "label" and not os.path.isfile(path):
            problems.append(f"{path}: label is not a file")
    if problems:
        return problems
    try:
        image, image_affine = _load(image_path)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported, with its type
        return [f"{image_path}: unreadable image ({type(e).__name__}: {str(e).splitlines()[0][:200]})"]
    spatial = image.shape[:3]
    if image.ndim < 3 or min(spatial) < 2:
        return [f"{image_path}: image of shape {image.shape} is not a 3-D volume (the model segments 3-D images)"]
    if image.ndim > 3:
        channels = int(np.prod(image.shape[3:]))
        if channels != in_channels:
            problems.append(
                f"{image_path}: image has shape {image.shape} ({channels} channels), the model takes {in_channels}"
            )
    if check_values and not np.isfinite(image).all():
        problems.append(f"{image_path}: image has {int((~np.isfinite(image)).sum())} NaN/Inf voxels")
    if label_path is None:
        return problems
    try:
        label, label_affine = _load(label_path)
    except Exception as e:  # noqa: BLE001
        return problems + [f"{label_path}: unreadable label ({type(e).__name__}: {str(e).splitlines()[0][:200]})"]
    if label.shape[:3] != spatial or label.ndim > 3 and np.prod(label.shape[3:]) != 1:
        problems.append(f"{label_path}: label shape {label.shape} differs from image shape {image.shape}")
    elif not np.allclose(label_affine, image_affine, atol=1e-3):
        problems.append(f"{label_path}: label affine differs from the image's ({image_path}): not on the same grid")
    if check_values:
        accepted = label_values(num_classes, label_mapping)
        values = np.unique(label)
        bad = [v for v in values.tolist() if not float(v).is_integer() or int(v) not in accepted]
        bad = [int(v) if float(v).is_integer() else v for v in bad]
        if bad and label_mapping is None:
            problems.append(f"{label_path}: label values {bad[:5]} outside the classes 0..{num_classes - 1}")
        elif bad:
            problems.append(f"{label_path}: label values {bad[:5]} are not mapped by label_mapping {sorted(accepted)}")
    return problems


def check_cases(
    items: Iterable[dict], num_classes: int = 2, in_channels: int = 1, label_mapping: dict | None = None
) -> list[str]:
    """Problems of every entry."""
    problems: list[str] = []
    for item in items:
        problems += check_case(item, num_classes, in_channels, label_mapping=label_mapping)
    return problems


def check_writable(folder: str | os.PathLike) -> list[str]:
    """``[]`` if ``folder`` can be created and written, else the problem."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        return [f"{path}: output folder cannot be written ({e.strerror or e})"]
    return []


def check_checkpoint(path: str | os.PathLike, network: torch.nn.Module) -> None:
    """Raise :class:`InputError` unless ``path`` is a state dict that fits ``network`` exactly."""
    import torch

    path = str(path)
    if not os.path.isfile(path):
        raise InputError([f"{path}: checkpoint does not exist (train first, or set load_pretrain to false)"])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InputError([f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})"]) from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        detail = (
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(shapes)} with other shapes (e.g. {shapes[:2]})"
        )
        raise InputError([f"{path}: checkpoint is from a different network than network_def: {detail}"])


def preflight(
    labeled: Sequence[dict],
    unlabeled: Sequence[dict] = (),
    validation: Sequence[dict] = (),
    output_dirs: Sequence[str | os.PathLike] = (),
    num_classes: int = 2,
    in_channels: int = 1,
    needs_unlabeled: bool = False,
    label_mapping: dict | None = None,
) -> None:
    """Check every case and output folder of a training run before it starts; raise one :class:`InputError`
    listing every problem. Returns ``None`` when all is well."""
    problems: list[str] = []
    for folder in output_dirs:
        problems += check_writable(folder)
    if not labeled:
        problems.append("no labeled training cases")
    if needs_unlabeled and not unlabeled:
        problems.append("the method needs unlabeled images and there are none")
    label_values(num_classes, label_mapping)  # the mapping itself first: a config error names no case
    problems += check_cases(labeled, num_classes, in_channels, label_mapping)
    problems += check_cases(unlabeled, num_classes, in_channels, label_mapping)
    problems += check_cases(validation, num_classes, in_channels, label_mapping)
    if problems:
        raise InputError(problems)


def preflight_inference(
    items: Sequence[dict], output_dirs: Sequence[str | os.PathLike] = (), in_channels: int = 1
) -> None:
    """Check the images to segment (exist, readable, channels, finite) and the output folder."""
    problems: list[str] = []
    for folder in output_dirs:
        problems += check_writable(folder)
    if not items:
        problems.append("no images to segment")
    problems += check_cases([{"image": item["image"]} for item in items], in_channels=in_channels)
    if problems:
        raise InputError(problems)
