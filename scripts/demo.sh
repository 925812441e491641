#!/usr/bin/env bash
# The CPU demo: creates the environment if needed, installs Fashion-MNIST where it may (scripts/fashion_mnist.sh),
# trains sCT on it (or on scikit-learn's bundled digits, announced on the console and in log.txt), and writes 1- and
# 2-step sample grids under runs/demo_cpu/samples/. Extra arguments are config overrides (key=value).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
if ! bash scripts/fashion_mnist.sh; then
  echo "demo: Fashion-MNIST is unavailable (the line above says why); the demo trains on scikit-learn's digits instead" >&2
fi
exec "$PY" -m sct.train --config configs/demo_cpu.yaml "$@"
