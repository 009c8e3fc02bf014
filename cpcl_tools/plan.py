# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""A preset for a new data set, planned from its fingerprint (``scripts/plan.py``).

    fp = fingerprint("data/mine")                       # MONAI's DataAnalyzer on the datalist's images
    choices = plan(fp, measure=probe_step(...), memory_gb=12, ...)   # one Choice per decision, each with its why
    write_preset(preset(choices), "configs/presets/mine.json")

The fingerprint (:class:`Fingerprint`) is computed by :class:`monai.apps.auto3dseg.DataAnalyzer` on CPU, after the
same loading and ``Orientationd("RAS")`` as training: spacings and shapes per image, intensity statistics inside
the labels (foreground: training cases) and over the body (DataAnalyzer's bounding box of the voxels above 0, every
image: ``training`` and ``unlabeled``), the label values found, and the channel count. What DataAnalyzer does not
do is done here, and said where: the files' shapes and channel counts are checked from their headers first,
because DataAnalyzer silently resamples a label that differs from its image by up to 5 voxels
(``EnsureSameShaped``) and skips a case it cannot read with one log line; a case it skipped is an error here.

The choices (each a pure function of the fingerprint; :func:`plan` lists them in order):

* spacing (:func:`target_spacing`): the median spacing per axis; if the largest median is over
  :data:`ANISOTROPY` times the smallest, that axis takes the 10th percentile of its spacings (nnU-Net's rule);
* modality (:func:`guess_modality`): CT when the images reach air in Hounsfield units (mean per-image minimum
  at most :data:`CT_MAX_MIN`) with a range of at least :data:`CT_MIN_RANGE`; else MR;
* intensity and the label-free crop (:func:`intensity_choice`, :func:`crop_choice`): CT: clip to the
  foreground's 0.5-99.5 percentiles and z-score with the foreground's mean and standard deviation, one
  ``ScaleIntensityRanged`` (the window ``hu_window`` mapped to ``(window - mean) / std``), and the body crop
  (``BodyCropd`` at :data:`BODY_THRESHOLD_HU`); MR: z-score over the non-zero voxels (``NormalizeIntensityd``)
  and ``CropForegroundd`` on the image; MR whose images go below 0 was normalised already (e.g. the Left Atrium's
  z-scored h5, :func:`zero_is_background`): its zero is not background, so z-score over the whole image (a no-op
  on z-scored data) and no crop, as la2018;
* classes (:func:`classes_choice`): background 0 first, then every label value found, in order;
* patch and sliding window (:func:`patch_candidates`, :func:`choose_patch`): multiples of 16 following the
  median shape in voxels at the target spacing, capped at it, square in the plane of the first two axes (the
  augmentation's 90-degree turns), the largest whose measured training step
  (:func:`probe_step`, a real step of the method with train.json's network in a process of its own) fits the
  memory budget;
* labeled / unlabeled (:func:`labeled_choice`) and the step budget (:func:`steps_choice`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cpcl_tools.prepare import PrepareError

__all__ = [
    "ANISOTROPY",
    "CT_MAX_MIN",
    "CT_MIN_RANGE",
    "BODY_THRESHOLD_HU",
    "PATCH_EDGES",
    "PAPER_STEPS",
    "PlanError",
    "Fingerprint",
    "Probe",
    "Choice",
    "fingerprint",
    "target_spacing",
    "guess_modality",
    "zero_is_background",
    "intensity_choice",
    "crop_choice",
    "classes_choice",
    "median_shape",
    "patch_candidates",
    "choose_patch",
    "probe_step",
    "labeled_choice",
    "steps_choice",
    "plan",
    "preset",
    "write_preset",
    "default_memory_gb",
]

ROOT = Path(__file__).resolve().parents[1]

#: Largest / smallest median spacing above which the coarse axis takes a low percentile of its spacings (nnU-Net).
ANISOTROPY = 3.0
#: Percentile of the coarse axis's spacings for strongly anisotropic data (nnU-Net's 10th).
LOW_RES_PERCENTILE = 10.0
#: CT when the mean per-image minimum is at most this (air is about -1000 HU; MR is never this negative) ...
CT_MAX_MIN = -500.0
#: ... and the mean per-image range is at least this (HU from air to contrast and bone).
CT_MIN_RANGE = 1000.0
#: The body crop's threshold on CT: halfway between air (-1000 HU) and fat (-100 HU), as train.json's default.
BODY_THRESHOLD_HU = -500.0
#: Cube edges whose volumes the candidate patches take (then shaped like the data, multiples of 16, capped).
PATCH_EDGES = (48, 64, 80, 96, 112, 128, 160, 192)
#: The paper's step budget (configs/presets/paper_protocol.json) and its epoch, validation, map and checkpoint cadence.
PAPER_STEPS = 20000
PAPER_CADENCE = {"iterations_per_epoch": 200, "val_interval": 5, "map_interval": 1000, "checkpoint_interval": 500}
#: A patch edge is at least this (the U-Net pools 4 times; instance norm needs more than one voxel at the bottom).
MIN_EDGE = 32


class PlanError(PrepareError):
    """A data set that cannot be planned; the message is one line naming the file (``<path>: <cause>``)."""


@dataclass
class Fingerprint:
    """What the plan reads of a data set. Per-image lists are in datalist order, ``training`` then ``unlabeled``;
    intensity dicts hold DataAnalyzer's keys (``min``, ``max``, ``mean``, ``median``, ``stdev``,
    ``percentile_00_5``, ``percentile_10_0``, ``percentile_90_0``, ``percentile_99_5``), each the mean over images
    of the per-image value (channel 0)."""

    dataset_dir: str
    num_training: int
    num_unlabeled: int
    channels: int
    spacings: list[list[float]]  # mm per axis, after Orientationd("RAS")
    shapes: list[list[int]]  # voxels per axis
    cropped_shapes: list[list[int]]  # DataAnalyzer's crop to the voxels above 0
    foreground: dict[str, float]  # inside the labels (label > 0), training cases
    body: dict[str, float]  # the crop to the voxels above 0, every image
    labels: list[int]  # label values found (0 included when present)
    label_names: dict[int, str] = field(default_factory=dict)  # from the datalist's "labels", if it has them


class Probe(NamedTuple):
    """One measured training step: the patch, the peak memory (GB) and the step time (s)."""

    patch: tuple[int, int, int]
    peak_gb: float
    step_s: float


class Choice(NamedTuple):
    """One decision of the plan: a short name, the preset ids it sets, and why (one line)."""

    name: str
    ids: dict[str, Any]
    why: str


# ---------------------------------------------------------------------------------------------------- fingerprint
def _header(path: str) -> tuple[tuple[int, ...], int]:
    """(spatial shape, channels) of an image file, from its header for NIfTI; errors name the file."""
    if not os.path.isfile(path):
        raise PlanError(f"{path}: file does not exist")
    try:
        if path.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = tuple(int(v) for v in nib.load(path).shape)
            spatial, rest = shape[:3], shape[3:]
        else:
            from monai.transforms import LoadImage

            shape = tuple(LoadImage(image_only=True, ensure_channel_first=True)(path).shape)
            spatial, rest = shape[1:], shape[:1]
    except Exception as e:  # noqa: BLE001 - any reader failure is reported, with its type
        raise PlanError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if len(spatial) != 3:
        raise PlanError(f"{path}: shape {shape}, expected a 3-D volume (with channels last for NIfTI)")
    return spatial, int(np.prod(rest)) if rest else 1


def _check_files(training: list[dict], unlabeled: list[dict]) -> int:
    """The channel count shared by every image; a label whose shape is not its image's, an image with another
    channel count, or a label with channels is a :class:`PlanError` naming the file."""
    channels, first = None, None
    for item in training + unlabeled:
        if not isinstance(item["image"], str):
            raise PlanError(f"{item['image']}: one file per image expected (a list of channel files is not planned)")
        shape, c = _header(item["image"])
        if channels is None:
            channels, first = c, item["image"]
        elif c != channels:
            raise PlanError(f"{item['image']}: {c} channel(s), the first image ({first}) has {channels}")
        if "label" in item:
            label_shape, label_channels = _header(item["label"])
            if label_shape != shape or label_channels != 1:
                raise PlanError(
                    f"{item['label']}: shape {list(label_shape)} x {label_channels} channel(s) differs from the "
                    f"image's {list(shape)} x 1 ({item['image']})"
                )
    return int(channels or 1)


def _analyse(items: list[dict], key: str, labeled: bool, workers: int) -> list[dict]:
    """DataAnalyzer's per-image statistics of ``items`` (CPU); a case it skipped is a :class:`PlanError`."""
    import logging

    from monai.apps.auto3dseg import DataAnalyzer

    if not items:
        return []
    logging.getLogger("monai.apps.auto3dseg.data_analyzer").setLevel(logging.WARNING)  # its INFO lines
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = DataAnalyzer(
            {key: items},
            output_path=os.path.join(tmp, "datastats.yaml"),
            device="cpu",
            worker=workers,
            label_key="label" if labeled else None,
        )
        cases = analyzer.get_all_case_stats(key)["stats_by_cases"]
    done = {os.path.realpath(str(c["image_filepath"])) for c in cases}
    for item in items:
        if os.path.realpath(item["image"]) not in done:
            raise PlanError(f"{item['image']}: MONAI's DataAnalyzer could not read this case (see its log above)")
    return cases


def _mean_stats(stats: list[dict]) -> dict[str, float]:
    keys = [k for k in stats[0] if isinstance(stats[0][k], (int, float))] if stats else []
    return {k: float(np.nanmean([float(s[k]) for s in stats])) for k in keys}


def fingerprint(dataset_dir: str | os.PathLike, workers: int = 0) -> Fingerprint:
    """The fingerprint of ``<dataset_dir>/dataset.json`` (docs/design/architecture.md, data contract): its
    ``training`` cases (image and label) and ``unlabeled`` images, read by MONAI's DataAnalyzer on CPU
    (``workers`` loader processes). Errors are :class:`PlanError` naming the file."""
    from cpcl_bundle.data import DATALIST_NAME, load_datalist
    from cpcl_bundle.errors import InputError

    folder = Path(dataset_dir)
    path = folder / DATALIST_NAME
    if not path.is_file():
        raise PlanError(
            f"{path}: no datalist (a Decathlon-style {DATALIST_NAME}: 'training' with image and label, optional "
            "'unlabeled', 'validation', 'test'; docs/README.md 'Your own data')"
        )
    try:
        datalist = load_datalist(path)
    except InputError as e:
        raise PlanError(e.problems[0]) from None
    training, unlabeled = datalist["training"], datalist["unlabeled"]
    if not training:
        raise PlanError(f"{path}: no images in 'training' (the plan needs labeled cases)")
    channels = _check_files(training, unlabeled)
    labeled_stats = _analyse(training, "training", True, workers)
    unlabeled_stats = _analyse(unlabeled, "unlabeled", False, workers)
    every = labeled_stats + unlabeled_stats
    labels = sorted({int(round(float(v))) for c in labeled_stats for v in c["label_stats"]["labels"]})
    raw = json.loads(path.read_text()).get("labels", {})
    names = {int(k): str(v) for k, v in raw.items() if str(k).lstrip("-").isdigit()} if isinstance(raw, dict) else {}
    return Fingerprint(
        dataset_dir=str(folder.resolve()),
        num_training=len(training),
        num_unlabeled=len(unlabeled),
        channels=channels,
        spacings=[[float(v) for v in c["image_stats"]["spacing"]] for c in every],
        shapes=[[int(v) for v in c["image_stats"]["shape"][0]] for c in every],
        cropped_shapes=[[int(v) for v in c["image_stats"]["cropped_shape"][0]] for c in every],
        foreground=_mean_stats([c["image_foreground_stats"]["intensity"][0] for c in labeled_stats]),
        body=_mean_stats([c["image_stats"]["intensity"][0] for c in every]),
        labels=labels,
        label_names=names,
    )


# ------------------------------------------------------------------------------------------------------ choices
def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return "[" + ", ".join(f"{round(float(v), digits):g}" for v in values) + "]"


def target_spacing(spacings: Sequence[Sequence[float]]) -> Choice:
    """``pixdim``: the median spacing per axis; strongly anisotropic data (largest / smallest median over
    :data:`ANISOTROPY`) takes the 10th percentile of the coarse axis's spacings there (nnU-Net's rule, so that
    most images are not made coarser than they are along it)."""
    s = np.asarray(spacings, dtype=np.float64)
    target = np.median(s, axis=0)
    ratio = float(target.max() / target.min())
    why = f"median spacing {_fmt(target)} mm"
    if ratio > ANISOTROPY:
        axis = int(np.argmax(target))
        target[axis] = np.percentile(s[:, axis], LOW_RES_PERCENTILE)
        why += (
            f"; anisotropic (ratio {ratio:.1f} > {ANISOTROPY:g}): axis {axis} takes the"
            f" {LOW_RES_PERCENTILE:g}th percentile of its spacings, {target[axis]:.3g} mm (nnU-Net's rule)"
        )
    return Choice("spacing", {"pixdim": [round(float(v), 4) for v in target]}, why)


def guess_modality(body: dict[str, float]) -> tuple[str, str]:
    """``("CT" | "MR", why)`` from the body intensity (means over images of per-image min and max): CT reaches air
    in HU (min at most :data:`CT_MAX_MIN`) over a range of at least :data:`CT_MIN_RANGE`."""
    low, high = body["min"], body["max"]
    if low <= CT_MAX_MIN and high - low >= CT_MIN_RANGE:
        return "CT", f"images reach {low:.0f} (air in HU) over a range of {high - low:.0f}: Hounsfield units"
    return "MR", f"images span [{low:.3g}, {high:.3g}], not Hounsfield units (min > {CT_MAX_MIN:g} or range < 1000)"


def zero_is_background(body: dict[str, float]) -> tuple[bool, str]:
    """Whether 0 is the background level of the images (``body``: means over images of per-image min and max).
    Raw MR has non-negative intensities with 0 outside the body; images that go below 0 were normalised already
    (z-scored, shifted), so a crop or a z-score over the "non-zero" voxels would select by brightness instead."""
    if body["min"] < 0:
        return False, f"intensities go down to {body['min']:.3g}: normalised already, 0 is not the background"
    return True, "intensities start at 0: 0 is the background"


def intensity_choice(
    modality: str, foreground: dict[str, float], channels: int = 1, zero_background: bool = True
) -> Choice:
    """CT: clip to the foreground's 0.5-99.5 percentiles (``hu_window``) and z-score with the foreground's mean
    and standard deviation, as one ``ScaleIntensityRanged`` whose window maps to ``(window - mean) / std``
    (clipping, then the same linear map; nnU-Net's CT normalisation). MR: z-score over the non-zero voxels of
    each image and channel (``NormalizeIntensityd``), as brats2019."""
    if modality == "CT":
        low, high = round(foreground["percentile_00_5"], 1), round(foreground["percentile_99_5"], 1)
        mean, std = foreground["mean"], max(foreground["stdev"], 1e-6)
        ids = {
            "hu_window": [low, high],
            "intensity": {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": "@hu_window#0",
                "a_max": "@hu_window#1",
                "b_min": round((low - mean) / std, 4),
                "b_max": round((high - mean) / std, 4),
                "clip": True,
            },
        }
        why = (
            f"CT: clip to the foreground's 0.5-99.5 percentiles [{low:g}, {high:g}] HU, then z-score with its mean"
            f" {mean:.1f} and std {std:.1f} (one ScaleIntensityRanged)"
        )
        return Choice("intensity", ids, why)
    ids = {"intensity": {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}}
    if channels == 1:
        del ids["intensity"]["channel_wise"]
    if not zero_background:
        del ids["intensity"]["nonzero"]
        why = "MR, normalised already: z-score over the whole image (NormalizeIntensityd; a no-op on z-scored data)"
        return Choice("intensity", ids, why)
    return Choice("intensity", ids, "MR: z-score over the non-zero (body) voxels of each image (NormalizeIntensityd)")


def crop_choice(modality: str, zero_background: bool = True) -> Choice:
    """The label-free crop, the same for labeled, unlabeled and new images: CT: the body (``BodyCropd``, voxels
    above :data:`BODY_THRESHOLD_HU`); MR: the non-zero region of the image (``CropForegroundd``); MR normalised
    already (``zero_background`` false): none (``Identityd``, as la2018), as no threshold tells the body there."""
    if modality == "CT":
        ids = {
            "body_threshold": BODY_THRESHOLD_HU,
            "foreground_crop": {
                "_target_": "cpcl_bundle.transforms.BodyCropd",
                "keys": ["image", "label"],
                "source_key": "image",
                "threshold": "@body_threshold",
            },
        }
        return Choice("crop", ids, f"CT: crop to the body, voxels above {BODY_THRESHOLD_HU:g} HU (BodyCropd)")
    if not zero_background:
        ids = {"foreground_crop": {"_target_": "Identityd", "keys": ["image", "label"], "allow_missing_keys": True}}
        return Choice("crop", ids, "MR, normalised already: no label-free crop (0 does not mark the background)")
    ids = {
        "foreground_crop": {
            "_target_": "CropForegroundd",
            "keys": ["image", "label"],
            "source_key": "image",
            "allow_missing_keys": True,
        }
    }
    return Choice("crop", ids, "MR: crop to the image's non-zero region (CropForegroundd on the image)")


def classes_choice(labels: Sequence[int], names: dict[int, str] | None = None) -> Choice:
    """``classes`` and ``label_mapping``: background (value 0) is class 0, every other value found is the next
    class, in increasing order; names from the datalist's ``labels`` when it has them, else ``label_<value>``."""
    names = names or {}
    values = [0] + sorted(int(v) for v in set(labels) if int(v) != 0)
    if len(values) < 2:
        raise PlanError("the labels hold no value but 0 (no foreground to learn)")
    classes = ["background"] + [names.get(v, f"label_{v}") for v in values[1:]]
    mapping = {str(v): i for i, v in enumerate(values)}
    why = f"label values {values} found: {len(classes)} classes, background (0) first"
    return Choice("classes", {"classes": classes, "label_mapping": mapping}, why)


def median_shape(fp: Fingerprint, pixdim: Sequence[float], modality: str, zero_background: bool = True) -> list[float]:
    """The median image size in voxels at ``pixdim``: of the whole image for CT (the body crop keeps most of the
    field of view) and for MR without a crop, of DataAnalyzer's crop to the voxels above 0 for MR (what
    ``CropForegroundd`` keeps)."""
    cropped = modality != "CT" and zero_background
    shapes = np.asarray(fp.cropped_shapes if cropped else fp.shapes, dtype=np.float64)
    return [float(v) for v in np.median(shapes * np.asarray(fp.spacings) / np.asarray(pixdim, dtype=float), axis=0)]


def _floor16(v: float) -> int:
    return max(MIN_EDGE, int(v // 16) * 16)


def patch_candidates(shape: Sequence[float], edges: Sequence[int] = PATCH_EDGES) -> list[tuple[int, int, int]]:
    """Patches of the volumes of ``edges``^3, shaped like ``shape`` (voxels), each side a multiple of 16 from 32,
    capped at ``shape`` (rounded down to 16; a side under 32 is 32, padded), distinct, by increasing volume. The
    first two sides are equal, shaped by the geometric mean of ``shape``'s first two: train.json's
    ``RandRotate90d`` turns patches in that plane, and a batch needs one shape."""
    plane = math.sqrt(float(shape[0]) * float(shape[1]))
    shape = [plane, plane, float(shape[2])]
    cap = [_floor16(v) for v in shape]
    found = []
    for edge in edges:
        scale = (edge**3 / float(np.prod(shape))) ** (1 / 3)
        size = tuple(min(c, max(MIN_EDGE, int(round(v * scale / 16)) * 16)) for v, c in zip(shape, cap))
        if size not in found:
            found.append(size)
    return sorted(found, key=lambda s: (int(np.prod(s)), s))


def choose_patch(
    candidates: Sequence[tuple[int, int, int]],
    measure: Callable[[tuple[int, int, int]], Probe],
    memory_gb: float,
    max_probes: int = 4,
) -> tuple[Probe, list[Probe]]:
    """(the largest candidate whose measured step fits ``memory_gb``, every probe). The two smallest are measured,
    then the largest candidate that a straight line through the measured (voxels, peak) predicts to fit, until
    ``max_probes``; a candidate measured over the budget removes it and every larger one."""
    candidates = list(candidates)
    probes: list[Probe] = []
    best: Probe | None = None
    for size in candidates[:2]:
        probe = measure(size)
        probes.append(probe)
        if probe.peak_gb > memory_gb:
            break
        best = probe
    if best is None:
        p = probes[0]
        raise PlanError(
            f"--memory_gb {memory_gb:g}: the smallest patch {_size(p.patch)} needs {p.peak_gb:.2f} GB for one"
            " training step (measured); give more memory or a coarser spacing"
        )
    if len(probes) < 2 or probes[-1] is not best:
        return best, probes
    limit = len(candidates)
    while len(probes) < max_probes:
        voxels = np.array([float(np.prod(p.patch)) for p in probes])
        peaks = np.array([p.peak_gb for p in probes])
        slope, intercept = np.polyfit(voxels, peaks, 1)
        index = candidates.index(best.patch)
        fits = [i for i in range(index + 1, limit) if intercept + slope * float(np.prod(candidates[i])) <= memory_gb]
        if not fits:
            break
        probe = measure(candidates[fits[-1]])
        probes.append(probe)
        if probe.peak_gb <= memory_gb:
            best = probe
        else:
            limit = fits[-1]
    return best, probes


def _size(size: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in size)


def probe_step(
    method: str = "cpcl",
    device: str = "cpu",
    features: Sequence[int] | None = None,
    log: Callable[[str], None] | None = print,
) -> Callable[[tuple[int, int, int]], Probe]:
    """A measure for :func:`choose_patch`: one training step of ``method`` at a patch, as
    ``scripts/bench_step.py one`` measures it (train.json's network, optimizer and loss; batch 2 labeled + 2
    unlabeled; train.json's ``amp``), 1 warm-up step then 1 timed one, in a process of its own so the peak memory
    (CPU: peak RSS; CUDA: peak allocated) is its own. ``features`` replaces the U-Net's channels: for tests only,
    the plan's choice must be measured with the real network. A process killed for memory, or one that reports
    running out of it, counts as not fitting (infinite peak)."""

    def measure(size: tuple[int, int, int]) -> Probe:
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_step.py"), "one", f"--variant={method}"]
        cmd += [f"--patch=[{','.join(str(int(v)) for v in size)}]", "--steps=1", "--warmup=1", f"--device={device}"]
        if features is not None:
            cmd.append(f"--features=[{','.join(str(int(f)) for f in features)}]")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        if proc.returncode != 0:
            if proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower():
                probe = Probe(tuple(size), math.inf, math.inf)
            else:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            probe = Probe(tuple(size), float(row["peak_gb"]), float(row["median_s"]))
        if log is not None:
            log(f"  probe {method} step at {_size(size)}: peak {probe.peak_gb:.2f} GB, {probe.step_s:.2f} s")
        return probe

    return measure


def labeled_choice(
    fp: Fingerprint, num_labeled: int | None = None, labeled_ratio: float | None = None, unlabeled_batch: int = 2
) -> Choice:
    """``num_labeled`` / ``labeled_ratio``: the user's, if given; else every training case keeps its label, and the
    unlabeled stream is the datalist's ``unlabeled`` images (with fewer than one batch of them, the labeled images
    without their labels join it: :func:`cpcl_bundle.data.unlabeled_data`)."""
    if num_labeled is not None:
        n = int(num_labeled)
        if not 1 <= n <= fp.num_training:
            raise PlanError(f"--num_labeled {n}: must be between 1 and the {fp.num_training} training cases")
        why = f"{n} of {fp.num_training} training cases labeled (--num_labeled), {fp.num_training - n} unlabeled"
        return Choice("labeled", {"labeled_ratio": None, "num_labeled": n}, why + f" + {fp.num_unlabeled} unlabeled")
    if labeled_ratio is not None:
        r = float(labeled_ratio)
        if not 0.0 < r <= 1.0:
            raise PlanError(f"--labeled_ratio {r:g}: must be in (0, 1]")
        n = max(1, math.floor(r * fp.num_training + 0.5))
        why = f"{n} of {fp.num_training} training cases labeled (--labeled_ratio {r:g}) + {fp.num_unlabeled} unlabeled"
        return Choice("labeled", {"labeled_ratio": r, "num_labeled": None}, why)
    stream = f"the {fp.num_unlabeled} 'unlabeled' images"
    if fp.num_unlabeled < unlabeled_batch:
        stream += f" (under one batch of {unlabeled_batch}: the labeled images without labels join it)"
    why = f"all {fp.num_training} training cases labeled; unlabeled stream: {stream}"
    return Choice("labeled", {"labeled_ratio": None, "num_labeled": None}, why)


def steps_choice(step_s: float, max_iterations: int | None = None) -> Choice:
    """The step budget: ``max_iterations`` if given, else the paper's :data:`PAPER_STEPS` whatever the data set's
    size (configs/presets/paper_protocol.json; the Left Atrium protocol's 6,000 is a smaller choice for 80 cases),
    with paper_protocol's epoch, validation, map and checkpoint cadence (shortened to the budget); the expected
    time is the steps times the measured step time (validation not counted)."""
    steps = int(max_iterations) if max_iterations is not None else PAPER_STEPS
    if steps < 1:
        raise PlanError(f"--max_iterations {steps}: must be at least 1")
    cadence = {k: (min(v, steps) if k != "val_interval" else v) for k, v in PAPER_CADENCE.items()}
    hours = steps * step_s / 3600
    source = "--max_iterations" if max_iterations is not None else "the paper's protocol (paper_protocol.json)"
    why = f"{steps} steps from {source}: about {hours:.1f} h here at {step_s:.2f} s a step (validation not counted)"
    return Choice("steps", {"max_iterations": steps, **cadence}, why)


def default_memory_gb(device: str) -> float:
    """The memory a plan may use when none is given: 90 % of the GPU's (CUDA), half of this machine's RAM (CPU)."""
    if device.startswith("cuda"):
        import torch

        return 0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
    return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def plan(
    fp: Fingerprint,
    measure: Callable[[tuple[int, int, int]], Probe],
    memory_gb: float,
    method: str = "cpcl",
    num_labeled: int | None = None,
    labeled_ratio: float | None = None,
    max_iterations: int | None = None,
    max_probes: int = 4,
) -> list[Choice]:
    """Every choice for ``fp``, in order: data, spacing, modality, intensity, crop, classes, patch, labeled, steps."""
    data = Choice(
        "data",
        {"dataset_dir": fp.dataset_dir, "generate_data": False, "in_channels": fp.channels, "method": method},
        f"{fp.num_training} training cases + {fp.num_unlabeled} unlabeled images, {fp.channels} channel(s);"
        f" method {method}",
    )
    spacing = target_spacing(fp.spacings)
    modality, modality_why = guess_modality(fp.body)
    zero_background, zero_why = zero_is_background(fp.body) if modality == "MR" else (True, "")
    if zero_why:
        modality_why += f"; {zero_why}"
    shape = median_shape(fp, spacing.ids["pixdim"], modality, zero_background)
    candidates = patch_candidates(shape)
    best, probes = choose_patch(candidates, measure, memory_gb, max_probes)
    measured = ", ".join(f"{_size(p.patch)} {p.peak_gb:.2f} GB" for p in probes)
    patch = Choice(
        "patch",
        {"patch_size": list(best.patch), "sw_roi_size": list(best.patch), "sw_overlap": 0.5},
        f"largest of {len(candidates)} candidates shaped like the median image {_fmt(shape, 0)} voxels whose"
        f" {method} step fits {memory_gb:.1f} GB (measured: {measured}); window = patch, half overlap",
    )
    return [
        data,
        spacing,
        Choice("modality", {}, f"{modality}: {modality_why}"),
        intensity_choice(modality, fp.foreground, fp.channels, zero_background),
        crop_choice(modality, zero_background),
        classes_choice(fp.labels, fp.label_names),
        patch,
        labeled_choice(fp, num_labeled, labeled_ratio),
        steps_choice(best.step_s, max_iterations),
    ]


def preset(choices: Sequence[Choice]) -> dict[str, Any]:
    """The override file of ``choices``: their ids, in order."""
    out: dict[str, Any] = {}
    for choice in choices:
        out.update(choice.ids)
    return out


def write_preset(content: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``content`` as 4-space pretty JSON (the configs' style) at ``path``, through a temporary name."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=4) + "\n")
    os.replace(tmp, target)
    return target
