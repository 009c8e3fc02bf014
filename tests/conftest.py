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
"""Shared fixtures: tiny deterministic tensors and a tiny U-Net (all CPU)."""

import pytest
import torch

from cpcl_bundle.networks import unet3d
from tests.helpers import TINY_FEATURES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_net():
    return unet3d(features=TINY_FEATURES)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from cpcl_bundle.synthetic import generate_dataset

    folder = tmp_path_factory.mktemp("phantoms")
    generate_dataset(folder, num_training=6, num_validation=1, num_test=2, seed=1, workers=1, scale=0.5)
    return folder
