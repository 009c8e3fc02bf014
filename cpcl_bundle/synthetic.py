# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The embedded default data set: deterministic CT-like abdominal phantoms with the kidneys as target.

Each case is a contrast-enhanced abdominal CT in Hounsfield units (int16) with anisotropic voxels (0.7-0.9 mm
in-plane, 2.5-5 mm slices) and a binary kidney label (both kidneys with any tumour, as KiTS19's kidney-and-tumour
foreground; cysts and the renal sinus included, the hilum opening not). Arrays are in RAS voxel order: axis 0
runs from the patient's left to right, axis 1 from posterior to anterior, axis 2 from inferior to superior (the
thick-slice axis); the affine is ``diag(spacing)`` plus the position of the first voxel (mm, body-centred).

Design. Every structure is an implicit function evaluated with numpy on the voxel coordinates of its own
bounding box: the body section (skin, subcutaneous fat, abdominal wall, back muscles) in 2-D, then bowel
loops and colon with irregular gas pockets, liver, spleen, psoas, spine (cortex, marrow, discs, posterior
arch), aorta, IVC, the two kidneys (bean shape with bright cortex, darker medullary pyramids, sinus fat
and pelvis at the medial-anterior hilum, a perirenal fat rim of varying thickness, renal artery and vein) and
a renal tumour. Structures are painted in anatomical order into a tissue-index volume, so organs touch where
they meet. All randomness (pose, size, tilt, smooth deformation, cysts, tumour, contrast phase and timing,
field of view; the noise last) comes from one generator seeded by the case's seed: a seed gives the same case
on every run. Random smooth fields (deformations, organ surfaces, textures, bowel loops and gas) are random
tensor products of cosines, three small tensor contractions per field. The volume is rendered at three
sub-slices per slice and averaged (partial volume over the slab thickness), then blurred in-plane by a
Gaussian point-spread function together with white noise, so the noise is spatially correlated and has
exactly the sampled standard deviation. The label is the kidney sampled at the voxel centres of the output
grid.

What makes the task hard (docs/design/phantom.md), so that a few labeled cases do not cover it: three contrast phases
(:data:`PHASES`: corticomedullary, where the cortex is the bright signal; nephrographic, where cortex and
medulla are alike; early or poor enhancement, where the cortex is no brighter than the spleen); renal tumours
in three cases of four (1.6-8 cm, exophytic or not, hyper- or hypo-enhancing, larger ones necrotic; labeled
kidney, and as dark as muscle or bowel in some cases); one kidney absent in a few cases; spleen, aorta, IVC and
renal vessels as bright as or brighter than the medulla; liver and medulla overlapping in HU; renal sinus fat
(labeled) matching the perirenal fat (not labeled); the perirenal fat rim vanishing in places, so the kidneys
touch liver, spleen, psoas and bowel; thick slices blurring the poles; noise of 10-30 HU; pose, size and field
of view varying per case, a kidney sometimes small or partly out of the field of view, and cysts (near water,
labeled kidney) in some kidneys.
"""

from __future__ import annotations

import enum
import gzip
import inspect
import json
import math
import multiprocessing
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["Tissue", "Phantom", "render_phantom", "generate_case", "case_seed", "generate_dataset", "SPLITS"]

#: Sub-slices rendered per output slice (odd: the middle one lies on the voxel centre and gives the label).
SUB = 3

#: Tissue value of a part's voxels that the part leaves untouched.
NONE = 255

#: Data-set splits, in the order that enters each case's seed (:func:`case_seed`).
SPLITS = ("training", "validation", "test", "unlabeled")
#: ``dataset.json`` labels: the default kidney label, and with ``tumour_label`` the tumour as a class of its own.
LABELS = {"0": "background", "1": "kidney"}
LABELS_WITH_TUMOUR = {"0": "background", "1": "kidney", "2": "tumour"}

_FOLDERS: dict[str, tuple[str, str | None]] = {
    "training": ("imagesTr", "labelsTr"),
    "validation": ("imagesTr", "labelsTr"),
    "test": ("imagesTs", "labelsTs"),
    "unlabeled": ("imagesUn", None),
}
_CASE_FILE = re.compile(r"case_\d+\.nii\.gz")


class Tissue(enum.IntEnum):
    """Tissue classes of the rendered phantom (index into the per-case HU table)."""

    AIR = 0
    SKIN = 1
    SUBCUTANEOUS_FAT = 2
    MUSCLE = 3
    VISCERAL_FAT = 4
    BONE = 5
    MARROW = 6
    DISC = 7
    CSF = 8
    AORTA = 9
    IVC = 10
    LIVER = 11
    SPLEEN = 12
    BOWEL_WALL = 13
    BOWEL_CONTENT = 14
    STOOL = 15
    GAS = 16
    PERIRENAL_FAT = 17
    RENAL_ARTERY = 18
    RENAL_VEIN = 19
    CORTEX = 20
    MEDULLA = 21
    SINUS = 22
    PELVIS = 23
    CYST = 24
    TUMOUR = 25
    NECROSIS = 26


#: Contrast phases of the phantoms: late-arterial with corticomedullary differentiation (as most of KiTS19),
#: nephrographic (cortex and medulla alike) and early or poor enhancement (cortex no brighter than the spleen).
PHASES = ("corticomedullary", "nephrographic", "early")
PHASE_PROBABILITIES = (0.5, 0.3, 0.2)
#: Share of cases with a renal tumour (labeled kidney, as KiTS19's kidney-and-tumour foreground).
TUMOUR_PROBABILITY = 0.75
#: Share of cases after a nephrectomy (one kidney absent).
ABSENT_KIDNEY_PROBABILITY = 0.06
#: Recorded in ``dataset.json``: data sets made by another version are reported, not silently reused.
GENERATOR_VERSION = 2


T = Tissue


@dataclass(frozen=True)
class Phantom:
    """One rendered case: ``image`` HU int16 [X, Y, Z], ``label`` uint8 {0, 1}, ``affine`` 4x4, and ``tissue``
    (uint8 :class:`Tissue` at the voxel centres, for checks and statistics)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray
    phase: str = PHASES[0]


# ----------------------------------------------------------------------------------------------------------
# random smooth fields, grids and painting


@dataclass(frozen=True)
class _Field:
    """A smooth random field of about unit standard deviation: a random tensor product of cosines."""

    freq: np.ndarray  # [3, n] cycles per mm
    phase: np.ndarray  # [3, n]
    weight: np.ndarray  # [n, n, n]

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Values on the grid of the 1-D coordinates ``x``, ``y``, ``z`` (mm): float32 [len(x), len(y), len(z)]."""
        bx, by, bz = (
            (math.sqrt(2.0) * np.cos(2 * np.pi * f[:, None] * np.asarray(c, np.float64)[None, :] + p[:, None])).astype(
                np.float32
            )
            for f, p, c in zip(self.freq, self.phase, (x, y, z))
        )
        # numpy's own einsum loops, not BLAS: fast for these shapes and independent of the thread count
        a = np.einsum("abc,ai->ibc", self.weight, bx)
        a = np.einsum("ibc,bj->ijc", a, by)
        return np.einsum("ijc,ck->ijk", a, bz)


def _random_field(rng: np.random.Generator, wavelength: float, terms: int = 3) -> _Field:
    """A field with features of about ``wavelength`` mm (``terms`` cosines per axis: more look less regular)."""
    freq = rng.uniform(0.4, 1.6, (3, terms)) / wavelength
    phase = rng.uniform(0.0, 2 * np.pi, (3, terms))
    weight = (rng.standard_normal((terms,) * 3) / terms**1.5).astype(np.float32)
    return _Field(freq, phase, weight)


class _Box(NamedTuple):
    """A sub-block of the grid: its index and its 1-D voxel-centre coordinates (mm)."""

    index: tuple[slice, slice, slice]
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates shaped to broadcast to the block: [n, 1, 1], [1, n, 1], [1, 1, n]."""
        return self.x[:, None, None], self.y[None, :, None], self.z[None, None, :]

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.x), len(self.y), len(self.z)


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates (mm) of the render grid; ``z`` holds the sub-slices."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> _Box | None:
        """The voxels with coordinates in [lo, hi] per axis, or None when there are none."""
        index = []
        for c, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0, i1 = int(np.searchsorted(c, a)), int(np.searchsorted(c, b, side="right"))
            if i1 <= i0:
                return None
            index.append(slice(i0, i1))
        sx, sy, sz = index
        return _Box((sx, sy, sz), *(c[i].astype(np.float32) for c, i in zip((self.x, self.y, self.z), index)))


class _Part(NamedTuple):
    """What a structure contributes: a tissue block (``NONE`` where untouched) and, for a kidney, its label."""

    index: tuple[slice, ...]
    tissue: np.ndarray
    label: np.ndarray | None = None


def _onto(*tissues: Tissue, invert: bool = False) -> np.ndarray:
    """A lookup table of the current tissues that a part may overwrite."""
    table = np.zeros(256, bool)
    table[list(tissues)] = True
    return ~table if invert else table


_ANYWHERE = _onto(invert=True)
_CAVITY = _onto(T.VISCERAL_FAT)
_SOFT = _onto(T.VISCERAL_FAT, T.BOWEL_WALL, T.BOWEL_CONTENT, T.STOOL, T.GAS)
_RETROPERITONEUM = _onto(
    T.AIR, T.SKIN, T.SUBCUTANEOUS_FAT, T.BONE, T.MARROW, T.DISC, T.CSF, T.AORTA, T.IVC, invert=True
)


def _paint(volume: np.ndarray, part: _Part | None, onto: np.ndarray) -> np.ndarray | None:
    """Write ``part`` into ``volume`` where it has a tissue and the tissue there is allowed by ``onto``.

    Returns the written mask of the block (None when the part lies outside the grid)."""
    if part is None:
        return None
    region = volume[part.index]
    mask = (part.tissue != NONE) & onto[region]
    region[mask] = part.tissue[mask]
    return mask


def _ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return (u / a) ** 2 + (v / b) ** 2 < 1.0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """Rotation about z by ``yaw`` then about x by ``pitch`` (degrees); columns are the rotated axes."""
    cy, sy, cp, sp = (f(math.radians(a)) for a in (yaw, pitch) for f in (math.cos, math.sin))
    about_z = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])
    return about_z @ np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])


# ----------------------------------------------------------------------------------------------------------
# anatomy parameters (all randomness is drawn here, before rendering)


@dataclass(frozen=True)
class _Body:
    a: float  # left-right semi-axis (mm)
    b_ant: float  # anterior semi-axis
    b_post: float  # posterior semi-axis (the back is flatter)
    power: float  # super-ellipse exponent
    wobble: np.ndarray  # [k, 3]: harmonic, amplitude, phase of the outline
    skin: float
    subq: float  # subcutaneous fat thickness at the back
    subq_ant: float  # relative extra thickness anteriorly
    wall: float  # abdominal wall muscle


@dataclass(frozen=True)
class _Spine:
    x: float
    y: float  # vertebral body centre at z = 0 (the level of the left kidney)
    tilt: float  # dy/dz (lordosis over the field of view)
    rx: float
    ry: float
    cortex: float
    period: float  # vertebra + disc height
    disc: float
    phase: float
    canal: float  # spinal canal radius
    spinous: float  # spinous process length behind the canal
    transverse: float  # transverse process half-span
    back: tuple[float, float, float]  # back muscle mass: gap behind the body, half width, half height
    quadratus: tuple[float, float, float, float]  # x offset, y offset behind the body centre, semi-axes
    psoas: tuple[float, float, float, float]  # radius at z = 0, growth per mm downwards, y offset, max radius

    def y_at(self, z: np.ndarray) -> np.ndarray:
        return self.y + self.tilt * z

    def drift(self, grid: _Grid) -> float:
        """Largest shift of the spine in y over the grid's z range."""
        return float(abs(self.tilt) * np.abs(grid.z).max())


@dataclass(frozen=True)
class _Organ:
    """A deformed ellipsoid (liver, spleen), rotated about z, sheared in z, optionally cut into a crescent."""

    center: np.ndarray
    semi: np.ndarray
    rotation: np.ndarray  # columns: the local axes in world coordinates
    shear: float  # offset of the local z per mm of the local x
    bumps: _Field
    bump: float
    cut: np.ndarray | None  # centre offset (local, in semi-axes) of the ellipsoid removed for a crescent


@dataclass(frozen=True)
class _Colon:
    x: float
    y: float
    radius: float
    drift: tuple[float, float]  # dx/dz, dy/dz
    gas_level: float  # gas above y > y_c + gas_level * radius


@dataclass(frozen=True)
class _Bowel:
    y_min: float
    loops: _Field
    gas: _Field
    stool: _Field
    lumen: float  # threshold of the loop field inside a lumen
    wall: float  # width of the wall band in field units
    gas_threshold: float
    colons: tuple[_Colon, ...]


@dataclass(frozen=True)
class _Kidney:
    side: int  # +1 right (patient), -1 left
    center: np.ndarray
    rotation: np.ndarray  # columns: long axis (to the upper pole), hilum axis, their cross product
    semi: np.ndarray  # half length, half width, half thickness (mm)
    bend: float
    cortex: float  # cortex thickness (mm)
    pyramids: np.ndarray  # [n, 3] axes of the medullary pyramids (normalised local coordinates, from the sinus)
    pyramid_cos: float  # cosine of their half opening angle
    rim: float  # mean perirenal fat thickness (mm)
    rim_field: _Field
    warp: tuple[_Field, _Field, _Field]
    warp_mm: float
    cysts: tuple[tuple[tuple[float, float, float], float], ...]  # local centre (mm), radius (mm)

    def half_extent(self, padded: bool = True) -> np.ndarray:
        """Half size of the axis-aligned box that holds the kidney (``padded``: and its rim, deformation, cysts)."""
        semi = self.semi + np.array([0.0, self.bend * self.semi[1], 0.0])
        if padded:
            semi = semi + 2.0 * self.rim + 2.5 * self.warp_mm + max((r for _, r in self.cysts), default=0.0) + 2.0
        return np.sqrt(((self.rotation * semi[None, :]) ** 2).sum(1))

    def to_world(self, local: Sequence[float]) -> np.ndarray:
        return self.center + self.rotation @ (np.asarray(local) * self.semi)


@dataclass(frozen=True)
class _Tumour:
    """A renal mass: a lobulated ball centred near a kidney's surface (exophytic when outside), with an
    irregular necrotic core when ``necrosis`` > 0 (the core's share of the radius)."""

    center: np.ndarray
    radius: float
    lobes: _Field
    lobe: float
    necrosis: float
    core: _Field


@dataclass(frozen=True)
class _Anatomy:
    body: _Body
    spine: _Spine
    aorta: tuple[float, float, float]  # x, y, radius
    ivc: tuple[float, float, float]
    liver: _Organ
    spleen: _Organ
    bowel: _Bowel
    kidneys: tuple[_Kidney, _Kidney]
    vessel_radius: tuple[float, float]  # renal artery, renal vein
    present: tuple[bool, bool] = (True, True)  # False: that kidney was removed (nephrectomy)
    tumour: _Tumour | None = None

    def present_kidneys(self) -> list[_Kidney]:
        return [k for k, here in zip(self.kidneys, self.present) if here]


@dataclass(frozen=True)
class _Scan:
    spacing: np.ndarray  # (in-plane, in-plane, slice) mm
    shape: tuple[int, int, int]
    origin: np.ndarray  # centre of voxel (0, 0, 0), mm
    hu: np.ndarray  # [len(Tissue), 3]: mean, low-frequency amplitude, fine amplitude
    texture: tuple[_Field, _Field]
    psf: float  # in-plane Gaussian sigma (voxels)
    noise: float  # HU standard deviation
    phase: str  # one of PHASES

    def grid(self) -> _Grid:
        (nx, ny, nz), (s, _, dz) = self.shape, self.spacing
        offsets = (np.arange(SUB) - (SUB - 1) / 2) / SUB
        z = self.origin[2] + dz * (np.arange(nz)[:, None] + offsets[None, :]).ravel()
        return _Grid(self.origin[0] + s * np.arange(nx), self.origin[1] + s * np.arange(ny), z)

    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine


def _float32_exact(value: float, decimals: int) -> float:
    """Round so that the value survives the float32 NIfTI header unchanged."""
    return float(np.float32(round(value, decimals)))


def _sample_body(rng: np.random.Generator, sc: float) -> _Body:
    wobble = np.stack([np.arange(2, 6), rng.uniform(0.0, 0.02, 4), rng.uniform(0, 2 * np.pi, 4)], 1)
    return _Body(
        a=rng.uniform(135, 170) * sc,
        b_ant=rng.uniform(95, 130) * sc,
        b_post=rng.uniform(85, 105) * sc,
        power=rng.uniform(2.0, 2.6),
        wobble=wobble,
        skin=2.0 * sc,
        subq=rng.uniform(8, 35) * sc,
        subq_ant=rng.uniform(0.0, 0.8),
        wall=rng.uniform(7, 14) * sc,
    )


def _sample_spine(rng: np.random.Generator, sc: float, body: _Body) -> _Spine:
    return _Spine(
        x=rng.uniform(-4, 4) * sc,
        y=-body.b_post + body.skin + body.subq + rng.uniform(62, 76) * sc,
        tilt=rng.uniform(-0.12, 0.06),
        rx=rng.uniform(21, 26) * sc,
        ry=rng.uniform(15, 19) * sc,
        cortex=rng.uniform(1.5, 2.5) * sc,
        period=rng.uniform(32, 38) * sc,
        disc=rng.uniform(7, 10) * sc,
        phase=rng.uniform(0, 40) * sc,
        canal=rng.uniform(7, 9) * sc,
        spinous=rng.uniform(25, 35) * sc,
        transverse=rng.uniform(38, 48) * sc,
        back=(rng.uniform(0, 8) * sc, rng.uniform(45, 58) * sc, rng.uniform(45, 55) * sc),
        quadratus=tuple(rng.uniform((55, 25, 14, 9), (68, 35, 20, 13)) * sc),
        psoas=(rng.uniform(12, 18) * sc, rng.uniform(0.06, 0.12), rng.uniform(0, 6) * sc, rng.uniform(24, 30) * sc),
    )


def _pyramid_axes(rng: np.random.Generator, n: int = 14) -> np.ndarray:
    """Directions spread over the sphere (Fibonacci lattice, random rotation) except towards the hilum (+v)."""
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    points = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1)
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    points = points @ (q * np.sign(np.diag(r))).T
    return points[points[:, 1] < 0.35].astype(np.float32)


def _sample_kidney(rng: np.random.Generator, sc: float, side: int, spine: _Spine, z: float, small: bool) -> _Kidney:
    size = rng.uniform(0.6, 0.8) if small else 1.0
    semi = np.array([rng.uniform(50, 62), rng.uniform(25, 32), rng.uniform(17, 24)]) * sc * size
    center = np.array([spine.x + side * rng.uniform(62, 80) * sc, spine.y_at(z) - rng.uniform(0, 15) * sc, z])
    alpha, beta, gamma = np.radians([rng.uniform(8, 20), rng.uniform(10, 25), rng.uniform(15, 45)])
    u = _unit(np.array([-side * np.sin(alpha), -np.sin(beta), np.cos(alpha) * np.cos(beta)]))
    h = np.array([-side * np.cos(gamma), np.sin(gamma), 0.0])
    v = _unit(h - (h @ u) * u)
    cysts = []
    for _ in range(rng.choice(3, p=[0.8, 0.15, 0.05])):
        direction = _unit(rng.standard_normal(3) - np.array([0.0, 1.0, 0.0]))  # away from the hilum
        radius = float(min(rng.uniform(4, 18) * sc, 0.6 * semi[1]))
        cysts.append((tuple((direction * rng.uniform(0.5, 0.95) * semi).tolist()), radius))
    return _Kidney(
        side=side,
        center=center,
        rotation=np.stack([u, v, np.cross(u, v)], 1),
        semi=semi,
        bend=rng.uniform(0.15, 0.35),
        cortex=rng.uniform(4, 7) * sc * math.sqrt(size),
        pyramids=_pyramid_axes(rng),
        pyramid_cos=1.0 - rng.uniform(1.3, 1.8) / 14,
        rim=rng.uniform(2, 10) * sc,
        rim_field=_random_field(rng, 60 * sc),
        warp=(_random_field(rng, 70 * sc), _random_field(rng, 70 * sc), _random_field(rng, 70 * sc)),
        warp_mm=rng.uniform(2, 5) * sc,
        cysts=tuple(cysts),
    )


def _sample_anatomy(rng: np.random.Generator, sc: float) -> _Anatomy:
    body = _sample_body(rng, sc)
    spine = _sample_spine(rng, sc, body)
    y_front = spine.y + spine.ry
    z_left = rng.uniform(-5, 5) * sc
    z_right = z_left - rng.uniform(10, 20) * sc
    small = rng.choice(3, p=[0.85, 0.075, 0.075])  # 0: none, 1: left small, 2: right small
    kidneys = (
        _sample_kidney(rng, sc, -1, spine, z_left, small == 1),
        _sample_kidney(rng, sc, +1, spine, z_right, small == 2),
    )
    r_aorta = rng.uniform(9, 13) * sc
    liver = _Organ(
        center=np.array([0.0, spine.y, z_right]) + rng.uniform((50, 35, 55), (75, 55, 75)) * sc,
        semi=np.array([rng.uniform(85, 105), rng.uniform(75, 95), rng.uniform(80, 105)]) * sc,
        rotation=_rotation(rng.uniform(-15, 15), rng.uniform(20, 40)),
        shear=rng.uniform(0.2, 0.5),
        bumps=_random_field(rng, 80 * sc),
        bump=rng.uniform(0.05, 0.15),
        cut=None,
    )
    spleen_x = -body.a * rng.uniform(0.55, 0.68)
    spleen = _Organ(
        center=np.array([spleen_x, spine.y + rng.uniform(-5, 15) * sc, z_left + rng.uniform(35, 60) * sc]),
        semi=np.array([rng.uniform(22, 30), rng.uniform(45, 60), rng.uniform(45, 60)]) * sc,
        rotation=_rotation(rng.uniform(-50, -25), rng.uniform(-10, 10)),
        shear=rng.uniform(-0.2, 0.2),
        bumps=_random_field(rng, 50 * sc),
        bump=rng.uniform(0.05, 0.2),
        cut=np.array([rng.uniform(0.8, 1.1), rng.uniform(-0.2, 0.2), 0.0]),
    )
    colons = tuple(
        _Colon(
            x=side * body.a * rng.uniform(*fraction),
            y=spine.y + rng.uniform(*ahead) * sc,
            radius=rng.uniform(*radius) * sc,
            drift=(rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1)),
            gas_level=rng.uniform(0.2, 1.0),
        )
        for side, fraction, ahead, radius in (
            (1, (0.5, 0.6), (35, 55), (16, 26)),
            (-1, (0.55, 0.66), (15, 40), (12, 20)),
        )
    )  # ascending (right) and descending (left) colon
    bowel = _Bowel(
        y_min=y_front + r_aorta,
        loops=_random_field(rng, rng.uniform(45, 65) * sc, terms=4),
        gas=_random_field(rng, 25 * sc, terms=5),
        stool=_random_field(rng, 10 * sc, terms=7),
        lumen=rng.uniform(-0.2, 0.3),
        wall=rng.uniform(0.15, 0.25),
        gas_threshold=rng.uniform(1.2, 1.8),
        colons=colons,
    )
    aorta = (spine.x - rng.uniform(6, 14) * sc, y_front + r_aorta + rng.uniform(1, 4) * sc, r_aorta)
    ivc = (spine.x + rng.uniform(20, 28) * sc, y_front + rng.uniform(10, 16) * sc, rng.uniform(9, 12) * sc)
    vessel_radius = (rng.uniform(2.5, 3.5) * sc, rng.uniform(4, 5.5) * sc)
    present = [True, True]
    if rng.random() < ABSENT_KIDNEY_PROBABILITY:
        present[int(rng.integers(2))] = False
    tumour = None
    if rng.random() < TUMOUR_PROBABILITY:
        candidates = [k for k, here in zip(kidneys, present) if here]
        tumour = _sample_tumour(rng, sc, candidates[int(rng.integers(len(candidates)))])
    return _Anatomy(
        body=body,
        spine=spine,
        aorta=aorta,
        ivc=ivc,
        liver=liver,
        spleen=spleen,
        bowel=bowel,
        kidneys=kidneys,
        vessel_radius=vessel_radius,
        present=(present[0], present[1]),
        tumour=tumour,
    )


def _sample_tumour(rng: np.random.Generator, sc: float, kidney: _Kidney) -> _Tumour:
    """A mass of 1.6-8 cm on ``kidney``: centred from just inside the parenchyma to beyond the surface,
    never at the hilum; larger masses are more often necrotic."""
    direction = _unit(rng.standard_normal(3) - np.array([0.0, 0.8, 0.0]))  # away from the hilum (+v)
    radius = float(np.exp(rng.uniform(np.log(8.0), np.log(40.0)))) * sc
    necrotic = radius > 18 * sc and rng.random() < 0.6
    return _Tumour(
        center=kidney.to_world(direction * rng.uniform(0.7, 1.15)),
        radius=radius,
        lobes=_random_field(rng, 1.2 * radius, terms=4),
        lobe=rng.uniform(0.05, 0.2),
        necrosis=rng.uniform(0.35, 0.7) if necrotic else 0.0,
        core=_random_field(rng, 0.6 * radius, terms=4),
    )


def _enhancement(
    aorta: float, ivc: float, vein: float, liver: float, spleen: tuple, cortex: tuple, medulla: tuple
) -> dict[Tissue, tuple]:
    """HU rows (mean, low-frequency and fine amplitudes) of the tissues that follow the contrast bolus."""
    return {
        T.AORTA: (aorta, 8, 0),
        T.RENAL_ARTERY: (aorta, 0, 0),
        T.IVC: (ivc, 10, 0),
        T.RENAL_VEIN: (vein, 0, 0),
        T.LIVER: (liver, 6, 4),
        T.SPLEEN: spleen,
        T.CORTEX: cortex,
        T.MEDULLA: medulla,
    }


def _sample_hu(rng: np.random.Generator, timing: float, phase: str) -> np.ndarray:
    """Per-case HU table [len(Tissue), 3]: mean, low-frequency and fine texture amplitudes (docs/design/phantom.md).

    ``timing`` in [0, 1] places the scan within the corticomedullary phase; the other ``phase`` values
    (:data:`PHASES`) then replace the enhancing tissues."""
    table = np.zeros((len(Tissue), 3), np.float32)
    fat = rng.uniform(-115, -85)
    aorta = 200 + 150 * np.clip(timing + rng.normal(0, 0.15), 0, 1)
    values = {
        T.AIR: (-1000, 0, 0),
        T.SKIN: (rng.uniform(20, 50), 0, 0),
        T.SUBCUTANEOUS_FAT: (fat, 4, 3),
        T.MUSCLE: (rng.uniform(40, 60), 4, 4),
        T.VISCERAL_FAT: (fat + rng.uniform(0, 15), 6, 10),
        T.BONE: (rng.uniform(500, 850), 40, 40),
        T.MARROW: (rng.uniform(160, 280), 20, 30),
        T.DISC: (rng.uniform(70, 100), 5, 5),
        T.CSF: (rng.uniform(5, 20), 0, 0),
        T.AORTA: (aorta, 8, 0),
        T.IVC: (rng.uniform(50, 110), 15, 0),
        T.LIVER: (np.clip(62 + 22 * timing + rng.normal(0, 5), 58, 92), 6, 4),
        T.SPLEEN: (rng.uniform(100, 140), 10, 12 + 20 * (1 - timing)),
        T.BOWEL_WALL: (rng.uniform(20, 60), 5, 5),
        T.BOWEL_CONTENT: (rng.uniform(0, 40), 8, 10),
        T.STOOL: (rng.uniform(-40, 20), 10, 25),
        T.GAS: (-1000, 0, 0),
        T.PERIRENAL_FAT: (fat + rng.uniform(-5, 10), 4, 6),
        T.RENAL_ARTERY: (aorta, 0, 0),
        T.RENAL_VEIN: (rng.uniform(100, 170), 0, 0),
        T.CORTEX: (np.clip(150 + 70 * timing + rng.normal(0, 5), 150, 220), 6, 4),
        T.MEDULLA: (np.clip(52 + 40 * timing + rng.normal(0, 6), 50, 100), 5, 4),
        T.SINUS: (rng.uniform(-80, -20), 8, 25),
        T.PELVIS: (rng.uniform(0, 20), 0, 0),
        T.CYST: (rng.uniform(0, 20), 0, 0),
        T.NECROSIS: (rng.uniform(5, 30), 4, 8),
    }
    hyper = rng.random() < 0.6  # clear-cell-like (hyper-enhancing, heterogeneous), else papillary-like (hypo)
    if phase == "nephrographic":
        cortex = rng.uniform(140, 200)
        aorta = rng.uniform(150, 220)
        values |= _enhancement(
            aorta,
            ivc=rng.uniform(120, 170),
            vein=rng.uniform(130, 170),
            liver=rng.uniform(90, 120),
            spleen=(rng.uniform(110, 130), 6, 4),
            cortex=(cortex, 6, 4),
            medulla=(cortex - rng.uniform(0, 25), 6, 4),
        )
        tumour = rng.uniform(80, 130) if hyper else rng.uniform(40, 75)
    elif phase == "early":
        aorta = rng.uniform(250, 400)
        values |= _enhancement(
            aorta,
            ivc=rng.uniform(40, 70),
            vein=rng.uniform(80, 130),
            liver=rng.uniform(55, 65),
            spleen=(rng.uniform(80, 120), 12, 30),
            cortex=(rng.uniform(95, 140), 8, 6),
            medulla=(rng.uniform(35, 55), 5, 4),
        )
        tumour = rng.uniform(70, 110) if hyper else rng.uniform(35, 60)
    else:
        tumour = rng.uniform(90, 170) if hyper else rng.uniform(35, 80)
    values[T.TUMOUR] = (tumour, 15, rng.uniform(20, 35) if hyper else rng.uniform(8, 15))
    for tissue, row in values.items():
        table[tissue] = row
    return table


def _sample_scan(rng: np.random.Generator, sc: float, anatomy: _Anatomy) -> _Scan:
    s = _float32_exact(rng.uniform(0.7, 0.9), 3)
    dz = _float32_exact(rng.uniform(2.5, 5.0), 2)
    body, kidneys = anatomy.body, anatomy.kidneys
    nx = int(np.clip(round(rng.uniform(250, 290) * sc / s), round(300 * sc), round(400 * sc)))
    ny = int(np.clip(round(rng.uniform(190, 225) * sc / s), round(230 * sc), round(300 * sc)))
    x0 = rng.uniform(-10, 10) * sc - (nx - 1) * s / 2
    y0 = -body.b_post - rng.uniform(5, 15) * sc
    lo = min(k.center[2] - k.half_extent(padded=False)[2] for k in kidneys) - rng.uniform(8, 20) * sc
    hi = max(k.center[2] + k.half_extent(padded=False)[2] for k in kidneys) + rng.uniform(8, 20) * sc
    nz = int(np.clip(math.ceil((hi - lo) / dz), round(40 * sc), round(70 * sc)))
    z0 = (lo + hi) / 2 - (nz - 1) * dz / 2
    if rng.random() < 0.12:  # a pole out of the field of view
        z0 += rng.choice([-1, 1]) * rng.uniform(0.4, 0.8) * max(k.semi[0] for k in kidneys)
    timing = rng.uniform(0, 1)
    phase = PHASES[int(rng.choice(len(PHASES), p=PHASE_PROBABILITIES))]
    return _Scan(
        spacing=np.array([s, s, dz]),
        shape=(nx, ny, nz),
        origin=np.array([_float32_exact(x0, 2), _float32_exact(y0, 2), _float32_exact(z0, 2)]),
        hu=_sample_hu(rng, timing, phase),
        phase=phase,
        texture=(_random_field(rng, 40 * sc), _random_field(rng, 6.0, terms=7)),
        psf=rng.uniform(0.5, 0.8),
        noise=rng.uniform(10, 30),
    )


# ----------------------------------------------------------------------------------------------------------
# structures: pure functions of the grid and the parameters


def _body_section(x: np.ndarray, y: np.ndarray, body: _Body) -> np.ndarray:
    """2-D tissue map of the body cross-section: air, skin, subcutaneous fat, wall muscle, visceral fat."""
    gx, gy = x[:, None], y[None, :]
    u, v = gx / body.a, gy / np.where(gy >= 0, body.b_ant, body.b_post)
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in body.wobble)
    rho = (np.abs(u) ** body.power + np.abs(v) ** body.power) ** (1.0 / body.power) / wobble
    depth = (1.0 - rho) * np.hypot(gx, gy) / np.maximum(rho, 1e-6)
    fat = body.skin + body.subq * (1.0 + body.subq_ant * np.clip(np.sin(theta), 0.0, None))
    out = np.full(rho.shape, T.VISCERAL_FAT, np.uint8)
    out[depth < fat + body.wall * (1.0 + np.clip(-np.sin(theta), 0.0, None))] = T.MUSCLE
    out[depth < fat] = T.SUBCUTANEOUS_FAT
    out[depth < body.skin] = T.SKIN
    out[rho >= 1.0] = T.AIR
    return out


def _back_muscles(x: np.ndarray, y: np.ndarray, spine: _Spine) -> np.ndarray:
    """2-D map of the back muscle mass behind the spine and the quadrati lumborum (``NONE`` elsewhere)."""
    gx, gy = x[:, None] - spine.x, y[None, :] - spine.y
    gap, width, height = spine.back
    qx, qy, qa, qb = spine.quadratus
    back = (gx / width) ** 4 + ((gy + spine.ry + gap + height) / height) ** 4 < 1.0
    out = np.full((len(x), len(y)), NONE, np.uint8)
    out[back | _ellipse(np.abs(gx) - qx, gy + qy, qa, qb)] = T.MUSCLE
    return out


def _psoas(grid: _Grid, spine: _Spine) -> _Part | None:
    """Both psoas muscles beside the vertebral bodies, thicker inferiorly."""
    r_ref, growth, dy, r_max = spine.psoas
    reach = spine.rx + 2 * r_max
    drift = spine.drift(grid) + r_max + dy
    box = grid.box((spine.x - reach, spine.y - drift, -np.inf), (spine.x + reach, spine.y + drift, np.inf))
    if box is None:
        return None
    gx, gy, gz = box.mesh()
    r = np.clip(r_ref - growth * gz, 0.2 * r_max, r_max)
    yc = spine.y_at(gz) + dy
    out = np.full(box.shape, NONE, np.uint8)
    for side in (-1, 1):
        out[_ellipse(gx - spine.x - side * (spine.rx + 0.8 * r), gy - yc, r, 0.85 * r)] = T.MUSCLE
    return _Part(box.index, out)


def _spine(grid: _Grid, sp: _Spine) -> _Part | None:
    """Vertebral bodies (cortex, marrow, endplates) with discs, spinal canal and posterior arch."""
    back, drift = sp.ry + 3 * sp.canal + sp.spinous, sp.drift(grid)
    lo, hi = (sp.x - sp.transverse, sp.y - back - drift, -np.inf), (sp.x + sp.transverse, sp.y + sp.ry + drift, np.inf)
    box = grid.box(lo, hi)
    if box is None:
        return None
    gx, gy, gz = box.mesh()
    gx, gy = gx - sp.x, gy - sp.y_at(gz)
    level = np.mod(gz - sp.phase, sp.period)
    disc = level < sp.disc
    endplate = (level < sp.disc + sp.cortex) | (level > sp.period - sp.cortex)
    arch = ~disc & (level < sp.period - sp.disc / 2)
    transverse = (level > sp.disc + 0.25 * sp.period) & (level < sp.disc + 0.55 * sp.period)
    out = np.full(box.shape, NONE, np.uint8)
    yc = -sp.ry - sp.canal - 1.0
    ring = _ellipse(gx, gy - yc, 1.5 * sp.canal, 1.5 * sp.canal)
    spinous = (np.abs(gx) < 0.3 * sp.canal) & (gy < yc) & (gy > yc - sp.canal - sp.spinous)
    processes = (np.abs(gy - yc + 0.2 * np.abs(gx)) < 0.3 * sp.canal) & (np.abs(gx) < sp.transverse)
    out[arch & (ring | spinous) | transverse & processes] = T.BONE
    out[_ellipse(gx, gy - yc, sp.canal, sp.canal)] = T.CSF
    body = _ellipse(gx, gy, sp.rx, sp.ry)
    core = _ellipse(gx, gy, sp.rx - sp.cortex, sp.ry - sp.cortex)
    out[body] = np.where(disc, T.DISC, np.where(core & ~endplate, T.MARROW, T.BONE))[body]
    return _Part(box.index, out)


def _tube(grid: _Grid, points: np.ndarray, radius: float, tissue: Tissue) -> _Part | None:
    """A tube of ``radius`` around the polyline ``points`` [k, 3]."""
    box = grid.box(points.min(0) - radius, points.max(0) + radius)
    if box is None:
        return None
    pts = box.mesh()
    dist2 = np.full(box.shape, np.inf, np.float32)
    for a, b in zip(points[:-1].tolist(), points[1:].tolist()):
        d = [bi - ai for ai, bi in zip(a, b)]
        t = np.clip(sum((pts[i] - a[i]) * d[i] for i in range(3)) / sum(di * di for di in d), 0.0, 1.0)
        dist2 = np.minimum(dist2, sum((pts[i] - a[i] - t * d[i]) ** 2 for i in range(3)))
    return _Part(box.index, np.where(dist2 < radius**2, np.uint8(tissue), np.uint8(NONE)))


def _vertical_vessel(grid: _Grid, x: float, y: float, radius: float, tissue: Tissue) -> _Part | None:
    """A vessel along z through the whole field of view (aorta, IVC), slightly oblique."""
    z0, z1 = grid.z[0] - 1.0, grid.z[-1] + 1.0
    return _tube(grid, np.array([[x, y, z0], [x + 0.03 * (z1 - z0), y, z1]]), radius, tissue)


def _organ(grid: _Grid, organ: _Organ, tissue: Tissue) -> _Part | None:
    """A solid organ (liver, spleen): a rotated, sheared ellipsoid with a bumpy surface, optionally a crescent."""
    a, b, h = organ.semi.tolist()
    ext = np.abs(organ.rotation) @ (1.3 * np.array([a, b, h + abs(organ.shear) * a]))  # bumps: up to 1.3x
    box = grid.box(organ.center - ext, organ.center + ext)
    if box is None:
        return None
    rot = organ.rotation.astype(np.float32)
    d = [c - c0 for c, c0 in zip(box.mesh(), organ.center.tolist())]
    # skipping zero coefficients keeps u two-dimensional (a rotation about z, then about x)
    u, v, w = (sum(rot[i, j] * d[i] for i in range(3) if rot[i, j] != 0) for j in range(3))
    w = w + organ.shear * u
    q = (u / a) ** 2 + (v / b) ** 2 + (w / h) ** 2 + organ.bump * organ.bumps(box.x, box.y, box.z)
    inside = q < 1.0
    if organ.cut is not None:
        cu, cv, cw = (organ.cut * organ.semi).tolist()
        inside &= ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 + ((w - cw) / h) ** 2 >= 1.0
    return _Part(box.index, np.where(inside, np.uint8(tissue), np.uint8(NONE)))


def _bowel(grid: _Grid, bowel: _Bowel, body: _Body) -> _Part | None:
    """Small-bowel loops (wall, content, gas pockets rising anteriorly) in the anterior abdomen."""
    box = grid.box((-body.a, bowel.y_min, -np.inf), (body.a, body.b_ant, np.inf))
    if box is None:
        return None
    loops = bowel.loops(box.x, box.y, box.z)
    rise = ((box.y - bowel.y_min) / (body.b_ant - bowel.y_min)).astype(np.float32)[None, :, None]
    gas = bowel.gas(box.x, box.y, box.z) + 1.2 * rise
    out = np.full(box.shape, NONE, np.uint8)
    out[loops > bowel.lumen - bowel.wall] = T.BOWEL_WALL
    lumen = loops > bowel.lumen
    out[lumen] = T.BOWEL_CONTENT
    out[lumen & (gas > bowel.gas_threshold)] = T.GAS
    return _Part(box.index, out)


def _colon(grid: _Grid, colon: _Colon, stool: _Field) -> _Part | None:
    """A colon segment along z: wall, mottled stool with gas bubbles, gas cap anteriorly."""
    reach = colon.radius + 0.1 * (grid.z[-1] - grid.z[0]) + 2
    box = grid.box((colon.x - reach, colon.y - reach, -np.inf), (colon.x + reach, colon.y + reach, np.inf))
    if box is None:
        return None
    gx, gy, gz = box.mesh()
    dx, dy = gx - colon.x - colon.drift[0] * gz, gy - colon.y - colon.drift[1] * gz
    r2 = dx**2 + dy**2
    lumen = r2 < (colon.radius - 2.5) ** 2
    out = np.full(box.shape, NONE, np.uint8)
    out[r2 < colon.radius**2] = T.BOWEL_WALL
    out[lumen] = T.STOOL
    bubbles = stool(box.x, box.y, box.z) > 1.2
    out[lumen & (bubbles | (dy > colon.gas_level * colon.radius))] = T.GAS
    return _Part(box.index, out)


def _ellipsoid_depth(
    u: np.ndarray, v: np.ndarray, w: np.ndarray, a: float, b: float, c: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius of the ellipsoid (semi-axes a, b, c) and the approximate depth below its surface (mm,
    negative outside): (1 - rho) / |grad rho|."""
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
    grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (w / c**2) ** 2)
    return rho, (1.0 - rho) * rho / np.maximum(grad, 1e-6)


def _smooth_min(a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Polynomial smooth minimum: rounds the edge where two implicit surfaces meet by about ``radius``."""
    h = np.clip(1.0 - np.abs(a - b) / radius, 0.0, None)
    return np.minimum(a, b) - 0.25 * radius * h**2


def _kidney(grid: _Grid, k: _Kidney) -> _Part | None:
    """Bean-shaped kidney with cortex, medullary pyramids, sinus, pelvis, cysts and the perirenal fat rim.

    The label is the bean without the hilum notch, plus the cysts."""
    ext = k.half_extent()
    box = grid.box(k.center - ext, k.center + ext)
    if box is None:
        return None
    d = [c - c0 + k.warp_mm * f(box.x, box.y, box.z) for c, c0, f in zip(box.mesh(), k.center.tolist(), k.warp)]
    rot = k.rotation.astype(np.float32)
    ku, kv, kw = (sum(rot[i, j] * d[i] for i in range(3)) for j in range(3))
    sa, sb, sc = k.semi.tolist()
    kv_bent = kv - k.bend * sb * (ku / sa) ** 2
    rho, depth = _ellipsoid_depth(ku, kv_bent, kw, sa, sb, sc)

    def blob(v0: float, a: float, b: float, c: float) -> np.ndarray:
        return (ku / (a * sa)) ** 2 + ((kv_bent - v0 * sb) / (b * sb)) ** 2 + (kw / (c * sc)) ** 2 < 1.0

    notch_depth = _ellipsoid_depth(ku, kv_bent - 1.25 * sb, kw, 0.3 * sa, 0.6 * sb, 0.5 * sc)[1]
    notch = notch_depth > 0
    sinus = blob(0.35, 0.55, 0.42, 0.45)
    pelvis = blob(0.62, 0.22, 0.45, 0.22)
    inside = _smooth_min(depth, -notch_depth, 0.1 * sc) > 0  # the hilum lips rounded: no slivers
    rim = k.rim * np.clip(1.0 + 1.2 * k.rim_field(box.x, box.y, box.z), 0.0, 2.5)
    core = inside & (depth > k.cortex) & ~sinus
    direction = np.stack([ku[core] / sa, (kv_bent[core] - 0.35 * sb) / sb, kw[core] / sc])
    direction /= np.maximum(np.sqrt((direction**2).sum(0)), 1e-6)
    medulla = np.zeros(box.shape, bool)
    medulla[core] = np.einsum("nc,cm->nm", k.pyramids, direction).max(0) > k.pyramid_cos

    out = np.full(box.shape, NONE, np.uint8)
    out[(depth <= 0) & (-depth < rim) | notch & (rho < 1.3)] = T.PERIRENAL_FAT
    out[inside] = T.CORTEX
    out[medulla] = T.MEDULLA
    out[inside & sinus] = T.SINUS
    out[pelvis & (rho < 1.15)] = T.PELVIS
    label = inside.copy()
    for (cu, cv, cw), radius in k.cysts:
        cyst = (ku - cu) ** 2 + (kv - cv) ** 2 + (kw - cw) ** 2 < radius**2
        out[cyst] = T.CYST
        label |= cyst
    return _Part(box.index, out, label)


def _tumour(grid: _Grid, tumour: _Tumour) -> _Part | None:
    """The renal mass: solid tumour tissue with an optional irregular necrotic core (all of it labeled)."""
    reach = 1.4 * tumour.radius
    box = grid.box(tumour.center - reach, tumour.center + reach)
    if box is None:
        return None
    gx, gy, gz = (c - c0 for c, c0 in zip(box.mesh(), tumour.center.tolist()))
    rho = np.sqrt(gx**2 + gy**2 + gz**2) / tumour.radius
    out = np.full(box.shape, NONE, np.uint8)
    out[rho + tumour.lobe * tumour.lobes(box.x, box.y, box.z) < 1.0] = T.TUMOUR
    if tumour.necrosis > 0:
        core = rho + 0.15 * tumour.core(box.x, box.y, box.z) < tumour.necrosis
        out[core & (out == T.TUMOUR)] = T.NECROSIS
    return _Part(box.index, out)


def _renal_vessels(grid: _Grid, k: _Kidney, anatomy: _Anatomy) -> list[_Part | None]:
    """Renal artery from the aorta and renal vein to the IVC (the left vein passes in front of the aorta)."""
    hilum = k.to_world((0.0, 0.75, 0.0))
    (ax, ay, ar), (vx, vy, vr) = anatomy.aorta, anatomy.ivc
    z = hilum[2]
    artery = [np.array([ax, ay, z + 5.0])]
    if k.side > 0:  # behind the IVC
        artery.append(np.array([vx, vy - vr - 4.0, z]))
    vein = [hilum, np.array([ax, ay + ar + 5.0, z])] if k.side < 0 else [hilum]
    vein.append(np.array([vx, vy, z + 5.0]))
    r_artery, r_vein = anatomy.vessel_radius
    return [
        _tube(grid, np.stack(artery + [hilum]), r_artery, T.RENAL_ARTERY),
        _tube(grid, np.stack(vein), r_vein, T.RENAL_VEIN),
    ]


# ----------------------------------------------------------------------------------------------------------
# rendering


def _render_tissue(grid: _Grid, anatomy: _Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue index, kidney mask (tumour included) and tumour mask on the sub-slice grid, structures painted in
    anatomical order."""
    section = _body_section(grid.x, grid.y, anatomy.body)
    back = _Part((slice(None), slice(None)), _back_muscles(grid.x, grid.y, anatomy.spine))
    _paint(section, back, _onto(T.MUSCLE, T.VISCERAL_FAT))
    tissue = np.repeat(section[:, :, None], len(grid.z), axis=2)
    bowel = anatomy.bowel
    _paint(tissue, _bowel(grid, bowel, anatomy.body), _CAVITY)
    for colon in bowel.colons:
        _paint(tissue, _colon(grid, colon, bowel.stool), _SOFT)
    _paint(tissue, _organ(grid, anatomy.liver, T.LIVER), _SOFT)
    _paint(tissue, _organ(grid, anatomy.spleen, T.SPLEEN), _SOFT)
    _paint(tissue, _psoas(grid, anatomy.spine), _ANYWHERE)
    _paint(tissue, _spine(grid, anatomy.spine), _ANYWHERE)
    _paint(tissue, _vertical_vessel(grid, *anatomy.aorta, T.AORTA), _ANYWHERE)
    _paint(tissue, _vertical_vessel(grid, *anatomy.ivc, T.IVC), _ANYWHERE)
    kidney = np.zeros(tissue.shape, bool)
    tumour = np.zeros(tissue.shape, bool)
    for k in anatomy.present_kidneys():
        part = _kidney(grid, k)
        written = _paint(tissue, part, _RETROPERITONEUM)
        if part is not None and written is not None and part.label is not None:
            kidney[part.index] |= part.label & written
    if anatomy.tumour is not None:
        part = _tumour(grid, anatomy.tumour)
        written = _paint(tissue, part, _RETROPERITONEUM)
        if part is not None and written is not None:
            kidney[part.index] |= written
            tumour[part.index] |= written
    for k in anatomy.present_kidneys():
        for vessel in _renal_vessels(grid, k, anatomy):
            _paint(tissue, vessel, _RETROPERITONEUM & _onto(T.CORTEX, T.MEDULLA, T.CYST, invert=True))
    return tissue, kidney, tumour


def _gaussian_noise_gain(sigma: float, truncate: float) -> float:
    """Standard deviation of white unit noise after scipy's 1-D Gaussian filter of ``sigma``."""
    radius = int(truncate * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w /= w.sum()
    return float(np.sqrt((w**2).sum()))


def _render_image(tissue: np.ndarray, scan: _Scan, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """HU image: partial volume over the sub-slices, texture, in-plane PSF with correlated noise."""
    mean = scan.hu[:, 0]
    hu = mean[tissue[:, :, 0::SUB]]
    for i in range(1, SUB):
        hu += mean[tissue[:, :, i::SUB]]
    hu /= SUB
    centre = tissue[:, :, SUB // 2 :: SUB]
    z = grid.z[SUB // 2 :: SUB]
    for column, field in zip((1, 2), scan.texture):
        hu += scan.hu[:, column][centre] * field(grid.x, grid.y, z)
    gain = _gaussian_noise_gain(scan.psf, 3.0) ** 2
    hu += (scan.noise / gain) * rng.standard_normal(hu.shape, dtype=np.float32)
    for axis in (0, 1):
        hu = ndimage.gaussian_filter1d(hu, scan.psf, axis=axis, truncate=3.0)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def render_phantom(seed: int, *, scale: float = 1.0, tumour_label: bool = False) -> Phantom:
    """Render the phantom of ``seed`` (deterministic). ``scale`` < 1 shrinks the anatomy and the field of view
    (not the voxel spacing): small cases for tests. ``tumour_label``: the renal tumour (necrotic core included) is
    label 2 and the rest of the kidney stays 1 (three classes, as KiTS19's kidney and tumour); the image and the
    union of the labels are the same as without it."""
    if not 0.1 <= scale <= 2.0:
        raise ValueError(f"scale must be in [0.1, 2], got {scale}")
    rng = np.random.default_rng(seed)
    anatomy = _sample_anatomy(rng, scale)
    scan = _sample_scan(rng, scale, anatomy)
    grid = scan.grid()
    tissue, kidney, tumour = _render_tissue(grid, anatomy)
    image = _render_image(tissue, scan, grid, rng)
    centre = slice(SUB // 2, None, SUB)
    label = kidney[:, :, centre].astype(np.uint8)
    if tumour_label:
        label[tumour[:, :, centre]] = 2
    return Phantom(image, label, scan.affine(), tissue[:, :, centre].copy(), scan.phase)


def generate_case(
    seed: int, *, scale: float = 1.0, tumour_label: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case: ``(image HU int16 [X, Y, Z], label uint8 [X, Y, Z], affine 4x4 float64)``; the label is
    {0 background, 1 kidney} or, with ``tumour_label``, {0, 1 kidney, 2 tumour} (:func:`render_phantom`)."""
    phantom = render_phantom(seed, scale=scale, tumour_label=tumour_label)
    return phantom.image, phantom.label, phantom.affine


# ----------------------------------------------------------------------------------------------------------
# data set


def case_seed(seed: int, split: str, index: int) -> int:
    """The seed of case ``index`` of ``split``: independent of the number of cases in the other splits."""
    state = np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _nifti_gz(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Reproducible .nii.gz bytes (no gzip time stamp), qform and sform set from ``affine``."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), compresslevel=3, mtime=0)  # level 3: near the best size for noisy HU


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _Job(NamedTuple):
    seed: int
    image: Path
    label: Path | None
    options: dict[str, Any]


def _write_case(job: _Job) -> dict[str, Any]:
    image, label, affine = generate_case(job.seed, **job.options)
    _write_atomic(job.image, _nifti_gz(image, affine))
    if job.label is not None:
        _write_atomic(job.label, _nifti_gz(label, affine))
    return {
        "image": job.image.name,
        "shape": image.shape,
        "kidney_fraction": float((label > 0).mean()),
        "tumour_fraction": float((label == 2).mean()),
    }


def generate_dataset(
    dataset_dir: str | os.PathLike,
    num_training: int = 40,
    num_validation: int = 4,
    num_test: int = 20,
    num_unlabeled: int = 0,
    seed: int = 0,
    workers: int = 2,
    overwrite: bool = False,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    **options: Any,
) -> Path:
    """Write the phantom data set (NIfTI + Decathlon-style ``dataset.json``) and return the datalist's path.

    Folders ``imagesTr``/``labelsTr`` (training, then validation cases), ``imagesTs``/``labelsTs`` (test, labels
    kept for evaluation) and ``imagesUn`` (unlabeled, no labels); case numbers are unique over the splits.
    Each case's seed derives from (``seed``, split, index) (:func:`case_seed`); the same arguments give
    byte-identical files. ``options`` go to :func:`generate_case` (e.g. ``scale``). ``workers`` spawned
    processes render in parallel (1, or when called from a daemon process: in this process). An existing
    ``dataset.json`` is returned as is unless ``overwrite``; it is written last, so an interrupted run leaves no
    datalist. ``progress(done, total, info)`` is called after each case (info: image file name, shape, kidney
    fraction).
    """
    folder = Path(dataset_dir)
    datalist = folder / "dataset.json"
    counts = {"training": num_training, "validation": num_validation, "test": num_test, "unlabeled": num_unlabeled}
    generator = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        **{f"num_{split}": n for split, n in counts.items()},
        "options": options,
    }
    if datalist.is_file() and not overwrite:
        recorded = json.loads(datalist.read_text()).get("generator")
        if recorded is not None and recorded != json.loads(json.dumps(generator)):
            warnings.warn(f"{datalist} exists, made with {recorded}, not {generator}: kept (overwrite=True remakes it)")
        return datalist
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    inspect.signature(generate_case).bind(seed, **options)  # unknown options fail here, before any file is touched
    jobs: list[_Job] = []
    entries: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        image_dir, label_dir = _FOLDERS[split]
        for index in range(counts[split]):
            name = f"case_{len(jobs):04d}.nii.gz"
            entry = {"image": f"{image_dir}/{name}"}
            if label_dir is not None:
                entry["label"] = f"{label_dir}/{name}"
            entries[split].append(entry)
            label = folder / entry["label"] if label_dir is not None else None
            jobs.append(_Job(case_seed(seed, split, index), folder / entry["image"], label, options))
    datalist.unlink(missing_ok=True)
    wanted = {job.image for job in jobs} | {job.label for job in jobs if job.label is not None}
    for sub in {name for pair in _FOLDERS.values() for name in pair if name is not None}:
        if (folder / sub).is_dir():  # case files of an earlier, larger data set
            for stale in (folder / sub).iterdir():
                if _CASE_FILE.fullmatch(stale.name) and stale not in wanted:
                    stale.unlink()
    for parent in {path.parent for path in wanted}:
        parent.mkdir(parents=True, exist_ok=True)

    def report(done: int, info: dict[str, Any]) -> None:
        if progress is not None:
            progress(done, len(jobs), info)

    if workers <= 1 or len(jobs) <= 1 or multiprocessing.current_process().daemon:  # daemons cannot have children
        for done, job in enumerate(jobs, 1):
            report(done, _write_case(job))
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for done, info in enumerate(pool.imap_unordered(_write_case, jobs), 1):
                report(done, info)

    content = {
        "name": "CPCL kidney phantoms",
        "description": "Synthetic contrast-enhanced abdominal CT phantoms in HU (int16) with a kidney label "
        "(kidneys and renal tumours), made by cpcl_bundle.synthetic",
        "reference": "cpcl_bundle.synthetic (deterministic generator)",
        "licence": "Apache-2.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABELS_WITH_TUMOUR if options.get("tumour_label") else LABELS,
        "numTraining": num_training,
        "numValidation": num_validation,
        "numTest": num_test,
        "numUnlabeled": num_unlabeled,
        "generator": generator,
        **{split: entries[split] for split in ("training", "validation", "test")},
    }
    if num_unlabeled > 0:
        content["unlabeled"] = entries["unlabeled"]
    _write_atomic(datalist, (json.dumps(content, indent=2) + "\n").encode())
    return datalist
