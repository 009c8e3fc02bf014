# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Data-set presets (configs/presets/*.json): every preset merges into every config, and a model trained with
a preset is inferred with the same settings (network, classes, spacing, intensity, crop, window)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from cpcl_tools.benchmark import preset_files

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRESETS = sorted((CONFIGS / "presets").glob("*.json"))
TRAIN, INFER, EVALUATE, MULTI = (
    str(CONFIGS / f) for f in ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json")
)
#: The ids a trained model depends on, which training and inference must agree on.
MODEL_IDS = (
    "network_def",
    "in_channels",
    "out_channels",
    "classes",
    "pixdim",
    "hu_window",
    "body_threshold",
    "intensity",
    "foreground_crop",
    "sw_roi_size",
    "sw_overlap",
    "dataset_dir",
)


def _stack(preset):
    """The files a preset stands for, its bases first (``kits19`` = ``paper_protocol.json``, ``kits19.json``)."""
    return preset_files(CONFIGS, [preset])


def _parser(files, **override):
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(ROOT)
    for key, value in override.items():
        parser[key] = value
    return parser


def _raw(parser, key):
    """The id's content with references resolved, components as their config (not instantiated)."""
    value = parser.get_parsed_content(key, instantiate=False)
    return value.get_config() if hasattr(value, "get_config") else value


def test_the_four_presets_are_there():
    assert {p.stem for p in PRESETS} >= {"kits19", "brats2019", "la2018", "paper_protocol"}
    assert not (CONFIGS / "paper_protocol.json").exists()  # moved to presets/ (documented in the changelog)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_sets_only_known_ids(preset):
    known = set()
    for f in (TRAIN, INFER, EVALUATE):
        known |= set(json.loads(Path(f).read_text()))
    unknown = set(json.loads(preset.read_text())) - known
    assert not unknown, f"{preset.name} sets ids no config has (a typo?): {sorted(unknown)}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_training_and_inference_agree_on_the_model_ids(preset):
    stack = _stack(preset)
    train = _parser([TRAIN, *stack])
    evaluate = _parser([TRAIN, EVALUATE, *stack])
    multi = _parser([TRAIN, MULTI, *stack])
    infer = _parser([INFER, *stack])
    for key in MODEL_IDS:
        expected = _raw(train, key)
        assert _raw(infer, key) == expected, f"{preset.name}: '{key}' differs between training and inference"
        assert _raw(evaluate, key) == expected, f"{preset.name}: '{key}' differs in evaluation"
        assert _raw(multi, key) == expected, f"{preset.name}: '{key}' differs in multi-GPU training"
    classes = train.get_parsed_content("classes")
    assert classes[0] == "background" and train.get_parsed_content("out_channels") == len(classes)
    mapped = set(train.get_parsed_content("label_mapping").values())
    assert mapped == set(range(len(classes))), f"{preset.name}: label_mapping must reach every class"
    net = _parser([INFER, *stack]).get_parsed_content("network_def")
    assert net.final_conv.out_channels == len(classes)


def _no_numbers(node, where):
    """Every number in a transform list must come from a top-level id (no magic numbers)."""
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return
    if isinstance(node, (int, float)):
        raise AssertionError(f"a literal number {node} in {where}: make it a top-level id")
    items = node.values() if isinstance(node, dict) else node
    for item in items:
        _no_numbers(item, where)


def test_no_modality_literals_in_the_transform_lists():
    train, infer = json.loads(Path(TRAIN).read_text()), json.loads(Path(INFER).read_text())
    _no_numbers(train["train"]["deterministic_transforms"], "train.json train#deterministic_transforms")
    _no_numbers(infer["preprocessing"]["transforms"], "inference.json preprocessing")
    assert "-500" not in Path(TRAIN).read_text().replace('"body_threshold": -500', "")
    assert "-500" not in Path(INFER).read_text().replace('"body_threshold": -500', "")


def _volume(kind: str, rng: np.random.Generator):
    """A small volume of the preset's modality and a label: CT in HU in air, MRI with a zero background,
    pre-normalised (z-scored) MRI."""
    shape = (40, 36, 20)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = zz**2 + yy**2 + (xx * 0.9) ** 2 < 0.35
    organ = (zz - 0.2) ** 2 + (yy + 0.1) ** 2 + xx**2 < 0.08
    noise = rng.normal(size=shape)
    if kind == "ct":
        image = np.where(body, 40.0 + 15 * noise, -1000.0) + 140.0 * organ
    elif kind == "mri":
        image = np.where(body, 300.0 + 40 * noise + 250.0 * organ, 0.0)
    else:
        image = 0.3 * noise + 2.0 * organ
    label = organ.astype(np.uint8)
    return image.astype(np.float32), label


KIND = {
    "kits19": "ct",
    "kits19_tumour": "ct",
    "paper_protocol": "ct",
    "brats2019": "mri",
    "brats2019_subregions": "mri",
    "la2018": "prenormalised",
}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_inference_sees_the_image_training_sees(preset, tmp_path):
    """The deterministic part of training's preprocessing and inference's preprocessing turn the same file
    into the same tensor, in the same geometry; and the intensity is what the modality needs."""
    image, label = _volume(KIND.get(preset.stem, "ct"), np.random.default_rng(0))
    affine = np.diag([-1.6, -1.5, 2.5, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    coarse = {"pixdim": [2.0, 2.0, 2.0]}
    train = _parser([TRAIN, *_stack(preset)], **coarse).get_parsed_content("validate#preprocessing")
    infer = _parser([INFER, *_stack(preset)], **coarse).get_parsed_content("preprocessing")
    seen_in_training = train({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
    seen_in_inference = infer({"image": str(tmp_path / "img.nii.gz")})
    a, b = seen_in_training["image"], seen_in_inference["image"]
    assert a.shape == b.shape and torch.allclose(a, b)
    assert torch.allclose(a.affine, b.affine)
    assert seen_in_training["label"].shape == a.shape
    kind = KIND.get(preset.stem, "ct")
    if kind == "ct":  # HU window to [0, 1], body crop: the air around the body is gone
        assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
        full = [round(n * s / 2.0) for n, s in zip(image.shape, (1.6, 1.5, 2.5))]  # the grid before the crop
        assert all(c < f for c, f in zip(a.shape[1:], full)), (a.shape, full)
    elif kind == "mri":  # z-score over the non-zero region, cropped to it
        full = [round(n * s / 2.0) for n, s in zip(image.shape, (1.6, 1.5, 2.5))]
        assert all(c < f for c, f in zip(a.shape[1:], full)), (a.shape, full)
        inside = a[a != 0]
        assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    else:  # pre-normalised: nothing rescaled (the values stay those of the file)
        assert abs(float(a.mean()) - float(image.mean())) < 0.05  # not z-scored again: the atrium is bright
        assert float(a.max()) > 1.5 and float(a.min()) < -0.5  # not squashed into [0, 1]


@pytest.mark.parametrize("method, schedule", [("cpcl", "poly"), ("mt", "poly"), ("uamt", "step"), ("dtml", "step")])
def test_la2018_preset_follows_the_references_protocol(method, schedule):
    """The Left Atrium code bases (UA-MT, CPCL's released code, DTML): V-Net dropout (Dropout3d 0.5 on the
    bottleneck and the last decoder stage), the EMA warm-up, and UA-MT's and DTML's step learning rate."""
    parser = _parser([TRAIN, CONFIGS / "presets" / "la2018.json"], method=method)
    assert parser.get_parsed_content("dropout") == 0.5 and parser.get_parsed_content("dropout_kind") == "channel"
    assert parser.get_parsed_content("dropout_layers") == ["bottleneck", "decoder_full"]
    assert parser.get_parsed_content("ema_warmup") is True
    assert {k: parser[f"train#trainer#{k}"] for k in ("ema_warmup", "dropout", "dropout_layers", "dropout_kind")} == {
        "ema_warmup": "@ema_warmup",
        "dropout": "@dropout",
        "dropout_layers": "@dropout_layers",
        "dropout_kind": "@dropout_kind",
    }
    assert parser["lr_scheduler#kind"] == "@lr_schedule"
    assert parser.get_parsed_content("lr_schedule") == schedule
    default = _parser([TRAIN], method=method)
    assert default.get_parsed_content("dropout") == 0.0 and default.get_parsed_content("ema_warmup") is False
    assert default.get_parsed_content("lr_schedule") == "poly"


#: configs/presets/kits19.json and brats2019.json as they were before they stacked on paper_protocol.json (each
#: repeated its block): a run with the stack must end up with exactly the settings these single files gave.
FORMER = {
    "kits19": {
        "dataset_dir": "$@bundle_root + '/data/kits19'",
        "generate_data": False,
        "classes": ["background", "kidney"],
        "label_mapping": {"0": 0, "1": 1, "2": 1},
        "pixdim": [1.0, 1.0, 1.0],
        "hu_window": [-75, 175],
        "body_threshold": -500,
        "labeled_sampling": "uniform",
        "patch_size": [96, 96, 96],
        "sw_roi_size": [96, 96, 96],
        "labeled_ratio": 0.1,
        "num_labeled": None,
        "max_iterations": 20000,
        "iterations_per_epoch": 200,
        "val_interval": 5,
        "map_interval": 1000,
        "checkpoint_interval": 500,
    },
    "brats2019": {
        "dataset_dir": "$@bundle_root + '/data/brats2019'",
        "generate_data": False,
        "classes": ["background", "whole_tumour"],
        "label_mapping": {"0": 0, "1": 1, "2": 1, "4": 1},
        "pixdim": [1.0, 1.0, 1.0],
        "foreground_crop": {
            "_target_": "CropForegroundd",
            "keys": ["image", "label"],
            "source_key": "image",
            "allow_missing_keys": True,
        },
        "intensity": {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True},
        "labeled_sampling": "uniform",
        "patch_size": [96, 96, 96],
        "sw_roi_size": [96, 96, 96],
        "labeled_ratio": 0.1,
        "num_labeled": None,
        "max_iterations": 20000,
        "iterations_per_epoch": 200,
        "val_interval": 5,
        "map_interval": 1000,
        "checkpoint_interval": 500,
    },
}
#: How each stack was written before: the former file, then (for the multi-class variants) the variant's file.
FORMER_STACKS = {
    "kits19": ["kits19"],
    "brats2019": ["brats2019"],
    "kits19_tumour": ["kits19", "kits19_tumour"],
    "brats2019_subregions": ["brats2019", "brats2019_subregions"],
}


def test_preset_names_stand_for_their_stack():
    def names(*presets):
        return [Path(f).name for f in preset_files(CONFIGS, presets)]

    assert names("kits19") == ["paper_protocol.json", "kits19.json"]
    assert names("brats2019") == ["paper_protocol.json", "brats2019.json"]
    assert names("kits19", "kits19_tumour") == ["paper_protocol.json", "kits19.json", "kits19_tumour.json"]
    assert names("brats2019_subregions") == ["paper_protocol.json", "brats2019.json", "brats2019_subregions.json"]
    assert names(str(CONFIGS / "presets" / "kits19.json")) == ["paper_protocol.json", "kits19.json"]
    assert names("la2018") == ["la2018.json"] and names("paper_protocol") == ["paper_protocol.json"]
    with pytest.raises(FileNotFoundError):
        preset_files(CONFIGS, ["kits2019"])


@pytest.mark.parametrize("base", ["train", "evaluate", "multi_gpu", "inference"])
@pytest.mark.parametrize("preset", sorted(FORMER_STACKS))
def test_stacked_presets_give_the_settings_of_the_former_single_files(preset, base, tmp_path):
    """train.json + paper_protocol.json + kits19.json merges to the very config train.json + the former kits19.json
    did (every id, every value), and likewise for evaluation, multi-GPU training and inference."""
    configs = {"train": [TRAIN], "evaluate": [TRAIN, EVALUATE], "multi_gpu": [TRAIN, MULTI], "inference": [INFER]}
    former = []
    for name in FORMER_STACKS[preset]:
        path = CONFIGS / "presets" / f"{name}.json"
        if name in FORMER:
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(FORMER[name]))
        former.append(str(path))
    old, new = _parser([*configs[base], *former]), _parser([*configs[base], *_stack(preset)])
    assert new.get() == old.get()
    for key in ("pixdim", "patch_size", "max_iterations", "labeled_sampling", "classes", "label_mapping"):
        if key in old:
            assert _raw(new, key) == _raw(old, key), key
