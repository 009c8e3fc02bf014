# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Transforms MONAI lacks, and fixes for known MONAI / MONAI Label clashes."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import CropForegroundd, Spacingd

__all__ = ["RobustSpacingd", "BodyCropd", "AboveThreshold"]


class RobustSpacingd(Spacingd):
    """:class:`monai.transforms.Spacingd` that tolerates non-dict ``<key>_*`` entries in the data dict.

    MONAI 1.6 ``Spacingd`` updates every entry whose name starts with ``"<key>_"`` with the image's meta
    data, assuming it is a meta dict. MONAI Label puts the *string* ``image_path`` in the dict, and 1.6.1
    then fails with ``AttributeError: 'str' object has no attribute 'update'``. Such entries are set aside
    during the call and put back unchanged (MONAI Label's writer needs ``image_path``). Same arguments,
    same result, same inverse as ``Spacingd``.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        aside = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and any(k.startswith(f"{key}_") for key in self.keys) and not isinstance(d[k], dict)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out


class AboveThreshold:
    """``x > threshold`` as a picklable callable (a ``select_fn`` for foreground crops)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold

    def __repr__(self) -> str:
        return f"AboveThreshold({self.threshold})"


class BodyCropd(CropForegroundd):
    """Label-free crop to the body: the bounding box of voxels above ``threshold`` in ``source_key``.

    Applied to raw CT in Hounsfield units (before intensity windowing), ``-500`` separates the body from
    the air around it. It needs no label, so it applies to labeled, unlabeled and new images alike, and it
    is invertible (``Invertd`` puts predictions back into the full field of view).

    Args:
        keys: keys to crop (image, and label when present).
        source_key: the image the body is found in.
        threshold: HU above which a voxel belongs to the body.
        margin: voxels kept around the body box.
        allow_missing_keys: crop a label only when it is there (unlabeled images).
        kwargs: further :class:`~monai.transforms.CropForegroundd` arguments (e.g. ``k_divisible``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str = "image",
        threshold: float = -500.0,
        margin: Sequence[int] | int = 2,
        allow_missing_keys: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            keys=keys,
            source_key=source_key,
            select_fn=AboveThreshold(threshold),
            margin=margin,
            allow_missing_keys=allow_missing_keys,
            **kwargs,
        )
