# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Pre-flight checks: every kind of broken input gives one line naming the case and the cause."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cpcl_bundle.validation import InputError, check_case, check_checkpoint, check_writable, preflight
from cpcl_tools import train_objects
from tests.helpers import TINY_FEATURES

AFFINE = np.diag([0.8, 0.8, 3.0, 1.0])


def _nii(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


@pytest.fixture
def good(tmp_path):
    image = np.random.default_rng(0).normal(0, 50, (20, 18, 8)).astype(np.int16)
    label = np.zeros((20, 18, 8), np.uint8)
    label[5:10, 5:10, 2:5] = 1
    return {"image": _nii(tmp_path / "img.nii.gz", image), "label": _nii(tmp_path / "lab.nii.gz", label)}


def test_a_good_case_has_no_problem(good):
    assert check_case(good) == []


def test_label_without_foreground_is_allowed(good, tmp_path):
    empty = _nii(tmp_path / "empty.nii.gz", np.zeros((20, 18, 8), np.uint8))
    assert check_case({**good, "label": empty}) == []


@pytest.mark.parametrize(
    "breakage,cause",
    [
        ("missing_image", "image file does not exist"),
        ("missing_label", "label file does not exist"),
        ("truncated", "unreadable image"),
        ("label_values", "label values [3] outside the classes 0..1"),
        ("shape", "differs from image shape"),
        ("affine", "label affine differs"),
        ("nan", "NaN/Inf voxels"),
        ("four_d", "the model takes 1"),
    ],
)
def test_each_breakage_names_the_file_and_the_cause(good, tmp_path, breakage, cause):
    item = dict(good)
    if breakage == "missing_image":
        item["image"] = str(tmp_path / "nope.nii.gz")
    elif breakage == "missing_label":
        item["label"] = str(tmp_path / "nope_label.nii.gz")
    elif breakage == "truncated":
        data = open(good["image"], "rb").read()
        item["image"] = str(tmp_path / "truncated.nii.gz")
        open(item["image"], "wb").write(data[: len(data) // 2])
    elif breakage == "label_values":
        lab = np.asarray(nib.load(good["label"]).dataobj).copy()
        lab[0, 0, 0] = 3
        item["label"] = _nii(tmp_path / "bad_values.nii.gz", lab)
    elif breakage == "shape":
        item["label"] = _nii(tmp_path / "small.nii.gz", np.zeros((10, 18, 8), np.uint8))
    elif breakage == "affine":
        item["label"] = _nii(tmp_path / "moved.nii.gz", np.asarray(nib.load(good["label"]).dataobj), AFFINE * 2)
    elif breakage == "nan":
        img = np.asarray(nib.load(good["image"]).dataobj).astype(np.float32)
        img[1, 2, 3] = np.nan
        item["image"] = _nii(tmp_path / "nan.nii.gz", img)
    elif breakage == "four_d":
        img = np.asarray(nib.load(good["image"]).dataobj)
        item["image"] = _nii(tmp_path / "four_d.nii.gz", np.stack([img, img], -1))
    (problem,) = check_case(item)
    assert cause in problem
    named = item["label"] if breakage in ("missing_label", "label_values", "shape", "affine") else item["image"]
    assert problem.startswith(named + ":")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (problem,) = check_writable(blocker / "out")
    assert "cannot be written" in problem and str(blocker / "out") in problem
    assert check_writable(tmp_path / "fine") == []


def test_preflight_collects_every_problem(good, tmp_path):
    bad = {"image": str(tmp_path / "missing.nii.gz"), "label": good["label"]}
    with pytest.raises(InputError) as e:
        preflight([good, bad], [], [good], output_dirs=[tmp_path / "out"], needs_unlabeled=True)
    assert len(e.value.problems) == 2
    assert "needs unlabeled images" in str(e.value) and "missing.nii.gz: image file does not exist" in str(e.value)
    preflight([good], [{"image": good["image"]}], [], output_dirs=[tmp_path / "out"], needs_unlabeled=True)


def test_checkpoint_from_another_network_is_named(tmp_path):
    net = train_objects.network_def(features=TINY_FEATURES)
    path = tmp_path / "model.pt"
    torch.save(train_objects.network_def(features=(8, 8, 16, 16, 32, 8)).state_dict(), path)
    with pytest.raises(InputError, match="checkpoint is from a different network"):
        check_checkpoint(path, net)
    torch.save(net.state_dict(), path)
    check_checkpoint(path, net)
    with pytest.raises(InputError, match="does not exist"):
        check_checkpoint(tmp_path / "none.pt", net)


def test_label_mapping_decides_which_file_values_are_accepted(good, tmp_path):
    """A preset's label_mapping (KiTS19: kidney = 1 and 2) accepts the values it maps and names the others."""
    label = np.zeros((20, 18, 8), np.uint8)
    label[5:10, 5:10, 2:5], label[12:15, 5:10, 2:5] = 1, 2
    kits = {**good, "label": _nii(tmp_path / "kits.nii.gz", label)}
    assert check_case(kits) == [f"{kits['label']}: label values [2] outside the classes 0..1"]
    assert check_case(kits, label_mapping={"0": 0, "1": 1, "2": 1}) == []
    assert check_case(kits, label_mapping={"0": 0, "1": 1}) == [
        f"{kits['label']}: label values [2] are not mapped by label_mapping [0, 1]"
    ]
    with pytest.raises(InputError, match="maps onto classes outside 0..1"):
        preflight([kits], label_mapping={"0": 0, "1": 1, "2": 2})
    preflight([kits], label_mapping={"0": 0, "1": 1, "2": 1})  # no problem: no error


def _bad_dataset(tmp_path, problem):
    """A data set with one defect; returns (dataset_dir, the text the last line must hold)."""
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (20, 18, 8)).astype(np.float32)
    label = np.zeros((20, 18, 8), np.uint8)
    label[5:10, 5:10, 2:5] = 1
    case = {"image": _nii(folder / "img.nii.gz", image), "label": _nii(folder / "lab.nii.gz", label)}
    bad = dict(case)
    if problem == "malformed":
        (folder / "dataset.json").write_text("{not json")
        return folder, "is not valid JSON"
    if problem == "nan":
        image[3, 3, 3] = np.nan
        bad["image"] = _nii(folder / "nan.nii.gz", image)
        expected = "1 NaN/Inf voxels"
    elif problem == "shape":
        bad["label"] = _nii(folder / "small.nii.gz", label[:10])
        expected = "differs from image shape"
    elif problem == "4d":
        bad["image"] = _nii(folder / "4d.nii.gz", np.stack([image, image], -1))
        expected = "the model takes 1"
    lists = {"training": [bad, bad], "validation": [case], "test": [bad]}  # the labeled case is a bad one
    (folder / "dataset.json").write_text(json.dumps(lists))
    return folder, expected


@pytest.mark.slow
@pytest.mark.parametrize(
    "workflow,problem",
    [("training", "malformed"), ("training", "shape"), ("evaluate", "nan"), ("evaluate", "4d"), ("infer", "missing")],
)
def test_the_cli_ends_with_the_problem_list_and_status_1(workflow, problem, tmp_path):
    """Bad input ends the real CLI with the problem list as its last lines (no framework traceback after it)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    if problem == "missing":
        dataset, expected = tmp_path / "does_not_exist.nii.gz", "does not exist"
    else:
        dataset, expected = _bad_dataset(tmp_path, problem)
    files = {"training": ["train.json"], "evaluate": ["train.json", "evaluate.json"], "infer": ["inference.json"]}[
        workflow
    ]
    cmd = [sys.executable, "-m", "monai.bundle", "run"] + (["training"] if workflow == "training" else [])
    cmd += ["--config_file", repr([str(configs / f) for f in files]), "--bundle_root", str(configs.parent)]
    cmd += ["--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(tmp_path)]
    cmd += ["--max_iterations", "1"]  # should the check miss the problem, the run still ends soon
    if workflow == "evaluate":
        torch.save(train_objects.network_def().state_dict(), tmp_path / "model.pt")
    env = {**os.environ, "CPCL_TRACEBACK": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1, "\n".join(lines[-30:])
    assert expected in lines[-1] and lines[-2].startswith("error: 1 input problem"), "\n".join(lines[-30:])


@pytest.mark.parametrize("shape", [(16, 12), (16, 12, 1)])
def test_a_2d_image_is_refused_in_one_line(tmp_path, shape):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    problems = check_case({"image": str(path)})
    assert (
        len(problems) == 1 and problems[0].startswith(f"{path}: image of shape") and "not a 3-D volume" in problems[0]
    )
