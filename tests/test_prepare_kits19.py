# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""scripts/prepare_kits19.py on a tiny copy of the raw KiTS19 layout, then the kits19 preset end to end."""

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
SCRIPT = ROOT / "scripts" / "prepare_kits19.py"
META, LOGGING = str(CONFIGS / "metadata.json"), str(CONFIGS / "logging.conf")
TRAIN, INFER, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "inference.json", "evaluate.json"))
PRESET = str(CONFIGS / "presets" / "kits19.json")
PAPER = str(CONFIGS / "presets" / "paper_protocol.json")  # kits19 stacks on the paper's protocol
TINY = {  # seconds on 2 CPU cores: 32^3 windows at 4 mm, a narrow U-Net (tests/helpers.py TINY_FEATURES)
    "patch_size": [32, 32, 32],
    "sw_roi_size": [32, 32, 32],
    "cache_workers": 1,
    "pixdim": [4.0, 4.0, 4.0],
    "network_def#features": list(TINY_FEATURES),
}
#: (z, y, x): KiTS19 stores the slice axis first.
SHAPE = (16, 48, 48)
PIXEL_MM = 1.2
LABELED_IDS, UNLABELED_IDS = tuple(range(7)), (210,)


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_kits19", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = _load_script()


def kits_affine(slice_mm: float) -> np.ndarray:
    """KiTS19's convention: voxel axes (z, y, x), each spacing entry negative, origin 0."""
    return np.array([[0, 0, -PIXEL_MM, 0], [0, -PIXEL_MM, 0, 0], [-slice_mm, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def ct_case(seed: int, slice_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(CT in HU as float64 whole numbers, segmentation uint8 0/1/2): air around a soft-tissue body, a spine,
    two kidneys (label 1, ~180 HU) and a tumour (label 2, ~100 HU) on the left one."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*((np.arange(n) - (n - 1) / 2) for n in SHAPE), indexing="ij")
    z, y, x = z * slice_mm, y * PIXEL_MM, x * PIXEL_MM
    dz, dy = rng.uniform(-3, 3, 2)
    image = np.where((y / 22) ** 2 + (x / 26) ** 2 <= 1, 40.0, -1000.0)
    image[((y - 13) / 5) ** 2 + (x / 5) ** 2 <= 1] = 600.0
    label = np.zeros(SHAPE, np.uint8)
    for side in (-1, 1):
        kidney = ((z - dz) / 15) ** 2 + ((y - 6 - dy) / 6) ** 2 + ((x - 14 * side) / 5) ** 2 <= 1
        image[kidney], label[kidney] = 180.0, 1
    tumour = (z - dz) ** 2 + (y - 6 - dy) ** 2 + (x + 19) ** 2 <= 4.5**2
    image[tumour], label[tumour] = 100.0, 2
    image = np.clip(np.round(image + rng.normal(0, 8, SHAPE)), -1024, 3071)
    return image, label


def write_raw(data: Path, labeled=LABELED_IDS, unlabeled=UNLABELED_IDS) -> Path:
    """``data/case_XXXXX/imaging.nii.gz`` (+ ``segmentation.nii.gz`` for the labeled ids), as the kits19 repo."""
    for i in (*labeled, *unlabeled):
        slice_mm = (3.0, 4.0, 5.0)[i % 3]
        image, label = ct_case(i, slice_mm)
        folder = data / f"case_{i:05d}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(image, kits_affine(slice_mm)), folder / "imaging.nii.gz")
        if i in labeled:
            nib.save(nib.Nifti1Image(label, kits_affine(slice_mm)), folder / "segmentation.nii.gz")
    return data


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
def raw(tmp_path_factory):
    """A kits19 repository copy: ``<repo>/data/case_*``; 7 segmented cases and one test-set case."""
    repo = tmp_path_factory.mktemp("kits19")
    write_raw(repo / "data")
    return repo


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("kits19_prepared")
    prepare.main(str(raw), str(out), allow_missing=True, include_unlabeled=True, seed=0, workers=1)
    return out


def test_split_sizes_keep_the_proportions():
    assert prepare.split_sizes(210) == (150, 10, 50)
    assert prepare.split_sizes(7) == (4, 1, 2)
    assert prepare.split_sizes(6) == (4, 1, 1)
    assert prepare.split_sizes(3) == (1, 1, 1)
    assert prepare.split_sizes(105) == (75, 5, 25)
    with pytest.raises(prepare.PrepareError, match="at least 3"):
        prepare.split_sizes(2)
    assert [prepare.num_labeled(r, 150) for r in prepare.LABEL_RATIOS] == [8, 15]


def test_prepared_layout_keeps_values_and_geometry(raw, prepared):
    from cpcl_bundle.data import load_datalist

    content = json.loads((prepared / "dataset.json").read_text())
    assert content["name"] == "kits19" and "1904.00445" in content["reference"]
    assert content["labels"] == {"0": "background", "1": "kidney", "2": "tumour"}
    assert content["label_ratios"] == [0.05, 0.1]
    assert content["split"] == {"training": 4, "validation": 1, "test": 2, "unlabeled": 1}
    assert content["num_labeled"] == {"0.05": 1, "0.1": 1}
    lists = load_datalist(prepared / "dataset.json")
    cases = [
        Path(item["image"]).name[: -len(".nii.gz")] for key in ("training", "validation", "test") for item in lists[key]
    ]
    assert sorted(cases) == [f"case_{i:05d}" for i in LABELED_IDS]
    assert [Path(item["image"]).name for item in lists["unlabeled"]] == ["case_00210.nii.gz"]
    assert all("label" not in item for item in lists["unlabeled"])
    for key in ("training", "validation", "test", "unlabeled"):
        for item in lists[key]:
            case = Path(item["image"]).name[: -len(".nii.gz")]
            source = raw / "data" / case
            image, original = nib.load(item["image"]), nib.load(source / "imaging.nii.gz")
            assert image.get_data_dtype() == np.int16  # whole HU numbers: int16 is exact
            assert np.array_equal(image.affine, original.affine)
            assert np.array_equal(np.asarray(image.dataobj), np.asarray(original.dataobj))
            if "label" in item:
                label, seg = nib.load(item["label"]), nib.load(source / "segmentation.nii.gz")
                assert label.get_data_dtype() == np.uint8 and np.array_equal(label.affine, seg.affine)
                values = np.asarray(label.dataobj)
                assert np.array_equal(values, np.asarray(seg.dataobj))  # 2 (tumour) kept, mapped by the preset
                assert set(np.unique(values).tolist()) == {0, 1, 2}


def test_split_is_seeded(raw, tmp_path):
    def lists(seed: int) -> dict:
        out = tmp_path / f"seed{seed}"
        prepare.main(str(raw / "data"), str(out), allow_missing="true", seed=seed, workers=1)
        content = json.loads((out / "dataset.json").read_text())
        assert content["unlabeled"] == []  # only with --include_unlabeled
        return {key: [item["image"] for item in content[key]] for key in ("training", "validation", "test")}

    first = lists(0)
    assert lists(0) == first
    assert [len(first[key]) for key in ("training", "validation", "test")] == [4, 1, 2]
    cases = [f"case_{i:05d}" for i in LABELED_IDS]
    for seed, split in ((0, first), (3, lists(3))):
        expected = prepare.seeded_split(cases, (4, 1, 2), seed)
        assert split == {
            key: [f"{folder}/{c}.nii.gz" for c in part]
            for key, folder, part in zip(
                ("training", "validation", "test"), ("imagesTr", "imagesTr", "imagesTs"), expected
            )
        }
    assert lists(3) != first


def test_label_on_another_grid_is_an_error_naming_it(tmp_path):
    data = write_raw(tmp_path / "data", labeled=(0, 1, 2), unlabeled=())
    seg = data / "case_00001" / "segmentation.nii.gz"
    label = np.asarray(nib.load(seg).dataobj)
    nib.save(nib.Nifti1Image(label[:-1], kits_affine(4.0)), seg)
    with pytest.raises(prepare.PrepareError, match=f"^{re.escape(str(seg))}: shape"):
        prepare.main(str(data), str(tmp_path / "out"), allow_missing=True, workers=1)
    nib.save(nib.Nifti1Image(label, np.diag([-4.0, -PIXEL_MM, -PIXEL_MM, 1.0])), seg)
    with pytest.raises(prepare.PrepareError, match=f"^{re.escape(str(seg))}: affine"):
        prepare.main(str(data), str(tmp_path / "out"), allow_missing=True, workers=1)


def test_missing_segmentation_skipped_with_allow_missing(tmp_path, capsys):
    data = write_raw(tmp_path / "data", labeled=(0, 1, 2, 3), unlabeled=())
    (data / "case_00002" / "segmentation.nii.gz").unlink()
    prepare.main(str(data), str(tmp_path / "out"), allow_missing=True, workers=1)
    assert "skipping 1 segmented case folder(s) without segmentation.nii.gz (case_00002)" in capsys.readouterr().out
    content = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert content["split"]["training"] + content["split"]["validation"] + content["split"]["test"] == 3


def _broken_copies(base: Path) -> dict[str, tuple[Path, Path]]:
    """name: (source_dir, the file the error must name)"""
    no_seg = write_raw(base / "no_seg" / "data", labeled=(0, 1, 2), unlabeled=())
    (no_seg / "case_00001" / "segmentation.nii.gz").unlink()
    bad_value = write_raw(base / "bad_value" / "data", labeled=(0, 1, 2), unlabeled=())
    seg = bad_value / "case_00002" / "segmentation.nii.gz"
    label = np.asarray(nib.load(seg).dataobj).copy()
    label[label == 2] = 3
    nib.save(nib.Nifti1Image(label, nib.load(seg).affine), seg)
    return {"no_seg": (no_seg, no_seg / "case_00001" / "segmentation.nii.gz"), "bad_value": (bad_value, seg)}


@pytest.fixture(scope="module")
def launched(prepared, tmp_path_factory):
    """Every command of this module started at once, as a user types it (each spends seconds importing torch and
    MONAI): `python -m monai.bundle run training` with the kits19 preset and tiny overrides, and the script on
    two broken copies of the raw layout."""
    base = tmp_path_factory.mktemp("kits19_cli")
    broken = _broken_copies(base)
    run = base / "run"
    train = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", f"['{TRAIN}','{PAPER}','{PRESET}']",
        "--meta_file", META, "--logging_file", LOGGING, "--bundle_root", str(ROOT),
        "--dataset_dir", str(prepared), "--output_dir", str(run), "--ckpt_dir", str(run / "models"),
        "--max_iterations", "2", "--patch_size", "[32,32,32]", "--sw_roi_size", "[32,32,32]",
        "--cache_workers", "1", "--pixdim", "[4,4,4]", "--network_def#features", json.dumps(list(TINY_FEATURES)),
    ]  # fmt: skip
    script = [sys.executable, str(SCRIPT), "--dataset_dir"]
    commands = {
        "train": train,
        "no_seg": script + [str(base / "out1"), "--source_dir", str(broken["no_seg"][0])],
        "bad_value": script
        + [str(base / "out2"), "--source_dir", str(broken["bad_value"][0]), "--allow_missing", "true"],
    }
    runs = {name: Launched(cmd, base, name) for name, cmd in commands.items()}
    yield run, {name: error_file for name, (_, error_file) in broken.items()}, runs
    for launched_run in runs.values():
        if launched_run.proc.poll() is None:
            launched_run.proc.kill()


@pytest.fixture(scope="module")
def bad_runs(launched):
    _, files, runs = launched
    return files, {name: runs[name].result() for name in files}


def _last_error_line(result) -> str:
    code, stdout, stderr = result
    assert code == 1, stdout[-2000:] + stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    return last


@pytest.mark.slow
def test_case_without_segmentation_is_a_one_line_error(bad_runs):
    files, results = bad_runs
    last = _last_error_line(results["no_seg"])
    assert last.startswith(f"error: {files['no_seg']}: file does not exist")
    assert "--allow_missing true" in last


@pytest.mark.slow
def test_undefined_label_value_is_a_one_line_error(bad_runs):
    files, results = bad_runs
    last = _last_error_line(results["bad_value"])
    assert last.startswith(f"error: {files['bad_value']}: label values [3]")


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
    assert split["num_labeled"] == 1 and split["num_unlabeled"] == 4  # 10 % of 4, at least 1; 3 + case_00210
    assert (trained / "models" / "model.pt").is_file()
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
def test_evaluation_scores_kidney_as_labels_1_and_2(prepared, trained, tmp_path):
    """A model that calls every voxel kidney: in the body (the preset's crop) its Dice is that of the body
    against labels 1 and 2 together."""
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
        kidney = np.isin(label, (1, 2))
        assert kidney[pred == 0].sum() == 0  # all of the kidneys predicted
        assert dice[case] == pytest.approx(2 * kidney.sum() / (pred.sum() + kidney.sum()), abs=1e-4)
        only_1 = 2 * (label == 1).sum() / (pred.sum() + (label == 1).sum())
        assert abs(dice[case] - only_1) > 1e-3  # the case tells the two apart: value 1 alone would score less
