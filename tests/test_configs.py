# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The configs read like the model zoo's: calls are ``_target_`` components with named arguments (no long ``$``
expressions), repeated blocks are ``%`` copies, one id prepares the data set, and the train handlers are split into
those every rank runs and those only rank 0 runs (no class names picked out of a list under DDP)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
JSON_FILES = sorted(CONFIGS.rglob("*.json"))
MAX_EXPRESSION = 120


def _strings(node, where=""):
    """Every string value in a config with its id (``a#b#0``)."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{where}#{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}#{i}")


def _load(name):
    return json.loads((CONFIGS / name).read_text())


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_no_long_expressions(path):
    long = [
        f"{where} ({len(s)})"
        for where, s in _strings(json.loads(path.read_text()))
        if s.startswith("$") and len(s) > MAX_EXPRESSION
    ]
    assert not long, f"$ expressions over {MAX_EXPRESSION} characters (make them _target_ components): {long}"


def test_the_configs_are_walked():
    names = {str(p.relative_to(CONFIGS)) for p in JSON_FILES}
    assert {"train.json", "evaluate.json", "inference.json", "multi_gpu_train.json"} <= names
    assert {"presets/kits19.json", "presets/paper_protocol.json"} <= names


def test_one_id_prepares_the_data_set():
    """``datalist_file`` (ensure_dataset) is the only call that may generate the phantoms; the labeled stream, the
    datalist and multi-GPU training use its result, and the unlabeled stream only reads the prepared data set."""
    train, multi = _load("train.json"), _load("multi_gpu_train.json")
    calls = [w for name in ("train.json", "evaluate.json", "multi_gpu_train.json") for w, s in _strings(_load(name))
             if "ensure_dataset" in s]  # fmt: skip
    assert calls == ["datalist_file#_target_"]
    assert train["datalist_file"]["generate"] == "@generate_data"
    assert [w for w, s in _strings(train) if "@generate_data" in s] == ["datalist_file#generate"]
    assert train["datalist"]["path"] == "@datalist_file"
    assert train["train"]["dataset"]["data"]["datalist"] == "@datalist_file"
    assert train["train"]["unlabeled_dataset"]["data"]["generate"] is False
    assert "@datalist_file" in multi["initialize"]  # rank 0 first, the others after a barrier


def test_train_handlers_split_by_rank_keeps_the_single_process_order():
    train, multi = _load("train.json")["train"], _load("multi_gpu_train.json")
    every_rank, rank0 = train["handlers"], train["rank0_handlers"]
    # MONAI Label reads train#handlers raw and inserts its CheckpointLoader at index 0: a list of components
    assert isinstance(every_rank, list) and all(isinstance(h, dict) and "_target_" in h for h in every_rank)
    targets = [h["_target_"].split(".")[-1] for h in every_rank + rank0]
    assert targets == [
        "LrScheduleHandler",
        "TimeLimit",
        "ResumeCheckpoint",
        "ValidationHandler",
        "CheckpointSaver",
        "PrototypeMapHandler",
        "ProgressBar",
        "StatsHandler",
        "TensorBoardStatsHandler",
    ]
    assert train["trainer"]["train_handlers"] == "$@train#handlers + @train#rank0_handlers"
    selection = multi["train#trainer#train_handlers"]
    assert "@train#handlers" in selection and "@train#rank0_handlers" in selection and "__name__" not in selection


def test_repeated_blocks_are_written_once():
    train = _load("train.json")
    assert train["validate"]["postprocessing"] == "%train#postprocessing"
    assert train["validate"]["key_metric"]["val_mean_dice"] == "%train#key_metric#train_mean_dice"
    assert train["train"]["crops"]["roi_balanced"][1] == train["train"]["crops"]["uniform"][0] == "%train#pad"
    text = (CONFIGS / "train.json").read_text()
    assert text.count('"SpatialPadd"') == text.count('"MeanDice"') == 1
    assert text.count('"Activationsd"') == 1
