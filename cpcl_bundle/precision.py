# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Precision is a setting of the run, never of the math.

``amp: true`` runs the networks' forward passes under ``torch.autocast`` in the cheapest dtype the device runs
well: bfloat16 on a CUDA GPU that has it and on a CPU with bf16 instructions (``avx512_bf16`` or AMX), float16 with
a ``GradScaler`` on an older GPU, and float32 on a CPU without bf16 (said once, in one log line). The prototypes
(Eq. 3-5, 8-9) and every loss are computed outside autocast, in float32, from the networks' outputs cast to
float32 (:class:`cpcl_bundle.trainer.CPCLTrainer`). Nothing here changes a result when ``amp`` is off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["amp_dtype", "autocast", "cpu_has_bf16", "describe", "grad_scaler"]

logger = logging.getLogger(__name__)

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU has native bfloat16 arithmetic (``avx512_bf16`` or AMX tiles) that oneDNN uses; without
    it, bf16 autocast on a CPU emulates the dtype and is slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in probes):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def amp_dtype(
    device: str | torch.device, amp: bool, amp_kwargs: Mapping[str, Any] | None = None, log: bool = True
) -> torch.dtype | None:
    """The autocast dtype of a run, or ``None`` for float32.

    ``amp`` off -> ``None``. CUDA: ``amp_kwargs["dtype"]`` if given, else bfloat16 where
    ``torch.cuda.is_bf16_supported()``, else float16. CPU: ``amp_kwargs["dtype"]`` if given, else bfloat16 where
    :func:`cpu_has_bf16`, else ``None`` (with one log line saying so). Other devices: ``None``.
    """
    if not amp:
        return None
    dev = _device(device)
    requested = dict(amp_kwargs or {}).get("dtype")
    if dev.type == "cuda":
        if requested is not None:
            return requested
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        if requested is not None:
            return requested
        if cpu_has_bf16():
            return torch.bfloat16
        if log:
            logger.warning("amp: this CPU has no bf16 instructions (avx512_bf16 or AMX); training runs in float32")
        return None
    if log:
        logger.warning(f"amp: no mixed precision on device type {dev.type!r}; running in float32")
    return None


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype``, or a null context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_device(device).type, dtype=dtype)


def grad_scaler(device: str | torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` where the dtype needs one (float16: its small range underflows gradients), else ``None``
    (bfloat16 has float32's range)."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(_device(device).type)


def describe(dtype: torch.dtype | None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: how the run's forward passes compute."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
