#!/usr/bin/env bash
# Soak test (scripts/soak.ts): 10^5 small writeCache calls over >= 50 connect/close
# cycles by default, checking RSS, file descriptors, threads and live engine resources.
# Args pass through, e.g. `scripts/soak.sh --calls 5000 --cycles 10`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec node --expose-gc --import @oxc-node/core/register scripts/soak.ts "$@"
