#!/usr/bin/env bash
# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
#
# The GPU check: one command on one GPU machine that has torch with CUDA and no internet, at most 9 minutes on an H100.
#
#   python scripts/pack_device.py pack --source_dir ../shared/data/la2018   # here, once: fills .device/ (git-ignored)
#   bash scripts/device_check.sh                                             # there, with .device/ carried along
#   bash scripts/device_check.sh --dry-run                                   # here: the same steps on the CPU, tiny
#
# It installs the carried wheels (pip --no-index), unpacks the 80 Left Atrium cases, and prints
#   1. the step table of every method at 112x112x80 with AMP (scripts/bench_step.py: step time, peak memory);
#   2. the loaders' throughput against CPCL's step (scripts/bench_loader.py);
#   3. CPCL with 8 labeled cases at the literature's protocol (la2018 preset: 0.625 mm, 112x112x80, batch 2 + 2,
#      6,000-step schedule) for as many steps as the time allows (the bundle's time_limit), evaluated on the 20
#      held-out cases.
# Everything printed is also in $OUT/device_check.log; tables and results are files in $OUT (a temporary folder when
# OUT is not set): the eight files the device tool brings back. CPCL_CHECK_SECONDS (default 540) is the whole check's
# budget. With the device tool: run(command="bash scripts/device_check.sh", carry=[".device"], timeout_s=600).
# The dry run packs synthetic LA-like cases (no wheels, no real data) and runs on the CPU at 32^3 with a narrow U-Net,
# 1 step per method and 6 training steps; it is a test (tests/test_device_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; elif [[ $# -gt 0 ]]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
BUDGET=${CPCL_CHECK_SECONDS:-540}
START=$SECONDS
OUT=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # on the GPU machine, python3 is the interpreter that holds torch
left() { echo $((BUDGET - (SECONDS - START))); }
stage() { printf '\n== [%d s] %s\n' $((SECONDS - START)) "$*"; }
fail() { echo "device_check: $*" >&2; exit 1; }

if [[ $DRY == 1 ]]; then
    CARRY=$WORK/carry DEVICE=cpu PATCH="32 32 32" LABELED=2 MAX_ITERATIONS=6 RESERVE=0 WORKERS=1
    BENCH="--steps 1 --warmup 0 --features [4,4,8,8,16,4] --isolate false"
    LA="'pixdim': [2.5,2.5,2.5], 'patch_size': [32,32,32], 'sw_roi_size': [32,32,32], 'iterations_per_epoch': 3"
    LA+=", 'val_interval': 1, 'cache_workers': 1, 'evaluate_list': 'validation', 'network_def#features': [4,4,8,8,16,4]"
    stage "dry run: synthetic LA-like cases, packed as the real ones are"
    "$PY" scripts/pack_device.py synthetic --source_dir "$WORK/raw" --cases 10 || fail "synthetic cases"
    "$PY" scripts/pack_device.py pack --source_dir "$WORK/raw" --folder "$CARRY" --wheels false --holdout 4 ||
        fail "packing"
else
    CARRY=${CPCL_CARRY:-.device} DEVICE=cuda PATCH="112 112 80" BENCH="--steps 5 --warmup 2" LABELED=8 WORKERS=4
    MAX_ITERATIONS=6000 RESERVE=120
    LA="'evaluate_list': 'validation'"
    [[ -d "$CARRY/wheels" ]] || fail "$CARRY/wheels does not exist: run scripts/pack_device.py pack here first"
    stage "installing the carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl || fail "pip install from $CARRY/wheels"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage "environment"
"$PY" - <<'EOF' || fail "torch or monai does not import"
import torch, monai, ignite
from cpcl_bundle.precision import amp_dtype, cpu_has_bf16, describe
dev = "cuda" if torch.cuda.is_available() else "cpu"
name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU" + (" with bf16" if cpu_has_bf16() else " without bf16")
amp = describe(amp_dtype(dev, True))
print(f"torch {torch.__version__}, monai {monai.__version__}, ignite {ignite.__version__}; {name}; amp -> {amp}")
EOF

stage "unpacking the Left Atrium cases"
"$PY" scripts/pack_device.py unpack --folder "$CARRY" --dataset_dir "$WORK/la2018" --workers 8 || fail "unpacking"

stage "1. one training step of every method, $PATCH, amp ($(left) s left)"
# shellcheck disable=SC2086  # PATCH and BENCH are word lists on purpose
timeout $(($(left) - RESERVE - 60)) "$PY" scripts/bench_step.py --device $DEVICE --amp true --patch $PATCH $BENCH \
    --output "$OUT/steps.json" || echo "device_check: the step table did not finish"
CPCL_STEP=$("$PY" - "$OUT/steps.json" 2>/dev/null <<'EOF' || echo 0.1
import json, sys
print(next(row["median_s"] for row in json.load(open(sys.argv[1])) if row["variant"] == "cpcl"))
EOF
)

stage "2. the loaders against CPCL's ${CPCL_STEP} s step ($(left) s left)"
timeout $(($(left) - RESERVE - 30)) "$PY" scripts/bench_loader.py --presets la2018 --dataset_dir "$WORK/la2018" \
    --overrides "{'num_labeled': $LABELED, $LA}" --device $DEVICE --workers $WORKERS --steps 30 \
    --step_seconds "$CPCL_STEP" \
    --output "$OUT/loaders.json" || echo "device_check: the loader measurement did not finish"

LIMIT=$(($(left) - RESERVE))
[[ $DRY == 1 ]] && LIMIT=600
stage "3. CPCL, $LABELED labeled cases, up to $MAX_ITERATIONS steps or ${LIMIT} s of training, then evaluation"
"$PY" scripts/benchmark.py run --output_dir "$WORK/la_bench" --presets la2018 --methods "[cpcl]" --ratios "[]" \
    --labeled "[$LABELED]" --seeds "[0]" --full_supervised false --jobs 1 --dataset_dir "$WORK/la2018" \
    --max_iterations "$MAX_ITERATIONS" --overrides "{'amp': True, 'time_limit': $LIMIT, $LA}" ||
    fail "the CPCL run failed (its logs: $WORK/la_bench/runs)"

stage "summary"
RUN=$(ls -d "$WORK"/la_bench/runs/*/ | head -1)
cp "$WORK/la_bench/results_table.md" "$WORK/la_bench/per_case_metrics.csv" "$RUN/run.json" "$RUN/train.log" "$OUT/"
"$PY" - "$RUN" "$OUT" "$MAX_ITERATIONS" <<'EOF' || fail "no result to summarise"
import json, sys
from pathlib import Path
from cpcl_bundle.resume import latest_checkpoint
run, out, planned = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
record = json.loads((run / "run.json").read_text())
steps = int(latest_checkpoint(run / "eval" / "checkpoints").stem.rsplit("_", 1)[1])
rows = [r for r in (out / "per_case_metrics.csv").read_text().splitlines()[1:] if r]
header = (out / "per_case_metrics.csv").read_text().splitlines()[0].split(",")
dice = [float(r.split(",")[header.index("dice")]) for r in rows]
summary = {"steps": steps, "planned_steps": planned, "train_seconds": record["train_seconds"],
           "seconds_per_step": record["train_seconds"] / steps, "evaluate_seconds": record["evaluate_seconds"],
           "cases": len(dice), "mean_dice": sum(dice) / len(dice)}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"CPCL reached {steps} of {planned} steps in {record['train_seconds']:.0f} s "
      f"({summary['seconds_per_step']:.3f} s a step, loading and validation included); "
      f"Dice over {len(dice)} held-out cases: {100 * summary['mean_dice']:.2f} %")
EOF
echo "device_check: done in $((SECONDS - START)) s; files in $OUT"
