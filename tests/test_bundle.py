# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The bundle as the zoo and MONAI check it, and end to end on a tiny generated data set."""

import importlib.metadata
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out
from monai.inferers.utils import _get_scan_interval
from monai.transforms import LoadImaged, Spacingd

from cpcl_bundle.methods import METHODS
from cpcl_bundle.transforms import RobustSpacingd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")
TRAIN, INFER, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "inference.json", "evaluate.json"))
TINY = {  # a few seconds per run on 2 CPU cores
    "patch_size": [32, 32, 32],
    "sw_roi_size": [32, 32, 32],
    "cache_workers": 1,
}


def test_verify_metadata_offline(tmp_path):
    schema = tmp_path / "schema.json"
    # the newest schema the zoo uses (required_packages_version), present: never downloaded
    shutil.copy(ROOT / "tests" / "data" / "meta_schema_20240725.json", schema)
    assert json.loads(Path(META).read_text())["schema"].endswith("/meta_schema_20240725.json")
    verify_metadata(meta_file=META, filepath=str(schema))


def test_metadata_is_one_file_and_names_installed_versions():
    assert (ROOT / "metadata.json").resolve() == Path(META).resolve()
    meta = json.loads(Path(META).read_text())
    assert meta["version"] in meta["changelog"]
    import cpcl_bundle

    assert meta["version"] == cpcl_bundle.__version__
    assert meta["monai_version"] == importlib.metadata.version("monai")
    assert meta["pytorch_version"] == importlib.metadata.version("torch").split("+")[0]
    assert meta["numpy_version"] == importlib.metadata.version("numpy")
    assert "optional_packages_version" not in meta  # deprecated in MONAI 1.6; the 20240725 schema wants this:
    for name, version in meta["required_packages_version"].items():
        assert importlib.metadata.version(name) == version, name
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {"0": "background", "1": "kidney"}


def test_verify_net_in_out():
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=INFER, n=1, device="cpu")


def test_sliding_window_stride_is_exactly_64():
    parser = ConfigParser()
    parser.read_config(INFER)
    roi, overlap = parser.get_parsed_content("sw_roi_size"), parser.get_parsed_content("sw_overlap")
    assert roi == [96, 96, 96]
    assert _get_scan_interval((200, 200, 200), roi, 3, (overlap,) * 3) == (64, 64, 64)


def test_robust_spacingd_tolerates_monai_label_image_path(tmp_path):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 4).astype(np.float32), np.diag([1.0, 1.0, 3.0, 1.0])), path)
    data = LoadImaged("image", ensure_channel_first=True)({"image": str(path)})
    data["image_path"] = str(path)  # what MONAI Label adds
    with pytest.raises(AttributeError):  # the clash this transform exists for
        Spacingd("image", pixdim=(2.0, 2.0, 2.0))(dict(data))
    out = RobustSpacingd("image", pixdim=(2.0, 2.0, 2.0))(dict(data))
    assert out["image_path"] == str(path) and tuple(out["image"].shape) == (1, 4, 4, 6)
    expected = Spacingd("image", pixdim=(2.0, 2.0, 2.0))({"image": data["image"]})["image"]
    assert torch.equal(out["image"], expected)


def _workflow(workflow_type, config_file, **override):
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=config_file,
        meta_file=META,
        logging_file=LOGGING,
        bundle_root=str(ROOT),
        **override,
    )


def test_check_properties_are_empty(tiny_dataset, tmp_path):
    train = _workflow("train", TRAIN, dataset_dir=str(tiny_dataset), output_dir=str(tmp_path), **TINY)
    train.initialize()
    assert train.check_properties() == []
    infer = _workflow("infer", INFER, dataset_dir=str(tiny_dataset), output_dir=str(tmp_path), load_pretrain=False)
    infer.initialize()
    assert infer.check_properties() == []


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """`python -m monai.bundle run training` exactly as a user types it, with tiny overrides."""
    out = tmp_path_factory.mktemp("run")
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
        str(out),
        "--ckpt_dir",
        str(out / "models"),
        "--max_iterations",
        "2",
        "--patch_size",
        "[32,32,32]",
        "--sw_roi_size",
        "[32,32,32]",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_training_writes_a_plain_state_dict(trained):
    out, log = trained
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    parser = ConfigParser()
    parser.read_config(INFER)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state, strict=True)
    split = json.loads((out / "split.json").read_text())
    assert split["num_labeled"] == 1 and split["num_unlabeled"] == 5  # 10 % of 6 training cases, at least 1
    assert list(out.glob("events.out.tfevents.*"))
    assert "Engine run finished" in log


def test_max_epochs_override_is_honoured(tiny_dataset, tmp_path):
    """MONAI Label sets train#trainer#max_epochs; it must bound the run like max_iterations does."""
    wf = _workflow(
        "train",
        TRAIN,
        dataset_dir=str(tiny_dataset),
        output_dir=str(tmp_path),
        ckpt_dir=str(tmp_path / "models"),
        iterations_per_epoch=2,
        max_iterations=1000,
        **{"train#trainer#max_epochs": 1, "val_interval": 1},
        **TINY,
    )
    wf.initialize()
    wf.run()
    trainer = wf.train_trainer if hasattr(wf, "train_trainer") else wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 and trainer.state.epoch == 1
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "model_best.pt").is_file()
    wf.finalize()


def test_inference_writes_labels_in_the_input_geometry(trained, tiny_dataset, tmp_path):
    out, _ = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    test_image = json.loads((tiny_dataset / "dataset.json").read_text())["test"][0]["image"]
    shutil.copy(tiny_dataset / test_image, inputs / "case_a.nii.gz")
    # an unusual one: LPS orientation, odd spacing, smaller than the 96^3 window
    small = nib.load(tiny_dataset / test_image)
    arr = np.asarray(small.dataobj)[::-6, ::6, :12]
    affine = small.affine @ np.diag([-6.0, 6.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(arr, affine), inputs / "case_b.nii.gz")
    wf = _workflow(
        "infer",
        INFER,
        dataset_dir=str(inputs),
        output_dir=str(tmp_path / "pred"),
        **{"checkpointloader#load_path": str(out / "models" / "model.pt")},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    for name in ("case_a", "case_b"):
        src, pred = nib.load(inputs / f"{name}.nii.gz"), nib.load(tmp_path / "pred" / f"{name}_seg.nii.gz")
        assert pred.shape == src.shape
        assert np.allclose(pred.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_evaluation_writes_all_four_metrics(trained, tiny_dataset):
    out, _ = trained
    wf = _workflow(
        "train",
        [TRAIN, EVALUATE],
        dataset_dir=str(tiny_dataset),
        output_dir=str(out),
        ckpt_dir=str(out / "models"),
        **TINY,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "case,dice,jaccard,hd95_mm,asd_mm" and len(lines) == 3
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["num_cases"] == 2
    for metric in ("dice", "jaccard", "hd95_mm", "asd_mm"):
        assert set(summary[metric]) == {"mean", "std", "num_undefined"}
    assert 0.0 <= summary["dice"]["mean"] <= 1.0
    # the predictions are kept, in the reference label's grid and affine
    for item in json.loads((tiny_dataset / "dataset.json").read_text())["test"]:
        reference = nib.load(str(tiny_dataset / item["label"]))
        pred = nib.load(str(out / "predictions" / Path(item["image"]).name.replace(".nii.gz", "_seg.nii.gz")))
        assert pred.shape == reference.shape and np.allclose(pred.affine, reference.affine, atol=1e-4)


def test_paper_protocol_preset_overrides_the_cpu_demo():
    """configs/presets/paper_protocol.json merged after train.json gives the paper's protocol (96^3 crops at
    1 mm, uniformly sampled, 20,000 steps, poly decay over all of them) and touches nothing else."""
    preset_file = CONFIGS / "presets" / "paper_protocol.json"
    parser = ConfigParser()
    parser.read_config([TRAIN, str(preset_file)])
    parser["bundle_root"] = str(ROOT)
    assert parser.get_parsed_content("patch_size") == [96, 96, 96]
    assert parser.get_parsed_content("pixdim") == [1.0, 1.0, 1.0]
    assert parser.get_parsed_content("lr_scheduler#total_steps") == 20000
    max_epochs = parser.get_parsed_content("train#trainer#max_epochs")
    assert max_epochs * parser.get_parsed_content("epoch_length") == 20000
    crops = parser.get_parsed_content("train#labeled_crop")
    assert [type(t).__name__ for t in crops] == ["SpatialPadd", "RandSpatialCropd"]  # the paper's uniform crops
    assert list(crops[1].cropper.roi_size) == [96, 96, 96]
    assert parser.get_parsed_content("sw_roi_size") == [96, 96, 96]
    demo = ConfigParser()
    demo.read_config(TRAIN)
    preset = json.loads(preset_file.read_text())
    assert set(preset) <= set(demo.config)  # only top-level ids that train.json has
    assert all(demo[k] != v for k, v in preset.items())
    default_crops = ConfigParser()
    default_crops.read_config(TRAIN)
    default_crops["bundle_root"] = str(ROOT)
    names = [type(t).__name__ for t in default_crops.get_parsed_content("train#labeled_crop")]
    assert names == ["CropForegroundd", "SpatialPadd", "RandCropByPosNegLabeld"]  # the demo's kidney-ROI crops


def _one_step(dataset: Path, tmp_path: Path, method: str, **ids):
    """One training step of ``method`` through train.json (tiny settings, final checkpoint in tmp_path/models);
    returns the finished workflow's trainer and evaluator."""
    settings = dict(iterations_per_epoch=1, max_iterations=1, val_interval=1, map_interval=1, **TINY)
    wf = _workflow(
        "train",
        TRAIN,
        dataset_dir=str(dataset),
        output_dir=str(tmp_path),
        ckpt_dir=str(tmp_path / "models"),
        method=method,
        labeled_ratio=0.34,  # 2 labeled cases: the released code pairs labeled and unlabeled images one to one
        **{**settings, **ids},
    )
    wf.initialize()
    wf.run()
    trainer, evaluator = (wf.parser.get_parsed_content(k) for k in ("train#trainer", "validate#evaluator"))
    assert trainer.state.iteration == 1 and trainer.method.name == method
    wf.finalize()
    return trainer, evaluator


def _checkpoint_network(tmp_path: Path, **ids) -> torch.nn.Module:
    """inference.json's ``network_def`` (with ``ids``) holding tmp_path/models/model.pt, loaded strictly."""
    parser = ConfigParser()
    parser.read_config(INFER)
    for key, value in ids.items():
        parser[key] = value
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True))
    return network


@pytest.mark.parametrize("method", ["uamt", "entropy_min", "ict", "dan", "dtml", "cpcl_released"])
def test_every_baseline_trains_through_the_bundle_config_into_a_plain_network(method, tiny_dataset, tmp_path):
    """``--method <name>`` with train.json as it ships: a step with validation and the final checkpoint, which
    loads strictly into inference.json's ``network_def`` (no dropout hook, discriminator or second network
    leaks into what export and MONAI Label load)."""
    from cpcl_bundle.trainer import loss_terms

    trainer, _ = _one_step(tiny_dataset, tmp_path, method)
    assert {f"loss_{t}" for t in trainer.method.terms} <= set(loss_terms(trainer.state.output))
    _checkpoint_network(tmp_path)


THREE_CLASSES = ["background", "kidney", "tumour"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_three_classes(method, tiny_three_class_dataset, tmp_path):
    """``--classes "['background','kidney','tumour']"`` on phantoms with the tumour as label 2: every method takes
    a step (two of them with validation on three classes), and the checkpoint is a three-channel network that
    loads into inference.json's ``network_def`` with the same classes."""
    validate = method in ("cpcl", "supervised")  # validation (the same code for every method) for two of them
    trainer, evaluator = _one_step(
        tiny_three_class_dataset, tmp_path, method, classes=THREE_CLASSES, val_interval=1 if validate else 2
    )
    assert math.isfinite(trainer.state.metrics["train_mean_dice"])
    if validate:
        assert math.isfinite(evaluator.state.metrics["val_mean_dice"])  # Dice over the two foreground classes
    network = _checkpoint_network(tmp_path, classes=THREE_CLASSES)
    assert network(torch.zeros(1, 1, 32, 32, 32)).shape[1] == 3
