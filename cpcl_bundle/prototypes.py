# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Prototypes of CPCL: masked average pooling (Eq. 3, 4, 8) and prototype prediction (Eq. 5, 9).

The paper upsamples the feature map ``F`` (``[B, C, *s]``, e.g. the encoder bottleneck, 256 channels at
1/16 of the crop) to the mask size ``S`` by trilinear interpolation and works there. Done literally this
builds a ``B x C x S`` tensor (12.5 GB and 18 s forward + backward for 256 channels to 96^3 on two CPU
cores). Both functions below compute *exactly the same quantities* without it:

* Masked average pooling is linear in the features. With ``U`` the (separable) interpolation operator,
  ``sum_x (U f)(x) m(x) = <f, U^T m>``: the mask is brought down to the feature grid by the adjoint of the
  upsampling (one small matrix per axis), and pooled there.
* The cosine map needs ``<(U f)(x), p>`` and ``|(U f)(x)|``. The first is ``U (f . p)``: project on the
  prototypes at low resolution, upsample only ``K`` maps. The second is a quadratic form: in every axis a
  row of the linear-interpolation matrix has at most two neighbouring non-zeros, so
  ``|(U f)(x)|^2 = sum_{delta in {-1,0,1}^n} (P^delta G^delta)(x)`` where
  ``G^delta(y) = <f(y), f(y + delta)>`` are 3^n low-resolution Gram fields and
  ``P^delta = (x) axis-wise U[x, i] U[x, i + delta_axis]`` is applied axis by axis. Memory is ``O(B S)``,
  never ``O(B C S)``, and autograd differentiates all of it.

Both are checked in the tests against the literal upsample-then-pool / upsample-then-cosine definition.
"""

from __future__ import annotations

import functools
import itertools
import string
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "interpolation_matrix",
    "masked_average_prototypes",
    "masked_average_prototypes_per_image",
    "prototype_logits",
    "prototype_probabilities",
    "upsampled_feature_norm_sq",
    "one_hot_labels",
]

_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


@functools.lru_cache(maxsize=128)
def _interpolation_matrix_cached(in_size: int, out_size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    eye = torch.eye(in_size, dtype=torch.float64, device=device)[None]  # [1, in (channels), in (length)]
    rows = F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0]  # [in, out]
    return rows.t().contiguous().to(dtype)  # [out, in]


def interpolation_matrix(
    in_size: int, out_size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ``[out_size, in_size]`` matrix of 1-D linear interpolation with ``align_corners=False``.

    It is obtained by interpolating the identity with :func:`torch.nn.functional.interpolate`, so it holds
    exactly the weights PyTorch uses; (bi/tri)linear interpolation is the tensor product of these matrices.
    """
    return _interpolation_matrix_cached(int(in_size), int(out_size), str(torch.device(device)), dtype)


def _letters(n: int, skip: str = "") -> str:
    pool = [c for c in string.ascii_letters if c not in skip]
    return "".join(pool[:n])


def _apply_axis(t: torch.Tensor, mat: torch.Tensor, axis: int) -> torch.Tensor:
    """Contract dimension ``axis`` of ``t`` with the second index of ``mat`` (``[new, old]``)."""
    return torch.movedim(torch.movedim(t, axis, -1) @ mat.t(), -1, axis)


def _spatial_size(size: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(size, int):
        return (int(size),) * n
    size = tuple(int(s) for s in size)
    if len(size) != n:
        raise ValueError(f"size {size} does not match the {n} spatial dimensions of the features")
    return size


def one_hot_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, 1, *S]`` class indices (or an already one-hot ``[B, K, *S]``) to a float one-hot ``[B, K, *S]``."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background and one class), got {num_classes}")
    if labels.ndim < 3:
        raise ValueError(f"labels must be [B, 1, *S] or [B, K, *S], got shape {tuple(labels.shape)}")
    labels = labels.as_tensor() if hasattr(labels, "as_tensor") else labels
    if labels.shape[1] == num_classes:  # already one-hot (num_classes >= 2, so never a 1-channel index map)
        return labels.float()
    if labels.shape[1] != 1:
        raise ValueError(
            f"labels have {labels.shape[1]} channels: expected 1 (class indices) or {num_classes} (one-hot)"
        )
    idx = labels[:, 0].round().long() if labels.is_floating_point() else labels[:, 0].long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        raise ValueError(f"label values must lie in [0, {num_classes - 1}], found [{int(idx.min())}, {int(idx.max())}]")
    return torch.movedim(F.one_hot(idx, num_classes), -1, 1).float()


def _check_features(features: torch.Tensor, mask_shape: Sequence[int]) -> None:
    if features.ndim < 3:
        raise ValueError(f"features must be [B, C, *s], got shape {tuple(features.shape)}")
    if features.ndim != len(mask_shape):
        raise ValueError(
            f"features {tuple(features.shape)} and mask {tuple(mask_shape)} differ in the number of dimensions"
        )
    if features.shape[0] != mask_shape[0]:
        raise ValueError(f"batch sizes differ: features {features.shape[0]}, labels {mask_shape[0]}")


def masked_average_prototypes_per_image(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image masked average pooling of the upsampled features (Eq. 3 and 8, inner fraction).

    ``proto[b, k] = sum_x (U F_b)(x) w_bk(x) / sum_x w_bk(x)`` with ``w_bk = 1[Y_b = k]`` (times ``weights``
    when given: the released code's confidence weighting), where ``U`` is trilinear upsampling
    (``align_corners=False``) from the feature grid ``s`` to the label grid ``S``.

    Args:
        features: ``[B, C, *s]``, any resolution (``s`` may equal ``S``).
        labels: ``[B, 1, *S]`` class indices or ``[B, K, *S]`` one-hot.
        num_classes: ``K``.
        weights: optional non-negative ``[B, K, *S]`` or ``[B, 1, *S]`` voxel weights.

    Returns:
        ``(prototypes [B, K, C], present [B, K] bool)``. A class absent from an image (zero mask) gives a
        zero prototype and ``present = False``; never NaN.
    """
    mask = one_hot_labels(labels, num_classes).to(features.device)
    _check_features(features, mask.shape)
    present = mask.flatten(2).sum(-1) > 0
    if weights is not None:
        mask = mask * weights.to(device=features.device, dtype=mask.dtype)
    compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    feats = features.to(compute_dtype)
    mask = mask.to(compute_dtype)
    denom = mask.flatten(2).sum(-1)  # [B, K]
    low = mask
    for axis, (n_in, n_out) in enumerate(zip(feats.shape[2:], mask.shape[2:])):
        if n_in != n_out:  # adjoint of the upsampling along this axis: U^T m
            low = _apply_axis(low, interpolation_matrix(n_in, n_out, feats.device, compute_dtype).t(), axis + 2)
    numer = torch.einsum("bc...,bk...->bkc", feats, low)
    present = present & (denom > 0)
    protos = numer / denom.clamp_min(torch.finfo(compute_dtype).tiny).unsqueeze(-1)
    protos = torch.where(present.unsqueeze(-1), protos, torch.zeros_like(protos))
    return protos, present


def masked_average_prototypes(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes of a batch by masked average pooling (Eq. 3, 4 and 8).

    ``p_k = mean over the images b where class k is present of proto[b, k]``, with the per-image masked mean
    of :func:`masked_average_prototypes_per_image`. **Decision** (docs/design/cpcl-method.md): an image without class k
    does not take part in ``p_k``; a class absent from the whole batch gets a zero prototype and
    ``present[k] = False``, so the caller can skip the loss term that needs it.

    Args:
        features: ``[B, C, *s]`` at any resolution (trilinearly upsampled to ``S`` by definition).
        labels: ``[B, 1, *S]`` class indices or ``[B, K, *S]`` one-hot.
        num_classes: ``K``.
        weights: optional voxel weights (confidence weighting of the released code).

    Returns:
        ``(prototypes [K, C], present [K] bool)``.
    """
    per_image, present_bk = masked_average_prototypes_per_image(features, labels, num_classes, weights)
    counts = present_bk.sum(0)  # [K]
    protos = per_image.sum(0) / counts.clamp_min(1).unsqueeze(-1).to(per_image.dtype)
    return protos, counts > 0


def _offset_matrices(mat: torch.Tensor) -> torch.Tensor:
    """``[3, S, s]``: ``P^delta[x, i] = U[x, i] U[x, i + delta]`` for ``delta = -1, 0, 1`` (zero outside)."""
    padded = F.pad(mat, (1, 1))  # [S, s + 2]
    s = mat.shape[1]
    return torch.stack([mat * padded[:, 1 + d : 1 + d + s] for d in (-1, 0, 1)])


def upsampled_feature_norm_sq(features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``|(U F)(x)|^2`` for every voxel ``x`` of ``size``, without building ``U F`` (``[B, *S]``).

    Exact for (bi/tri)linear upsampling with ``align_corners=False``: the quadratic form of the separable
    two-tap interpolation is a sum over neighbour offsets ``delta in {-1, 0, 1}^n`` of low-resolution Gram
    fields ``<F(y), F(y + delta)>`` carried to ``S`` by axis-wise products of interpolation weights.
    """
    n = features.ndim - 2
    size = _spatial_size(size, n)
    low = tuple(features.shape[2:])
    if low == size:
        return features.pow(2).sum(1)
    padded = F.pad(features, (1, 1) * n)
    grams = []
    for delta in itertools.product((-1, 0, 1), repeat=n):
        shifted = padded[(slice(None), slice(None)) + tuple(slice(1 + d, 1 + d + s) for d, s in zip(delta, low))]
        grams.append((features * shifted).sum(1))
    gram = torch.stack(grams, 1).reshape(features.shape[0], *([3] * n), *low)  # [B, 3..3, *s]
    # contract axis by axis, the last first: offsets o_d and grid s_d -> output S_d
    offs, grid, outs = _letters(n, "b"), _letters(2 * n, "b")[n:], _letters(3 * n, "b")[2 * n :]
    for d in reversed(range(n)):
        p = _offset_matrices(interpolation_matrix(low[d], size[d], features.device, features.dtype))
        # current layout: b, offsets[:d+1], grid[:d+1], outs[d+1:]
        src = "b" + offs[: d + 1] + grid[: d + 1] + outs[d + 1 :]
        dst = "b" + offs[:d] + grid[:d] + outs[d:]
        gram = torch.einsum(f"{src},{offs[d]}{outs[d]}{grid[d]}->{dst}", gram, p)
    return gram


def prototype_logits(
    features: torch.Tensor, prototypes: torch.Tensor, size: int | Sequence[int], scale: float = 20.0, eps: float = 1e-12
) -> torch.Tensor:
    """``scale * cos((U F)(x), p_k)`` at every voxel of ``size`` (Eq. 5 and 9 before the softmax).

    Since the cosine distance is ``d = 1 - cos``, ``softmax_k(-scale d)`` equals ``softmax_k(scale cos)``,
    so these are the logits of the prototype prediction. Norms are clamped at ``eps`` as
    :func:`torch.nn.functional.normalize` does, so zero vectors (an absent prototype) give 0, never NaN.

    Args:
        features: ``[B, C, *s]`` at any resolution.
        prototypes: ``[K, C]`` (shared by the batch) or ``[B, K, C]`` (per-image pairing).
        size: the output grid ``S``.
        scale: ``alpha`` of Eq. 5 (20 in the paper).

    Returns:
        ``[B, K, *S]``.
    """
    n = features.ndim - 2
    size = _spatial_size(size, n)
    compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    feats = features.to(compute_dtype)
    protos = prototypes.to(device=feats.device, dtype=compute_dtype)
    if protos.ndim == 2:
        dots = torch.einsum("bc...,kc->bk...", feats, protos)
    elif protos.ndim == 3 and protos.shape[0] == feats.shape[0]:
        dots = torch.einsum("bc...,bkc->bk...", feats, protos)
    else:
        raise ValueError(f"prototypes must be [K, C] or [B, K, C] with B = {feats.shape[0]}, got {tuple(protos.shape)}")
    if tuple(feats.shape[2:]) != size:
        dots = F.interpolate(dots, size=size, mode=_LINEAR_MODE[n], align_corners=False)
    norm_f = upsampled_feature_norm_sq(feats, size).clamp_min(eps * eps).sqrt().unsqueeze(1)  # [B, 1, *S]
    norm_p = protos.norm(dim=-1).clamp_min(eps)  # [K] or [B, K]
    norm_p = norm_p.reshape(*norm_p.shape, *([1] * n)) if protos.ndim == 3 else norm_p.reshape(-1, *([1] * n))
    return scale * dots / (norm_f * norm_p)


def prototype_probabilities(
    features: torch.Tensor, prototypes: torch.Tensor, size: int | Sequence[int], scale: float = 20.0
) -> torch.Tensor:
    """Prototype prediction ``P(j)(x) = softmax_j(-scale d(F(x), p_j))`` with cosine distance (Eq. 5, 9).

    Args:
        features: ``[B, C, *s]`` (trilinearly upsampled to ``size`` by definition).
        prototypes: ``[K, C]`` or ``[B, K, C]``.
        size: the output grid ``S``.
        scale: ``alpha`` (20 in the paper).

    Returns:
        ``[B, K, *S]`` probabilities summing to one over ``K``.
    """
    return torch.softmax(prototype_logits(features, prototypes, size, scale), dim=1)
