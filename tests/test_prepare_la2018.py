# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""scripts/prepare_la2018.py on a tiny copy of the processed Left Atrium layout (mri_norm2.h5 per case), then
the la2018 preset through training, evaluation and inference; bad input; and, where the real 80 cases are at
hand (../shared/data/la2018), the real preparation."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from cpcl_tools.prepare import shipped_split

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "prepare_la2018.py")
CONFIGS = ROOT / "configs"
PRESET = str(CONFIGS / "presets" / "la2018.json")
TRAIN, INFER, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "inference.json", "evaluate.json"))
REAL = ROOT.parent / "shared" / "data" / "la2018"
TINY = {
    "pixdim": [2.5, 2.5, 2.5],
    "patch_size": [32, 32, 32],
    "sw_roi_size": [32, 32, 32],
    "cache_workers": 1,
    "num_labeled": 2,
}
TRAIN_CASES, TEST_CASES = shipped_split("la2018", "train.list")[:6], shipped_split("la2018", "test.list")[:2]


def _write_case(folder: Path, case: str, rng: np.random.Generator, label_value: int = 1, with_label: bool = True):
    """One ``<case>/mri_norm2.h5`` as the processed set has it: z-scored float32 image and uint8 label, in the
    NRRD (x, y, z) axis order, smaller than the real ~(180, 140, 88)."""
    shape = (48, 40, 32)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    atrium = (x - rng.uniform(-0.2, 0.2)) ** 2 / 0.2 + y**2 / 0.15 + (z + 0.1) ** 2 / 0.25 < 1
    image = rng.normal(size=shape) * 0.5 + 2.0 * atrium
    image = ((image - image.mean()) / image.std()).astype(np.float32)
    (folder / case).mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / case / "mri_norm2.h5", "w") as f:
        f.create_dataset("image", data=image)
        if with_label:
            f.create_dataset("label", data=(atrium * label_value).astype(np.uint8))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    source = tmp_path_factory.mktemp("la_raw") / "2018LA_Seg_Training Set"
    rng = np.random.default_rng(0)
    for case in TRAIN_CASES + TEST_CASES:
        _write_case(source, case, rng)
    return source.parent


def _prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("la")
    proc = _prepare("--source_dir", str(raw), "--dataset_dir", str(out), "--allow_missing", "true", "--holdout", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_layout_split_and_geometry(prepared):
    datalist = json.loads((prepared / "dataset.json").read_text())
    assert len(datalist["training"]) == 5 and len(datalist["validation"]) == 1 and len(datalist["test"]) == 2
    listed = [Path(item["image"]).name[: -len(".nii.gz")] for item in datalist["training"] + datalist["validation"]]
    assert sorted(listed) == sorted(TRAIN_CASES)  # train.list cases in training (+ the held-out one)
    assert [Path(i["image"]).name for i in datalist["test"]] == [f"{c}.nii.gz" for c in TEST_CASES]
    assert datalist["prepared_with"]["holdout"] == 1 and datalist["reference"].startswith("Xiong")
    item = datalist["training"][0]
    image, label = nib.load(prepared / item["image"]), nib.load(prepared / item["label"])
    assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
    assert np.allclose(image.affine, np.diag([-0.625, -0.625, 0.625, 1.0]))  # written explicitly
    assert np.allclose(label.affine, image.affine) and image.shape == (48, 40, 32)
    case = Path(item["image"]).name[: -len(".nii.gz")]
    with h5py.File(prepared.parent / "la_raw0" / "2018LA_Seg_Training Set" / case / "mri_norm2.h5") as f:
        assert np.array_equal(np.asarray(image.dataobj), f["image"][:])  # unchanged: no rescaling
        assert np.array_equal(np.asarray(label.dataobj), f["label"][:])


def test_holdout_is_seeded(raw, prepared, tmp_path):
    again = _prepare(
        "--source_dir",
        str(raw),
        "--dataset_dir",
        str(tmp_path),
        "--allow_missing",
        "true",
        "--holdout",
        "1",
        "--workers",
        "1",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    first = json.loads((prepared / "dataset.json").read_text())["validation"]
    assert json.loads((tmp_path / "dataset.json").read_text())["validation"] == first


@pytest.mark.slow
def test_preset_trains_evaluates_and_infers(prepared, tmp_path):
    out = tmp_path / "run"
    cli = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        repr([TRAIN, PRESET]),
        "--bundle_root",
        str(ROOT),
        "--dataset_dir",
        str(prepared),
        "--output_dir",
        str(out / "eval"),
        "--ckpt_dir",
        str(out / "models"),
        "--max_iterations",
        "2",
    ]
    for key, value in TINY.items():
        cli += [f"--{key}", repr(value)]
    proc = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    split = json.loads((out / "eval" / "split.json").read_text())
    assert split["num_labeled"] == 2 and split["num_unlabeled"] == 3  # the preset's count, not a ratio

    evaluate = ConfigWorkflow(
        workflow_type="train",
        config_file=[TRAIN, EVALUATE, PRESET],
        bundle_root=str(ROOT),
        dataset_dir=str(prepared),
        output_dir=str(out / "test"),
        ckpt_dir=str(out / "models"),
        **TINY,
    )
    evaluate.initialize()
    evaluate.run()
    evaluate.finalize()
    summary = json.loads((out / "test" / "metrics_summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["metric_definition"] == "paper"

    infer = ConfigWorkflow(
        workflow_type="infer",
        config_file=[INFER, PRESET],
        bundle_root=str(ROOT),
        dataset_dir=str(prepared),
        output_dir=str(out / "pred"),
        **{"checkpointloader#load_path": str(out / "models" / "model.pt")},
        **{k: v for k, v in TINY.items() if k in ("pixdim", "sw_roi_size")},
    )
    infer.initialize()
    infer.run()
    infer.finalize()
    for case in TEST_CASES:
        src, pred = nib.load(prepared / "imagesTs" / f"{case}.nii.gz"), nib.load(out / "pred" / f"{case}_seg.nii.gz")
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_bad_input_is_one_line_naming_the_file(tmp_path):
    rng = np.random.default_rng(1)
    source = tmp_path / "raw"
    _write_case(source, TRAIN_CASES[0], rng, with_label=False)
    proc = _prepare("--source_dir", str(source), "--dataset_dir", str(tmp_path / "a"), "--allow_missing", "true")
    assert proc.returncode == 1
    h5 = source / TRAIN_CASES[0] / "mri_norm2.h5"
    assert _last_line(proc) == f"error: {h5}: no 'label' dataset (found: ['image'])"

    _write_case(source, TRAIN_CASES[0], rng, label_value=2)
    proc = _prepare("--source_dir", str(source), "--dataset_dir", str(tmp_path / "b"), "--allow_missing", "true")
    assert proc.returncode == 1 and _last_line(proc).startswith(f"error: {h5}: label values [2] are not mapped")

    _write_case(source, TRAIN_CASES[0], rng)
    proc = _prepare("--source_dir", str(source), "--dataset_dir", str(tmp_path / "c"))  # 79 + 20 listed cases absent
    assert proc.returncode == 1
    assert _last_line(proc).startswith(f"error: {source}: 79 case(s) of train.list missing ({TRAIN_CASES[1]}, ")
    assert not (tmp_path / "c" / "dataset.json").exists()


def test_preset_without_prepared_data_says_what_to_do(tmp_path):
    wf = ConfigWorkflow(
        workflow_type="train",
        config_file=[TRAIN, PRESET],
        bundle_root=str(ROOT),
        dataset_dir=str(tmp_path / "missing"),
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(Exception) as info:
        wf.initialize()
    causes, error = [], info.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__
    assert any("prepare it first" in c for c in causes), causes
    assert not (tmp_path / "missing").exists()  # no phantoms generated in a real data set's place


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason="the real Left Atrium cases (../shared/data/la2018) are not here")
def test_real_la2018_prepares_in_under_two_minutes(tmp_path):
    start = time.perf_counter()
    proc = _prepare(
        "--source_dir", str(REAL), "--dataset_dir", str(tmp_path), "--allow_missing", "true", "--holdout", "20"
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    datalist = json.loads((tmp_path / "dataset.json").read_text())
    assert (len(datalist["training"]), len(datalist["validation"]), len(datalist["test"])) == (60, 20, 0)
    assert seconds < 120, f"{seconds:.0f} s"
    label = nib.load(tmp_path / datalist["training"][0]["label"])
    assert set(np.unique(np.asarray(label.dataobj))) == {0, 1}
    assert os.path.getsize(tmp_path / datalist["training"][0]["image"]) > 100_000
    assert torch.__version__  # the bundle's environment
