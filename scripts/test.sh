#!/usr/bin/env bash
# The test suite: creates the environment if needed, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
exec "$PY" -m pytest -q "$@"
