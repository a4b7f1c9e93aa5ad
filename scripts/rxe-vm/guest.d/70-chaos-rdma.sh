#!/usr/bin/env bash
# The chaos run (scripts/chaos/) over RDMA on Soft-RoCE (runs in the VM): 2 prefill x 2
# decode processes, a random one SIGKILLed and restarted every 1-4 s, every OK call checked
# on the decode side. Fails on a false success, a hang, an untyped failure or fd growth.
# The VM is slow (CPU ~5x, process start ~40x): timeouts are scaled, the kill interval is
# stretched by KVTRANSFER_CHAOS_KILL_SCALE so that processes come up between kills. The
# JSON report is kept in target/rxe-vm/chaos-rdma.json.
set -uo pipefail
export KVTRANSFER_TEST_TRANSPORT=rdma KVTRANSFER_TEST_HOST=${RXE_VM_IP:-127.0.0.1}
export KVTRANSFER_TEST_TIMEOUT_SCALE=${KVTRANSFER_TEST_TIMEOUT_SCALE:-5}
k=${KVTRANSFER_CHAOS_KILL_SCALE:-1}
mkdir -p target/rxe-vm
exec scripts/chaos.sh --seconds "${KVTRANSFER_CHAOS_SECONDS:-60}" --kill-min-ms $((1000 * k)) --kill-max-ms $((4000 * k)) \
  --json target/rxe-vm/chaos-rdma.json
