# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The numerical guard of a training step: a non-finite loss or gradient never reaches the weights."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from monai.utils import CommonKeys as Keys

__all__ = ["NonFiniteGuard", "case_files"]


def case_files(*batches: Any) -> list[str]:
    """File names of the images of collated batches (from MetaTensor meta data), for messages."""
    names: list[str] = []
    for batch in batches:
        image = batch.get(Keys.IMAGE) if isinstance(batch, dict) else None
        files = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
        if files is None:
            continue
        names += [str(f) for f in (files if isinstance(files, (list, tuple)) else [files])]
    return names


class NonFiniteGuard:
    """Counts steps whose loss or gradients are not finite; such a step is skipped (its gradients dropped) and
    logged with the case files of its batches, and after ``max_steps`` of them in a row the run stops with an
    error, the weights (and so every checkpoint) being those of the last finite step.

    Args:
        max_steps: consecutive non-finite steps tolerated.
        logger: where skipped steps are reported.
    """

    def __init__(self, max_steps: int = 5, logger: logging.Logger | None = None) -> None:
        self.max_steps = int(max_steps)
        self.logger = logger or logging.getLogger(__name__)
        self.total = 0
        self.streak = 0

    @staticmethod
    def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
        norms = [p.grad.detach().abs().max() for p in parameters if p.grad is not None]
        return not norms or bool(torch.isfinite(torch.stack(norms)).all())

    def record(self, finite: bool, iteration: int, optimizer: torch.optim.Optimizer, *batches: Any) -> None:
        """After a step: reset the streak, or drop the gradients, log the cases and stop after too many."""
        if finite:
            self.streak = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.total += 1
        self.streak += 1
        cases = case_files(*batches)
        self.logger.warning(
            f"iteration {iteration}: non-finite loss or gradients, step skipped (weights unchanged); cases: {cases}"
        )
        if self.streak >= self.max_steps:
            raise RuntimeError(
                f"training stopped at iteration {iteration}: {self.streak} steps in a row had a non-finite loss or "
                f"gradients (last cases: {cases}). The weights are those of the last finite step. Check these "
                "inputs (NaN/Inf voxels, extreme values) or lower the learning rate."
            )
