# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The objects ``configs/train.json`` builds for a training step, for code that runs steps outside ``monai.bundle
run`` (``scripts/bench_step.py``, the tests): read with MONAI's ``ConfigParser``, so each has one construction, the
bundle's own.

    net = network_def(features=[4, 4, 8, 8, 16, 4])   # ``network_def`` (its own arguments overridden)
    opt = optimizer(net, learning_rate=0.1)             # ``optimizer`` on ``net``'s parameters
    loss()                                              # ``loss``
    lr_handler(opt, max_iterations=10)                  # the ``LrScheduleHandler`` of ``train#handlers``

Keyword arguments of ``optimizer``, ``loss`` and ``lr_handler`` override top-level ids of train.json
(``learning_rate``, ``max_iterations``, ``lr_schedule``, ...) before the object is built.
"""

from __future__ import annotations

import os
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(ROOT, "configs", "train.json")


def train_parser(overrides: dict[str, Any] | None = None, config_file: str = TRAIN_CONFIG):
    """``config_file`` (train.json) read by ``ConfigParser`` with the bundle root set and ``overrides`` (id -> value;
    ``#`` for nested ids; a value may be an object, which then stands for that id as it is)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    parser["bundle_root"] = ROOT
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def network_def(**arguments: Any):
    """train.json's ``network_def``, a new one each call; ``arguments`` replace its own (``features`` for a smaller
    U-Net of the same layers)."""
    overrides = {f"network_def#{k}": list(v) if isinstance(v, tuple) else v for k, v in arguments.items()}
    return train_parser(overrides).get_parsed_content("network_def")


def optimizer(network, **overrides: Any):
    """train.json's ``optimizer`` on the parameters of ``network`` (which stands for the config's ``network``)."""
    return train_parser({**overrides, "network": network}).get_parsed_content("optimizer")


def loss(**overrides: Any):
    """train.json's ``loss`` (the supervised loss ``L_s``)."""
    return train_parser(overrides).get_parsed_content("loss")


def lr_handler(optimizer, **overrides: Any):
    """The learning-rate handler of train.json's ``train#handlers`` (``LrScheduleHandler`` stepping ``lr_scheduler``
    every iteration) on ``optimizer`` (which stands for the config's ``optimizer``); the schedule's length follows
    ``max_iterations`` as in a run."""
    parser = train_parser({**overrides, "optimizer": optimizer})
    found = [
        i
        for i, handler in enumerate(parser["train#handlers"])
        if isinstance(handler, dict) and str(handler.get("_target_", "")).endswith("LrScheduleHandler")
    ]
    if len(found) != 1:
        raise LookupError(f"{TRAIN_CONFIG}: expected one LrScheduleHandler in train#handlers, found {len(found)}")
    return parser.get_parsed_content(f"train#handlers#{found[0]}")
