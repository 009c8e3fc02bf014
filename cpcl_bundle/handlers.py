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

__all__ = ["PANELS", "PrototypeMapHandler", "pick_slice", "slice_cuts", "map_panels", "load_snapshots"]

PANELS = ("x_u", "p_u", "p_l2u", "x_l", "y_l", "p_l", "p_u2l")
"""Fig. 6 of the paper: unlabeled image, teacher P_u, L2U prediction; labeled image, label, student P_l,
U2L prediction (foreground channel of each probability map)."""


def pick_slice(volume: torch.Tensor, axis: int = -1) -> int:
    """Index along ``axis`` of the slice with the most foreground mass (the middle one if there is none)."""
    v = volume.float()
    dims = [d for d in range(v.ndim) if d != axis % v.ndim]
    mass = v.sum(dim=dims)
    return int(mass.argmax()) if float(mass.max()) > 0 else v.shape[axis] // 2


def slice_cuts(maps: dict[str, torch.Tensor | None], foreground: int = 1, axis: int = -1) -> dict[str, int]:
    """Where :func:`map_panels` cuts each stream: the labeled volume where its label has the most kidney, the
    unlabeled one where the teacher sees the most."""
    cut = {}
    if maps.get("y_l") is not None:
        cut["l"] = pick_slice(maps["y_l"][0], axis)
    if maps.get("p_u") is not None:
        cut["u"] = pick_slice(maps["p_u"][foreground], axis)
    return cut


def map_panels(
    maps: dict[str, torch.Tensor | None], foreground: int = 1, axis: int = -1, cut: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """2-D panels in [0, 1] from ``CPCLTrainer``'s ``state.prototype_maps`` (channel-first volumes).

    Each stream is cut at ``cut`` (default :func:`slice_cuts`); probability maps show their foreground channel,
    images their first channel.
    """
    panels: dict[str, np.ndarray] = {}
    cut = slice_cuts(maps, foreground, axis) if cut is None else cut
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
    """Every ``interval`` iterations, writes the prototype maps of the paper's Fig. 6 as images.

    With ``fixed`` (the default), the first snapshot keeps its batch's first labeled and unlabeled volume and
    every snapshot shows the current student and teacher on those same volumes, cut at the same slices
    (:meth:`CPCLTrainer.probe_maps`): one slice followed through training, as in the figure. Otherwise each
    snapshot shows the step's own batch. Writes to TensorBoard (``tag/<panel>``) and, when ``png_dir`` is
    given, per step a montage PNG (``<png_dir>/prototype_maps_<iteration>.png``; rows: unlabeled then labeled)
    and the panels as arrays (``.npz``, read by :func:`load_snapshots`).

    Args:
        log_dir: TensorBoard folder (ignored when ``summary_writer`` is given).
        interval: iterations between two snapshots.
        summary_writer: an existing ``SummaryWriter``.
        png_dir: optional folder for montage PNGs and panel arrays.
        tag: TensorBoard tag prefix.
        fixed: follow the first snapshot's volumes and slices through training.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike = "./runs",
        interval: int = 100,
        summary_writer=None,
        png_dir: str | os.PathLike | None = None,
        tag: str = "prototype_maps",
        fixed: bool = True,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be at least 1, got {interval}")
        self.log_dir, self.interval, self._writer = str(log_dir), int(interval), summary_writer
        self.png_dir = None if png_dir is None else Path(png_dir)
        self.tag, self.fixed = tag, bool(fixed)
        self._probe: tuple | None = None
        self._cut: dict[str, int] | None = None

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
        cut = None
        if self.fixed:
            if self._probe is None:
                self._probe = (maps["x_l"], maps["y_l"], maps.get("x_u") if maps.get("p_u") is not None else None)
                self._cut = slice_cuts(maps)
            maps, cut = engine.probe_maps(*self._probe), self._cut
        panels = map_panels(maps, cut=cut)
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
        np.savez_compressed(self.png_dir / f"prototype_maps_{step:06d}.npz", **panels)


def load_snapshots(png_dir: str | os.PathLike) -> dict[int, dict[str, np.ndarray]]:
    """The panels :class:`PrototypeMapHandler` saved in ``png_dir``, by iteration (ascending)."""
    snapshots = {}
    for path in sorted(Path(png_dir).glob("prototype_maps_*.npz")):
        with np.load(path) as data:
            snapshots[int(path.stem.rsplit("_", 1)[1])] = {k: data[k] for k in data.files}
    return snapshots
