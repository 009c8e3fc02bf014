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
"""CPCLTrainer: MONAI's SupervisedTrainer contract, with a teacher, an unlabeled stream and a method.

One ``_iteration`` serves every method of :mod:`cpcl_bundle.methods`; it reads like Eq. 11::

    L = L_s + lambda(t) * (L_fpc + beta * L_bpc + L_mt)      (terms the method does not use are absent)

The teacher is the exponential moving average of the student (Eq. 2) kept by Ignite's ``EMAHandler``
(momentum ``1 - ema_decay``), updated at ``ITERATION_COMPLETED`` after the optimizer step. The LR schedule
(poly, power 0.9, per step) is not the trainer's job: put MONAI's ``LrScheduleHandler`` with
``torch.optim.lr_scheduler.PolynomialLR`` in ``train_handlers`` (see :func:`paper_optimizer` and
:func:`poly_lr_handler`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, EventEnum, Events
from ignite.handlers import EMAHandler
from ignite.metrics import Metric
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.handlers import LrScheduleHandler
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Transform
from monai.utils import CommonKeys as Keys

from cpcl_bundle.data import CyclingLoader
from cpcl_bundle.losses import (
    PAPER_BETA,
    PAPER_PROTOTYPE_SCALE,
    PAPER_W_MAX,
    backward_prototype_loss,
    consistency_weight,
    forward_prototype_loss,
    prototype_predictions,
    softmax_mse_consistency,
)
from cpcl_bundle.methods import Method, get_method
from cpcl_bundle.networks import FeatureTap

__all__ = ["CPCLTrainer", "TERM_KEYS", "loss_terms", "paper_optimizer", "poly_lr_handler"]

TERM_KEYS = (
    "loss",
    "loss_sup",
    "loss_fpc",
    "loss_bpc",
    "loss_mt",
    "lambda",
    "lr",
    "skipped_fpc",
    "skipped_bpc",
    "skipped_nonfinite",
)
"""Scalars every iteration puts in ``engine.state.output`` (absent terms are 0)."""


def loss_terms(output: Any) -> dict[str, float]:
    """The scalar terms of an iteration's output, for ``StatsHandler``/``TensorBoardStatsHandler``.

    Works on the raw dict and on the decollated list of per-image dicts (scalars are replicated there).
    """
    first = output[0] if isinstance(output, (list, tuple)) else output
    return {k: float(first[k]) for k in TERM_KEYS if k in first}


def paper_optimizer(parameters: Iterable, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4):
    """The paper's optimiser: SGD, momentum 0.9, weight decay 1e-4, learning rate 0.01."""
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_lr_handler(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9) -> LrScheduleHandler:
    """Poly decay ``lr_t = lr_0 (1 - t / T)^0.9`` stepped every iteration, as MONAI's ``LrScheduleHandler``."""
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=int(total_steps), power=power)
    return LrScheduleHandler(scheduler, print_lr=False, epoch_level=False)


def _case_files(*batches: Any) -> list[str]:
    """File names of the images of collated batches (from MetaTensor meta data), for messages."""
    names: list[str] = []
    for batch in batches:
        image = batch.get(Keys.IMAGE) if isinstance(batch, dict) else None
        files = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
        if files is None:
            continue
        names += [str(f) for f in (files if isinstance(files, (list, tuple)) else [files])]
    return names


class CPCLTrainer(Trainer):
    """Semi-supervised trainer for CPCL and the methods it is compared with (Xu et al., JBHI 2022).

    The constructor takes SupervisedTrainer's arguments in the same order (so bundle configs and MONAI
    Label drive it the same way: ``max_epochs``, ``train_data_loader``, ``train_handlers``, ``device`` as a
    string or ``torch.device``) and then:

    Args:
        unlabeled_data_loader: loader of unlabeled images (``{"image": ...}`` batches). It is cycled
            independently of the labeled loader, which defines the epochs. Required when the method has an
            unsupervised term.
        method: a name of :data:`cpcl_bundle.methods.METHODS` or a :class:`~cpcl_bundle.methods.Method`.
        teacher: ``None`` (default): an ``EMAHandler`` of ``network`` with momentum ``1 - ema_decay`` is
            created and attached; an ``EMAHandler``: it is attached here (do not also list it in
            ``train_handlers``); an ``nn.Module``: used as the teacher as it is (you update it).
        ema_decay: alpha of Eq. 2 (0.99).
        beta: weight of ``L_bpc`` (Eq. 11; 10 in the paper).
        w_max: maximum of ``lambda(t)`` (0.1).
        rampup: ``"gaussian"`` (Eq. 11), ``"sigmoid"`` (MT code bases) or ``"constant"``.
        rampup_length: ``t_max`` in steps (in units of ``rampup_step_size``); default the whole run.
        rampup_step_size: evaluate the ramp-up on ``t // rampup_step_size`` (UA-MT uses 150).
        prototype_scale: alpha of Eq. 5 and 9 (20).
        feature_layer: the layer whose output is ``F`` (default the encoder's last layer, as the paper says).
        prototype_grad: ``True`` (the paper): the student's labeled features carry gradient in both
            prototype losses. ``False`` reproduces the released code, whose detached features make both
            prototype losses inert.
        confidence_weighting: weight the masked average pooling by the softmax confidence (released code:
            the student's detached softmax on labeled images, the teacher's ``P_u`` on unlabeled ones).
        per_image_prototypes: pair the prototypes of labeled image b with unlabeled image b (released
            code) instead of averaging them over the batch (the paper).
        stability: add the mean-teacher consistency term to the method (released code's "stability" loss).
        noise_std, noise_clip: teacher input noise ``clamp(N(0, std^2), -clip, clip)`` for the MT term.
        max_iterations: stop after this many iterations even if ``max_epochs`` allows more (the run is
            ``min(max_iterations, max_epochs * epoch_length)`` steps; ramp-up and LR follow that length).
        max_nonfinite_steps: a step whose loss or gradients are not finite never updates the weights (it is
            logged with the case files of its batches); after this many such steps in a row the run stops
            with an error. The weights, and so every checkpoint, stay those of the last finite step.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        unlabeled_data_loader: Iterable | None = None,
        method: str | Method = "cpcl",
        teacher: torch.nn.Module | EMAHandler | None = None,
        ema_decay: float = 0.99,
        beta: float = PAPER_BETA,
        w_max: float = PAPER_W_MAX,
        rampup: str = "gaussian",
        rampup_length: int | None = None,
        rampup_step_size: int = 1,
        prototype_scale: float = PAPER_PROTOTYPE_SCALE,
        feature_layer: str = "encoder",
        prototype_grad: bool = True,
        confidence_weighting: bool = False,
        per_image_prototypes: bool = False,
        stability: bool = False,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        max_iterations: int | None = None,
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=None,  # registered below, after the EMA update, so they see this step's teacher
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.optim_set_to_none = optim_set_to_none
        self.method = get_method(method, stability=stability)
        self.beta, self.w_max = float(beta), float(w_max)
        self.rampup, self.rampup_length, self.rampup_step_size = rampup, rampup_length, int(rampup_step_size)
        consistency_weight(0, 1, 1.0, rampup)  # fail now on an unknown ramp-up name
        self.prototype_scale = float(prototype_scale)
        self.feature_layer = feature_layer
        self.prototype_grad = bool(prototype_grad)
        self.confidence_weighting = bool(confidence_weighting)
        self.per_image_prototypes = bool(per_image_prototypes)
        self.noise_std, self.noise_clip = float(noise_std), float(noise_clip)
        self.skipped = {"fpc": 0, "bpc": 0}
        self.record_maps = False  # set by a handler (e.g. PrototypeMapHandler) for the steps it displays
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.nonfinite = {"total": 0, "streak": 0}
        self.max_iterations = None if max_iterations is None else int(max_iterations)
        if self.max_iterations is not None:
            if self.max_iterations < 1:
                raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
            self.add_event_handler(Events.ITERATION_COMPLETED, self._stop_at_max_iterations)
            self.add_event_handler(Events.EPOCH_COMPLETED, self._stop_at_max_iterations)

        self.ema: EMAHandler | None = None
        self.teacher: torch.nn.Module | None = None
        if self.method.needs_teacher:
            if teacher is None or isinstance(teacher, EMAHandler):
                if not 0.0 <= ema_decay < 1.0:
                    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
                self.ema = teacher if teacher is not None else EMAHandler(network, momentum=1.0 - ema_decay)
                self.ema.attach(self, name="ema_momentum")
                self.teacher = self.ema.ema_model
            else:
                self.teacher = teacher
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        if self.method.needs_prototypes:
            FeatureTap(network, feature_layer)  # fail now on an unknown layer name
        self.unlabeled_stream: CyclingLoader | None = None
        if self.method.needs_unlabeled:
            if unlabeled_data_loader is None:
                raise ValueError(f"method {self.method.name!r} needs unlabeled data: pass unlabeled_data_loader")
            self.unlabeled_stream = CyclingLoader(unlabeled_data_loader)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def total_iterations(self) -> int:
        """Length of the run in steps: ``max_epochs * epoch_length``, capped by ``max_iterations``."""
        total = (self.state.max_epochs or 1) * (self.state.epoch_length or 1)
        return total if self.max_iterations is None else min(total, self.max_iterations)

    def _stop_at_max_iterations(self, engine: Engine) -> None:
        """Stop at ``max_iterations``; at an epoch's last iteration, only once the epoch's handlers
        (validation, checkpoints) have run."""
        at_epoch_end = engine.state.epoch_length and engine.state.iteration % engine.state.epoch_length == 0
        if engine.state.iteration >= self.max_iterations and (engine.last_event_name == Events.EPOCH_COMPLETED
                                                               or not at_epoch_end):
            engine.terminate()

    def consistency_weight(self, iteration: int) -> float:
        """``lambda(t)`` at 1-based ``iteration`` (``t = iteration - 1``), ``t_max`` = the whole run by default."""
        length = self.rampup_length
        if length is None:
            length = self.total_iterations / self.rampup_step_size
        return consistency_weight(iteration - 1, length, self.w_max, self.rampup, self.rampup_step_size)

    def _prepare(self, batchdata: Any) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        if len(batch) == 2:
            return batch[0], batch[1], (), {}
        return batch[0], batch[1], batch[2], batch[3]

    def _autocast(self):
        if self.amp and self.scaler is not None:
            return torch.autocast("cuda", **self.amp_kwargs)
        return contextlib.nullcontext()

    def _forward(self, net: torch.nn.Module, inputs: torch.Tensor, tap: bool, args: tuple, kwargs: dict):
        if not tap:
            return self.inferer(inputs, net, *args, **kwargs), None
        with FeatureTap(net, self.feature_layer) as t:
            logits = self.inferer(inputs, net, *args, **kwargs)
        return logits, t.features

    def _teacher_input(self, x_u: torch.Tensor) -> torch.Tensor:
        if not self.method.teacher_noise or self.noise_std <= 0:
            return x_u
        noise = torch.randn_like(x_u) * self.noise_std
        return x_u + noise.clamp(-self.noise_clip, self.noise_clip)

    def _skip(self, term: str) -> None:
        self.skipped[term] += 1
        if self.skipped[term] == 1:
            self.logger.warning(
                f"iteration {self.state.iteration}: L_{term} skipped, a class has no prototype in this batch "
                "(counted in output['skipped_%s'])" % term
            )

    # ---------------------------------------------------------------------------------------------- iteration
    def _iteration(self, engine: CPCLTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """One step: forwards, ``L = L_s + lambda (L_fpc + beta L_bpc + L_mt)``, backward, optimizer step.

        Fires ``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` and ``MODEL_COMPLETED`` like
        SupervisedTrainer; ``engine.state.output`` holds IMAGE/LABEL/PRED (labeled half) and LOSS, plus every
        term of :data:`TERM_KEYS`.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        method = engine.method
        x_l, y_l, args, kwargs = engine._prepare(batchdata)
        if y_l is None:
            raise ValueError("the labeled batch has no 'label': CPCLTrainer's train_data_loader must yield labels")
        unlabeled_batch = next(engine.unlabeled_stream) if method.needs_unlabeled else None
        x_u = engine._prepare(unlabeled_batch)[0] if unlabeled_batch is not None else None
        engine.state.output = {Keys.IMAGE: x_l, Keys.LABEL: y_l, "lr": float(engine.optimizer.param_groups[0]["lr"])}
        tap = method.needs_prototypes
        b_l = x_l.shape[0]

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            logits_t = feats_u = None
            if method.needs_teacher:
                with torch.no_grad():
                    logits_t, feats_u = engine._forward(engine.teacher, engine._teacher_input(x_u), tap, args, kwargs)
            x_s = torch.cat([x_l, x_u], 0) if method.student_sees_unlabeled else x_l
            logits, feats = engine._forward(engine.network, x_s, tap, args, kwargs)
            logits_l = logits[:b_l]
            engine.state.output[Keys.PRED] = logits_l
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)

            terms = engine._loss_terms(logits, logits_l, y_l, feats, b_l, logits_t, feats_u)
            if engine.record_maps:
                engine._record_maps(x_l, y_l, logits_l, x_u, logits_t, feats, b_l, feats_u)
        loss = terms.pop("loss")
        engine.state.output[Keys.LOSS] = loss
        engine.state.output.update(terms)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        finite = bool(torch.isfinite(loss.detach()))
        if engine.amp and engine.scaler is not None:
            if finite:
                engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if finite:  # GradScaler itself skips steps with non-finite gradients
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        else:
            if finite:
                loss.backward()
                finite = engine._gradients_finite()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if finite:
                engine.optimizer.step()
        engine._count_nonfinite(finite, batchdata, unlabeled_batch)
        engine.state.output["skipped_nonfinite"] = engine.nonfinite["total"]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _gradients_finite(self) -> bool:
        norms = [p.grad.detach().abs().max() for p in self.network.parameters() if p.grad is not None]
        return not norms or bool(torch.isfinite(torch.stack(norms)).all())

    def _count_nonfinite(self, finite: bool, *batches: Any) -> None:
        """Numerical guard: log a skipped step with its cases; stop after ``max_nonfinite_steps`` in a row."""
        if finite:
            self.nonfinite["streak"] = 0
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite["total"] += 1
        self.nonfinite["streak"] += 1
        cases = _case_files(*batches)
        self.logger.warning(
            f"iteration {self.state.iteration}: non-finite loss or gradients, step skipped (weights unchanged); "
            f"cases: {cases}"
        )
        if self.nonfinite["streak"] >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"training stopped at iteration {self.state.iteration}: {self.nonfinite['streak']} steps in a row "
                f"had a non-finite loss or gradients (last cases: {cases}). The weights are those of the last "
                "finite step. Check these inputs (NaN/Inf voxels, extreme values) or lower the learning rate."
            )

    @torch.no_grad()
    def _record_maps(self, x_l, y_l, logits_l, x_u, logits_t, feats, b_l, feats_u) -> None:
        """First image of each stream, on the CPU, in ``state.prototype_maps`` (Fig. 6 of the paper):
        inputs, label, student ``P_l``, teacher ``P_u`` and, for prototype methods, ``P_l2u`` and ``P_u2l``."""
        self.state.prototype_maps = self._maps(x_l, y_l, logits_l, x_u, logits_t, feats, b_l, feats_u)

    def _maps(self, x_l, y_l, logits_l, x_u, logits_t, feats, b_l, feats_u) -> dict[str, torch.Tensor | None]:
        def first(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[0].detach().float().cpu()

        maps = {"x_l": first(x_l), "y_l": first(y_l), "p_l": first(torch.softmax(logits_l.float(), 1))}
        if x_u is not None and logits_t is not None:
            probs_u = torch.softmax(logits_t.float(), 1)
            maps.update(x_u=first(x_u), p_u=first(probs_u))
            if self.method.needs_prototypes:
                preds = prototype_predictions(feats[:b_l].float(), y_l, feats_u.float(), probs_u, self.prototype_scale)
                maps.update({k: first(v) for k, v in preds.items()})
        return maps

    @torch.no_grad()
    def probe_maps(
        self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """The Fig. 6 maps of the current student and teacher on fixed volumes (channel-first, one case each,
        e.g. kept from an earlier batch), so one slice can be followed through training. Side-effect free:
        no weights, statistics or RNG streams change (the teacher's input noise is not applied)."""
        device = self.state.device if self.state.device is not None else next(self.network.parameters()).device
        x_l, y_l = x_l[None].to(device), y_l[None].to(device)
        tap = self.method.needs_prototypes
        logits_t = feats_u = None
        if x_u is not None and self.method.needs_teacher:
            x_u = x_u[None].to(device)
            logits_t, feats_u = self._forward(self.teacher, x_u, tap, (), {})
        else:
            x_u = None
        logits_l, feats = self._forward(self.network, x_l, tap, (), {})
        return self._maps(x_l, y_l, logits_l, x_u, logits_t, feats, 1, feats_u)

    def _loss_terms(
        self,
        logits: torch.Tensor,
        logits_l: torch.Tensor,
        y_l: torch.Tensor,
        feats: torch.Tensor | None,
        b_l: int,
        logits_t: torch.Tensor | None,
        feats_u: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Eq. 11 for the method's terms. Returns the total (tensor) and every term (floats)."""
        method = self.method
        loss_sup = self.loss_function(logits_l, y_l).mean()
        lam = self.consistency_weight(self.state.iteration) if method.needs_unlabeled else 0.0
        zero = torch.zeros((), device=loss_sup.device)
        l_fpc = l_bpc = l_mt = zero
        if method.needs_prototypes:
            feats_l = feats[:b_l].float()
            if not self.prototype_grad:
                feats_l = feats_l.detach()
            probs_u = torch.softmax(logits_t.float(), 1)
            if method.uses("fpc"):
                w_l = torch.softmax(logits_l.detach().float(), 1) if self.confidence_weighting else None
                l_fpc, ok = forward_prototype_loss(
                    feats_l, y_l, feats_u.float(), probs_u, self.prototype_scale, w_l, self.per_image_prototypes
                )
                if not ok:
                    self._skip("fpc")
            if method.uses("bpc"):
                w_u = probs_u if self.confidence_weighting else None
                l_bpc, ok = backward_prototype_loss(
                    feats_l, y_l, feats_u.float(), probs_u, self.prototype_scale, w_u, self.per_image_prototypes
                )
                if not ok:
                    self._skip("bpc")
        if method.uses("mt"):
            l_mt = softmax_mse_consistency(logits[b_l:].float(), torch.softmax(logits_t.float(), 1))
        loss = loss_sup + lam * (l_fpc + self.beta * l_bpc + l_mt)
        return {
            "loss": loss,
            "loss_sup": float(loss_sup.detach()),
            "loss_fpc": float(l_fpc.detach()),
            "loss_bpc": float(l_bpc.detach()),
            "loss_mt": float(l_mt.detach()),
            "lambda": float(lam),
            "skipped_fpc": self.skipped["fpc"],
            "skipped_bpc": self.skipped["bpc"],
        }

