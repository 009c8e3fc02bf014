# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The benchmark's figures: each is a real PNG of the expected layout, read back from what runs write."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from cpcl_tools import plots


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_dice_boxplot_has_a_box_per_method_and_ratio(tmp_path):
    rows = [
        {"method": m, "ratio": r, "dice": d}
        for m, r in (("supervised", 1.0), ("cpcl", 0.1), ("mt", 0.1))
        for d in np.linspace(0.7, 0.9, 5)
    ] + [{"method": "mt", "ratio": 0.1, "dice": float("nan")}]
    narrow = _png(plots.dice_boxplot(rows[:5], tmp_path / "one.png"))
    wide = _png(plots.dice_boxplot(rows, tmp_path / "three.png"))
    assert wide[0] > narrow[0]


def test_scalars_read_back_and_curves_drawn(tmp_path):
    run = tmp_path / "runs" / "cpcl_10pct_seed0"
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"name": run.name, "overrides": {"iterations_per_epoch": 5}}))
    writer = SummaryWriter(str(run / "eval"))
    for step in range(1, 41):
        writer.add_scalar("loss", 1.0 / step, step)
    writer.add_scalar("val_mean_dice", 0.5, 4)
    writer.add_scalar("val_mean_dice", 0.7, 8)
    writer.close()
    writer = SummaryWriter(str(run / "eval"))  # a resumed run writes step 8 again: the last value wins
    writer.add_scalar("val_mean_dice", 0.75, 8)
    writer.close()
    scalars = plots.read_scalars(run / "eval")
    assert [s for s, _ in scalars["loss"]] == list(range(1, 41))
    assert scalars["val_mean_dice"] == [(4, 0.5), (8, 0.75)]
    _png(plots.training_curves(tmp_path, tmp_path / "curves.png", smooth=5))


def test_fig6_rows_are_spread_over_training(tmp_path):
    panel = np.random.default_rng(0).random((16, 12)).astype(np.float32)
    for step in (100, 200, 300, 400, 500, 600, 700):
        np.savez(
            tmp_path / f"prototype_maps_{step:06d}.npz",
            **{k: panel for k in ("x_u", "p_u", "p_l2u", "x_l", "y_l", "p_l", "p_u2l")},
        )
    four = _png(plots.prototype_figure(tmp_path, tmp_path / "fig6.png", num_steps=4))
    two = _png(plots.prototype_figure(tmp_path, tmp_path / "fig6_2.png", num_steps=2))
    assert four[1] > 1.5 * two[1] and abs(four[0] - two[0]) < 0.1 * four[0]  # rows: steps; columns: panels
    with pytest.raises(FileNotFoundError, match="snapshots"):
        plots.prototype_figure(tmp_path / "none", tmp_path / "x.png")


def test_overlays_read_test_cases_and_predictions(tmp_path):
    data = tmp_path / "data"
    (data / "imagesTs").mkdir(parents=True)
    (data / "labelsTs").mkdir()
    test = []
    for i in range(3):
        image = np.random.default_rng(i).normal(40, 20, (24, 20, 8)).astype(np.int16)
        label = np.zeros(image.shape, np.uint8)
        label[8:14, 6:12, 2:6] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(data / "imagesTs" / f"case_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(data / "labelsTs" / f"case_{i}.nii.gz"))
        test.append({"image": f"imagesTs/case_{i}.nii.gz", "label": f"labelsTs/case_{i}.nii.gz"})
    (data / "dataset.json").write_text(json.dumps({"training": [], "test": test}))
    bench = tmp_path / "bench"
    for name in ("supervised_10pct_seed0", "cpcl_10pct_seed0"):
        folder = bench / "runs" / name / "test"
        (folder / "predictions").mkdir(parents=True)
        (bench / "runs" / name / "run.json").write_text("{}")
        (folder / "metrics.csv").write_text(
            "case,dice,jaccard,hd95_mm,asd_mm\n" + "".join(f"case_{i},{0.5 + 0.1 * i},0,0,0\n" for i in range(3))
        )
        for i in range(3):
            pred = np.zeros((24, 20, 8), np.uint8)
            pred[9:15, 6:12, 2:6] = 1
            nib.save(nib.Nifti1Image(pred, np.eye(4)), str(folder / "predictions" / f"case_{i}_seg.nii.gz"))
    width, height = _png(plots.overlays(bench, data, tmp_path / "overlays.png", num_cases=3))
    one = _png(plots.overlays(bench, data, tmp_path / "one.png", runs=["cpcl_10pct_seed0"], num_cases=1))
    assert width > 1.3 * one[0] and height > 2 * one[1]


def test_overlays_of_a_multiclass_run_show_each_class_on_its_own_slice(tmp_path, monkeypatch):
    """One panel per run and foreground class; class k's panel draws label k alone, on the slice with the most
    reference voxels of k (the tumour's slice is not the kidney's)."""
    import matplotlib.axes

    data = tmp_path / "data"
    (data / "imagesTs").mkdir(parents=True)
    (data / "labelsTs").mkdir()
    label = np.zeros((24, 20, 8), np.uint8)
    label[4:16, 4:14, 1:5] = 1  # kidney: slices 1-4
    label[6:10, 6:10, 6] = 2  # tumour: slice 6 only
    pred = np.roll(label, 1, axis=0)
    image = np.random.default_rng(0).normal(40, 20, label.shape).astype(np.int16)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(data / "imagesTs" / "case_0.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(data / "labelsTs" / "case_0.nii.gz"))
    test = [{"image": "imagesTs/case_0.nii.gz", "label": "labelsTs/case_0.nii.gz"}]
    (data / "dataset.json").write_text(json.dumps({"training": [], "test": test}))
    bench = tmp_path / "bench"
    folder = bench / "runs" / "cpcl_10pct_seed0" / "test"
    (folder / "predictions").mkdir(parents=True)
    (bench / "runs" / "cpcl_10pct_seed0" / "run.json").write_text("{}")
    (folder / "metrics.csv").write_text("case,dice,dice_kidney,dice_tumour\ncase_0,0.8,0.9,0.7\n")
    nib.save(nib.Nifti1Image(pred, np.eye(4)), str(folder / "predictions" / "case_0_seg.nii.gz"))
    drawn = []
    contour = matplotlib.axes.Axes.contour

    def record(ax, plane, *args, colors=None, **kwargs):
        drawn.append((colors, np.asarray(plane).copy()))
        return contour(ax, plane, *args, colors=colors, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "contour", record)
    two = _png(plots.overlays(bench, data, tmp_path / "classes.png", num_cases=1))
    (c1, ref1), (c2, pred1), (c3, ref2), (c4, pred2) = drawn  # the kidney's panel, then the tumour's
    assert (c1, c2, c3, c4) == ("lime", "red", "lime", "red")
    np.testing.assert_array_equal(ref1, plots._display(label[:, :, 1] == 1))  # kidney: its first fullest slice
    np.testing.assert_array_equal(pred1, plots._display(pred[:, :, 1] == 1))
    np.testing.assert_array_equal(ref2, plots._display(label[:, :, 6] == 2))  # tumour: slice 6, label 2 alone
    np.testing.assert_array_equal(pred2, plots._display(pred[:, :, 6] == 2))
    (folder / "metrics.csv").write_text("case,dice\ncase_0,0.8\n")  # the same run read as binary: one panel
    one = _png(plots.overlays(bench, data, tmp_path / "binary.png", num_cases=1))
    assert two[0] > 1.25 * one[0]  # the title's width sets the floor
