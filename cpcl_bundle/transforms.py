# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Transforms MONAI lacks, and fixes for known MONAI / MONAI Label clashes."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CropForegroundd, Spacingd, SpatialResample
from monai.utils import TraceKeys, get_torch_dtype_from_string

__all__ = ["RobustSpacingd", "BodyCropd", "AboveThreshold"]


class RobustSpacingd(Spacingd):
    """:class:`monai.transforms.Spacingd` that tolerates non-dict ``<key>_*`` entries in the data dict.

    MONAI 1.6 ``Spacingd`` updates every entry whose name starts with ``"<key>_"`` with the image's meta
    data, assuming it is a meta dict. MONAI Label puts the *string* ``image_path`` in the dict, and 1.6.1
    then fails with ``AttributeError: 'str' object has no attribute 'update'``. Such entries are set aside
    during the call and put back unchanged (MONAI Label's writer needs ``image_path``).

    The inverse (``Invertd`` putting a prediction back on the input's grid) resamples in slabs along the last
    spatial axis when the original grid has more than ``inverse_slab_voxels`` voxels: MONAI's resampling builds
    ``torch.nn.functional.affine_grid``'s sampling grid for the whole output at once (4 + 3 values per voxel, in
    the resampling ``dtype``, float64 by default: 56 bytes per voxel, 8.8 GB for a 512 x 512 x 600 CT), where
    each slab needs only its own. Each slab is MONAI's ``SpatialResample`` with the slab's affine, written
    into one float32 output: the same values as the whole-volume inverse up to rounding in the last bits of
    the sampling coordinates. ``None``: the whole volume at once, as ``Spacingd``. Otherwise the same
    arguments and the same result as ``Spacingd``.
    """

    def __init__(self, *args: Any, inverse_slab_voxels: int | None = 2**24, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inverse_slab_voxels = None if inverse_slab_voxels is None else max(1, int(inverse_slab_voxels))

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

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = inverse_resample_in_slabs(self.spacing_transform.sp_resample, d[key], self.inverse_slab_voxels)
        return d


def inverse_resample_in_slabs(resampler: SpatialResample, img: torch.Tensor, slab_voxels: int | None) -> torch.Tensor:
    """``resampler.inverse(img)`` (the last ``SpatialResample`` applied to ``img`` undone), computed in slabs
    of at most ``slab_voxels`` output voxels along the last spatial axis into one float32 tensor, so that the
    sampling grid of only one slab is in memory at a time. Small outputs (or ``slab_voxels=None``) are
    inverted whole, by ``resampler.inverse``."""
    transform = resampler.get_most_recent_transform(img)
    size = [int(n) for n in transform[TraceKeys.ORIG_SIZE]]
    plane = math.prod(size[:-1])
    if slab_voxels is None or plane * size[-1] <= slab_voxels or len(size) != 3:
        return resampler.inverse(img)
    transform = resampler.pop_transform(img)
    info = transform[TraceKeys.EXTRA_INFO]
    align_corners = info["align_corners"]
    options = {
        "mode": info["mode"],
        "padding_mode": info["padding_mode"],
        "align_corners": False if align_corners == TraceKeys.NONE else align_corners,
        "dtype": get_torch_dtype_from_string(info["dtype"]),
    }
    dst_affine = torch.as_tensor(info["src_affine"], dtype=torch.float64)  # the grid before the forward resample
    step = max(1, slab_voxels // plane)
    out, meta = None, None
    for start in range(0, size[-1], step):
        count = min(step, size[-1] - start)
        shift = torch.eye(4, dtype=torch.float64)
        shift[2, 3] = float(start)  # the slab's voxel (0, 0, 0) is the original grid's voxel (0, 0, start)
        with resampler.trace_transform(False):
            part = SpatialResample.__call__(
                resampler, img, dst_affine=dst_affine @ shift, spatial_size=[*size[:-1], count], **options
            )
        if out is None:  # the first slab's meta data: its affine is the whole grid's (its voxel 0 is the grid's)
            out = torch.empty((part.shape[0], *size), dtype=torch.float32, device=part.device)
            meta = (part.meta, part.applied_operations) if isinstance(part, MetaTensor) else None
        out[..., start : start + count] = torch.as_tensor(part)
        del part
    if meta is not None:
        return MetaTensor(out, meta=meta[0], applied_operations=meta[1])
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
