#!/usr/bin/env bash
# Create (once) the separate MONAI Label 0.8.5 environment `.venv-label` in the bundle root.
#
#   scripts/setup_monailabel.sh            # from any directory; a no-op when the venv already works
#
# MONAI Label downgrades numpy to 1.26.4 and needs a torchvision that loads, so it never goes into the
# bundle's own environment (see docs/monailabel.md and the recipe it follows). The recipe:
#   1. torch==2.14.1 torchvision==0.29.1 (a matched pair on local disk; the registry's torchvision 0.28
#      fails beside torch 2.13.0+cpu with "operator torchvision::nms does not exist"),
#   2. monailabel==0.8.5 with pydicom<3 / pynetdicom<3 (pydicom 3 breaks pydicom-seg) and
#      dicomweb-client[gcp]>=0.59.1,<0.60,
#   3. whatever the bundle's package `cpcl_bundle` imports that MONAI Label did not bring (the bundle is
#      imported inside the MONAI Label process); installed with the venv's current numpy/torch/monai held,
#   4. pip check.
# itk is not installed: the bundle only needs it for non-NIfTI images (MONAI falls back to nibabel for NIfTI).
#
# Environment: PYTHON (default python3) creates the venv; CPCL_LABEL_VENV (or VENV; default <bundle root>/.venv-label).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CPCL_LABEL_VENV:-${VENV:-$ROOT/.venv-label}}"
PYTHON="${PYTHON:-python3}"
PY="$VENV/bin/python"
# imported by MONAI Label itself (the recipe's check) and by the bundle's package and configs
CHECK_IMPORTS="import monailabel, torchvision, monai, ignite, numpy, scipy, nibabel, tqdm, fire, tensorboard"

start=$(date +%s)
step=$start
elapsed() {
    local now
    now=$(date +%s)
    echo "[setup_monailabel] $1: $((now - step)) s (total $((now - start)) s)"
    step=$now
}

if [ -x "$PY" ] && "$PY" -c "$CHECK_IMPORTS" >/dev/null 2>&1; then
    echo "[setup_monailabel] $VENV is ready (monailabel $("$PY" -c 'import monailabel; print(monailabel.__version__)')); nothing to do"
    exit 0
fi

if [ ! -x "$PY" ]; then
    echo "[setup_monailabel] creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
    elapsed "venv"
else
    echo "[setup_monailabel] $VENV exists but is incomplete: installing into it"
fi

PIP=("$PY" -m pip install --no-input)

# 1. the torch/torchvision pair first, so that nothing later pulls another build
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    "${PIP[@]}" torch==2.14.1 torchvision==0.29.1
    elapsed "torch 2.14.1 + torchvision 0.29.1"
fi

# 2. MONAI Label and its DICOM pins
if ! "$PY" -c "import monailabel" >/dev/null 2>&1; then
    "${PIP[@]}" monailabel==0.8.5 "pydicom<3" "pynetdicom<3" "dicomweb-client[gcp]>=0.59.1,<0.60"
    elapsed "monailabel 0.8.5"
fi

# 3. the bundle package's own imports, without moving numpy/torch/monai that MONAI Label settled on
missing=()
for spec in "scipy:scipy" "nibabel:nibabel" "ignite:pytorch-ignite" "tqdm:tqdm" "fire:fire" "tensorboard:tensorboard"; do
    module="${spec%%:*}"
    package="${spec#*:}"
    "$PY" -c "import $module" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    held="$(mktemp)"
    trap 'rm -f "$held"' EXIT
    "$PY" - >"$held" <<'EOF'
import importlib.metadata as m
for name in ("numpy", "torch", "torchvision", "monai", "monailabel"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
EOF
    echo "[setup_monailabel] bundle dependencies missing in the venv: ${missing[*]} (holding $(tr '\n' ' ' <"$held"))"
    "${PIP[@]}" -c "$held" "${missing[@]}"
    elapsed "bundle dependencies"
fi

# 4. consistency
"$PY" -m pip check
"$PY" -c "$CHECK_IMPORTS"
"$PY" - <<'EOF'
import importlib.metadata as m
print("[setup_monailabel] " + ", ".join(f"{n} {m.version(n)}" for n in
      ("monailabel", "monai", "torch", "torchvision", "numpy", "scipy", "nibabel", "pytorch-ignite")))
EOF
elapsed "pip check"
echo "[setup_monailabel] done: $VENV ($(du -sh "$VENV" 2>/dev/null | cut -f1)) in $(( $(date +%s) - start )) s"
