# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Methods say which terms they use and derive what a step must compute."""

import pytest

from cpcl_bundle.methods import METHODS, Method, get_method


def test_registry_has_the_papers_methods():
    table_ii = {"supervised", "mt", "fpcl", "bpcl", "cpcl", "mt_fpcl", "mt_bpcl", "mt_cpcl"}
    assert table_ii | {"cpcl_detached", "cpcl_decoder"} <= set(METHODS)
    assert METHODS["cpcl"].terms == {"fpc", "bpc"}
    assert METHODS["mt_cpcl"].terms == {"fpc", "bpc", "mt"}


def test_what_each_method_needs():
    sup, mt, cpcl, bpcl = (get_method(n) for n in ("supervised", "mt", "cpcl", "bpcl"))
    assert not sup.needs_teacher and not sup.needs_unlabeled and not sup.needs_prototypes
    assert mt.needs_teacher and mt.student_sees_unlabeled and not mt.needs_prototypes and mt.teacher_noise
    assert cpcl.needs_teacher and cpcl.needs_prototypes and not cpcl.student_sees_unlabeled
    assert not cpcl.teacher_noise and bpcl.needs_prototypes


def test_stability_option_adds_the_mt_term():
    m = get_method("cpcl", stability=True)
    assert m.terms == {"fpc", "bpc", "mt"} and m.student_sees_unlabeled
    assert get_method("MT-CPCL").name == "mt_cpcl"


def test_errors():
    with pytest.raises(ValueError, match="unknown method"):
        get_method("cpcll")
    with pytest.raises(ValueError, match="unknown terms"):
        Method("x", frozenset({"entropyy"}))
    with pytest.raises(ValueError, match="unknown options"):
        Method("x", frozenset({"fpc"}), options={"prototype_grd": False})
