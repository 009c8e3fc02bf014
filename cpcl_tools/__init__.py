# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Offline tools of the CPCL bundle: what the repository's ``scripts/`` run and no config references.

- :mod:`cpcl_tools.benchmark`: methods x label ratios x seeds trained and evaluated with the bundle's own commands,
  and the paper's tables;
- :mod:`cpcl_tools.plots`: the benchmark's figures;
- :mod:`cpcl_tools.prepare`: what every ``scripts/prepare_<name>.py`` shares (raw download to datalist layout);
- :mod:`cpcl_tools.metadata`: ``configs/metadata.json``'s description of the output channels for a release
  (``scripts/package.py``);
- :mod:`cpcl_tools.train_objects`: the network, optimiser, loss and LR handler of ``configs/train.json``, built by
  MONAI's ``ConfigParser`` for ``scripts/bench_step.py`` and the tests.

The tools import the runtime (:mod:`cpcl_bundle`); the runtime never imports them, and the model-zoo release zip
carries the runtime only (docs/design/architecture.md).
"""
