#!/usr/bin/env bash
# Create (once) the model zoo's premerge environment for this bundle: Python 3.10 with exactly the pins of
# configs/metadata.json, written and installed the way the zoo's CI does it (ci/get_bundle_requirements.py, then
# `pip install --pre -r`): `monai==<monai_version>`, `torch==<pytorch_version>`, `numpy==<numpy_version>` and
# `<name>==<version>` for each entry of `required_packages_version`, plus the two tools the zoo's requirements-dev.txt
# brings for its checks (jsonschema, pyyaml). Nothing else is installed, so a package the bundle imports without
# declaring it fails the tests run in this environment (tests/test_zoo_premerge.py), as it would fail the zoo's.
#
#   scripts/setup_zoo_env.sh        # from any directory; a no-op when the venv holds exactly these pins
#
# The registry's torch for Python 3.10 is a CUDA build (several GB; it runs on the CPU). Kept across runs in
# CPCL_ZOO_VENV (default $HOME/.cache/cpcl/venv-zoo-py310); PYTHON310 names the interpreter (default: python3.10,
# or pyenv's 3.10 when the shim has none selected).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CPCL_ZOO_VENV:-$HOME/.cache/cpcl/venv-zoo-py310}"
PY="$VENV/bin/python"

find_python310() {
    local candidate
    for candidate in "${PYTHON310:-}" python3.10 "$(pyenv root 2>/dev/null)/versions/"3.10*/bin/python; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
            command -v "$candidate" || echo "$candidate"
            return 0
        fi
    done
    echo "[setup_zoo_env] no Python 3.10 found (set PYTHON310 to one)" >&2
    return 1
}

start=$(date +%s)
wanted="$(mktemp)"
trap 'rm -f "$wanted"' EXIT
# the zoo's requirements file, from the metadata
python3 - "$ROOT/configs/metadata.json" >"$wanted" <<'EOF'
import json
import sys

meta = json.load(open(sys.argv[1]))
lines = [f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
for key in ("optional_packages_version", "required_packages_version"):
    for name, version in meta.get(key, {}).items():
        version = version.strip()
        lines.append(f"{name}{version}" if version[0] in "<>=" else f"{name}=={version}")
print("\n".join(lines))
EOF

# every pin installed at exactly its version (not `pip check`: pip 26.3's fails on itk 5.4.7's wheel tags)
pins_hold() {
    "$PY" - "$wanted" <<'EOF'
import importlib.metadata as m
import sys

wrong = []
for line in open(sys.argv[1]).read().split():
    name, _, version = line.partition("==")
    try:
        found = m.version(name).split("+")[0]
    except m.PackageNotFoundError:
        found = "missing"
    if version and found != version:
        wrong.append(f"{name} {found} (pinned {version})")
if wrong:
    sys.exit("[setup_zoo_env] not as pinned: " + ", ".join(wrong))
EOF
}

# what the zoo's requirements-dev.txt adds for its scripts (verify_metadata, large_files.yml), never moving a pin
TOOLS=(jsonschema pyyaml)
TOOL_IMPORTS="import jsonschema, yaml"

if [ -x "$PY" ] && cmp -s "$wanted" "$VENV/zoo-requirements.txt" && pins_hold >/dev/null 2>&1 \
    && "$PY" -c "$TOOL_IMPORTS" >/dev/null 2>&1; then
    echo "[setup_zoo_env] $VENV is ready ($("$PY" --version), pins of configs/metadata.json); nothing to do"
    exit 0
fi

if [ ! -x "$PY" ]; then
    python310="$(find_python310)"
    echo "[setup_zoo_env] creating $VENV with $("$python310" --version 2>&1)"
    "$python310" -m venv "$VENV"
fi
echo "[setup_zoo_env] installing the metadata pins: $(tr '\n' ' ' <"$wanted")"
"$PY" -m pip install --no-input --pre -r "$wanted"
"$PY" -m pip install --no-input -c "$wanted" "${TOOLS[@]}"
pins_hold
cp "$wanted" "$VENV/zoo-requirements.txt"
echo "[setup_zoo_env] done: $VENV ($(du -sh "$VENV" 2>/dev/null | cut -f1)) in $(($(date +%s) - start)) s"
