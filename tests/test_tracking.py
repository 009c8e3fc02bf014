# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Experiment tracking: TensorBoard scalars and Fig. 6 images by default, MLflow with `--tracking mlflow`."""

import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_bundle import LOGGING, META, ROOT, TRAIN


@pytest.mark.slow
def test_tensorboard_and_mlflow_tracking(tiny_dataset, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        TRAIN,
        "--meta_file",
        META,
        "--logging_file",
        LOGGING,
        "--bundle_root",
        str(ROOT),
        "--dataset_dir",
        str(tiny_dataset),
        "--output_dir",
        str(tmp_path),
        "--ckpt_dir",
        str(tmp_path / "models"),
        "--max_iterations",
        "4",
        "--iterations_per_epoch",
        "2",
        "--val_interval",
        "1",
        "--map_interval",
        "2",
        "--patch_size",
        "[32,32,32]",
        "--sw_roi_size",
        "[32,32,32]",
        "--cache_workers",
        "1",
        "--tracking",
        "mlflow",
        "--experiment_name",
        "cpcl_test",
        "--run_name",
        "tiny",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "loss_sup", "loss_fpc", "loss_bpc", "lambda", "lr", "val_mean_dice"} <= scalars
    assert len(acc.Scalars("loss_bpc")) == 4 and len(acc.Scalars("val_mean_dice")) == 2
    images = set(acc.Tags()["images"])
    assert {"prototype_maps/x_u", "prototype_maps/p_u", "prototype_maps/y_l"} <= images
    assert len(list((tmp_path / "prototype_maps").glob("*.png"))) == 2

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("cpcl_test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert {"train_loss", "val_mean_dice", "train_mean_dice"} <= set(run.data.metrics)
    assert client.get_metric_history(run.info.run_id, "train_loss")[-1].step == 4
