# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Datalists, the labeled / unlabeled split, and the independently cycling unlabeled stream.

Data contract (docs/design/architecture.md): a Decathlon-style JSON with ``training`` (image + label), optional
``unlabeled`` (image only), ``validation`` and ``test``. Without an ``unlabeled`` list, ``labeled_ratio`` or
``num_labeled`` takes the first n of a seeded permutation of ``training`` as labeled and the rest, without
their labels, as unlabeled. The split is written next to the run's outputs (``split.json``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cpcl_bundle.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

__all__ = [
    "DATALIST_KEYS",
    "DATALIST_NAME",
    "IMAGE_SUFFIXES",
    "load_datalist",
    "ensure_dataset",
    "inference_datalist",
    "semi_supervised_split",
    "labeled_data",
    "unlabeled_data",
    "sibling_images",
    "CyclingLoader",
]

DATALIST_KEYS = ("training", "validation", "test", "unlabeled")
DATALIST_NAME = "dataset.json"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
_GENERATOR_FOLDERS = {"imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUn"}


def _resolve(item: Any, base_dir: Path, key: str, index: int, source: str) -> dict:
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item:
        raise InputError(f"{source}: entry {index} of '{key}' has no 'image': {item!r}")
    out = dict(item)
    for field in ("image", "label"):
        value = out.get(field)
        if isinstance(value, str) and value and not os.path.isabs(value):
            out[field] = str(base_dir / value)
        elif isinstance(value, list):
            out[field] = [str(base_dir / v) if isinstance(v, str) and not os.path.isabs(v) else v for v in value]
    if key == "training" and "label" not in out:
        raise InputError(f"{source}: entry {index} of 'training' has no 'label' (unlabeled images go in 'unlabeled')")
    return out


def load_datalist(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """Read a Decathlon-style datalist; relative paths are resolved against ``base_dir`` (default: its folder).

    Returns a dict with every key of :data:`DATALIST_KEYS` (missing ones as empty lists). Errors name the
    file and the cause: missing file, invalid JSON, no ``training`` list, entries without ``image``/``label``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"datalist {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"datalist {path} is not valid JSON: {e}") from e
    if not isinstance(content, dict):
        raise InputError(f"datalist {path} must be a JSON object with the keys {list(DATALIST_KEYS)}")
    if not isinstance(content.get("training"), list):
        raise InputError(f"datalist {path} has no 'training' list (keys found: {sorted(content)})")
    base = Path(base_dir) if base_dir is not None else path.parent
    out = {}
    for key in DATALIST_KEYS:
        items = content.get(key, [])
        if not isinstance(items, list):
            raise InputError(f"datalist {path}: '{key}' must be a list, got {type(items).__name__}")
        out[key] = [_resolve(item, base, key, i, str(path)) for i, item in enumerate(items)]
    return out


def ensure_dataset(dataset_dir: str | os.PathLike, generate: Any = True, **generator_options: Any) -> Path:
    """The datalist of ``dataset_dir``, generating the embedded phantom data set there on first use.

    ``<dataset_dir>/dataset.json`` is used when it exists. Otherwise, if ``dataset_dir`` does not exist or is
    empty (and ``generate``), the default phantom data set is written into it
    (:func:`cpcl_bundle.synthetic.generate_dataset`). A folder that holds other files but no datalist is
    never written into: that is an error saying what to add. ``generate`` may also be the generator's options
    (e.g. ``{"tumour_label": true}``, the ``phantoms_tumour`` preset): generate, with them.
    """
    from cpcl_bundle.validation import as_bool

    if isinstance(generate, Mapping):
        generator_options = {**dict(generate), **generator_options}
        generate = True
    generate = as_bool(generate, "generate_data")
    folder = Path(dataset_dir)
    datalist = folder / DATALIST_NAME
    if datalist.is_file():
        return datalist
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"dataset_dir {folder} is a file, not a folder")
    # an interrupted generation leaves only the generator's own folders (dataset.json is written last)
    leftovers = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if leftovers - _GENERATOR_FOLDERS:
        raise MissingInputError(
            f"{folder} holds files but no {DATALIST_NAME}: add a Decathlon-style datalist there "
            "(keys 'training', 'validation', 'test', optional 'unlabeled'), or point dataset_dir to an empty "
            "folder to generate the embedded phantom data set"
        )
    if not generate:
        raise MissingInputError(
            f"{folder}: no {DATALIST_NAME} (this preset's data is not generated: prepare it first with "
            "scripts/prepare_<data set>.py --dataset_dir, see docs/README.md 'Presets')"
        )
    from tqdm import tqdm

    from cpcl_bundle.synthetic import generate_dataset

    with tqdm(desc=f"generating phantoms in {folder}", unit="case") as bar:

        def progress(done: int, total: int, info: dict) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return Path(generate_dataset(folder, progress=progress, **generator_options))


def inference_datalist(dataset_dir: str | os.PathLike, key: str = "test") -> list[dict]:
    """Images to segment: the ``key`` list of ``<dataset_dir>/dataset.json`` if there is one, else every
    image file directly in ``dataset_dir`` (NIfTI, NRRD, MetaImage) and every DICOM series folder in it
    (``dataset_dir`` itself when it holds DICOM files, and any folder below it that does; see
    :mod:`cpcl_bundle.dicom`), sorted. ``dataset_dir`` may also be one image file."""
    from .dicom import dicom_folders

    path = Path(dataset_dir)
    if path.is_file():
        return [{"image": str(path)}]
    if not path.is_dir():
        raise MissingInputError(f"dataset_dir {path} does not exist")
    if (path / DATALIST_NAME).is_file():
        items = load_datalist(path / DATALIST_NAME)[key]
        return [{"image": item["image"]} for item in items]
    files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    series = [str(folder) for folder in dicom_folders(path)]
    if not files and not series:
        raise MissingInputError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}), no DICOM series and no {DATALIST_NAME} in {path}"
        )
    return [{"image": f} for f in files + series]


def semi_supervised_split(
    datalist: dict[str, list[dict]],
    labeled_ratio: float | None = None,
    num_labeled: int | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, list[dict]]:
    """Split ``training`` into a labeled and an unlabeled stream (docs/design/architecture.md, data contract).

    * ``num_labeled`` (or ``round(labeled_ratio * N)``, at least 1) cases of a permutation seeded by ``seed``
      keep their labels; the others lose them and join the unlabeled stream.
    * Neither given (or ratio 1): every training case is labeled.
    * A datalist ``unlabeled`` list is always added to the unlabeled stream.

    With ``output_dir``, the split is written to ``<output_dir>/split.json`` (seed, counts, both lists).

    Returns:
        ``{"labeled": [...], "unlabeled": [...]}`` (unlabeled entries carry no ``label``).
    """
    training = list(datalist.get("training", []))
    if not training:
        raise ValueError("the datalist has no labeled training cases ('training' is empty)")
    n = len(training)
    if num_labeled is None:
        ratio = 1.0 if labeled_ratio is None else float(labeled_ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"labeled_ratio must be in (0, 1], got {labeled_ratio}")
        num_labeled = max(1, int(math.floor(ratio * n + 0.5)))
    num_labeled = int(num_labeled)
    if not 1 <= num_labeled <= n:
        raise ValueError(f"num_labeled must be between 1 and the {n} training cases, got {num_labeled}")
    order = np.random.default_rng(seed).permutation(n)
    labeled = [training[i] for i in sorted(order[:num_labeled])]
    unlabeled = [{k: v for k, v in training[i].items() if k != "label"} for i in sorted(order[num_labeled:])]
    unlabeled += [dict(item) for item in datalist.get("unlabeled", [])]
    split = {"labeled": labeled, "unlabeled": unlabeled}
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        record = {
            "seed": seed,
            "labeled_ratio": labeled_ratio,
            "num_labeled": num_labeled,
            "num_training": n,
            "num_unlabeled": len(unlabeled),
            **split,
        }
        target = Path(output_dir) / "split.json"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # one per process: ranks write at once
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, target)
    return split


@functools.lru_cache(maxsize=8)
def _split_of(datalist: str, labeled_ratio: float | None, num_labeled: int | None, seed: int, output_dir: str | None):
    """The split of the datalist file ``datalist`` (:func:`ensure_dataset`'s result), once per arguments."""
    return semi_supervised_split(load_datalist(datalist), labeled_ratio, num_labeled, seed, output_dir)


def labeled_data(
    dataset_dir: str | os.PathLike | None = None,
    labeled_ratio: float | None = None,
    num_labeled: int | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    generate: Any = True,
    datalist: str | os.PathLike | None = None,
) -> list[dict]:
    """The labeled stream of a datalist, split as :func:`semi_supervised_split` does; the split is computed
    once per arguments and written to ``output_dir``.

    ``datalist`` is the datalist file (:func:`ensure_dataset`'s result, the config's ``datalist_file``);
    without it, that of ``dataset_dir``, where the phantoms are generated on first use when ``generate``.
    """
    out = None if output_dir is None else str(output_dir)
    if datalist is None:
        if dataset_dir is None:
            raise ValueError("labeled_data needs a datalist file or a dataset_dir")
        datalist = ensure_dataset(dataset_dir, generate=generate)
    return list(_split_of(str(datalist), labeled_ratio, num_labeled, int(seed), out)["labeled"])


def sibling_images(labeled: list[dict]) -> list[dict]:
    """Images in the folders of the labeled images that are not labeled themselves.

    This is MONAI Label's datastore seen from a bundle: its train task passes only the labeled
    ``{"image", "label"}`` pairs, and the studies folder that holds those images also holds the images nobody
    has annotated yet; those are the unlabeled stream.
    """
    taken = {os.path.realpath(item["image"]) for item in labeled}
    folders = sorted({os.path.dirname(os.path.realpath(item["image"])) for item in labeled})
    found = []
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and name.lower().endswith(IMAGE_SUFFIXES) and os.path.realpath(path) not in taken:
                found.append({"image": path})
    return found


def unlabeled_data(
    labeled: list[dict],
    dataset_dir: str | os.PathLike,
    labeled_ratio: float | None = None,
    num_labeled: int | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    min_count: int = 1,
    generate: Any = True,
) -> list[dict]:
    """The unlabeled stream that goes with ``labeled`` (``train#dataset#data``).

    When the labeled cases come from ``dataset_dir`` (the bundle's own run), it is the unlabeled part of the
    same split (:func:`labeled_data`). When they come from elsewhere (MONAI Label overrides
    ``train#dataset#data`` with its datastore's labeled images), it is :func:`sibling_images`: the
    datastore's images without a label. ``dataset_dir`` is then never read, so nothing is generated.
    ``generate`` is :func:`ensure_dataset`'s, for a ``dataset_dir`` without a datalist; the bundle's configs pass
    ``false``: the labeled stream was split from the data set their ``datalist_file`` prepared.
    If that gives fewer than ``min_count`` images (one unlabeled batch; e.g. every study is annotated), the
    labeled images join the unlabeled stream without their labels, with a warning, so training still runs.
    """
    root = os.path.realpath(dataset_dir)
    if labeled and all(os.path.realpath(item["image"]).startswith(root + os.sep) for item in labeled):
        out = None if output_dir is None else str(output_dir)
        datalist = str(ensure_dataset(dataset_dir, generate=generate))
        found = list(_split_of(datalist, labeled_ratio, num_labeled, int(seed), out)["unlabeled"])
        source = f"the split of {dataset_dir}"
    else:
        found = sibling_images(labeled)
        source = "the unannotated images beside the labeled ones"
    if len(found) < min_count:
        extra = [{"image": item["image"]} for item in labeled]
        logger.warning(
            f"only {len(found)} unlabeled image(s) in {source} (one batch needs {min_count}): "
            f"the {len(extra)} labeled image(s) are used without labels as unlabeled data too"
        )
        found += extra
    logger.info(f"unlabeled stream: {len(found)} image(s) from {source}")
    return found


class CyclingLoader:
    """An endless iterator over a data loader, restarted whenever it is exhausted.

    The unlabeled stream cycles independently of the labeled one (which defines the epochs). On each restart
    the sampler's ``set_epoch`` is called when it has one (``DistributedSampler``), so shuffling differs per
    pass and agrees across ranks.
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.epoch = 0
        self._iterator: Iterator | None = None

    def _restart(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._iterator = iter(self.loader)

    def __iter__(self) -> CyclingLoader:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._restart()
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._restart()
            try:
                return next(self._iterator)
            except StopIteration:
                raise RuntimeError("the unlabeled data loader yields no batch: is the unlabeled set empty?") from None
