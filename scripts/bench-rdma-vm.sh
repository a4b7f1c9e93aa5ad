#!/usr/bin/env bash
# RDMA measurements of docs/performance.md inside the Soft-RoCE VM (root; see
# scripts/rxe-vm/run-in-rxe-vm.sh): the scattered grid, contiguous 1 KiB and 2 calls in
# flight, each size right after its ib_write_bw reference. Outputs: bench-out/rdma-vm*.
# Build first (npx napi build --platform --release ... && npx tsc -p tsconfig.json).
# Extra env for side-by-side runs: KVCACHE_RDMA_TUNING="chain=N,sq=N,spins=N",
# KVCACHE_RDMA_QPS_PER_PEER=N (written into the generated guest script below: the guest
# does not inherit this shell's environment).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-out
cat > bench-out/.rdma-vm-run.sh <<INNER
#!/bin/bash
set -e
cd "$PWD"
export KVCACHE_RDMA_GID_INDEX=\$RXE_VM_GID_INDEX
${KVCACHE_RDMA_TUNING:+export KVCACHE_RDMA_TUNING='$KVCACHE_RDMA_TUNING'}
${KVCACHE_RDMA_QPS_PER_PEER:+export KVCACHE_RDMA_QPS_PER_PEER='$KVCACHE_RDMA_QPS_PER_PEER'}
B="node lib/cli.js bench --transport rdma --rdma-dev \$RXE_VM_DEV --gid-index \$RXE_VM_GID_INDEX --duration 3 --layers 1 --stream-ms 0 --quiet"
\$B --sizes 1K,4K,16K,64K,256K --json bench-out/rdma-vm.json --svg bench-out/rdma-vm.svg | tee bench-out/rdma-vm.txt
\$B --sizes 1K --pattern contiguous --json bench-out/rdma-vm-contig.json | tee bench-out/rdma-vm-contig.txt
\$B --sizes 1K,4K --concurrency 2 --json bench-out/rdma-vm-c2.json | tee bench-out/rdma-vm-c2.txt
INNER
RXE_VM_TIMEOUT=${RXE_VM_TIMEOUT:-1800} bash scripts/rxe-vm/run-in-rxe-vm.sh bash bench-out/.rdma-vm-run.sh
