# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""scripts/bench_step.py: patch sizes as the command line gives them, one variant's JSON line in each precision,
and the table that sets fp32 and mixed precision side by side."""

import json

import pytest

from cpcl_bundle.precision import cpu_has_bf16
from tests.helpers import load_script

bench_step = load_script("bench_step")


def test_patch_sizes_and_the_three_word_patch_argument():
    assert bench_step.patch_size(48) == (48, 48, 48)
    assert bench_step.patch_size([112, 112, 80]) == bench_step.patch_size("112,112,80") == (112, 112, 80)
    with pytest.raises(ValueError, match="multiples of 16 from 32"):
        bench_step.patch_size([112, 112, 72])
    assert bench_step.patch_argv(["--device", "cuda", "--patch", "112", "112", "80", "--amp", "true"]) == [
        "--device",
        "cuda",
        "--patch=[112,112,80]",
        "--amp",
        "true",
    ]
    assert bench_step.patch_argv(["--patch", "48", "--steps", "3"]) == ["--patch", "48", "--steps", "3"]


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")
def test_one_variant_in_each_precision_and_the_side_by_side_table(capsys):
    rows = []
    for amp in (False, True):
        bench_step.one(variant="cpcl", patch=[32, 32, 48], steps=1, warmup=0, amp=amp, features=[4, 4, 8, 8, 16, 4])
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert [r["precision"] for r in rows] == ["fp32", "bf16"] and rows[0]["patch"] == [32, 32, 48]
    rows += [dict(r, variant="mt", median_s=2 * r["median_s"]) for r in rows]
    rows.append({"variant": "prototypes", "patch": [32, 32, 48], "precision": "fp32", "median_s": 0.01, "peak_gb": 0.5})
    table = bench_step.table(rows, 1, 0, "cpu").splitlines()
    assert "32x32x48, cpu" in table[1]
    assert table[3].startswith("| variant | fp32 step (s) | fp32 peak (GB) | fp32 time / MT | bf16 step (s)")
    cpcl = table[5].split(" | ")
    assert cpcl[0] == "| cpcl" and cpcl[3] == cpcl[6] == "0.50"  # half of "mt" in both precisions
    assert cpcl[7] == f"**{rows[1]['median_s'] / rows[0]['median_s']:.2f}**"
    assert table[7].startswith("| prototypes | 0.010 | 0.50 | -") and table[7].endswith("% (of bf16) |")


def test_in_process_variants_leave_the_bundles_prototypes_in_place():
    """``--isolate false`` measures every variant in one process: the naive variant's prototypes must not leak
    into the next one, and a CPU peak that is not one variant's own is not reported."""
    from cpcl_bundle import losses

    exact = losses.masked_average_prototypes, losses.prototype_logits
    row = bench_step.measure("cpcl_naive", 32, steps=1, warmup=0, features=[4, 4, 8, 8, 16, 4], isolated=False)
    assert (losses.masked_average_prototypes, losses.prototype_logits) == exact
    assert row["variant"] == "cpcl_naive" and row["peak_gb"] is None and row["median_s"] > 0
    assert "| cpcl_naive |" in bench_step.table([row], 1, 0, "cpu") and "| - |" in bench_step.table([row], 1, 0, "cpu")
