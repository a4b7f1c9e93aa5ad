#!/usr/bin/env bash
# Assembles what a GPU machine (no Node.js, no registry) needs to run the package there,
# in bench-out/gpu/ (git-ignored; carry it with the device tool):
#   node.xz     this host's node, xz-compressed (xz -dc node.xz > node on the machine)
#   pkg/        the built package: lib/, index.js, package.json, the .node addon and
#               node_modules/{zeromq (linux/x64 only), cmake-ts, node-addon-api}
# Build first (npx napi build --platform --release ...; npm run build:ts).
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench-out/gpu
rm -rf "$out/pkg"
mkdir -p "$out/pkg/node_modules"
cp -r lib index.js package.json kvtransfer.linux-x64-gnu.node "$out/pkg/"
for m in zeromq cmake-ts node-addon-api; do cp -r "node_modules/$m" "$out/pkg/node_modules/"; done
find "$out/pkg/node_modules/zeromq/build" -mindepth 1 -maxdepth 1 -type d ! -name linux -exec rm -rf {} +
find "$out/pkg/node_modules/zeromq/build/linux" -mindepth 1 -maxdepth 1 -type d ! -name x64 -exec rm -rf {} +
[[ -s $out/node.xz && $out/node.xz -nt "$(command -v node)" ]] || xz -9 -c "$(command -v node)" > "$out/node.xz"
du -sh "$out"
