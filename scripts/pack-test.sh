#!/usr/bin/env bash
# Packaging check: builds the release addons (scripts/build-release.sh: glibc 2.17 cross
# build), packs the main package and this machine's platform package with `npm pack`,
# installs both tarballs into a fresh project outside the repository with ONE
# `npm install` (zeromq comes from the registry), and there:
#   * checks that `kvtransfer` and its addon resolve inside that project, not the repo;
#   * checks the installed addon: no glibc symbol version > 2.17, no NEEDED rdma-core;
#   * type-checks (tsc --noEmit) a small TypeScript consumer of the public API against
#     the shipped .d.ts, then compiles and runs it (one typed write over TCP);
#   * runs the demo from the installed package.
# Ends with `pack-test: N passed, M failed`; exit status 0 only if nothing failed.
#
# Env: PACK_TEST_TARGETS="triple ..." builds those (default: this machine's target, the
# only package it installs; the arm64 one is tested by scripts/arm64-test.sh); PACK_TEST_SKIP_BUILD=1 reuses target/napi-cross/artifacts; PACK_TEST_KEEP=1 keeps
# the temp project.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }
finish() {
  echo
  echo "pack-test: $passed passed, $failed failed"
  ((failed == 0))
  exit
}
step() { echo; echo "--- $* ---"; }

NAME=$(node -p "require('./package.json').name")
VERSION=$(node -p "require('./package.json').version")
HOST_PLATFORM=$(node -p "process.platform + '-' + process.arch + (process.platform === 'linux' ? '-gnu' : '')")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvtransfer-pack-test.XXXXXX")
case "$WORK/" in "$ROOT"/*) echo "temp dir $WORK is inside the repository"; exit 1 ;; esac
[[ ${PACK_TEST_KEEP:-0} == 1 ]] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tarballs" "$WORK/consumer"
echo "pack-test: $NAME@$VERSION, host package $NAME-$HOST_PLATFORM, work dir $WORK"

step "release build (scripts/build-release.sh)"
if [[ ${PACK_TEST_SKIP_BUILD:-0} == 1 ]]; then
  echo "PACK_TEST_SKIP_BUILD=1: reusing target/napi-cross/artifacts"
  node node_modules/@napi-rs/cli/dist/cli.js artifacts --output-dir target/napi-cross/artifacts --npm-dir npm >/dev/null 2>&1
  ok "release build skipped (artifacts reused)"
else
  # shellcheck disable=SC2086
  if bash scripts/build-release.sh ${PACK_TEST_TARGETS:-$(uname -m)-unknown-linux-gnu} >"$WORK/build-release.log" 2>&1; then
    grep -E '^\[build-release\]|^  |^    ' "$WORK/build-release.log"
    ok "release build on the glibc 2.17 baseline"
  else
    tail -60 "$WORK/build-release.log"; bad "release build"; finish
  fi
fi
ADDON=npm/$HOST_PLATFORM/$NAME.$HOST_PLATFORM.node
[[ -f $ADDON ]] || { bad "$ADDON was not built"; finish; }

step "pre-publish (staged copy, nothing is published) and pack"
npx --no-install tsc -p tsconfig.json || { bad "tsc (lib/)"; finish; }
# `napi pre-publish` writes optionalDependencies into package.json. The repository's
# package.json stays without them (npm ci / package-lock.json), exactly as at release
# time, so it runs on a staged copy of what the main package ships.
STAGED=$WORK/stage
mkdir -p "$STAGED/lib/bench" "$STAGED/lib/sidecar" "$STAGED/lib/registry"
cp package.json index.js index.d.ts "$STAGED/"
[[ -f README.md ]] && cp README.md "$STAGED/"
[[ -f LICENSE ]] && cp LICENSE "$STAGED/"
cp lib/*.js lib/*.d.ts "$STAGED/lib/"
cp lib/bench/*.js lib/bench/*.d.ts "$STAGED/lib/bench/"
cp lib/sidecar/*.js lib/sidecar/*.d.ts "$STAGED/lib/sidecar/"
cp lib/registry/*.js lib/registry/*.d.ts "$STAGED/lib/registry/"
cp -r npm "$STAGED/npm"
# pre-publish refuses a target whose .node is missing: the stage lists only the targets built
# here (by default this machine's; a release builds them all, docs/packaging.md).
unbuilt=$(node -e '
  const fs = require("fs"), file = process.argv[1] + "/package.json", pkg = require(file)
  const plat = (t) => { const [a, , s, abi] = t.split("-"); return `${s}-${({ x86_64: "x64", aarch64: "arm64" })[a] ?? a}${abi ? "-" + abi : ""}` }
  const built = (t) => fs.existsSync(`${process.argv[1]}/npm/${plat(t)}/${pkg.napi.binaryName}.${plat(t)}.node`)
  console.log(pkg.napi.targets.filter((t) => !built(t)).map(plat).join(" "))
  pkg.napi.targets = pkg.napi.targets.filter(built)
  fs.writeFileSync(file, JSON.stringify(pkg, null, 2) + "\n")
' "$STAGED")
[[ -z $unbuilt ]] || echo "SKIP: not staged (no .node built here): $unbuilt (scripts/arm64-test.sh builds linux-arm64-gnu)"
# pre-publish reads `git log -1` (for a GitHub release it does not make here): give the
# stage a throw-away repository of its own.
git -C "$STAGED" init -q && git -C "$STAGED" -c user.name=pack-test -c user.email=pack-test@localhost \
  commit -q --allow-empty -m "pack-test stage of $NAME@$VERSION"
if node node_modules/@napi-rs/cli/dist/cli.js pre-publish --cwd "$STAGED" -t npm --npm-dir npm --skip-optional-publish >"$WORK/pre-publish.log" 2>&1; then
  ok "napi pre-publish --skip-optional-publish (staged)"
else cat "$WORK/pre-publish.log"; bad "napi pre-publish"; finish; fi
MAIN_TGZ=$WORK/tarballs/$(cd "$STAGED" && npm pack --silent --pack-destination "$WORK/tarballs" 2>/dev/null | tail -1)
PLAT_TGZ=$WORK/tarballs/$(cd "$STAGED/npm/$HOST_PLATFORM" && npm pack --silent --pack-destination "$WORK/tarballs" 2>/dev/null | tail -1)
if [[ -f $MAIN_TGZ && -f $PLAT_TGZ ]]; then ok "npm pack: $(basename "$MAIN_TGZ") $(basename "$PLAT_TGZ")"; else bad "npm pack"; finish; fi

main_files=$(tar tzf "$MAIN_TGZ" | sed 's#^package/##' | sort)
echo "$(basename "$MAIN_TGZ"): $(paste -sd' ' <<<"$main_files")"
missing=()
for f in index.js index.d.ts package.json lib/index.js lib/index.d.ts lib/errors.js lib/errors.d.ts lib/control.js lib/demo.js; do
  grep -qx "$f" <<<"$main_files" || missing+=("$f")
done
for f in lib/*.js lib/*.d.ts lib/bench/*.js lib/bench/*.d.ts lib/sidecar/*.js lib/sidecar/*.d.ts lib/registry/*.js lib/registry/*.d.ts; do grep -qx "$f" <<<"$main_files" || missing+=("$f"); done
if ((${#missing[@]})); then bad "main tarball lacks: ${missing[*]}"; else ok "main tarball has lib/*.js, lib/*.d.ts, lib/bench/*, index.js, index.d.ts"; fi
if grep -q '\.node$' <<<"$main_files"; then bad "main tarball contains a .node: $(grep '\.node$' <<<"$main_files")"; else ok "main tarball has no .node"; fi
plat_files=$(tar tzf "$PLAT_TGZ" | sed 's#^package/##' | sort)
echo "$(basename "$PLAT_TGZ"): $(paste -sd' ' <<<"$plat_files")"
if grep -qx "$NAME.$HOST_PLATFORM.node" <<<"$plat_files"; then ok "platform tarball has $NAME.$HOST_PLATFORM.node"; else bad "platform tarball lacks the .node"; fi
# Every target's platform package, and the main package's optionalDependencies on them.
tar xzf "$MAIN_TGZ" -C "$WORK" package/package.json
if STAGED=$STAGED node -e '
  const [pkgPath, name, version] = process.argv.slice(1)
  const pkg = require(pkgPath)
  const { platformArchABI } = { platformArchABI: (t) => { const [a, , s, abi] = t.split("-"); return `${s}-${({ x86_64: "x64", aarch64: "arm64" })[a] ?? a}${abi ? "-" + abi : ""}` } }
  const problems = []
  for (const triple of pkg.napi.targets) {
    const plat = platformArchABI(triple)
    const dep = `${name}-${plat}`
    if (pkg.optionalDependencies?.[dep] !== version) problems.push(`optionalDependencies["${dep}"] is ${pkg.optionalDependencies?.[dep]}, not ${version}`)
    const sub = require(`${process.env.STAGED}/npm/${plat}/package.json`)
    if (sub.name !== dep || sub.version !== version) problems.push(`npm/${plat}/package.json is ${sub.name}@${sub.version}`)
    if (!sub.os?.includes("linux") || !sub.cpu?.length || !sub.libc?.includes("glibc")) problems.push(`npm/${plat}/package.json lacks os/cpu/libc`)
    if (!sub.files?.includes(`${name}.${plat}.node`)) problems.push(`npm/${plat}/package.json files lacks the .node`)
  }
  if (problems.length) { console.error(problems.join("\n")); process.exit(1) }
  console.log("optionalDependencies:", JSON.stringify(pkg.optionalDependencies))
' "$WORK/package/package.json" "$NAME" "$VERSION"; then ok "optionalDependencies and npm/<platform>/package.json match napi.targets"
else bad "optionalDependencies / platform packages"; fi

step "fresh consumer project in $WORK/consumer: one npm install"
cd "$WORK/consumer"
TS_VERSION=$(node -p "require('$ROOT/node_modules/typescript/package.json').version")
TYPES_NODE_VERSION=$(node -p "require('$ROOT/node_modules/@types/node/package.json').version")
cat >package.json <<'EOF'
{ "name": "kvtransfer-consumer", "version": "1.0.0", "private": true }
EOF
if npm install --no-audit --no-fund --prefer-offline --loglevel=error \
     "$MAIN_TGZ" "$PLAT_TGZ" "typescript@$TS_VERSION" "@types/node@$TYPES_NODE_VERSION" >"$WORK/install.log" 2>&1; then
  ok "npm install of both tarballs (+ zeromq from the registry)"
else
  cat "$WORK/install.log"; bad "npm install"; finish
fi
# Nothing from the repository may leak in: no NODE_PATH, no addon override.
run() { env -u NODE_PATH -u NAPI_RS_NATIVE_LIBRARY_PATH -u NODE_OPTIONS "$@"; }
resolved=$(run node -e '
  const main = require.resolve("kvtransfer")
  require("kvtransfer")
  const addons = Object.keys(require.cache).filter((k) => k.endsWith(".node"))
  console.log([main, require.resolve("zeromq"), ...addons].join("\n"))')
echo "$resolved" | sed 's/^/  /'
addon_path=$(grep "$NAME\.$HOST_PLATFORM\.node$" <<<"$resolved" || true)
if [[ $(head -1 <<<"$resolved") == "$WORK/consumer/node_modules/$NAME/lib/index.js" && \
      $addon_path == "$WORK/consumer/node_modules/$NAME-$HOST_PLATFORM/$NAME.$HOST_PLATFORM.node" ]] && \
   ! grep -qF "$ROOT" <<<"$resolved"; then
  ok "kvtransfer and its addon load from the consumer's node_modules ($NAME-$HOST_PLATFORM)"
else bad "kvtransfer did not load from the installed packages"; fi
if grep -q "$WORK/consumer/node_modules/zeromq/" <<<"$resolved"; then ok "zeromq installed from the registry"; else bad "zeromq"; fi

step "installed addon: glibc baseline and dependencies"
INSTALLED=$WORK/consumer/node_modules/$NAME-$HOST_PLATFORM/$NAME.$HOST_PLATFORM.node
echo "readelf -d (NEEDED):"; readelf -d "$INSTALLED" | grep NEEDED | sed 's/^/  /'
echo "objdump -T: glibc versions used (count per version):"
objdump -T "$INSTALLED" | grep -o 'GLIBC_[0-9.]*' | sort -V | uniq -c | sed 's/^/  /'
newest=$(objdump -T "$INSTALLED" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
if [[ -n $newest && $(printf '%s\n' "$newest" GLIBC_2.17 | sort -V | tail -1) == GLIBC_2.17 ]]; then
  ok "no glibc symbol version newer than 2.17 (newest: $newest)"
else bad "needs $newest (> GLIBC_2.17)"; objdump -T "$INSTALLED" | grep -E 'GLIBC_2\.(1[89]|[2-9][0-9])' | head; fi
if readelf -d "$INSTALLED" | grep -Eq 'NEEDED.*(ibverbs|rdmacm|libnl)'; then bad "NEEDED rdma-core entry"; else ok "no NEEDED rdma-core entry"; fi
undef=$(objdump -T "$INSTALLED" | awk '$4 == "*UND*" {print $NF}' | grep -E '^(ibv_|rdma_)' || true)
if [[ -z $undef ]]; then ok "no undefined rdma-core symbol (libibverbs is dlopen()ed at run time)"; else bad "undefined: $undef"; fi

step "TypeScript consumer against the shipped types"
cat >tsconfig.json <<'EOF'
{
  "compilerOptions": {
    "target": "ES2022", "module": "commonjs", "moduleResolution": "node", "strict": true,
    "esModuleInterop": true, "types": ["node"], "outDir": "out", "rootDir": "."
  },
  "files": ["consumer.ts"]
}
EOF
cat >consumer.ts <<'EOF'
import {
  KvTransferError,
  RDMACommunicator,
  type Arrival,
  type BlockIds,
  type CommunicatorOptions,
  type KvTransferErrorCode,
  type RequestTag,
} from 'kvtransfer'

const BLOCKS = 8
const BLOCK_BYTES = 4096

function options(role: CommunicatorOptions['role'], fill: number): CommunicatorOptions {
  return {
    role,
    gpuIdx: 0,
    port: 0,
    localKeyCache: [Buffer.alloc(BLOCKS * BLOCK_BYTES, fill)],
    localValueCache: [new Uint8Array(BLOCKS * BLOCK_BYTES).fill(fill)],
    blockNumber: BLOCKS,
    blockBytes: BLOCK_BYTES,
    transport: 'tcp',
  }
}

async function main(): Promise<void> {
  const decodeOptions = options('decode', 0)
  const decode = new RDMACommunicator(decodeOptions)
  const prefill = new RDMACommunicator(options('prefill', 7))
  await Promise.all([decode.ready, prefill.ready])
  const arrivals: Arrival[] = []
  decode.on('arrival', (arrival: Arrival) => arrivals.push(arrival))

  const connected: boolean = await prefill.connect('127.0.0.1', decode.port, { timeoutMs: 10_000 })
  const local: BlockIds = Uint32Array.from([0, 1, 2])
  const remote: BlockIds = [5, 6, 7]
  const tag: RequestTag = 42n
  const waiting: Promise<Arrival[]> = decode.waitForArrival(tag, { layers: 1, timeoutMs: 10_000 })
  await prefill.writeCache('127.0.0.1', decode.port, local, remote, 0, { tag })
  const got = await waiting

  let code: KvTransferErrorCode | undefined
  try {
    await prefill.writeCache('127.0.0.1', decode.port, [BLOCKS], [0], 0)
  } catch (error) {
    if (error instanceof KvTransferError) code = error.code
  }

  // The shipped types are real, not `any`: each of these must be a type error.
  // @ts-expect-error block ids are numbers
  void prefill.writeCache('127.0.0.1', decode.port, ['0'], [0], 0).catch(() => undefined)
  // @ts-expect-error role is 'prefill' | 'decode'
  const wrongRole: CommunicatorOptions = { ...decodeOptions, role: 'router' }
  // @ts-expect-error a tag is a bigint or a string
  const wrongTag: RequestTag = 1
  void wrongRole, wrongTag

  const value = decodeOptions.localValueCache[0] as Uint8Array
  const landed = value.subarray(5 * BLOCK_BYTES, 8 * BLOCK_BYTES).every((b) => b === 7)
  await prefill.close()
  await decode.close()
  console.log(`consumer: connected=${connected} transport=${decode.transport} arrivals=${got.length} tag=${typeof got[0]?.tag} landed=${landed} error=${code}`)
  if (!connected || got.length !== 1 || got[0].tag !== 42n || !landed || code !== 'ERR_BLOCK_ID_OUT_OF_RANGE') process.exitCode = 1
}

main().catch((error: unknown) => {
  console.error(error)
  process.exitCode = 1
})
EOF
if npx --no-install tsc -p tsconfig.json --noEmit >"$WORK/tsc.log" 2>&1; then ok "tsc --noEmit of consumer.ts against node_modules/kvtransfer/lib/index.d.ts"
else cat "$WORK/tsc.log"; bad "consumer TypeScript does not compile"; fi
if npx --no-install tsc -p tsconfig.json >>"$WORK/tsc.log" 2>&1 && run timeout 120 node out/consumer.js; then ok "compiled consumer ran (typed connect / writeCache / waitForArrival)"
else bad "compiled consumer"; fi

step "demo from the installed package: node node_modules/$NAME/lib/demo.js"
if run timeout 300 node "node_modules/$NAME/lib/demo.js" 2>&1 | tee "$WORK/demo.log" | sed 's/^/  /'; [[ ${PIPESTATUS[0]} == 0 ]] && grep -q '^demo: OK' "$WORK/demo.log"; then
  ok "demo (installed package)"
else bad "demo"; fi

finish
