# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""``configs/metadata.json`` from the configs' ``classes``: what each output channel of the network means.

MONAI Label takes its label names from ``network_data_format.outputs.pred.channel_def`` (background skipped),
the zoo's ``verify_net_in_out`` and ``ckpt_export`` take the output's ``num_channels`` from it, and people read
``label_classes``/``pred_classes``. A model with other classes than the shipped kidney model (a preset's
``classes``, e.g. ``kits19_tumour``) is released with these fields rewritten by :func:`describe_classes`
(``scripts/package.py --classes``), so that nothing in the metadata still speaks of two channels.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["CLASS_CONFIGS", "classes_of", "describe_classes", "described_classes", "with_classes"]

#: The configs whose top-level ``classes`` a model with other classes sets (besides metadata.json's description).
CLASS_CONFIGS = ("configs/inference.json", "configs/train.json")


def classes_of(config_file: str | os.PathLike) -> list[str]:
    """The literal top-level ``classes`` of a config file (names, background first)."""
    classes = json.loads(Path(config_file).read_text(encoding="utf-8")).get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{config_file}: 'classes' must be a list of at least two names, background first")
    return classes


def described_classes(meta: dict[str, Any]) -> list[str]:
    """The class names ``meta`` gives the output channels, in channel order."""
    pred = meta["network_data_format"]["outputs"]["pred"]
    channel_def = pred.get("channel_def", {})
    return [channel_def[str(k)] for k in range(int(pred["num_channels"]))]


def describe_classes(meta: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """A copy of ``meta`` whose output channels are ``classes``: ``num_channels``, ``channel_def``, and the
    ``label_classes`` / ``pred_classes`` texts (kept as they are when the classes do not change)."""
    classes = [str(c) for c in classes]
    if len(classes) < 2 or classes[0] != "background":
        raise ValueError(f"classes must start with 'background' and name at least one more class, got {classes}")
    out = copy.deepcopy(meta)
    if described_classes(meta) == classes:
        return out
    pred = out["network_data_format"]["outputs"]["pred"]
    pred["num_channels"] = len(classes)
    pred["channel_def"] = {str(k): name for k, name in enumerate(classes)}
    listing = ", ".join(f"{k} {name}" for k, name in enumerate(classes))
    out["label_classes"] = listing
    out["pred_classes"] = f"{len(classes)} channels: {listing}"
    return out


def with_classes(rel: str, content: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """``content`` of the bundle file ``rel`` for a model with ``classes``: ``configs/metadata.json`` describes them
    (:func:`describe_classes`), the :data:`CLASS_CONFIGS` carry them as ``classes``, every other file is returned
    as it is. Raises ValueError for classes that are not background first and at least one more."""
    if rel == "configs/metadata.json":
        return describe_classes(content, classes)
    if rel in CLASS_CONFIGS and "classes" in content:
        return {**content, "classes": [str(c) for c in classes]}
    return content
