# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The design notes (docs/design/): every ``.md`` file the code names exists in the repository, the three notes
exist and cover their subject, and the functions they cite exist."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design"
PACKAGES = ("cpcl_bundle", "cpcl_tools")  # the runtime and the tools

#: A ``.md`` name in source text: path characters ending in ``.md`` (not ``hashlib.md5``).
MD_NAME = re.compile(r"(?<![\w./-])([\w./-]+\.md)\b")

#: ``.md`` names in the code that are not files of this repository, and why.
NOT_REPOSITORY_FILES = {"results_table.md": "an output the benchmark writes into its output_dir"}

#: Each note and the terms it must mention.
NOTES = {
    "cpcl-method.md": (
        "L2U",
        "U2L",
        "prototype",
        "EMA",
        "ramp-up",
        "**Decision",
        "released code",
        "Protocol details of the Left Atrium code bases",
        "ema_decay_at",
        "add_dropout",
        "lr_schedule",
        "Precision",
    ),
    "architecture.md": ("layers", "Contracts", "Data contract", "training", "unlabeled", "labeled_ratio", "split"),
    "phantom.md": ("HU", "contrast", "phase", "kidney", "noise", "spacing", "tumour", "cyst"),
}


def _cited_names() -> list[tuple[str, str]]:
    """``(source file, name)`` for every ``.md`` name in the Python sources of ``cpcl_bundle/``, ``cpcl_tools/`` and
    ``scripts/``."""
    found = []
    for folder in PACKAGES + ("scripts",):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in MD_NAME.findall(path.read_text(encoding="utf-8")):
                found.append((str(path.relative_to(ROOT)), name))
    return found


def _exists(name: str) -> bool:
    """``name`` relative to the repository root (and inside it); a bare file name anywhere in the repository, outside
    .git."""
    if "/" in name:
        path = (ROOT / name).resolve()
        return path.is_relative_to(ROOT) and path.is_file()
    return any(".git" not in p.relative_to(ROOT).parts for p in ROOT.rglob(name) if p.is_file())


def test_every_md_file_named_in_the_code_exists():
    cited = _cited_names()
    assert any(name == "docs/design/cpcl-method.md" for _, name in cited)  # the scan sees the citations
    missing = [f"{src}: {name}" for src, name in cited if name not in NOT_REPOSITORY_FILES and not _exists(name)]
    assert not missing, f"files named in the code but not in the repository: {missing}"


@pytest.mark.parametrize("note", sorted(NOTES))
def test_design_note_exists_and_covers_its_subject(note):
    path = DESIGN / note
    assert path.is_file(), f"{path} is missing"
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 2, "a note starts with a one-line title"
    assert f"design note that the code's docstrings cite as `docs/design/{note}`" in text
    absent = [term for term in NOTES[note] if term not in text]
    assert not absent, f"{note} does not mention {absent}"
    long = [i for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, f"{note}: lines over 120 characters: {long}"


def test_architecture_note_lists_every_module():
    text = (DESIGN / "architecture.md").read_text(encoding="utf-8")
    for package in PACKAGES:
        modules = sorted(p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py")
        assert not [m for m in modules if f"`{m}`" not in text], f"modules of {package}/ missing from architecture.md"
    presets = sorted(p.stem for p in (ROOT / "configs" / "presets").glob("*.json"))
    assert not [p for p in presets if f"`{p}`" not in text], "presets missing from architecture.md"


def test_cited_functions_exist():
    """Every ```module.name``` of a cpcl_bundle or cpcl_tools module in the notes resolves (``terms.Step._teacher_pass``
    too)."""
    modules = {p.stem: package for package in PACKAGES for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    missing = []
    for path in sorted(DESIGN.glob("*.md")):
        for module, attr in re.findall(r"`([a-z_]+)\.([A-Za-z_][\w.]*)`", path.read_text(encoding="utf-8")):
            if module not in modules or attr in ("py", "json", "md"):
                continue
            obj = importlib.import_module(f"{modules[module]}.{module}")
            try:
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                missing.append(f"{path.name}: {module}.{attr}")
    assert not missing, f"cited but not in the code: {missing}"
