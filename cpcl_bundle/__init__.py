# Copyright (c) MONAI Consortium
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""CPCL: cyclic prototype consistency learning for semi-supervised 3D segmentation, as a MONAI bundle.

Xu et al., "All-Around Real Label Supervision: Cyclic Prototype Consistency Learning for Semi-supervised
Medical Image Segmentation", IEEE JBHI 26(7), 2022.
"""

__version__ = "0.4.0"
#: The bundle's name (zoo folder and zip name, MONAI Label model name). "segmentation" in it makes MONAI Label
#: treat it as a segmentation model; a bundle name must not contain "_v" (the zoo splits versions on it).
BUNDLE_NAME = "cpcl_kidney_ct_segmentation"

import importlib  # noqa: E402

_SUBMODULES = (
    "baselines",
    "benchmark",
    "data",
    "evaluation",
    "guard",
    "handlers",
    "losses",
    "methods",
    "networks",
    "plots",
    "prepare",
    "prototypes",
    "resume",
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
