#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine needs to build and test kvtransfer, then the npm
# dependencies. Idempotent; run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=; [[ $(id -u) == 0 ]] || SUDO=sudo

# Build: C toolchain, libclang for rdma-sys' bindgen, rdma-core headers (only at build time:
# the addon loads libibverbs at run time). Soft-RoCE tests: qemu + rdma-core tools.
# Registry tests (test only): etcd-server, whose etcd they start on loopback ports.
PKGS=(build-essential pkg-config libclang-dev clang libibverbs-dev librdmacm-dev
      ibverbs-providers ibverbs-utils rdmacm-utils perftest
      qemu-system-x86 busybox-static iproute2 xz-utils python3 binutils
      etcd-server)
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
  echo "[setup] Node.js >= 20 is required: install it (e.g. from Debian's nodejs package or nodesource)" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "[setup] a Rust toolchain (cargo >= 1.88, with clippy and rustfmt) is required: install it with rustup" >&2
  exit 1
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true
# Supply-chain checks of scripts/test-all.sh (deny.toml). Compiles from crates.io: minutes.
if ! cargo deny --version >/dev/null 2>&1; then
  echo "[setup] cargo install cargo-deny --locked (compiles, a few minutes)"
  cargo install cargo-deny --locked
fi

echo "[setup] npm ci"
# A registry mirror that serves only this platform's optional packages cannot satisfy a
# lock file's full optional-dependency list; `npm install` then installs the same pinned
# versions from the lock file and skips the unavailable platforms.
if ! npm ci --no-audit --no-fund --loglevel=error 2>/tmp/kvtransfer-npm-ci.log; then
  grep -q 'Missing: .* from lock file' /tmp/kvtransfer-npm-ci.log || { cat /tmp/kvtransfer-npm-ci.log >&2; exit 1; }
  echo "[setup] npm ci: the registry lacks other platforms' optional packages; using npm install"
  npm install --no-audit --no-fund --loglevel=error
fi
