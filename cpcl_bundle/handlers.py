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
"""Handlers for what people look at during training: the prototype maps of the paper's Fig. 6."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = ["PANELS", "PrototypeMapHandler", "pick_slice", "map_panels"]

PANELS = ("x_u", "p_u", "p_l2u", "x_l", "y_l", "p_l", "p_u2l")
"""Fig. 6 of the paper: unlabeled image, teacher P_u, L2U prediction; labeled image, label, student P_l,
U2L prediction (foreground channel of each probability map)."""


def pick_slice(volume: torch.Tensor, axis: int = -1) -> int:
    """Index along ``axis`` of the slice with the most foreground mass (the middle one if there is none)."""
    v = volume.float()
    dims = [d for d in range(v.ndim) if d != axis % v.ndim]
    mass = v.sum(dim=dims)
    return int(mass.argmax()) if float(mass.max()) > 0 else v.shape[axis] // 2


def map_panels(maps: dict[str, torch.Tensor | None], foreground: int = 1, axis: int = -1) -> dict[str, np.ndarray]:
    """2-D panels in [0, 1] from ``CPCLTrainer``'s ``state.prototype_maps`` (channel-first volumes).

    The labeled row is cut where the label has the most kidney, the unlabeled row where the teacher sees the
    most; probability maps show their foreground channel, images their first channel.
    """
    panels: dict[str, np.ndarray] = {}
    cut = {}
    if maps.get("y_l") is not None:
        cut["l"] = pick_slice(maps["y_l"][0], axis)
    if maps.get("p_u") is not None:
        cut["u"] = pick_slice(maps["p_u"][foreground], axis)
    for name in PANELS:
        vol = maps.get(name)
        stream = name[-1]  # "l" or "u"
        if vol is None or stream not in cut:
            continue
        channel = 0 if name.startswith(("x", "y")) else foreground
        plane = vol[channel].select(axis % (vol.ndim - 1), cut[stream]).float()
        if name.startswith("x"):
            lo, hi = float(plane.min()), float(plane.max())
            plane = (plane - lo) / (hi - lo) if hi > lo else torch.zeros_like(plane)
        panels[name] = plane.clamp(0, 1).numpy()
    return panels


class PrototypeMapHandler:
    """Every ``interval`` iterations, asks the trainer to keep this step's maps and writes them as images.

    Writes to TensorBoard (``tag/<panel>``) and, when ``png_dir`` is given, a montage PNG per step
    (``<png_dir>/prototype_maps_<iteration>.png``; rows: unlabeled then labeled) for the Fig. 6 figure.

    Args:
        log_dir: TensorBoard folder (ignored when ``summary_writer`` is given).
        interval: iterations between two snapshots.
        summary_writer: an existing ``SummaryWriter``.
        png_dir: optional folder for montage PNGs.
        tag: TensorBoard tag prefix.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike = "./runs",
        interval: int = 100,
        summary_writer=None,
        png_dir: str | os.PathLike | None = None,
        tag: str = "prototype_maps",
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be at least 1, got {interval}")
        self.log_dir, self.interval, self._writer = str(log_dir), int(interval), summary_writer
        self.png_dir = None if png_dir is None else Path(png_dir)
        self.tag = tag

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def attach(self, engine: Engine) -> None:
        if not hasattr(engine, "record_maps"):
            raise TypeError(f"{type(engine).__name__} does not record prototype maps: use CPCLTrainer")
        engine.add_event_handler(Events.ITERATION_STARTED(every=self.interval), self._request)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._write)

    def _request(self, engine: Engine) -> None:
        engine.record_maps = True

    def _write(self, engine: Engine) -> None:
        engine.record_maps = False
        maps = getattr(engine.state, "prototype_maps", None)
        if not maps:
            return
        engine.state.prototype_maps = None
        step = engine.state.iteration
        panels = map_panels(maps)
        for name, plane in panels.items():
            self.writer.add_image(f"{self.tag}/{name}", plane[None], step, dataformats="CHW")
        self.writer.flush()
        if self.png_dir is not None and panels:
            self._save_png(panels, step)

    def _save_png(self, panels: dict[str, np.ndarray], step: int) -> None:
        from PIL import Image

        shape = next(iter(panels.values())).shape
        rows = []
        for names in (PANELS[:3], PANELS[3:]):
            row = [panels.get(n, np.zeros(shape)) for n in names]
            row += [np.zeros(shape)] * (4 - len(row))
            rows.append(np.concatenate([np.rot90(p) for p in row], axis=1))
        montage = (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
        self.png_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(montage).save(self.png_dir / f"prototype_maps_{step:06d}.png")
