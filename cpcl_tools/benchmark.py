# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The benchmark: a grid of methods x label ratios x seeds trained and evaluated with the bundle's own
commands, and the paper's tables (Tables I-IV: mean (std) of Dice, Jaccard, 95HD, ASD; ``*`` where a
two-sided paired t-test against CPCL over the test cases gives p <= 0.05; best mean in bold).

Each run is two subprocesses, exactly what a user types (``python -m monai.bundle run training
--config_file configs/train.json --method ... --labeled_ratio ...``, then the same with ``evaluate.json``
merged), in its own folder::

    <output_dir>/runs/<method>_<pct>pct_seed<seed>/
        models/model.pt          the trained network (plus model_best.pt)
        eval/                    TensorBoard logs, prototype maps, resume checkpoints, split.json
        test/                    metrics.csv, metrics_summary.json, predictions/<case>_seg.nii.gz
        train.log, evaluate.log  the commands' output
        run.json                 what ran: overrides, commands, wall times (written when the run is done)

A run with ``run.json`` is finished and skipped when the benchmark is run again; an interrupted one resumes
from its last checkpoint (``--resume True``, the bundle's exact resume). Reports are made from the folders
alone (:func:`collect`, :func:`summarise_runs`, :func:`markdown_table`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cpcl_bundle.evaluation import METRICS, summarise
from cpcl_bundle.methods import METHODS

__all__ = [
    "metrics_in",
    "Run",
    "plan",
    "bundle_command",
    "run_grid",
    "collect",
    "summarise_runs",
    "paired_tests",
    "markdown_table",
    "write_reports",
    "PRESET_BASES",
    "preset_files",
]

#: The method every other is tested against (the paper's ``*``).
REFERENCE = "cpcl"

HIGHER_IS_BETTER = {"dice": True, "jaccard": True, "hd95_mm": False, "asd_mm": False}
HEADERS = {"dice": "Dice (%)", "jaccard": "Jaccard (%)", "hd95_mm": "95HD (mm)", "asd_mm": "ASD (mm)"}
PERCENT = {"dice", "jaccard"}

_STEP = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+)")


#: Presets that stack on others (``configs/presets/<name>.json``): a name stands for its bases' files, in this
#: order, then its own. KiTS19 and BraTS 2019 use the paper's protocol; their multi-class variants add classes.
PRESET_BASES: dict[str, tuple[str, ...]] = {
    "kits19": ("paper_protocol",),
    "brats2019": ("paper_protocol",),
    "kits19_tumour": ("kits19",),
    "brats2019_subregions": ("brats2019",),
}


def preset_files(config_dir: str | os.PathLike, presets: Iterable[str | os.PathLike]) -> list[str]:
    """The config files to merge after ``train.json`` (or ``inference.json``) for ``presets``, given by name
    (``kits19`` = ``<config_dir>/presets/kits19.json``) or by path: each preset's bases first
    (:data:`PRESET_BASES`, for a name or a file of ``<config_dir>/presets``), every file once, in order.
    E.g. ``["kits19", "kits19_tumour"]`` -> ``paper_protocol.json``, ``kits19.json``, ``kits19_tumour.json``."""
    folder = (Path(config_dir) / "presets").resolve()
    files: list[str] = []

    def add(preset: str | os.PathLike) -> None:
        path = Path(str(preset))
        if not path.suffix:
            path = folder / f"{preset}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: preset does not exist (see {folder})")
        path = path.resolve()
        if path.parent == folder:
            for base in PRESET_BASES.get(path.stem, ()):
                add(base)
        if str(path) not in files:
            files.append(str(path))

    for preset in presets:
        add(preset)
    return files


def _pct(ratio: float) -> str:
    return f"{100 * ratio:.6g}"


@dataclass(frozen=True)
class Run:
    """One cell of the grid: a method of :data:`cpcl_bundle.methods.METHODS` at a label ratio, or at a number of labeled
    cases (``num_labeled``, as the Left Atrium literature reports: 8 or 16 cases), and a seed."""

    method: str
    ratio: float | None
    seed: int
    num_labeled: int | None = None

    @property
    def name(self) -> str:
        amount = f"{self.num_labeled}lab" if self.num_labeled is not None else f"{_pct(self.ratio)}pct"
        return f"{self.method}_{amount}_seed{self.seed}"

    def overrides(self) -> dict[str, Any]:
        """The bundle ids this run sets (on top of the benchmark's common overrides). Both label settings are
        set, so that a preset's own (e.g. la2018's ``num_labeled``) never overrides the grid's."""
        return {"method": self.method, "labeled_ratio": self.ratio, "num_labeled": self.num_labeled, "seed": self.seed}


def plan(
    methods: Sequence[str],
    ratios: Sequence[float],
    seeds: Sequence[int],
    full_supervised: bool = True,
    labeled: Sequence[int] = (),
) -> list[Run]:
    """The grid: every method at every ratio (and every number of ``labeled`` cases) and seed, plus
    (``full_supervised``) ``supervised`` at 100 % per seed, the paper's upper bound. Unknown names fail here,
    before anything runs."""
    known = set(METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: choose from {sorted(known)}")
    bad = [r for r in ratios if not 0 < float(r) <= 1]
    if bad:
        raise ValueError(f"label ratios must be in (0, 1], got {bad}")
    if any(int(n) < 1 for n in labeled):
        raise ValueError(f"numbers of labeled cases must be at least 1, got {list(labeled)}")
    runs = [Run(m, float(r), int(s)) for r in ratios for m in methods for s in seeds]
    runs += [Run(m, None, int(s), int(n)) for n in labeled for m in methods for s in seeds]
    if full_supervised:
        runs += [Run("supervised", 1.0, int(s)) for s in seeds]
    return list(dict.fromkeys(runs))


def _cli_value(value: Any) -> str:
    """A value as the bundle CLI (python-fire) parses it back: Python literals, plain strings as they are, and
    ``None`` as the config expression ``$None``: ``monai.bundle run`` drops overrides whose value is ``None``
    (``update_kwargs(ignore_none=True)``), which would leave a preset's value (la2018's ``num_labeled``) in force."""
    if value is None:
        return "$None"
    return value if isinstance(value, str) else repr(value)


def bundle_command(config_files: Sequence[str], overrides: dict[str, Any], run_id: str | None = None) -> list[str]:
    """``python -m monai.bundle run [run_id] --config_file [...] --key value ...`` as an argument list."""
    command = [sys.executable, "-m", "monai.bundle", "run"]
    if run_id is not None:
        command.append(run_id)
    files = config_files[0] if len(config_files) == 1 else repr([str(f) for f in config_files])
    command += ["--config_file", str(files)]
    for key, value in overrides.items():
        command += [f"--{key}", _cli_value(value)]
    return command


@dataclass
class _Progress:
    """Thread-safe step counting over all runs, for the progress bar."""

    update: Callable[[int], None]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        if n > 0:
            with self.lock:
                self.update(n)


def _follow(
    command: list[str], log: Path, env: dict[str, str], on_step: Callable[[int], None], cwd: Path | None = None
) -> int:
    """Run ``command`` with its output in ``log``; call ``on_step(global_step)`` for every StatsHandler line."""
    with (
        open(log, "a") as out,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1, cwd=cwd
        ) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            for epoch, it, length in _STEP.findall(line):
                on_step((int(epoch) - 1) * int(length) + int(it))
        return process.wait()


def _run_one(
    run: Run,
    root: Path,
    common: dict[str, Any],
    config_dir: Path,
    threads: int,
    steps: _Progress,
    max_iterations: int,
    presets: Sequence[str] = (),
) -> dict[str, Any]:
    folder = root / "runs" / run.name
    models, evaluation, test = folder / "models", folder / "eval", folder / "test"
    folder.mkdir(parents=True, exist_ok=True)
    overrides = {**common, **run.overrides(), "ckpt_dir": str(models), "output_dir": str(evaluation)}
    if any((evaluation / "checkpoints").glob("resume_checkpoint_*.pt")):
        overrides["resume"] = True  # an interrupted run goes on from its last checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    train = bundle_command([str(config_dir / "train.json"), *presets], overrides, "training")
    done = [0]

    def on_step(step: int) -> None:
        steps.add(step - done[0])
        done[0] = max(done[0], step)

    start = time.perf_counter()
    if _follow(train, folder / "train.log", env, on_step, config_dir.parent) != 0:
        raise RuntimeError(f"training of {run.name} failed: see {folder / 'train.log'}")
    steps.add(max_iterations - done[0])
    train_s = time.perf_counter() - start
    evaluate_overrides = {k: v for k, v in overrides.items() if k != "resume"} | {"output_dir": str(test)}
    evaluate = bundle_command(
        [str(config_dir / "train.json"), str(config_dir / "evaluate.json"), *presets], evaluate_overrides
    )
    start = time.perf_counter()
    if _follow(evaluate, folder / "evaluate.log", env, lambda step: None, config_dir.parent) != 0:
        raise RuntimeError(f"evaluation of {run.name} failed: see {folder / 'evaluate.log'}")
    ratio = run.ratio
    if run.num_labeled is not None:  # the fraction this count is of the training split, for the tables
        split = json.loads((evaluation / "split.json").read_text())
        ratio = split["num_labeled"] / split["num_training"]
    record = {
        "name": run.name,
        "method": run.method,
        "ratio": ratio,
        "seed": run.seed,
        **({} if run.num_labeled is None else {"num_labeled": run.num_labeled}),
        "presets": list(presets),
        "overrides": overrides,
        "train_command": train,
        "evaluate_command": evaluate,
        "train_seconds": round(train_s, 1),
        "evaluate_seconds": round(time.perf_counter() - start, 1),
        "threads": threads,
    }
    tmp = folder / ".run.json.partial"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, folder / "run.json")
    return record


def run_grid(
    runs: Sequence[Run],
    output_dir: str | os.PathLike,
    common: dict[str, Any],
    max_iterations: int,
    config_dir: str | os.PathLike = "configs",
    jobs: int = 1,
    threads: int | None = None,
    presets: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Train and evaluate every run not finished yet, ``jobs`` at a time with ``threads`` each (default: the
    CPU count shared out), with the config files ``presets`` merged after train.json (and evaluate.json); a
    bar shows runs, another the training steps of all runs. Returns ``run.json`` records of all runs (finished
    ones read back)."""
    from tqdm import tqdm

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    config_dir = Path(config_dir).resolve()
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    finished = {r.name for r in runs if (root / "runs" / r.name / "run.json").is_file()}
    todo = [r for r in runs if r.name not in finished]
    with (
        tqdm(total=len(runs), initial=len(finished), desc="runs", unit="run", position=0) as run_bar,
        tqdm(total=len(todo) * max_iterations, desc="steps", unit="step", position=1) as step_bar,
    ):
        steps = _Progress(step_bar.update)

        def one(run: Run) -> dict[str, Any]:
            record = _run_one(run, root, common, config_dir, threads, steps, max_iterations, presets)
            run_bar.update(1)
            run_bar.set_postfix_str(run.name)
            return record

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(one, todo))
    return [json.loads((root / "runs" / r.name / "run.json").read_text()) for r in runs]


# ---------------------------------------------------------------------------------------------------- reports


def _records(output_dir: str | os.PathLike) -> dict[Path, dict[str, Any]]:
    """The ``run.json`` of every finished run under ``output_dir``, by run folder (sorted)."""
    return {p.parent: json.loads(p.read_text()) for p in sorted(Path(output_dir).glob("runs/*/run.json"))}


def _metric_of(column: str) -> str:
    """The metric a column holds: ``dice`` for ``dice`` and for a class's ``dice_<class>``."""
    return next(m for m in sorted(METRICS, key=len, reverse=True) if column == m or column.startswith(f"{m}_"))


def metrics_in(rows: Sequence[dict]) -> list[str]:
    """The metric columns of ``rows``: :data:`~cpcl_bundle.evaluation.METRICS` (the mean over the foreground
    classes), then the per-class columns (``dice_<class>`` ...) of multi-class runs, in their order."""
    extra = [k for k in (rows[0] if rows else {}) if k not in METRICS and any(k.startswith(f"{m}_") for m in METRICS)]
    return [*METRICS, *extra]


def collect(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-case metrics of every finished run under ``output_dir``: rows of run, method, ratio, seed, case and
    :data:`~cpcl_bundle.evaluation.METRICS` (plus each class's columns for multi-class runs)."""
    rows = []
    for folder, record in _records(output_dir).items():
        with open(folder / "test" / "metrics.csv", newline="") as f:
            reader = csv.DictReader(f)
            columns = [c for c in reader.fieldnames or [] if c != "case"]
            for row in reader:
                rows.append(
                    {
                        "run": record["name"],
                        "method": record["method"],
                        "ratio": float(record["ratio"]),
                        "num_labeled": record.get("num_labeled"),
                        "seed": int(record["seed"]),
                        "case": row["case"],
                        **{m: float(row[m]) if row[m] not in ("", "nan") else math.nan for m in columns},
                    }
                )
    return rows


def _per_case(rows: Iterable[dict], method: str, ratio: float, metric: str) -> dict[str, float]:
    """Case -> the metric averaged over seeds (NaN-aware) for one method and ratio."""
    values: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] == method and math.isclose(r["ratio"], ratio):
            values.setdefault(r["case"], []).append(r[metric])
    return {case: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for case, v in values.items()}


def paired_tests(
    rows: Sequence[dict], method: str, ratio: float, reference: tuple[str, float], metric: str
) -> tuple[float, int]:
    """Two-sided paired t-test of ``metric`` between (method, ratio) and ``reference`` (method, ratio) over the
    test cases both have a finite value for (seeds averaged per case). Returns (p, number of pairs); p is NaN
    with fewer than two pairs or when every difference is equal."""
    from scipy import stats

    a, b = _per_case(rows, method, ratio, metric), _per_case(rows, *reference, metric)
    cases = sorted(c for c in a.keys() & b.keys() if math.isfinite(a[c]) and math.isfinite(b[c]))
    if len(cases) < 2:
        return math.nan, len(cases)
    x, y = np.array([a[c] for c in cases]), np.array([b[c] for c in cases])
    if np.allclose(x - y, (x - y)[0]):
        return (1.0 if np.allclose(x, y) else 0.0), len(cases)
    return float(stats.ttest_rel(x, y).pvalue), len(cases)


def summarise_runs(rows: Sequence[dict], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """One entry per (method, ratio): mean and std over test cases of each metric (seeds averaged per case),
    the spread of the per-seed means, and the paired t-test against ``reference`` at the same ratio (at the
    lowest ratio for runs at 100 %)."""
    groups = list(dict.fromkeys((r["method"], r["ratio"]) for r in rows))
    ratios_with_reference = sorted({ratio for m, ratio in groups if m == reference})
    summary = []
    for method, ratio in groups:
        entry: dict[str, Any] = {"method": method, "ratio": ratio}
        counts = {r.get("num_labeled") for r in rows if (r["method"], r["ratio"]) == (method, ratio)}
        entry["num_labeled"] = counts.pop() if len(counts) == 1 else None
        seeds = sorted({r["seed"] for r in rows if r["method"] == method and r["ratio"] == ratio})
        entry["seeds"] = seeds
        if method == reference or not ratios_with_reference:
            against = None
        elif ratio in ratios_with_reference:
            against = (reference, ratio)
        else:
            against = (reference, ratios_with_reference[0])
        entry["compared_with"] = None if against is None else {"method": against[0], "ratio": against[1]}
        for metric in metrics_in(rows):
            per_case = list(_per_case(rows, method, ratio, metric).values())
            seed_means = [
                float(
                    np.nanmean([r[metric] for r in rows if (r["method"], r["ratio"], r["seed"]) == (method, ratio, s)])
                )
                for s in seeds
            ]
            stats: dict[str, Any] = {
                **summarise([{metric: v} for v in per_case], [metric])[metric],  # mean, std, num_undefined
                "num_cases": len(per_case),
                "seed_means": seed_means,
            }
            if against is not None:
                stats["p_value"], stats["num_pairs"] = paired_tests(rows, method, ratio, against, metric)
            entry[metric] = stats
        summary.append(entry)
    return summary


def _fmt(metric: str, stats: dict[str, Any]) -> str:
    scale = 100.0 if _metric_of(metric) in PERCENT else 1.0
    mean, std = stats["mean"] * scale, stats["std"] * scale
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} ({std:.2f})" if math.isfinite(std) else f"{mean:.2f}"


def markdown_table(summary: Sequence[dict[str, Any]], alpha: float = 0.05) -> str:
    """The paper's layout: a block per label ratio (the 100 % upper bound first), rows ``method | labeled``,
    each metric as ``mean (std)``; ``*`` where the paired t-test against CPCL gives p <= ``alpha``; the best
    mean of each metric within a ratio's block in bold. Multi-class runs: this table for the mean over the
    foreground classes, then one per class (``#### <class>``)."""
    classes = [m[len("dice_") :] for m in (summary[0] if summary else {}) if m.startswith("dice_")]
    if not classes:
        return _metric_table(summary, list(METRICS), alpha)
    parts = ["Mean over the foreground classes:\n\n" + _metric_table(summary, list(METRICS), alpha)]
    for name in classes:
        parts.append(f"#### {name}\n\n" + _metric_table(summary, [f"{m}_{name}" for m in METRICS], alpha))
    return "\n".join(parts)


def _metric_table(summary: Sequence[dict[str, Any]], metrics: list[str], alpha: float) -> str:
    """:func:`markdown_table` for the given metric columns (the mean's, or one class's)."""
    order = {name: i for i, name in enumerate(["supervised", *METHODS])}
    entries = sorted(summary, key=lambda e: (-(e["ratio"] >= 1.0), e["ratio"], order.get(e["method"], 99)))
    best: dict[tuple[float, str], float] = {}
    for metric in metrics:
        for ratio in {e["ratio"] for e in entries}:
            means = [e[metric]["mean"] for e in entries if e["ratio"] == ratio and math.isfinite(e[metric]["mean"])]
            if len(means) > 1:
                best[(ratio, metric)] = max(means) if HIGHER_IS_BETTER[_metric_of(metric)] else min(means)
    lines = [
        "| method | labeled | " + " | ".join(HEADERS[_metric_of(m)] for m in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for e in entries:
        cells = []
        for metric in metrics:
            text = _fmt(metric, e[metric])
            p = e[metric].get("p_value", math.nan)
            if math.isfinite(p) and p <= alpha:
                text += "*"
            if (e["ratio"], metric) in best and e[metric]["mean"] == best[(e["ratio"], metric)]:
                text = f"**{text}**"
            cells.append(text)
        labeled = f"{_pct(e['ratio'])}%"
        if e.get("num_labeled") is not None:
            labeled = f"{e['num_labeled']} ({100 * e['ratio']:.3g}%)"
        lines.append(f"| {e['method']} | {labeled} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(output_dir: str | os.PathLike, reference: str = REFERENCE) -> dict[str, Path]:
    """``per_case_metrics.csv``, ``summary.json`` and ``results_table.md`` in ``output_dir`` from its finished
    runs; returns their paths."""
    root = Path(output_dir)
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no finished run under {root / 'runs'} (a finished run has run.json)")
    paths = {"csv": root / "per_case_metrics.csv", "summary": root / "summary.json", "table": root / "results_table.md"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise_runs(rows, reference)
    timing = {
        r["name"]: {k: r.get(k) for k in ("train_seconds", "evaluate_seconds", "threads", "overrides")}
        for r in _records(root).values()
    }
    paths["summary"].write_text(json.dumps({"reference": reference, "groups": summary, "runs": timing}, indent=2))
    paths["table"].write_text(markdown_table(summary))
    return paths
