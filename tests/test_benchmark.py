# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The benchmark: the grid, the commands, paired t-tests, the paper's table, and a tiny real grid that is
skipped when run again."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fire.parser import DefaultParseValue
from scipy import stats

from cpcl_tools import benchmark
from cpcl_tools.benchmark import Run, bundle_command, markdown_table, paired_tests, plan, summarise_runs

ROOT = Path(__file__).resolve().parents[1]


def test_plan_is_the_grid_plus_the_upper_bound():
    runs = plan(["supervised", "cpcl"], [0.1, 0.05], [0, 1])
    assert len(runs) == 2 * 2 * 2 + 2 and len({r.name for r in runs}) == len(runs)
    assert Run("cpcl", 0.1, 0) in runs and Run("supervised", 1.0, 1) in runs
    assert Run("cpcl", 0.1, 0).name == "cpcl_10pct_seed0" and Run("mt", 0.025, 2).name == "mt_2.5pct_seed2"
    assert len(plan(["supervised"], [1.0], [0])) == 1  # no duplicate upper bound
    with pytest.raises(ValueError, match="nosuch"):
        plan(["cpcl", "nosuch"], [0.1], [0])
    with pytest.raises(ValueError, match="ratios"):
        plan(["cpcl"], [0.0], [0])
    counted = plan(["supervised", "cpcl"], [], [0], labeled=[8, 16])
    assert [r.name for r in counted] == [
        "supervised_8lab_seed0",
        "cpcl_8lab_seed0",
        "supervised_16lab_seed0",
        "cpcl_16lab_seed0",
        "supervised_100pct_seed0",
    ]
    with pytest.raises(ValueError, match="at least 1"):
        plan(["cpcl"], [], [0], labeled=[0])


def test_runs_set_their_method_and_label_amount():
    assert Run("cpcl_released", 0.1, 3).overrides() == {
        "method": "cpcl_released",
        "labeled_ratio": 0.1,
        "num_labeled": None,
        "seed": 3,
    }
    assert Run("mt", 0.2, 0).overrides() == {"method": "mt", "labeled_ratio": 0.2, "num_labeled": None, "seed": 0}
    # a number of labeled cases (the Left Atrium literature's 8 / 16) clears the ratio, and a preset's count
    assert Run("mt", None, 1, 8).overrides() == {"method": "mt", "labeled_ratio": None, "num_labeled": 8, "seed": 1}
    # every registered method, the released code and the baselines included, is a grid entry by its name
    from cpcl_bundle.methods import METHODS

    assert [r.method for r in plan(sorted(METHODS), [0.1], [0], full_supervised=False)] == sorted(METHODS)


def test_commands_round_trip_through_the_bundle_cli():
    overrides = {
        "patch_size": [32, 32, 32],
        "prototype_grad": False,
        "labeled_ratio": 0.1,
        "seed": 2,
        "dataset_dir": "/data/my kits",
        "overrides_dict": {"a": 1},
    }
    cmd = bundle_command(["configs/train.json", "configs/evaluate.json"], overrides)
    assert cmd[1:4] == ["-m", "monai.bundle", "run"] and cmd[4] == "--config_file"
    assert DefaultParseValue(cmd[5]) == ["configs/train.json", "configs/evaluate.json"]
    parsed = {cmd[i][2:]: DefaultParseValue(cmd[i + 1]) for i in range(6, len(cmd), 2)}
    assert parsed == overrides  # python-fire gives back the same types (a bool stays a bool)
    assert bundle_command(["configs/train.json"], {}, "training")[4:] == [
        "training",
        "--config_file",
        "configs/train.json",
    ]


def _rows(effect=0.05, n=12, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.6, 0.9, n)
    rows = []
    for method, ratio, shift, noise in (
        ("supervised", 0.1, 0.0, 0.01),
        ("cpcl", 0.1, effect, 0.01),
        ("mt", 0.1, effect, 0.03),
        ("supervised", 1.0, effect + 0.02, 0.01),
    ):
        for s in (0, 1):
            for i in range(n):
                dice = float(base[i] + shift + rng.normal(0, noise))
                rows.append(
                    {
                        "run": f"{method}_{ratio}_{s}",
                        "method": method,
                        "ratio": ratio,
                        "seed": s,
                        "case": f"case_{i:02d}",
                        "dice": dice,
                        "jaccard": dice / (2 - dice),
                        "hd95_mm": 20 * (1 - dice),
                        "asd_mm": math.nan if i == 0 else 3 * (1 - dice),
                    }
                )
    return rows


def test_paired_t_test_matches_scipy_on_seed_averaged_cases():
    rows = _rows()
    p, pairs = paired_tests(rows, "supervised", 0.1, ("cpcl", 0.1), "dice")
    sup = [
        np.mean([r["dice"] for r in rows if (r["method"], r["ratio"], r["case"]) == ("supervised", 0.1, c)])
        for c in sorted({r["case"] for r in rows})
    ]
    ref = [
        np.mean([r["dice"] for r in rows if (r["method"], r["ratio"], r["case"]) == ("cpcl", 0.1, c)])
        for c in sorted({r["case"] for r in rows})
    ]
    assert pairs == 12 and p == pytest.approx(stats.ttest_rel(sup, ref).pvalue)
    assert paired_tests(rows, "supervised", 0.1, ("cpcl", 0.1), "asd_mm")[1] == 11  # NaN cases left out
    assert math.isnan(paired_tests(rows, "nosuch", 0.1, ("cpcl", 0.1), "dice")[0])


def test_summary_and_table_in_the_papers_layout():
    summary = summarise_runs(_rows())
    by = {(e["method"], e["ratio"]): e for e in summary}
    assert by[("cpcl", 0.1)]["compared_with"] is None
    assert by[("supervised", 1.0)]["compared_with"] == {"method": "cpcl", "ratio": 0.1}
    assert by[("supervised", 0.1)]["dice"]["p_value"] < 0.05 and by[("supervised", 0.1)]["dice"]["num_cases"] == 12
    assert len(by[("mt", 0.1)]["dice"]["seed_means"]) == 2 and by[("mt", 0.1)]["asd_mm"]["num_undefined"] == 1
    table = markdown_table(summary).splitlines()
    assert table[0].startswith("| method | labeled | Dice (%)") and len(table) == 2 + 4
    assert table[2].startswith("| supervised | 100% |")  # the upper bound first, then the ratio's block
    rows = {line.split(" | ")[0][2:]: line for line in table[3:]}
    sup = rows["supervised"].split(" | ")
    assert sup[2].endswith("*")  # significantly different from CPCL
    cpcl = rows["cpcl"].split(" | ")
    assert "*" not in rows["cpcl"]
    dice_means = {m: float(rows[m].split(" | ")[2].strip("*").split(" ")[0]) for m in rows}
    best = max(dice_means, key=dice_means.get)
    assert rows[best].split(" | ")[2].startswith("**") and not sup[2].startswith("**")
    hd = {m: float(rows[m].split(" | ")[4].strip("*").split(" ")[0]) for m in rows}
    assert rows[min(hd, key=hd.get)].split(" | ")[4].startswith("**")  # lower is better for distances
    assert cpcl[
        2
    ] == f"{100 * by[('cpcl', 0.1)]['dice']['mean']:.2f} ({100 * by[('cpcl', 0.1)]['dice']['std']:.2f})" or cpcl[
        2
    ].startswith(
        "**"
    )


@pytest.fixture(scope="module")
def tiny_benchmark(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # supervised at a ratio, CPCL at a number of labeled cases (3 of the 6 = the same 50 %), with a preset file
    runs = [Run("supervised", 0.5, 0), Run("cpcl", None, 0, 3)]
    preset = out / "preset.json"
    preset.write_text(json.dumps({"labeled_sampling": "uniform"}))
    common = {
        "dataset_dir": str(tiny_dataset),
        "max_iterations": 2,
        "iterations_per_epoch": 1,
        "val_interval": 1,
        "map_interval": 1,
        "patch_size": [32, 32, 32],
        "sw_roi_size": [32, 32, 32],
        "cache_workers": 1,
    }
    records = benchmark.run_grid(runs, out, common, 2, ROOT / "configs", jobs=2, threads=1, presets=[str(preset)])
    return out, runs, records


def test_tiny_grid_trains_evaluates_and_reports(tiny_benchmark, tiny_dataset):
    out, runs, records = tiny_benchmark
    assert [r["name"] for r in records] == [r.name for r in runs]
    for run, record in zip(runs, records):
        folder = out / "runs" / run.name
        assert (folder / "models" / "model.pt").is_file() and record["train_seconds"] > 0
        assert record["overrides"]["method"] == run.method and record["ratio"] == 0.5
        assert (
            record["overrides"]["labeled_ratio"] == run.ratio and record["overrides"]["num_labeled"] == run.num_labeled
        )
        files = [c[c.index("--config_file") + 1] for c in (record["train_command"], record["evaluate_command"])]
        assert record["presets"] == [str(out / "preset.json")] and all(str(out / "preset.json") in f for f in files)
        with open(folder / "test" / "metrics.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == 2
        assert len(list((folder / "test" / "predictions").glob("*_seg.nii.gz"))) == 2
    assert json.loads((out / "runs" / "cpcl_3lab_seed0" / "eval" / "split.json").read_text())["num_labeled"] == 3
    assert any((out / "runs" / "cpcl_3lab_seed0" / "eval" / "prototype_maps").glob("*.npz"))
    paths = benchmark.write_reports(out)
    summary = json.loads(paths["summary"].read_text())
    assert {(g["method"], g["ratio"]) for g in summary["groups"]} == {("supervised", 0.5), ("cpcl", 0.5)}
    assert set(summary["runs"]) == {r.name for r in runs}
    table = paths["table"].read_text()
    assert "| cpcl | 3 (50%) |" in table and "| supervised | 50% |" in table
    with open(paths["csv"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_finished_runs_are_skipped(tiny_benchmark, monkeypatch):
    out, runs, records = tiny_benchmark
    before = {r.name: (out / "runs" / r.name / "run.json").read_text() for r in runs}

    def no_process(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    again = benchmark.run_grid(runs, out, {}, 2, ROOT / "configs", jobs=2)
    assert again == records
    assert before == {r.name: (out / "runs" / r.name / "run.json").read_text() for r in runs}


def test_benchmark_script_reports_with_figures(tiny_benchmark, tiny_dataset):
    out, runs, _ = tiny_benchmark
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "report",
            "--output_dir",
            str(out),
            "--dataset_dir",
            str(tiny_dataset),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = out / "figures"
    for name in ("dice_boxplot.png", "training_curves.png", "overlays.png", "fig6_cpcl_3lab_seed0.png"):
        assert (figures / name).stat().st_size > 5000, name
    assert "| method | labeled |" in proc.stdout


def test_script_reads_command_line_values_as_a_user_types_them():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark as script
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert script.as_bool("false", "x") is False and script.as_bool("True", "x") is True
    with pytest.raises(ValueError, match="true or false"):
        script.as_bool("maybe", "full_supervised")
    assert (
        script._list("cpcl") == ["cpcl"] and script._list(0) == [0] and script._list(("mt", "cpcl")) == ["mt", "cpcl"]
    )


def test_a_cleared_setting_reaches_the_bundle_over_a_presets_value():
    """``monai.bundle run`` drops overrides whose value is None, so a full-supervision run with the la2018 preset
    (``num_labeled`` 16) once trained on 16 cases: None travels as the expression ``$None``."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import update_kwargs

    cmd = bundle_command(["configs/train.json"], Run("supervised", 1.0, 0).overrides())
    value = cmd[cmd.index("--num_labeled") + 1]
    assert value == "$None" and update_kwargs(num_labeled=None) == {}  # the trap, and the way around it
    root = Path(__file__).resolve().parents[1]
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "train.json"), str(root / "configs" / "presets" / "la2018.json")])
    assert parser.get_parsed_content("num_labeled") == 16
    parser.update({"num_labeled": DefaultParseValue(value), "labeled_ratio": 1.0})
    assert parser.get_parsed_content("num_labeled") is None


def test_multiclass_runs_get_a_table_per_class(tmp_path):
    """Runs evaluated with three classes: collect() reads the per-class columns, summarise_runs() tests each
    against CPCL, and the table has the mean block then one block per class with that class's numbers."""
    from cpcl_bundle.evaluation import metric_columns
    from cpcl_tools.benchmark import collect, markdown_table, metrics_in, summarise_runs

    columns = metric_columns(["background", "kidney", "tumour"])
    rng = np.random.default_rng(0)
    for method, shift in (("cpcl", 0.0), ("supervised", -0.1)):
        folder = tmp_path / "runs" / f"{method}_10pct_seed0"
        (folder / "test").mkdir(parents=True)
        record = {"name": folder.name, "method": method, "ratio": 0.1, "seed": 0}
        (folder / "run.json").write_text(json.dumps(record))
        with open(folder / "test" / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["case", *columns])
            writer.writeheader()
            for case in range(6):
                row = {c: rng.uniform(0.5, 0.9) + (shift if c.startswith("dice_tumour") else 0.0) for c in columns}
                writer.writerow({"case": f"case_{case}", **row})
    rows = collect(tmp_path)
    assert metrics_in(rows) == columns and len(rows) == 12
    summary = summarise_runs(rows)
    supervised = next(e for e in summary if e["method"] == "supervised")
    tumour = [r["dice_tumour"] for r in rows if r["method"] == "supervised"]
    assert supervised["dice_tumour"]["mean"] == pytest.approx(float(np.mean(tumour)))
    assert 0 <= supervised["dice_tumour"]["p_value"] <= 1 and supervised["dice_tumour"]["num_pairs"] == 6
    table = markdown_table(summary)
    assert table.startswith("Mean over the foreground classes:") and "#### kidney" in table and "#### tumour" in table
    tumour_block = table.split("#### tumour")[1]
    assert f"{100 * supervised['dice_tumour']['mean']:.2f}" in tumour_block
    assert f"{100 * supervised['dice_tumour']['mean']:.2f}" not in table.split("#### kidney")[0]
