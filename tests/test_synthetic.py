# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The phantom generator: determinism, label, HU values, geometry, NIfTI files and the datalist."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cpcl_bundle import synthetic
from cpcl_bundle.synthetic import Tissue, case_seed, generate_case, generate_dataset, render_phantom

SCALE = 0.4  # anatomy and field of view shrunk (spacing unchanged): ~0.3 M voxels per case
SEEDS = range(5)
KIDNEY_TISSUES = [
    Tissue.CORTEX,
    Tissue.MEDULLA,
    Tissue.SINUS,
    Tissue.PELVIS,
    Tissue.CYST,
    Tissue.TUMOUR,
    Tissue.NECROSIS,
]


@pytest.fixture(scope="module")
def phantoms():
    return [render_phantom(seed, scale=SCALE) for seed in SEEDS]


def _small_dataset(folder, **kwargs):
    args = dict(num_training=2, num_validation=1, num_test=1, num_unlabeled=1, seed=3, workers=1, scale=0.3)
    return generate_dataset(folder, **{**args, **kwargs})


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_case_other_seed_other_case():
    first, again, other = generate_case(7, scale=SCALE), generate_case(7, scale=SCALE), generate_case(8, scale=SCALE)
    for a, b in zip(first, again):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])
    assert not np.allclose(first[2], other[2])  # spacing / origin are drawn per case


def test_label_is_the_binary_kidney_mask(phantoms):
    two_kidneys = right_lower = 0
    for p in phantoms:
        assert p.label.dtype == np.uint8 and p.label.shape == p.image.shape
        assert set(np.unique(p.label).tolist()) == {0, 1}
        kidney = p.label.astype(bool)
        # labeled voxels are kidney tissue (renal vessels entering the sinus aside); parenchyma is always labeled
        assert np.isin(p.tissue[kidney], KIDNEY_TISSUES).mean() > 0.97
        assert kidney[np.isin(p.tissue, [Tissue.CORTEX, Tissue.MEDULLA, Tissue.TUMOUR, Tissue.NECROSIS])].all()
        assert not np.isin(p.tissue[~kidney], [Tissue.CORTEX, Tissue.MEDULLA]).any()
        assert 0.005 < kidney.mean() < 0.06
        # the in-plane field of view holds the kidneys with a margin (only the slice range may cut a pole)
        assert not kidney[:5].any() and not kidney[-5:].any() and not kidney[:, :5].any() and not kidney[:, -5:].any()
        components, n = ndimage.label(kidney)
        sizes = np.bincount(components.ravel())[1:]
        big = np.argsort(sizes)[::-1][:2] + 1
        if n >= 2 and sizes[big - 1].sum() > 0.99 * kidney.sum():
            two_kidneys += 1
            (x_a, _, z_a), (x_b, _, z_b) = ndimage.center_of_mass(kidney, components, big)
            centre_x = (p.image.shape[0] - 1) / 2
            assert (x_a - centre_x) * (x_b - centre_x) < 0  # one either side of the midline
            z_right, z_left = (z_a, z_b) if x_a > x_b else (z_b, z_a)  # axis 0 runs towards the patient's right
            right_lower += z_right < z_left
    assert two_kidneys >= len(phantoms) - 1
    assert right_lower >= two_kidneys - 1


def test_hounsfield_units_are_plausible():
    p = render_phantom(11, scale=0.6)
    assert p.image.dtype == np.int16 and p.image.min() >= -1024

    def mean_std(tissue):
        inner = ndimage.binary_erosion(p.tissue == tissue, np.ones((3, 3, 1), bool))  # away from partial volume
        assert inner.sum() > 50, tissue
        values = p.image[inner].astype(float)
        return values.mean(), values.std()

    air, _ = mean_std(Tissue.AIR)
    assert abs(air + 1000) < 20
    liver, liver_std = mean_std(Tissue.LIVER)
    assert 50 < liver < 100 and 8 < liver_std < 45  # noise of 10-30 HU plus texture
    cortex, medulla = mean_std(Tissue.CORTEX)[0], mean_std(Tissue.MEDULLA)[0]
    assert cortex > medulla + 40 and 40 < medulla < 110
    assert mean_std(Tissue.SPLEEN)[0] > liver
    assert mean_std(Tissue.AORTA)[0] > 170
    assert -130 < mean_std(Tissue.SUBCUTANEOUS_FAT)[0] < -70
    assert 30 < mean_std(Tissue.MUSCLE)[0] < 70
    assert mean_std(Tissue.BONE)[0] > 300
    # the noise is spatially correlated: neighbouring voxels of a homogeneous region are alike
    inner = ndimage.binary_erosion(p.tissue == Tissue.AIR, np.ones((5, 5, 1), bool))
    a, b = p.image[:-1][inner[:-1] & inner[1:]], p.image[1:][inner[:-1] & inner[1:]]
    assert np.corrcoef(a.astype(float), b.astype(float))[0, 1] > 0.2


def _inner_mean(p, tissue):
    inner = ndimage.binary_erosion(p.tissue == tissue, np.ones((3, 3, 1), bool))
    return float(p.image[inner].mean()) if inner.sum() > 30 else None


def test_contrast_phases_tumours_and_nephrectomy_vary_between_cases():
    """What makes few labels not enough: phases with other kidney contrast, tumours (labeled kidney, as in
    KiTS19) of other enhancement, and the odd single kidney."""
    seen, with_tumour, single = set(), 0, 0
    for seed in range(16):
        p = render_phantom(seed, scale=SCALE)
        seen.add(p.phase)
        cortex, medulla = _inner_mean(p, Tissue.CORTEX), _inner_mean(p, Tissue.MEDULLA)
        if cortex is not None and medulla is not None:
            if p.phase == "corticomedullary":
                assert cortex > medulla + 40
            elif p.phase == "nephrographic":
                assert abs(cortex - medulla) < 35 and cortex > 120
            else:
                assert cortex < 160 and medulla < 80
        tumour = np.isin(p.tissue, [Tissue.TUMOUR, Tissue.NECROSIS])
        if tumour.any():
            with_tumour += 1
            assert p.label[tumour].all()
        components, n = ndimage.label(p.label)
        single += int(np.bincount(components.ravel())[1:].max() > 0.97 * p.label.sum())
    assert seen == set(synthetic.PHASES)
    assert 6 <= with_tumour <= 15 and single <= 4


def test_anatomy_is_in_ras_voxel_order(phantoms):
    for p in phantoms:
        assert nib.aff2axcodes(p.affine) == ("R", "A", "S")

        def centre(tissue):
            return np.argwhere(p.tissue == tissue).mean(0)

        liver, spleen, aorta, ivc = (centre(t) for t in (Tissue.LIVER, Tissue.SPLEEN, Tissue.AORTA, Tissue.IVC))
        assert liver[0] > spleen[0] and ivc[0] > aorta[0]  # liver and IVC on the patient's right (higher x)
        assert centre(Tissue.MARROW)[1] < aorta[1]  # the aorta lies anterior of the spine
        assert np.argwhere(p.label > 0).mean(0)[1] < liver[1]  # the kidneys lie posterior


def test_spacing_is_anisotropic(phantoms):
    for p in phantoms:
        spacing = np.diag(p.affine)[:3]
        assert p.affine.dtype == np.float64 and np.allclose(p.affine[:3, :3], np.diag(spacing))
        assert spacing[0] == spacing[1] and 0.7 <= spacing[0] <= 0.9 and 2.5 <= spacing[2] <= 5.0
        assert spacing[2] > 2 * spacing[0]


def test_full_size_case_dimensions():
    image, label, _ = generate_case(0)
    assert 2.5e6 < image.size < 9e6 and 300 <= image.shape[0] <= 380 and 40 <= image.shape[2] <= 70
    assert label.sum() > 20000


def test_dataset_files_and_datalist(tmp_path):
    path = _small_dataset(tmp_path)
    assert path == tmp_path / "dataset.json"
    content = json.loads(path.read_text())
    assert content["labels"] == {"0": "background", "1": "kidney"} and content["modality"] == {"0": "CT"}
    assert content["numTraining"] == 2 and content["name"] and content["description"]
    assert [len(content[k]) for k in ("training", "validation", "test", "unlabeled")] == [2, 1, 1, 1]
    for key in ("training", "validation", "test"):
        for item in content[key]:
            assert set(item) == {"image", "label"} and not item["image"].startswith("/")
    assert content["test"][0]["image"].startswith("imagesTs/") and content["test"][0]["label"].startswith("labelsTs/")
    assert set(content["unlabeled"][0]) == {"image"} and content["unlabeled"][0]["image"].startswith("imagesUn/")
    images = [item["image"] for key in ("training", "validation", "test", "unlabeled") for item in content[key]]
    assert len(set(images)) == 5 and all((tmp_path / i).is_file() for i in images)
    assert not (tmp_path / "labelsUn").exists()
    without_unlabeled = json.loads(_small_dataset(tmp_path / "b", num_unlabeled=0).read_text())
    assert "unlabeled" not in without_unlabeled and not (tmp_path / "b" / "imagesUn").exists()
    with pytest.raises(TypeError):
        _small_dataset(tmp_path / "c", no_such_option=1)
    assert not (tmp_path / "c").exists()

    from cpcl_bundle.data import load_datalist

    datalist = load_datalist(path)
    assert datalist["training"][0]["label"] == str(tmp_path / content["training"][0]["label"])


@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
def test_nifti_read_back_by_monai(tmp_path, reader):
    if reader == "ITKReader":
        pytest.importorskip("itk")
    from monai.transforms import LoadImage

    path = _small_dataset(tmp_path, num_training=1, num_validation=0, num_test=0, num_unlabeled=0)
    content = json.loads(path.read_text())
    item = content["training"][0]
    image, label, affine = generate_case(case_seed(3, "training", 0), scale=0.3)
    loaded = LoadImage(reader=reader, image_only=True, dtype=None)(str(tmp_path / item["image"]))
    loaded_label = LoadImage(reader=reader, image_only=True, dtype=None)(str(tmp_path / item["label"]))
    header_spacing = loaded.meta["pixdim"][1:4] if reader == "NibabelReader" else loaded.meta["spacing"]
    assert np.allclose(np.asarray(header_spacing, float), np.diag(affine)[:3], atol=1e-6)
    assert np.allclose(np.asarray(loaded.pixdim, float), np.diag(affine)[:3], atol=1e-6)
    assert np.allclose(np.asarray(loaded.affine, float), affine, atol=1e-4)
    assert np.array_equal(np.asarray(loaded), image) and np.array_equal(np.asarray(loaded_label), label)
    assert np.asarray(loaded).dtype == np.int16 and np.asarray(loaded_label).dtype == np.uint8


def test_same_seed_same_bytes_across_workers_other_seed_differs(tmp_path):
    _small_dataset(tmp_path / "a", workers=1)
    _small_dataset(tmp_path / "b", workers=2)
    _small_dataset(tmp_path / "c", workers=1, seed=4)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert len(a) == 10 and a == b  # 5 images, 4 labels, dataset.json
    assert all(data[:2] == b"\x1f\x8b" and data[4:8] == bytes(4) for name, data in a.items() if name.endswith(".gz"))
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a if name.startswith("images"))


def test_case_seeds_are_independent_of_other_splits():
    seeds = {case_seed(0, split, i) for split in synthetic.SPLITS for i in range(20)}
    assert len(seeds) == 80 and case_seed(0, "test", 3) == case_seed(0, "test", 3) != case_seed(1, "test", 3)


def test_existing_dataset_is_kept_and_interrupted_run_leaves_no_datalist(tmp_path, monkeypatch):
    path = _small_dataset(tmp_path)
    before = _files(tmp_path)

    def fail(*args, **kwargs):
        raise RuntimeError("generator called")

    monkeypatch.setattr(synthetic, "generate_case", fail)
    assert _small_dataset(tmp_path) == path and _files(tmp_path) == before
    with pytest.warns(UserWarning, match="exists, made with"):
        _small_dataset(tmp_path, seed=5)
    with pytest.raises(RuntimeError, match="generator called"):
        _small_dataset(tmp_path, overwrite=True)
    assert not path.exists()  # removed before regenerating, written only at the end


def test_tumour_label_makes_the_tumour_a_class_of_its_own(tmp_path):
    """--tumour_label: the same image, the same union of labels, the tumour (necrotic core included) as 2."""
    with_tumour = 0
    for seed in range(8):
        binary, three = render_phantom(seed, scale=SCALE), render_phantom(seed, scale=SCALE, tumour_label=True)
        assert np.array_equal(three.image, binary.image) and np.array_equal(three.affine, binary.affine)
        assert np.array_equal(three.label > 0, binary.label.astype(bool))
        tumour_tissue = np.isin(three.tissue, [Tissue.TUMOUR, Tissue.NECROSIS])
        if tumour_tissue.any():
            with_tumour += 1
            assert set(np.unique(three.label).tolist()) == {0, 1, 2}
            assert (three.label[tumour_tissue] == 2).all()  # every tumour voxel is class 2 ...
            assert np.isin(three.tissue[three.label == 2], [Tissue.TUMOUR, Tissue.NECROSIS]).mean() > 0.97  # ... only
        else:
            assert set(np.unique(three.label).tolist()) == {0, 1}
    assert with_tumour >= 2
    datalist = json.loads(_small_dataset(tmp_path / "three", tumour_label=True).read_text())
    assert datalist["labels"] == {"0": "background", "1": "kidney", "2": "tumour"}
    assert datalist["generator"]["options"]["tumour_label"] is True
    assert json.loads(_small_dataset(tmp_path / "two").read_text())["labels"] == {"0": "background", "1": "kidney"}
