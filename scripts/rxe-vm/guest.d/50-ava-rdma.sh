#!/usr/bin/env bash
# The ava suite across two real processes with transport 'rdma' on Soft-RoCE (runs in the
# VM: CPU ~5x and process start ~40x slower, hence the timeout scale).
set -uo pipefail
export KVTRANSFER_TEST_TRANSPORT=rdma KVTRANSFER_TEST_HOST=${RXE_VM_IP:-127.0.0.1}
export KVTRANSFER_TEST_TIMEOUT_SCALE=${KVTRANSFER_TEST_TIMEOUT_SCALE:-20}
npx ava --tap --timeout=20m 2>&1 | tee /tmp/ava-rdma.tap | grep -E '^(not ok|# )'
rc=${PIPESTATUS[0]}
p=$(awk '/^# pass/ {print $3}' /tmp/ava-rdma.tap); f=$(awk '/^# fail/ {print $3}' /tmp/ava-rdma.tap)
echo "ava over rdma: ${p:-0} passed, ${f:-0} failed"
[[ $rc == 0 && -n ${p:-} ]]
