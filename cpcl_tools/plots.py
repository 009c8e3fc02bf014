# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The benchmark's figures (PNG, matplotlib, no display needed): Dice box plots per method, training curves
per run, the paper's Fig. 6 (prototype maps on one fixed slice through training) and qualitative overlays of
predictions against the reference on test cases. Each function reads the benchmark's folders
(:mod:`cpcl_tools.benchmark`) and writes one PNG."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_label", "dice_boxplot", "read_scalars", "training_curves", "prototype_figure", "overlays"]

_FIG6_COLUMNS = (
    ("x_u", "unlabeled image"),
    ("p_u", "$P_u$ (teacher)"),
    ("p_l2u", "$P_{l2u}$"),
    ("x_l", "labeled image"),
    ("y_l", "label"),
    ("p_l", "$P_l$ (student)"),
    ("p_u2l", "$P_{u2l}$"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _display(plane: np.ndarray) -> np.ndarray:
    """An axial plane of a RAS volume ([x, y]) as radiologists view it: anterior up, the patient's right on
    the viewer's left."""
    return np.fliplr(np.rot90(plane))


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def run_label(method: str, ratio: float) -> str:
    return f"{method} {100 * ratio:.6g}%"


def dice_boxplot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, metric: str = "dice") -> Path:
    """Box plot of the per-case ``metric`` (seeds pooled) for each method and label ratio, with the cases as
    points."""
    plt = _pyplot()
    groups = list(dict.fromkeys((r["method"], r["ratio"]) for r in rows))
    groups.sort(key=lambda g: (-(g[1] >= 1.0), g[1]))
    data = [[r[metric] for r in rows if (r["method"], r["ratio"]) == g and math.isfinite(r[metric])] for g in groups]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 1.6 * len(groups)), 4.0))
    ax.boxplot(data, showmeans=True)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, 1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=8, alpha=0.6, color="tab:blue")
    ax.set_xticks(range(1, len(groups) + 1), [run_label(*g) for g in groups], rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"test {metric} per case")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files of ``log_dir``: tag -> [(step, value)] by step
    (the last value of a step wins when a resumed run wrote it twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for event_file in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                series.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(values.items()) for tag, values in series.items()}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if values.size < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def training_curves(output_dir: str | os.PathLike, path: str | os.PathLike, smooth: int = 25) -> Path:
    """Validation Dice (per validation, against iterations) and the training loss (moving average over
    ``smooth`` steps) of every finished run of a benchmark."""
    plt = _pyplot()
    fig, (ax_dice, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2))
    for record_file in sorted(Path(output_dir).glob("runs/*/run.json")):
        record = json.loads(record_file.read_text())
        scalars = read_scalars(record_file.parent / "eval")
        per_epoch = int(record.get("overrides", {}).get("iterations_per_epoch", 50))
        label = record["name"]
        if "val_mean_dice" in scalars:
            steps, values = zip(*scalars["val_mean_dice"])
            ax_dice.plot(np.array(steps) * per_epoch, values, marker="o", ms=3, label=label)
        if "loss" in scalars:
            steps, values = (np.array(v) for v in zip(*scalars["loss"]))
            smoothed = _smooth(values, smooth)
            ax_loss.plot(steps[len(steps) - len(smoothed) :], smoothed, label=label)
    ax_dice.set(xlabel="iteration", ylabel="validation Dice", title="validation Dice")
    ax_loss.set(xlabel="iteration", ylabel="loss", title=f"training loss (moving average of {smooth} steps)")
    for ax in (ax_dice, ax_loss):
        ax.grid(alpha=0.3)
    ax_dice.legend(fontsize=7)
    return _save(fig, path)


def prototype_figure(png_dir: str | os.PathLike, path: str | os.PathLike, num_steps: int = 4) -> Path:
    """The paper's Fig. 6: the unlabeled image, ``P_u`` and ``P_l2u``, the labeled image, its label, ``P_l``
    and ``P_u2l`` on one fixed slice (columns) at ``num_steps`` points of training spread evenly from the
    first to the last snapshot (rows), from the panels :class:`~cpcl_bundle.handlers.PrototypeMapHandler`
    saved."""
    from cpcl_bundle.handlers import load_snapshots

    snapshots = load_snapshots(png_dir)
    if not snapshots:
        raise FileNotFoundError(f"no prototype map snapshots (prototype_maps_*.npz) in {png_dir}")
    steps = sorted(snapshots)
    picks = sorted({steps[round(i)] for i in np.linspace(0, len(steps) - 1, min(num_steps, len(steps)))})
    columns = [(k, t) for k, t in _FIG6_COLUMNS if any(k in snapshots[s] for s in picks)]
    plt = _pyplot()
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(1.9 * len(columns), 1.9 * len(picks)), squeeze=False)
    for row, step in enumerate(picks):
        for col, (key, title) in enumerate(columns):
            ax = axes[row, col]
            panel = snapshots[step].get(key)
            if panel is not None:
                ax.imshow(_display(panel), cmap="gray" if key.startswith(("x", "y")) else "jet", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"iteration {step}", fontsize=9)
    return _save(fig, path)


def _case_files(dataset_dir: str | os.PathLike) -> dict[str, tuple[str, str | None]]:
    from cpcl_bundle.data import load_datalist
    from cpcl_bundle.evaluation import _case_id

    datalist = load_datalist(Path(dataset_dir) / "dataset.json")
    items = [item for key in ("test", "validation") for item in datalist.get(key, [])]  # what may be evaluated
    return {_case_id(item["image"]): (item["image"], item.get("label")) for item in items}


def overlays(
    output_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    path: str | os.PathLike,
    runs: Sequence[str] | None = None,
    num_cases: int = 3,
    hu_window: tuple[float, float] | None = (-75.0, 175.0),
) -> Path:
    """Prediction (red) against the reference (green) on the axial slice with the most reference foreground,
    for ``num_cases`` evaluated cases (the lowest, the median and the highest Dice of the first run) and the
    given ``runs`` (default: every finished run), from the predictions evaluation saved. The slice is shown in
    ``hu_window`` (CT), or between its 1st and 99th percentiles when that is None (MRI).

    Multi-class runs (whose ``metrics.csv`` has per-class columns ``dice_<class>``, in label order) get one
    panel per run and foreground class: label ``k`` alone, on the slice with the most reference voxels of
    class ``k`` (of the prediction's where the reference has none), so a small class such as a tumour is seen
    on its own slice rather than on the organ's."""
    import nibabel as nib

    root = Path(output_dir)
    names = list(runs) if runs else [p.parent.name for p in sorted(root.glob("runs/*/run.json"))]
    if not names:
        raise FileNotFoundError(f"no finished run under {root / 'runs'}")
    files = _case_files(dataset_dir)
    first = root / "runs" / names[0] / "test" / "metrics.csv"
    with open(first, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        per_class = [c[len("dice_") :] for c in reader.fieldnames or [] if c.startswith("dice_")]
    scored = sorted((float(r["dice"]), r["case"]) for r in rows if r["case"] in files)
    if not scored:
        raise FileNotFoundError(f"no test case of {dataset_dir} in {first}")
    index = sorted({round(i) for i in np.linspace(0, len(scored) - 1, min(num_cases, len(scored)))})
    cases = [scored[i][1] for i in index]
    # (label value, title suffix): the foreground as one for a binary run, each class for a multi-class one
    classes = [(k, f": {name}") for k, name in enumerate(per_class, start=1)] or [(None, "")]
    panels = [(name, value, suffix) for name in names for value, suffix in classes]
    plt = _pyplot()
    shape = nib.load(files[cases[0]][0]).shape
    aspect = shape[1] / shape[0]  # height / width of a displayed axial slice
    fig, axes = plt.subplots(
        len(cases), len(panels), figsize=(3.2 * len(panels), 3.2 * aspect * len(cases) + 0.6), squeeze=False
    )
    for row, case in enumerate(cases):
        image_file, label_file = files[case]
        image = np.asarray(nib.load(image_file).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(label_file).dataobj) if label_file else np.zeros(image.shape, np.uint8)
        preds = {}
        for name in names:
            pred_file = root / "runs" / name / "test" / "predictions" / f"{case}_seg.nii.gz"
            preds[name] = np.asarray(nib.load(pred_file).dataobj) if pred_file.is_file() else None
        for col, (name, value, suffix) in enumerate(panels):
            reference = label > 0 if value is None else label == value
            pred = preds[name]
            pred = None if pred is None else (pred > 0 if value is None else pred == value)
            shown_on = reference if reference.any() or pred is None else pred
            z = int(shown_on.sum((0, 1)).argmax())
            low, high = hu_window if hu_window is not None else np.percentile(image[:, :, z], (1, 99))
            ax = axes[row, col]
            ax.imshow(_display(np.clip((image[:, :, z] - low) / max(float(high - low), 1e-6), 0, 1)), cmap="gray")
            if reference[:, :, z].any():
                ax.contour(_display(reference[:, :, z]), [0.5], colors="lime", linewidths=0.8)
            if pred is not None and pred[:, :, z].any():
                ax.contour(_display(pred[:, :, z]), [0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name + suffix, fontsize=8)
            if col == 0:
                ax.set_ylabel(case, fontsize=8)
    fig.suptitle("evaluated cases: reference (green) and prediction (red)", fontsize=10)
    return _save(fig, path)
