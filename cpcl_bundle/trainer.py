# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""CPCLTrainer: MONAI's SupervisedTrainer contract, with a teacher, an unlabeled stream and a method.

One ``_iteration`` serves every method of :mod:`cpcl_bundle.methods`; it reads like Eq. 11::

    L = L_s + lambda(t) * sum_k w_k L_k      (CPCL: L_fpc + beta L_bpc; MT: L_mt; UA-MT: masked L_mt; ...)

The terms are units of :mod:`cpcl_bundle.terms`; a :class:`~cpcl_bundle.terms.Step` computes each forward
pass they need once. The teacher is the exponential moving average of the student (Eq. 2) kept by Ignite's
``EMAHandler`` (momentum ``1 - ema_decay``), updated at ``ITERATION_COMPLETED`` after the optimizer step. The
LR schedule (poly, power 0.9, per step) is MONAI's ``LrScheduleHandler`` stepping :func:`lr_scheduler` in
``train_handlers``; it, the optimiser (SGD) and the supervised loss are ``lr_scheduler``, ``optimizer`` and ``loss``
in configs/train.json, which builds them. The Fig. 6 capture is :class:`cpcl_bundle.handlers.PrototypeMapHandler`;
the numerical guard is :class:`cpcl_bundle.guard.NonFiniteGuard`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from ignite.handlers import TimeLimit as _IgniteTimeLimit
from monai.engines import SupervisedTrainer, Workflow
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from cpcl_bundle.data import CyclingLoader
from cpcl_bundle.guard import NonFiniteGuard
from cpcl_bundle.losses import PAPER_W_MAX, consistency_weight, ema_decay_at
from cpcl_bundle.methods import TRAINER_OPTIONS, Method, get_method
from cpcl_bundle.networks import REFERENCE_DROPOUT_LAYERS, FeatureTap, add_dropout
from cpcl_bundle.precision import amp_dtype, autocast, describe, grad_scaler
from cpcl_bundle.terms import Step

__all__ = ["CPCLTrainer", "StopAtIteration", "TimeLimit", "TERM_KEYS", "attach_teacher", "loss_terms", "lr_scheduler"]

#: Scalars every iteration puts in ``engine.state.output``; each term adds ``loss_<name>`` and its own.
TERM_KEYS = ("loss", "loss_sup", "lambda", "lr", "skipped_nonfinite")

_NOT_SCALARS = {Keys.IMAGE, Keys.LABEL, Keys.PRED}


def loss_terms(output: Any) -> dict[str, float]:
    """The scalar terms of an iteration's output, for ``StatsHandler``/``TensorBoardStatsHandler``.

    Works on the raw dict and on the decollated list of per-image dicts (scalars are replicated there).
    """
    first = output[0] if isinstance(output, (list, tuple)) else output
    scalars = {}
    for key, value in first.items():
        if key in _NOT_SCALARS or (isinstance(value, torch.Tensor) and value.numel() != 1):
            continue
        if isinstance(value, (int, float, torch.Tensor)):
            scalars[key] = float(value.detach() if isinstance(value, torch.Tensor) else value)
    return scalars


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str = "poly",
    total_steps: int = 1,
    power: float = 0.9,
    step_size: int = 2500,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped every iteration: ``"poly"``, ``lr_0 (1 - t / T)^power`` (the paper;
    ``PolynomialLR``), or ``"step"``, ``lr_0 gamma^(t // step_size)`` (``StepLR``; UA-MT's and DTML's code on the
    Left Atrium set: x0.1 every 2,500 steps)."""
    if kind == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=int(total_steps), power=power)
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(step_size), gamma=gamma)
    raise ValueError(f"unknown learning-rate schedule {kind!r}: expected 'poly' or 'step'")


class StopAtIteration:
    """Ends a run after ``max_iterations`` steps; at an epoch's last iteration only once the epoch's handlers
    (validation, checkpoints) have run."""

    def __init__(self, max_iterations: int) -> None:
        if int(max_iterations) < 1:
            raise ValueError(f"max_iterations must be at least 1, got {max_iterations}")
        self.max_iterations = int(max_iterations)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        at_epoch_end = engine.state.epoch_length and engine.state.iteration % engine.state.epoch_length == 0
        if engine.state.iteration >= self.max_iterations and (
            engine.last_event_name == Events.EPOCH_COMPLETED or not at_epoch_end
        ):
            engine.terminate()


class TimeLimit(_IgniteTimeLimit):
    """Ignite's ``TimeLimit`` as a handler of ``train_handlers``: ends a run gracefully once ``limit_sec`` seconds
    have passed since it started (not since the handler was made, which precedes caching the data). The run ends
    as at its last step: the final model and the resume checkpoint are written, and a later run with
    ``resume=True`` goes on from there. Under torchrun the ranks decide together: each rank's clock says whether
    its limit has passed, and all stop at the first iteration where any rank's has (a rank that stopped alone would
    leave the others waiting in DDP's gradient all-reduce)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self.start_time = time.time()

    def __call__(self, engine: Engine) -> None:
        over = time.time() - self.start_time > self.limit_sec
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            nccl = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
            flag = torch.tensor([float(over)], device=f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            over = bool(flag.item())
        if over:
            self.logger.info(f"Reached the time limit: {self.limit_sec} sec. Stop training")
            engine.terminate()


def attach_teacher(
    engine: Engine,
    network: torch.nn.Module,
    teacher: torch.nn.Module | EMAHandler | None,
    ema_decay: float,
    ema_warmup: bool = False,
) -> tuple[EMAHandler | None, torch.nn.Module]:
    """The teacher of Eq. 2, frozen: ``None`` -> a new ``EMAHandler`` of ``network`` (momentum ``1 - alpha``)
    attached to ``engine``; an ``EMAHandler`` -> attached; a module -> used as it is (the caller updates it).
    ``alpha`` is :func:`cpcl_bundle.losses.ema_decay_at` of the iteration (``ema_warmup``: the code bases'
    warm-up), set before each update from the engine's iteration, so a resumed run continues it exactly."""
    ema = None
    if teacher is None or isinstance(teacher, EMAHandler):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        ema = teacher if teacher is not None else EMAHandler(network, momentum=1.0 - ema_decay)

        def momentum(engine: Engine) -> None:
            engine.state.ema_momentum = 1.0 - ema_decay_at(engine.state.iteration, ema_decay, ema_warmup)

        engine.add_event_handler(Events.ITERATION_COMPLETED, momentum)  # before the update below
        ema.attach(engine, name="ema_momentum")
        teacher = ema.ema_model
    for p in teacher.parameters():
        p.requires_grad_(False)
    return ema, teacher


#: SupervisedTrainer's signature (MONAI's, whatever its version): CPCLTrainer takes these arguments, in this order.
_SUPERVISED = inspect.signature(SupervisedTrainer)


class CPCLTrainer(SupervisedTrainer):
    """Semi-supervised trainer for CPCL and the methods it is compared with (Xu et al., JBHI 2022).

    The constructor takes every argument of MONAI's SupervisedTrainer, in its order (positionally or by name, so
    bundle configs and MONAI Label drive it the same way: ``max_epochs``, ``train_data_loader``,
    ``train_handlers``, ``device`` as a string or ``torch.device``); they are bound against SupervisedTrainer's
    own signature and passed on, so its defaults and any argument a newer MONAI adds apply here unchanged
    (``inspect.signature(CPCLTrainer)`` lists them). Two it cannot honour are refused with a ``ValueError``:
    ``compile=True`` (the terms and the dropout reach the network's layers by name, through hooks, and the
    teacher is a copy of the network: ``torch.compile``'s wrapper would rename and copy them) and
    ``accumulation_steps > 1`` (the teacher's EMA update, the ramp-up, the terms' state and the non-finite guard
    act once per iteration, not once per optimizer step). Then, by name only:

    Args:
        unlabeled_data_loader: loader of unlabeled images (``{"image": ...}`` batches), cycled independently of
            the labeled loader, which defines the epochs. Required when a term of the method reads it.
        method: a name of :data:`cpcl_bundle.methods.METHODS` or a :class:`~cpcl_bundle.methods.Method`.
        teacher: see :func:`attach_teacher` (default: the EMA of ``network``; an ``EMAHandler`` passed here is
            attached here, do not also list it in ``train_handlers``).
        ema_decay: alpha of Eq. 2 (0.99).
        ema_warmup: alpha_t = min(1 - 1/(t + 1), ema_decay), the mean-teacher code bases' warm-up
            (:func:`cpcl_bundle.losses.ema_decay_at`); off: the paper's constant alpha.
        dropout: the references' backbone dropout with this probability (0: none), on ``dropout_layers`` (the
            bottleneck and the last decoder stage), of ``dropout_kind`` (``"channel"``: the V-Net's Dropout3d;
            ``"element"``: SSL4MIS's Dropout), through hooks (:func:`cpcl_bundle.networks.add_dropout`): the
            student's in training mode, the teacher's on every pass (the references run their EMA teacher in
            training mode); UA-MT's own stochastic passes then add none (``uamt_dropout`` 0).
        w_max: maximum of ``lambda(t)`` (0.1).
        rampup: ``"gaussian"`` (Eq. 11), ``"sigmoid"`` (MT code bases) or ``"constant"``.
        rampup_length: ``t_max`` in steps (in units of ``rampup_step_size``); default the whole run.
        rampup_step_size: evaluate the ramp-up on ``t // rampup_step_size`` (UA-MT uses 150).
        stability: add the mean-teacher consistency term ``mt`` to the method: Table II's MT-F-PCL, MT-B-PCL and
            MT-C-PCL (``mt_cpcl`` is CPCL with it). The released code's own "stability" loss (raw-logit MSE
            over all four images) is the term ``stability_released`` of the method ``cpcl_released``.
        max_iterations: stop after this many iterations even if ``max_epochs`` allows more (the run is
            ``min(max_iterations, max_epochs * epoch_length)`` steps; ramp-up and LR follow that length).
        max_nonfinite_steps: see :class:`~cpcl_bundle.guard.NonFiniteGuard`.
        term_options: the terms' knobs (``beta``, ``prototype_scale``, ``prototype_grad``, ``feature_layer``,
            ``noise_std``, ...; :func:`cpcl_bundle.terms.term_options` lists them), each given to the terms of
            the method that take it; a method's own settings win (``cpcl_released`` stays the released code).
            SupervisedTrainer's arguments given by name are taken out first.

    SupervisedTrainer's ``amp`` means mixed precision here (:mod:`cpcl_bundle.precision`): the networks' forward
    passes under autocast in bf16 on a GPU or CPU that has it (fp16 with a ``GradScaler`` on an older GPU; fp32 on
    a CPU without bf16), the prototypes and every loss in fp32. ``amp_kwargs["dtype"]`` picks the dtype instead.
    """

    def __init__(
        self,
        *args: Any,
        unlabeled_data_loader: Iterable | None = None,
        method: str | Method = "cpcl",
        teacher: torch.nn.Module | EMAHandler | None = None,
        ema_decay: float = 0.99,
        ema_warmup: bool = False,
        dropout: float = 0.0,
        dropout_layers: Sequence[str] = REFERENCE_DROPOUT_LAYERS,
        dropout_kind: str = "channel",
        w_max: float = PAPER_W_MAX,
        rampup: str = "gaussian",
        rampup_length: int | None = None,
        rampup_step_size: int = 1,
        stability: bool = False,
        max_iterations: int | None = None,
        max_nonfinite_steps: int = 5,
        **term_options: Any,
    ) -> None:
        supervised = {name: term_options.pop(name) for name in _SUPERVISED.parameters if name in term_options}
        bound = _SUPERVISED.bind(*args, **supervised)  # missing or surplus arguments fail here, as in SupervisedTrainer
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        if arguments.get("compile"):
            raise ValueError(
                "CPCLTrainer does not support compile=True: the method's terms and the dropout reach the network's "
                "layers by name through hooks and the teacher is a copy of the network; torch.compile's wrapper "
                "renames the layers ('_orig_mod.') and would be copied: leave compile off"
            )
        if int(arguments.get("accumulation_steps", 1)) > 1:
            raise ValueError(
                f"CPCLTrainer does not support accumulation_steps={arguments['accumulation_steps']}: the teacher's "
                "EMA update, the ramp-up, the terms' state and the non-finite guard act at every iteration, not at "
                "every optimizer step; use a larger batch (or accumulation_steps=1)"
            )
        train_handlers = arguments.pop("train_handlers")
        # handlers are registered below, after the EMA update, so they see this step's teacher
        super().__init__(**arguments, train_handlers=None)
        network, amp, amp_kwargs = self.network, arguments["amp"], arguments["amp_kwargs"]
        self.amp_dtype = amp_dtype(self.state.device, amp, amp_kwargs)
        self.scaler = grad_scaler(self.state.device, self.amp_dtype)
        self.logger.info(f"precision of the forward passes: {describe(self.amp_dtype)}")
        self.method = get_method(method, stability=stability)
        schedule = {"rampup": rampup, "rampup_length": rampup_length, "rampup_step_size": rampup_step_size}
        schedule.update({k: v for k, v in self.method.options.items() if k in TRAINER_OPTIONS})
        self.w_max, self.rampup, self.rampup_length = float(w_max), schedule["rampup"], schedule["rampup_length"]
        self.rampup_step_size = int(schedule["rampup_step_size"])
        consistency_weight(0, 1, 1.0, self.rampup)  # fail now on an unknown ramp-up name
        if float(dropout) > 0:  # the teacher's dropout already makes UA-MT's passes stochastic
            term_options.setdefault("uamt_dropout", 0.0)
        self.terms = self.method.build(**term_options)
        noises = {t.teacher_noise for t in self.terms if "teacher_noise" in t.needs}
        if len(noises) > 1:
            raise ValueError(f"method {self.method.name!r}: its terms want different teacher noises {noises}")
        self.teacher_noise = noises.pop() if noises else None
        self.layers = tuple(dict.fromkeys(layer for t in self.terms for layer in t.layers))
        for layer in self.layers:
            FeatureTap(network, layer)  # fail now on an unknown layer name
        self.guard = NonFiniteGuard(max_nonfinite_steps, self.logger)
        self.max_iterations = None if max_iterations is None else int(max_iterations)
        if self.max_iterations is not None:
            StopAtIteration(self.max_iterations).attach(self)
        self.ema, self.teacher = (
            attach_teacher(self, network, teacher, ema_decay, ema_warmup) if self.method.needs_teacher else (None, None)
        )
        if float(dropout) > 0:  # after the teacher's copy of the student, before the terms' copies (DTML's network)
            add_dropout(network, dropout, dropout_layers, dropout_kind)
            if self.teacher is not None:
                add_dropout(self.teacher, dropout, dropout_layers, dropout_kind, always=True)
        self.unlabeled_stream: CyclingLoader | None = None
        if self.method.needs_unlabeled:
            if unlabeled_data_loader is None:
                raise ValueError(f"method {self.method.name!r} needs unlabeled data: pass unlabeled_data_loader")
            self.unlabeled_stream = CyclingLoader(unlabeled_data_loader)
        for term in self.terms:
            term.attach(self)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    @property
    def total_iterations(self) -> int:
        """Length of the run in steps: ``max_epochs * epoch_length``, capped by ``max_iterations``."""
        total = (self.state.max_epochs or 1) * (self.state.epoch_length or 1)
        return total if self.max_iterations is None else min(total, self.max_iterations)

    def consistency_weight(self, iteration: int) -> float:
        """``lambda(t)`` at 1-based ``iteration`` (``t = iteration - 1``), ``t_max`` = the whole run by default."""
        length = self.rampup_length
        if length is None:
            length = self.total_iterations / self.rampup_step_size
        return consistency_weight(iteration - 1, length, self.w_max, self.rampup, self.rampup_step_size)

    def _prepare(self, batchdata: Any) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        return (batch[0], batch[1], (), {}) if len(batch) == 2 else (batch[0], batch[1], batch[2], batch[3])

    def run(self) -> None:
        """Run the training (Ignite's ``Engine.run`` through MONAI's ``Workflow``), keeping the scaler of
        :attr:`amp_dtype` (MONAI's ``Trainer.run`` would replace it with a CUDA float16 one whenever ``amp`` is on)."""
        Workflow.run(self)

    def run_network(self, network: torch.nn.Module, inputs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``network``'s logits through the inferer, under autocast in :attr:`amp_dtype` (its tapped features too)."""
        with autocast(self.state.device, self.amp_dtype):
            return self.inferer(inputs, network, *args, **kwargs)

    def make_step(self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor | None, *args, **kwargs) -> Step:
        """A :class:`~cpcl_bundle.terms.Step` of this trainer's networks, layers and teacher noise."""
        return Step(
            self.network,
            self.teacher,
            x_l,
            y_l,
            x_u,
            lambda net, x: self.run_network(net, x, *args, **kwargs),
            self.layers,
            self.teacher_noise,
            self.state.iteration,
            self.total_iterations,
        )

    def _iteration(self, engine: CPCLTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """One step: forwards, ``L = L_s + lambda sum_k w_k L_k``, backward, optimizer step.

        Fires ``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` and ``MODEL_COMPLETED`` like
        SupervisedTrainer; ``engine.state.output`` holds IMAGE/LABEL/PRED (labeled half) and LOSS, the scalars
        of :data:`TERM_KEYS` and each term's ``loss_<name>`` and logs. ``engine.state.step`` is the step (for
        handlers at ``MODEL_COMPLETED``, e.g. the Fig. 6 maps); it is released when the iteration ends.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x_l, y_l, args, kwargs = engine._prepare(batchdata)
        if y_l is None:
            raise ValueError("the labeled batch has no 'label': CPCLTrainer's train_data_loader must yield labels")
        unlabeled_batch = next(engine.unlabeled_stream) if engine.method.needs_unlabeled else None
        x_u = engine._prepare(unlabeled_batch)[0] if unlabeled_batch is not None else None
        step = engine.state.step = engine.make_step(x_l, y_l, x_u, *args, **kwargs)
        out = engine.state.output = {
            Keys.IMAGE: x_l,
            Keys.LABEL: y_l,
            "lr": float(engine.optimizer.param_groups[0]["lr"]),
        }

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        # forward passes under autocast (run_network); the losses below in fp32, outside it
        if engine.method.needs_teacher_pass:
            step.teacher()  # first, as the teacher's input noise has always been drawn before the student runs
        for term in engine.terms:
            for name, inputs in term.student_inputs(step).items():
                step.add_student_input(name, inputs)
        out[Keys.PRED] = logits_l = step.student().float()
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss_sup = engine.loss_function(logits_l, y_l).mean()
        lam = engine.consistency_weight(engine.state.iteration) if engine.terms else 0.0
        loss = loss_sup
        out.update(loss_sup=float(loss_sup.detach()), **{"lambda": float(lam)})
        for term in engine.terms:
            value, logs = term.loss(step)
            loss = loss + lam * term.weight * value + term.auxiliary_loss(step)
            out.update({term.key: float(value.detach()), **logs})
        out[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        finite = bool(torch.isfinite(loss.detach()))
        if engine.scaler is not None:  # fp16: scaled backward; GradScaler skips steps with non-finite gradients
            if finite:
                engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if finite:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        else:
            if finite:
                loss.backward()
                params = [p for group in engine.optimizer.param_groups for p in group["params"]]
                finite = engine.guard.gradients_finite(params)
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if finite:
                engine.optimizer.step()
        for term in engine.terms:
            term.after_step(step, finite)
        engine.guard.record(finite, engine.state.iteration, engine.optimizer, batchdata, unlabeled_batch)
        out["skipped_nonfinite"] = engine.guard.total
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        engine.state.step = None
        return engine.state.output  # decollated and post-processed at MODEL_COMPLETED (MONAI Workflow)


def _full_signature() -> inspect.Signature:
    """CPCLTrainer's signature as callers see it: SupervisedTrainer's parameters, then the keyword-only ones."""
    own = inspect.signature(CPCLTrainer.__init__)
    params = list(own.parameters.values())
    keyword_only = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    return own.replace(parameters=[params[0], *_SUPERVISED.parameters.values(), *keyword_only])


CPCLTrainer.__init__.__signature__ = _full_signature()  # type: ignore[attr-defined]
