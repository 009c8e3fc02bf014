# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Benchmark methods x label ratios x seeds on a data set, with the paper's tables and figures.

    # the grid (default: supervised, mt, fpcl, bpcl, cpcl, mt_cpcl at 10 %, supervised at 100 %, seed 0)
    python scripts/benchmark.py run --output_dir bench
    # a chosen grid, two runs at a time (one thread each), on your own data, the paper's crop
    python scripts/benchmark.py run --output_dir bench --methods "[supervised,mt,cpcl,cpcl_released]" \
        --ratios "[0.05,0.1]" --seeds "[0,1,2]" --jobs 2 --dataset_dir /data/kits --overrides "{'patch_size': [96,96,96]}"
    # tables and figures again from the finished runs
    python scripts/benchmark.py report --output_dir bench

Every run trains and evaluates through the bundle's own commands (configs/train.json, configs/evaluate.json)
with the same step budget and backbone; finished runs are skipped and interrupted ones resume when the command
is run again. Writes to ``output_dir``: ``per_case_metrics.csv``, ``summary.json``, ``results_table.md`` (the
paper's layout: mean (std), ``*`` p <= 0.05 in a two-sided paired t-test against CPCL, best mean in bold) and
``figures/`` (Dice box plots, training curves, Fig. 6 of each prototype run, overlays on test cases).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import fire
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cpcl_bundle.methods import get_method  # noqa: E402
from cpcl_bundle.validation import as_bool  # noqa: E402
from cpcl_tools import benchmark, plots  # noqa: E402

DEFAULT_METHODS = ("supervised", "mt", "fpcl", "bpcl", "cpcl", "mt_cpcl")


def _preset_files(config_dir: Path, presets: Any) -> list[str]:
    """Preset config files by path or by name (``la2018`` = ``<config_dir>/presets/la2018.json``), each after
    the presets it stacks on (``kits19`` = ``paper_protocol.json`` then ``kits19.json``; see
    :func:`cpcl_tools.benchmark.preset_files`)."""
    return benchmark.preset_files(config_dir, _list(presets) if presets else [])


def _config_value(config_dir: Path, key: str, presets: list[str] | None = None) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(config_dir / "train.json"), *(presets or [])])
    parser["bundle_root"] = ROOT
    return parser.get_parsed_content(key)


def _list(value: Any) -> list:
    """A list from the command line, where ``--methods cpcl`` arrives as one string, ``--seeds 0`` as an int."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def report(
    output_dir: str = "bench", dataset_dir: str | None = None, config_dir: str | None = None, presets: Any = ()
) -> dict:
    """Tables (CSV, JSON, markdown) and figures from the finished runs in ``output_dir`` (``presets``: those the
    runs used, for the data folder and the display window of the overlays)."""
    root = Path(output_dir)
    config = Path(config_dir or Path(ROOT) / "configs").resolve()
    preset_files = _preset_files(config, presets)
    paths = benchmark.write_reports(root)
    rows = benchmark.collect(root)
    figures = root / "figures"
    made = {"dice_boxplot": plots.dice_boxplot(rows, figures / "dice_boxplot.png")}
    made["training_curves"] = plots.training_curves(root, figures / "training_curves.png")
    for run_dir in sorted(p.parent for p in root.glob("runs/*/run.json")):
        maps = run_dir / "eval" / "prototype_maps"
        snapshots = sorted(maps.glob("prototype_maps_*.npz"))
        if snapshots and "p_l2u" in np.load(snapshots[0]).files:  # methods with prototypes
            made[f"fig6_{run_dir.name}"] = plots.prototype_figure(maps, figures / f"fig6_{run_dir.name}.png")
    if dataset_dir is None:
        dataset_dir = str(_config_value(config, "dataset_dir", preset_files))
    ct = _config_value(config, "intensity#_target_", preset_files) == "ScaleIntensityRanged"
    window = _config_value(config, "hu_window", preset_files) if ct else None  # else: percentiles (MRI)
    made["overlays"] = plots.overlays(root, dataset_dir, figures / "overlays.png", hu_window=window)
    print(paths["table"].read_text())
    for name, path in {**paths, **made}.items():
        print(f"{name}: {path}")
    return {name: str(path) for name, path in {**paths, **made}.items()}


def run(
    output_dir: str = "bench",
    methods: tuple[str, ...] = DEFAULT_METHODS,
    ratios: tuple[float, ...] = (0.1,),
    labeled: tuple[int, ...] = (),
    seeds: tuple[int, ...] = (0,),
    full_supervised: bool = True,
    dataset_dir: str | None = None,
    max_iterations: int | None = None,
    overrides: dict | None = None,
    jobs: int = 1,
    threads: int | None = None,
    config_dir: str | None = None,
    presets: tuple[str, ...] = (),
) -> dict:
    """Train and evaluate the grid (skipping finished runs), then :func:`report`.

    Args:
        output_dir: where runs, tables and figures go.
        methods: names from ``cpcl_bundle.methods.METHODS``.
        ratios: labeled fractions of the training split (``"[]"`` for none).
        labeled: numbers of labeled cases, e.g. ``"[8,16]"`` (the Left Atrium literature's 10 % and 20 %).
        seeds: one run per seed (split, initialisation and sampling all follow it).
        full_supervised: add ``supervised`` at 100 % per seed (the upper bound).
        dataset_dir: a folder with a Decathlon-style ``dataset.json`` (default: the embedded phantoms,
            generated once before any run starts).
        max_iterations: the step budget of every run (default: train.json's).
        overrides: more bundle ids for every run, e.g. ``{'patch_size': [96, 96, 96]}``.
        jobs: runs at a time; threads: torch threads per run (default: the CPU count shared out).
        presets: config files merged after train.json (and evaluate.json), by path or by name from
            ``configs/presets`` (e.g. ``la2018``).
    """
    config = Path(config_dir or Path(ROOT) / "configs").resolve()
    preset_files = _preset_files(config, presets)
    runs = benchmark.plan(
        [str(m) for m in _list(methods)],
        [float(r) for r in _list(ratios)],
        [int(s) for s in _list(seeds)],
        as_bool(full_supervised, "full_supervised"),
        [int(n) for n in _list(labeled)],
    )
    for run_ in runs:
        get_method(run_.overrides()["method"])
    if dataset_dir is None:
        dataset_dir = str(_config_value(config, "dataset_dir", preset_files))
    from cpcl_bundle.data import ensure_dataset

    # once, before parallel runs could race to generate it (presets of real data sets generate nothing)
    ensure_dataset(dataset_dir, generate=_config_value(config, "generate_data", preset_files))
    common: dict[str, Any] = {"dataset_dir": str(Path(dataset_dir).resolve()), **(overrides or {})}
    if max_iterations is not None:
        common["max_iterations"] = int(max_iterations)
    budget = int(common.get("max_iterations") or _config_value(config, "max_iterations", preset_files))
    print(f"{len(runs)} runs of {budget} steps in {output_dir}: " + ", ".join(r.name for r in runs))
    benchmark.run_grid(runs, output_dir, common, budget, config, jobs=jobs, threads=threads, presets=preset_files)
    return report(output_dir, dataset_dir, str(config), preset_files)


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report})
