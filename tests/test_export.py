# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""`python -m monai.bundle ckpt_export` (the zoo's verify_torchscript step): BasicUNet scripts, the TorchScript
loads, and it gives the state dict's outputs, and the same saved labels through configs/inference.json."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from cpcl_bundle import __version__
from cpcl_bundle.synthetic import generate_case

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
ROOT = Path(__file__).resolve().parents[1]
EXPORT = [
    sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def", "--filepath", "models/model.ts",
    "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
]  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The bundle's configs and package, with random weights (a plain state dict of network_def) as models/model.pt."""
    root = tmp_path_factory.mktemp("export") / "bundle"
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copytree(ROOT / "cpcl_bundle", root / "cpcl_bundle", ignore=shutil.ignore_patterns("__pycache__"))
    torch.manual_seed(0)
    net = network_def(root)
    (root / "models").mkdir()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def network_def(root: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


@pytest.fixture(scope="module")
def exported(bundle):
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(bundle))  # the configs import cpcl_bundle
    proc = subprocess.run(EXPORT, capture_output=True, text=True, cwd=bundle, env=env, timeout=300)
    print(f"ckpt_export (torch.jit.script): {time.time() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return bundle / "models" / "model.ts"


def test_ckpt_export_writes_a_loadable_torchscript_with_the_bundle_files(bundle, exported):
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(exported), map_location="cpu", _extra_files=extra)
    assert isinstance(ts, torch.jit.ScriptModule)
    assert json.loads(extra["metadata.json"])["version"] == __version__
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert json.loads(extra["inference.json"])["network_def"] == config["network_def"]


def test_torchscript_outputs_equal_the_state_dict_outputs(bundle, exported):
    net = network_def(bundle)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    ts = torch.jit.load(str(exported), map_location="cpu")
    net.eval()
    ts.eval()
    x = torch.rand(1, 1, 32, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = net(x), ts(x)
    # the weights of models/model.pt, not a fresh initialisation (ckpt_export without ignite loads non-strictly)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _infer(bundle: Path, inputs: Path, output_dir: Path, **override) -> None:
    wf = ConfigWorkflow(
        workflow_type="infer", config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"), logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle), dataset_dir=str(inputs), output_dir=str(output_dir), sw_roi_size=[32, 32, 32],
        **override,
    )  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()


def test_inference_with_the_torchscript_gives_the_same_labels(bundle, exported, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # ConfigWorkflow.run() inserts the bundle root
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image, _, affine = generate_case(seed=7, scale=0.5)
    nib.save(nib.Nifti1Image(image, affine), inputs / "case.nii.gz")
    _infer(bundle, inputs, tmp_path / "state_dict")  # CheckpointLoader: <bundle>/models/model.pt
    _infer(bundle, inputs, tmp_path / "torchscript", network_def=f"$torch.jit.load('{exported}')", load_pretrain=False)
    a, b = nib.load(tmp_path / "state_dict" / "case_seg.nii.gz"), nib.load(tmp_path / "torchscript" / "case_seg.nii.gz")
    labels_a, labels_b = np.asarray(a.dataobj), np.asarray(b.dataobj)
    assert labels_a.shape == image.shape and np.array_equal(a.affine, b.affine)
    assert 0 < labels_a.mean() < 1, "random weights gave one class only: the comparison would be weak"
    assert np.array_equal(labels_a, labels_b)  # voxel for voxel
