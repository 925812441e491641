#!/usr/bin/env bash
# The CPU demo: creates the environment if needed, trains sCT on Fashion-MNIST (or bundled digits), writes
# 1- and 2-step sample grids under runs/demo_cpu/samples/. Extra arguments are config overrides (key=value).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
exec "$PY" -m sct.train --config configs/demo_cpu.yaml "$@"
