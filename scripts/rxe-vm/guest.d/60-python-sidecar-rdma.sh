#!/usr/bin/env bash
# The Python client's end-to-end tests with transport 'rdma' on Soft-RoCE (runs in the VM):
# workers own host KV caches in shared memory; prefill → sidecar A → RDMA → sidecar B →
# decode, byte for byte; killed workers and sidecars; a decode worker restarted warm (its
# regions registered again, the prefill's link taking the new keys). Skipped tests fail this
# hook: in the VM every test must run.
set -uo pipefail
export KVTRANSFER_TEST_TRANSPORT=rdma KVTRANSFER_TEST_HOST=${RXE_VM_IP:-127.0.0.1}
export KVTRANSFER_TEST_TIMEOUT_SCALE=${KVTRANSFER_TEST_TIMEOUT_SCALE:-20}
log=target/rxe-vm/python-sidecar-rdma.log
mkdir -p "$(dirname "$log")"
clients/python/run-tests.sh -k e2e 2>&1 | tee "$log" | grep -E '^(Ran|OK|FAILED|python client)|\.\.\. (ok|FAIL|ERROR|skipped)'
rc=${PIPESTATUS[0]}
if grep -q ' \.\.\. skipped' "$log"; then
  echo "python sidecar over rdma: tests were skipped in the VM"
  exit 1
fi
exit "$rc"
