# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""cpcl_bundle.dicom and configs/inference.json with DICOM input: series folders found, read by ITK in patient
geometry, the label written in that geometry (NIfTI, and a DICOM SEG with highdicom), bad folders refused in one
line."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from scipy.spatial.transform import Rotation

from cpcl_bundle.data import inference_datalist
from cpcl_bundle.dicom import check_series_folder, dicom_folders, is_dicom_file, label_frames
from cpcl_bundle.synthetic import generate_case
from cpcl_bundle.validation import check_case
from tests.helpers import write_dicom_series

pydicom = pytest.importorskip("pydicom")  # the test extra brings it; writing the test series needs it
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HAS_HIGHDICOM = importlib.util.find_spec("highdicom") is not None


def oblique_affine(shape, spacing=(1.6, 1.4, 2.5), angles=(12.0, -7.0, 25.0), origin=(-40.0, 25.0, 60.0)):
    """A rotated, anisotropic voxel-to-world (RAS) matrix: no axis is a world axis, so any transposed or flipped
    axis on the way through DICOM changes the result."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture(scope="module")
def phantom_ct():
    image, _, _ = generate_case(seed=11, scale=0.4)
    return image.astype(np.int16), oblique_affine(image.shape)


def test_series_folders_are_found_beside_image_files(tmp_path, phantom_ct):
    image, affine = phantom_ct
    small = image[:8, :6, :4]
    nib.save(nib.Nifti1Image(small.astype(np.float32), affine), tmp_path / "b_case.nii.gz")
    write_dicom_series(small, affine, tmp_path / "a_series")
    nested = tmp_path / "patient" / "study" / "series"
    for n, path in enumerate(write_dicom_series(small, affine, nested)):
        path.rename(nested / f"{n:08d}")  # PACS exports often carry no suffix: found by the DICM marker
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    assert is_dicom_file(nested / "00000000") and not is_dicom_file(tmp_path / "notes.txt")
    assert dicom_folders(tmp_path) == [tmp_path / "a_series", nested]
    assert inference_datalist(tmp_path) == [
        {"image": str(tmp_path / "b_case.nii.gz")},
        {"image": str(tmp_path / "a_series")},
        {"image": str(nested)},
    ]
    assert inference_datalist(tmp_path / "a_series") == [{"image": str(tmp_path / "a_series")}]
    assert check_case({"image": str(nested)}) == []


def test_a_folder_must_hold_exactly_one_series(tmp_path, phantom_ct):
    image, affine = phantom_ct
    small = image[:8, :6, :4]
    write_dicom_series(small, affine, tmp_path / "two")
    write_dicom_series(small, affine, tmp_path / "two", shuffle_seed=None)  # same names: rename the first first
    assert len(list((tmp_path / "two").iterdir())) == 4  # the second series overwrote the first: make it mixed
    for n, path in enumerate(write_dicom_series(small, affine, tmp_path / "other")):
        path.rename(tmp_path / "two" / f"B{n}.dcm")
    problems = check_series_folder(tmp_path / "two")
    assert len(problems) == 1 and "holds 2 DICOM series" in problems[0] and str(tmp_path / "two") in problems[0]
    one_file = write_dicom_series(small, affine, tmp_path / "single")[0]
    assert check_case({"image": str(one_file)}) == [
        f"{one_file}: one DICOM file is one slice; give the folder that holds its series"
    ]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "readme.txt").write_text("x")
    assert check_case({"image": str(tmp_path / "plain")}) == [
        f"{tmp_path / 'plain'}: image folder holds no DICOM files (a folder input must be one DICOM series)"
    ]


def test_label_frames_follow_each_instance_position_not_the_file_order(tmp_path, phantom_ct):
    _, affine = phantom_ct
    small = np.random.default_rng(0).integers(-1000, 1500, size=(7, 5, 6)).astype(np.int16)  # every slice unique
    paths = write_dicom_series(small, affine, tmp_path / "s", shuffle_seed=3)
    sources = [pydicom.dcmread(p) for p in paths]  # shuffled slice order
    label = np.arange(small.size).reshape(small.shape)
    frames = label_frames(label, affine, sources)
    for ds, frame in zip(sources, frames):
        pixels = ds.pixel_array.astype(np.int64) - 1024  # which slice this instance holds, from its pixels
        (k,) = [k for k in range(small.shape[2]) if np.array_equal(pixels, small[:, :, k].T.astype(np.int64))]
        assert np.array_equal(frame, label[:, :, k].T)
    assert [int(ds.InstanceNumber) for ds in sources] == list(range(1, 7))
    flipped = affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # a label on another grid is refused, not misplaced
    with pytest.raises(ValueError, match="orientation"):
        label_frames(label, flipped, sources)


def _infer(inputs: Path, out: Path, **overrides) -> Path:
    """configs/inference.json on ``inputs`` into ``out`` with the intensity-band network of tests.helpers (one
    output channel per class of ``classes``), no weights to load and a 32^3 window."""
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(ROOT),
        dataset_dir=str(inputs),
        output_dir=str(out),
        network_def={"_target_": "tests.helpers.IntensityNet", "out_channels": "@out_channels"},
        load_pretrain=False,
        sw_roi_size=[32, 32, 32],
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return out


@pytest.mark.slow
def test_a_dicom_series_in_gives_the_label_in_the_series_geometry(tmp_path, phantom_ct):
    """The same CT as a NIfTI file and as a DICOM series (oblique, anisotropic, shuffled files) through
    configs/inference.json: the series' label has the series' shape and geometry and overlaps the label of the NIfTI
    as closely as resampling allows; with highdicom a DICOM SEG references the source instances and holds the same label.
    """
    image, affine = phantom_ct
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), inputs / "ct_nifti.nii.gz")
    series = write_dicom_series(image, affine, inputs / "ct_series")
    out = _infer(inputs, tmp_path / "out")
    from_nifti, from_dicom = nib.load(out / "ct_nifti_seg.nii.gz"), nib.load(out / "ct_series_seg.nii.gz")
    assert from_dicom.shape == image.shape
    assert np.allclose(from_dicom.affine, affine, atol=1e-3), (from_dicom.affine, affine)
    label = np.asarray(from_dicom.dataobj)
    assert set(np.unique(label).tolist()) == {0, 1}  # a real segmentation, not a constant
    # Not voxel-identical: MONAI's Spacing puts the 2 mm grid at the input's corner only when that corner is the
    # minimum to 1e-8, and the NIfTI stores its affine in float32, so the two 2 mm grids differ by a fraction of a
    # voxel and boundaries differ by interpolation (Dice 0.958 measured). A flipped axis gives 0.45-0.48, a one-slice
    # shift 0.80.
    a, b = label > 0, np.asarray(from_nifti.dataobj) > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.93, dice
    if not HAS_HIGHDICOM:
        assert not (out / "ct_series_seg.dcm").exists()
        return
    import highdicom as hd

    seg = hd.seg.segread(out / "ct_series_seg.dcm")
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["kidney"]
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in series}
    assert seg.get_source_image_uids()[0][1] == pydicom.dcmread(series[0]).SeriesInstanceUID
    sources = list(by_uid.values())
    sop_uids = [ds.SOPInstanceUID for ds in sources]
    mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[1])[..., 0]
    assert np.array_equal(mask, label_frames(label, from_dicom.affine, sources))
    assert mask.sum() == label.sum()


@pytest.mark.slow
def test_three_classes_are_written_as_class_indices_and_segments(tmp_path, phantom_ct):
    """inference.json with ``classes`` background, kidney, tumour writes the class indices (0, 1, 2, not a
    foreground mask), in the input's geometry, for a NIfTI file and a DICOM series; the DICOM SEG has one segment
    per foreground class, named after it, each holding exactly its class's voxels."""
    image, affine = phantom_ct
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), inputs / "ct_nifti.nii.gz")
    series = write_dicom_series(image, affine, inputs / "ct_series")
    out = _infer(inputs, tmp_path / "out", classes=["background", "kidney", "tumour"])
    for name in ("ct_nifti", "ct_series"):
        written = nib.load(out / f"{name}_seg.nii.gz")
        assert written.shape == image.shape and np.allclose(written.affine, affine, atol=1e-3)
        label = np.asarray(written.dataobj)
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        # the network labels by intensity band (tests.helpers.IntensityNet): the classes keep their order
        means = [float(image[label == k].mean()) for k in range(3)]
        assert means[0] < means[1] < means[2], means
    if not HAS_HIGHDICOM:
        return
    import highdicom as hd

    seg = hd.seg.segread(out / "ct_series_seg.dcm")
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["kidney", "tumour"]
    sources = [pydicom.dcmread(p) for p in series]
    sop_uids = [ds.SOPInstanceUID for ds in sources]
    for number in (1, 2):
        mask = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[number])[..., 0]
        assert np.array_equal(mask, label_frames(label == number, written.affine, sources)), number


@pytest.mark.slow
def test_a_folder_with_two_series_ends_the_cli_in_one_line(tmp_path, phantom_ct):
    image, affine = phantom_ct
    small = image[:16, :16, :8]
    folder = tmp_path / "inputs" / "mixed"
    write_dicom_series(small, affine, folder)
    for n, path in enumerate(write_dicom_series(small, affine, tmp_path / "other")):
        path.rename(folder / f"B{n}.dcm")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json")]
    cmd += ["--bundle_root", str(ROOT), "--dataset_dir", str(tmp_path / "inputs"), "--output_dir", str(tmp_path / "o")]
    cmd += ["--load_pretrain", "False"]
    env = {**os.environ, "CPCL_TRACEBACK": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1, "\n".join(lines[-30:])
    assert f"{folder}: holds 2 DICOM series" in lines[-1], "\n".join(lines[-30:])
