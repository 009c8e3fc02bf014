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
"""Training methods as data: which loss terms a method uses, and from that what each step must compute.

The trainer has one ``_iteration``; a method only switches terms on. Every method has the supervised term
``L_s``; the unsupervised terms are

* ``"fpc"``: L2U forward prototype consistency, ``L_fpc`` (Eq. 6);
* ``"bpc"``: U2L backward prototype consistency, ``beta * L_bpc`` (Eq. 10);
* ``"mt"``: mean-teacher consistency on noisy teacher input (the MT baseline, the MT-*-PCL rows of
  Table II, and the released code's "stability" loss).

Objective (Eq. 1 and 11): ``L = L_s + lambda(t) * (L_fpc + beta L_bpc + L_mt)`` over the terms present.
New baselines (UA-MT, entropy minimisation, ICT, ...) add a term name here and its function in losses.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["Method", "METHODS", "TERMS", "get_method"]

TERMS = ("fpc", "bpc", "mt")


@dataclass(frozen=True)
class Method:
    """A training method: a name and the unsupervised loss terms it adds to ``L_s``."""

    name: str
    terms: frozenset[str] = field(default_factory=frozenset)
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.terms) - set(TERMS)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown terms {sorted(unknown)}; known: {list(TERMS)}")
        object.__setattr__(self, "terms", frozenset(self.terms))

    def uses(self, term: str) -> bool:
        return term in self.terms

    @property
    def needs_unlabeled(self) -> bool:
        """Any unsupervised term: the unlabeled stream is read."""
        return bool(self.terms)

    @property
    def needs_teacher(self) -> bool:
        """Every unsupervised term here takes its targets from the EMA teacher on the unlabeled images."""
        return bool(self.terms)

    @property
    def needs_prototypes(self) -> bool:
        """Features ``F_l`` (student, labeled) and ``F_u`` (teacher, unlabeled) are tapped."""
        return "fpc" in self.terms or "bpc" in self.terms

    @property
    def student_sees_unlabeled(self) -> bool:
        """Only the MT term needs the student's prediction on unlabeled images; CPCL's student sees only
        the labeled half, which is where its step is cheaper than MT's."""
        return "mt" in self.terms

    @property
    def teacher_noise(self) -> bool:
        """The teacher's unlabeled input is perturbed (mean-teacher convention) when the MT term is on."""
        return "mt" in self.terms

    def with_stability(self) -> Method:
        """The same method plus the released code's noise-perturbation mean-teacher ("stability") term."""
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
    )
}


def get_method(method: str | Method, stability: bool = False) -> Method:
    """A method by name (see :data:`METHODS`), optionally with the released code's stability term."""
    if isinstance(method, Method):
        resolved = method
    else:
        key = str(method).lower().replace("-", "_")
        if key not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        resolved = METHODS[key]
    return resolved.with_stability() if stability else resolved
