# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""scripts/prepare_brats2019.py on a tiny copy of the raw BraTS 2019 layout, then the brats2019 preset end to end."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import TINY_FEATURES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCRIPT = ROOT / "scripts" / "prepare_brats2019.py"
META, LOGGING = str(CONFIGS / "metadata.json"), str(CONFIGS / "logging.conf")
TRAIN, INFER, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "inference.json", "evaluate.json"))
PRESET = str(CONFIGS / "presets" / "brats2019.json")
PAPER = str(CONFIGS / "presets" / "paper_protocol.json")  # brats2019 stacks on the paper's protocol
TINY = {  # seconds on 2 CPU cores: 32^3 windows at 2 mm, a narrow U-Net (tests/helpers.py TINY_FEATURES)
    "patch_size": [32, 32, 32],
    "sw_roi_size": [32, 32, 32],
    "cache_workers": 1,
    "pixdim": [2.0, 2.0, 2.0],
    "network_def#features": list(TINY_FEATURES),
}
#: 240 x 240 x 155 at 1 mm in the release.
SHAPE = (40, 40, 24)
RELEASE = "MICCAI_BraTS_2019_Data_Training"


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_brats2019", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = _load_script()
TRAIN_IDS, VAL_IDS, TEST_IDS = (prepare.shipped_split("brats2019", f) for f in ("train.txt", "val.txt", "test.txt"))
#: 4 training, 1 validation, 2 test cases, with ids of the shipped lists.
CASES = {"HGG": TRAIN_IDS[:3] + VAL_IDS[:1], "LGG": TRAIN_IDS[3:4] + TEST_IDS[:2]}


def brats_affine(shape=SHAPE) -> np.ndarray:
    """The release's convention: 1 mm, x and y reversed (LPS-like), origin at the far corner of y."""
    return np.array([[-1, 0, 0, 0], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)


def brats_case(seed: int, shape=SHAPE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({modality: int16 image with 0 around a positive brain}, seg uint8 with 0, 1, 2, 4)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*((np.arange(n) - (n - 1) / 2) for n in shape), indexing="ij")
    brain = (x / (0.42 * shape[0])) ** 2 + (y / (0.45 * shape[1])) ** 2 + (z / (0.45 * shape[2])) ** 2 <= 1
    c = rng.uniform(-3, 3, 3) + np.array([4.0, -3.0, 0.0])
    r = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    seg = np.zeros(shape, np.uint8)
    seg[(r <= 8) & brain] = 2  # oedema
    seg[r <= 5] = 4  # enhancing rim
    seg[r <= 3] = 1  # necrotic core
    images = {}
    for modality, tissue in (("flair", 400), ("t1", 300), ("t1ce", 350), ("t2", 500)):
        flair_like = {0: 0, 1: 500, 2: 900, 4: 700} if modality == "flair" else {0: 0, 1: 200, 2: 100, 4: 300}
        image = np.where(brain, tissue + rng.normal(0, 20, shape), 0.0)
        for value, extra in flair_like.items():
            image[seg == value] += extra
        images[modality] = np.where(brain, np.clip(np.round(image), 1, None), 0).astype(np.int16)
    return images, seg


def write_case(folder: Path, seed: int, shape=SHAPE, skip=()) -> None:
    """``<folder>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` as the release has them (``skip``: names left out)."""
    folder.mkdir(parents=True)
    images, seg = brats_case(seed, shape)
    for name, array in {**images, "seg": seg}.items():
        if name not in skip:
            nib.save(nib.Nifti1Image(array, brats_affine(shape)), folder / f"{folder.name}_{name}.nii.gz")


def write_raw(base: Path, cases=CASES, shape=SHAPE) -> Path:
    """``<base>/MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/<case>/...``; returns the release folder."""
    release = base / RELEASE
    for seed, (grade, case) in enumerate((g, c) for g, ids in cases.items() for c in ids):
        write_case(release / grade / case, seed, shape)
    return release


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_raw(tmp_path_factory.mktemp("brats_raw"))


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("brats_prepared")
    prepare.main(str(raw.parent), str(out), allow_missing=True, workers=1)  # the folder above the release
    return out


def test_prepared_layout_keeps_flair_values_and_geometry(raw, prepared):
    from cpcl_bundle.data import load_datalist

    content = json.loads((prepared / "dataset.json").read_text())
    assert content["name"] == "brats2019" and "Menze" in content["reference"] and "Bakas" in content["reference"]
    assert "SSL4MIS" in content["split_reference"]
    assert content["labels"]["4"] == "enhancing tumour" and set(content["labels"]) == {"0", "1", "2", "4"}
    assert content["label_ratios"] == [0.1, 0.3, 0.5]
    assert content["split"] == {"training": 4, "validation": 1, "test": 2}
    assert content["num_labeled"] == {"0.1": 1, "0.3": 1, "0.5": 2}
    assert content["grades"] == {"HGG": 4, "LGG": 3}
    names = {
        key: [Path(item["image"]).name[:-7] for item in content[key]] for key in ("training", "validation", "test")
    }
    assert names["training"] == [c for c in TRAIN_IDS if c in CASES["HGG"] + CASES["LGG"]]  # shipped list order
    assert names["validation"] == VAL_IDS[:1] and names["test"] == TEST_IDS[:2]
    lists = load_datalist(prepared / "dataset.json")
    grade = {case: g for g, ids in CASES.items() for case in ids}
    for key in ("training", "validation", "test"):
        for item in lists[key]:
            case = Path(item["image"]).name[:-7]
            source = raw / grade[case] / case
            image, flair = nib.load(item["image"]), nib.load(source / f"{case}_flair.nii.gz")
            assert image.get_data_dtype() == np.int16 and np.array_equal(image.affine, flair.affine)
            assert np.array_equal(np.asarray(image.dataobj), np.asarray(flair.dataobj))  # FLAIR, not T1/T1ce/T2
            label, seg = nib.load(item["label"]), nib.load(source / f"{case}_seg.nii.gz")
            assert label.get_data_dtype() == np.uint8 and np.array_equal(label.affine, seg.affine)
            assert np.array_equal(np.asarray(label.dataobj), np.asarray(seg.dataobj))
            assert set(np.unique(np.asarray(label.dataobj)).tolist()) == {0, 1, 2, 4}  # mapped by the preset


def test_all_cases_give_the_ssl4mis_250_25_60_split(tmp_path):
    """Every listed case present (tiny volumes): the three lists exactly as shipped, no --allow_missing."""
    release = tmp_path / "raw" / RELEASE
    for seed, case in enumerate(TRAIN_IDS + VAL_IDS + TEST_IDS):
        folder = release / ("HGG" if seed % 4 else "LGG") / case
        folder.mkdir(parents=True)
        image = np.zeros((4, 4, 4), np.int16)
        image[1:3, 1:3, 1:3] = 100
        seg = np.zeros((4, 4, 4), np.uint8)
        seg[2, 2, 2] = (1, 2, 4)[seed % 3]
        nib.save(nib.Nifti1Image(image, brats_affine((4, 4, 4))), folder / f"{case}_flair.nii.gz")
        nib.save(nib.Nifti1Image(seg, brats_affine((4, 4, 4))), folder / f"{case}_seg.nii.gz")
    prepare.main(str(release), str(tmp_path / "out"), workers=1)
    content = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert content["split"] == {"training": 250, "validation": 25, "test": 60}
    assert content["num_labeled"] == {"0.1": 25, "0.3": 75, "0.5": 125}
    assert [item["image"] for item in content["training"]] == [f"imagesTr/{c}.nii.gz" for c in TRAIN_IDS]
    assert [item["image"] for item in content["validation"]] == [f"imagesTr/{c}.nii.gz" for c in VAL_IDS]
    assert [item["label"] for item in content["test"]] == [f"labelsTs/{c}.nii.gz" for c in TEST_IDS]
    for item in content["training"] + content["validation"] + content["test"]:
        assert (tmp_path / "out" / item["image"]).is_file() and (tmp_path / "out" / item["label"]).is_file()


def test_missing_listed_case_is_an_error_unless_allowed(raw, tmp_path):
    with pytest.raises(prepare.PrepareError, match=re.escape(TRAIN_IDS[4])):  # the first train case not there
        prepare.main(str(raw), str(tmp_path / "out"), workers=1)
    with pytest.raises(prepare.PrepareError, match="no HGG or LGG folder"):
        prepare.main(str(raw / "HGG"), str(tmp_path / "out"), workers=1)


@pytest.mark.parametrize("skip, message", [("seg", "_seg.nii.gz (label)"), ("flair", "_flair.nii.gz (FLAIR image)")])
def test_case_folder_without_a_file_is_an_error_naming_it(tmp_path, skip, message):
    release = write_raw(tmp_path, cases={"HGG": TRAIN_IDS[:1], "LGG": [TEST_IDS[0]]}, shape=(8, 8, 6))
    (release / "LGG" / TEST_IDS[0] / f"{TEST_IDS[0]}_{skip}.nii.gz").unlink()
    folder = release / "LGG" / TEST_IDS[0]
    with pytest.raises(prepare.PrepareError, match=f"^{re.escape(str(folder))}: no .*{re.escape(message)}"):
        prepare.main(str(release), str(tmp_path / "out"), allow_missing=True, workers=1)


def test_undefined_label_value_is_an_error_naming_the_file(tmp_path):
    release = write_raw(tmp_path, cases={"HGG": TRAIN_IDS[:2]}, shape=(8, 8, 6))
    seg = release / "HGG" / TRAIN_IDS[1] / f"{TRAIN_IDS[1]}_seg.nii.gz"
    label = np.asarray(nib.load(seg).dataobj).copy()
    label[label == 4] = 3  # the value BraTS left out
    nib.save(nib.Nifti1Image(label, brats_affine((8, 8, 6))), seg)
    with pytest.raises(prepare.PrepareError, match=rf"^{re.escape(str(seg))}: label values \[3\]"):
        prepare.main(str(release), str(tmp_path / "out"), allow_missing=True, workers=1)


class Launched:
    """A command started in the background, its output going to files (no pipe to fill up)."""

    def __init__(self, cmd: list[str], folder: Path, name: str) -> None:
        self.stdout, self.stderr = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)

    def result(self, timeout: float = 600) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        return code, self.stdout.read_text(), self.stderr.read_text()


@pytest.fixture(scope="module")
def launched(prepared, tmp_path_factory):
    """Both commands of this module started at once, as a user types them (each spends seconds importing torch
    and MONAI): `python -m monai.bundle run training` with the brats2019 preset and tiny overrides, and the
    script on a copy of the release with a case folder without its FLAIR image."""
    base = tmp_path_factory.mktemp("brats_cli")
    release = write_raw(base, cases={"HGG": TRAIN_IDS[:2], "LGG": VAL_IDS[:1]}, shape=(8, 8, 6))
    no_flair = release / "HGG" / TRAIN_IDS[1]
    (no_flair / f"{TRAIN_IDS[1]}_flair.nii.gz").unlink()
    run = base / "run"
    train = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", f"['{TRAIN}','{PAPER}','{PRESET}']",
        "--meta_file", META, "--logging_file", LOGGING, "--bundle_root", str(ROOT),
        "--dataset_dir", str(prepared), "--output_dir", str(run), "--ckpt_dir", str(run / "models"),
        "--max_iterations", "2", "--patch_size", "[32,32,32]", "--sw_roi_size", "[32,32,32]",
        "--cache_workers", "1", "--pixdim", "[2,2,2]", "--network_def#features", json.dumps(list(TINY_FEATURES)),
    ]  # fmt: skip
    script = [
        sys.executable, str(SCRIPT), "--source_dir", str(base), "--dataset_dir", str(base / "out"),
        "--allow_missing", "true",
    ]  # fmt: skip
    runs = {"train": Launched(train, base, "train"), "no_flair": Launched(script, base, "no_flair")}
    yield run, no_flair, runs
    for launched_run in runs.values():
        if launched_run.proc.poll() is None:
            launched_run.proc.kill()


@pytest.mark.slow
def test_folder_without_flair_is_a_one_line_error(launched):
    _, folder, runs = launched
    code, stdout, stderr = runs["no_flair"].result()
    assert code == 1, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last == f"error: {folder}: no {folder.name}_flair.nii.gz (FLAIR image) in the case folder"


def _workflow(workflow_type, config_file, **override):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=config_file,
        meta_file=META,
        logging_file=LOGGING,
        bundle_root=str(ROOT),
        **override,
    )


@pytest.fixture(scope="module")
def trained(launched):
    run, _, runs = launched
    code, stdout, stderr = runs["train"].result()
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return run


@pytest.mark.slow
def test_preset_trains_evaluates_and_infers(prepared, trained, tmp_path):
    split = json.loads((trained / "split.json").read_text())
    assert split["num_labeled"] == 1 and split["num_unlabeled"] == 3  # 10 % of 4, at least 1
    test = json.loads((prepared / "dataset.json").read_text())["test"]

    wf = _workflow("train", [TRAIN, EVALUATE, PAPER, PRESET], dataset_dir=str(prepared), output_dir=str(tmp_path / "eval"),
                   ckpt_dir=str(trained / "models"), **TINY)  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    lines = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("case,dice,")
    assert sorted(line.split(",")[0] for line in lines[1:]) == sorted(Path(item["image"]).name[:-7] for item in test)

    wf = _workflow("infer", [INFER, PAPER, PRESET], dataset_dir=str(prepared), output_dir=str(tmp_path / "pred"),
                   **{k: TINY[k] for k in ("pixdim", "sw_roi_size", "network_def#features")},
                   **{"checkpointloader#load_path": str(trained / "models" / "model.pt")})  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    for item in test:
        src = nib.load(prepared / item["image"])
        pred = nib.load(tmp_path / "pred" / Path(item["image"]).name.replace(".nii.gz", "_seg.nii.gz"))
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}


@pytest.mark.slow
def test_evaluation_scores_the_whole_tumour(prepared, trained, tmp_path):
    """A model that calls every voxel tumour: in the brain (the preset's foreground crop) its Dice is that of
    the brain against labels 1, 2 and 4 together."""
    state = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)
    state["final_conv.weight"].zero_()
    state["final_conv.bias"].copy_(torch.tensor([0.0, 1.0]))
    (tmp_path / "models").mkdir()
    torch.save(state, tmp_path / "models" / "model.pt")
    wf = _workflow("train", [TRAIN, EVALUATE, PAPER, PRESET], dataset_dir=str(prepared), output_dir=str(tmp_path),
                   ckpt_dir=str(tmp_path / "models"), **TINY)  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    dice = {line.split(",")[0]: float(line.split(",")[1]) for line in lines}
    for item in json.loads((prepared / "dataset.json").read_text())["test"]:
        case = Path(item["image"]).name[:-7]
        label = np.asarray(nib.load(prepared / item["label"]).dataobj)
        pred = np.asarray(nib.load(tmp_path / "predictions" / f"{case}_seg.nii.gz").dataobj)
        tumour = np.isin(label, (1, 2, 4))
        assert tumour[pred == 0].sum() == 0  # all of the tumour predicted
        assert dice[case] == pytest.approx(2 * tumour.sum() / (pred.sum() + tumour.sum()), abs=1e-4)
        only_1 = 2 * (label == 1).sum() / (pred.sum() + (label == 1).sum())
        assert abs(dice[case] - only_1) > 1e-3  # the case tells the two apart: value 1 alone would score less
