#!/usr/bin/env bash
# GPU tests of the engine: the CRC-32C kernel, the NVLink transport between two processes, device regions
# over TCP (pinned staging), detection at
# registration, dma-buf export, and the device-vs-host throughput grid.
#
#   scripts/gpu-tests.sh           build the x86-64 test binaries into target/gpu-bin/ and
#                                  print how to run them on a GPU machine
#   scripts/gpu-tests.sh --run     build (unless --no-build) and run them here
#
# The GPU tests are #[ignore]d (a plain `cargo test` reports them as ignored); --run runs them
# with --ignored, and then any problem fails them, a missing GPU or driver included.
# The GPU machine needs no Rust, CUDA toolkit or Node.js: only the NVIDIA driver
# (libcuda.so.1), which the engine loads at run time. Copy target/gpu-bin/ there (it is
# under target/, so git ignores it; ~5 MiB) and run `scripts/gpu-tests.sh --run --no-build`
# from the repository root. The binaries land in target/gpu-bin/ of this checkout whatever
# CARGO_TARGET_DIR says (cargo reports where it built them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-bin
run=0
build=1
for arg in "$@"; do
  case "$arg" in
    --run) run=1 ;;
    --no-build) build=0 ;;
    *) echo "usage: $0 [--run] [--no-build]" >&2; exit 2 ;;
  esac
done

if [ "$build" = 1 ]; then
  mkdir -p "$out"
  # gpu_tcp, gpu_bench: the GPU suite; tcp: the default host suite, to show a CUDA host
  # keeps its host path; doctor: what `kvtransfer doctor` reports of the GPUs.
  # nvlink_peer: the decode process of the NVLink tests (gpu_nvlink spawns it).
  { cargo test --release -p kvtransfer-engine --no-run --message-format=json \
      --test gpu_tcp --test gpu_bench --test tcp --test gpu_nvlink --test gpu_nvlink_bench --test gpu_fence --test gpu_acked --test gpu_crc32c --test gpu_checksum --test gpu_warm --test doctor
    cargo build --release -p kvtransfer-engine --message-format=json --example nvlink_peer; } \
    | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and (
            m["profile"]["test"] or "example" in m["target"]["kind"]):
        name = m["target"]["name"]
        shutil.copy(m["executable"], sys.argv[1] + "/" + name)
        print("built", sys.argv[1] + "/" + name)
' "$out"
  for bin in "$out"/*; do
    if readelf -d "$bin" | grep -q 'libcuda'; then
      echo "error: $bin links libcuda at build time" >&2
      exit 1
    fi
  done
  echo "no binary in $out links libcuda (loaded at run time only)"
fi

if [ "$run" = 0 ]; then
  cat <<EOM
Built. On a GPU machine, from the repository root with $out copied over:
  scripts/gpu-tests.sh --run --no-build
(device tool: carry ["$out"], command "scripts/gpu-tests.sh --run --no-build")
EOM
  exit 0
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
export KVT_GPU_BENCH_OUT="${KVT_GPU_BENCH_OUT:-${OUT:-/tmp}/gpu-bench.md}"
# The CRC-32C kernel alone: its sums equal the CPU's, and its throughput.
timeout 300 "$out/gpu_crc32c" --ignored --nocapture --test-threads=1
timeout 300 "$out/gpu_tcp" --ignored --nocapture --test-threads=1
# The same checks on the copy engines alone (no copy kernel), and one copy per block.
KVCACHE_CUDA_COPY_KERNEL=0 timeout 300 "$out/gpu_tcp" --ignored --test-threads=1 -q
KVCACHE_CUDA_COPY_KERNEL=0 KVCACHE_CUDA_BATCH_COPY=0 timeout 300 "$out/gpu_tcp" --ignored --test-threads=1 -q
timeout 120 "$out/tcp" --test-threads=2
# NVLink between two processes (decode on the last GPU: GPU 1 on a 2-GPU host), then
# its grid: the default copy path, the copy engines alone, and one copy per block.
timeout 300 "$out/gpu_nvlink" --ignored --nocapture --test-threads=1
# Warm re-attach of cuMem regions (imported as the sidecar imports them) over NVLink and TCP.
timeout 300 "$out/gpu_warm" --ignored --nocapture --test-threads=1
timeout 300 "$out/gpu_nvlink_bench" --ignored --nocapture --test-threads=1
# Fences over NVLink: fenced writes never land after the writer's acknowledgement.
timeout 300 "$out/gpu_fence" --ignored --nocapture --test-threads=1
# delivery: 'acked' over NVLink: resolved means the receiving engine took the arrival.
timeout 120 "$out/gpu_acked" --ignored --nocapture --test-threads=1
# checksum: 'crc32c' between GPU regions over NVLink and TCP: verified arrivals, a
# corrupted byte seen (a child process with the receiver's test hook), and the cost side by
# side with plain calls.
timeout 300 "$out/gpu_checksum" --ignored --nocapture --test-threads=1
KVCACHE_CUDA_COPY_KERNEL=0 timeout 300 "$out/gpu_nvlink_bench" --ignored --nocapture --exact nvlink_bench_grid
KVCACHE_CUDA_COPY_KERNEL=0 KVCACHE_CUDA_BATCH_COPY=0 \
  timeout 300 "$out/gpu_nvlink_bench" --ignored --nocapture --exact nvlink_bench_grid
# kvtransfer doctor's GPU section (driver version, GPUs, peer-access matrix), printed.
timeout 120 "$out/doctor" --ignored --nocapture --test-threads=1
timeout 300 "$out/gpu_bench" --ignored --nocapture --test-threads=1
echo "throughput table: $KVT_GPU_BENCH_OUT"
if [ "${GPU_BENCH_AB:-0}" = 1 ]; then
  # The same grid on the copy engines only (cuMemcpyBatchAsync), then with one
  # cuMemcpyAsync per block (no kernel, no batch API).
  KVCACHE_CUDA_COPY_KERNEL=0 KVT_GPU_BENCH_OUT="${KVT_GPU_BENCH_OUT%.md}-batch.md" \
    timeout 300 "$out/gpu_bench" --ignored --nocapture --test-threads=1
  KVCACHE_CUDA_COPY_KERNEL=0 KVCACHE_CUDA_BATCH_COPY=0 \
    KVT_GPU_BENCH_OUT="${KVT_GPU_BENCH_OUT%.md}-per-copy.md" \
    timeout 300 "$out/gpu_bench" --ignored --nocapture --test-threads=1
fi
