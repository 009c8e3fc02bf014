# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""DICOM for inference: series folders in, the label in the series' geometry out (NIfTI, and DICOM SEG).

What a CT scanner or a PACS hands a clinical user is a folder of single-frame DICOM files per series. A folder that
directly holds DICOM files is one input: ITK's GDCM reader (MONAI's ``ITKReader``, which ``LoadImage`` picks for a
folder) orders the slices by position, applies the rescale to Hounsfield units and returns the patient geometry as
the affine. ``configs/inference.json`` then writes the label in that geometry as NIfTI (``SaveImaged`` inverts the
preprocessing) and, where ``highdicom`` is installed, as a DICOM Segmentation (:class:`SaveDicomSegd`) that
references the source instances, so that a PACS can store it beside the series.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .errors import InputError

logger = logging.getLogger(__name__)

#: File names that are DICOM whatever their content; other files count when they carry the "DICM" preamble.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: SNOMED CT codes (scheme SCT) of the class names the presets use: (category, type) as (code, meaning) pairs.
CLASS_CODES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "kidney": (("123037004", "Anatomical Structure"), ("64033007", "Kidney")),
    "tumour": (("49755003", "Morphologically Altered Structure"), ("108369006", "Neoplasm")),
    "tumor": (("49755003", "Morphologically Altered Structure"), ("108369006", "Neoplasm")),
    "left atrium": (("123037004", "Anatomical Structure"), ("82471001", "Left atrium")),
    "left_atrium": (("123037004", "Anatomical Structure"), ("82471001", "Left atrium")),
}
#: Any other class name: segmented property "Tissue", labelled with the class name.
GENERIC_CODE = (("85756007", "Tissue"), ("85756007", "Tissue"))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM suffix, or the ``DICM`` marker after the 128-byte preamble (files without a suffix, as PACS export)."""
    path = Path(path)
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    if path.suffix or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def holds_dicom(folder: str | os.PathLike) -> bool:
    """``folder`` directly holds at least one DICOM file."""
    folder = Path(folder)
    return folder.is_dir() and any(p.is_file() and is_dicom_file(p) for p in folder.iterdir())


def dicom_folders(root: str | os.PathLike) -> list[Path]:
    """Every folder under ``root`` (``root`` included) that directly holds DICOM files, sorted: one series each."""
    root = Path(root)
    found = [Path(d) for d, _, files in os.walk(root) if any(is_dicom_file(Path(d) / f) for f in files)]
    return sorted(found)


def series_files(folder: str | os.PathLike) -> dict[str, list[str]]:
    """``{series instance UID: its files in ITK's slice order}`` of the image series directly in ``folder``."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(False)  # one entry per SeriesInstanceUID, as the PACS knows them
    names.SetDirectory(str(folder))
    return {str(uid): [str(f) for f in names.GetFileNames(uid)] for uid in names.GetSeriesUIDs()}


def check_series_folder(folder: str | os.PathLike) -> list[str]:
    """Problems of a DICOM folder as an inference input: it must hold exactly one image series."""
    try:
        series = series_files(folder)
    except Exception as e:  # noqa: BLE001 - any reader failure is the input's problem, reported with its type
        return [f"{folder}: DICOM folder ITK cannot list ({type(e).__name__}: {str(e).splitlines()[0][:200]})"]
    if not series:
        return [f"{folder}: holds DICOM files but no image series ITK can read (not CT/MR images?)"]
    if len(series) > 1:
        counts = ", ".join(f"{uid} ({len(files)} files)" for uid, files in sorted(series.items()))
        return [f"{folder}: holds {len(series)} DICOM series ({counts}); put each series in a folder of its own"]
    return []


def _segment_descriptions(classes: Sequence[str]) -> list:
    import highdicom as hd
    from pydicom.sr.coding import Code

    from . import BUNDLE_NAME, __version__

    algorithm = hd.AlgorithmIdentificationSequence(
        name=BUNDLE_NAME, version=__version__, family=Code("123109", "DCM", "Artificial Intelligence")
    )
    descriptions = []
    for number, name in enumerate(classes[1:], start=1):
        (category, category_meaning), (code, meaning) = CLASS_CODES.get(name.lower(), GENERIC_CODE)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=Code(category, "SCT", category_meaning),
                segmented_property_type=Code(code, "SCT", meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return descriptions


def label_frames(label: np.ndarray, affine: np.ndarray, sources: Sequence[Any]) -> np.ndarray:
    """The label's plane of each source instance, as ``(instances, rows, columns)``.

    ``label`` is ``(X, Y, Z)`` in the array order ITK reads a series in (X along a DICOM row, Y down the columns, Z
    across the slices) and ``affine`` its voxel-to-world (RAS) matrix. Each instance's plane is found from its own
    ``ImagePositionPatient`` (LPS) through the inverse affine, and its ``ImageOrientationPatient`` must agree with
    the affine's first two axes, so a reordered or flipped volume is an error rather than a misplaced mask."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    axes = np.asarray(affine, dtype=np.float64)[:3, :3] * lps_to_ras[:, None]  # voxel axes in LPS
    axes = axes / np.linalg.norm(axes, axis=0)
    frames = []
    for ds in sources:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        if not (
            np.allclose(orientation[:3], axes[:, 0], atol=1e-3) and np.allclose(orientation[3:], axes[:, 1], atol=1e-3)
        ):
            raise ValueError(f"instance {ds.SOPInstanceUID}: orientation {orientation.tolist()} is not the label's")
        ijk = inverse @ np.append(np.asarray(ds.ImagePositionPatient, dtype=np.float64) * lps_to_ras, 1.0)
        k = int(round(ijk[2]))
        if not (np.allclose(ijk[:2], 0.0, atol=1e-2) and abs(ijk[2] - k) < 1e-2 and 0 <= k < label.shape[2]):
            raise ValueError(f"instance {ds.SOPInstanceUID}: position maps to voxel {ijk.round(3).tolist()}")
        frames.append(label[:, :, k].T)  # rows along Y, columns along X
    return np.stack(frames)


def write_dicom_seg(
    label: np.ndarray, affine: np.ndarray, series_folder: str | os.PathLike, output_file: str | os.PathLike, classes
) -> Path:
    """Write ``label`` (class indices, ``(X, Y, Z)`` in the series' geometry) as a DICOM Segmentation of the one
    series in ``series_folder``: a label map over every source instance, one segment per foreground class."""
    import highdicom as hd
    import pydicom

    from . import BUNDLE_NAME, __version__

    (files,) = series_files(series_folder).values()
    sources = [pydicom.dcmread(f) for f in files]
    frames = label_frames(np.asarray(label), affine, sources)
    if int(frames.max(initial=0)) >= len(classes):
        raise ValueError(f"label values up to {int(frames.max())} but only {len(classes)} classes {list(classes)}")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(list(classes)),
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="CPCL bundle",
        manufacturer_model_name=BUNDLE_NAME,
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"{BUNDLE_NAME} segmentation",
    )
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(output_file)
    return output_file


class SaveDicomSegd(MapTransform):
    """After ``SaveImaged``: for an input that was a DICOM series folder, also write ``<output_dir>/<folder
    name>_<postfix>.dcm``, a DICOM Segmentation of ``pred`` (class indices, inverted to the series' geometry).

    Needs ``highdicom``; without it (or for inputs that are image files) the data pass through unchanged, and the
    first DICOM input logs once that only the NIfTI label was written."""

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        classes: Sequence[str],
        output_postfix: str = "seg",
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.classes = list(classes)
        self.output_postfix = output_postfix
        self.enabled = enabled
        self._warned = False

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            source = str(getattr(pred, "meta", {}).get("filename_or_obj", "") or "")
            if not self.enabled or not source or not holds_dicom(source):
                continue
            try:
                import highdicom  # noqa: F401
            except ImportError:
                if not self._warned:
                    logger.info("highdicom is not installed: DICOM SEG not written (pip install highdicom)")
                    self._warned = True
                continue
            name = Path(source.rstrip("/")).name
            out = self.output_dir / f"{name}_{self.output_postfix}.dcm"
            label = torch.as_tensor(pred).detach().cpu().numpy()[0].astype(np.int64)
            affine = torch.as_tensor(pred.affine).detach().cpu().numpy()
            try:
                write_dicom_seg(label, affine, source, out, self.classes)
            except ValueError as e:
                raise InputError([f"{source}: DICOM SEG not written: {e}"]) from e
            logger.info(f"wrote DICOM SEG {out}")
        return d
