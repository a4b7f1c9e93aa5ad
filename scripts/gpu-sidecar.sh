#!/usr/bin/env bash
# The sidecar's GPU test (scripts/gpu-sidecar-test.py: PyTorch workers, NVLink and TCP,
# CUDA IPC and cuMem fds) on a GPU machine without Node.js: run scripts/gpu-carry.sh here,
# carry bench-out/gpu with the device tool, then run this there. Args pass through
# (e.g. --json "$OUT/gpu-sidecar.json").
set -euo pipefail
cd "$(dirname "$0")/.."
carry=bench-out/gpu
node=${KVTRANSFER_NODE:-/tmp/kvt-node}
if [[ ! -x $node ]]; then xz -dc "$carry/node.xz" > "$node"; chmod +x "$node"; fi
PYTHONPATH=clients/python exec python3 scripts/gpu-sidecar-test.py --node "$node" --cli "$carry/pkg/lib/cli.js" "$@"
