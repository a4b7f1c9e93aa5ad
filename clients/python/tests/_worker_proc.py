"""A worker in its own process, driven by the end-to-end tests over JSON lines.

    _worker_proc.py decode SOCKET LAYERS BLOCKS BLOCK_BYTES [SLOT]
        attaches a decode worker with a zeroed host cache (with SLOT: for a warm re-attach);
        prints {"port", "shm", "name", "transport", "reattached", "warm"};
        then answers commands on stdin:
          {"cmd": "wait", "tag", "layers", "src", "local", "remote", "untouched"}
              wait_for_arrival(tag, layers), then compares every destination block with the
              source (the prefill's SharedMemory, by name) and checks "untouched" blocks are 0
          {"cmd": "digest"}   sha256 of the whole cache
          {"cmd": "exit"}     detach and exit

    _worker_proc.py writer SOCKET LAYERS BLOCKS BLOCK_BYTES DECODE_PORT FIRST COUNT
        attaches a prefill worker with a random cache, connects to TEST_HOST:DECODE_PORT and
        writes blocks FIRST..FIRST+COUNT of every layer in a loop, 8 calls in flight, until
        killed; prints {"ready": true, "shm"} once connected (the test unlinks "shm") and
        {"wrote": n} after the first round.

Both attach with KVTRANSFER_TEST_TRANSPORT and scale their timeouts by
KVTRANSFER_TEST_TIMEOUT_SCALE (_support.py), as the tests that start them do.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Optional

from _support import TEST_HOST, TEST_TRANSPORT, HostCache, mismatches, scaled  # also puts kvtransfer on sys.path

import kvtransfer


def say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def decode(socket_path: str, layers: int, blocks: int, block_bytes: int, slot: Optional[str] = None) -> None:
    cache = HostCache(layers, blocks, block_bytes)
    worker = kvtransfer.attach(
        socket_path,
        role="decode",
        name="decode-helper",
        slot=slot,
        transport=TEST_TRANSPORT,
        timeout=scaled(30),
        **cache.attach_args(),
    )
    say(
        {
            "port": worker.port,
            "shm": cache.name,
            "name": worker.name,
            "transport": worker.transport,
            "reattached": worker.reattached,
            "warm": worker.warm,
        }
    )
    for line in sys.stdin:
        command = json.loads(line)
        cmd = command["cmd"]
        if cmd == "wait":
            tag = command["tag"]
            arrivals = worker.wait_for_arrival(tag, layers=command["layers"], timeout=scaled(60))
            src = HostCache(layers, blocks, block_bytes, name=command["src"])
            try:
                bad = mismatches(src, cache, command["local"], command["remote"], command["layers"])
            finally:
                src.close()
            zero = bytes(block_bytes)
            nonzero = [
                f"layer {l} {'KV'[k]} block {b}"
                for l in range(layers)
                for k in (0, 1)
                for b in command.get("untouched", [])
                if cache.block(l, k, b) != zero
            ]
            worker.forget_arrivals(tag)
            say(
                {
                    "arrivals": [[a.layer_idx, a.blocks, a.tag, a.peer] for a in arrivals],
                    "mismatches": bad[:10],
                    "mismatch_count": len(bad),
                    "nonzero": nonzero[:10],
                }
            )
        elif cmd == "digest":
            say({"sha256": cache.digest()})
        elif cmd == "exit":
            worker.detach()
            cache.close()
            say({"bye": True})
            return
        else:
            say({"error": f"unknown command {cmd!r}"})


def writer(socket_path: str, layers: int, blocks: int, block_bytes: int, port: int, first: int, count: int) -> None:
    cache = HostCache(layers, blocks, block_bytes, fill="random")
    # This process is SIGKILLed: the test unlinks the segment (not the resource tracker, which
    # would warn about a leak).
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(cache.shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
    worker = kvtransfer.attach(
        socket_path, role="prefill", name="writer-helper", transport=TEST_TRANSPORT, timeout=scaled(30), **cache.attach_args()
    )
    peer = worker.connect(TEST_HOST, port, timeout=scaled(30))
    ids = list(range(first, first + count))
    prepared = worker.prepare_blocks(peer, ids, ids)
    say({"ready": True, "shm": cache.name})
    rounds = 0
    in_flight = []
    while True:
        for layer in range(layers):
            in_flight.append(worker.write_cache(peer, prepared, layer=layer, timeout=scaled(60)))
            if len(in_flight) >= 8:
                in_flight.pop(0).result(scaled(60))
        rounds += 1
        if rounds == 1:
            say({"wrote": rounds})


def main(argv: list) -> None:
    mode = argv[1]
    try:
        if mode == "decode":
            decode(argv[2], int(argv[3]), int(argv[4]), int(argv[5]), argv[6] if len(argv) > 6 else None)
        elif mode == "writer":
            writer(argv[2], int(argv[3]), int(argv[4]), int(argv[5]), int(argv[6]), int(argv[7]), int(argv[8]))
        else:
            say({"error": f"unknown mode {mode!r}"})
    except Exception as error:  # reported to the test
        say({"error": f"{error!r}\n{traceback.format_exc()}"})
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
