# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""scripts/pack_device.py: the LA cases stored as uint8 indices in JPEG-LS and back, exactly (near=0) or within one
intensity step (near=1), the carried folder's size cap, and the unpacked set prepared with the same split."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cpcl_tools.prepare import PrepareError
from tests.helpers import load_script

pack_device = load_script("pack_device")
SCRIPT = pack_device.__file__


def _cases(folder):
    cases = {}
    for path in sorted((folder / pack_device.FOLDER).glob(f"*/{pack_device.H5_NAME}")):
        with h5py.File(path) as f:
            cases[path.parent.name] = (np.asarray(f["image"]), np.asarray(f["label"]))
    return cases


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("la_like")
    pack_device.synthetic(str(folder), cases=6, shape=(24, 20, 16))
    return folder


@pytest.mark.parametrize("near", [0, 1])
def test_pack_then_unpack_gives_the_cases_back(raw, tmp_path, near, capsys):
    carry, dataset = tmp_path / "carry", tmp_path / "la2018"
    pack_device.pack(str(raw), folder=str(carry), near=near, wheels=False, holdout=2, seed=3)
    printed = capsys.readouterr().out
    assert f"packed 6 cases (near={near}" in printed and "MiB (la2018" in printed
    info = json.loads((carry / "la2018" / "cases.json").read_text())
    assert info["holdout"] == 2 and info["seed"] == 3 and info["near"] == near
    pack_device.unpack(str(carry), dataset_dir=str(dataset), raw_dir=str(tmp_path / "raw"))
    before, after = _cases(raw), _cases(tmp_path / "raw")
    assert before.keys() == after.keys() and len(before) == 6
    for case, (image, label) in before.items():
        image_back, label_back = after[case]
        assert image_back.dtype == np.float32 and np.array_equal(label_back, label)
        step = float(np.diff(np.unique(image)).min())
        error = np.abs(image_back.astype(np.float64) - image).max()
        if near == 0:
            assert error < 1e-3 * step  # the float32 rounding of z-scored values, nothing more
        else:
            assert error <= step * 1.0001 and error > 0  # lossy, by at most one step of the 8-bit grid
    datalist = json.loads((dataset / "dataset.json").read_text())
    assert len(datalist["validation"]) == 2 and len(datalist["training"]) == 4
    assert datalist["prepared_with"]["holdout"] == 2 and datalist["prepared_with"]["seed"] == 3


def test_values_off_an_8_bit_grid_are_refused_by_name():
    image = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)  # 1000 levels
    with pytest.raises(PrepareError, match="case7.h5: 1000 intensity values that are not one grid of at most 256"):
        pack_device.quantise(image, "case7.h5")
    indices, offset, step = pack_device.quantise(np.float32(-0.5) + np.float32(0.25) * np.arange(8.0).reshape(2, 2, 2))
    assert indices.dtype == np.uint8 and indices.ravel().tolist() == list(range(8))
    assert (offset, step) == (-0.5, 0.25)


def test_a_folder_over_the_cap_fails_naming_the_way_out(raw, tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "pack", "--source_dir", str(raw), "--folder", str(tmp_path / "c"), "--wheels", "false"]
        + ["--max_mib", "0.001"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'c'}: ") and "over the 0.001 MiB a device call carries" in last


def test_the_wheels_are_the_installed_pins():
    pins = pack_device._pinned()
    assert [p.split("==")[0] for p in pins] == list(pack_device.WHEELS)
    assert "monai==1.6.1" in pins and "pytorch-ignite==0.5.5" in pins and "nibabel==5.4.2" in pins
