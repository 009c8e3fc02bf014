# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Prototype functions against the literal definition: upsample, then loop over images and classes."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cpcl_bundle.prototypes import (
    interpolation_matrix,
    masked_average_prototypes,
    masked_average_prototypes_per_image,
    prototype_logits,
    prototype_probabilities,
    upsampled_feature_norm_sq,
)

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample(f, size):
    return F.interpolate(f, size=tuple(size), mode=MODES[f.ndim - 2], align_corners=False)


def brute_prototypes(features, labels, k):
    """Eq. 3/4/8 literally: upsample, per-image masked mean, mean over images where the class is present."""
    up = upsample(features, labels.shape[2:])
    protos, present = [], []
    for j in range(k):
        per_image = []
        for b in range(features.shape[0]):
            mask = labels[b, 0] == j
            if mask.any():
                per_image.append(up[b][:, mask].mean(dim=1))
        present.append(bool(per_image))
        protos.append(torch.stack(per_image).mean(0) if per_image else torch.zeros(features.shape[1]))
    return torch.stack(protos), torch.tensor(present)


def brute_probabilities(features, prototypes, size, scale=20.0):
    """Eq. 5/9 literally: upsample, then for every prototype the cosine at every voxel, softmax over classes."""
    up = upsample(features, size)
    logits = []
    for p in prototypes:
        cos = (up * p.view(1, -1, *([1] * (up.ndim - 2)))).sum(1) / (up.norm(dim=1) * p.norm())
        logits.append(scale * cos)
    return torch.softmax(torch.stack(logits, 1), 1)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


CASES = [  # (feature grid, label grid, number of classes)
    ((3, 3, 3), (48, 48, 48), 2),
    ((6, 5, 4), (96, 40, 17), 2),
    ((4, 4, 4), (16, 16, 16), 3),
    ((8, 8, 8), (8, 8, 8), 3),  # already at full size
    ((12, 10, 9), (24, 20, 18), 2),  # a half-resolution decoder stage
    ((5, 7), (20, 13), 3),  # 2-D
]


@pytest.mark.parametrize("low,size,k", CASES)
def test_masked_average_prototypes_equals_definition(low, size, k):
    features = torch.randn(3, 7, *low)
    labels = torch.randint(0, k, (3, 1, *size))
    labels[1][labels[1] == k - 1] = 0  # class k-1 absent from image 1: excluded from its mean
    protos, present = masked_average_prototypes(features, labels, k)
    ref, ref_present = brute_prototypes(features, labels, k)
    assert protos.shape == (k, 7) and present.dtype == torch.bool
    assert torch.equal(present, ref_present)
    assert rel_err(protos, ref) < 1e-5


@pytest.mark.parametrize("low,size,k", CASES)
def test_prototype_probabilities_equal_definition(low, size, k):
    features = torch.randn(2, 9, *low)
    prototypes = torch.randn(k, 9)
    probs = prototype_probabilities(features, prototypes, size)
    ref = brute_probabilities(features, prototypes, size)
    assert probs.shape == (2, k, *size)
    assert rel_err(probs, ref) < 1e-5
    assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-6)


def test_gradients_equal_definition():
    features = torch.randn(2, 16, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (2, 1, 32, 40, 24))
    target = torch.randint(0, 2, (2, 32, 40, 24))
    protos, _ = masked_average_prototypes(features, labels, 2)
    loss = F.nll_loss(torch.log(prototype_probabilities(features, protos, labels.shape[2:])), target)
    (grad,) = torch.autograd.grad(loss, features)
    ref_protos, _ = brute_prototypes(features, labels, 2)
    ref_loss = F.nll_loss(torch.log(brute_probabilities(features, ref_protos, labels.shape[2:])), target)
    (ref_grad,) = torch.autograd.grad(ref_loss, features)
    assert rel_err(loss, ref_loss) < 1e-10
    assert rel_err(grad, ref_grad) < 1e-8


def test_class_absent_from_batch_is_reported_and_never_nan():
    features = torch.randn(2, 5, 3, 3, 3, requires_grad=True)
    labels = torch.zeros(2, 1, 12, 12, 12, dtype=torch.long)  # only background
    protos, present = masked_average_prototypes(features, labels, 3)
    assert present.tolist() == [True, False, False]
    assert torch.equal(protos[1:], torch.zeros(2, 5))
    probs = prototype_probabilities(features, protos, (12, 12, 12))
    probs.sum().backward()
    assert torch.isfinite(probs).all() and torch.isfinite(features.grad).all()


def test_one_hot_labels_and_label_dtype_give_the_same_prototypes():
    features = torch.randn(2, 4, 3, 3, 3)
    labels = torch.randint(0, 3, (2, 1, 9, 9, 9))
    one_hot = F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    a, _ = masked_average_prototypes(features, labels, 3)
    b, _ = masked_average_prototypes(features, one_hot, 3)
    c, _ = masked_average_prototypes(features, labels.float(), 3)
    assert torch.allclose(a, b) and torch.allclose(a, c)


def test_confidence_weighting_is_a_weighted_mean():
    features = torch.randn(2, 6, 4, 4, 4)
    labels = torch.randint(0, 2, (2, 1, 16, 16, 16))
    weights = torch.rand(2, 2, 16, 16, 16)
    protos, _ = masked_average_prototypes_per_image(features, labels, 2, weights)
    up = upsample(features, (16, 16, 16))
    for b in range(2):
        for j in range(2):
            w = weights[b, j] * (labels[b, 0] == j)
            ref = (up[b] * w).flatten(1).sum(1) / w.sum()
            assert rel_err(protos[b, j], ref) < 1e-5


def test_per_image_prototypes_pair_with_their_image():
    features = torch.randn(2, 6, 3, 3, 3)
    protos = torch.randn(2, 2, 6)  # [B, K, C]
    probs = prototype_probabilities(features, protos, (12, 12, 12))
    for b in range(2):
        ref = brute_probabilities(features[b : b + 1], protos[b], (12, 12, 12))
        assert rel_err(probs[b : b + 1], ref) < 1e-5


def test_interpolation_matrix_reproduces_torch():
    x = torch.randn(3, 2, 7)
    m = interpolation_matrix(7, 19)
    assert torch.allclose(x @ m.t(), F.interpolate(x, size=19, mode="linear", align_corners=False), atol=1e-6)


def test_norm_of_upsampled_features_matches_even_for_anticorrelated_neighbours():
    features = torch.randn(1, 8, 4, 4, 4)
    features[..., 1::2] = -features[..., ::2]  # neighbours cancel: the norm is tiny between them
    got = upsampled_feature_norm_sq(features, (16, 16, 16))
    ref = upsample(features, (16, 16, 16)).pow(2).sum(1)
    assert torch.allclose(got, ref, atol=1e-4 * ref.max().item())


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_upsampled_feature_map():
    """At the paper's layer (256 channels at 1/16 of the crop) no tensor of B x C x S is ever built."""
    b, c, size = 2, 256, (48, 48, 48)
    features = torch.randn(b, c, 3, 3, 3, requires_grad=True)
    labels = torch.randint(0, 2, (b, 1, *size))
    with _LargestTensor() as probe:
        protos, _ = masked_average_prototypes(features, labels, 2)
        logits = prototype_logits(features, protos, size)
        F.cross_entropy(logits, labels[:, 0]).backward()
    full = b * c * 48**3
    assert probe.largest <= 2 * b * 48**3 < full // 64  # only K-channel maps at full size


def test_bad_inputs_name_the_cause():
    with pytest.raises(ValueError, match="label values"):
        masked_average_prototypes(torch.randn(1, 2, 2, 2, 2), torch.full((1, 1, 4, 4, 4), 3), 2)
    with pytest.raises(ValueError, match="batch sizes"):
        masked_average_prototypes(torch.randn(2, 2, 2, 2, 2), torch.zeros(1, 1, 4, 4, 4), 2)
    with pytest.raises(ValueError, match="prototypes must be"):
        prototype_logits(torch.randn(2, 3, 2, 2, 2), torch.randn(3, 2, 3), (4, 4, 4))
