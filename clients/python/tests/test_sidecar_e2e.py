"""End-to-end tests against real sidecars: ``node <repo>/lib/cli.js serve --socket PATH``.

Every test here is SKIPPED (never passed) while ``lib/cli.js`` has no ``serve`` command or
no node binary is found (``KVTRANSFER_NODE`` may name one). The workers use host shared
memory; between two sidecars they use the transport of ``KVTRANSFER_TEST_TRANSPORT`` (default
tcp; the RDMA CI run sets rdma), and a prefill connects to its decode peer at
``KVTRANSFER_TEST_HOST`` (default 127.0.0.1). ``KVTRANSFER_TEST_TIMEOUT_SCALE`` (default 1)
multiplies every timeout and wait (the RDMA run is in a slow VM: 20).
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import socket
import threading
import time
import unittest
import urllib.request
from typing import Any, Dict, List, Sequence, Tuple

from _support import (
    TEST_HOST,
    TEST_TRANSPORT,
    HostCache,
    Helper,
    Sidecar,
    kvtransfer,
    scaled,
    serve_available,
    short_tmpdir,
)
from kvtransfer._protocol import FrameDecoder, encode_frame, send_frame

SERVE, WHY = serve_available()

LAYERS, BLOCKS, BLOCK_BYTES = 4, 64, 4096
IO_TIMEOUT = scaled(60.0)
#: connect's and attach's timeout.
CONNECT_TIMEOUT = scaled(30.0)


class Raw:
    """A bare protocol-1 connection, for requests the client would never send."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(path)
        self.decoder = FrameDecoder()
        self.next_id = 0
        self.frames: List[Tuple[int, Dict[str, Any]]] = []

    def request(self, message: Dict[str, Any], fds: Sequence[int] = ()) -> Dict[str, Any]:
        self.next_id += 1
        send_frame(self.sock, encode_frame(self.next_id, message), fds)
        while True:
            for index, (request_id, answer) in enumerate(self.frames):
                if request_id == self.next_id:
                    del self.frames[index]
                    return answer
            data = self.sock.recv(1 << 16)
            if not data:
                raise AssertionError(f"the sidecar closed the connection before answering {message.get('op')}")
            self.frames.extend(self.decoder.feed(data))

    def read_to_end(self) -> List[Tuple[int, Dict[str, Any]]]:
        """The frames not taken by :meth:`request` until the sidecar closes the connection."""
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                frames, self.frames = self.frames, []
                return frames
            self.frames.extend(self.decoder.feed(data))

    def hello(self, protocol: int = 1) -> Dict[str, Any]:
        return self.request({"op": "hello", "protocol": protocol, "client": "kvtransfer-python-tests/0", "pid": os.getpid()})

    def close(self) -> None:
        self.sock.close()


@unittest.skipUnless(SERVE, WHY)
class SidecarTest(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = short_tmpdir()
        self.addCleanup(shutil.rmtree, self.dir, True)

    # -- fixtures ----------------------------------------------------------------------

    def sidecar(self, name: str) -> Sidecar:
        sidecar = Sidecar(os.path.join(self.dir, name))
        self.addCleanup(sidecar.stop)
        return sidecar

    def cache(self, fill: str = "zero") -> HostCache:
        cache = HostCache(LAYERS, BLOCKS, BLOCK_BYTES, fill=fill)
        self.addCleanup(cache.close)
        return cache

    def decode_helper(self, sidecar: Sidecar) -> Tuple[Helper, Dict[str, Any]]:
        helper = Helper("decode", sidecar.path, str(LAYERS), str(BLOCKS), str(BLOCK_BYTES))
        self.addCleanup(helper.close)
        info = helper.read(IO_TIMEOUT)
        self.assertIsInstance(info["port"], int)
        self.assertGreater(info["port"], 0, "attach gives the bound port back")
        return helper, info

    def attach(self, sidecar: Sidecar, cache: HostCache, role: str = "prefill", **kwargs: Any) -> kvtransfer.Worker:
        worker = kvtransfer.attach(
            sidecar.path, role=role, transport=TEST_TRANSPORT, timeout=CONNECT_TIMEOUT, **cache.attach_args(), **kwargs
        )
        self.addCleanup(_detach_quietly, worker)
        return worker

    def verify(self, helper: Helper, src: HostCache, tag: Any, local: Sequence[int], remote: Sequence[int],
               untouched: Sequence[int] = ()) -> List[List[Any]]:
        report = helper.ask(
            {"cmd": "wait", "tag": tag, "layers": LAYERS, "src": src.name, "local": list(local), "remote": list(remote),
             "untouched": list(untouched)},
            IO_TIMEOUT + scaled(10),
        )
        self.assertEqual(report["mismatch_count"], 0, f"destination blocks differ from the source: {report['mismatches']}")
        self.assertEqual(report["nonzero"], [], "blocks outside the remote ids were written")
        return report["arrivals"]

    # -- (a) a transfer between two sidecars ---------------------------------------------

    def test_transfer_between_two_sidecars(self) -> None:
        a, b = self.sidecar("a.sock"), self.sidecar("b.sock")
        decode, info = self.decode_helper(b)
        src = self.cache("random")
        prefill = self.attach(a, src, name="prefill-e2e")
        self.assertEqual(prefill.role, "prefill")
        self.assertGreater(prefill.port, 0)
        self.assertEqual(prefill.name, "prefill-e2e")
        self.assertEqual(info["name"], "decode-helper")
        if TEST_TRANSPORT != "auto":
            self.assertEqual((prefill.transport, info["transport"]), (TEST_TRANSPORT, TEST_TRANSPORT))
        peer = prefill.connect(TEST_HOST, info["port"], timeout=CONNECT_TIMEOUT)
        self.assertEqual(peer.key, f"{TEST_HOST}:{info['port']}")

        # Id lists, every layer in flight at once, a string tag.
        rng = random.Random(7)
        local, remote = rng.sample(range(BLOCKS), 32), rng.sample(range(BLOCKS), 32)
        futures = [prefill.write_cache(peer, local, remote, layer, tag="req-ids", timeout=IO_TIMEOUT) for layer in range(LAYERS)]
        for future in futures:
            self.assertIsNone(future.result(IO_TIMEOUT))
        untouched = sorted(set(range(BLOCKS)) - set(remote))
        arrivals = self.verify(decode, src, "req-ids", local, remote, untouched)
        self.assertEqual(sorted(a[0] for a in arrivals), list(range(LAYERS)))
        for layer_idx, blocks, tag, writer in arrivals:
            self.assertEqual((blocks, tag, writer), (32, "req-ids", "prefill-e2e"))

        # A prepared list of every block, reversed, an int tag (u64 max), one call at a time.
        ids = list(range(BLOCKS))
        with prefill.prepare_blocks(peer, ids, ids[::-1]) as prepared:
            self.assertEqual(prepared.blocks, BLOCKS)
            for layer in range(LAYERS):
                prefill.write_cache_sync(peer, prepared, layer=layer, tag=2**64 - 1, timeout=IO_TIMEOUT)
        arrivals = self.verify(decode, src, 2**64 - 1, ids, ids[::-1])
        self.assertEqual(sorted(a[0] for a in arrivals), list(range(LAYERS)))
        self.assertTrue(all(a[2] == 2**64 - 1 for a in arrivals), arrivals)

        # Observability through the sidecar.
        metrics = prefill.metrics()
        self.assertEqual(metrics.get("role"), "prefill")
        self.assertGreaterEqual(metrics.get("callsSucceeded", 0), 2 * LAYERS)
        self.assertIn("kvtransfer_", prefill.metrics_text())
        info_peer = prefill.peer_info(TEST_HOST, info["port"])
        self.assertIsNotNone(info_peer)
        assert info_peer is not None
        if TEST_TRANSPORT != "auto":
            self.assertEqual(info_peer.transport, TEST_TRANSPORT, f"the link fell back: {info_peer.reason}")
        self.assertTrue(info_peer.connected)
        self.assertIsNone(prefill.peer_info(TEST_HOST, 1))
        self.assertTrue(a.alive() and b.alive())

    # -- (b) refused regions and refused writes ------------------------------------------

    def test_client_side_region_checks(self) -> None:
        a = self.sidecar("a.sock")
        memfd = os.memfd_create("kvt-e2e")
        os.ftruncate(memfd, BLOCKS * BLOCK_BYTES)
        closed = os.dup(memfd)
        os.close(closed)
        try:
            region = kvtransfer.HostRegion
            cases = [
                ([region(memfd, BLOCK_BYTES, BLOCKS * BLOCK_BYTES)], "past the end of fd"),
                ([region(closed, 0, BLOCKS * BLOCK_BYTES)], "not an open file descriptor"),
            ]
            for key_cache, words in cases:
                with self.assertRaises(kvtransfer.InvalidArgument) as caught:
                    kvtransfer.attach(a.path, role="prefill", block_number=BLOCKS, block_bytes=BLOCK_BYTES,
                                      key_cache=key_cache, value_cache=[], transport=TEST_TRANSPORT,
                                      timeout=CONNECT_TIMEOUT)
                self.assertIn(words, caught.exception.message)
        finally:
            os.close(memfd)

    def test_sidecar_refuses_a_bad_rdma_device_list_naming_it(self) -> None:
        a = self.sidecar("a.sock")
        memfd = os.memfd_create("kvt-e2e-nics")
        os.ftruncate(memfd, BLOCKS * BLOCK_BYTES)
        try:
            with self.assertRaises(kvtransfer.InvalidArgument) as caught:
                kvtransfer.attach(a.path, role="prefill", block_number=BLOCKS, block_bytes=BLOCK_BYTES,
                                  key_cache=[kvtransfer.HostRegion(memfd, 0, BLOCKS * BLOCK_BYTES)], value_cache=[],
                                  transport=TEST_TRANSPORT, rdma_devices=["mlx5_0", "mlx5_0"], timeout=CONNECT_TIMEOUT)
            self.assertIn("invalid rdmaDevices: [\"mlx5_0\", \"mlx5_0\"] names 'mlx5_0' twice", caught.exception.message)
            self.assertTrue(a.alive())
        finally:
            os.close(memfd)

    def test_sidecar_refuses_bad_regions(self) -> None:
        a = self.sidecar("a.sock")
        size = 16 * BLOCK_BYTES
        memfd = os.memfd_create("kvt-e2e-bad")
        os.ftruncate(memfd, size)
        pattern = os.urandom(size)
        os.pwrite(memfd, pattern, 0)
        r, w = os.pipe()
        base = {"op": "attach", "role": "prefill", "gpuIdx": 0, "port": 0, "blockNumber": 1, "blockBytes": BLOCK_BYTES,
                "transport": TEST_TRANSPORT, "valueCache": []}
        cases: List[Tuple[str, List[Dict[str, Any]], List[int]]] = [
            ("offset + bytes past the object", [{"fd": 0, "offset": size - BLOCK_BYTES // 2, "bytes": BLOCK_BYTES}], [memfd]),
            ("offset past the object", [{"fd": 0, "offset": size + BLOCK_BYTES, "bytes": BLOCK_BYTES}], [memfd]),
            ("bytes past the object", [{"fd": 0, "offset": 0, "bytes": size + BLOCK_BYTES}], [memfd]),
            ("negative offset", [{"fd": 0, "offset": -BLOCK_BYTES, "bytes": BLOCK_BYTES}], [memfd]),
            ("fd index out of range", [{"fd": 1, "offset": 0, "bytes": BLOCK_BYTES}], [memfd]),
            ("fd index with no fd sent", [{"fd": 0, "offset": 0, "bytes": BLOCK_BYTES}], []),
            ("a pipe, not memory", [{"fd": 0, "offset": 0, "bytes": BLOCK_BYTES}], [r]),
            ("cudaVmmFds index out of range",
             [{"cudaVmmFds": [3], "segmentBytes": 2 << 20, "offset": 0, "bytes": BLOCK_BYTES}], [memfd]),
            ("no region kind", [{"offset": 0, "bytes": BLOCK_BYTES}], [memfd]),
        ]
        try:
            for what, key_cache, fds in cases:
                raw = Raw(a.path)
                try:
                    self.assertIn("ok", raw.hello(), what)
                    answer = raw.request({**base, "keyCache": key_cache}, fds)
                finally:
                    raw.close()
                self.assertIn("error", answer, f"{what}: the sidecar accepted {key_cache}")
                self.assertEqual(answer["error"]["code"], "ERR_INVALID_ARGUMENT", f"{what}: {answer['error']}")
                self.assertTrue(a.alive(), f"the sidecar died on: {what}")
            self.assertEqual(os.pread(memfd, size, 0), pattern, "a refused attach changed the memory")
            # The sidecar still attaches a valid region.
            raw = Raw(a.path)
            try:
                raw.hello()
                answer = raw.request({**base, "keyCache": [{"fd": 0, "offset": 0, "bytes": BLOCK_BYTES}]}, [memfd])
                self.assertIn("ok", answer, answer)
                self.assertGreater(answer["ok"]["port"], 0)
            finally:
                raw.close()
        finally:
            for fd in (memfd, r, w):
                os.close(fd)

    def test_protocol_version_refused(self) -> None:
        a = self.sidecar("a.sock")
        raw = Raw(a.path)
        try:
            answer = raw.hello(protocol=2)
        finally:
            raw.close()
        self.assertEqual(answer.get("error", {}).get("code"), "ERR_PROTOCOL", answer)
        self.assertIn("1", answer["error"]["message"])
        self.assertIn("2", answer["error"]["message"])

    def test_answers_of_attach_peer_info_and_detach(self) -> None:
        # attach answers the name; peerInfo of a peer never connected answers null; detach
        # is answered, then the sidecar ends the connection.
        a = self.sidecar("a.sock")
        memfd = os.memfd_create("kvt-e2e-answers")
        self.addCleanup(os.close, memfd)
        os.ftruncate(memfd, BLOCKS * BLOCK_BYTES)
        base = {"op": "attach", "role": "decode", "gpuIdx": 0, "port": 0, "blockNumber": BLOCKS, "blockBytes": BLOCK_BYTES,
                "transport": TEST_TRANSPORT, "keyCache": [{"fd": 0, "offset": 0, "bytes": BLOCKS * BLOCK_BYTES}],
                "valueCache": []}
        for name in ("named-e2e", None):
            raw = Raw(a.path)
            try:
                self.assertIn("ok", raw.hello())
                answer = raw.request(base if name is None else {**base, "name": name}, [memfd])
                ok = answer.get("ok")
                self.assertIsInstance(ok, dict, answer)
                self.assertEqual(ok.get("name"), name or f"{socket.gethostname()}:{ok['port']}", ok)
                if TEST_TRANSPORT != "auto":
                    self.assertEqual(ok.get("transport"), TEST_TRANSPORT, ok)
                self.assertEqual(raw.request({"op": "peerInfo", "ip": TEST_HOST, "port": 1}), {"ok": None})
                self.assertEqual(raw.request({"op": "detach"}), {"ok": {}})
                self.assertEqual(raw.read_to_end(), [], "frames after the answer to detach")
            finally:
                raw.close()
        # The client: the name comes from the sidecar; detach returns, later calls are Closed.
        worker = self.attach(a, self.cache(), role="decode")
        self.assertEqual(worker.name, f"{socket.gethostname()}:{worker.port}")
        self.assertIsNone(worker.peer_info(TEST_HOST, 1))
        worker.detach()
        self.assertFalse(worker.attached)
        with self.assertRaises(kvtransfer.Closed):
            worker.metrics()
        self.assertTrue(a.alive())

    def test_refused_writes_leave_the_destination_unchanged(self) -> None:
        a, b = self.sidecar("a.sock"), self.sidecar("b.sock")
        decode, info = self.decode_helper(b)
        src = self.cache("random")
        prefill = self.attach(a, src)
        peer = prefill.connect(TEST_HOST, info["port"], timeout=CONNECT_TIMEOUT)
        before = decode.ask({"cmd": "digest"})["sha256"]
        sync = functools.partial(prefill.write_cache_sync, timeout=IO_TIMEOUT)
        cases = [
            (lambda: sync(peer, [0, 1], [0, BLOCKS], 0), {"ERR_BLOCK_ID_OUT_OF_RANGE"}),
            (lambda: sync(peer, [BLOCKS], [0], 0), {"ERR_BLOCK_ID_OUT_OF_RANGE"}),
            (lambda: sync(peer, [0], [0], LAYERS), {"ERR_LAYER_OUT_OF_RANGE"}),
            (lambda: sync(peer, [0, 1], [0], 0), {"ERR_BLOCK_COUNT_MISMATCH"}),
            (lambda: sync(peer, [-1], [0], 0), {"ERR_INVALID_BLOCK_ID", "ERR_BLOCK_ID_OUT_OF_RANGE"}),
            (lambda: prefill.prepare_blocks(peer, [0], [BLOCKS]), {"ERR_BLOCK_ID_OUT_OF_RANGE"}),
            (lambda: sync("127.0.0.1:1", [0], [0], 0), {"ERR_NOT_CONNECTED"}),
        ]
        for i, (call, codes) in enumerate(cases):
            with self.assertRaises(kvtransfer.KvTransferError, msg=f"case {i}") as caught:
                call()
            self.assertIn(caught.exception.code, codes, f"case {i}: {caught.exception}")
        self.assertEqual(decode.ask({"cmd": "digest"})["sha256"], before, "a refused write changed the destination")
        # The connection still works after the refusals.
        for layer in range(LAYERS):
            prefill.write_cache_sync(peer, [3], [5], layer, tag="after-refusals", timeout=IO_TIMEOUT)
        self.verify(decode, src, "after-refusals", [3], [5])
        self.assertTrue(a.alive() and b.alive())

    # -- (c) a worker SIGKILLed mid-stream -------------------------------------------------

    def test_worker_killed_mid_stream(self) -> None:
        a, b = self.sidecar("a.sock"), self.sidecar("b.sock")
        decode, info = self.decode_helper(b)
        writer = Helper("writer", a.path, str(LAYERS), str(BLOCKS), str(BLOCK_BYTES), str(info["port"]), "32", "32")
        self.addCleanup(writer.close)
        ready = writer.read(IO_TIMEOUT)
        self.assertTrue(ready.get("ready"))
        self.addCleanup(_unlink_shm, ready["shm"])
        src = self.cache("random")
        prefill = self.attach(a, src, name="survivor")
        peer = prefill.connect(TEST_HOST, info["port"], timeout=CONNECT_TIMEOUT)
        ids = list(range(32))
        prepared = prefill.prepare_blocks(peer, ids, ids)
        self.assertEqual(writer.read(IO_TIMEOUT).get("wrote"), 1)  # the writer is in its loop
        # Both write at once, then the writer dies with calls in flight.
        futures = [prefill.write_cache(peer, prepared, layer=l, timeout=IO_TIMEOUT) for l in range(LAYERS)]
        time.sleep(scaled(0.2))
        writer.kill()
        for future in futures:
            future.result(IO_TIMEOUT)
        for i in range(20):
            tag = f"after-kill-{i}"
            for future in [prefill.write_cache(peer, prepared, layer=l, tag=tag, timeout=IO_TIMEOUT) for l in range(LAYERS)]:
                future.result(IO_TIMEOUT)
        self.verify(decode, src, "after-kill-19", ids, ids)
        self.assertTrue(a.alive(), f"the sidecar died with its worker:\n{a.log()}")
        # The sidecar still attaches workers.
        with kvtransfer.attach(
            a.path, role="prefill", transport=TEST_TRANSPORT, timeout=CONNECT_TIMEOUT, **self.cache().attach_args()
        ) as again:
            self.assertGreater(again.port, 0)
        self.assertGreaterEqual(prefill.metrics().get("callsSucceeded", 0), 21 * LAYERS)

    # -- (d) the sidecar SIGKILLed --------------------------------------------------------

    def test_sidecar_killed(self) -> None:
        s = self.sidecar("d.sock")
        cache = self.cache()
        worker = self.attach(s, cache, role="decode")
        outcome: List[BaseException] = []

        def wait() -> None:
            try:
                worker.wait_for_arrival("never", timeout=None)
            except BaseException as error:  # checked below
                outcome.append(error)

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        time.sleep(scaled(0.3))  # the wait is pending in the sidecar
        self.assertTrue(thread.is_alive())
        s.kill()
        thread.join(scaled(10))
        self.assertFalse(thread.is_alive(), "the pending call did not end with the sidecar")
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], kvtransfer.Detached)
        self.assertEqual(outcome[0].code, "ERR_DETACHED")  # type: ignore[attr-defined]
        with self.assertRaises(kvtransfer.Detached):
            worker.metrics()
        with self.assertRaises(kvtransfer.Detached):
            worker.write_cache("127.0.0.1:1", [0], [0], 0)
        self.assertFalse(worker.attached)
        # A sidecar restarted on the same path (the stale socket file is replaced) attaches anew.
        restarted = Sidecar(s.path)
        self.addCleanup(restarted.stop)
        again = self.attach(restarted, cache, role="decode")
        self.assertGreater(again.port, 0)
        self.assertEqual(again.metrics().get("role"), "decode")


    # -- (e) a decode worker SIGKILLed and restarted: warm re-attach ----------------------------

    @unittest.skipUnless(TEST_TRANSPORT in ("tcp", "rdma"), "warm re-attach swaps host regions over TCP and RDMA only (NVLink refuses it)")
    def test_decode_restarted_reattaches_warm(self) -> None:
        a = self.sidecar("a.sock")
        metrics_port = _free_port()
        b = Sidecar(os.path.join(self.dir, "b.sock"), extra=["--metrics-port", str(metrics_port)])
        self.addCleanup(b.stop)
        decode, info = self.decode_helper_slot(b, "decode/tp0")
        self.assertEqual((info["warm"], info["reattached"]), (True, False))
        self.addCleanup(_unlink_shm, info["shm"])
        src = self.cache("random")
        prefill = self.attach(a, src, name="warm-prefill", slot="prefill/tp0")
        peer = prefill.connect(TEST_HOST, info["port"], timeout=CONNECT_TIMEOUT)
        first, second = list(range(0, 8)), list(range(8, 16))
        for layer in range(LAYERS):
            prefill.write_cache_sync(peer, first, first, layer, tag="before", timeout=IO_TIMEOUT)
        self.verify(decode, src, "before", first, first)

        # Mapped here before the kill: its resource tracker may unlink the segment afterwards.
        old = HostCache(LAYERS, BLOCKS, BLOCK_BYTES, name=info["shm"])
        self.addCleanup(old.close)
        decode.kill()
        deadline = time.monotonic() + IO_TIMEOUT
        while "kvtransfer_sidecar_parked 1" not in _metrics(metrics_port):
            self.assertLess(time.monotonic(), deadline, f"the communicator was not parked:\n{b.log()}")
            time.sleep(scaled(0.05))
        # Parked: the prefill's writes are refused, typed, with nothing sent.
        with self.assertRaises(kvtransfer.KvTransferError) as refused:
            prefill.write_cache_sync(peer, second, second, 0, tag="parked", timeout=IO_TIMEOUT)
        self.assertEqual(refused.exception.code, "ERR_FENCED", refused.exception)
        old_digest = old.digest()

        again, info2 = self.decode_helper_slot(b, "decode/tp0")
        self.addCleanup(_unlink_shm, info2["shm"])
        self.assertEqual((info2["reattached"], info2["port"]), (True, info["port"]))
        # The prefill's link was kept: no connect, no reconnect, the next writes land in the
        # new worker's memory byte for byte (and nothing else there), none in the old one's.
        for layer in range(LAYERS):
            prefill.write_cache_sync(peer, first, second, layer, tag="after", timeout=IO_TIMEOUT)
        self.verify(again, src, "after", first, second, sorted(set(range(BLOCKS)) - set(second)))
        self.assertEqual(old.digest(), old_digest, "the dead worker's memory was written after it was detached")
        self.assertEqual(prefill.metrics().get("reconnects"), 0)
        self.assertIn("kvtransfer_sidecar_reattaches_total 1", _metrics(metrics_port))

        # The prefill restarts too (it detaches here; to the sidecar a death is the same end):
        # its successor finds the link to the decode kept, and its connect keeps it.
        prefill.detach(timeout=IO_TIMEOUT)
        successor = self.attach_slot(a, src, "prefill/tp0", name="warm-prefill")
        self.assertEqual((successor.reattached, successor.port), (True, prefill.port))
        peer = successor.connect(TEST_HOST, info["port"], timeout=CONNECT_TIMEOUT)
        third = list(range(16, 24))
        for layer in range(LAYERS):
            successor.write_cache_sync(peer, first, third, layer, tag="successor", timeout=IO_TIMEOUT)
        self.verify(again, src, "successor", first, third)
        self.assertEqual(successor.metrics().get("reconnects"), 0)

        # Another layout under that slot is refused, naming the field; the kept communicator
        # is closed, so the next attach starts fresh.
        again.kill()
        other = HostCache(LAYERS, BLOCKS, 2 * BLOCK_BYTES)
        self.addCleanup(other.close)
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            try:
                kvtransfer.attach(b.path, role="decode", slot="decode/tp0", transport=TEST_TRANSPORT,
                                  timeout=CONNECT_TIMEOUT, **other.attach_args()).detach()
                self.fail("a re-attach with another blockBytes was accepted")
            except kvtransfer.InvalidArgument as error:  # the dead worker still holds the slot
                self.assertIn("held by an attached worker", str(error))
            except kvtransfer.LayoutMismatch as error:
                self.assertIn("blockBytes", str(error))
                break
            self.assertLess(time.monotonic(), deadline)
            time.sleep(scaled(0.05))
        with kvtransfer.attach(b.path, role="decode", slot="decode/tp0", transport=TEST_TRANSPORT,
                               timeout=CONNECT_TIMEOUT, **other.attach_args()) as fresh:
            self.assertFalse(fresh.reattached)

    @unittest.skipUnless(TEST_TRANSPORT in ("tcp", "rdma"), "warm re-attach swaps host regions over TCP and RDMA only (NVLink refuses it)")
    def test_sidecar_stopped_while_parking_exits(self) -> None:
        # The decode worker dies while its writer does not answer the park's fence (its
        # sidecar is stopped): SIGTERM during the park must still close the communicator
        # being parked, and the sidecar exits.
        a = self.sidecar("a.sock")
        b = Sidecar(os.path.join(self.dir, "b.sock"))
        self.addCleanup(b.stop)
        decode, info = self.decode_helper_slot(b, "decode/tp0")
        self.addCleanup(_unlink_shm, info["shm"])
        src = self.cache("random")
        prefill = self.attach(a, src, name="stalled-prefill")
        peer = prefill.connect(TEST_HOST, info["port"], timeout=CONNECT_TIMEOUT)
        prefill.write_cache_sync(peer, [0], [0], 0, tag="before", timeout=IO_TIMEOUT)
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            decode.kill()
            time.sleep(scaled(0.5))  # the sidecar saw the death and is parking (fencing the stalled writer)
            b.stop(timeout_s=30)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)

    def attach_slot(self, sidecar: Sidecar, cache: HostCache, slot: str, **kwargs: Any) -> kvtransfer.Worker:
        """Attaches with ``slot`` once the sidecar has parked its predecessor's communicator."""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            try:
                return self.attach(sidecar, cache, slot=slot, **kwargs)
            except kvtransfer.InvalidArgument as error:  # the predecessor still holds the slot
                self.assertIn("held by an attached worker", str(error))
            self.assertLess(time.monotonic(), deadline, f"slot {slot!r} was never free")
            time.sleep(scaled(0.05))

    def decode_helper_slot(self, sidecar: Sidecar, slot: str) -> Tuple[Helper, Dict[str, Any]]:
        helper = Helper("decode", sidecar.path, str(LAYERS), str(BLOCKS), str(BLOCK_BYTES), slot)
        self.addCleanup(helper.close)
        return helper, helper.read(IO_TIMEOUT)

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=IO_TIMEOUT) as answer:
        return str(answer.read().decode())


def _unlink_shm(name: str) -> None:
    try:
        os.unlink(os.path.join("/dev/shm", name.lstrip("/")))
    except OSError:
        pass


def _detach_quietly(worker: kvtransfer.Worker) -> None:
    try:
        worker.detach(timeout=scaled(5))
    except kvtransfer.KvTransferError:
        pass


if __name__ == "__main__":
    unittest.main()
