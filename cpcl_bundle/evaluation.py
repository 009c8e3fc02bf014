# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Per-case evaluation in the paper's metrics: Dice, Jaccard, 95 % Hausdorff and average surface distance.

Metrics are computed in each case's original geometry (the prediction is inverted back to the input grid,
the reference label is read from its file unchanged), distances in millimetres from the file's affine.
They use MONAI's metric functions.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from monai.transforms import LoadImage

__all__ = ["METRICS", "case_metrics", "spacing_of", "summarise", "SegmentationMetricsWriter"]

METRICS = ("dice", "jaccard", "hd95_mm", "asd_mm")


def spacing_of(affine: Any) -> tuple[float, ...]:
    """Voxel spacing (mm) from a ``(n+1) x (n+1)`` affine: the norms of its first n columns."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    n = a.shape[0] - 1
    return tuple(float(np.linalg.norm(a[:n, i])) for i in range(n))


def case_metrics(pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float], foreground: int = 1) -> dict:
    """Dice, Jaccard, HD95 (mm), ASD (mm, symmetric) of class ``foreground`` for one case.

    Args:
        pred, label: class-index volumes ``[*S]`` or ``[1, *S]`` on the same grid.
        spacing: voxel size in mm along each axis of ``S``.

    Distances are NaN when the prediction or the reference has no foreground (undefined).
    """
    p = torch.as_tensor(pred).squeeze()
    y = torch.as_tensor(label).squeeze()
    if p.shape != y.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and label {tuple(y.shape)} are not on the same grid")
    p = (p.round() == foreground).float()[None, None]
    y = (y.round() == foreground).float()[None, None]
    out = {
        "dice": float(compute_dice(p, y, include_background=True, ignore_empty=False)),
        "jaccard": float(compute_iou(p, y, include_background=True, ignore_empty=False)),
    }
    if p.sum() == 0 or y.sum() == 0:
        out.update(hd95_mm=math.nan, asd_mm=math.nan)
        return out
    spacing = [float(s) for s in spacing]
    out["hd95_mm"] = float(compute_hausdorff_distance(p, y, include_background=True, percentile=95, spacing=spacing))
    out["asd_mm"] = float(
        compute_average_surface_distance(p, y, include_background=True, symmetric=True, spacing=spacing)
    )
    return out


def summarise(rows: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict:
    """Mean and (population) standard deviation of each metric over cases, ignoring NaN; counts."""
    summary: dict[str, Any] = {"num_cases": len(rows)}
    for m in metrics:
        values = np.array([r[m] for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[m] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std()) if finite.size else math.nan,
            "num_undefined": int(values.size - finite.size),
        }
    return summary


def _case_id(path: str) -> str:
    name = os.path.basename(str(path))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class SegmentationMetricsWriter:
    """Evaluator handler: per-case metrics against the original label files, written as CSV + JSON.

    After each iteration it takes the decollated outputs, whose ``pred_key`` must already be a class-index
    prediction inverted to the input's original grid (``Invertd`` then ``AsDiscreted(argmax=True)``), reads
    the reference label from the file named in ``label_key``'s meta data (unchanged, as the file stores it)
    and computes :func:`case_metrics`. When the run completes it writes ``<output_dir>/<csv_name>`` (one row
    per case) and ``<output_dir>/<summary_name>`` (mean, std per metric). With ``save_dir``, each prediction
    is also written there as ``<case>_seg.nii.gz`` (uint8, the reference label's grid and affine).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        label_key: str = "label",
        csv_name: str = "metrics.csv",
        summary_name: str = "metrics_summary.json",
        foreground: int = 1,
        save_dir: str | os.PathLike | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.pred_key, self.label_key = pred_key, label_key
        self.csv_name, self.summary_name = csv_name, summary_name
        self.foreground = foreground
        self.rows: list[dict] = []
        self._load = LoadImage(image_only=True, ensure_channel_first=False)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _label_path(self, item: dict) -> str:
        label = item.get(self.label_key)
        meta = getattr(label, "meta", None) or item.get(f"{self.label_key}_meta_dict") or {}
        path = meta.get("filename_or_obj")
        if not path:
            raise ValueError(f"no reference label file for a case: '{self.label_key}' carries no filename")
        return str(path)

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            path = self._label_path(item)
            reference = self._load(path)
            pred = item[self.pred_key]
            try:
                row = case_metrics(pred, reference, spacing_of(reference.affine), self.foreground)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            image_meta = getattr(item.get("image"), "meta", None) or {}
            case = _case_id(image_meta.get("filename_or_obj") or path)
            self.rows.append({"case": case, **row})
            if self.save_dir is not None:
                self._save(case, pred, reference)

    def _save(self, case: str, pred: Any, reference: Any) -> None:
        import nibabel as nib

        array = torch.as_tensor(pred).detach().cpu().squeeze().round().to(torch.uint8).numpy()
        affine = np.asarray(getattr(reference, "affine", np.eye(4)), dtype=np.float64)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(self.save_dir / f"{case}_seg.nii.gz"))

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / self.csv_name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["case", *METRICS])
            writer.writeheader()
            writer.writerows(self.rows)
        summary = summarise(self.rows)
        (self.output_dir / self.summary_name).write_text(json.dumps(summary, indent=2))
        engine.logger.info(
            "test metrics: "
            + ", ".join(f"{m} {summary[m]['mean']:.4f} ({summary[m]['std']:.4f})" for m in METRICS)
        )
