#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist (the demo's data, read by pipelines/arrays.py) where this shell may:
# as root with apt-get. Exits 0 when the dataset is there afterwards; otherwise 1 with the reason on stderr.
# Used by .ci/run (which needs it) and scripts/demo.sh (which falls back to scikit-learn's digits).
set -uo pipefail
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "Fashion-MNIST is not installed and this shell cannot install it (needs root and apt-get): sudo apt-get install dataset-fashion-mnist" >&2
  exit 1
fi
echo "installing Debian's dataset-fashion-mnist (apt-get, about 30 MB)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; then
  echo "apt-get could not install dataset-fashion-mnist (is a package source reachable?)" >&2
  exit 1
fi
