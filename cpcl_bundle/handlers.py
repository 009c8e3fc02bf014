# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Handlers for what people look at during training: the prototype maps of the paper's Fig. 6."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from cpcl_bundle.losses import prototype_predictions
from cpcl_bundle.terms import PrototypeTerm, Step

__all__ = [
    "PANELS",
    "PrototypeMapHandler",
    "step_maps",
    "probe_maps",
    "pick_slice",
    "slice_cuts",
    "class_panels",
    "map_panels",
    "load_snapshots",
]

#: Fig. 6 of the paper: unlabeled image, teacher P_u, L2U prediction; labeled image, label, student P_l,
#: U2L prediction (foreground channel of each probability map).
PANELS = ("x_u", "p_u", "p_l2u", "x_l", "y_l", "p_l", "p_u2l")


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
    """2-D panels in [0, 1] from :func:`step_maps` or :func:`probe_maps` (channel-first volumes).

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
        if name == "y_l":  # class indices: this class's mask
            plane = (plane.round() == foreground).float()
        if name.startswith("x"):
            lo, hi = float(plane.min()), float(plane.max())
            plane = (plane - lo) / (hi - lo) if hi > lo else torch.zeros_like(plane)
        panels[name] = plane.clamp(0, 1).numpy()
    return panels


def class_panels(maps: dict[str, torch.Tensor | None], cut: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """:func:`map_panels` for every foreground class, all cut at the same slices: class 1's panels under their
    plain names, class ``k > 1``'s as ``<panel>_class<k>`` (a binary model's panels are unchanged)."""
    probs = maps.get("p_l")
    num_classes = 2 if probs is None else int(probs.shape[0])
    cut = slice_cuts(maps) if cut is None else cut
    panels: dict[str, np.ndarray] = {}
    for k in range(1, num_classes):
        suffix = "" if k == 1 else f"_class{k}"
        panels.update({f"{name}{suffix}": plane for name, plane in map_panels(maps, foreground=k, cut=cut).items()})
    return panels


def _prototype_term(trainer: Any) -> PrototypeTerm | None:
    return next((t for t in getattr(trainer, "terms", ()) if isinstance(t, PrototypeTerm)), None)


@torch.no_grad()
def step_maps(step: Step, prototype_term: PrototypeTerm | None = None) -> dict[str, torch.Tensor | None]:
    """The Fig. 6 maps of a step, first image of each stream, on the CPU: inputs, label, student ``P_l``,
    teacher ``P_u`` and, with a prototype term, ``P_l2u`` and ``P_u2l`` (batch prototypes, Eq. 5 and 9)."""

    def first(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[0].detach().float().cpu()

    maps = {"x_l": first(step.x_l), "y_l": first(step.y_l), "p_l": first(torch.softmax(step.student().float(), 1))}
    if step.x_u is not None and step.teacher_net is not None:
        probs_u = step.teacher_probs()
        maps.update(x_u=first(step.x_u), p_u=first(probs_u))
        if prototype_term is not None:
            layer = prototype_term.layers[0]
            feats_l, feats_u = step.student_features(layer).float(), step.teacher_features(layer).float()
            preds = prototype_predictions(feats_l, step.y_l, feats_u, probs_u, prototype_term.scale)
            maps.update({k: first(v) for k, v in preds.items()})
    return maps


@torch.no_grad()
def probe_maps(
    trainer: Any, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor | None = None
) -> dict[str, torch.Tensor | None]:
    """The Fig. 6 maps of the trainer's current student and teacher on fixed volumes (channel-first, one case
    each, e.g. kept from an earlier batch), so one slice can be followed through training. Side-effect free: no
    weights, statistics or RNG streams change (the teacher's input noise is not applied; the backbone's dropout,
    where the run has it, draws from a generator forked and seeded for the probe)."""
    network = trainer.network
    device = trainer.state.device if trainer.state.device is not None else next(network.parameters()).device
    term = _prototype_term(trainer)
    teacher = trainer.teacher if x_u is not None else None
    x_u = x_u[None].to(device) if teacher is not None else None
    step = Step(
        network,
        teacher,
        x_l[None].to(device),
        y_l[None].to(device),
        x_u,
        lambda net, x: trainer.inferer(x, net),
        layers=() if term is None else term.layers,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # a network with dropout draws the same masks at every snapshot, and no RNG moves
        return step_maps(step, term)


class PrototypeMapHandler:
    """Every ``interval`` iterations, writes the prototype maps of the paper's Fig. 6 as images.

    With ``fixed`` (the default), the first snapshot keeps its batch's first labeled and unlabeled volume and
    every snapshot shows the current student and teacher on those same volumes, cut at the same slices
    (:func:`probe_maps`): one slice followed through training, as in the figure. With several foreground
    classes, each class has its panels (:func:`class_panels`) and its two rows in the montage. Otherwise each
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
        self._owns_writer = summary_writer is None
        self.png_dir = None if png_dir is None else Path(png_dir)
        self.tag, self.fixed = tag, bool(fixed)
        self._probe: tuple | None = None
        self._cut: dict[str, int] | None = None
        self._maps: dict[str, torch.Tensor | None] | None = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def attach(self, engine: Engine) -> None:
        if not hasattr(engine, "make_step"):
            raise TypeError(f"{type(engine).__name__} does not expose its steps: use CPCLTrainer")
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._capture)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._write)
        engine.add_event_handler(Events.COMPLETED, self.close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.close)

    def close(self, engine: Engine | None = None) -> None:
        """Closes the TensorBoard writer this handler opened (an injected ``summary_writer`` stays open: its owner
        closes it); a later snapshot opens a new one."""
        if self._owns_writer and self._writer is not None:
            self._writer.close()
            self._writer = None

    def _capture(self, engine: Engine) -> None:
        """While the step is alive (``MODEL_COMPLETED``), on the steps this handler shows."""
        if engine.state.iteration % self.interval == 0 and (not self.fixed or self._probe is None):
            self._maps = step_maps(engine.state.step, _prototype_term(engine))

    def _write(self, engine: Engine) -> None:
        maps, self._maps = self._maps, None
        step = engine.state.iteration
        cut = None
        if self.fixed:
            if self._probe is None:
                if not maps:
                    return
                self._probe = (maps["x_l"], maps["y_l"], maps.get("x_u") if maps.get("p_u") is not None else None)
                self._cut = slice_cuts(maps)
            maps, cut = probe_maps(engine, *self._probe), self._cut
        if not maps:
            return
        panels = class_panels(maps, cut=cut)
        for name, plane in panels.items():
            self.writer.add_image(f"{self.tag}/{name}", plane[None], step, dataformats="CHW")
        self.writer.flush()
        if self.png_dir is not None and panels:
            self._save_png(panels, step)

    def _save_png(self, panels: dict[str, np.ndarray], step: int) -> None:
        from PIL import Image

        shape = next(iter(panels.values())).shape
        suffixes = [""] + sorted({n[n.index("_class") :] for n in panels if "_class" in n})
        rows = []
        for suffix in suffixes:  # per class: the unlabeled row, then the labeled row
            for names in (PANELS[:3], PANELS[3:]):
                row = [panels.get(n + suffix, np.zeros(shape)) for n in names]
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
