# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The planner (cpcl_tools/plan.py, scripts/plan.py): each choice on its own, the fingerprint of small generated
data sets of the three kinds the hand-written presets cover (the phantoms, a BraTS-style MR layout, a KiTS19-style
CT layout) compared with those presets, folders it cannot plan, and plan -> train -> evaluate -> infer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser, ConfigWorkflow
from scipy import ndimage

from cpcl_tools import plan as planner
from tests.helpers import TINY_FEATURES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TRAIN, INFER, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "inference.json", "evaluate.json"))
PLAN = str(ROOT / "scripts" / "plan.py")
LA_SOURCE = Path("/work/shared/data/la2018/2018LA_Seg_Training Set")


def _preset(name: str) -> dict:
    return json.loads((CONFIGS / "presets" / f"{name}.json").read_text())


def _fake_measure(peak_per_voxel: float = 1e-6, base: float = 0.5):
    """A step whose peak grows linearly with the patch's voxels, and which records the sizes asked for."""
    asked = []

    def measure(size):
        asked.append(tuple(size))
        return planner.Probe(tuple(size), base + peak_per_voxel * float(np.prod(size)), 1e-6 * float(np.prod(size)))

    measure.asked = asked
    return measure


def _write(folder: Path, name: str, array: np.ndarray, spacing, dtype) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), np.diag([*spacing, 1.0])), folder / f"{name}.nii.gz")
    return f"{folder.name}/{name}.nii.gz"


def _dataset(root: Path, kind: str, n: int = 3, unlabeled: int = 1, shape=(48, 40, 32), spacing=(1.0, 1.0, 1.0)):
    """A small data set of ``kind``: ``brats`` (MR, zero background, labels 0/1/2/4), ``kits`` (CT in HU with air
    around the body, a kidney of 1 and a tumour of 2 at kidney-like HU, a fat rim of partial volume in the label)."""
    rng = np.random.default_rng(0)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    training, extra = [], []
    for i in range(n + unlabeled):
        body = sum(g**2 for g in grid) < 0.8
        organ = (grid[0] - 0.2) ** 2 + grid[1] ** 2 + (grid[2] * 0.8) ** 2 < 0.12 + 0.02 * i
        core = (grid[0] - 0.25) ** 2 + grid[1] ** 2 + grid[2] ** 2 < 0.03
        noise = rng.normal(size=shape)
        if kind == "brats":
            image = np.where(body, 400 + 40 * noise + 300 * organ, 0.0)
            label = np.where(core, 4, np.where(organ & (grid[2] > 0), 2, np.where(organ, 1, 0)))
        else:  # kidney ~120 HU, tumour ~70 HU, a rim of perirenal fat (partial volume) inside the label
            rim = organ & ~ndimage.binary_erosion(organ)
            image = np.where(body, 40 + 20 * noise, -1024.0)
            image = np.where(organ, 120 + 35 * noise, image)
            image = np.where(core, 70 + 25 * noise, np.where(rim, -80 + 20 * noise, image))
            label = np.where(core, 2, np.where(organ, 1, 0))
        entry = {
            "image": _write(root / "imagesTr", f"case_{i}", image, spacing, np.float32 if kind == "brats" else np.int16)
        }
        if i < n:
            entry["label"] = _write(root / "labelsTr", f"case_{i}", label, spacing, np.uint8)
            training.append(entry)
        else:
            extra.append(entry)
    (root / "dataset.json").write_text(json.dumps({"training": training, "unlabeled": extra, "test": training[:1]}))
    return root


# ------------------------------------------------------------------------------------------------ each choice
def test_target_spacing_is_the_median_and_the_coarse_axis_of_anisotropic_data_takes_its_10th_percentile():
    iso = planner.target_spacing([[1.0, 1.0, 1.0], [0.8, 0.8, 1.2], [1.2, 1.2, 0.8]])
    assert iso.ids["pixdim"] == [1.0, 1.0, 1.0]
    thick = [[0.8, 0.8, z] for z in (2.5, 3.0, 5.0, 5.0, 5.0)]
    aniso = planner.target_spacing(thick)
    assert aniso.ids["pixdim"][:2] == [0.8, 0.8]
    assert aniso.ids["pixdim"][2] == pytest.approx(np.percentile([2.5, 3.0, 5.0, 5.0, 5.0], 10), abs=1e-3)
    assert "nnU-Net" in aniso.why and "nnU-Net" not in iso.why


def test_modality_guess_ct_by_hounsfield_range_else_mr():
    assert planner.guess_modality({"min": -1024.0, "max": 1500.0})[0] == "CT"
    assert planner.guess_modality({"min": 0.0, "max": 3000.0})[0] == "MR"
    assert planner.guess_modality({"min": -3.2, "max": 6.0})[0] == "MR"  # z-scored MR (the Left Atrium's h5)
    assert planner.guess_modality({"min": -600.0, "max": 100.0})[0] == "MR"  # too small a range for HU


def test_ct_intensity_clips_to_the_foreground_percentiles_then_z_scores():
    fg = {"percentile_00_5": -70.0, "percentile_99_5": 170.0, "mean": 75.0, "stdev": 50.0}
    choice = planner.intensity_choice("CT", fg)
    parser = ConfigParser({**json.loads(Path(TRAIN).read_text()), **choice.ids})
    transform = parser.get_parsed_content("intensity")
    x = np.array([[[[-1000.0, -70.0, 75.0, 125.0, 170.0, 2000.0]]]], dtype=np.float32)
    out = np.asarray(transform({"image": x})["image"]).ravel()
    assert out == pytest.approx([-2.9, -2.9, 0.0, 1.0, 1.9, 1.9], abs=1e-3)


def test_normalised_mr_is_z_scored_whole_and_not_cropped():
    """MR that goes below 0 was normalised already: neither the z-score nor the crop may select voxels above 0."""
    assert planner.zero_is_background({"min": 0.0, "max": 900.0})[0]
    assert not planner.zero_is_background({"min": -0.7, "max": 5.6})[0]  # the Left Atrium's z-scored h5
    intensity = planner.intensity_choice("MR", {}, zero_background=False).ids["intensity"]
    assert intensity == {"_target_": "NormalizeIntensityd", "keys": "image"}  # nonzero off: every voxel
    assert (
        planner.crop_choice("MR", zero_background=False).ids["foreground_crop"] == _preset("la2018")["foreground_crop"]
    )
    assert planner.crop_choice("CT", zero_background=False).ids == planner.crop_choice("CT").ids  # HU: body crop


def test_mr_intensity_and_crop_are_brats2019s():
    brats = _preset("brats2019")
    assert planner.intensity_choice("MR", {}).ids["intensity"] == brats["intensity"]
    assert planner.crop_choice("MR").ids["foreground_crop"] == brats["foreground_crop"]
    train = json.loads(Path(TRAIN).read_text())
    assert planner.crop_choice("CT").ids["foreground_crop"] == train["foreground_crop"]
    assert planner.crop_choice("CT").ids["body_threshold"] == train["body_threshold"]


def test_classes_put_background_first_and_number_the_values_found():
    choice = planner.classes_choice([4, 0, 2, 1], {0: "background", 1: "necrotic_core"})
    assert choice.ids["classes"] == ["background", "necrotic_core", "label_2", "label_4"]
    assert choice.ids["label_mapping"] == {"0": 0, "1": 1, "2": 2, "4": 3}
    with pytest.raises(planner.PlanError, match="no value but 0"):
        planner.classes_choice([0])


def test_patch_candidates_follow_the_median_shape_in_multiples_of_16_capped_at_it():
    found = planner.patch_candidates([200.0, 200.0, 100.0])
    assert all(v % 16 == 0 and v >= 32 for size in found for v in size)
    assert all(a <= 192 and b <= 192 and c <= 96 for a, b, c in found)
    volumes = [int(np.prod(s)) for s in found]
    assert volumes == sorted(volumes) and len(set(found)) == len(found)
    assert all(a == b >= c for a, b, c in found)  # the aspect ratio of the data
    assert found[-1] == (192, 192, 96)  # the cap: the median shape rounded down to 16
    assert planner.patch_candidates([20.0, 20.0, 20.0]) == [(32, 32, 32)]  # smaller than a patch: padded
    # square in the plane that train.json's RandRotate90d turns (axes 0 and 1), from the sides' geometric mean
    assert all(a == b for a, b, _ in planner.patch_candidates([250.0, 160.0, 90.0]))
    assert planner.patch_candidates([250.0, 160.0, 90.0])[-1] == (192, 192, 80)


def test_choose_patch_takes_the_largest_that_fits_in_few_probes():
    candidates = planner.patch_candidates([300.0, 300.0, 300.0])
    measure = _fake_measure()
    best, probes = planner.choose_patch(candidates, measure, memory_gb=2.5, max_probes=4)
    fitting = [c for c in candidates if 0.5 + 1e-6 * np.prod(c) <= 2.5]
    assert best.patch == fitting[-1] and len(probes) <= 4 and len(measure.asked) == len(probes)
    # nothing fits: one line naming the budget and the smallest patch's need
    with pytest.raises(planner.PlanError, match=r"--memory_gb 0.1: the smallest patch 48x48x48 needs"):
        planner.choose_patch(candidates, _fake_measure(), memory_gb=0.1)

    # a probe that runs out of memory (infinite peak) removes its size and the larger ones
    def oom_above(size):
        peak = float("inf") if np.prod(size) > 100**3 else 0.5 + 1e-6 * float(np.prod(size))
        return planner.Probe(tuple(size), peak, 1.0)

    best, probes = planner.choose_patch(candidates, oom_above, memory_gb=100.0, max_probes=4)
    assert np.prod(best.patch) <= 100**3 and len(probes) <= 4


def test_labeled_split_and_step_budget():
    fp = planner.Fingerprint("/d", 10, 0, 1, [], [], [], {}, {}, [0, 1])
    assert planner.labeled_choice(fp).ids == {"labeled_ratio": None, "num_labeled": None}
    assert "join it" in planner.labeled_choice(fp).why  # no unlabeled images: the labeled ones join the stream
    assert planner.labeled_choice(fp, num_labeled=3).ids == {"labeled_ratio": None, "num_labeled": 3}
    assert planner.labeled_choice(fp, labeled_ratio=0.2).ids == {"labeled_ratio": 0.2, "num_labeled": None}
    with pytest.raises(planner.PlanError, match="--num_labeled 11"):
        planner.labeled_choice(fp, num_labeled=11)
    steps = planner.steps_choice(0.36)
    assert steps.ids["max_iterations"] == planner.PAPER_STEPS == _preset("paper_protocol")["max_iterations"]
    assert "2.0 h" in steps.why
    assert planner.steps_choice(1.0, max_iterations=2).ids["checkpoint_interval"] == 2


# ------------------------------------------------------------------------- the data sets the presets were made for
def _plan(folder, **options):
    fp = planner.fingerprint(folder)
    choices = planner.plan(fp, _fake_measure(), memory_gb=4.0, **options)
    return fp, planner.preset(choices)


def test_phantoms_plan_close_to_train_json(tiny_dataset):
    """The phantoms (CT, kidney label): train.json's window [-75, 175] HU is a kidney window; the plan's clip
    window is the labels' 0.5-99.5 percentiles, within 40 HU of it at each end; the body crop and the classes
    are train.json's; the spacing keeps the thick slices (train.json's 2 mm is a CPU demo's choice)."""
    fp, preset = _plan(tiny_dataset)
    train = json.loads(Path(TRAIN).read_text())
    assert preset["hu_window"] == pytest.approx(train["hu_window"], abs=40)
    assert preset["intensity"]["_target_"] == train["intensity"]["_target_"] == "ScaleIntensityRanged"
    assert preset["foreground_crop"] == train["foreground_crop"] and preset["body_threshold"] == -500
    assert preset["classes"] == train["classes"] and preset["label_mapping"] == {"0": 0, "1": 1}
    assert preset["pixdim"][2] > 2 * preset["pixdim"][0]  # 2.5-5 mm slices, sub-mm in plane
    assert fp.num_training == 6 and fp.channels == 1


def test_brats_style_mr_plans_like_brats2019(tmp_path):
    fp, preset = _plan(_dataset(tmp_path, "brats"))
    brats = _preset("brats2019")
    assert preset["intensity"] == brats["intensity"] and preset["foreground_crop"] == brats["foreground_crop"]
    assert "hu_window" not in preset and preset["pixdim"] == [1.0, 1.0, 1.0]
    assert set(preset["label_mapping"]) == set(brats["label_mapping"])  # the same label values, 0/1/2/4
    assert preset["classes"][0] == "background" and len(preset["classes"]) == 4  # kept apart (a subregions model)
    assert fp.num_unlabeled == 1 and preset["num_labeled"] is None


def test_kits_style_ct_plans_a_hounsfield_window_around_the_kidney(tmp_path):
    fp, preset = _plan(_dataset(tmp_path, "kits"))
    kits = _preset("kits19")
    assert preset["hu_window"] == pytest.approx(kits["hu_window"], abs=60)  # the kidney's range, not the body's
    assert preset["body_threshold"] == kits["body_threshold"]
    assert set(preset["label_mapping"]) == set(kits["label_mapping"])
    b_min, b_max = preset["intensity"]["b_min"], preset["intensity"]["b_max"]
    assert b_min < 0 < b_max  # z-scored with the kidney's mean inside the window
    assert fp.labels == [0, 1, 2]


# ------------------------------------------------------------------------------------- folders it cannot plan
def test_unplannable_folders_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(planner.PlanError, match=r"dataset.json: no datalist"):
        planner.fingerprint(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(planner.PlanError, match=r"dataset.json: no images in 'training'"):
        planner.fingerprint(tmp_path)
    good = _dataset(tmp_path / "a", "kits", n=2, unlabeled=0)
    _write(good / "labelsTr", "case_1", np.zeros((48, 40, 30)), (1, 1, 1), np.uint8)  # not the image's shape
    with pytest.raises(planner.PlanError, match=r"labelsTr/case_1.nii.gz: shape \[48, 40, 30\]"):
        planner.fingerprint(good)
    mixed = _dataset(tmp_path / "b", "brats", n=2, unlabeled=0)
    _write(mixed / "imagesTr", "case_1", np.zeros((48, 40, 32, 2)), (1, 1, 1), np.float32)  # two channels
    with pytest.raises(planner.PlanError, match=r"imagesTr/case_1.nii.gz: 2 channel\(s\), the first image"):
        planner.fingerprint(mixed)


def test_cli_error_is_the_last_line_with_status_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, PLAN, "--dataset_dir", str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "dataset.json: no datalist" in last and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ plan -> train -> eval -> infer
def _workflow(kind, files, **override):
    return ConfigWorkflow(
        workflow_type=kind,
        config_file=files,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(ROOT),
        **override,
    )


@pytest.mark.slow
def test_plan_then_train_evaluate_and_infer(tmp_path):
    """scripts/plan.py on tiny phantoms (probes with a tiny U-Net), then the bundle's own commands with the preset:
    training (a subprocess, as a user types it), evaluation and inference."""
    from cpcl_bundle.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, num_training=3, num_validation=1, num_test=1, num_unlabeled=2, seed=2, workers=1, scale=0.35)
    preset = tmp_path / "mine.json"
    features = "[" + ",".join(map(str, TINY_FEATURES)) + "]"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, PLAN, "--dataset_dir", str(data), "--out", str(preset), "--memory_gb", "6"]
    cmd += ["--probe_features", features, "--max_probes", "2", "--max_iterations", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("spacing", "modality", "intensity", "crop", "classes", "patch", "labeled", "steps"):
        assert any(line.startswith(f"{name}: ") for line in proc.stdout.splitlines()), name
    content = json.loads(preset.read_text())
    assert preset.read_text() == json.dumps(content, indent=4) + "\n"
    assert content["dataset_dir"] == str(data.resolve()) and content["max_iterations"] == 2
    out = tmp_path / "run"
    tiny = {"network_def#features": list(TINY_FEATURES), "cache_workers": 1}
    files = [TRAIN, str(preset)]
    train = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(files)]
    train += ["--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    train += ["--bundle_root", str(ROOT), "--output_dir", str(out), "--ckpt_dir", str(out / "models")]
    train += ["--network_def#features", features, "--cache_workers", "1"]
    proc = subprocess.run(train, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file()
    wf = _workflow("train", [TRAIN, EVALUATE, str(preset)], output_dir=str(out), ckpt_dir=str(out / "models"), **tiny)
    wf.initialize()
    wf.run()
    wf.finalize()
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["num_cases"] == 1 and 0.0 <= summary["dice"]["mean"] <= 1.0
    wf = _workflow(
        "infer",
        [INFER, str(preset)],
        output_dir=str(tmp_path / "pred"),
        **{"checkpointloader#load_path": str(out / "models" / "model.pt"), "network_def#features": list(TINY_FEATURES)},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    test_image = json.loads((data / "dataset.json").read_text())["test"][0]["image"]
    pred = nib.load(tmp_path / "pred" / Path(test_image).name.replace(".nii.gz", "_seg.nii.gz"))
    assert pred.shape == nib.load(data / test_image).shape


@pytest.mark.slow
@pytest.mark.skipif(not LA_SOURCE.is_dir(), reason="the Left Atrium data (/work/shared/data/la2018) is not here")
def test_left_atrium_plans_close_to_la2018(tmp_path):
    """Five Left Atrium cases converted as scripts/prepare_la2018.py does: 0.625 mm isotropic, MR (z-scored h5,
    not Hounsfield units), one class; the images go below 0 (z-scored already), so the plan z-scores over the whole
    image (a no-op on z-scored data, where la2018 has Identityd) and skips the crop, as la2018."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_la2018", ROOT / "scripts" / "prepare_la2018.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    cases = sorted(p.name for p in LA_SOURCE.iterdir() if (p / "mri_norm2.h5").is_file())[:5]
    for case in cases:
        prepare.convert_case(
            (case, str(LA_SOURCE / case / "mri_norm2.h5"), str(tmp_path / "imagesTr"), str(tmp_path / "labelsTr"))
        )
    training = [{"image": f"imagesTr/{c}.nii.gz", "label": f"labelsTr/{c}.nii.gz"} for c in cases]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": training}))
    fp, preset = _plan(tmp_path)
    la = _preset("la2018")
    assert preset["pixdim"] == pytest.approx(la["pixdim"], abs=1e-3)
    assert preset["classes"] == ["background", "label_1"] and preset["label_mapping"] == la["label_mapping"]
    assert preset["intensity"] == {"_target_": "NormalizeIntensityd", "keys": "image"} and "hu_window" not in preset
    assert preset["foreground_crop"] == la["foreground_crop"]  # z-scored: 0 is not the background, no crop
