#!/usr/bin/env bash
# RDMA rails side by side in ONE boot of the Soft-RoCE VM (root; RXE_VM_RAILS=2: rxe0 on
# dummy0, rxe1 on dummy1): `bench --transport rdma` with one rail (KVCACHE_RDMA_NICS=rxe0),
# then two (rxe0+rxe1), same sizes, each printing the bytes per rail of its timed calls.
# Soft-RoCE is CPU-bound (TCG): a report, not a target. Outputs: bench-out/rails-vm-{1,2}.*
# Build first (npx napi build --platform --release ... && npm run build:ts).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-out
cat > bench-out/.rails-vm-run.sh <<INNER
#!/bin/bash
set -e
cd "$PWD"
unset KVCACHE_RDMA_GID_INDEX
B="node lib/cli.js bench --transport rdma --rdma-dev \$RXE_VM_DEV --gid-index \$RXE_VM_GID_INDEX --duration ${RAILS_BENCH_SECONDS:-3} --layers 1 --stream-ms 0 --quiet --sizes ${RAILS_BENCH_SIZES:-16K,64K,256K}"
KVCACHE_RDMA_NICS=\$RXE_VM_DEV \$B --json bench-out/rails-vm-1.json | tee bench-out/rails-vm-1.txt
KVCACHE_RDMA_NICS=\$RXE_VM_DEV+\$RXE_VM_DEV2 \$B --json bench-out/rails-vm-2.json | tee bench-out/rails-vm-2.txt
INNER
RXE_VM_RAILS=2 RXE_VM_TIMEOUT=${RXE_VM_TIMEOUT:-1200} bash scripts/rxe-vm/run-in-rxe-vm.sh bash bench-out/.rails-vm-run.sh
