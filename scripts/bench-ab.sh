#!/usr/bin/env bash
# Side-by-side A/B of two builds of kvtransfer on this machine (it is noisy: runs alternate,
# so both builds see the same conditions). Each build must be built already
# (napi build --release + tsc: lib/ and the .node in place).
#
#   scripts/bench-ab.sh A_DIR B_DIR [rounds]          TCP grid + JS call overhead, host
#   scripts/bench-ab.sh --rdma A_DIR B_DIR [rounds]   RDMA grid in ONE Soft-RoCE VM boot
#
# Prints one line per run (build, round, figures) and keeps the JSON in bench-out/ab/.
set -euo pipefail
cd "$(dirname "$0")/.."
rdma=0
if [[ ${1:-} == --rdma ]]; then rdma=1; shift; fi
a=$(cd "${1:?A_DIR}" && pwd); b=$(cd "${2:?B_DIR}" && pwd); rounds=${3:-3}
out=$PWD/bench-out/ab
mkdir -p "$out"

if ((rdma)); then
  cat > "$out/.guest.sh" <<INNER
#!/bin/bash
set -e
export KVCACHE_RDMA_GID_INDEX=\$RXE_VM_GID_INDEX
for r in \$(seq 1 $rounds); do
  for side in a b; do
    dir=\$([ \$side = a ] && echo "$a" || echo "$b")
    (cd "\$dir" && node lib/cli.js bench --transport rdma --rdma-dev \$RXE_VM_DEV --gid-index \$RXE_VM_GID_INDEX \
      --sizes 1K,4K,64K --duration 2 --layers 1 --stream-ms 0 --perftest-iters 0 --quiet \
      --json "$out/rdma-\$side-\$r.json" > /dev/null)
    echo "rdma \$side round \$r: \$(node -e 'const r=require(process.argv[1]); console.log(r.results.map(x=>(x.blockBytes/1024)+"K "+(x.blocksPerSec/1e3).toFixed(1)+"k blocks/s "+x.gbps.toFixed(2)+" GB/s").join(", "))' "$out/rdma-\$side-\$r.json")"
  done
done
INNER
  RXE_VM_TIMEOUT=${RXE_VM_TIMEOUT:-1800} bash scripts/rxe-vm/run-in-rxe-vm.sh bash "$out/.guest.sh"
  exit 0
fi

summary='const r=require(process.argv[1]); console.log(r.results.map(x=>(x.blockBytes/1024)+"K "+x.gbps.toFixed(2)+" GB/s").join(", "))'
for r in $(seq 1 "$rounds"); do
  for side in a b; do
    dir=$([ $side = a ] && echo "$a" || echo "$b")
    (cd "$dir" && node lib/cli.js bench --sizes 1K,4K,64K,256K --duration 2 --stream-ms 0 --quiet \
      --json "$out/tcp-$side-$r.json" > /dev/null)
    echo "tcp $side round $r: $(node -e "$summary" "$out/tcp-$side-$r.json")"
    (cd "$dir" && node lib/cli.js bench --overhead --quiet --json "$out/overhead-$side-$r.json" > /dev/null)
    echo "overhead $side round $r: $(node -e 'const r=require(process.argv[1]); console.log(r.rows.map(x=>x.case+" "+x.medianUs.toFixed(2)+" µs").join("; "))' "$out/overhead-$side-$r.json")"
  done
done
