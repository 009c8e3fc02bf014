# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Build the model-zoo release zip of the bundle and print its ``model_info.json`` entry.

    python scripts/package.py
    python scripts/package.py --out_dir /tmp/release --model models/model_best.pt --torchscript

Writes ``<out_dir>/cpcl_kidney_ct_segmentation_v<version>.zip`` (default out_dir: ``<bundle_root>/dist``) with one
top-level folder ``cpcl_kidney_ct_segmentation/``, like the zoo's ``ci/update_model_info.py`` (``touch -t
202205300000`` then ``zip -rq -D -X -9``): no directory entries, every time stamp 2022-05-30 00:00, no extra
fields. In addition the entries are sorted and every file is stored as a regular file with mode 0644, so the same
inputs give the same bytes, hence the same sha1 (with the same zlib).

Contents (a whitelist; nothing else is ever stored): ``LICENSE``, ``README.md``, ``pyproject.toml`` (so that
``pip install -e .`` works in the downloaded bundle), ``configs/`` (``*.json``, ``*.yaml``, ``*.yml``,
``logging.conf``; not MONAI Label's ``monailabel_train.json``), ``docs/`` (every file), ``cpcl_bundle/**.py`` (the
runtime that the configs reference), and ``models/model.pt`` copied from ``--model`` (required: the trained weights,
a plain state dict of ``network_def`` in configs/inference.json; checked by loading it strictly unless
``--check_weights False``).
``--torchscript`` adds ``models/model.ts`` (made by ``ckpt_export``). Never stored: outputs and caches (``eval/``,
``data/``, ``runs/``, ``dist/``, ``__pycache__``, ``*.pyc``), ``.git``, virtual environments, ``tests/``, the tools
(``scripts/``, ``cpcl_tools/``: data preparation, benchmark, plots, packaging; they stay in the source repository),
``models/model_best.pt`` (pass ``--model models/model_best.pt`` to release the best-validation weights as
``models/model.pt``), ``large_files.yml`` (the zoo removes it from releases), and the root ``metadata.json`` symlink
(the zoo has only ``configs/metadata.json``; zipfile extraction would turn a stored link into a text file).

Checks first: ``configs/metadata.json`` ``version`` equals ``cpcl_bundle.__version__`` and is a key of its
``changelog``; the bundle name (``cpcl_bundle.BUNDLE_NAME``) has no ``_v`` (the zoo splits asset names on
``_v\\d*.``). Both are read from the bundle's own files, not from the installed package.

``--large_files_url <url>`` also writes ``<bundle_root>/large_files.yml`` for the source tree that goes into the
zoo's ``models/`` folder (without the weights): one entry for ``models/model.pt`` (and ``models/model.ts`` when
shipped) with ``path``, the ``url`` given (``{name}``, ``{version}`` and ``{file}`` filled in), its ``hash_val`` (md5,
computed here) and ``hash_type``, as the zoo's CI and ``python -m monai.bundle download_large_files`` read it.
``--classes "['background','kidney','tumour']"`` releases a model trained with other classes than
configs/inference.json's (a preset's): the zip's ``configs/inference.json`` and ``configs/train.json`` carry them as
``classes`` and its ``configs/metadata.json`` describes them (``num_channels``, ``channel_def``, which MONAI Label
reads for its label names, ``label_classes``, ``pred_classes``); the source tree is not changed. Without it,
``configs/metadata.json`` must already describe configs/inference.json's ``classes`` (checked).
``--eval_summary <metrics_summary.json>`` records what ``configs/evaluate.json`` measured for these weights as
``eval_metrics`` of ``configs/metadata.json`` (source tree and zip) before the zip is written.

stdout: the entry, e.g. ``{"cpcl_kidney_ct_segmentation_v0.1.0": {"checksum": "<sha1 of the zip>", "source":
"<url>"}}``; ``--source_url`` (default: the zoo's NGC monaihosting URL) may use ``{name}``, ``{version}`` and
``{zip_name}``. stderr: the stored files, their sizes, the zip's size, sha1, and the md5 of models/model.pt (what a
``large_files.yml`` entry needs).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import fire

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ZIP_DATE_TIME = (2022, 5, 30, 0, 0, 0)  # the zoo's `touch -t 202205300000`
ZIP_FILE_MODE = 0o100644  # regular file, rw-r--r--
ZIP_COMPRESSLEVEL = 9  # the zoo's `zip -9`
DEFAULT_SOURCE_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/monaihosting/{name}/versions/{version}/files/{zip_name}"
)
TRAIN_COMMAND = "python -m monai.bundle run training --config_file configs/train.json"
EXPORT_COMMAND = (
    "python -m monai.bundle ckpt_export --net_id network_def --filepath models/model.ts --ckpt_file models/model.pt"
    " --meta_file configs/metadata.json --config_file configs/inference.json"
)
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
CONFIG_NAMES = ("logging.conf",)
NOT_SHIPPED_CONFIGS = ("monailabel_train.json",)  # written by MONAI Label's multi-GPU training
SKIPPED_PARTS = ("__pycache__",)  # plus every name starting with "." (.git, .venv*, .ipynb_checkpoints, ...)
ROOT_FILES = ("LICENSE", "README.md", "pyproject.toml")
RUNTIME_PACKAGE = "cpcl_bundle"  # the only code a release stores; cpcl_tools/ and scripts/ are tools
REQUIRED = ("LICENSE", "configs/metadata.json", "configs/inference.json")
LARGE_FILES = "large_files.yml"
EVAL_METRICS = (
    ("dice", "mean_dice"),
    ("jaccard", "mean_jaccard"),
    ("hd95_mm", "mean_hd95_mm"),
    ("asd_mm", "mean_asd_mm"),
)


class PackagingError(Exception):
    """The bundle cannot be released as it is; the message says why and what to do."""


@dataclass
class Release:
    path: Path
    name: str
    version: str
    sha1: str
    source: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (path inside the bundle folder, size)
    model_md5: str = ""
    large_files: Path | None = None  # <bundle_root>/large_files.yml when --large_files_url was given

    @property
    def key(self) -> str:
        return f"{self.name}_v{self.version}"

    @property
    def entry(self) -> dict:
        """The ``models/model_info.json`` entry of the zoo."""
        return {self.key: {"checksum": self.sha1, "source": self.source}}


def _package_constants(bundle_root: Path) -> dict[str, str]:
    """``__version__`` and ``BUNDLE_NAME`` of the bundle's ``cpcl_bundle/__init__.py``, read without importing it
    (an installed ``cpcl_bundle`` may be another checkout)."""
    init = bundle_root / "cpcl_bundle" / "__init__.py"
    if not init.is_file():
        raise PackagingError(f"{init} not found: is {bundle_root} the bundle root?")
    found = {}
    for node in ast.parse(init.read_text(encoding="utf-8"), str(init)).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in ("__version__", "BUNDLE_NAME"):
                    found[target.id] = node.value.value
    for key in ("__version__", "BUNDLE_NAME"):
        if not isinstance(found.get(key), str):
            raise PackagingError(f"{init} does not assign {key} a string literal")
    return found


def check_bundle(bundle_root: str | os.PathLike) -> tuple[str, str]:
    """Name and version of the bundle, after the release checks; raises :class:`PackagingError`."""
    root = Path(bundle_root)
    for rel in REQUIRED:
        if not (root / rel).is_file():
            raise PackagingError(f"{root / rel} not found: a zoo bundle needs {', '.join(REQUIRED)}")
    constants = _package_constants(root)
    name, version = constants["BUNDLE_NAME"], constants["__version__"]
    meta_file = root / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PackagingError(f"{meta_file} is not valid JSON: {e}") from e
    if meta.get("version") != version:
        raise PackagingError(
            f"version mismatch: {meta_file} says {meta.get('version')!r}, cpcl_bundle.__version__ is {version!r};"
            " bump both together"
        )
    if version not in (meta.get("changelog") or {}):
        raise PackagingError(f"version {version!r} is not a key of the changelog in {meta_file}: add an entry")
    from cpcl_tools.metadata import classes_of, described_classes

    try:
        config_classes, meta_classes = classes_of(root / "configs" / "inference.json"), described_classes(meta)
    except (KeyError, ValueError) as e:
        raise PackagingError(f"cannot compare the classes of configs/inference.json and {meta_file}: {e}") from e
    if config_classes != meta_classes:
        raise PackagingError(
            f"{meta_file} describes the output channels as {meta_classes}, configs/inference.json's classes are"
            f" {config_classes}: make them agree (cpcl_tools.metadata.describe_classes)"
        )
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise PackagingError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    if "_v" in name or not re.fullmatch(r"[a-z0-9_]+", name):
        raise PackagingError(
            f"bundle name {name!r} must be lowercase letters, digits and '_' without '_v' (the zoo splits"
            " '<name>_v<version>' on '_v')"
        )
    return name, version


def _is_skipped(rel: Path) -> bool:
    return any(part in SKIPPED_PARTS or part.startswith(".") for part in rel.parts) or rel.suffix == ".pyc"


def _walk(root: Path, folder: str, keep) -> list[tuple[str, Path]]:
    base = root / folder
    if not base.is_dir():
        return []
    files = []
    for path in base.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not _is_skipped(rel) and keep(path):
            files.append((rel.as_posix(), path))
    return files


def collect_files(
    bundle_root: str | os.PathLike, model: str | os.PathLike, torchscript: str | os.PathLike | None = None
) -> list[tuple[str, Path]]:
    """``(path inside the bundle folder, source file)`` of everything the release stores, sorted."""
    root = Path(bundle_root)
    files = [(rel, root / rel) for rel in ROOT_FILES if (root / rel).is_file()]
    files += _walk(
        root,
        "configs",
        lambda p: (p.suffix in CONFIG_SUFFIXES or p.name in CONFIG_NAMES or "splits" in p.parts)
        and p.name not in NOT_SHIPPED_CONFIGS,
    )
    files += _walk(root, "docs", lambda p: True)
    files += _walk(root, RUNTIME_PACKAGE, lambda p: p.suffix == ".py")
    files.append(("models/model.pt", Path(model)))
    if torchscript is not None:
        files.append(("models/model.ts", Path(torchscript)))
    return sorted(files)


def verify_weights(bundle_root: str | os.PathLike, model: str | os.PathLike, classes: list[str] | None = None) -> None:
    """``model`` is a plain state dict that loads strictly into ``network_def`` of configs/inference.json (with
    ``classes`` when given)."""
    import torch
    from monai.bundle import ConfigParser

    try:
        state = torch.load(model, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise PackagingError(f"{model} is not a readable torch checkpoint: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise PackagingError(
            f"{model} is not a plain state dict (found {keys}); the zoo, configs/inference.json's CheckpointLoader,"
            " MONAI Label and ckpt_export expect the unwrapped network weights, as train.json's CheckpointSaver"
            " writes them"
        )
    root = str(Path(bundle_root).resolve())
    sys.path.insert(0, root)  # configs/inference.json imports cpcl_bundle
    try:
        parser = ConfigParser()
        parser.read_config(os.path.join(root, "configs", "inference.json"))
        if classes is not None:
            parser["classes"] = list(classes)
        net = parser.get_parsed_content("network_def")
    finally:
        sys.path.remove(root)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        hint = "" if classes is not None else " (a model with other classes: pass them with --classes)"
        raise PackagingError(f"{model} does not fit network_def of configs/inference.json{hint}: {e}") from e


def verify_torchscript(path: str | os.PathLike) -> None:
    """``path`` loads with ``torch.jit.load``."""
    import torch

    try:
        torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise PackagingError(f"{path} is not a TorchScript file ({e}); export it: `{EXPORT_COMMAND}`") from e


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_zip(zip_path: str | os.PathLike, top_folder: str, files: list[tuple[str, Path | bytes]]) -> str:
    """Write ``files`` under ``top_folder/`` reproducibly (atomically replacing ``zip_path``); return its sha1."""
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(f".{zip_path.name}.partial")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for rel, src in sorted(files):
                info = zipfile.ZipInfo(f"{top_folder}/{rel}", date_time=ZIP_DATE_TIME)
                info.create_system = 3  # unix, whatever the building OS (the attributes below are unix modes)
                info.external_attr = ZIP_FILE_MODE << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                data = src if isinstance(src, bytes) else src.read_bytes()
                zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=ZIP_COMPRESSLEVEL)
        os.replace(tmp, zip_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    with zipfile.ZipFile(zip_path) as zf:  # read back: every entry under the top folder, CRCs good
        names = zf.namelist()
        bad = [n for n in names if not n.startswith(f"{top_folder}/") or n.endswith("/")]
        if bad or f"{top_folder}/configs/metadata.json" not in names or zf.testzip() is not None:
            zip_path.unlink()
            raise PackagingError(f"{zip_path} failed its read-back check ({bad[:3]}): removed")
    return _file_digest(zip_path, "sha1")


def _with_classes(rel: str, src: Path | bytes, classes: list[str]) -> Path | bytes:
    """The release's bytes of ``rel`` for a model with ``classes`` (:func:`cpcl_tools.metadata.with_classes`:
    metadata.json describes them, inference.json and train.json carry them); every other file as it is."""
    from cpcl_tools.metadata import CLASS_CONFIGS, with_classes

    if rel != "configs/metadata.json" and rel not in CLASS_CONFIGS:
        return src
    content = json.loads(src if isinstance(src, bytes) else src.read_text(encoding="utf-8"))
    try:
        content = with_classes(rel, content, classes)
    except ValueError as e:
        raise PackagingError(f"--classes: {e}") from e
    return (json.dumps(content, indent=4, ensure_ascii=False) + "\n").encode("utf-8")


def write_large_files(bundle_root: str | os.PathLike, files: list[tuple[str, Path]], url: str) -> Path:
    """Write ``<bundle_root>/large_files.yml`` listing ``files`` (``(path in the bundle, local file)``) at ``url``.

    ``url`` may use ``{name}``, ``{version}`` and ``{file}`` (the file's name, e.g. ``model.pt``). The md5 of each
    local file is the ``hash_val`` the download is checked against. The result is read back with MONAI's
    ``ConfigParser`` (the zoo's reader) and compared with what was meant."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root).resolve()
    name, version = check_bundle(root)
    entries = [
        {
            "path": rel,
            "url": url.format(name=name, version=version, file=Path(rel).name),
            "hash_val": _file_digest(src, "md5"),
            "hash_type": "md5",
        }
        for rel, src in files
    ]
    lines = [f"# {name} v{version}: files downloaded into the bundle (scripts/package.py --large_files_url)"]
    lines.append("large_files:")
    for entry in entries:
        items = [f"{key}: {json.dumps(value)}" for key, value in entry.items()]  # a JSON string is a YAML string
        lines += [f"  - {items[0]}"] + [f"    {item}" for item in items[1:]]
    path = root / LARGE_FILES
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parser = ConfigParser()
    parser.read_config(str(path))
    if parser.get()["large_files"] != entries:
        raise PackagingError(f"{path} does not read back as written: {parser.get()['large_files']}")
    return path


def record_eval_metrics(bundle_root: str | os.PathLike, summary_file: str | os.PathLike, model_md5: str) -> dict:
    """Set ``eval_metrics`` of ``configs/metadata.json`` from an evaluation's ``metrics_summary.json``.

    The means of Dice, Jaccard, 95HD and ASD (mm), the number of cases, the distance definition and the md5 of the
    weights they were measured for; the file keeps its layout (4-space JSON, key order)."""
    summary_path = Path(summary_file)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        metrics = {key: round(float(summary[source]["mean"]), 4) for source, key in EVAL_METRICS}
        metrics["num_cases"] = int(summary["num_cases"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PackagingError(
            f"{summary_path} is not an evaluation summary (configs/evaluate.json writes metrics_summary.json): {e}"
        ) from e
    metrics["metric_definition"] = summary.get("metric_definition", "paper")
    metrics["model_md5"] = model_md5
    meta_file = Path(bundle_root) / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    meta["eval_metrics"] = metrics
    meta_file.write_text(json.dumps(meta, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics


def build(
    bundle_root: str | os.PathLike = ROOT,
    out_dir: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    torchscript: bool | str | os.PathLike = False,
    source_url: str = DEFAULT_SOURCE_URL,
    check_weights_: bool = True,
    large_files_url: str | None = None,
    eval_summary: str | os.PathLike | None = None,
    classes: list[str] | None = None,
) -> Release:
    """Check the bundle, write the release zip, return what was written (see the module docstring)."""
    root = Path(bundle_root).resolve()
    name, version = check_bundle(root)
    model_path = Path(model) if model is not None else root / "models" / "model.pt"
    if not model_path.is_file():
        raise PackagingError(
            f"the trained weights {model_path} do not exist; the release must contain models/model.pt. Train first,"
            f" in the bundle root: `{TRAIN_COMMAND}` (writes models/model.pt), or pass --model <state dict>"
        )
    ts_path = None
    if torchscript is True:
        ts_path = root / "models" / "model.ts"
    elif torchscript not in (False, None, ""):
        ts_path = Path(torchscript)
    if ts_path is not None:
        if not ts_path.is_file():
            raise PackagingError(f"{ts_path} does not exist; export it in the bundle root: `{EXPORT_COMMAND}`")
        if ts_path.stat().st_mtime < model_path.stat().st_mtime:
            print(f"warning: {ts_path} is older than {model_path}: export it again?", file=sys.stderr)
    classes = None if classes is None else [str(c) for c in classes]
    if check_weights_:
        verify_weights(root, model_path, classes)
        if ts_path is not None:
            verify_torchscript(ts_path)
    if not (root / "docs" / "README.md").is_file():
        print(f"warning: {root / 'docs' / 'README.md'} (the model card) is missing", file=sys.stderr)
    model_md5 = _file_digest(model_path, "md5")
    if eval_summary is not None:
        record_eval_metrics(root, eval_summary, model_md5)
    files: list[tuple[str, Path | bytes]] = list(collect_files(root, model_path, ts_path))
    if classes is not None:
        files = [(rel, _with_classes(rel, src, classes)) for rel, src in files]
    large_files = None
    if large_files_url:
        large_files = write_large_files(
            root, [(rel, src) for rel, src in files if rel.startswith("models/")], large_files_url
        )
    zip_name = f"{name}_v{version}.zip"
    out = Path(out_dir) if out_dir is not None else root / "dist"
    sha1 = write_zip(out / zip_name, name, files)
    return Release(
        path=out / zip_name,
        name=name,
        version=version,
        sha1=sha1,
        source=source_url.format(name=name, version=version, zip_name=zip_name),
        files=[(rel, len(src) if isinstance(src, bytes) else src.stat().st_size) for rel, src in files],
        model_md5=model_md5,
        large_files=large_files,
    )


def package(
    bundle_root: str = ROOT,
    out_dir: str | None = None,
    model: str | None = None,
    torchscript: bool | str = False,
    source_url: str = DEFAULT_SOURCE_URL,
    check_weights: bool = True,
    large_files_url: str | None = None,
    eval_summary: str | None = None,
    classes: list[str] | None = None,
) -> None:
    """Build ``<out_dir>/<name>_v<version>.zip`` and print its model_info.json entry (stdout).

    Args:
        bundle_root: the bundle (default: this repository).
        out_dir: where the zip goes (default: <bundle_root>/dist).
        model: the weights stored as models/model.pt (default: <bundle_root>/models/model.pt).
        torchscript: also store models/model.ts: True for <bundle_root>/models/model.ts, or its path.
        source_url: the download URL recorded in the entry; {name}, {version} and {zip_name} are filled in.
        check_weights: load the weights strictly into configs/inference.json's network_def first.
        large_files_url: where the weights will be downloaded from: writes <bundle_root>/large_files.yml for the
            source tree ({name}, {version} and {file} are filled in).
        eval_summary: the metrics_summary.json of configs/evaluate.json for these weights: recorded as eval_metrics
            of configs/metadata.json.
        classes: the classes the weights were trained with when they are not configs/inference.json's (a
            preset's, e.g. "['background','kidney','tumour']"): the zip's inference.json and train.json carry
            them and its metadata.json describes them (output channels, MONAI Label's label names).
    """
    start = time.time()
    release = build(
        bundle_root, out_dir, model, torchscript, source_url, check_weights, large_files_url, eval_summary, classes
    )
    for rel, size in release.files:
        print(f"  {release.name}/{rel}  ({size:,} B)", file=sys.stderr)
    print(
        f"wrote {release.path} ({release.path.stat().st_size:,} B, {len(release.files)} files) in"
        f" {time.time() - start:.1f} s\nsha1 {release.sha1}\nmodels/model.pt md5 {release.model_md5}",
        file=sys.stderr,
    )
    if release.large_files is not None:
        print(f"wrote {release.large_files} (for the source tree; the zip carries the weights)", file=sys.stderr)
    print(json.dumps(release.entry, indent=4))


def main(argv: list[str] | None = None) -> None:
    try:
        fire.Fire(package, command=argv)
    except PackagingError as e:
        print(f"package.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
