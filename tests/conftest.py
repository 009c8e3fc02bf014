# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: tiny deterministic tensors and a tiny U-Net (train.json's ``network_def``; all CPU)."""

import pytest
import torch

from cpcl_tools import train_objects
from tests.helpers import TINY_FEATURES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_net():
    return train_objects.network_def(features=TINY_FEATURES)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from cpcl_bundle.synthetic import generate_dataset

    folder = tmp_path_factory.mktemp("phantoms")
    generate_dataset(folder, num_training=6, num_validation=1, num_test=2, seed=1, workers=1, scale=0.5)
    return folder


@pytest.fixture(scope="session")
def tiny_three_class_dataset(tmp_path_factory):
    """The tiny phantoms with the renal tumour as label 2 (``make_phantoms.py --tumour_label true``)."""
    from cpcl_bundle.synthetic import generate_dataset

    folder = tmp_path_factory.mktemp("phantoms3")
    generate_dataset(
        folder, num_training=6, num_validation=1, num_test=2, seed=1, workers=1, scale=0.5, tumour_label=True
    )
    return folder
