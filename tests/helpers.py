# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Small deterministic data for the tests."""

import importlib.util
import sys
from pathlib import Path

import torch

#: A BasicUNet small enough for CPU tests (same layers, fewer channels).
TINY_FEATURES = (4, 4, 8, 8, 16, 4)


def blob_batch(n: int, size: int = 32, seed: int = 0, with_label: bool = True) -> list[dict]:
    """n images with a bright cube (the foreground) at a random place, and its label."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        label = torch.zeros(1, size, size, size)
        c = torch.randint(4, size - 12, (3,), generator=g)
        label[:, c[0] : c[0] + 9, c[1] : c[1] + 9, c[2] : c[2] + 9] = 1
        image = 0.3 * torch.randn(1, size, size, size, generator=g) + label
        items.append({"image": image, "label": label} if with_label else {"image": image})
    return items


def write_dicom_series(
    volume, affine, folder, series_uid: str | None = None, shuffle_seed: int | None = 0, patient_id: str = "CPCL0001"
) -> list:
    """Write a CT volume as one single-frame DICOM series (CT Image Storage, int16 with a rescale to HU), one file
    per slice, in the geometry of ``affine`` (NIfTI's RAS voxel-to-world): slice ``k`` holds ``volume[:, :, k]`` with
    DICOM rows along the volume's second axis and columns along its first. File names and instance numbers are
    shuffled (``shuffle_seed``), so a reader must order the slices by position, not by name. Returns the paths."""
    from pathlib import Path

    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3]  # RAS -> LPS
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    row_dir, col_dir = lps[:, 0] / spacing[0], lps[:, 1] / spacing[1]  # along a row = first axis; down = second
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    order = np.arange(volume.shape[2])
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    paths = []
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{n:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientID, ds.PatientName = "CT", patient_id, "CPCL^Phantom"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "O", "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "1", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 1, int(n) + 1
        ds.Manufacturer = "CPCL tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in lps @ np.array([0.0, 0.0, float(k), 1.0])]
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([row_dir, col_dir])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024.0, 1.0, "HU"
        pixels = np.round(np.asarray(volume[:, :, k], dtype=np.float64).T + 1024.0)
        ds.PixelData = np.clip(pixels, -32768, 32767).astype("<i2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class IntensityNet(torch.nn.Module):
    """Logits that label a voxel with the class ``k`` whose centre ``k / (out_channels - 1)`` is nearest to its
    (windowed, 0..1) intensity: with two classes, foreground where the intensity exceeds 0.5; with three, class 2
    above 0.75 and class 1 between 0.25 and 0.75. A known, non-constant segmentation without training, for tests
    of geometry and writers. Accepts ``network_def``'s arguments."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, **_: object) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("centres", torch.linspace(0.0, 1.0, out_channels).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x[:, :1] - self.centres) ** 2) * self.gain


def load_script(name: str, module_name: str | None = None):
    """The module of ``scripts/<name>.py`` (the scripts are not a package), registered in ``sys.modules``."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name or f"cpcl_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def resumable_trainer(folder, steps, resume=False, stop_at=None, method="cpcl", amp=False, **protocol):
    """The in-process exact-resume setting of tests/test_resume.py and tests/test_resume_faults.py: a tiny
    ``method`` trainer built from configs/train.json's network, optimiser and loss on blob batches, ``steps``
    iterations, a :class:`~cpcl_bundle.resume.ResumeCheckpoint` every 2 into ``folder`` (the optimiser and a
    ``TrainingRNG`` saved with it), stopped after ``stop_at`` iterations if given. Seeded by ``resume``: a resumed
    run starts from other weights and random state, which the checkpoint must restore. Returns (trainer, handler)."""
    import torch
    from ignite.engine import Events
    from torch.utils.data import DataLoader

    from cpcl_bundle.resume import ResumeCheckpoint, TrainingRNG
    from cpcl_bundle.trainer import CPCLTrainer
    from cpcl_tools import train_objects

    torch.manual_seed(int(resume))
    net = train_objects.network_def(features=TINY_FEATURES)
    optimizer = train_objects.optimizer(net)
    handler = ResumeCheckpoint(
        folder, interval=2, objects={"optimizer": optimizer, "rng": TrainingRNG()}, resume=resume
    )
    engine = CPCLTrainer(
        "cpu",
        steps,
        DataLoader(blob_batch(2, seed=1), batch_size=2),
        net,
        optimizer,
        train_objects.loss(),
        train_handlers=[handler],
        amp=amp,
        method=method,
        unlabeled_data_loader=DataLoader(blob_batch(2, seed=2, with_label=False), batch_size=2),
        **protocol,
    )
    if stop_at is not None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
    return engine, handler
