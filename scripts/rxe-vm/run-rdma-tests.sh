#!/usr/bin/env bash
# run-rdma-tests.sh - build the RDMA test binaries on the host, then run them
# (plus optional hooks) in ONE boot of the Soft-RoCE VM (run-in-rxe-vm.sh).
#
# Usage:  scripts/rxe-vm/run-rdma-tests.sh [GUEST_CMD...]
#   Each GUEST_CMD is an extra shell command run in the guest after the tests
#   (from the repository root), like the hooks below.
#
# In the guest (scripts/rxe-vm/guest-tests.sh):
#   1. every test binary of the packages runs (cwd = its package directory),
#      with KVTRANSFER_RDMA_DEVICE=rxe0, KVTRANSFER_GID_INDEX (1 on rxe) and
#      KVTRANSFER_RDMA_IP=10.77.0.1 set; the rdma_* binaries (RDMA_IGNORED_BINS)
#      with --include-ignored: their tests are #[ignore]d on hosts without a
#      device and here fail on any problem;
#   2. every executable scripts/rxe-vm/guest.d/*.sh, in name order;
#   3. every line of the file named by RDMA_EXTRA_CMDS, then each GUEST_CMD.
#   It prints `rdma: N passed, N failed, N skipped` and fails if anything failed
#   (skipped: tests still ignored there, e.g. the GPU ones).
#
# Env:  RDMA_TEST_PACKAGES  cargo -p list (default "kvtransfer-verbs kvtransfer-engine")
#       RDMA_TEST_BINS      regex on test binary names to run (default: all)
#       RDMA_IGNORED_BINS   regex on test binary names run with --include-ignored
#                           (default ^rdma_)
#       RDMA_HOOKS          regex on guest.d hook file names to run (default all)
#       RDMA_TEST_TIMEOUT   seconds per test binary in the guest   (default 900)
#       RDMA_HOOK_TIMEOUT   seconds per hook / extra command        (default 1800)
#       RDMA_EXTRA_CMDS     file of extra guest commands, one per line
#       RXE_VM_TIMEOUT      whole VM run (default here 3600); other RXE_VM_* pass through
#       KVTRANSFER_ALLOW_RDMA_SKIP=1  exit 0 with "SKIP: reason" when the VM
#                           cannot run here (not root, no qemu); otherwise exit 1.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

unavailable() {
  if [[ ${KVTRANSFER_ALLOW_RDMA_SKIP:-0} == 1 ]]; then echo "SKIP: RDMA tests not run: $*"; exit 0; fi
  echo "FAIL: RDMA tests cannot run: $* (set KVTRANSFER_ALLOW_RDMA_SKIP=1 to skip instead)" >&2
  exit 1
}
[[ $(id -u) == 0 ]] || unavailable "not root (the Soft-RoCE VM needs root)"
command -v qemu-system-x86_64 >/dev/null || command -v apt-get >/dev/null \
  || unavailable "qemu-system-x86_64 is missing and apt-get is unavailable to install it"

out=$root/target/rxe-vm
mkdir -p "$out"
list=$out/tests.list
extra=$out/extra-cmds
read -r -a pkgs <<< "${RDMA_TEST_PACKAGES:-kvtransfer-verbs kvtransfer-engine}"

# Built for the whole workspace, then picked by package: a `-p` subset resolves other
# features (napi turns on futures-channel's `sink`), gets other unit hashes and would compile
# the engine again instead of reusing what `cargo test --workspace --release` built.
echo "[rdma] building test binaries (--workspace; then picking ${pkgs[*]})" >&2
t0=$SECONDS
cargo test --release --workspace --no-run --message-format=json > "$out/build.json"
echo "[rdma] test binaries built in $((SECONDS - t0))s" >&2
python3 - "$out/build.json" "${RDMA_TEST_BINS:-}" "${pkgs[@]}" > "$list" <<'PY'
import json, os, re, sys
path, pat, pkgs = sys.argv[1], sys.argv[2], set(sys.argv[3:])
seen = set()
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("profile", {}).get("test"):
        continue
    exe = m.get("executable")
    if not exe or exe in seen:
        continue
    seen.add(exe)
    # package_id: "path+file:///dir#name@1.0" (cargo >= 1.77) or "name 1.0 (path+file:///dir)"
    pid = m.get("package_id", "")
    pkg = pid.split(" ")[0] if " " in pid else pid.rsplit("#", 1)[-1].split("@")[0]
    if "#" in pid and "@" not in pid.rsplit("#", 1)[-1]:
        pkg = os.path.basename(pid.rsplit("#", 1)[0])  # "path+file:///dir/name#1.0"
    if pkg not in pkgs:
        continue
    name = m["target"]["name"]
    if pat and not re.search(pat, name):
        continue
    print(f"{name}\t{os.path.dirname(m['manifest_path'])}\t{exe}")
PY
[[ -s $list ]] || { echo "FAIL: no test binaries found (RDMA_TEST_BINS=${RDMA_TEST_BINS:-})" >&2; exit 1; }
echo "[rdma] $(wc -l < "$list") test binaries" >&2

: > "$extra"
for c in "$@"; do printf '%s\n' "$c" >> "$extra"; done

export RXE_VM_TIMEOUT=${RXE_VM_TIMEOUT:-3600}
# Two rails (rxe0 on dummy0, rxe1 on dummy1) for the multi-NIC tests; rxe0 stays the
# default device of every other test and hook.
export RXE_VM_RAILS=${RXE_VM_RAILS:-2}
rc=0
"$here/run-in-rxe-vm.sh" bash "$here/guest-tests.sh" "$list" "$extra" || rc=$?
if [[ $rc == 125 ]] && ! command -v qemu-system-x86_64 >/dev/null; then
  unavailable "qemu-system-x86_64 could not be installed"
fi
case $rc in
  0) ;;
  124) echo "FAIL: the RDMA VM timed out after ${RXE_VM_TIMEOUT}s" >&2 ;;
  125) echo "FAIL: the RDMA VM failed before running the tests (see [rxe-vm] lines above)" >&2 ;;
  *) echo "FAIL: RDMA tests failed (guest exit $rc)" >&2 ;;
esac
((rc == 0)) || exit 1
