# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Small deterministic data for the tests."""

import torch

#: A BasicUNet small enough for CPU tests (same layers, fewer channels).
TINY_FEATURES = (4, 4, 8, 8, 16, 4)


def blob_batch(n: int, size: int = 32, seed: int = 0, with_label: bool = True) -> list[dict]:
    """n images with a bright cube (the foreground) at a random place, and its label."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        label = torch.zeros(1, size, size, size)
        c = torch.randint(4, size - 12, (3,), generator=g)
        label[:, c[0] : c[0] + 9, c[1] : c[1] + 9, c[2] : c[2] + 9] = 1
        image = 0.3 * torch.randn(1, size, size, size, generator=g) + label
        items.append({"image": image, "label": label} if with_label else {"image": image})
    return items
