# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Loss terms as units, and the step that computes what they need once.

A training method is ``L = L_s + lambda(t) * sum_k w_k L_k`` (Eq. 1 and 11) over its unsupervised terms. Each
term is a small class that declares what it reads from a step (:data:`NEEDS`), holds its own knobs and its
weight ``w_k``, and returns its loss and the scalars it logs. :class:`Step` runs each forward pass at most
once, when a term first asks for it, and shares it:

* the student runs once on the labeled images concatenated with every extra input a term registered
  (:meth:`Term.student_inputs`: the unlabeled images for MT, the mixed ones for ICT), so its logits and tapped
  features are split per input name;
* the teacher (the EMA of the student, Eq. 2) runs once on the unlabeled images, with the clipped Gaussian
  input noise of the mean-teacher convention when a term of the method asks for it, without gradient.

Adding a method is one :class:`Term` subclass here (or anywhere, registered with :func:`register_term`) and
one entry in :data:`cpcl_bundle.methods.METHODS`; the trainer does not change (docs/README.md, "Adding a
method", walks through UA-MT).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from cpcl_bundle.losses import (
    PAPER_BETA,
    PAPER_PROTOTYPE_SCALE,
    backward_prototype_loss,
    covers,
    forward_prototype_loss,
    softmax_mse_consistency,
)
from cpcl_bundle.networks import FeatureTap

logger = logging.getLogger(__name__)

__all__ = [
    "NEEDS",
    "add_noise",
    "Step",
    "Term",
    "PrototypeTerm",
    "TERMS",
    "register_term",
    "build_terms",
    "term_options",
    "ForwardPrototypeTerm",
    "BackwardPrototypeTerm",
    "MeanTeacherTerm",
]

#: What a term can ask of a step: the unlabeled stream, an EMA teacher network (``ema``: for passes of the
#: term's own), the teacher's shared pass on the unlabeled images (``teacher``; ``teacher_noise``: on noisy input),
#: the student's pass on them, and tapped features (of the layers in :attr:`Term.layers`).
NEEDS = frozenset({"unlabeled", "ema", "teacher", "teacher_noise", "student_unlabeled", "features"})


def add_noise(x: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """The mean-teacher input perturbation: ``x + clamp(N(0, std^2), -clip, clip)``."""
    return x + (torch.randn_like(x) * std).clamp(-clip, clip)


class Step:
    """One iteration's inputs and forward passes, each computed at most once and shared by all terms.

    Args:
        student, teacher: the networks (``teacher`` may be ``None`` when no term needs it).
        x_l, y_l: labeled images and class-index labels; ``x_u``: unlabeled images or ``None``.
        forward: ``forward(net, inputs)`` -> logits (the trainer's inferer with its extra arguments).
        layers: layer names (or :data:`cpcl_bundle.networks.FEATURE_LAYERS` aliases) to tap on every pass.
        noise: ``(std, clip)`` of the teacher's input noise, or ``None`` for a clean teacher input.
        iteration, total_iterations: 1-based step index and run length (for schedules inside terms).
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        x_l: torch.Tensor,
        y_l: torch.Tensor,
        x_u: torch.Tensor | None,
        forward: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
        layers: Iterable[str] = (),
        noise: tuple[float, float] | None = None,
        iteration: int = 1,
        total_iterations: int = 1,
    ) -> None:
        self.student_net, self.teacher_net = student, teacher
        self.x_l, self.y_l, self.x_u = x_l, y_l, x_u
        self.forward, self.layers, self.noise = forward, tuple(dict.fromkeys(layers)), noise
        self.iteration, self.total_iterations = int(iteration), int(total_iterations)
        self._inputs: dict[str, torch.Tensor] = {"labeled": x_l}
        self._student: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
        self._teacher: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def add_student_input(self, name: str, inputs: torch.Tensor) -> None:
        """Have the student's (single) forward pass also cover ``inputs``, readable as ``student(name)``."""
        if self._student is not None:
            raise RuntimeError(f"student input {name!r} added after the student's forward pass")
        if name in self._inputs and self._inputs[name] is not inputs:
            raise ValueError(f"student input {name!r} registered twice with different tensors")
        self._inputs[name] = inputs

    def _run(self, net: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with contextlib.ExitStack() as stack:
            taps = {layer: stack.enter_context(FeatureTap(net, layer)) for layer in self.layers}
            logits = self.forward(net, inputs)
        return logits, {layer: tap.features for layer, tap in taps.items()}

    def _student_passes(self) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        if self._student is None:
            names = list(self._inputs)
            sizes = [self._inputs[n].shape[0] for n in names]
            batch = torch.cat([self._inputs[n] for n in names], 0) if len(names) > 1 else self.x_l
            logits, feats = self._run(self.student_net, batch)
            parts = zip(logits.split(sizes), *(f.split(sizes) for f in feats.values()))
            self._student = {n: (p[0], dict(zip(feats, p[1:]))) for n, p in zip(names, parts)}
        return self._student

    def student(self, name: str = "labeled") -> torch.Tensor:
        """The student's logits on the labeled images or on a registered input."""
        return self._student_passes()[name][0]

    def student_features(self, layer: str, name: str = "labeled") -> torch.Tensor:
        """The student's features of ``layer`` on the labeled images or on a registered input."""
        return self._student_passes()[name][1][layer]

    def teacher_input(self) -> torch.Tensor:
        """The unlabeled images as the teacher sees them: ``x_u + clamp(N(0, std^2), -clip, clip)`` or clean."""
        if self.x_u is None:
            raise RuntimeError("this step has no unlabeled images")
        if self.noise is None or self.noise[0] <= 0:
            return self.x_u
        return add_noise(self.x_u, *self.noise)

    def _teacher_pass(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._teacher is None:
            if self.teacher_net is None:
                raise RuntimeError("a term needs the teacher but the method declares none")
            with torch.no_grad():
                self._teacher = self._run(self.teacher_net, self.teacher_input())
        return self._teacher

    def teacher(self) -> torch.Tensor:
        """The teacher's logits on the unlabeled images (no gradient)."""
        return self._teacher_pass()[0]

    def teacher_probs(self) -> torch.Tensor:
        """``P_u``: the teacher's softmax on the unlabeled images, in float32."""
        return torch.softmax(self.teacher().float(), 1)

    def teacher_features(self, layer: str) -> torch.Tensor:
        return self._teacher_pass()[1][layer]


class Term:
    """One unsupervised loss term ``w * L`` of a method. Subclasses set :attr:`name` and :attr:`needs`, take their
    knobs as keyword arguments of ``__init__`` (the same knob name means the same thing in every term), and
    implement :meth:`loss`. ``attach``, ``after_step``, ``state_dict`` and ``load_state_dict`` are for terms with
    modules or optimisers of their own (DAN's discriminator); the trainer calls them, resume saves them."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    layers: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = float(weight)

    @property
    def key(self) -> str:
        """The logged name of the term's loss."""
        return f"loss_{self.name}"

    @property
    def teacher_noise(self) -> tuple[float, float] | None:
        """``(std, clip)`` of the teacher input noise this term wants, if it declares ``teacher_noise``."""
        return None

    def student_inputs(self, step: Step) -> Mapping[str, torch.Tensor]:
        """Extra inputs for the student's forward pass (before it runs)."""
        return {"unlabeled": step.x_u} if "student_unlabeled" in self.needs else {}

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        """``(L_k, scalars to log)``; the trainer multiplies ``L_k`` by ``lambda(t) * weight``."""
        raise NotImplementedError

    def auxiliary_loss(self, step: Step) -> torch.Tensor | float:
        """A loss added to ``L`` as it is, without ``lambda(t)`` (DTML: its second network's supervised loss)."""
        return 0.0

    def attach(self, trainer: Any) -> None:
        """Called once by the trainer (device, optimiser of the term's own modules)."""

    def after_step(self, step: Step, finite: bool) -> None:
        """Called after the student's optimiser step; ``finite``: the step was applied (a term's own optimiser
        steps here, and drops its gradients when the step was skipped)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    @property
    def has_state(self) -> bool:
        return type(self).state_dict is not Term.state_dict


#: Every term class by name.
TERMS: dict[str, type[Term]] = {}


def register_term(cls: type[Term]) -> type[Term]:
    """Class decorator: make a term available to methods by its ``name``."""
    if not cls.name or cls.name in TERMS and TERMS[cls.name] is not cls:
        raise ValueError(f"term name {cls.name!r} is empty or taken")
    unknown = set(cls.needs) - NEEDS
    if unknown:
        raise ValueError(f"term {cls.name!r} needs unknown things {sorted(unknown)}; known: {sorted(NEEDS)}")
    TERMS[cls.name] = cls
    return cls


def _knobs(cls: type[Term]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "weight"}


def term_options() -> set[str]:
    """Every knob some registered term takes (the trainer passes these through to the terms). A term's
    ``weight`` is not a knob: a method sets it (``beta`` is the U2L term's)."""
    return {p for cls in TERMS.values() for p in _knobs(cls)}


def build_terms(names: Iterable[str], options: Mapping[str, Any]) -> list[Term]:
    """The term objects of ``names``, each given the options its constructor takes. An option no registered
    term takes is an error (a typo would otherwise be ignored silently)."""
    unknown = set(options) - term_options()
    if unknown:
        raise ValueError(f"unknown term option(s) {sorted(unknown)}; known: {sorted(term_options())}")
    terms = []
    for name in sorted(names, key=list(TERMS).index):
        accepted = _knobs(TERMS[name])
        terms.append(TERMS[name](**{k: v for k, v in options.items() if k in accepted}))
    return terms


# ---------------------------------------------------------------------------------------------- CPCL's terms
class PrototypeTerm(Term):
    """Common knobs of the two prototype terms (Eq. 3-10)."""

    needs = frozenset({"unlabeled", "teacher", "features"})

    def __init__(
        self,
        weight: float = 1.0,
        prototype_scale: float = PAPER_PROTOTYPE_SCALE,
        prototype_grad: bool = True,
        confidence_weighting: bool = False,
        per_image_prototypes: bool = False,
        feature_layer: str = "encoder",
    ) -> None:
        super().__init__(weight)
        self.scale, self.grad = float(prototype_scale), bool(prototype_grad)
        self.confidence_weighting, self.per_image = bool(confidence_weighting), bool(per_image_prototypes)
        self.layers = (feature_layer,)
        self.skipped = 0
        self.skipped_classes: torch.Tensor | None = None  # [K] steps without a prototype, per class

    def _inputs(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats_l = step.student_features(self.layers[0]).float()
        return (
            (feats_l if self.grad else feats_l.detach()),
            step.teacher_features(self.layers[0]).float(),
            step.teacher_probs(),
        )

    def _result(self, loss: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Count, per class, the steps it had no prototype (``skipped_<term>_class<k>``), and the steps the whole
        term was off for want of two classes (``skipped_<term>``)."""
        absent = (~classes).long().cpu()
        if self.skipped_classes is None:
            self.skipped_classes = torch.zeros_like(absent)
        self.skipped_classes += absent
        if not covers(classes):
            self.skipped += 1
            if self.skipped == 1:
                logger.warning(
                    f"L_{self.name} skipped: fewer than two classes have a prototype in this batch (counted in"
                    f" 'skipped_{self.name}')"
                )
        elif bool(absent.any()) and int(self.skipped_classes.sum()) == int(absent.sum()):
            logger.info(
                f"L_{self.name}: classes {absent.nonzero()[:, 0].tolist()} have no prototype in this batch; the term"
                f" covers the others (counted per class in 'skipped_{self.name}_class<k>')"
            )
        logged = {f"skipped_{self.name}": self.skipped}
        logged.update({f"skipped_{self.name}_class{k}": int(n) for k, n in enumerate(self.skipped_classes.tolist())})
        return loss, logged


@register_term
class ForwardPrototypeTerm(PrototypeTerm):
    """L2U: ``L_fpc`` (Eq. 3-6), labeled prototypes segment the teacher's unlabeled features. See
    :func:`cpcl_bundle.losses.forward_prototype_loss`; a step without a prototype for some class skips the term
    (counted in ``skipped_fpc``)."""

    name = "fpc"

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        feats_l, feats_u, probs_u = self._inputs(step)
        weights = torch.softmax(step.student().detach().float(), 1) if self.confidence_weighting else None
        return self._result(
            *forward_prototype_loss(feats_l, step.y_l, feats_u, probs_u, self.scale, weights, self.per_image)
        )


@register_term
class BackwardPrototypeTerm(PrototypeTerm):
    """U2L: ``beta * L_bpc`` (Eq. 7-10), prototypes of the teacher's pseudo label segment the labeled features,
    supervised by the real labels. Its weight is ``beta`` (Eq. 11; 10 in the paper)."""

    name = "bpc"

    def __init__(
        self,
        beta: float = PAPER_BETA,
        prototype_scale: float = PAPER_PROTOTYPE_SCALE,
        prototype_grad: bool = True,
        confidence_weighting: bool = False,
        per_image_prototypes: bool = False,
        feature_layer: str = "encoder",
    ) -> None:
        super().__init__(
            beta, prototype_scale, prototype_grad, confidence_weighting, per_image_prototypes, feature_layer
        )

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        feats_l, feats_u, probs_u = self._inputs(step)
        weights = probs_u if self.confidence_weighting else None
        return self._result(
            *backward_prototype_loss(feats_l, step.y_l, feats_u, probs_u, self.scale, weights, self.per_image)
        )


@register_term
class MeanTeacherTerm(Term):
    """Mean teacher (Tarvainen & Valpola 2017): MSE between the student's and the teacher's softmax on the
    unlabeled images, the teacher seeing them with clipped Gaussian noise (``noise_std`` 0.1, ``noise_clip``
    0.2, as UA-MT's and SSL4MIS's code). The MT baseline, the MT-*-PCL rows of Table II."""

    name = "mt"
    needs = frozenset({"unlabeled", "teacher", "teacher_noise", "student_unlabeled"})

    def __init__(self, weight: float = 1.0, noise_std: float = 0.1, noise_clip: float = 0.2) -> None:
        super().__init__(weight)
        self.noise = (float(noise_std), float(noise_clip))

    @property
    def teacher_noise(self) -> tuple[float, float] | None:
        return self.noise

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        return softmax_mse_consistency(step.student("unlabeled").float(), step.teacher_probs()), {}
