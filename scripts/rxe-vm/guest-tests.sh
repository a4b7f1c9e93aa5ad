#!/usr/bin/env bash
# guest-tests.sh LIST [EXTRA_CMDS_FILE] - runs INSIDE the Soft-RoCE VM (started
# by run-rdma-tests.sh through run-in-rxe-vm.sh, cwd = repository root).
#   LIST: lines "name<TAB>package-dir<TAB>executable" of test binaries.
# Runs each binary, then scripts/rxe-vm/guest.d/*.sh (executable ones, in
# order), then each line of EXTRA_CMDS_FILE and of $RDMA_EXTRA_CMDS.
# The RDMA tests are #[ignore]d (so a host without a device reports them as
# ignored, not passed): binaries whose name matches $RDMA_IGNORED_BINS (regex,
# default ^rdma_) run with --include-ignored here. Other ignored tests (GPU)
# stay ignored and are counted as skipped.
# Prints "rdma: N passed, N failed, N skipped" (test cases + hooks) and exits 1
# on failure.
set -uo pipefail
[[ -n ${RXE_VM:-} ]] || { echo "guest-tests.sh: run me through run-rdma-tests.sh" >&2; exit 2; }
list=$1 extra=${2:-}
root=$PWD
export KVTRANSFER_RDMA_DEVICE=$RXE_VM_DEV KVTRANSFER_GID_INDEX=$RXE_VM_GID_INDEX KVTRANSFER_RDMA_IP=$RXE_VM_IP
# A second device (RXE_VM_RAILS=2) is for the rails tests; the hooks keep one NIC.
if [[ -n ${RXE_VM_DEV2:-} ]]; then
  export KVTRANSFER_RDMA_DEVICE2=$RXE_VM_DEV2 KVTRANSFER_RDMA_NETDEV2=$RXE_VM_NETDEV2
  export KVCACHE_RDMA_NICS=${KVCACHE_RDMA_NICS-$RXE_VM_DEV}
fi
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
TEST_TIMEOUT=${RDMA_TEST_TIMEOUT:-900} HOOK_TIMEOUT=${RDMA_HOOK_TIMEOUT:-1800}
IGNORED_BINS=${RDMA_IGNORED_BINS:-^rdma_}
passed=0 failed=0 skipped=0 failures=()
log=$(mktemp)

echo "rdma: kernel $(uname -r), $RXE_VM_DEV on $RXE_VM_NETDEV $RXE_VM_IP, GID index $RXE_VM_GID_INDEX, memlock $(ulimit -l)"
while IFS=$'\t' read -r name dir exe; do
  [[ -n $name ]] || continue
  args=()
  [[ $name =~ $IGNORED_BINS ]] && args=(--include-ignored)
  echo "=== test binary $name (${exe##*/}${args[*]:+ ${args[*]}})"
  t0=$SECONDS
  (cd "$dir" && timeout -k 10 "$TEST_TIMEOUT" "$exe" "${args[@]}" </dev/null) 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  p=0 f=0 s=0
  # (no process substitution: the guest's /dev has no /dev/fd)
  counts=$(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$log")
  while read -r a b c; do [[ -n $a ]] && p=$((p + a)) f=$((f + b)) s=$((s + c)); done <<< "$counts"
  if ((rc != 0 && f == 0)); then f=1; fi   # crash, timeout (124) or no summary
  ((rc == 124)) && echo "!!! $name timed out after ${TEST_TIMEOUT}s"
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
  ((f)) && failures+=("$name")
  echo "=== $name: $p passed, $f failed, $s ignored, exit $rc, $((SECONDS - t0))s"
done < "$list"

hook() {  # label command...
  local label=$1 rc t0=$SECONDS; shift
  echo "=== hook $label"
  (cd "$root" && timeout -k 10 "$HOOK_TIMEOUT" "$@" </dev/null); rc=$?
  echo "=== hook $label: exit $rc, $((SECONDS - t0))s"
  if ((rc == 0)); then passed=$((passed + 1)); else failed=$((failed + 1)); failures+=("$label"); fi
}
# RDMA_HOOKS: regex on hook file names to run (default all), e.g. '50-ava' for one batch.
for h in "$root"/scripts/rxe-vm/guest.d/*.sh; do
  [[ -f $h && -x $h && ${h##*/} =~ ${RDMA_HOOKS:-.} ]] && hook "${h#"$root"/}" "$h"
done
for f in "$extra" "${RDMA_EXTRA_CMDS:-}"; do
  [[ -n $f && -f $f ]] || continue
  while IFS= read -r c; do
    [[ -n ${c// /} && $c != \#* ]] && hook "$c" bash -c "$c"
  done < "$f"
done
rm -f "$log"

echo "rdma: $passed passed, $failed failed, $skipped skipped"
if ((failed)); then echo "rdma: failed: ${failures[*]}"; exit 1; fi
exit 0
