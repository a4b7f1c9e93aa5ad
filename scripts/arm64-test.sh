#!/usr/bin/env bash
# The linux-arm64-gnu addon, built and tested on an x86-64 Debian 12 machine:
#   1. cross-compiles it with Debian's aarch64 toolchain (gcc-aarch64-linux-gnu) into
#      npm/linux-arm64-gnu/ (the platform package; see docs/packaging.md);
#   2. checks it (aarch64 ELF, no NEEDED rdma-core or libcuda: both are loaded at run time);
#   3. runs it under qemu-user with Debian's arm64 Node.js (unpacked, not installed, under
#      target/arm64/root): the package's loader finds it as the installed platform package,
#      the TCP demo moves and verifies 8 layers between two arm64 processes, and the
#      README's Quick start (compiled by the host's tsc) exits 0.
# Not part of `npm test` (qemu's emulation makes it minutes); run it before a release:
#   bash scripts/arm64-test.sh                      # build + check + test
#   bash scripts/arm64-test.sh --build-only         # build + check (scripts/build-release.sh)
#   ARM64_SKIP_BUILD=1 bash scripts/arm64-test.sh   # test the addon already in npm/linux-arm64-gnu
# Installs what it needs (as root or with sudo): gcc-aarch64-linux-gnu, qemu-user, the Rust
# std for aarch64-unknown-linux-gnu, and downloads Debian's arm64 nodejs .debs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TRIPLE=aarch64-unknown-linux-gnu
STAGE=$ROOT/target/arm64
ADDON=$ROOT/npm/linux-arm64-gnu/kvtransfer.linux-arm64-gnu.node
SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo
BUILD_ONLY=0
case ${1:-} in
  --build-only) BUILD_ONLY=1 ;;
  '') ;;
  *) echo "usage: bash scripts/arm64-test.sh [--build-only]" >&2; exit 2 ;;
esac
log() { echo "[arm64] $*"; }
die() { echo "[arm64] ERROR: $*" >&2; exit 1; }
ROOTFS=$STAGE/root            # Debian's arm64 Node.js and its libraries, unpacked
NODE_DEBS=(nodejs libnode108 libuv1 libssl3 libicu72 libc-ares2 libnghttp2-14 libbrotli1 zlib1g
           libstdc++6 libgcc-s1 libc6)
NODE_JS_DEBS=(node-cjs-module-lexer node-acorn node-undici)   # Debian's node loads these from /usr/share/nodejs
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }
mkdir -p "$STAGE"

# --- what it needs --------------------------------------------------------------------
missing=()
for p in gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user pkg-config libclang-dev clang \
         libibverbs-dev librdmacm-dev binutils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rustup target list --installed | grep -qx $TRIPLE || rustup target add $TRIPLE
if ((!BUILD_ONLY)) && [[ ! -x $ROOTFS/usr/bin/node ]]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    log "dpkg --add-architecture arm64 (to download Debian's arm64 nodejs; nothing arm64 is installed)"
    $SUDO dpkg --add-architecture arm64
    $SUDO apt-get update -qq
  fi
  rm -rf "$STAGE/debs" && mkdir -p "$STAGE/debs"
  # (As root, apt warns that the download runs unsandboxed: harmless here.)
  (cd "$STAGE/debs" && apt-get download -qq "${NODE_DEBS[@]/%/:arm64}" "${NODE_JS_DEBS[@]}")
  for deb in "$STAGE"/debs/*.deb; do dpkg -x "$deb" "$ROOTFS"; done
fi

# --- the build: Debian's aarch64 toolchain ----------------------------------------------
# rdma-sys (crates/verbs) runs bindgen over rdma-core's headers and asks pkg-config for
# `-libverbs -lrdmacm`; the addon uses no symbol of either (it dlopen()s libibverbs, as it
# does libcuda), so as in scripts/build-release.sh the flags point at empty stub archives
# and the headers are the host's (architecture independent); libc's come from the cross
# sysroot (/usr/aarch64-linux-gnu).
if [[ ${ARM64_SKIP_BUILD:-0} != 1 ]]; then
  pc=$STAGE/pkgconfig stubs=$STAGE/stubs inc=$STAGE/rdma-include
  mkdir -p "$pc" "$stubs" "$inc" "$STAGE/out"
  ln -sfn "$(pkg-config --variable=includedir libibverbs)/infiniband" "$inc/infiniband"
  ln -sfn "$(pkg-config --variable=includedir librdmacm)/rdma" "$inc/rdma"
  rm -f "$stubs"/*.a && ar rc "$stubs/libibverbs.a" && ar rc "$stubs/librdmacm.a"
  for lib in libibverbs:ibverbs librdmacm:rdmacm; do
    cat >"$pc/${lib%%:*}.pc" <<PC
Name: ${lib%%:*}
Description: link stub for the arm64 build (the addon dlopen()s rdma-core at run time)
Version: $(pkg-config --modversion "${lib%%:*}")
Cflags: -I$inc
Libs: -L$stubs -l${lib#*:}
PC
  done
  log "napi build --target $TRIPLE (aarch64-linux-gnu-gcc, cargo target dir $STAGE)"
  rm -f "$STAGE/out/kvtransfer.linux-arm64-gnu.node"
  env -u PKG_CONFIG_PATH -u PKG_CONFIG_SYSROOT_DIR -u PKG_CONFIG \
    PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu="$pc" PKG_CONFIG_ALLOW_CROSS=1 \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--target=aarch64-linux-gnu --sysroot=/usr/aarch64-linux-gnu -idirafter /usr/include" \
    npx --no-install napi build --platform --release --target $TRIPLE --target-dir "$STAGE" \
      --output-dir "$STAGE/out" --js index.js --dts index.d.ts
  for f in index.js index.d.ts; do
    cmp -s "$STAGE/out/$f" "$f" || die "$f differs from what napi generates for arm64"
  done
  cp "$STAGE/out/kvtransfer.linux-arm64-gnu.node" "$ADDON"
fi
[[ -f $ADDON ]] || die "$ADDON is missing (run without ARM64_SKIP_BUILD=1)"

# --- the addon: aarch64, nothing of rdma-core or CUDA linked ----------------------------
machine=$(readelf -h "$ADDON" | awk -F: '/Machine/ {gsub(/^ +/, "", $2); print $2}')
needed=$(readelf -d "$ADDON" | awk '/NEEDED/ {print $NF}' | tr -d '[]' | paste -sd' ')
glibc=$(readelf -W -V "$ADDON" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V | tail -1)
echo "  $(basename "$ADDON"): $machine; NEEDED: $needed; newest glibc symbol: $glibc"
# Debian 12's glibc is 2.36; the addon must load on glibc 2.34 (Ubuntu 22.04 has 2.35, RHEL 9 2.34).
if [[ $(printf '%s\n' "$glibc" GLIBC_2.34 | sort -V | tail -1) == GLIBC_2.34 ]]; then ok "glibc symbols up to 2.34 ($glibc)"
else bad "needs $glibc > GLIBC_2.34"; fi
[[ $machine == AArch64 ]] && ok "the addon is an AArch64 ELF" || bad "the addon is $machine, not AArch64"
if grep -Eq 'ibverbs|rdmacm|libcuda|libnl' <<<"$needed"; then bad "the addon links rdma-core or libcuda"
else ok "no NEEDED rdma-core or libcuda entry"; fi
if readelf -W --dyn-syms "$ADDON" | awk '$7 == "UND" {print $8}' | grep -Eq '^(ibv_|rdma_|cu[A-Z])'; then
  bad "undefined rdma-core or CUDA symbols"; else ok "no undefined ibv_/rdma_/cu* symbol"; fi

if ((BUILD_ONLY)); then
  echo "arm64-test (build only): $passed passed, $failed failed"
  ((failed == 0)); exit
fi

# --- running it: qemu-user and Debian's arm64 Node.js -----------------------------------
[[ -f lib/index.js ]] || npm run -s build:ts
RUNNER=$STAGE/node
cat >"$RUNNER" <<SH
#!/bin/sh
exec qemu-aarch64 -L "$ROOTFS" -E LD_LIBRARY_PATH="$ROOTFS/usr/lib/aarch64-linux-gnu:$ROOTFS/lib/aarch64-linux-gnu" "$ROOTFS/usr/bin/node" "\$@"
SH
chmod +x "$RUNNER"
# Without binfmt_misc (containers), a child started with process.execPath (an arm64 ELF)
# cannot exec: children fork through the runner instead. Nothing else is changed.
cat >"$STAGE/fork-through-qemu.cjs" <<'JS'
const childProcess = require('child_process')
const fork = childProcess.fork
childProcess.fork = function (modulePath, args, options) {
  if (!Array.isArray(args)) [args, options] = [[], args]
  return fork.call(this, modulePath, args, { ...options, execPath: process.env.KVT_ARM64_RUNNER })
}
JS
# The loader (index.js) finds the addon as an installed platform package would be found.
mkdir -p "$STAGE/node_path"
ln -sfn "$ROOT/npm/linux-arm64-gnu" "$STAGE/node_path/kvtransfer-linux-arm64-gnu"
# arm64 SECONDS ARGS...: arm64 Node.js with ARGS, killed after SECONDS.
arm64() {
  timeout "$1" env -u NAPI_RS_NATIVE_LIBRARY_PATH NODE_PATH="$STAGE/node_path" KVT_ARM64_RUNNER="$RUNNER" \
    NODE_OPTIONS="--require $STAGE/fork-through-qemu.cjs" KVCACHE_TRANSPORT=tcp "$RUNNER" "${@:2}"
}

loaded=$(arm64 60 -p "process.arch + ' ' + process.version + ' ' + require.resolve('kvtransfer-linux-arm64-gnu') + ' ' + require('./index.js').errorCodes().length" 2>&1) || true
echo "  $loaded"
if [[ $loaded == "arm64 "*"/npm/linux-arm64-gnu/kvtransfer.linux-arm64-gnu.node "[1-9]* ]]; then
  ok "the package's loader loads npm/linux-arm64-gnu under arm64 Node.js"
else bad "loading the addon under arm64 Node.js"; fi

log "the TCP demo under qemu-aarch64 (two arm64 processes)"
started=$SECONDS
if out=$(arm64 600 lib/demo.js 2>&1); then
  echo "$out" | tail -3
  grep -q '^demo: OK' <<<"$out" && ok "TCP demo, byte for byte ($((SECONDS - started)) s)" || bad "TCP demo did not print OK"
else echo "$out" | tail -20; bad "TCP demo"; fi

log "the README's Quick start under qemu-aarch64 (compiled by the host's tsc)"
QS=$STAGE/quickstart
rm -rf "$QS" && mkdir -p "$QS"
node -e '
  const fs = require("fs")
  const readme = fs.readFileSync("README.md", "utf8")
  const rest = readme.slice(readme.search(/^## Quick start[ \t]*$/m))
  const section = rest.slice(0, rest.slice(3).search(/^## /m) + 3 || undefined)
  const block = /^```ts[ \t]*\n([\s\S]*?)^```[ \t]*$/m.exec(section)
  if (!block) { console.error("README.md: no ```ts block under ## Quick start"); process.exit(1) }
  fs.writeFileSync(process.argv[1], block[1].replace(/(\bfrom\s*)([\x27"])kvtransfer\2/g, (_, f) => f + JSON.stringify(process.argv[2])))
' "$QS/quickstart.mts" "$ROOT/lib/index.js"
if npx --no-install tsc --strict --target es2022 --module nodenext --moduleResolution nodenext --skipLibCheck \
     --types node --outDir "$QS" "$QS/quickstart.mts" >"$QS/tsc.log" 2>&1; then
  started=$SECONDS
  if out=$(arm64 300 "$QS/quickstart.mjs" 2>&1); then
    echo "$out" | tail -3; ok "README Quick start exits 0 ($((SECONDS - started)) s)"
  else echo "$out" | tail -20; bad "README Quick start"; fi
else cat "$QS/tsc.log"; bad "tsc of the Quick start"; fi

echo
echo "arm64-test: $passed passed, $failed failed"
((failed == 0))
