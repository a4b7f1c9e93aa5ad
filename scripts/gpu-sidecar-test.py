#!/usr/bin/env python3
"""GPU test of the sidecar with PyTorch (runs on a GPU machine; docs/gpu.md).

Two PyTorch processes own paged KV caches on the GPU in vLLM's layout: per layer
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (bf16; or fp8 with per-block fp32
scale caches). Each shares its cache with its own sidecar (``kvtransfer serve``) through
``untyped_storage()._share_cuda_()`` (the CUDA IPC record, or with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` the cuMem fds). The prefill worker
writes scattered blocks of every layer: prefill → sidecar A → NVLink or TCP → sidecar B →
decode, and the decode worker checks every moved block with ``torch.equal`` (and that no
other block changed). Then it times sequential per-layer calls with a prepared list.

The warm cases (``*-warm``: expandable segments, so the cache is shared as cuMem fds) test a
warm re-attach of the decode side: the decode worker attaches with a ``slot``, takes the
prefill's writes and is SIGKILLed; while its communicator is parked the prefill's writes
are refused (``ERR_FENCED``); a new decode worker process attaches with the same slot and
gets the parked communicator (same port) with its new tensors swapped in, and the
prefill's next calls, on the same peer handle with no reconnect, land in the new worker's
tensors (``torch.equal``; every other block still zero).

    python3 scripts/gpu-sidecar-test.py --node NODE --cli lib/cli.js [--json OUT]

Exit status 0 when every case verified.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))

LAYERS = 4
NUM_BLOCKS = 256
BLOCK_SIZE = 16
KV_HEADS = 8
HEAD_DIM = 128
MOVED = 200  # blocks moved per layer (scattered)
TIMED_CALLS = 300

# name: (dtype, scales, transport, expandable segments)
CASES = {
    "bf16-ipc-nvlink": ("bf16", False, "nvlink", False),
    "bf16-ipc-tcp": ("bf16", False, "tcp", False),
    "fp8-scales-ipc-nvlink": ("fp8", True, "nvlink", False),
    "fp8-scales-ipc-tcp": ("fp8", True, "tcp", False),
    "bf16-vmm-nvlink": ("bf16", False, "nvlink", True),
    "bf16-vmm-tcp": ("bf16", False, "tcp", True),
    "bf16-vmm-nvlink-warm": ("bf16", False, "nvlink", True),
    "bf16-vmm-tcp-warm": ("bf16", False, "tcp", True),
}


def block_lists():
    rng = random.Random(7)
    local = rng.sample(range(NUM_BLOCKS), MOVED)
    remote = rng.sample(range(NUM_BLOCKS), MOVED)
    return local, remote


def make_cache(torch, dtype_name, scales, filled):
    """Per layer the KV tensor (and K/V scale tensors); random from a fixed seed when filled."""
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float8_e4m3fn
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    kv, key_scales, value_scales = [], [], []
    for layer in range(LAYERS):
        gen = torch.Generator(device="cuda").manual_seed(1000 + layer)
        if filled:
            t = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
        else:
            t = torch.zeros(shape, device="cuda", dtype=dtype)
        kv.append(t)
        if scales:
            sshape = (NUM_BLOCKS, KV_HEADS * BLOCK_SIZE)
            if filled:
                key_scales.append(torch.rand(sshape, generator=gen, device="cuda"))
                value_scales.append(torch.rand(sshape, generator=gen, device="cuda"))
            else:
                key_scales.append(torch.zeros(sshape, device="cuda"))
                value_scales.append(torch.zeros(sshape, device="cuda"))
    torch.cuda.synchronize()
    return kv, key_scales, value_scales


def attach_worker(kvtransfer, torch_regions, socket, role, case, kv, key_scales, value_scales, slot=None):
    _dtype, scales, transport, _expandable = CASES[case]
    layout = torch_regions.cache_layout(kv)
    extra = {}
    if scales:
        extra = {
            "key_scale_cache": [torch_regions.region_of(s) for s in key_scales],
            "value_scale_cache": [torch_regions.region_of(s) for s in value_scales],
            "scale_block_bytes": KV_HEADS * BLOCK_SIZE * 4,
        }
    if slot is None:
        return kvtransfer.attach(socket, role=role, gpu_idx=0, transport=transport, **layout, **extra)
    # The killed predecessor holds the slot until its sidecar has parked its communicator.
    deadline = time.monotonic() + 60
    while True:
        try:
            return kvtransfer.attach(socket, role=role, gpu_idx=0, transport=transport, slot=slot, **layout, **extra)
        except kvtransfer.InvalidArgument as error:
            if "held" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def bytes_view(torch, t):
    return t.contiguous().view(torch.uint8)


def run_decode(args):
    import torch
    import kvtransfer
    from kvtransfer import torch_regions

    dtype, scales, _transport, _exp = CASES[args.case]
    kv, ks, vs = make_cache(torch, dtype, scales, filled=False)
    worker = attach_worker(kvtransfer, torch_regions, args.socket, "decode", args.case, kv, ks, vs)
    kinds = sorted({type(r).__name__ for r in torch_regions.cache_regions(kv)[0]})
    print(json.dumps({"port": worker.port, "transport": worker.transport, "regions": kinds}), flush=True)
    arrivals = worker.wait_for_arrival(args.tag, layers=LAYERS, timeout=120)
    torch.cuda.synchronize()
    src, sks, svs = make_cache(torch, dtype, scales, filled=True)
    local, remote = block_lists()
    moved = set(remote)
    mismatches = []
    for layer in range(LAYERS):
        for i, (l, r) in enumerate(zip(local, remote)):
            for kind in (0, 1):
                if not torch.equal(bytes_view(torch, kv[layer][kind, r]), bytes_view(torch, src[layer][kind, l])):
                    mismatches.append(f"layer {layer} {'KV'[kind]} block {l}->{r}")
            if scales:
                for name, dst_s, src_s in (("Kscale", ks, sks), ("Vscale", vs, svs)):
                    if not torch.equal(dst_s[layer][r], src_s[layer][l]):
                        mismatches.append(f"layer {layer} {name} block {l}->{r}")
        untouched = [b for b in range(NUM_BLOCKS) if b not in moved]
        if bytes_view(torch, kv[layer][:, untouched]).any():
            mismatches.append(f"layer {layer}: a block no call named changed")
    print(json.dumps({"role": "decode", "arrivals": len(arrivals), "mismatches": mismatches[:20], "mismatch_count": len(mismatches)}), flush=True)
    # Stay attached until the prefill has timed its calls.
    sys.stdin.readline()
    worker.detach()


def run_prefill(args):
    import torch
    import kvtransfer
    from kvtransfer import torch_regions

    dtype, scales, _transport, _exp = CASES[args.case]
    kv, ks, vs = make_cache(torch, dtype, scales, filled=True)
    worker = attach_worker(kvtransfer, torch_regions, args.socket, "prefill", args.case, kv, ks, vs)
    peer = worker.connect("127.0.0.1", args.peer_port, timeout=60)
    info = worker.peer_info("127.0.0.1", args.peer_port)
    local, remote = block_lists()
    prepared = worker.prepare_blocks(peer, local, remote)
    futures = [worker.write_cache(peer, prepared, layer=layer, tag=args.tag) for layer in range(LAYERS)]
    for f in futures:
        f.result(timeout=120)
    # Timed: sequential calls of one layer each, from write_cache to the future resolved.
    latencies = []
    layer_bytes = MOVED * 2 * kv[0][0, 0].numel() * kv[0].element_size()
    if scales:
        layer_bytes += MOVED * 2 * KV_HEADS * BLOCK_SIZE * 4
    start = time.perf_counter()
    for i in range(TIMED_CALLS):
        t0 = time.perf_counter()
        worker.write_cache(peer, prepared, layer=i % LAYERS).result(timeout=60)
        latencies.append((time.perf_counter() - t0) * 1e6)
    elapsed = time.perf_counter() - start
    latencies.sort()
    print(
        json.dumps(
            {
                "role": "prefill",
                "transport": getattr(info, "transport", None),
                "reason": getattr(info, "reason", None),
                "p50_us": round(latencies[len(latencies) // 2], 1),
                "p99_us": round(latencies[int(len(latencies) * 0.99) - 1], 1),
                "gbps": round(layer_bytes * TIMED_CALLS / elapsed / 1e9, 2),
                "bytes_per_call": layer_bytes,
            }
        ),
        flush=True,
    )
    worker.detach()


def verify_moved(torch, kv, src, local, remote):
    """Mismatches: a moved block that differs from its source, or any other block not zero."""
    mismatches = []
    for layer in range(LAYERS):
        for l, r in zip(local, remote):
            for kind in (0, 1):
                if not torch.equal(bytes_view(torch, kv[layer][kind, r]), bytes_view(torch, src[layer][kind, l])):
                    mismatches.append(f"layer {layer} {'KV'[kind]} block {l}->{r}")
        untouched = [b for b in range(NUM_BLOCKS) if b not in set(remote)]
        if bytes_view(torch, kv[layer][:, untouched]).any():
            mismatches.append(f"layer {layer}: a block no call named changed")
    return mismatches


def warm_lists(round_):
    """The blocks moved in round 0 (before the kill) and round 1 (into the new worker)."""
    rng = random.Random(70 + round_)
    return rng.sample(range(NUM_BLOCKS), MOVED), rng.sample(range(NUM_BLOCKS), MOVED)


def run_decode_warm(args):
    """A decode worker of a warm case: attaches with the slot, verifies round ``--round``."""
    import torch
    import kvtransfer
    from kvtransfer import torch_regions

    dtype, scales, _transport, _exp = CASES[args.case]
    kv, ks, vs = make_cache(torch, dtype, scales, filled=False)
    worker = attach_worker(kvtransfer, torch_regions, args.socket, "decode", args.case, kv, ks, vs, slot=f"decode/{args.case}")
    print(json.dumps({"port": worker.port, "reattached": worker.reattached, "transport": worker.transport}), flush=True)
    arrivals = worker.wait_for_arrival(f"{args.tag}-{args.round}", layers=LAYERS, timeout=120)
    torch.cuda.synchronize()
    src, _sks, _svs = make_cache(torch, dtype, scales, filled=True)
    local, remote = warm_lists(args.round)
    mismatches = verify_moved(torch, kv, src, local, remote)
    print(json.dumps({"arrivals": len(arrivals), "mismatches": mismatches[:20], "mismatch_count": len(mismatches)}), flush=True)
    sys.stdin.readline()  # killed here (round 0), or told to go (round 1)
    worker.detach()


def run_prefill_warm(args):
    """The prefill of a warm case: round 0, a write while the decode is parked, round 1."""
    import torch
    import kvtransfer
    from kvtransfer import torch_regions

    dtype, scales, _transport, _exp = CASES[args.case]
    kv, ks, vs = make_cache(torch, dtype, scales, filled=True)
    worker = attach_worker(kvtransfer, torch_regions, args.socket, "prefill", args.case, kv, ks, vs)
    peer = worker.connect("127.0.0.1", args.peer_port, timeout=60)
    report = {"transport": getattr(worker.peer_info("127.0.0.1", args.peer_port), "transport", None)}
    for round_ in (0, 1):
        if round_ == 1:
            sys.stdin.readline()  # the decode was killed and its communicator parked
            try:
                local, remote = warm_lists(0)
                worker.write_cache_sync(peer, local, remote, 0, tag="parked", timeout=60)
                report["parked_write"] = "landed (expected ERR_FENCED)"
            except kvtransfer.KvTransferError as error:
                report["parked_write"] = error.code
            print("parked-checked", flush=True)
            sys.stdin.readline()  # the new decode worker re-attached
        local, remote = warm_lists(round_)
        for layer in range(LAYERS):
            worker.write_cache_sync(peer, local, remote, layer, tag=f"{args.tag}-{round_}", timeout=60)
        print(f"round-{round_}", flush=True)
    report["reconnects"] = worker.metrics().get("reconnects")
    print(json.dumps(report), flush=True)
    worker.detach()


def metrics(port):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def orchestrate_warm(args, case, env, sockets, metrics_port):
    """A warm case; returns its entry (``passed`` says whether every check held)."""
    me = [sys.executable, os.path.abspath(__file__)]
    tag = f"req-{case}"
    pipes = dict(env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    entry = {}

    def decode(round_):
        proc = subprocess.Popen(me + ["decode-warm", "--case", case, "--socket", sockets[1], "--tag", tag, "--round", str(round_)], **pipes)
        return proc, json.loads(proc.stdout.readline())

    def tell(proc, line="go"):
        proc.stdin.write(line + "\n")
        proc.stdin.flush()

    first, entry["first_attach"] = decode(0)
    prefill = subprocess.Popen(
        me + ["prefill-warm", "--case", case, "--socket", sockets[0], "--tag", tag, "--peer-port", str(entry["first_attach"]["port"])],
        **pipes,
    )
    try:
        entry["round_0_sent"] = prefill.stdout.readline().strip()
        entry["first_verified"] = json.loads(first.stdout.readline())
        first.kill()
        first.wait(timeout=30)
        deadline = time.monotonic() + 30
        while "kvtransfer_sidecar_parked 1" not in metrics(metrics_port):
            if time.monotonic() > deadline:
                raise RuntimeError("the killed decode's communicator was not parked in 30 s")
            time.sleep(0.05)
        tell(prefill)
        entry["parked"] = prefill.stdout.readline().strip()
        second, entry["second_attach"] = decode(1)
        tell(prefill)
        entry["round_1_sent"] = prefill.stdout.readline().strip()
        entry["second_verified"] = json.loads(second.stdout.readline())
        tell(second)
        second.wait(timeout=60)
        entry["prefill"] = json.loads(prefill.stdout.readline())
        prefill.wait(timeout=60)
    except (ValueError, RuntimeError, subprocess.TimeoutExpired) as error:
        entry["error"] = repr(error)
        prefill.kill()
        entry["prefill_stderr"] = prefill.communicate()[1] if prefill.stderr else None
        return entry
    entry["passed"] = (
        entry["first_verified"]["mismatch_count"] == 0
        and entry["second_verified"]["mismatch_count"] == 0
        and entry["second_attach"]["reattached"] is True
        and entry["second_attach"]["port"] == entry["first_attach"]["port"]
        and entry["prefill"]["parked_write"] == "ERR_FENCED"
        and entry["prefill"]["reconnects"] == 0
        and entry["prefill"]["transport"] == CASES[case][2]
    )
    return entry


def share_records():
    """The raw `_share_cuda_()` records of both allocators (for the closing note)."""
    code = (
        "import torch, json; t = torch.zeros(64 << 20, dtype=torch.uint8, device='cuda'); "
        "s = t.untyped_storage()._share_cuda_(); "
        "print(json.dumps({'len': len(s[1]), 'hex': s[1].hex(), 'size': s[2], 'offset': s[3]}))"
    )
    out = {}
    for name, conf in (("default", ""), ("expandable", "expandable_segments:True")):
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        out[name] = run.stdout.strip() or run.stderr.strip()[-400:]
    return out


def orchestrate(args):
    results = {"records": share_records(), "cases": {}}
    print(json.dumps(results["records"]), flush=True)
    tmp = tempfile.mkdtemp(prefix="kvt-gpu-sidecar-")
    sockets = [os.path.join(tmp, "a.sock"), os.path.join(tmp, "b.sock")]
    metrics_port = free_port()
    sidecars = [
        subprocess.Popen([args.node, args.cli, "serve", "--socket", s] + extra, stdout=subprocess.PIPE, text=True)
        for s, extra in zip(sockets, ([], ["--metrics-port", str(metrics_port)]))
    ]
    for sidecar in sidecars:
        print(sidecar.stdout.readline().strip(), flush=True)
    ok = True
    try:
        for case in args.cases or CASES:
            expandable = CASES[case][3]
            env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True" if expandable else "")
            if case.endswith("-warm"):
                entry = orchestrate_warm(args, case, env, sockets, metrics_port)
                entry["passed"] = entry.get("passed", False)
                ok = ok and entry["passed"]
                results["cases"][case] = entry
                print(case, "PASS" if entry["passed"] else "FAIL", json.dumps(entry), flush=True)
                continue
            me = [sys.executable, os.path.abspath(__file__)]
            tag = f"req-{case}"
            decode = subprocess.Popen(
                me + ["decode", "--case", case, "--socket", sockets[1], "--tag", tag],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            first = decode.stdout.readline()
            try:
                attached = json.loads(first)
            except ValueError:
                decode.kill()
                results["cases"][case] = {"error": f"decode did not attach: {first!r} {decode.communicate()[0][-2000:]}"}
                ok = False
                print(case, results["cases"][case], flush=True)
                continue
            prefill = subprocess.run(
                me + ["prefill", "--case", case, "--socket", sockets[0], "--tag", tag, "--peer-port", str(attached["port"])],
                env=env, capture_output=True, text=True, timeout=300,
            )
            verified = decode.stdout.readline()
            decode.stdin.write("done\n")
            decode.stdin.flush()
            decode.wait(timeout=60)
            entry = {"decode_attach": attached}
            try:
                entry["decode"] = json.loads(verified)
                entry["prefill"] = json.loads(prefill.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                entry["error"] = f"prefill exit {prefill.returncode}: {prefill.stdout[-1500:]} {prefill.stderr[-2500:]} decode: {verified!r}"
            passed = "error" not in entry and entry["decode"]["mismatch_count"] == 0 and entry["prefill"]["transport"] == CASES[case][2]
            entry["passed"] = passed
            ok = ok and passed
            results["cases"][case] = entry
            print(case, "PASS" if passed else "FAIL", json.dumps(entry), flush=True)
    finally:
        for sidecar in sidecars:
            sidecar.terminate()
            sidecar.wait(timeout=30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"gpu sidecar: {sum(1 for c in results['cases'].values() if c.get('passed'))} of {len(results['cases'])} cases passed")
    return 0 if ok else 1


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "decode", "prefill", "decode-warm", "prefill-warm"])
    parser.add_argument("--node", default="node")
    parser.add_argument("--cli", default=os.path.join(ROOT, "lib", "cli.js"))
    parser.add_argument("--json")
    parser.add_argument("--cases", nargs="*")
    parser.add_argument("--case")
    parser.add_argument("--socket")
    parser.add_argument("--tag")
    parser.add_argument("--peer-port", type=int)
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "decode-warm":
        return run_decode_warm(args)
    if args.mode == "prefill-warm":
        return run_prefill_warm(args)
    if args.mode == "decode":
        return run_decode(args)
    if args.mode == "prefill":
        return run_prefill(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
