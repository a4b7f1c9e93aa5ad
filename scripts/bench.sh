#!/usr/bin/env bash
# Runs the measurements of docs/performance.md and leaves JSON/SVG/text in bench-out/.
# Usage: scripts/bench.sh [extra `kvtransfer bench` options, e.g. --transport rdma]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-out
npx tsc -p tsconfig.json
node lib/cli.js bench --pattern scattered --json bench-out/scattered.json --svg bench-out/scattered.svg "$@" | tee bench-out/scattered.txt
node lib/cli.js bench --pattern contiguous --json bench-out/contiguous.json --svg bench-out/contiguous.svg "$@" | tee bench-out/contiguous.txt
node lib/cli.js bench --overhead --json bench-out/overhead.json "$@" | tee bench-out/overhead.txt
cargo bench -p kvtransfer-engine --bench planning 2>&1 | tee bench-out/planning.txt | grep -E 'time:|^[0-9]+KiB' || true
