# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""BodyCropd is MONAI's CropForegroundd with an ``x > threshold`` select_fn and the bundle's defaults (margin 2,
labels optional): the same crops, boxes and inverse as CropForegroundd built by hand, on a few CT-like volumes.
RobustSpacingd's inverse in slabs equals the whole-volume inverse."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, Invertd

from cpcl_bundle.transforms import AboveThreshold, BodyCropd

SHAPE = (20, 18, 12)
#: Body boxes (start, end) in voxels, several per volume, and the crop box BodyCropd must find (margin 2;
#: MONAI's default allow_smaller=False pads where the margin passes the volume's edge: start < 0 or end > shape).
CASES = {
    "inside": ([((4, 3, 2), (15, 12, 10))], ((2, 1, 0), (17, 14, 12))),
    "on_the_edges": ([((0, 5, 3), (10, 18, 9))], ((-2, 3, 1), (12, 20, 11))),
    "two_bodies": ([((3, 2, 4), (6, 5, 7)), ((12, 10, 1), (16, 14, 3))], ((1, 0, -1), (18, 16, 9))),
    "one_voxel": ([((9, 9, 6), (10, 10, 7))], ((7, 7, 4), (12, 12, 9))),
}


def _volume(bodies, seed=0) -> dict:
    """Raw CT in HU: air (-1000 with noise, never above -700) around soft-tissue boxes; a label inside each."""
    rng = np.random.default_rng(seed)
    image = -1000.0 + 100.0 * rng.random(SHAPE)
    label = np.zeros(SHAPE)
    for start, end in bodies:
        box = tuple(slice(s, e) for s, e in zip(start, end))
        image[box] = 40.0 + 20.0 * rng.standard_normal(image[box].shape)
        label[box] = 1.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    return {
        "image": MetaTensor(torch.as_tensor(image, dtype=torch.float32)[None], affine=affine),
        "label": MetaTensor(torch.as_tensor(label, dtype=torch.float32)[None], affine=affine),
    }


def _by_hand(keys, **kwargs) -> CropForegroundd:
    """CropForegroundd with what BodyCropd sets: source "image", x > -500, margin 2, missing keys allowed."""
    return CropForegroundd(
        keys, source_key="image", select_fn=lambda x: x > -500.0, margin=2, allow_missing_keys=True, **kwargs
    )


def test_body_crop_is_monais_crop_foreground():
    crop = BodyCropd(["image", "label"], threshold=-300)
    assert isinstance(crop, CropForegroundd)
    assert isinstance(crop.cropper.select_fn, AboveThreshold) and crop.cropper.select_fn.threshold == -300.0
    assert crop.cropper.margin == 2 and crop.allow_missing_keys and crop.source_key == "image"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("keys", [["image", "label"], ["image"]], ids=["labeled", "unlabeled"])
def test_same_crop_box_and_inverse_as_crop_foreground(case, keys):
    bodies, (start, end) = CASES[case]
    data = _volume(bodies)
    if keys == ["image"]:  # an unlabeled image, cropped by a transform that lists the label (allow_missing_keys)
        data.pop("label")
    ours, theirs = Compose([BodyCropd(["image", "label"])]), Compose([_by_hand(["image", "label"])])
    got, expected = ours(dict(data)), theirs(dict(data))
    assert list(got["foreground_start_coord"]) == list(start) and list(got["foreground_end_coord"]) == list(end)
    for key in ("foreground_start_coord", "foreground_end_coord"):
        np.testing.assert_array_equal(got[key], expected[key])
    for key in keys:
        assert got[key].shape[1:] == tuple(e - s for s, e in zip(start, end))
        assert torch.equal(got[key].as_tensor(), expected[key].as_tensor())
        np.testing.assert_array_equal(got[key].affine, expected[key].affine)
    assert ("label" in got) == ("label" in keys)
    # the inverse, as inference's postprocessing applies it (Invertd of the preprocessing, on the prediction)
    inverted = []
    for pipeline, out in ((ours, got), (theirs, expected)):
        pred = {**out, "pred": MetaTensor(out["image"].as_tensor() + 2000.0, meta=out["image"].meta)}
        invert = Invertd("pred", transform=pipeline, orig_keys="image", nearest_interp=False, to_tensor=True)
        inverted.append(invert(pred)["pred"])
    assert inverted[0].shape == data["image"].shape and torch.equal(inverted[0].as_tensor(), inverted[1].as_tensor())
    np.testing.assert_array_equal(inverted[0].affine, data["image"].affine)
    inside = tuple(slice(max(s, 0), min(e, n)) for s, e, n in zip(start, end, SHAPE))
    assert torch.equal(inverted[0][0][inside], data["image"][0][inside] + 2000.0)  # the crop's voxels back in place
    assert float(inverted[0].sum()) == pytest.approx(float((data["image"][0][inside] + 2000.0).sum()), rel=1e-6)


def test_crop_foreground_arguments_pass_through():
    data = _volume(CASES["inside"][0], seed=3)
    got = BodyCropd(["image", "label"], threshold=-500, margin=1, k_divisible=4)(dict(data))
    expected = CropForegroundd(
        ["image", "label"], source_key="image", select_fn=lambda x: x > -500.0, margin=1, k_divisible=4
    )(dict(data))
    assert got["image"].shape[1:] == (16, 12, 12)
    assert torch.equal(got["image"].as_tensor(), expected["image"].as_tensor())
    assert torch.equal(got["label"].as_tensor(), expected["label"].as_tensor())


@pytest.mark.parametrize("affine", [np.diag([0.8, 0.8, 1.0, 1.0]), np.diag([-0.8, 0.7, 1.3, 1.0])])
def test_inverse_in_slabs_equals_the_whole_volume_inverse(affine):
    """RobustSpacingd's inverse (Invertd's path back to the input grid) in slabs of one slice gives the values,
    shape and affine of MONAI's whole-volume inverse (``inverse_slab_voxels=None``)."""
    import copy

    from cpcl_bundle.transforms import RobustSpacingd

    affine = affine.copy()
    affine[:3, 3] = [-12.0, 7.5, 3.0]
    image = MetaTensor(torch.rand(2, 20, 16, 12, generator=torch.Generator().manual_seed(0)), affine=affine)
    outputs = {}
    for slab in (None, 20 * 16):  # the whole volume; one slice of the original grid at a time
        spacing = RobustSpacingd("image", pixdim=(2.0, 2.0, 2.0), mode="bilinear", inverse_slab_voxels=slab)
        forward = spacing({"image": copy.deepcopy(image)})
        outputs[slab] = spacing.inverse(forward)["image"]
    whole, slabs = outputs[None], outputs[20 * 16]
    assert whole.shape == slabs.shape == image.shape
    assert torch.allclose(torch.as_tensor(whole).float(), torch.as_tensor(slabs), atol=1e-5)
    assert torch.allclose(whole.affine.double(), slabs.affine.double()) and torch.allclose(
        slabs.affine.double(), torch.as_tensor(affine)
    )
