# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The packages' import graphs: no module imports one that imports it back (at module level or inside a function),
the errors module is a leaf, the runtime (``cpcl_bundle``) never imports a tool (``cpcl_tools``), and the package's
lazy attribute list names every module."""

import ast
from pathlib import Path

import cpcl_bundle
import cpcl_tools

PACKAGE = Path(cpcl_bundle.__file__).resolve().parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
TOOLS = Path(cpcl_tools.__file__).resolve().parent


def top_level_imports(path: Path) -> set[str]:
    """The top-level names of every absolute import in ``path`` (``import a.b`` and ``from a.b import c``: ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
    return found


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source (``from .x``, ``from cpcl_bundle.x``,
    ``from cpcl_bundle import x``, ``import cpcl_bundle.x``)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else names)
            elif node.module == "cpcl_bundle":
                found.update(names)
            elif node.module and node.module.startswith("cpcl_bundle."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cpcl_bundle."))
    return {m for m in found if m in MODULES and m != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_package():
    graph = {m: imports_of(m) for m in MODULES}
    assert graph["validation"] >= {"errors"} and graph["trainer"] >= {"terms", "methods"}  # the parser sees imports
    assert find_cycle(graph) is None


def test_errors_is_a_leaf_and_every_input_error_is_one_class():
    from cpcl_bundle import data, dicom, errors, validation

    assert imports_of("errors") == set()
    assert data.InputError is dicom.InputError is validation.InputError is errors.InputError
    assert issubclass(errors.MissingInputError, FileNotFoundError)


def test_the_lazy_attribute_list_names_every_module():
    assert sorted(set(cpcl_bundle.__all__) - {"BUNDLE_NAME", "__version__"}) == MODULES


def test_the_runtime_never_imports_a_tool():
    assert top_level_imports(TOOLS / "benchmark.py") >= {"cpcl_bundle"}  # the parser sees the tools' imports
    offenders = [p.name for p in sorted(PACKAGE.glob("*.py")) if "cpcl_tools" in top_level_imports(p)]
    assert not offenders, f"cpcl_bundle modules that import cpcl_tools: {offenders}"
    tools = {p.stem for p in TOOLS.glob("*.py")} - {"__init__"}
    assert tools == {"benchmark", "metadata", "plan", "plots", "prepare", "train_objects"} and not tools & set(MODULES)
