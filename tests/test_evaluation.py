# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Per-case metrics: the paper's 95HD/ASD (medpy's definitions, checked against medpy itself), MONAI's kept as
an option, and the evaluation handler recording which one it used."""

import csv
import inspect
import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from medpy.metric import binary as medpy_binary
from monai.data import MetaTensor
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou
from monai.metrics.utils import get_mask_edges, get_surface_distance
from scipy import ndimage

from cpcl_bundle.evaluation import (
    DEFINITIONS,
    SegmentationMetricsWriter,
    asd_paper,
    case_metrics,
    hd95_paper,
    summarise,
    surface_distances,
)

SHAPE = (40, 36, 16)
SPACING = (0.7, 0.8, 3.0)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _render(ellipsoids: list[tuple], shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Union of ellipsoids ``(centre_mm, radii_mm, hole)``; ``hole``: a concentric cavity of half the radii."""
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    mask = np.zeros(shape, dtype=bool)
    for centre, radii, hole in ellipsoids:
        r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
        mask |= r2 <= 1.0
        if hole:
            mask &= r2 > 0.25
    return mask


def _random_pair(rng: np.random.Generator, case: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference blob and a prediction that overlaps it imperfectly (moved, rescaled, sometimes an extra
    false-positive blob). Every third case has an ellipsoid centred on the volume's edge; case 0 is a hollow
    ellipsoid (a closed cavity: an inner surface)."""
    extent = np.array([(n - 1) * s for n, s in zip(SHAPE, SPACING)])
    reference = []
    for k in range(int(rng.integers(1, 4))):
        centre = rng.uniform(0.2, 0.8, 3) * extent
        if case % 3 == 0 and k == 0:  # touches the volume's edge
            axis = int(rng.integers(0, 3))
            centre[axis] = extent[axis] * float(rng.integers(0, 2))
        reference.append((centre, rng.uniform(3.0, 10.0, 3), False))
    if case == 0:
        reference = [(extent / 2, np.array([11.0, 11.0, 18.0]), True)]
    prediction = [
        (np.clip(c + rng.normal(0.0, 2.0, 3), 0, extent), r * rng.uniform(0.8, 1.2, 3), hole)
        for c, r, hole in reference
    ]
    if case % 4 == 1:  # a false positive somewhere else
        prediction.append((rng.uniform(0.0, 1.0, 3) * extent, rng.uniform(2.0, 5.0, 3), False))
    return _render(prediction), _render(reference)


PAIRS = [_random_pair(np.random.default_rng(100 + i), i) for i in range(20)]


def test_random_shapes_cover_the_intended_cases():
    assert all(p.any() and r.any() for p, r in PAIRS)
    pred, ref = PAIRS[0]
    assert ref[20, 18, 8] == 0 and ref[20, 18, 3] == 1  # the hollow one: background inside, foreground around
    assert any(r[0].any() or r[-1].any() or r[:, 0].any() or r[:, :, -1].any() for _, r in PAIRS)


@pytest.mark.parametrize("index", range(len(PAIRS)))
def test_paper_definitions_equal_medpy(index):
    pred, ref = PAIRS[index]
    expected_hd95 = medpy_binary.hd95(pred, ref, voxelspacing=SPACING)
    assert hd95_paper(pred, ref, SPACING) == pytest.approx(expected_hd95, abs=1e-6)
    assert hd95_paper(ref, pred, SPACING) == pytest.approx(expected_hd95, abs=1e-6)  # pooled: symmetric
    assert asd_paper(pred, ref, SPACING) == pytest.approx(medpy_binary.asd(pred, ref, voxelspacing=SPACING), abs=1e-6)
    assert asd_paper(ref, pred, SPACING) == pytest.approx(medpy_binary.asd(ref, pred, voxelspacing=SPACING), abs=1e-6)
    # the distances themselves, voxel for voxel (cropping keeps the order of the surface voxels)
    # medpy's private helper; its double-underscore name is not mangled at module level
    medpy_distances = vars(medpy_binary)["__surface_distances"](pred, ref, SPACING)
    np.testing.assert_allclose(surface_distances(pred, ref, SPACING), medpy_distances, rtol=0, atol=1e-9)
    # through case_metrics, from class-index volumes (class 2 scored), as the evaluation handler calls it
    row = case_metrics(torch.as_tensor(pred * 2)[None], torch.as_tensor(ref * 2), SPACING, foreground=2)
    assert row["hd95_mm"] == pytest.approx(expected_hd95, abs=1e-6)
    assert row["asd_mm"] == pytest.approx(medpy_binary.asd(pred, ref, voxelspacing=SPACING), abs=1e-6)


@pytest.mark.parametrize("index", [0, 1, 3, 6])
def test_monai_definition_is_unchanged(index):
    pred, ref = PAIRS[index]
    p = torch.as_tensor(pred, dtype=torch.float32)[None, None]
    y = torch.as_tensor(ref, dtype=torch.float32)[None, None]
    spacing = list(SPACING)
    row = case_metrics(p[0], y[0, 0], SPACING, definition="monai")
    assert row["hd95_mm"] == float(
        compute_hausdorff_distance(p, y, include_background=True, percentile=95, spacing=spacing)
    )
    assert row["asd_mm"] == float(
        compute_average_surface_distance(p, y, include_background=True, symmetric=True, spacing=spacing)
    )


def _line_case() -> tuple[np.ndarray, np.ndarray]:
    """Thin lines along the last axis (every voxel on the surface): prediction voxels 0..9, reference 0..1."""
    pred, ref = np.zeros((3, 3, 12), dtype=np.uint8), np.zeros((3, 3, 12), dtype=np.uint8)
    pred[1, 1, :10] = 1
    ref[1, 1, :2] = 1
    return pred, ref


def test_hand_computed_case_where_the_definitions_differ():
    # spacing 2 mm along the lines: prediction -> reference distances 0, 0, 2, 4, ..., 16 (10 values, sum 72);
    # reference -> prediction 0, 0.
    # paper: 95th percentile of the 12 pooled values [0, 0, 0, 0, 2, ..., 16] at rank 0.95 * 11 = 10.45
    #        -> 14 + 0.45 * 2 = 14.9; ASD = 72 / 10 = 7.2 (prediction -> reference only)
    # MONAI: max(95th percentile of the 10 forward values at rank 8.55 -> 14 + 0.55 * 2 = 15.1, 0) = 15.1;
    #        symmetric ASD = (72 + 0) / 12 = 6.0
    pred, ref = _line_case()
    spacing = (0.5, 0.7, 2.0)
    paper = case_metrics(torch.as_tensor(pred), torch.as_tensor(ref), spacing, definition="paper")
    monai = case_metrics(torch.as_tensor(pred), torch.as_tensor(ref), spacing, definition="monai")
    assert paper["hd95_mm"] == pytest.approx(14.9) and paper["asd_mm"] == pytest.approx(7.2)
    assert monai["hd95_mm"] == pytest.approx(15.1) and monai["asd_mm"] == pytest.approx(6.0)
    assert hd95_paper(pred, ref, spacing) == pytest.approx(14.9) and asd_paper(pred, ref, spacing) == pytest.approx(7.2)
    assert asd_paper(ref, pred, spacing) == 0.0  # one direction: the reference lies on the prediction
    np.testing.assert_allclose(np.sort(surface_distances(pred, ref, spacing)), [0, 0, *range(2, 17, 2)])
    # the default is the paper's definition, in the function, the handler and the evaluation config
    default = case_metrics(torch.as_tensor(pred), torch.as_tensor(ref), spacing)
    assert default == paper
    assert inspect.signature(case_metrics).parameters["definition"].default == "paper"
    assert inspect.signature(SegmentationMetricsWriter).parameters["definition"].default == "paper"
    config = json.loads((CONFIGS / "evaluate.json").read_text())
    assert config["metric_definition"] == "paper"
    writers = [h for h in config["validate#handlers"] if h["_target_"].endswith("SegmentationMetricsWriter")]
    assert [w["definition"] for w in writers] == ["@metric_definition"]


def test_unknown_definition_is_refused():
    pred, ref = _line_case()
    with pytest.raises(ValueError, match="'paper', 'monai'"):
        case_metrics(torch.as_tensor(pred), torch.as_tensor(ref), (1, 1, 1), definition="medpy")
    with pytest.raises(ValueError, match="'paper', 'monai'"):
        SegmentationMetricsWriter("unused", definition="MONAI")
    assert DEFINITIONS == ("paper", "monai")


@pytest.mark.parametrize("index", [0, 2, 5])
def test_dice_and_jaccard_do_not_depend_on_the_definition(index):
    pred, ref = PAIRS[index]
    p8, r8 = torch.as_tensor(pred, dtype=torch.uint8), torch.as_tensor(ref, dtype=torch.uint8)
    paper = case_metrics(p8, r8, SPACING)
    monai = case_metrics(p8, r8, SPACING, definition="monai")
    assert paper["dice"] == monai["dice"] and paper["jaccard"] == monai["jaccard"]
    p = torch.as_tensor(pred, dtype=torch.float32)[None, None]
    y = torch.as_tensor(ref, dtype=torch.float32)[None, None]
    assert paper["dice"] == float(compute_dice(p, y, include_background=True, ignore_empty=False))
    assert paper["jaccard"] == float(compute_iou(p, y, include_background=True, ignore_empty=False))
    assert paper["dice"] == pytest.approx(medpy_binary.dc(pred, ref), abs=1e-6)
    assert paper["jaccard"] == pytest.approx(medpy_binary.jc(pred, ref), abs=1e-6)


@pytest.mark.parametrize("definition", DEFINITIONS)
def test_empty_masks_give_undefined_distances(definition):
    full = torch.zeros(8, 8, 8)
    full[2:5, 2:5, 2:5] = 1
    empty = torch.zeros(8, 8, 8)
    for pred, label in ((empty, full), (full, empty), (empty, empty)):
        row = case_metrics(pred, label, (1.0, 1.0, 2.0), definition=definition)
        assert math.isnan(row["hd95_mm"]) and math.isnan(row["asd_mm"])
        assert row["dice"] == (1.0 if pred is label else 0.0) and row["jaccard"] == (1.0 if pred is label else 0.0)
    for fn in (surface_distances, hd95_paper, asd_paper):
        with pytest.raises(ValueError, match="no foreground"):
            fn(full.numpy(), empty.numpy(), (1.0, 1.0, 2.0))


def test_crop_is_exact_for_small_objects_in_a_large_volume():
    """Objects far from each other and from the edges, and one on the edge: the joint crop changes nothing."""
    pred, ref = np.zeros((60, 50, 30), dtype=bool), np.zeros((60, 50, 30), dtype=bool)
    pred[10:14, 30:33, 5:9] = True
    ref[40:47, 0:6, 20:30] = True
    assert hd95_paper(pred, ref, SPACING) == pytest.approx(medpy_binary.hd95(pred, ref, SPACING), abs=1e-6)
    assert asd_paper(ref, pred, SPACING) == pytest.approx(medpy_binary.asd(ref, pred, SPACING), abs=1e-6)


def _odd_pairs() -> list[tuple[np.ndarray, np.ndarray, tuple]]:
    """Masks on odd grids with anisotropic spacing: random speckle (many single voxels, most on the volume's edge),
    grids one voxel thick along an axis, 2-D, single voxels in opposite corners, a full volume (its surface is
    the volume's edge) against one voxel, and boxes flush with the edges."""
    rng = np.random.default_rng(7)
    pairs = []
    for shape, spacing in (((7, 5, 3), (0.7, 0.8, 3.0)), ((1, 6, 4), (2.5, 0.6, 1.1)), ((9, 9), (0.7, 3.0))):
        for _ in range(3):
            pairs.append((rng.random(shape) < 0.3, rng.random(shape) < 0.2, spacing))
    corner_a, corner_b = np.zeros((6, 5, 4), dtype=bool), np.zeros((6, 5, 4), dtype=bool)
    corner_a[0, 0, 0] = corner_b[-1, -1, -1] = True
    pairs.append((corner_a, corner_b, (0.5, 1.5, 4.0)))
    full, voxel = np.ones((6, 5, 4), dtype=bool), np.zeros((6, 5, 4), dtype=bool)
    voxel[2, 3, 1] = True
    pairs += [(full, voxel, (0.9, 1.3, 2.2)), (voxel, full, (0.9, 1.3, 2.2)), (full, full, (0.9, 1.3, 2.2))]
    box_a, box_b = np.zeros((12, 10, 8), dtype=bool), np.zeros((12, 10, 8), dtype=bool)
    box_a[:5, 3:, :] = True
    box_b[4:, :7, 6:] = True
    pairs.append((box_a, box_b, (0.7, 0.8, 3.0)))
    return pairs


ODD_PAIRS = _odd_pairs()


@pytest.mark.parametrize("index", range(len(ODD_PAIRS)))
def test_paper_definitions_equal_medpy_bit_for_bit_on_odd_shapes(index):
    """Edges, single voxels, flat and 2-D grids, anisotropic spacing: the same numbers as medpy, to the last bit
    (the surfaces from MONAI's get_mask_edges, the distances from scipy in float64 as medpy computes them)."""
    pred, ref, spacing = ODD_PAIRS[index]
    assert pred.any() and ref.any()
    medpy_distances = vars(medpy_binary)["__surface_distances"](pred, ref, spacing)
    np.testing.assert_array_equal(surface_distances(pred, ref, spacing), medpy_distances)
    assert hd95_paper(pred, ref, spacing) == medpy_binary.hd95(pred, ref, voxelspacing=spacing)
    assert asd_paper(pred, ref, spacing) == medpy_binary.asd(pred, ref, voxelspacing=spacing)
    assert asd_paper(ref, pred, spacing) == medpy_binary.asd(ref, pred, voxelspacing=spacing)


@pytest.mark.parametrize("index", [0, 3, 6, 9])
def test_monai_surfaces_are_medpys_and_its_distances_float32(index):
    """Why the distances are not MONAI's get_surface_distance: its surfaces are medpy's voxel for voxel (on the
    whole volume and on the crop), but its distances are the float32 roundings of medpy's (up to 1e-6 mm off)."""
    pred, ref = PAIRS[index]
    structure = ndimage.generate_binary_structure(3, 1)
    edges_pred, edges_ref = get_mask_edges(pred, ref, crop=False)
    np.testing.assert_array_equal(edges_pred, pred ^ ndimage.binary_erosion(pred, structure))
    np.testing.assert_array_equal(edges_ref, ref ^ ndimage.binary_erosion(ref, structure))
    medpy_distances = vars(medpy_binary)["__surface_distances"](pred, ref, SPACING)
    monai_distances = get_surface_distance(*get_mask_edges(pred, ref), distance_metric="euclidean", spacing=SPACING)
    assert monai_distances.dtype == np.float32
    np.testing.assert_array_equal(monai_distances, medpy_distances.astype(np.float32))
    assert 0 < np.abs(monai_distances - medpy_distances).max() < 1e-5
    np.testing.assert_array_equal(surface_distances(pred, ref, SPACING), medpy_distances)


def _affine(spacing) -> np.ndarray:
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # a flipped (LPS-like) affine: only norms count
    affine[:3, 3] = (10.0, -5.0, 2.0)
    return affine


@pytest.mark.parametrize("definition", DEFINITIONS)
def test_writer_records_the_definition(tmp_path, caplog, definition):
    cases = []
    for name, index in (("case_a", 1), ("case_b", 4)):
        pred, ref = PAIRS[index]
        path = tmp_path / f"{name}_label.nii.gz"
        nib.save(nib.Nifti1Image(ref.astype(np.uint8), _affine(SPACING)), str(path))
        label = MetaTensor(torch.as_tensor(ref, dtype=torch.float32)[None], meta={"filename_or_obj": str(path)})
        image = MetaTensor(torch.zeros(1, *SHAPE), meta={"filename_or_obj": str(tmp_path / f"{name}.nii.gz")})
        cases.append({"image": image, "label": label, "pred": torch.as_tensor(pred, dtype=torch.float32)[None]})

    engine = Engine(lambda engine, batch: batch)  # the "output" of each iteration: one decollated case, in a list
    writer = SegmentationMetricsWriter(tmp_path / "out", definition=definition)
    writer.attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run([[c] for c in cases], max_epochs=1)

    summary = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())
    assert summary["metric_definition"] == definition and summary["num_cases"] == 2
    assert {k: v for k, v in summary.items() if k != "metric_definition"} == json.loads(
        json.dumps(summarise(writer.rows))
    )
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case_a", "case_b"]
    for row, case in zip(rows, cases):
        expected = case_metrics(case["pred"], case["label"], SPACING, definition=definition)
        assert float(row["hd95_mm"]) == pytest.approx(expected["hd95_mm"], rel=1e-6)
        assert float(row["asd_mm"]) == pytest.approx(expected["asd_mm"], rel=1e-6)
    assert any(f"({definition} definition of 95HD/ASD)" in r.getMessage() for r in caplog.records)


def test_reference_values_are_mapped_before_scoring():
    """KiTS19's tumour (2) is kidney for the binary preset: mapped, it counts; unmapped, it would not."""
    from cpcl_bundle.evaluation import map_labels

    reference = torch.zeros(8, 8, 8)
    reference[1:4, 1:4, 1:4], reference[4:6, 1:4, 1:4] = 1, 2
    prediction = (reference > 0).float()
    mapped = map_labels(reference, {0: 0, 1: 1, 2: 1})
    assert torch.equal(mapped, prediction) and torch.equal(reference.unique(), torch.tensor([0.0, 1.0, 2.0]))
    assert case_metrics(prediction, mapped, (1.0, 1.0, 1.0))["dice"] == pytest.approx(1.0)
    assert case_metrics(prediction, reference, (1.0, 1.0, 1.0))["dice"] < 0.9


def test_writer_scores_every_class_and_their_mean(tmp_path):
    """Three classes: per-class columns equal case_metrics of that class alone; the mean columns average the
    classes where a metric is defined (the tumour's distances are NaN in a case without tumour)."""
    from cpcl_bundle.evaluation import METRICS, metric_columns, multiclass_case_metrics

    classes = ["background", "kidney", "tumour"]
    rng = np.random.default_rng(0)
    cases = []
    for name, with_tumour in (("case_a", True), ("case_b", False)):
        ref = np.zeros(SHAPE, np.uint8)
        ref[4:14, 4:14, 3:9] = 1
        if with_tumour:
            ref[9:13, 9:13, 5:8] = 2
        pred = ref.copy()
        pred[rng.random(SHAPE) < 0.05] = 1  # noise: every class scores below 1
        pred[3:5, 3:6, 2:4] = 2 if with_tumour else pred[3:5, 3:6, 2:4]
        path = tmp_path / f"{name}_label.nii.gz"
        nib.save(nib.Nifti1Image(ref, _affine(SPACING)), str(path))
        label = MetaTensor(torch.as_tensor(ref, dtype=torch.float32)[None], meta={"filename_or_obj": str(path)})
        image = MetaTensor(torch.zeros(1, *SHAPE), meta={"filename_or_obj": str(tmp_path / f"{name}.nii.gz")})
        cases.append({"image": image, "label": label, "pred": torch.as_tensor(pred, dtype=torch.float32)[None]})
    engine = Engine(lambda engine, batch: batch)
    SegmentationMetricsWriter(tmp_path / "out", classes=classes).attach(engine)
    engine.run([[c] for c in cases], max_epochs=1)
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", *metric_columns(classes)]
    assert "dice_kidney" in rows[0] and "asd_mm_tumour" in rows[0]
    for row, case in zip(rows, cases):
        for k, name in ((1, "kidney"), (2, "tumour")):
            alone = case_metrics(case["pred"], case["label"], SPACING, foreground=k)
            for metric, value in alone.items():
                got = float(row[f"{metric}_{name}"])
                assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-6), (metric, name)
        kidney, tumour = float(row["dice_kidney"]), float(row["dice_tumour"])
        assert float(row["dice"]) == pytest.approx((kidney + tumour) / 2, rel=1e-6)
    assert math.isnan(float(rows[1]["hd95_mm_tumour"]))  # no tumour in case_b ...
    assert float(rows[1]["hd95_mm"]) == pytest.approx(float(rows[1]["hd95_mm_kidney"]))  # ... the mean skips it
    summary = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())
    assert summary["classes"] == classes and summary["hd95_mm_tumour"]["num_undefined"] == 1
    two = multiclass_case_metrics(cases[0]["pred"].clamp(max=1), cases[0]["label"].clamp(max=1), SPACING, classes[:2])
    assert set(two) == set(METRICS)  # a binary task keeps its four columns
