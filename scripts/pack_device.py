# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Fill the git-ignored folder that ``scripts/device_check.sh`` carries to a GPU machine without internet, and
unpack it there.

    pip install -e ".[device]"                                                    # pyjpegls, here
    python scripts/pack_device.py pack --source_dir ../shared/data/la2018        # here: wheels + the 80 LA cases
    python scripts/pack_device.py unpack --dataset_dir /tmp/la2018                # there: h5 cases -> prepared set
    python scripts/pack_device.py synthetic --source_dir /tmp/la_tiny             # tiny LA-like cases (dry run)

``pack`` writes ``<folder>`` (default ``.device/``, ignored by git):

* ``wheels/``: the packages the bundle imports that the GPU image lacks (:data:`WHEELS`, the versions of
  ``pyproject.toml``), for its Python (3.12), installed there with ``pip install --no-index --no-deps``;
* ``la2018/<case>.npz`` and ``la2018/cases.json``: each case of the processed Left Atrium set. Every image of that
  set has at most 256 equally spaced intensity values (z-scoring of an 8-bit scan), so it is stored as their
  indices (uint8) with a per-case offset and step, the indices of each volume as one JPEG-LS image (its axial
  slices side by side). ``near=0`` is lossless; ``near=1`` (default) allows each index to be off by at most one
  step (JPEG-LS near-lossless), which is what makes the 80 cases fit: measured on them, lossless JPEG-LS takes
  74.6 MiB, the best of six lossless codecs tried, and near=1 44.2 MiB. Labels are kept exactly (bit-packed).

The folder's size is printed; over ``max_mib`` (60) the command fails, naming what to drop. ``unpack`` writes the
cases back in the layout users download (``2018LA_Seg_Training Set/<case>/mri_norm2.h5``) and runs
``scripts/prepare_la2018.py`` on them with the split of ``cases.json`` (20 held out, seed 0), so the GPU machine
trains on what this machine's benchmarks train on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpcl_tools.prepare import PrepareError, run_cli  # noqa: E402

H5_NAME = "mri_norm2.h5"
FOLDER = "2018LA_Seg_Training Set"
#: Imported by the bundle, not on the GPU image (the device tool's notes): carried as wheels. ``termcolor`` is
#: fire's one dependency; ``pyjpegls`` decodes the packed images.
WHEELS = ("monai", "pytorch-ignite", "nibabel", "fire", "termcolor", "pyjpegls")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _pinned(names: tuple[str, ...] = WHEELS) -> list[str]:
    """``name==version`` of each wheel: the installed version (pyproject.toml's pin, for the bundle's own
    dependencies)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in names]


def quantise(image: np.ndarray, where: str = "image") -> tuple[np.ndarray, float, float]:
    """``(indices uint8, offset, step)`` with ``image == offset + step * indices`` (to float32 rounding).

    Raises :class:`PrepareError` (naming ``where``) when the values do not lie on one grid of at most 256 steps.
    """
    values = np.unique(image)
    if values.size == 1:
        return np.zeros(image.shape, np.uint8), float(values[0]), 1.0
    span = float(values[-1]) - float(values[0])
    step = span / round(span / float(np.diff(values).min()))  # over the whole range: the float32 gaps are noisy
    indices = np.round((image.astype(np.float64) - values[0]) / step)
    error = float(np.abs(values[0] + step * indices - image).max())
    if indices.max() > 255 or error > 0.01 * step:
        raise PrepareError(
            f"{where}: {values.size} intensity values that are not one grid of at most 256 steps (step {step:.4g}, "
            f"{int(indices.max()) + 1} steps, off by up to {error:.3g}): cannot be stored as uint8"
        )
    return indices.astype(np.uint8), float(values[0]), step


def encode(indices: np.ndarray, near: int = 0) -> bytes:
    """A uint8 volume ``(X, Y, Z)`` as one JPEG-LS image ``(X, Z * Y)`` (its slices side by side)."""
    import jpeg_ls

    x, y, z = indices.shape
    mosaic = np.ascontiguousarray(indices.transpose(0, 2, 1).reshape(x, z * y))
    return bytes(jpeg_ls.encode(mosaic, lossy_error=int(near)))


def decode(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """The inverse of :func:`encode`."""
    import jpeg_ls

    x, y, z = shape
    mosaic = np.asarray(jpeg_ls.decode(np.frombuffer(data, np.uint8)))
    return np.ascontiguousarray(mosaic.reshape(x, z, y).transpose(0, 2, 1))


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _wheels(folder: Path, python_version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--implementation", "cp", "-d", str(folder)]
    command += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    proc = subprocess.run(command + _pinned(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise PrepareError(f"pip download into {folder} failed: {proc.stderr.strip().splitlines()[-1]}")


def pack(
    source_dir: str,
    folder: str = ".device",
    near: int = 1,
    wheels: bool = True,
    python_version: str = "3.12",
    holdout: int = 20,
    seed: int = 0,
    max_mib: float = 60.0,
) -> None:
    """Write ``folder``: ``wheels/`` (unless ``wheels`` is false) and ``la2018/`` from ``source_dir`` (the processed
    LA set: ``<case>/mri_norm2.h5``, or the folder above ``2018LA_Seg_Training Set``). Prints its size."""
    import h5py

    from cpcl_bundle.validation import as_bool

    source = Path(source_dir)
    if (source / FOLDER).is_dir():
        source = source / FOLDER
    cases = sorted(p.name for p in source.iterdir() if (p / H5_NAME).is_file()) if source.is_dir() else []
    if not cases:
        raise PrepareError(f"{source}: no case folders (<case id>/{H5_NAME}) in it")
    out = Path(folder)
    data = out / "la2018"
    data.mkdir(parents=True, exist_ok=True)
    for old in data.glob("*.npz"):
        old.unlink()
    start, worst = time.perf_counter(), 0.0
    for case in cases:
        with h5py.File(source / case / H5_NAME, "r") as f:
            image, label = np.asarray(f["image"]), np.asarray(f["label"])
        indices, offset, step = quantise(image, str(source / case / H5_NAME))
        encoded = encode(indices, near)
        worst = max(worst, float(np.abs(offset + step * decode(encoded, image.shape).astype(np.float64) - image).max()))
        np.savez_compressed(
            data / f"{case}.npz",
            image=np.frombuffer(encoded, np.uint8),
            label=np.packbits(label.astype(bool)),
            shape=np.asarray(image.shape),
            offset=np.float64(offset),
            step=np.float64(step),
        )
    info = {"cases": cases, "near": int(near), "holdout": int(holdout), "seed": int(seed), "max_error": worst}
    (data / "cases.json").write_text(json.dumps(info, indent=2))
    if as_bool(wheels, "wheels"):
        _wheels(out / "wheels", python_version)
    size = _size_mib(out)
    parts = ", ".join(f"{p.name} {_size_mib(p):.1f} MiB" for p in sorted(out.iterdir()) if p.is_dir())
    print(
        f"packed {len(cases)} cases (near={near}: each voxel off by at most {worst:.4g}, labels exact) in "
        f"{time.perf_counter() - start:.1f} s; {out}: {size:.1f} MiB ({parts})"
    )
    if size > float(max_mib):
        raise PrepareError(
            f"{out}: {size:.1f} MiB, over the {max_mib:g} MiB a device call carries: pack with a larger --near "
            "or fewer cases"
        )


def unpack(
    folder: str = ".device", dataset_dir: str = "/tmp/la2018", raw_dir: str | None = None, workers: int = 2
) -> None:
    """Write the packed cases as ``<raw_dir>/2018LA_Seg_Training Set/<case>/mri_norm2.h5`` and prepare them into
    ``dataset_dir`` with ``scripts/prepare_la2018.py`` (the held-out split of ``cases.json``)."""
    import h5py

    data = Path(folder) / "la2018"
    if not (data / "cases.json").is_file():
        raise PrepareError(f"{data / 'cases.json'}: file does not exist (run scripts/pack_device.py pack first)")
    info = json.loads((data / "cases.json").read_text())
    raw = Path(raw_dir or f"{dataset_dir}_raw") / FOLDER
    start = time.perf_counter()
    for case in info["cases"]:
        packed = np.load(data / f"{case}.npz")
        shape = tuple(int(v) for v in packed["shape"])
        image = float(packed["offset"]) + float(packed["step"]) * decode(packed["image"].tobytes(), shape)
        label = np.unpackbits(packed["label"], count=int(np.prod(shape))).reshape(shape)
        (raw / case).mkdir(parents=True, exist_ok=True)
        with h5py.File(raw / case / H5_NAME, "w") as f:
            f.create_dataset("image", data=image.astype(np.float32))
            f.create_dataset("label", data=label.astype(np.uint8))
    print(f"unpacked {len(info['cases'])} cases in {time.perf_counter() - start:.1f} s -> {raw}", flush=True)
    command = [sys.executable, os.path.join(ROOT, "scripts", "prepare_la2018.py"), "--source_dir", str(raw)]
    command += ["--dataset_dir", str(dataset_dir), "--allow_missing", "true"]
    command += ["--holdout", str(info["holdout"]), "--seed", str(info["seed"]), "--workers", str(int(workers))]
    if subprocess.run(command).returncode != 0:
        raise PrepareError(f"{raw}: scripts/prepare_la2018.py failed on the unpacked cases (see above)")


def synthetic(source_dir: str, cases: int = 24, shape: tuple[int, int, int] = (48, 40, 32), seed: int = 0) -> None:
    """Write ``cases`` small LA-like cases (the first ids of ``configs/splits/la2018/train.list``): an ellipsoid
    atrium in noise, z-scored from 8-bit values as the real set is, in its layout. For the device check's dry
    run, where the real cases are not at hand."""
    import h5py

    from cpcl_tools.prepare import shipped_split

    rng = np.random.default_rng(seed)
    out = Path(source_dir) / FOLDER
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    for case in shipped_split("la2018", "train.list")[: int(cases)]:
        centre = rng.uniform(-0.2, 0.2, 3)
        atrium = sum((g - c) ** 2 / r for g, c, r in zip(grid, centre, (0.2, 0.15, 0.25))) < 1
        scan = np.clip(np.round(60 + 80 * atrium + rng.normal(0, 20, shape)), 0, 255)
        image = ((scan - scan.mean()) / scan.std()).astype(np.float32)
        (out / case).mkdir(parents=True, exist_ok=True)
        with h5py.File(out / case / H5_NAME, "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=atrium.astype(np.uint8))
    print(f"{cases} synthetic LA-like cases of {tuple(shape)} -> {out}")


if __name__ == "__main__":
    run_cli({"pack": pack, "unpack": unpack, "synthetic": synthetic})
