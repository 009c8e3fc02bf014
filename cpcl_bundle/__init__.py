# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""CPCL: cyclic prototype consistency learning for semi-supervised 3D segmentation, as a MONAI bundle.

Xu et al., "All-Around Real Label Supervision: Cyclic Prototype Consistency Learning for Semi-supervised
Medical Image Segmentation", IEEE JBHI 26(7), 2022.
"""

__version__ = "0.7.0"
#: The bundle's name (zoo folder and zip name, MONAI Label model name). "segmentation" in it makes MONAI Label
#: treat it as a segmentation model; a bundle name must not contain "_v" (the zoo splits versions on it).
BUNDLE_NAME = "cpcl_kidney_ct_segmentation"

import importlib  # noqa: E402

_SUBMODULES = (
    "baselines",
    "data",
    "dicom",
    "errors",
    "evaluation",
    "guard",
    "handlers",
    "losses",
    "methods",
    "networks",
    "precision",
    "prototypes",
    "resume",
    "synthetic",
    "terms",
    "trainer",
    "transforms",
    "validation",
)
__all__ = ["BUNDLE_NAME", "__version__", *_SUBMODULES]


def __getattr__(name: str):
    """Submodules load on first use (PEP 562): ``$import cpcl_bundle`` then ``cpcl_bundle.data...`` in a config
    works as before, and the preparation scripts start without importing torch and MONAI."""
    if name in _SUBMODULES:
        return importlib.import_module(f"cpcl_bundle.{name}")
    raise AttributeError(f"module 'cpcl_bundle' has no attribute {name!r}")
