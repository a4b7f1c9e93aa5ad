#!/usr/bin/env python3
"""What one layer call costs through the sidecar, from Python.

Starts two sidecars (``node lib/cli.js serve``; or uses running ones with --socket-a/-b),
attaches a decode worker to B (its own process) and a prefill worker to A (this process),
both on host memory in memfds, TCP between the sidecars on 127.0.0.1 (--host), prepares
one list of every block, and times sequential ``write_cache(peer, prepared,
layer=i % layers).result()`` calls: each from the call issued to its future resolved.
Prints one JSON object on stdout (progress on stderr).

The method is ``kvtransfer bench --prepared``'s (ts/bench/driver.ts), so that the two put
side by side (scripts/bench-sidecar.sh) differ only by the sidecar path: the same blocks
per call (--blocks = its --batch, every block of a region), scattered ids (random
permutations), layers cycled from 0, one untimed call per layer plus --warmup more (default
2, as its --warmup), one call in flight, p50/p99 by nearest rank, GB/s = K+V bytes of the
timed calls / the timed run's seconds, and a sample of blocks compared at the end.

    python3 clients/python/bench.py                      # 1538 blocks x 64 KiB, 4 layers
    python3 clients/python/bench.py --block-bytes 1K     # 1538 blocks x 1 KiB
    python3 clients/python/bench.py --blocks 1 --block-bytes 1K     # the fixed cost of a call
    python3 clients/python/bench.py --inflight 4         # 4 calls in flight (pipelined)
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import kvtransfer  # noqa: E402
from kvtransfer.regions import HostRegion  # noqa: E402


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """``64K``, ``1M``, ``65536`` → bytes (as ``kvtransfer bench --sizes``)."""
    m = re.fullmatch(r"(\d+)\s*([kKmM]?)(i?[bB])?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 1K, 65536, 1M)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


class Memory:
    """``layers`` x (K, V) regions of ``blocks * block_bytes`` in one memfd, mapped here and touched."""

    def __init__(self, name: str, layers: int, blocks: int, block_bytes: int, fill: bool) -> None:
        self.layers, self.blocks, self.block_bytes = layers, blocks, block_bytes
        self.region_bytes = blocks * block_bytes
        self.size = 2 * layers * self.region_bytes
        self.fd = os.memfd_create(name)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)
        # Touched now (as kvtransfer bench fills its regions), so that no call pays first-touch faults.
        chunk = os.urandom(1 << 20) if fill else bytes(1 << 20)
        for start in range(0, self.size, len(chunk)):
            end = min(self.size, start + len(chunk))
            self.map[start:end] = chunk[: end - start]
        if fill:  # different bytes in every block: its index at its start
            for block in range(0, self.size // block_bytes):
                self.map[block * block_bytes : block * block_bytes + min(8, block_bytes)] = block.to_bytes(8, "little")[:block_bytes]

    def offset(self, layer: int, kind: int, block: int = 0) -> int:
        return (2 * layer + kind) * self.region_bytes + block * self.block_bytes

    def block(self, layer: int, kind: int, block: int) -> bytes:
        start = self.offset(layer, kind, block)
        return self.map[start : start + self.block_bytes]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def attach_args(fd: int, layers: int, blocks: int, block_bytes: int) -> Dict[str, Any]:
    region = blocks * block_bytes
    return {
        "block_number": blocks,
        "block_bytes": block_bytes,
        "key_cache": [HostRegion(fd, (2 * l) * region, region) for l in range(layers)],
        "value_cache": [HostRegion(fd, (2 * l + 1) * region, region) for l in range(layers)],
    }


class Sidecar:
    def __init__(self, node: str, cli: str, path: str) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [node, cli, "serve", "--socket", path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not _connectable(path):
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: `{cli} serve` exited ({self.proc.returncode}): {self.proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"bench: `{cli} serve` did not listen on {path} within 60 s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def percentile(sorted_values: List[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (ts/bench/common.ts's)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


def decode_worker(socket_path: str, fd: int, layers: int, blocks: int, block_bytes: int, transport: str) -> int:
    """The decode worker's process: attaches B's memory, prints its port, stays until stdin closes."""
    worker = kvtransfer.attach(socket_path, role="decode", transport=transport, name="bench-decode",
                               **attach_args(fd, layers, blocks, block_bytes))
    print(json.dumps({"port": worker.port}), flush=True)
    sys.stdin.read()  # untagged writes push no events: nothing to read meanwhile
    worker.detach()
    return 0


def start_decode_worker(args: argparse.Namespace, socket_b: str, dst: Memory, layers: int) -> Tuple[subprocess.Popen, int]:
    cmd = [sys.executable, os.path.abspath(__file__), "--decode-worker", socket_b, str(dst.fd), str(layers),
           str(args.blocks), str(args.block_bytes), args.transport]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(dst.fd,), text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise SystemExit(f"bench: the decode worker exited ({proc.wait()}) before attaching")
    return proc, int(json.loads(line)["port"])


def run(args: argparse.Namespace) -> Dict[str, Any]:
    layers = args.layers
    tmp = tempfile.mkdtemp(prefix="kvt-bench-", dir="/tmp")
    sidecars: List[Sidecar] = []
    if args.socket_a and args.socket_b:
        socket_a, socket_b = args.socket_a, args.socket_b
    else:
        socket_a, socket_b = os.path.join(tmp, "a.sock"), os.path.join(tmp, "b.sock")
        log(f"starting two sidecars ({args.cli} serve)")
        sidecars = [Sidecar(args.node, args.cli, socket_a), Sidecar(args.node, args.cli, socket_b)]
    src = dst = None
    prefill = None
    decode = None
    try:
        side_bytes = 2 * layers * args.blocks * args.block_bytes
        log(f"{layers} layers x (K, V) x {args.blocks} blocks x {args.block_bytes} B: {side_bytes / 2**20:.1f} MiB per side")
        src = Memory("kvt-bench-src", layers, args.blocks, args.block_bytes, fill=True)
        dst = Memory("kvt-bench-dst", layers, args.blocks, args.block_bytes, fill=False)
        decode, decode_port = start_decode_worker(args, socket_b, dst, layers)
        prefill = kvtransfer.attach(socket_a, role="prefill", transport=args.transport, name="bench-prefill",
                                    **attach_args(src.fd, layers, args.blocks, args.block_bytes))
        peer = prefill.connect(args.host, decode_port, timeout=60)
        local = list(range(args.blocks))
        remote = list(range(args.blocks))
        if args.pattern == "scattered":
            rng = random.Random(1)
            rng.shuffle(local)
            rng.shuffle(remote)
        prepared = prefill.prepare_blocks(peer, local, remote)
        bytes_per_call = 2 * args.blocks * args.block_bytes  # K and V of one layer

        log(f"warm-up: {layers} + {args.warmup} calls")
        for layer in range(layers):
            prefill.write_cache(peer, prepared, layer=layer).result(120)
        for i in range(args.warmup):
            prefill.write_cache(peer, prepared, layer=i % layers).result(120)

        log(f"timed: {args.iterations} calls, {args.inflight} in flight")
        latencies_ns: List[int] = []
        clock = time.perf_counter_ns
        write = prefill.write_cache
        started = clock()
        if args.inflight <= 1:
            for i in range(args.iterations):
                t0 = clock()
                write(peer, prepared, layer=i % layers).result(120)
                latencies_ns.append(clock() - t0)
        else:
            window: List[Tuple[int, Any]] = []
            issued = 0
            while issued < args.iterations or window:
                while issued < args.iterations and len(window) < args.inflight:
                    window.append((clock(), write(peer, prepared, layer=issued % layers)))
                    issued += 1
                t0, future = window.pop(0)
                future.result(120)
                latencies_ns.append(clock() - t0)
        elapsed_ns = clock() - started

        verified = None
        if not args.no_verify:
            rng = random.Random(2)
            samples = rng.sample(range(args.blocks), min(512, args.blocks))
            verified = all(
                src.block(layer, kind, local[i]) == dst.block(layer, kind, remote[i])
                for i in samples
                for layer in range(layers)
                for kind in (0, 1)
            )
        us = sorted(ns / 1000 for ns in latencies_ns)
        info = prefill.peer_info(args.host, decode_port)
        report = {
            "bench": "python-sidecar",
            "transport": info.transport if info else prefill.transport,
            "blocks": args.blocks,
            "block_bytes": args.block_bytes,
            "layers": layers,
            "pattern": args.pattern,
            "bytes_per_call": bytes_per_call,
            "iterations": args.iterations,
            "warmup": layers + args.warmup,
            "inflight": args.inflight,
            "p50_us": round(percentile(us, 0.50), 1),
            "p99_us": round(percentile(us, 0.99), 1),
            "mean_us": round(statistics.fmean(us), 1),
            "min_us": round(us[0], 1),
            "max_us": round(us[-1], 1),
            "seconds": round(elapsed_ns / 1e9, 6),
            "gbps": round(bytes_per_call * args.iterations / elapsed_ns, 4),  # bytes/ns = GB/s
            "verified": verified,
            "python": platform.python_version(),
            "client": kvtransfer.__version__,
            "sidecar": prefill.sidecar_version,
            "cpus": os.cpu_count(),
        }
        prepared.release()
        return report
    finally:
        if prefill is not None:
            try:
                prefill.detach()
            except kvtransfer.KvTransferError:
                pass
        if decode is not None:
            decode.stdin.close()  # type: ignore[union-attr]
            try:
                decode.wait(15)
            except subprocess.TimeoutExpired:
                decode.kill()
                decode.wait()
        for sidecar in sidecars:
            sidecar.stop()
        for memory in (src, dst):
            if memory is not None:
                memory.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    if len(sys.argv) == 8 and sys.argv[1] == "--decode-worker":
        a = sys.argv[2:]
        return decode_worker(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1538, help="blocks per region = ids per call (default 1538)")
    parser.add_argument("--block-bytes", type=parse_size, default=None, help="bytes per block: 1K, 65536, ... (default 64K)")
    parser.add_argument("--small", action="store_true", help="same as --block-bytes 1K")
    parser.add_argument("--layers", type=int, default=4, help="layers, each K and V (default 4)")
    parser.add_argument("--iterations", type=int, default=500, help="timed calls (default 500)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed calls after one per layer (default 2, as kvtransfer bench)")
    parser.add_argument("--inflight", type=int, default=1, help="calls in flight (default 1: sequential)")
    parser.add_argument("--pattern", choices=("scattered", "contiguous"), default="scattered",
                        help="block ids: random permutations (default, as kvtransfer bench) or 0..n-1")
    parser.add_argument("--transport", default="tcp", choices=("tcp", "rdma", "auto"), help="default tcp")
    parser.add_argument("--host", default="127.0.0.1", help="the address the prefill connects to (default 127.0.0.1)")
    parser.add_argument("--node", default=os.environ.get("KVTRANSFER_NODE", "node"))
    parser.add_argument("--cli", default=os.environ.get("KVTRANSFER_CLI") or os.path.join(REPO, "lib", "cli.js"))
    parser.add_argument("--socket-a", help="a running sidecar for the prefill worker (with --socket-b)")
    parser.add_argument("--socket-b", help="a running sidecar for the decode worker")
    parser.add_argument("--no-verify", action="store_true", help="skip the sampled byte comparison at the end")
    parser.add_argument("--json", metavar="FILE", help="also write the report to FILE")
    args = parser.parse_args()
    if args.block_bytes is None:
        args.block_bytes = 1024 if args.small else 65536
    for name in ("blocks", "block_bytes", "layers", "iterations", "inflight"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    report = run(args)
    text = json.dumps(report)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if report["verified"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
