#!/usr/bin/env bash
# Tensor-parallel shards against plain writes, side by side (this machine is noisy: the
# configurations alternate within each round, so all see the same conditions). A size is
# the bytes one block moves, so GB/s compare directly with 1:1 at that size.
#
#   scripts/bench-tp.sh [rounds]          TCP on loopback (the host)
#   scripts/bench-tp.sh --rdma [rounds]   RDMA in ONE Soft-RoCE VM boot
#
# Env: BENCH_TP_SIZES (default 1K,4K,16K,64K,256K), BENCH_TP_CONFIGS (default
# "1:1 2:1 1:2 4:2 2:1/NHD:16 1:2/NHD:16"), BENCH_TP_DURATION (seconds, default 1),
# BENCH_TP_ARGS (more bench arguments, e.g. --contiguous), BENCH_TP_TAG (JSON name prefix).
# Build first (napi build --release + npm run build:ts). JSON goes to bench-out/tp/.
set -euo pipefail
cd "$(dirname "$0")/.."
rdma=0
if [[ ${1:-} == --rdma ]]; then rdma=1; shift; fi
rounds=${1:-2}
sizes=${BENCH_TP_SIZES:-1K,4K,16K,64K,256K}
configs=${BENCH_TP_CONFIGS:-1:1 2:1 1:2 4:2 2:1/NHD:16 1:2/NHD:16}
duration=${BENCH_TP_DURATION:-1}
args=${BENCH_TP_ARGS:-}
tag=${BENCH_TP_TAG:-}
out=$PWD/bench-out/tp
mkdir -p "$out"

cat > "$out/.run.sh" <<INNER
#!/bin/bash
set -e
transport=\${1:-tcp}
extra=()
if [[ \$transport == rdma ]]; then
  export KVCACHE_RDMA_GID_INDEX=\$RXE_VM_GID_INDEX
  extra=(--rdma-dev \$RXE_VM_DEV --gid-index \$RXE_VM_GID_INDEX --perftest-iters 0 --layers 1)
fi
for r in \$(seq 1 $rounds); do
  for config in $configs; do
    tp=\${config%%/*}; layout=HND; [[ \$config == */* ]] && layout=\${config#*/}
    name=$tag\$transport-\${tp/:/to}-\${layout/:/}-\$r
    node lib/cli.js bench --transport \$transport --tp \$tp --block-layout \$layout --sizes $sizes \
      --duration $duration --stream-ms 0 --quiet $args "\${extra[@]}" --json "$out/\$name.json" > /dev/null
    echo "\$transport \$config round \$r: \$(node -e 'const r=require(process.argv[1]); console.log(r.results.map(x=>(x.blockBytes/1024)+"K "+x.gbps.toFixed(2)+" GB/s"+(x.verified.mismatches?" MISMATCH":"")).join(", "))' "$out/\$name.json")"
  done
done
INNER
chmod +x "$out/.run.sh"
if ((rdma)); then
  RXE_VM_TIMEOUT=${RXE_VM_TIMEOUT:-1800} bash scripts/rxe-vm/run-in-rxe-vm.sh bash "$out/.run.sh" rdma
else
  bash "$out/.run.sh" tcp
fi
