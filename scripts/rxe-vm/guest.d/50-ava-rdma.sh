#!/usr/bin/env bash
# A chosen set of the ava specs, across real processes with transport 'rdma' on Soft-RoCE
# (runs in the VM: CPU ~5x and process start ~40x slower, hence the timeout scale). The
# whole suite ran on the host already; under TCG it takes over 30 minutes, so only the
# specs listed below run here again. One ava run per spec, so each spec's time is printed
# and one hang cannot eat the others' time. TAP output: target/rxe-vm/ava-rdma/.
set -uo pipefail
export KVTRANSFER_TEST_TRANSPORT=rdma KVTRANSFER_TEST_HOST=${RXE_VM_IP:-127.0.0.1}
export KVTRANSFER_TEST_TIMEOUT_SCALE=${KVTRANSFER_TEST_TIMEOUT_SCALE:-20}
# The soak test's reduced run, reduced further for the slow VM.
export KVTRANSFER_SOAK_CALLS=${KVTRANSFER_SOAK_CALLS:-3000} KVTRANSFER_SOAK_CYCLES=${KVTRANSFER_SOAK_CYCLES:-6}
# spec[:match]: a match runs only the tests of that spec whose title matches it. Chosen for
# what differs over RDMA as seen from TS: one-sided writes byte for byte, completion errors
# of a dead peer, timeouts and aborts, fences (QPs moved to error; a writer with two links),
# the auto choice and its reason, the doctor's device check, TP arrivals, prepared lists,
# lease expiry (writes to a stopped process still land). The engine's RDMA paths themselves run as cargo tests above.
default_specs=(
  transfer peer-death robustness fences fences-links peer-info prepared tp-arrivals doctor
  'registry:*SIGSTOP*'
)
# KVTRANSFER_AVA_FILES (host env, passed into the guest): the specs to run instead.
# shellcheck disable=SC2206
set -f  # the match patterns are not file globs
specs=(${KVTRANSFER_AVA_FILES:-${default_specs[@]}})
set +f
dir=target/rxe-vm/ava-rdma
rm -rf "$dir" && mkdir -p "$dir"
passed=0 failed=0 skipped=0 bad=()
for spec in "${specs[@]}"; do
  name=${spec%%:*} match=
  [[ $spec == *:* ]] && match=${spec#*:}
  file=__test__/$name.spec.ts
  [[ -f $file ]] || file=$name
  tap=$dir/$(basename "$name" .spec.ts).tap
  start=$SECONDS
  args=(--tap --timeout=10m "$file")
  [[ -n $match ]] && args+=(--match "$match")
  timeout 900 npx ava "${args[@]}" >"$tap" 2>&1
  rc=$?
  p=$(awk '/^# pass/ {print $3}' "$tap") f=$(awk '/^# fail/ {print $3}' "$tap") s=$(awk '/^# skip/ {print $3}' "$tap")
  passed=$((passed + ${p:-0})) failed=$((failed + ${f:-0})) skipped=$((skipped + ${s:-0}))
  echo "ava over rdma: $name${match:+ ($match)}: ${p:-0} passed, ${f:-0} failed, ${s:-0} skipped, exit $rc, $((SECONDS - start))s"
  if [[ $rc != 0 || -z ${p:-} ]]; then
    bad+=("$name")
    grep -E '^(not ok|  ---|    |#   )' "$tap" | head -60
  fi
done
echo "ava over rdma: $passed passed, $failed failed, $skipped skipped (TAP per spec: $dir)"
[[ ${#bad[@]} == 0 ]] || { echo "ava over rdma: failed: ${bad[*]}"; exit 1; }
