#!/usr/bin/env bash
# Creates ./.venv with the pinned stack (torch 2.14.1 + torchvision 0.29.1, see pyproject.toml) if it is missing
# or stale, and installs sct in editable mode. Sourced by demo.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stamp="$root/.venv/.sct-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  python3 -m venv "$root/.venv"
  "$root/.venv/bin/pip" install -q --disable-pip-version-check -e "$root[dev]"
  touch "$stamp"
fi
export TORCH_EXTENSIONS_DIR="$root/.venv/torch_extensions"
PY="$root/.venv/bin/python"
