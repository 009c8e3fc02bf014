#!/usr/bin/env bash
# The model zoo's code-format job and pre-commit hooks on the bundle's tracked files, as the zoo runs them:
# black, isort, flake8 (settings in pyproject.toml and .flake8), then end-of-file-fixer, trailing-whitespace,
# check-yaml, check-toml, check-docstring-first, check-executables-have-shebangs, check-added-large-files
# (1 MB), detect-private-key, pretty-format-json (4 spaces, keys unsorted) and mixed-line-ending.
#
#   pip install -e ".[lint]" && bash scripts/lint.sh
#
# Exits 1 and names the files on the first failing check. The fixing hooks run on a copy, so the working
# tree is never changed; hooks that take text files skip binaries (figures) and the metadata.json symlink.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "lint: $1" >&2; exit 1; }

mapfile -t PY < <(git ls-files '*.py')
mapfile -t JSON < <(git ls-files '*.json' | while read -r f; do [ -L "$f" ] || echo "$f"; done)
mapfile -t FILES < <(git ls-files | while read -r f; do [ -L "$f" ] || echo "$f"; done)
mapfile -t TEXT < <(git grep -I --name-only -e '' -- "${FILES[@]}")
mapfile -t YAML < <(git ls-files '*.yml' '*.yaml')

black --check --quiet "${PY[@]}" || fail "black would reformat the files above (black .)"
isort --check-only --quiet "${PY[@]}" || fail "isort would reorder the imports above (isort .)"
flake8 "${PY[@]}" || fail "flake8 found the problems above"
check-docstring-first "${PY[@]}" || fail "a module-level string after the docstring (use #: comments for attributes)"
pretty-format-json --no-sort-keys --indent=4 "${JSON[@]}" || fail "JSON not in 4-space pretty form (the files above)"
check-toml pyproject.toml || fail "pyproject.toml does not parse"
if [ "${#YAML[@]}" -gt 0 ]; then check-yaml "${YAML[@]}" || fail "YAML does not parse"; fi
check-added-large-files --maxkb=1024 --enforce-all "${FILES[@]}" || fail "files over 1 MB"
detect-private-key "${FILES[@]}" || fail "a private key is committed"
# executables: the modes git records (this machine's file system may mark every file executable)
git -c core.fileMode=false ls-files -s | awk '$1 == "100755" {print $4}' | while read -r f; do
    head -c 2 "$f" | grep -q '#!' || fail "$f is executable but has no shebang"
done

# the fixing hooks, on a scratch copy of the text files: a change means the tracked file fails the hook
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for f in "${TEXT[@]}"; do mkdir -p "$scratch/$(dirname "$f")" && cp "$f" "$scratch/$f"; done
(
    cd "$scratch"
    end-of-file-fixer "${TEXT[@]}" || fail "files above do not end with exactly one newline"
    trailing-whitespace-fixer "${TEXT[@]}" || fail "trailing whitespace in the files above"
    mixed-line-ending "${TEXT[@]}" || fail "mixed line endings in the files above"
)
echo "lint: black, isort, flake8 and the zoo's pre-commit hooks pass on ${#FILES[@]} files"
