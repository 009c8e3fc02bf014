# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""Do the data loaders keep the accelerator fed? Samples per second of the training streams, per loader setting.

    python scripts/bench_loader.py --presets la2018 --dataset_dir /data/la2018 --overrides "{'num_labeled': 8}"
    python scripts/bench_loader.py ... --device cuda --workers 8 --step_seconds 0.12

The datasets are built from ``configs/train.json`` (plus presets and overrides) exactly as a training run builds
them, cache included (its fill time is printed), and then drawn from the way the trainer draws them: per step
one labeled batch and one unlabeled batch, moved to ``device``. Loader settings, each over the same cached
datasets:

* ``main``: the configuration's own ``train#dataloader`` and ``train#unlabeled_dataloader`` over volumes cached on
  the CPU (``cache_device`` cpu): the random crops and flips in the main process, between the steps (the setting
  under which resume is exact, ``cpcl_bundle.resume``);
* ``workers``: MONAI's ``DataLoader`` with ``--workers`` worker processes per stream, beside the steps;
* ``thread``: MONAI's ``ThreadDataLoader``: the crops and flips in a thread beside the steps;
* ``device`` (CUDA only): the configuration's own loaders with the cached volumes on the GPU (``cache_device``
  = ``device``, as the ``la2018`` preset sets it on a GPU): crops and flips on the GPU, in the main process.

Printed per setting: seconds per step of data, samples per second and, with ``--step_seconds`` (a training step's
time, e.g. from ``scripts/bench_step.py``), the share of a step's time the data takes when it is made between the
steps (``main``, ``device``), and whether it keeps up when it is made beside them (``workers``, ``thread``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fire
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SETTINGS = ("main", "workers", "thread", "device")


def _parser(config_files: list[str], overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    parser["bundle_root"] = ROOT
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _draw(labeled, unlabeled, steps: int, device: torch.device) -> tuple[float, int]:
    """Seconds for ``steps`` steps of data (one batch of each stream, on ``device``) and the samples drawn; the first
    batch of each stream (iterator start-up) is not timed."""
    from cpcl_bundle.data import CyclingLoader

    streams = [iter(CyclingLoader(labeled)), iter(CyclingLoader(unlabeled))]
    for stream in streams:
        next(stream)
    samples = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        for stream in streams:
            batch = next(stream)
            image = batch["image"].to(device, non_blocking=True)
            if "label" in batch:
                batch["label"].to(device, non_blocking=True)
            samples += image.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, samples


def _loaders(setting: str, parser, workers: int):
    """The labeled and unlabeled loader of ``setting`` over the datasets of ``parser`` (cached on the CPU)."""
    from monai.data import DataLoader, ThreadDataLoader

    labeled = parser.get_parsed_content("train#dataloader")
    unlabeled = parser.get_parsed_content("train#unlabeled_dataloader")
    if setting == "main":
        return labeled, unlabeled
    out = []
    for loader in (labeled, unlabeled):
        kwargs = {"batch_size": loader.batch_size, "shuffle": True, "drop_last": loader.drop_last}
        if setting == "workers":
            out.append(DataLoader(loader.dataset, num_workers=workers, persistent_workers=workers > 0, **kwargs))
        else:
            out.append(ThreadDataLoader(loader.dataset, num_workers=0, **kwargs))
    return out[0], out[1]


def main(
    config_dir: str | None = None,
    presets: Any = (),
    dataset_dir: str | None = None,
    overrides: dict | None = None,
    steps: int = 30,
    device: str = "cpu",
    workers: int = 4,
    settings: Any = None,
    step_seconds: float | None = None,
    output: str | None = None,
) -> None:
    """Measure the loader settings (default: ``config``, ``workers``, ``thread``, and ``device`` on CUDA)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from benchmark import _list, _preset_files  # the benchmark's own reading of presets and list arguments

    from cpcl_bundle.data import ensure_dataset

    config = Path(config_dir or os.path.join(ROOT, "configs")).resolve()
    files = [str(config / "train.json"), *_preset_files(config, presets)]
    dev = torch.device(device)
    chosen = _list(settings) if settings else [s for s in SETTINGS if s != "device" or dev.type == "cuda"]
    unknown = set(chosen) - set(SETTINGS)
    if unknown:
        raise ValueError(f"--settings: unknown {sorted(unknown)}; known: {list(SETTINGS)}")
    with tempfile.TemporaryDirectory() as out_dir:
        values = {"output_dir": out_dir, **(overrides or {})}
        if dataset_dir is not None:
            values["dataset_dir"] = str(dataset_dir)
        parser = _parser(files, {**values, "cache_device": "cpu"})
        ensure_dataset(parser.get_parsed_content("dataset_dir"), generate=parser.get_parsed_content("generate_data"))
        start = time.perf_counter()
        parser.get_parsed_content("train#dataset")
        parser.get_parsed_content("train#unlabeled_dataset")
        cache_s = time.perf_counter() - start
        patch = parser.get_parsed_content("patch_size")
        print(
            f"[bench_loader] datasets cached in {cache_s:.1f} s; patch {patch}, batch "
            f"{parser.get_parsed_content('batch_size')} labeled + {parser.get_parsed_content('unlabeled_batch_size')}"
            f" unlabeled, {steps} steps of data per setting, to {dev}",
            flush=True,
        )
        rows = []
        for setting in chosen:
            if setting == "device":
                on_device = _parser(files, {**values, "cache_device": str(dev)})
                labeled, unlabeled = _loaders("main", on_device, int(workers))
            else:
                labeled, unlabeled = _loaders(setting, parser, int(workers))
            seconds, samples = _draw(labeled, unlabeled, int(steps), dev)
            row = {
                "setting": setting + (f" ({workers} per stream)" if setting == "workers" else ""),
                "step_data_s": seconds / int(steps),
                "samples_per_s": samples / seconds,
            }
            rows.append(row)
            print(f"[bench_loader] {json.dumps(row)}", flush=True)
    print(table(rows, step_seconds, cache_s))
    if output:
        with open(output, "w") as f:
            json.dump({"cache_seconds": cache_s, "rows": rows, "step_seconds": step_seconds}, f, indent=2)


def table(rows: list[dict], step_seconds: float | None, cache_seconds: float) -> str:
    """Markdown: one row per loader setting; against a training step when its time is known."""
    head = "| loader setting | data per step (s) | samples / s |"
    rule = "|---|---|---|"
    if step_seconds:
        head += f" made between steps: its share of data + a {step_seconds:.3f} s step | made beside them: keeps up |"
        rule += "---|---|"
    lines = [f"\nThe datasets' cache filled in {cache_seconds:.1f} s.\n", head, rule]
    for r in rows:
        line = f"| {r['setting']} | {r['step_data_s']:.4f} | {r['samples_per_s']:.1f} |"
        if step_seconds:
            series = f"{100 * r['step_data_s'] / (r['step_data_s'] + step_seconds):.1f} %"
            keeps = "yes" if r["step_data_s"] <= step_seconds else f"no ({r['step_data_s'] / step_seconds:.1f}x)"
            beside = r["setting"].startswith(("workers", "thread"))
            line += f" {'-' if beside else series} | {keeps if beside else '-'} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main)
