# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The model zoo's smoke test of this bundle, as ``ci/unit_tests/runner.py`` runs it.

Copied to the zoo as ``ci/unit_tests/test_cpcl_kidney_ct_segmentation.py`` it finds the bundle in
``models/cpcl_kidney_ct_segmentation``; here, in the project's ``tests/``, the bundle is the repository root
(``CPCL_BUNDLE_ROOT`` overrides both). It builds a tiny phantom data set, then trains, evaluates and infers
through MONAI's ``ConfigWorkflow`` with ``bundle_root`` overridden, as the zoo's tests of bundles with custom
code do, and checks the outputs. Plain ``unittest``, so that the zoo's runner needs nothing else.
"""

import json
import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow

BUNDLE = "cpcl_kidney_ct_segmentation"


def bundle_root() -> Path:
    if os.environ.get("CPCL_BUNDLE_ROOT"):
        return Path(os.environ["CPCL_BUNDLE_ROOT"]).resolve()
    here = Path(__file__).resolve().parent
    zoo = here.parents[1] / "models" / BUNDLE  # <zoo>/ci/unit_tests/this file
    return zoo if zoo.is_dir() else here.parent


ROOT = bundle_root()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the configs import the bundle's package

TINY = {"patch_size": [32, 32, 32], "sw_roi_size": [32, 32, 32], "cache_workers": 1}


def workflow(kind: str, configs: list[str], **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        workflow_type=kind,
        config_file=[str(ROOT / "configs" / c) for c in configs],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        bundle_root=str(ROOT),
        **override,
    )


class TestCPCLKidneyCTSegmentation(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from cpcl_bundle.synthetic import generate_dataset

        cls.tmp = Path(tempfile.mkdtemp())
        cls.data = cls.tmp / "data"
        generate_dataset(cls.data, num_training=4, num_validation=1, num_test=1, seed=3, workers=1, scale=0.5)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_train_evaluate_infer(self):
        models, out = self.tmp / "models", self.tmp / "eval"
        common = {"dataset_dir": str(self.data), "ckpt_dir": str(models), **TINY}
        train = workflow("train", ["train.json"], output_dir=str(out), max_iterations=2, val_interval=1, **common)
        train.initialize()
        self.assertEqual(train.check_properties(), [])
        train.run()
        train.finalize()
        self.assertTrue((models / "model.pt").is_file())

        evaluate = workflow("train", ["train.json", "evaluate.json"], output_dir=str(self.tmp / "test"), **common)
        evaluate.initialize()
        evaluate.run()
        evaluate.finalize()
        summary = json.loads((self.tmp / "test" / "metrics_summary.json").read_text())
        self.assertEqual(summary["num_cases"], 1)
        self.assertTrue(0.0 <= summary["dice"]["mean"] <= 1.0)

        test_image = json.loads((self.data / "dataset.json").read_text())["test"][0]["image"]
        infer = workflow(
            "infer",
            ["inference.json"],
            dataset_dir=str(self.data / test_image),
            output_dir=str(self.tmp / "pred"),
            sw_roi_size=TINY["sw_roi_size"],
            **{"checkpointloader#load_path": str(models / "model.pt")},
        )
        infer.initialize()
        self.assertEqual(infer.check_properties(), [])
        infer.run()
        infer.finalize()
        source = nib.load(self.data / test_image)
        pred = nib.load(next((self.tmp / "pred").rglob("*_seg.nii.gz")))
        self.assertEqual(pred.shape, source.shape)
        self.assertTrue(np.allclose(pred.affine, source.affine, atol=1e-4))
        self.assertTrue(set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1})


if __name__ == "__main__":
    unittest.main()
