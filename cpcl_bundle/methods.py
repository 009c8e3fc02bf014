# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Training methods as data: a method is a name, a list of loss terms and the knobs it fixes.

Every method has the supervised term ``L_s``; its unsupervised terms are units of :mod:`cpcl_bundle.terms`
(``"fpc"``, ``"bpc"``, ``"mt"``, and the baselines' terms). The objective is
``L = L_s + lambda(t) * sum_k w_k L_k`` (Eq. 1 and 11) over the method's terms. What a step must compute
(teacher, unlabeled stream, features, the student on unlabeled images) follows from what the terms declare.

Adding a method is one term class (registered in :data:`cpcl_bundle.terms.TERMS`) and one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from cpcl_bundle import baselines as _baselines  # noqa: F401  (registers the baselines' terms)
from cpcl_bundle import terms as _terms

__all__ = ["Method", "METHODS", "TERMS", "TRAINER_OPTIONS", "get_method"]

#: Every registered term class by name (see :mod:`cpcl_bundle.terms`).
TERMS = _terms.TERMS

#: Trainer settings a method may fix besides its terms' knobs.
TRAINER_OPTIONS = frozenset({"rampup", "rampup_length", "rampup_step_size"})


@dataclass(frozen=True)
class Method:
    """A training method: a name, the unsupervised terms it adds to ``L_s`` and the settings it fixes.

    ``options`` are term knobs (see :func:`cpcl_bundle.terms.term_options`) and :data:`TRAINER_OPTIONS` that
    define the method; they take precedence over the trainer's own arguments (``cpcl_released`` is the
    released code whatever ``prototype_grad`` the configuration passes).
    """

    name: str
    terms: frozenset[str] = field(default_factory=frozenset)
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.terms) - set(TERMS)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown terms {sorted(unknown)}; known: {sorted(TERMS)}")
        bad = set(self.options) - _terms.term_options() - TRAINER_OPTIONS
        if bad:
            raise ValueError(f"method {self.name!r}: unknown options {sorted(bad)}")
        object.__setattr__(self, "terms", frozenset(self.terms))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def uses(self, term: str) -> bool:
        return term in self.terms

    def _needs(self, what: str) -> bool:
        return any(what in TERMS[t].needs for t in self.terms)

    @property
    def needs_unlabeled(self) -> bool:
        """A term reads the unlabeled stream."""
        return self._needs("unlabeled")

    @property
    def needs_teacher(self) -> bool:
        """A term takes targets from the EMA teacher (its shared pass, or passes of its own)."""
        return self._needs("teacher") or self._needs("ema")

    @property
    def needs_teacher_pass(self) -> bool:
        """A term reads the teacher's shared pass on the unlabeled images."""
        return self._needs("teacher")

    @property
    def needs_prototypes(self) -> bool:
        """Features are tapped (``F_l`` of the student, ``F_u`` of the teacher)."""
        return self._needs("features")

    @property
    def student_sees_unlabeled(self) -> bool:
        """The student's pass covers the unlabeled images (MT does, CPCL's student sees only the labeled
        half, which is where its step is cheaper than MT's)."""
        return self._needs("student_unlabeled")

    @property
    def teacher_noise(self) -> bool:
        """The teacher's unlabeled input is perturbed (mean-teacher convention)."""
        return self._needs("teacher_noise")

    def build(self, **options: Any) -> list[_terms.Term]:
        """The method's term objects, given the trainer's knobs (the method's own ``options`` win)."""
        merged = {**options, **{k: v for k, v in self.options.items() if k not in TRAINER_OPTIONS}}
        return _terms.build_terms(self.terms, merged)

    def with_stability(self) -> Method:
        """The same method plus the mean-teacher consistency term ``mt`` (softmax MSE on the unlabeled images, the
        teacher on noisy input): Table II's MT-F-PCL, MT-B-PCL and MT-C-PCL. Not the released code's "stability"
        loss, which is the term ``stability_released`` (raw-logit MSE over all four images) of ``cpcl_released``."""
        if self.uses("mt"):
            return self
        return replace(self, name=f"{self.name}+stability", terms=self.terms | {"mt"})


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("supervised", frozenset(), "L_s on the labeled images only"),
        Method("mt", frozenset({"mt"}), "mean teacher: L_s + lambda MSE(student, teacher on noisy input)"),
        Method("fpcl", frozenset({"fpc"}), "F-PCL: L_s + lambda L_fpc (Table II)"),
        Method("bpcl", frozenset({"bpc"}), "B-PCL: L_s + lambda beta L_bpc (Table II)"),
        Method("cpcl", frozenset({"fpc", "bpc"}), "CPCL: L_s + lambda (L_fpc + beta L_bpc) (Eq. 11)"),
        Method("mt_fpcl", frozenset({"mt", "fpc"}), "MT-F-PCL (Table II)"),
        Method("mt_bpcl", frozenset({"mt", "bpc"}), "MT-B-PCL (Table II)"),
        Method("mt_cpcl", frozenset({"mt", "fpc", "bpc"}), "MT-C-PCL (Table II)"),
        Method("uamt", frozenset({"uamt"}), "UA-MT: mean teacher on the voxels the teacher is certain of (Table I)"),
        Method("entropy_min", frozenset({"entropy_min"}), "Entropy minimisation of the student's softmax (Table I)"),
        Method("ict", frozenset({"ict"}), "ICT: interpolation consistency on mixed unlabeled images (Table I)"),
        Method("dan", frozenset({"dan"}), "DAN: adversarial term from an (image, softmax) discriminator (Table I)"),
        Method("dtml", frozenset({"dtml"}), "DTML: mutual consistency with a signed-distance network (Table I)"),
        Method(
            "cpcl_released",
            frozenset({"fpc", "bpc", "stability_released"}),
            "the authors' released code: detached decoder features, confidence-weighted per-image prototypes, "
            "raw-logit stability term, sigmoid ramp-up on iteration // 150 over 40",
            {
                "prototype_grad": False,
                "confidence_weighting": True,
                "per_image_prototypes": True,
                "feature_layer": "decoder_half",
                "rampup": "sigmoid",
                "rampup_length": 40,
                "rampup_step_size": 150,
            },
        ),
        Method(
            "cpcl_detached",
            frozenset({"fpc", "bpc"}),
            "CPCL with the released code's gradient flow alone: no gradient through features or prototypes",
            {"prototype_grad": False},
        ),
        Method(
            "cpcl_decoder",
            frozenset({"fpc", "bpc"}),
            "CPCL with F from the decoder at half resolution (32 channels) instead of the encoder's last stage",
            {"feature_layer": "decoder_half"},
        ),
    )
}


def get_method(method: str | Method, stability: bool = False) -> Method:
    """A method by name (see :data:`METHODS`), optionally with the mean-teacher term (:meth:`Method.with_stability`)."""
    if isinstance(method, Method):
        resolved = method
    else:
        key = str(method).lower().replace("-", "_")
        if key not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        resolved = METHODS[key]
    return resolved.with_stability() if stability else resolved
