#!/usr/bin/env bash
# The ava suite across two real processes with transport 'rdma' on Soft-RoCE (runs in the
# VM: CPU ~5x and process start ~40x slower, hence the timeout scale). The full TAP output
# is kept in target/rxe-vm/ava-rdma.tap (the repository is shared with the host).
set -uo pipefail
export KVTRANSFER_TEST_TRANSPORT=rdma KVTRANSFER_TEST_HOST=${RXE_VM_IP:-127.0.0.1}
export KVTRANSFER_TEST_TIMEOUT_SCALE=${KVTRANSFER_TEST_TIMEOUT_SCALE:-20}
# The soak test's reduced run, reduced further for the slow VM.
export KVTRANSFER_SOAK_CALLS=${KVTRANSFER_SOAK_CALLS:-3000} KVTRANSFER_SOAK_CYCLES=${KVTRANSFER_SOAK_CYCLES:-6}
tap=target/rxe-vm/ava-rdma.tap
mkdir -p "$(dirname "$tap")"
# KVTRANSFER_AVA_FILES (host env, passed into the guest): spec files to run (default all).
# shellcheck disable=SC2086
npx ava --tap --timeout=20m ${KVTRANSFER_AVA_FILES:-} 2>&1 | tee "$tap" | grep -E '^(ok|not ok|# )'
rc=${PIPESTATUS[0]}
p=$(awk '/^# pass/ {print $3}' "$tap"); f=$(awk '/^# fail/ {print $3}' "$tap")
echo "ava over rdma: ${p:-0} passed, ${f:-0} failed (full output: $tap)"
[[ $rc == 0 && -n ${p:-} ]]
