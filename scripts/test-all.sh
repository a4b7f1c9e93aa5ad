#!/usr/bin/env bash
# The whole test suite: lints, generated-file check, Rust tests, the ava suite across real
# processes, the Soft-RoCE VM suite, the packaging check. Ends with
# `N passed, N failed, N skipped`: a test that could not run here (cargo's `ignored`, e.g.
# the RDMA tests outside the VM and the GPU tests; ava's `skip`; a `SKIP:` step) is counted
# as skipped, never as passed.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${KVTRANSFER_TEST_LOG:-$(mktemp -d /tmp/kvtransfer-test.XXXXXX)}
mkdir -p "$LOG"
passed=0 failed=0 skipped=0
# Each step's elapsed seconds: printed when the next step starts, and as a table at the end.
step_name='' step_start=$SECONDS step_times=()
step_end() {
  [[ -n $step_name ]] || return 0
  local took=$((SECONDS - step_start))
  echo "--- ${took}s: $step_name"
  step_times+=("$(printf '%6ss  %s' "$took" "$step_name")")
  step_name=''
}
step() { step_end; echo; echo "=== $* ==="; step_name=$*; step_start=$SECONDS; }
ok() { passed=$((passed + ${2:-1})); echo "ok: $1"; }
bad() { failed=$((failed + ${2:-1})); echo "FAILED: $1"; }

# Sums `test result: ok. N passed; M failed; K ignored; ...` lines of cargo test output:
# prints "passed failed ignored".
cargo_counts() {
  awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
       END { print p + 0, f + 0, s + 0 }' "$1"
}

# The README's set-up command installs what the demo needs; the tests need more (the
# Soft-RoCE VM's qemu and rdma-core tools, cargo-deny, ...): installed here, once.
step "set-up for the tests (scripts/setup-debian.sh --tests)"
if bash scripts/setup-debian.sh --tests >"$LOG/setup.log" 2>&1; then ok "setup-debian.sh --tests"
else tail -30 "$LOG/setup.log"; bad "setup-debian.sh --tests"; fi

step "format and lints"
if cargo fmt --all --check >"$LOG/fmt.log" 2>&1; then ok "cargo fmt"; else cat "$LOG/fmt.log"; bad "cargo fmt --check"; fi
if cargo clippy --workspace --all-targets -- -D warnings >"$LOG/clippy.log" 2>&1; then ok "cargo clippy"; else tail -50 "$LOG/clippy.log"; bad "cargo clippy"; fi
if npx --no-install prettier --check ts __test__ 'scripts/**/*.ts' >"$LOG/prettier.log" 2>&1; then ok "prettier --check"; else cat "$LOG/prettier.log"; bad "prettier --check (fix: npm run format)"; fi
# Supply chain (deny.toml): licenses, sources (crates.io only), bans, for this workspace and
# fuzz/ (its own workspace); advisories where the RustSec database can be fetched.
if cargo deny --version >/dev/null 2>&1; then
  deny() { cargo deny --locked --workspace --manifest-path "$1/Cargo.toml" --config deny.toml "${@:2}"; }
  for ws in . fuzz; do
    if deny "$ws" check licenses sources bans >"$LOG/deny-${ws/./main}.log" 2>&1; then ok "cargo deny check licenses sources bans ($ws)"
    else grep -vE '^\s*[│├└]' "$LOG/deny-${ws/./main}.log" | tail -40; bad "cargo deny check licenses sources bans ($ws)"; fi
  done
  if timeout 120 cargo deny fetch db >"$LOG/deny-fetch.log" 2>&1; then
    for ws in . fuzz; do
      if deny "$ws" --offline check advisories >"$LOG/deny-advisories-${ws/./main}.log" 2>&1; then ok "cargo deny check advisories ($ws)"
      else grep -vE '^\s*[│├└]' "$LOG/deny-advisories-${ws/./main}.log" | tail -40; bad "cargo deny check advisories ($ws)"; fi
    done
  else
    skipped=$((skipped + 1))
    echo "SKIP: cargo deny check advisories - the RustSec advisory database cannot be fetched here ($(grep -m1 -oE 'fatal: .*|Could not resolve host: [^ ]*' "$LOG/deny-fetch.log" || tail -1 "$LOG/deny-fetch.log"))"
  fi
else
  bad "cargo-deny is not installed (bash scripts/setup-debian.sh --tests installs it)"
fi

step "native build (napi) and generated files"
if npx napi build --platform --release --js index.js --dts index.d.ts >"$LOG/napi.log" 2>&1; then
  ok "napi build"
  if git diff --quiet -- index.js index.d.ts 2>/dev/null; then ok "index.js / index.d.ts up to date"
  else git --no-pager diff --stat -- index.js index.d.ts; bad "generated index.js / index.d.ts are stale: rebuild and commit them"; fi
else tail -40 "$LOG/napi.log"; bad "napi build"; fi
# The addon loads libibverbs and libcuda at run time: neither may be a link-time dependency.
if ! needed=$(readelf -d kvtransfer.linux-x64-gnu.node | grep NEEDED); then bad "readelf -d listed no NEEDED entries of the addon"
elif grep -E '(ibverbs|rdmacm|libcuda)' <<<"$needed"; then bad "the addon links rdma-core or the CUDA driver"
else ok "no NEEDED rdma-core or libcuda entry in the addon"; fi

step "TypeScript"
if npm run -s build:ts >"$LOG/tsc.log" 2>&1 && npx tsc -p __test__/tsconfig.json --noEmit >>"$LOG/tsc.log" 2>&1; then ok "tsc (package, tests and scripts)"
else cat "$LOG/tsc.log"; bad "tsc"; fi

step "cargo test"
cargo test --workspace --release 2>&1 | tee "$LOG/cargo-test.log" | grep -E '^test result|FAILED|panicked' || true
read -r p f s < <(cargo_counts "$LOG/cargo-test.log")
passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
# Ignored tests need hardware this host lacks: the RDMA ones run in the Soft-RoCE VM step
# below, the GPU ones on a GPU machine (scripts/gpu-tests.sh --run).
((s)) && echo "SKIP: $s cargo tests ignored here (RDMA: run in the VM step; GPU: scripts/gpu-tests.sh --run)"
if ! grep -q '^test result' "$LOG/cargo-test.log"; then tail -30 "$LOG/cargo-test.log"; bad "cargo test did not run"; fi

step "fuzzing (cargo fuzz, ${KVTRANSFER_FUZZ_SECONDS:-20} s per target)"
# Needs a nightly toolchain; installs cargo-fuzz when missing. docs/fuzzing.md: long runs.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  if ! command -v cargo-fuzz >/dev/null 2>&1 && ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked >"$LOG/cargo-fuzz-install.log" 2>&1 || { tail -20 "$LOG/cargo-fuzz-install.log"; bad "cargo install cargo-fuzz"; }
  fi
  if cargo fuzz --version >/dev/null 2>&1; then
    if (cd fuzz && cargo +nightly fuzz build) >"$LOG/fuzz-build.log" 2>&1; then
      for target in $(cd fuzz && cargo +nightly fuzz list); do
        if (cd fuzz && cargo +nightly fuzz run "$target" -- -max_total_time="${KVTRANSFER_FUZZ_SECONDS:-20}" -rss_limit_mb=1024) >"$LOG/fuzz-$target.log" 2>&1; then
          ok "fuzz $target ($(grep -oE '#[0-9]+' "$LOG/fuzz-$target.log" | tail -1 | tr -d '#') runs)"
        else tail -30 "$LOG/fuzz-$target.log"; bad "fuzz $target (artifacts in fuzz/artifacts/$target)"; fi
      done
    else tail -30 "$LOG/fuzz-build.log"; bad "cargo fuzz build"; fi
  fi
else
  skipped=$((skipped + 1)); echo "SKIP: no nightly toolchain (rustup toolchain install nightly) - fuzz targets not run"
fi

step "TCP and registry liveness with a silently vanished peer host (network namespaces, root)"
if [[ $(id -u) == 0 ]] && command -v ip >/dev/null; then
  # Already part of cargo test; run it once more, required, to report the measured times.
  # --workspace, not -p: a package subset resolves other features (napi's turn on
  # futures-channel's `sink`), so `-p` would compile the engine a second time.
  if KVTRANSFER_REQUIRE_NETNS=1 cargo test --release --workspace --test netns_silent_peer -- --nocapture >"$LOG/netns.log" 2>&1; then
    ok "netns silent peer: $(grep -o 'pending call rejected after [^ ]*' "$LOG/netns.log"), $(grep -o 'idle link disconnected after [^ ]*' "$LOG/netns.log")"
  else tail -30 "$LOG/netns.log"; bad "netns silent peer"; fi
  # The registry case: the vanished host's etcd lease expires (needs etcd: setup-debian.sh).
  if ! command -v etcd >/dev/null; then
    skipped=$((skipped + 1)); echo "SKIP: etcd is not installed - the registry's network-namespace liveness test was not run"
  elif KVTRANSFER_REQUIRE_NETNS=1 npx --no-install ava --tap __test__/registry-netns.spec.ts >"$LOG/netns-registry.tap" 2>&1 && grep -q '^# pass 1' "$LOG/netns-registry.tap"; then
    ok "netns silent peer, registry: $(grep -o 'pending call rejected after [^ ]* ms' "$LOG/netns-registry.tap")"
  else tail -30 "$LOG/netns-registry.tap"; bad "netns silent peer (registry)"; fi
else
  skipped=$((skipped + 1)); echo "SKIP: not root - the network-namespace liveness test was not run"
fi

step "ava (two real processes, transport ${KVTRANSFER_TEST_TRANSPORT:-tcp})"
npx ava --tap 2>&1 | tee "$LOG/ava.tap" | grep -E '^(not ok|# )' || true
p=$(awk '/^# pass/ {print $3}' "$LOG/ava.tap"); f=$(awk '/^# fail/ {print $3}' "$LOG/ava.tap")
s=$(awk '/^# skip/ {print $3}' "$LOG/ava.tap")
passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0})); skipped=$((skipped + ${s:-0}))
((${s:-0})) && grep -E '^ok .*# SKIP' "$LOG/ava.tap" | sed 's/^/SKIP: ava: /'
[[ -n ${p:-} ]] || { tail -30 "$LOG/ava.tap"; bad "ava did not report"; }

step "chaos over TCP (scripts/chaos: 2 prefill x 2 decode, random SIGKILLs, ${KVTRANSFER_CHAOS_SECONDS:-60} s)"
# First its self-test: calls reported OK but never written (--inject-lie) must fail the run
# as false successes and as nothing else. Then the gate: no false success, no hang, every
# failure typed, fds flat (scripts/chaos/main.ts).
if KVT_CHAOS_ARRIVAL_WAIT_MS=300 scripts/chaos.sh --seconds 3 --prefills 1 --decodes 1 --inject-lie 0.05 \
    --json "$LOG/chaos-lie.json" >"$LOG/chaos-lie.log" 2>&1; then
  cat "$LOG/chaos-lie.log"; bad "chaos self-test: calls never written passed as verified"
elif node -e 'const r = require(process.argv[1]); process.exit(r.verification.falseSuccesses > 0 && r.problems.length === 1 ? 0 : 1)' "$LOG/chaos-lie.json" 2>/dev/null; then
  ok "chaos self-test: $(node -p 'require(process.argv[1]).verification.falseSuccesses' "$LOG/chaos-lie.json") injected false successes caught"
else cat "$LOG/chaos-lie.log"; bad "chaos self-test: expected false successes and no other problem"; fi
if scripts/chaos.sh --seconds "${KVTRANSFER_CHAOS_SECONDS:-60}" --json "$LOG/chaos-tcp.json" >"$LOG/chaos-tcp.log" 2>&1; then
  ok "chaos tcp: $(grep -oE '[0-9]+ calls,' "$LOG/chaos-tcp.log" | head -1) $(grep -oE 'restarts: [^;]*' "$LOG/chaos-tcp.log")"
else cat "$LOG/chaos-tcp.log"; bad "chaos tcp (report: $LOG/chaos-tcp.json)"; fi

step "Python client (clients/python: unit tests, and end to end through two real sidecars over TCP)"
clients/python/run-tests.sh >"$LOG/python.log" 2>&1
rc=$?
ran=$(grep -Eo '^Ran [0-9]+ tests?' "$LOG/python.log" | grep -Eo '[0-9]+' | tail -1)
s=$(grep -Ec ' \.\.\. skipped' "$LOG/python.log")
f=$(grep -Ec ' \.\.\. (FAIL|ERROR)$' "$LOG/python.log")
if [[ -z $ran ]]; then tail -30 "$LOG/python.log"; bad "python client tests did not run"
else
  passed=$((passed + ran - s - f)); failed=$((failed + f)); skipped=$((skipped + s))
  ((s)) && grep -E ' \.\.\. skipped' "$LOG/python.log" | sed 's/^/SKIP: python: /'
  ((f)) && grep -E ' \.\.\. (FAIL|ERROR)$' "$LOG/python.log"
  [[ $rc == 0 || $f != 0 ]] || bad "python client tests exited $rc"
  echo "ok: python client: $((ran - s - f)) passed, $f failed, $s skipped"
fi

step "Soft-RoCE VM: RDMA tests"
if [[ -x scripts/rxe-vm/run-rdma-tests.sh ]]; then
  scripts/rxe-vm/run-rdma-tests.sh 2>&1 | tee "$LOG/rdma.log"
  rc=${PIPESTATUS[0]}
  line=$(grep -E '^rdma: [0-9]+ passed, [0-9]+ failed' "$LOG/rdma.log" | tail -1)
  if [[ -n $line ]]; then
    p=$(sed -E 's/^rdma: ([0-9]+) passed, ([0-9]+) failed.*/\1/' <<<"$line"); f=$(sed -E 's/^rdma: ([0-9]+) passed, ([0-9]+) failed.*/\2/' <<<"$line")
    s=$(sed -nE 's/^rdma: .*, ([0-9]+) skipped.*/\1/p' <<<"$line")
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + ${s:-0}))
    [[ $rc == 0 || $f != 0 ]] || bad "RDMA VM run exited $rc"
  elif grep -q '^SKIP' "$LOG/rdma.log" && [[ $rc == 0 ]]; then skipped=$((skipped + 1))
  else bad "RDMA VM run (exit $rc)"; fi
else
  bad "scripts/rxe-vm/run-rdma-tests.sh is missing"
fi

if [[ -x scripts/pack-test.sh ]]; then
  step "packaging: install the packed tarballs into a fresh project and run the demo"
  if scripts/pack-test.sh >"$LOG/pack.log" 2>&1; then ok "pack-test"; else tail -40 "$LOG/pack.log"; bad "pack-test"; fi
fi

step_end
echo
echo "time per step (${SECONDS}s in all):"
printf '%s\n' "${step_times[@]}"
echo "logs: $LOG"
echo "$passed passed, $failed failed, $skipped skipped"
((failed == 0))
