#!/usr/bin/env bash
# A chosen set of the ava specs, across real processes with transport 'rdma' on Soft-RoCE
# (runs in the VM: CPU ~5x and process start ~40x slower, hence the timeout scale). The
# whole suite ran on the host already; under TCG it takes over 30 minutes, so only the
# specs listed below run here again, and of those only the cases whose outcome depends on
# the transport. One ava run per spec, so each spec's time is printed and one hang cannot
# eat the others' time; KVTRANSFER_AVA_LANES runs (default: the VM's vCPUs, at most 2) go
# at once, each taking the next spec of the list. TAP output: target/rxe-vm/ava-rdma/.
set -uo pipefail
export KVTRANSFER_TEST_TRANSPORT=rdma KVTRANSFER_TEST_HOST=${RXE_VM_IP:-127.0.0.1}
export KVTRANSFER_TEST_TIMEOUT_SCALE=${KVTRANSFER_TEST_TIMEOUT_SCALE:-20}
# Waits for something that must NOT happen (helpers.ts `quietMs`) are the test's power, not a
# bound: they scale with the CPU (~5x slower here), not with process start like the bounds.
export KVTRANSFER_TEST_QUIET_SCALE=${KVTRANSFER_TEST_QUIET_SCALE:-5}
# The soak test's reduced run, reduced further for the slow VM.
export KVTRANSFER_SOAK_CALLS=${KVTRANSFER_SOAK_CALLS:-3000} KVTRANSFER_SOAK_CYCLES=${KVTRANSFER_SOAK_CYCLES:-6}
# spec[:match[|match...]]: with matches, only the tests of that spec whose title matches
# one of them run (ava --match; `!pattern` leaves those out). Chosen for what differs over
# RDMA as seen from TS: one-sided writes byte for byte, completion errors of a dead peer,
# timeouts and aborts, fences (QPs moved to error; a writer with two links), the auto choice and its reason, the
# doctor's device check, TP arrivals, prepared lists, lease expiry (writes to a stopped
# process still land). Left out here, run on the host only: argument checks made before
# any transport is involved (fence arguments, prepareBlocks ids, the positional
# constructor form, the doctor's human table and usage error). Longest specs first, so the
# lanes end together. The engine's RDMA paths themselves run as cargo tests above.
default_specs=(
  tp-arrivals peer-death robustness
  "transfer:!the seed's positional constructor form*"
  'prepared:!prepareBlocks refuses bad ids itself*'
  'fences:!fence checks its arguments'
  'doctor:!the human table names each section*'
  fences-links peer-info
  'registry:*SIGSTOP*'
)
# KVTRANSFER_AVA_FILES (host env, passed into the guest): the specs to run instead.
# shellcheck disable=SC2206
set -f  # the match patterns are not file globs
IFS=$' \t\n'
if [[ -n ${KVTRANSFER_AVA_FILES:-} ]]; then specs=($KVTRANSFER_AVA_FILES); else specs=("${default_specs[@]}"); fi
set +f
lanes=${KVTRANSFER_AVA_LANES:-$(nproc)}
((lanes > 2)) && [[ -z ${KVTRANSFER_AVA_LANES:-} ]] && lanes=2
((lanes >= 1)) || lanes=1
dir=target/rxe-vm/ava-rdma
rm -rf "$dir" && mkdir -p "$dir"
# ava's own entry point: `npx ava` adds ~10 s of npm start per run under TCG.
ava=node_modules/.bin/ava
[[ -x $ava ]] || ava='npx ava'

# One spec: its TAP in $dir/NAME.tap, its counts and time in $dir/NAME.result.
run_spec() {
  local spec=$1 name match file tap start rc p f s m
  name=${spec%%:*} match=
  [[ $spec == *:* ]] && match=${spec#*:}
  file=__test__/$name.spec.ts
  [[ -f $file ]] || file=$name
  tap=$dir/$(basename "$name" .spec.ts).tap
  start=$SECONDS
  local args=(--tap --timeout=10m "$file")
  if [[ -n $match ]]; then
    IFS='|' read -r -a ms <<<"$match"
    for m in "${ms[@]}"; do args+=(--match "$m"); done
  fi
  # shellcheck disable=SC2086
  timeout 900 $ava "${args[@]}" >"$tap" 2>&1
  rc=$?
  p=$(awk '/^# pass/ {print $3}' "$tap") f=$(awk '/^# fail/ {print $3}' "$tap") s=$(awk '/^# skip/ {print $3}' "$tap")
  echo "${p:--} ${f:-0} ${s:-0} $rc" >"${tap%.tap}.result"   # '-': ava printed no counts
  {
    echo "ava over rdma: $name${match:+ ($match)}: ${p:-0} passed, ${f:-0} failed, ${s:-0} skipped, exit $rc, $((SECONDS - start))s"
    [[ $rc == 0 && -n ${p:-} ]] || grep -E '^(not ok|  ---|    |#   )' "$tap" | head -60
  } | flock "$dir" cat
}
export -f run_spec
export dir ava

start=$SECONDS
echo "ava over rdma: ${#specs[@]} specs, $lanes at once"
printf '%s\0' "${specs[@]}" | xargs -0 -n 1 -P "$lanes" bash -c 'run_spec "$1"' _
passed=0 failed=0 skipped=0 bad=()
for spec in "${specs[@]}"; do
  name=${spec%%:*}
  result=$dir/$(basename "$name" .spec.ts).result
  if [[ ! -f $result ]]; then bad+=("$name"); continue; fi
  read -r p f s rc <"$result"
  [[ $p == - ]] || passed=$((passed + p))
  failed=$((failed + f)) skipped=$((skipped + s))
  [[ $rc == 0 && $p != - ]] || bad+=("$name")
done
echo "ava over rdma: $passed passed, $failed failed, $skipped skipped, $((SECONDS - start))s (TAP per spec: $dir)"
[[ ${#bad[@]} == 0 ]] || { echo "ava over rdma: failed: ${bad[*]}"; exit 1; }
