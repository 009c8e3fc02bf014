# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""A whole CT at clinical size (512 x 512 x 600 voxels at 0.8 x 0.8 x 1.0 mm, int16 HU) through
``python -m monai.bundle run`` for inference and evaluation, in bounded memory (peak resident set of the
child process under :data:`PEAK_LIMIT_GB`), with the label written in the input's geometry.

Before the slabbed inverse resampling of :class:`cpcl_bundle.transforms.RobustSpacingd`, inference of this
case peaked at 9.6 GB, almost all of it MONAI's whole-volume sampling grid for putting the prediction back on
the input grid (float64, 56 bytes a voxel)."""

import gzip
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cpcl_bundle.synthetic import generate_case

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHAPE, SPACING = (512, 512, 600), (0.8, 0.8, 1.0)
PEAK_LIMIT_GB = 6.0


def whole_ct(seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image int16 HU, kidney label uint8, affine) of ``SHAPE`` at ``SPACING``: a phantom of
    :mod:`cpcl_bundle.synthetic` resampled to the spacing (trilinear; the label nearest), centred in a 512 x 512
    field of view of air, and mirrored along the body axis to 600 slices, so the body fills every slice as in a
    chest-abdomen-pelvis CT."""
    image, label, affine = generate_case(seed)
    size = [int(round(n * abs(s) / t)) for n, s, t in zip(image.shape, np.diag(affine)[:3], SPACING)]
    with torch.no_grad():
        img = torch.nn.functional.interpolate(
            torch.from_numpy(image.astype(np.float32))[None, None], size=size, mode="trilinear", align_corners=False
        )[0, 0]
        lab = torch.nn.functional.interpolate(torch.from_numpy(label)[None, None].float(), size=size)[0, 0]
    img, lab = img.round().to(torch.int16).numpy(), lab.to(torch.uint8).numpy()
    out_img, out_lab = np.full(SHAPE, -1024, np.int16), np.zeros(SHAPE, np.uint8)
    x0, y0 = ((n - m) // 2 for n, m in zip(SHAPE[:2], size[:2]))
    repeats = -(-SHAPE[2] // size[2])
    z = np.concatenate([np.arange(size[2])[:: 1 if r % 2 == 0 else -1] for r in range(repeats)])[: SHAPE[2]]
    out_img[x0 : x0 + size[0], y0 : y0 + size[1]] = img[:, :, z]
    out_lab[x0 : x0 + size[0], y0 : y0 + size[1]] = lab[:, :, z]
    new = np.diag([*SPACING, 1.0])
    new[:3, 3] = affine[:3, 3] - np.array(SPACING) * [x0, y0, 0]
    return out_img, out_lab, new


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))  # fast, and .nii.gz as scanners export


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole_ct")
    image, label, affine = whole_ct()
    (folder / "images").mkdir()
    _save(image, affine, folder / "images" / "ct.nii.gz")
    _save(label, affine, folder / "ct_label.nii.gz")
    yield folder, image, label, affine
    for path in sorted(folder.rglob("*.nii.gz")):  # ~70 MB compressed each; keep /tmp clean
        path.unlink()


def _run_measured(args: list[str], cwd: Path) -> tuple[float, str]:
    """``python -m monai.bundle run <args>`` under ``/usr/bin/time -v`` when it exists: (peak resident GB, log)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    timed = os.path.exists("/usr/bin/time")
    if timed:
        cmd = ["/usr/bin/time", "-v", *cmd]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    if timed:
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1))
    else:  # the largest child so far: valid when this child is the largest
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        assert peak_kb > before
    return peak_kb / 1e6, log


def _progress_shown(log: str) -> bool:
    """tqdm's bar of the sliding window reached its end: ``100%|...| n/n``."""
    return re.search(r"100%\|[^|\n\r]*\| (\d+)/\1 ", log) is not None


@pytest.mark.slow
def test_whole_ct_inference_in_bounded_memory(case, tmp_path):
    """configs/inference.json with the bundle's network (random weights: the memory bound is the point) on the
    512 x 512 x 600 CT: peak resident memory under 6 GB, the sliding window's progress bar in the output, and a
    label of the input's shape and affine with the classes' values."""
    folder, image, _, affine = case
    args = ["--config_file", str(CONFIGS / "inference.json"), "--meta_file", str(CONFIGS / "metadata.json")]
    args += ["--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(ROOT)]
    args += ["--dataset_dir", str(folder / "images"), "--output_dir", str(tmp_path), "--load_pretrain", "False"]
    peak_gb, log = _run_measured(args, tmp_path)
    print(f"inference of a {SHAPE} CT: peak resident memory {peak_gb:.2f} GB")
    assert peak_gb < PEAK_LIMIT_GB, f"peak resident memory {peak_gb:.2f} GB"
    assert _progress_shown(log), log[-3000:]
    written = nib.load(tmp_path / "ct_seg.nii.gz")
    assert written.shape == image.shape
    assert np.allclose(written.affine, affine, atol=1e-4), written.affine
    values = np.unique(np.asarray(written.dataobj))
    assert set(values.tolist()) <= {0, 1}


@pytest.mark.slow
def test_whole_ct_evaluation_in_bounded_memory(case, tmp_path):
    """train.json + evaluate.json on a datalist holding the 512 x 512 x 600 CT and its label, with the
    intensity-band network of tests.helpers (a known, non-trivial segmentation without training: the
    contrast-enhanced organs, kidneys included, and bone), saved as the checkpoint: peak resident memory
    under 6 GB, the progress bar shown, the four metrics written, and the kept prediction in the label's
    geometry, non-empty where the kidneys are."""
    folder, image, label, affine = case
    data = tmp_path / "data"
    data.mkdir()
    item = {"image": str(folder / "images" / "ct.nii.gz"), "label": str(folder / "ct_label.nii.gz")}
    datalist = {"training": [], "test": [item]}
    (data / "dataset.json").write_text(json.dumps(datalist))
    from tests.helpers import IntensityNet

    (tmp_path / "models").mkdir()
    torch.save(IntensityNet().state_dict(), tmp_path / "models" / "model.pt")
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
    args = ["--config_file", configs, "--meta_file", str(CONFIGS / "metadata.json")]
    args += ["--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(ROOT)]
    args += ["--dataset_dir", str(data), "--output_dir", str(tmp_path / "eval"), "--ckpt_dir", str(tmp_path / "models")]
    args += ["--network_def", "{'_target_': 'tests.helpers.IntensityNet', 'out_channels': '@out_channels'}"]
    peak_gb, log = _run_measured(args, tmp_path)
    print(f"evaluation of a {SHAPE} CT: peak resident memory {peak_gb:.2f} GB")
    assert peak_gb < PEAK_LIMIT_GB, f"peak resident memory {peak_gb:.2f} GB"
    assert _progress_shown(log), log[-3000:]
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["num_cases"] == 1
    for metric in ("dice", "jaccard", "hd95_mm", "asd_mm"):
        assert np.isfinite(summary[metric]["mean"]), (metric, summary[metric])
    pred = nib.load(tmp_path / "eval" / "predictions" / "ct_seg.nii.gz")
    assert pred.shape == image.shape and np.allclose(pred.affine, affine, atol=1e-4)
    kidney = np.asarray(pred.dataobj)[label > 0]
    assert 0.2 < kidney.mean() <= 1.0, kidney.mean()  # the enhanced kidneys are labeled
