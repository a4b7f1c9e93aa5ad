#!/usr/bin/env bash
# Builds the release addons of every `napi.targets` entry (or of the triples given as
# arguments) on a glibc 2.17 baseline with `napi build --use-napi-cross`, checks each one,
# and puts it into its per-platform package under npm/<platform>/.
#
#   bash scripts/build-release.sh                               # all napi.targets
#   bash scripts/build-release.sh x86_64-unknown-linux-gnu      # just one
#   KVTRANSFER_PREPUBLISH=1 bash scripts/build-release.sh       # also `napi pre-publish`
#                                                               # (no publish, see docs)
#
# Everything it builds lives under target/napi-cross/ (its own cargo target dir, so the
# development build in target/release is left alone). See docs/packaging.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=$ROOT/target/napi-cross
ARTIFACTS=$STAGE/artifacts
NAPI=(node "$ROOT/node_modules/@napi-rs/cli/dist/cli.js")
log() { echo "[build-release] $*"; }
die() { echo "[build-release] ERROR: $*" >&2; exit 1; }

[[ -x node_modules/.bin/napi ]] || die "node_modules is missing: run npm ci first"
if (($#)); then TARGETS=("$@"); else
  mapfile -t TARGETS < <(node -p "require('./package.json').napi.targets.join('\n')")
fi
TOOLCHAIN_VERSION=$(node -p "require('@napi-rs/cross-toolchain/package.json').version")

# rdma-sys (crates/verbs) runs bindgen over rdma-core's headers and asks pkg-config for
# `-libverbs -lrdmacm`. The addon uses no symbol of either library (it dlopen()s
# libibverbs at run time), so those flags must only *resolve*: `--as-needed` then drops
# them. We do NOT let pkg-config hand out the host's `-L/usr/lib/<multiarch>`: that puts the
# host's glibc 2.36 libc.so/libm.so in front of the 2.17 sysroot. Instead, per target:
#   * pkgconfig/<triple>/lib{ibverbs,rdmacm}.pc: Cflags = the host's rdma-core headers
#     (architecture independent), Libs = -L stubs/<triple> -l<name>;
#   * stubs/<triple>/lib{ibverbs,rdmacm}.a: empty archives (link nothing, add no NEEDED);
#   * BINDGEN_EXTRA_CLANG_ARGS: the cross sysroot for libc/kernel headers, and
#     `-idirafter /usr/include`, which demotes rdma-sys' hard-coded `-I/usr/include` behind
#     the sysroot (clang drops a -I dir that is also a system dir).
# The checks below then prove that nothing of rdma-core or of glibc > 2.17 got in.
for tool in pkg-config readelf ar clang; do command -v $tool >/dev/null || die "$tool is missing (scripts/setup-debian.sh)"; done
pkg-config --exists 'libibverbs >= 1.8.28' 'librdmacm >= 1.2.28' || die "rdma-core headers missing: apt-get install libibverbs-dev librdmacm-dev"
RDMA_INCLUDE=$STAGE/rdma-include
mkdir -p "$RDMA_INCLUDE" "$ARTIFACTS"
ln -sfn "$(pkg-config --variable=includedir libibverbs)/infiniband" "$RDMA_INCLUDE/infiniband"
ln -sfn "$(pkg-config --variable=includedir librdmacm)/rdma" "$RDMA_INCLUDE/rdma"

# check_addon FILE: glibc baseline, no rdma-core dependency. Prints the evidence.
check_addon() {
  local node=$1 bad=0
  local needed versions newest undef
  needed=$(readelf -d "$node" | awk '/NEEDED/ {print $NF}' | tr -d '[]' | paste -sd' ')
  versions=$(readelf -W -V "$node" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V | paste -sd' ')
  newest=$(tr ' ' '\n' <<<"$versions" | sort -V | tail -1)
  undef=$(readelf -W --dyn-syms "$node" | awk '$7 == "UND" {print $8}' | grep -E '^(ibv_|rdma_|ibverbs|mlx)' || true)
  echo "  $(basename "$node"): $(readelf -h "$node" | awk -F: '/Machine/ {gsub(/^ +/, "", $2); print $2}')"
  echo "    NEEDED: $needed"
  echo "    glibc symbol versions: $versions (newest: ${newest:-none})"
  if grep -Eq 'ibverbs|rdmacm|libnl' <<<"$needed"; then echo "    FAIL: NEEDED rdma-core entry"; bad=1; fi
  if [[ -n $newest && $(printf '%s\n' "$newest" GLIBC_2.17 | sort -V | tail -1) != GLIBC_2.17 ]]; then
    echo "    FAIL: needs $newest > GLIBC_2.17:"; readelf -W --dyn-syms "$node" | grep -E 'GLIBC_2\.(1[89]|[2-9][0-9])' | head; bad=1
  fi
  if [[ -n $undef ]]; then echo "    FAIL: undefined rdma-core symbols: $undef"; bad=1; fi
  return $bad
}

for triple in "${TARGETS[@]}"; do
  platform=$(node -e "
    const [arch, , sys, abi] = process.argv[1].split('-')
    const cpu = { x86_64: 'x64', aarch64: 'arm64' }[arch] ?? arch
    console.log(sys + '-' + cpu + (abi ? '-' + abi : ''))" "$triple")
  [[ $triple == *-linux-gnu ]] || die "$triple: only *-linux-gnu targets are built by this script"
  if [[ $triple == aarch64-unknown-linux-gnu ]]; then
    # napi's cross toolchain pinned here (1.0.0) has no aarch64 build (docs/packaging.md):
    # Debian's aarch64 toolchain builds and checks it (glibc 2.34 baseline).
    log "$triple ($platform): scripts/arm64-test.sh --build-only (Debian's gcc-aarch64-linux-gnu)"
    bash scripts/arm64-test.sh --build-only || die "the arm64 build failed"
    cp "npm/$platform/kvtransfer.$platform.node" "$ARTIFACTS/"
    continue
  fi
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
    die "Rust std for $triple is not installed: rustup target add $triple"
  fi
  log "$triple ($platform): napi build --use-napi-cross (toolchain @napi-rs/cross-toolchain $TOOLCHAIN_VERSION, glibc 2.17)"
  sysroot=$HOME/.napi-rs/cross-toolchain/$TOOLCHAIN_VERSION/$triple/$triple/sysroot
  stubs=$STAGE/stubs/$triple pc=$STAGE/pkgconfig/$triple
  mkdir -p "$stubs" "$pc"
  rm -f "$stubs"/*.a && ar rc "$stubs/libibverbs.a" && ar rc "$stubs/librdmacm.a"
  for lib in libibverbs:ibverbs librdmacm:rdmacm; do
    cat >"$pc/${lib%%:*}.pc" <<EOF
Name: ${lib%%:*}
Description: link stub for the kvtransfer release build (the addon dlopen()s rdma-core at run time)
Version: $(pkg-config --modversion "${lib%%:*}")
Cflags: -I$RDMA_INCLUDE
Libs: -L$stubs -l${lib#*:}
EOF
  done
  under=${triple//-/_}
  rm -f "$ARTIFACTS/kvtransfer.$platform.node"
  env -u PKG_CONFIG_PATH -u PKG_CONFIG_SYSROOT_DIR -u PKG_CONFIG \
    "PKG_CONFIG_LIBDIR_$under=$pc" PKG_CONFIG_ALLOW_CROSS=1 \
    BINDGEN_EXTRA_CLANG_ARGS="--sysroot=$sysroot -idirafter /usr/include" \
    "${NAPI[@]}" build --platform --release --use-napi-cross --target "$triple" \
      --target-dir "$STAGE" --output-dir "$ARTIFACTS" \
      --js index.js --dts index.d.ts  # (both relative to --output-dir)
  [[ -f $ARTIFACTS/kvtransfer.$platform.node ]] || die "napi build produced no $ARTIFACTS/kvtransfer.$platform.node"
  log "checking $platform"
  check_addon "$ARTIFACTS/kvtransfer.$platform.node" || die "kvtransfer.$platform.node fails the release checks"
done

# The loader and types napi generates must be the committed ones (they are what ships).
for f in index.js index.d.ts; do
  if [[ -f $ARTIFACTS/$f ]] && ! cmp -s "$ARTIFACTS/$f" "$f"; then
    diff -u "$f" "$ARTIFACTS/$f" | head -40
    die "$f differs from what napi generates: run npm run build:native and commit it"
  fi
done

log "npm/<platform> packages: napi create-npm-dirs + napi artifacts"
"${NAPI[@]}" create-npm-dirs --npm-dir npm >/dev/null
mapfile -t ALL_TARGETS < <(node -p "require('./package.json').napi.targets.join('\n')")
if [[ ${TARGETS[*]} == "${ALL_TARGETS[*]}" ]]; then
  "${NAPI[@]}" artifacts --output-dir "$ARTIFACTS" --npm-dir npm
else
  # `napi artifacts` insists on every configured target; for a subset, copy the same way.
  for triple in "${TARGETS[@]}"; do
    platform=$(node -p "require('./package.json').napi.targets.length && (([a, , s, abi]) => s + '-' + ({ x86_64: 'x64', aarch64: 'arm64' }[a] ?? a) + (abi ? '-' + abi : ''))(process.argv[1].split('-'))" "$triple")
    cp "$ARTIFACTS/kvtransfer.$platform.node" "npm/$platform/"
  done
fi

if [[ ${KVTRANSFER_PREPUBLISH:-0} == 1 ]]; then
  # Writes optionalDependencies into package.json and versions into npm/*/package.json;
  # --skip-optional-publish: runs no `npm publish` (see docs/packaging.md for the real one).
  log "napi pre-publish --skip-optional-publish (nothing is published)"
  "${NAPI[@]}" pre-publish -t npm --npm-dir npm --skip-optional-publish
fi
log "done: $(cd npm && ls */*.node | paste -sd' ')"
