#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine needs, then the npm dependencies. Idempotent; run
# as root (or with sudo available).
#
#   bash scripts/setup-debian.sh           # what `npm run demo` and `npm run build` need
#   bash scripts/setup-debian.sh --tests   # that, plus what `npm test` needs (scripts/test-all.sh
#                                          # runs this itself, so the README's two commands stay
#                                          # the whole set-up)
#   bash scripts/setup-debian.sh [--tests] --list   # what it would install, one per line
#                                                    # (`apt PKG`, `cargo CRATE`); installs nothing
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo
TESTS=0 LIST=0
for arg in "$@"; do
  case $arg in
    --tests) TESTS=1 ;;
    --list) LIST=1 ;;
    *) echo "usage: bash scripts/setup-debian.sh [--tests] [--list]" >&2; exit 2 ;;
  esac
done

# Build (the demo's path): C toolchain, libclang for rdma-sys' bindgen, rdma-core headers
# (only at build time: the addon loads libibverbs at run time).
BUILD_PKGS=(build-essential pkg-config libclang-dev clang libibverbs-dev librdmacm-dev)
# Tests: the Soft-RoCE VM (qemu, busybox, rdma-core tools and providers, perftest), and the
# tools the suites call (iproute2, xz, python3 for the client tests, binutils' readelf), and
# etcd-server, whose etcd the registry tests start on loopback ports.
TEST_PKGS=(ibverbs-providers ibverbs-utils rdmacm-utils perftest
           qemu-system-x86 busybox-static iproute2 xz-utils python3 binutils
           etcd-server)

# Compiled with `cargo install` (tests only): the supply-chain checks of deny.toml.
TEST_CRATES=(cargo-deny)

PKGS=("${BUILD_PKGS[@]}") CRATES=()
((TESTS)) && PKGS+=("${TEST_PKGS[@]}") CRATES+=("${TEST_CRATES[@]}")
if ((LIST)); then
  printf 'apt %s\n' "${PKGS[@]}"
  ((${#CRATES[@]} == 0)) || printf 'cargo %s\n' "${CRATES[@]}"
  exit 0
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] apt: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v node >/dev/null || (( $(node -p 'process.versions.node.split(".")[0]') < 20 )); then
  echo "[setup] Node.js >= 20 is required: install it (e.g. from nodesource; Debian 12's nodejs is 18)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "[setup] a Rust toolchain (cargo >= 1.89) is required: install it with rustup" >&2
  exit 1
fi

if ((TESTS)); then
  # The lint step's tools (rust-toolchain.toml lists them too).
  rustup component add clippy rustfmt >/dev/null 2>&1 || true
  # Compiles from crates.io: minutes, once.
  for crate in "${CRATES[@]}"; do
    if ! cargo "${crate#cargo-}" --version >/dev/null 2>&1; then
      echo "[setup] cargo install $crate --locked (compiles, a few minutes)"
      cargo install "$crate" --locked
    fi
  done
fi

# npm dependencies: once per checkout (again when package-lock.json changed).
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  echo "[setup] npm ci"
  # A registry mirror that serves only this platform's optional packages cannot satisfy a
  # lock file's full optional-dependency list; `npm install` then installs the same pinned
  # versions from the lock file and skips the unavailable platforms.
  if ! npm ci --no-audit --no-fund --loglevel=error 2>/tmp/kvtransfer-npm-ci.log; then
    grep -q 'Missing: .* from lock file' /tmp/kvtransfer-npm-ci.log || { cat /tmp/kvtransfer-npm-ci.log >&2; exit 1; }
    echo "[setup] npm ci: the registry lacks other platforms' optional packages; using npm install"
    npm install --no-audit --no-fund --loglevel=error
  fi
fi
# The toolchain CI and releases build with: the workspace's `rust-version` (1.89) is the
# oldest that builds it; rust-toolchain.toml names the one it is tested with. Fuzzing (fuzz/,
# `cargo fuzz`) needs a nightly toolchain besides it: `rustup toolchain install nightly`,
# then `cargo +nightly fuzz run <target>` (docs/fuzzing.md); scripts/test-all.sh runs each
# target briefly when nightly is installed.
