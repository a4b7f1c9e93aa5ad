"""The client against a scripted fake sidecar (_fake_sidecar.py): no real sidecar needed.

These check the client's side of protocol 1: hello then attach, descriptors on the attach
frame, request ids, pipelining and out-of-order answers, events, typed errors, Detached.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import unittest

from _fake_sidecar import FakeConnection, FakeSidecar
from _support import HostCache, kvtransfer, short_tmpdir


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the fake sidecar did not get there in time")
        time.sleep(0.005)


class ClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = short_tmpdir()
        self.path = os.path.join(self.dir, "s.sock")
        self.cache = HostCache(2, 8, 4096)
        self.fake: FakeSidecar | None = None
        self.workers: list = []

    def tearDown(self) -> None:
        for worker in self.workers:
            try:
                worker.detach(timeout=2)
            except kvtransfer.KvTransferError:
                pass
        if self.fake is not None:
            self.fake.close()
        self.cache.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, handler=None, **kwargs) -> FakeSidecar:
        self.fake = FakeSidecar(self.path, handler, **kwargs)
        return self.fake

    def attach(self, role: str = "prefill", **kwargs) -> kvtransfer.Worker:
        worker = kvtransfer.attach(self.path, role=role, timeout=5, **self.cache.attach_args(), **kwargs)
        self.workers.append(worker)
        return worker

    def conn(self) -> FakeConnection:
        assert self.fake is not None
        return self.fake.connections[-1]

    # -- attach ------------------------------------------------------------------------

    def test_hello_then_attach_with_descriptors(self) -> None:
        self.start()
        worker = self.attach(name="p0", slot="inst/tp1", tp_size=2, tp_rank=1, transport="tcp", auth_token="s")
        self.assertEqual((worker.port, worker.transport, worker.name), (40001, "tcp", "p0"))
        self.assertEqual(worker.sidecar_version, "fake/0")
        conn = self.conn()
        (hid, hello), (aid, attach) = conn.requests[:2]
        self.assertEqual(hello["op"], "hello")
        self.assertEqual(hello["protocol"], 1)
        self.assertEqual(hello["client"], f"kvtransfer-python/{kvtransfer.__version__}")
        self.assertEqual(hello["pid"], os.getpid())
        self.assertNotEqual(hid, 0)
        self.assertNotEqual(aid, hid)
        self.assertEqual(attach["op"], "attach")
        self.assertEqual(
            {k: attach[k] for k in ("role", "gpuIdx", "port", "blockNumber", "blockBytes", "tpSize", "tpRank", "transport", "authToken", "name", "slot")},
            {"role": "prefill", "gpuIdx": 0, "port": 0, "blockNumber": 8, "blockBytes": 4096, "tpSize": 2, "tpRank": 1,
             "transport": "tcp", "authToken": "s", "name": "p0", "slot": "inst/tp1"},
        )
        self.assertEqual((worker.reattached, worker.warm), (False, False))  # the fake answers neither
        self.assertNotIn("keyScaleCache", attach)
        # One SharedMemory for the 4 regions: one descriptor, index 0 everywhere.
        self.assertEqual(conn.attach_fds, [os.fstat(self.cache.shm._fd).st_ino])  # type: ignore[attr-defined]
        self.assertEqual(
            attach["keyCache"],
            [{"fd": 0, "offset": 0, "bytes": 8 * 4096}, {"fd": 0, "offset": 2 * 8 * 4096, "bytes": 8 * 4096}],
        )
        self.assertEqual(attach["valueCache"][1], {"fd": 0, "offset": 3 * 8 * 4096, "bytes": 8 * 4096})

    def test_rdma_devices_go_to_the_sidecar_as_a_list(self) -> None:
        self.start()
        self.attach(rdma_devices=("mlx5_0", "mlx5_1"))
        attach = self.conn().requests[1][1]
        self.assertEqual(attach["rdmaDevices"], ["mlx5_0", "mlx5_1"])
        for bad, words in (("mlx5_0", "expected a list of str, got str"), (["mlx5_0", 3], "rdma_devices[1]")):
            with self.assertRaises(kvtransfer.InvalidArgument) as caught:
                self.attach(rdma_devices=bad)
            self.assertIn(words, str(caught.exception))

    def test_attach_refused(self) -> None:
        self.start()
        self.fake.respond_orig = self.fake.respond  # type: ignore[attr-defined]

        def respond(conn, rid, message):
            if message["op"] == "attach":
                return {"error": {"code": "ERR_INVALID_ARGUMENT", "message": "invalid keyCache[0]: offset past the end"}}
            return self.fake.respond_orig(conn, rid, message)  # type: ignore[attr-defined]

        self.fake.respond = respond  # type: ignore[method-assign]
        with self.assertRaises(kvtransfer.InvalidArgument) as caught:
            self.attach()
        self.assertIn("offset past the end", caught.exception.message)

    def test_protocol_mismatch(self) -> None:
        self.start(hello={"error": {"code": "ERR_PROTOCOL", "message": "protocol 1 asked; this sidecar speaks 2"}})
        with self.assertRaises(kvtransfer.ProtocolError) as caught:
            self.attach()
        self.assertIn("speaks 2", caught.exception.message)

    def test_auth_refused_before_any_request(self) -> None:
        def on_connect(conn: FakeConnection) -> bool:
            conn.send(0, {"error": {"code": "ERR_AUTH", "message": "uid 1234 may not attach"}})
            conn.drop()
            return False

        self.start(on_connect=on_connect)
        with self.assertRaises(kvtransfer.AuthError) as caught:
            self.attach()
        self.assertIn("uid 1234", caught.exception.message)

    def test_no_sidecar(self) -> None:
        with self.assertRaises(kvtransfer.IoError) as caught:
            self.attach()
        self.assertEqual(caught.exception.code, "ERR_IO")
        self.assertIn(self.path, caught.exception.message)
        self.assertIn("kvtransfer serve", caught.exception.message)
        # A stale socket file (nobody listens) says so too.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.path)
        stale.close()
        with self.assertRaises(kvtransfer.IoError) as caught:
            self.attach()
        self.assertIn("stale", caught.exception.message)

    def test_argument_checks(self) -> None:
        args = self.cache.attach_args()
        cases = [
            (dict(role="both"), "invalid role"),
            (dict(role="prefill", port=70000), "invalid port"),
            (dict(role="prefill", tp_size=2, tp_rank=2), "invalid tp_rank: 2 is not in 0..1"),
            (dict(role="prefill", transport="udp"), "invalid transport"),
            (dict(role="prefill", block_number=-1), "invalid block_number"),
            (dict(role="prefill", key_cache=args["key_cache"][0]), "invalid key_cache"),
            (dict(role="prefill", timeout=0), "invalid timeout"),
            (dict(role="prefill", slot=""), "invalid slot: empty"),
            (dict(role="prefill", slot="s" * 256), "invalid slot: 256 characters; at most 255"),
        ]
        for override, words in cases:
            merged = {**args, **override}
            with self.assertRaises(kvtransfer.InvalidArgument, msg=repr(override)) as caught:
                kvtransfer.attach(self.path, **merged)
            self.assertIn(words, caught.exception.message)

    def test_default_socket_path(self) -> None:
        saved = {k: os.environ.get(k) for k in ("KVTRANSFER_SOCKET", "XDG_RUNTIME_DIR")}
        try:
            os.environ["KVTRANSFER_SOCKET"] = "/x/y.sock"
            os.environ["XDG_RUNTIME_DIR"] = "/run/user/5"
            self.assertEqual(kvtransfer.default_socket_path(), "/x/y.sock")
            del os.environ["KVTRANSFER_SOCKET"]
            self.assertEqual(kvtransfer.default_socket_path(), "/run/user/5/kvtransfer.sock")
            del os.environ["XDG_RUNTIME_DIR"]
            self.assertEqual(kvtransfer.default_socket_path(), f"/tmp/kvtransfer-{os.getuid()}.sock")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # -- calls -------------------------------------------------------------------------

    def test_connect_prepare_write(self) -> None:
        def handler(conn, rid, message):
            op = message["op"]
            if op == "connect":
                return {"ok": {"peer": f"{message['ip']}:{message['port']}"}}
            if op == "prepare":
                return {"ok": {"prepared": 9, "runs": 1}}
            return {"ok": {}}

        self.start(handler)
        worker = self.attach()
        peer = worker.connect("127.0.0.1", 5000, dst_tp_size=2, timeout=1.5)
        self.assertEqual((peer.ip, peer.port, peer.key), ("127.0.0.1", 5000, "127.0.0.1:5000"))
        prepared = worker.prepare_blocks(peer, range(4), [7, 6, 5, 4])
        self.assertEqual((prepared.handle, prepared.blocks, prepared.runs, prepared.peer), (9, 4, 1, "127.0.0.1:5000"))
        self.assertIsNone(worker.write_cache(peer, prepared, layer=1).result(5))
        self.assertIsNone(worker.write_cache(peer, prepared, 1).result(5))  # the TS form
        worker.write_cache_sync(peer, [1, 2], (3, 4), 0, tag=2**64 - 1, timeout=2.5)
        worker.write_cache_sync(peer, prepared, layer=1, tag="req-9", timeout=0)
        prepared.release()
        requests = [m for _, m in self.conn().requests[2:]]
        self.assertEqual(requests[0], {"op": "connect", "ip": "127.0.0.1", "port": 5000, "dstTpSize": 2, "timeoutMs": 1500})
        self.assertEqual(requests[1], {"op": "prepare", "peer": "127.0.0.1:5000", "local": [0, 1, 2, 3], "remote": [7, 6, 5, 4]})
        self.assertEqual(requests[2], {"op": "write", "peer": "127.0.0.1:5000", "prepared": 9, "layer": 1})
        self.assertEqual(requests[3], requests[2])
        self.assertEqual(
            requests[4],
            {"op": "write", "peer": "127.0.0.1:5000", "layer": 0, "local": [1, 2], "remote": [3, 4],
             "tag": {"u": "18446744073709551615"}, "timeoutMs": 2500},
        )
        self.assertEqual(
            requests[5],
            {"op": "write", "peer": "127.0.0.1:5000", "layer": 1, "prepared": 9, "tag": {"s": "req-9"}, "timeoutMs": 0},
        )
        self.assertEqual(requests[6], {"op": "release", "prepared": 9})
        with self.assertRaises(kvtransfer.InvalidArgument) as caught:
            worker.write_cache(peer, prepared, layer=0)
        self.assertIn("released", caught.exception.message)

    def test_client_side_refusals(self) -> None:
        self.start(lambda c, r, m: {"ok": {"peer": "h:1", "prepared": 1}})
        worker = self.attach()
        peer = worker.connect("h", 1)
        prepared = worker.prepare_blocks(peer, [0], [0])
        other = worker.peer("h", 2)
        cases = [
            (lambda: worker.write_cache(peer, [0], None), "invalid remote_ids"),
            (lambda: worker.write_cache(peer, [0], [0], -1), "invalid layer"),
            (lambda: worker.write_cache(peer, [0], [0], "1"), "invalid layer"),  # type: ignore[arg-type]
            (lambda: worker.write_cache(peer, [0], [0], 0, tag=-5), "invalid tag"),
            (lambda: worker.write_cache(peer, [0], [0], 0, timeout=-1), "invalid timeout"),
            (lambda: worker.write_cache(other, prepared, layer=0), "prepared for h:1, not h:2"),
            (lambda: worker.write_cache(peer, prepared, [0], 0), "invalid remote_ids"),
            (lambda: worker.write_cache(42, [0], [0]), "invalid peer"),  # type: ignore[arg-type]
            (lambda: worker.connect("", 1), "invalid ip"),
            (lambda: worker.connect("h", 65536), "invalid port"),
            (lambda: worker.wait_for_arrival(True), "invalid tag"),  # type: ignore[arg-type]
            (lambda: worker.wait_for_arrival("t", layers="0"), "invalid layers"),  # type: ignore[arg-type]
        ]
        for call, words in cases:
            with self.assertRaises(kvtransfer.InvalidArgument, msg=words) as caught:
                call()
            self.assertIn(words, caught.exception.message)
        # A second worker's peer or list is refused by this one.
        second = self.attach()
        with self.assertRaises(kvtransfer.InvalidArgument):
            second.write_cache(peer, [0], [0])
        with self.assertRaises(kvtransfer.InvalidArgument):
            second.write_cache("h:1", prepared, layer=0)

    def test_fence(self) -> None:
        answers = {"fence": {"ok": {"acknowledged": ["prefill-a"], "cutOff": ["prefill-b"]}}}

        def handler(conn, rid, message):
            return answers.get(message["op"], {"ok": {}})

        self.start(handler)
        worker = self.attach(role="decode")
        result = worker.fence("req-1", hold_ms=500, ack_timeout_ms=0).result(5)
        self.assertEqual(result, kvtransfer.FenceResult(["prefill-a"], ["prefill-b"]))
        self.assertIsInstance(worker.fence(peer="prefill-a"), kvtransfer.FenceFuture)
        worker.fence(2**64 - 1).result(5)
        requests = [m for _, m in self.conn().requests[2:]]
        self.assertEqual(requests[0], {"op": "fence", "tag": {"s": "req-1"}, "holdMs": 500, "ackTimeoutMs": 0})
        self.assertEqual(requests[1], {"op": "fence", "peer": "prefill-a"})
        self.assertEqual(requests[2], {"op": "fence", "tag": {"u": "18446744073709551615"}})
        # Client-side refusals: nothing is sent.
        cases = [
            (lambda: worker.fence(), "neither of tag and peer"),
            (lambda: worker.fence("t", peer="p"), "both of tag and peer"),
            (lambda: worker.fence(peer=""), "invalid peer"),
            (lambda: worker.fence(peer=7), "invalid peer"),  # type: ignore[arg-type]
            (lambda: worker.fence(-1), "invalid tag"),
            (lambda: worker.fence("t", hold_ms=3_600_001), "invalid hold_ms"),
            (lambda: worker.fence("t", hold_ms=1.5), "invalid hold_ms"),  # type: ignore[arg-type]
            (lambda: worker.fence("t", ack_timeout_ms=-1), "invalid ack_timeout_ms"),
        ]
        for call, words in cases:
            with self.assertRaises(kvtransfer.InvalidArgument, msg=words) as caught:
                call()
            self.assertIn(words, caught.exception.message)
        self.assertEqual(len(self.conn().requests), 5)
        # The sidecar's refusal, and a malformed answer, are typed.
        answers["fence"] = {"error": {"code": "ERR_FENCED", "message": "tag 'x' is fenced"}}
        with self.assertRaises(kvtransfer.Fenced):
            worker.fence("x").result(5)
        answers["fence"] = {"ok": {"acknowledged": "prefill-a"}}
        with self.assertRaises(kvtransfer.ProtocolError):
            worker.fence("x").result(5)

    def test_pipelined_out_of_order(self) -> None:
        held = []

        def handler(conn, rid, message):
            if message["op"] == "write":
                held.append((rid, message["layer"]))
                if len(held) == 32:  # answer all, last first; odd layers fail
                    for r, layer in reversed(held):
                        if layer % 2:
                            conn.answer(r, error=("ERR_PEER_DISCONNECTED", f"layer {layer} lost"))
                        else:
                            conn.answer(r)
                return None
            return {"ok": {}}

        self.start(handler)
        worker = self.attach()
        futures = [worker.write_cache("p:1", [0], [0], layer) for layer in range(32)]
        self.assertEqual(worker.pending_calls, 32)
        self.assertFalse(futures[0].done())
        for layer, future in enumerate(futures):
            if layer % 2:
                with self.assertRaises(kvtransfer.PeerDisconnected) as caught:
                    future.result(5)
                self.assertEqual(caught.exception.message, f"layer {layer} lost")
                self.assertIsInstance(future.exception(), kvtransfer.PeerDisconnected)
            else:
                self.assertIsNone(future.result(5))
        self.assertEqual(worker.pending_calls, 0)
        self.assertEqual(len({rid for rid, _ in held}), 32)

    def test_result_timeout_then_answer(self) -> None:
        pending = []
        self.start(lambda conn, rid, m: pending.append((conn, rid)) if m["op"] == "write" else {"ok": {}})
        worker = self.attach()
        future = worker.write_cache("p:1", [0], [0], 0)
        started = time.monotonic()
        with self.assertRaises(kvtransfer.Timeout) as caught:
            future.result(0.2)
        self.assertGreaterEqual(time.monotonic() - started, 0.19)
        self.assertIsInstance(caught.exception, TimeoutError)
        self.assertIn("still pending", caught.exception.message)
        wait_until(lambda: pending)
        conn, rid = pending[0]
        conn.answer(rid, error=("ERR_TIMEOUT", "timed out after 30000 ms"))
        with self.assertRaises(kvtransfer.Timeout) as caught:
            future.result(5)
        self.assertIn("30000", caught.exception.message)

    def test_threads_share_the_reader(self) -> None:
        answers: list = []

        def handler(conn, rid, message):
            if message["op"] == "write":
                answers.append(rid)
                if len(answers) == 40:
                    for r in answers:
                        conn.answer(r)
                return None
            return {"ok": {}}

        self.start(handler)
        worker = self.attach()
        errors: list = []
        barrier = threading.Barrier(8)

        def run() -> None:
            try:
                futures = [worker.write_cache("p:1", [0], [0], i) for i in range(5)]
                barrier.wait(5)
                for f in futures:
                    f.result(10)
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        self.assertEqual(errors, [])
        self.assertEqual(worker.pending_calls, 0)

    def test_wait_and_arrival_events(self) -> None:
        def handler(conn, rid, message):
            if message["op"] == "wait":
                layers = message.get("layers", 1)
                layers = range(layers) if isinstance(layers, int) else layers
                return {"ok": {"arrivals": [{"peer": "p", "tag": message["tag"], "layerIdx": l, "blocks": 3} for l in layers]}}
            if message["op"] == "metrics":
                return {"ok": {"text": "kvtransfer_calls_total 1\n", "metrics": {"role": "decode", "callsSucceeded": 1}}}
            if message["op"] == "peerInfo":
                if message["port"] == 1:
                    return {"ok": {"transport": "tcp", "reason": "tcp: no RDMA", "details": {}, "connected": True}}
                return {"ok": None}
            return {"ok": {}}

        self.start(handler)
        worker = self.attach(role="decode")
        arrivals = worker.wait_for_arrival(2**64 - 1, layers=2, timeout=3)
        self.assertEqual(
            arrivals, [kvtransfer.Arrival("p", 2**64 - 1, 0, 3), kvtransfer.Arrival("p", 2**64 - 1, 1, 3)]
        )
        wait = self.conn().requests[-1][1]
        self.assertEqual(wait, {"op": "wait", "tag": {"u": "18446744073709551615"}, "layers": 2, "timeoutMs": 3000})
        worker.wait_for_arrival("x", layers=[0, 2])
        self.assertEqual(self.conn().requests[-1][1], {"op": "wait", "tag": {"s": "x"}, "layers": [0, 2]})
        worker.forget_arrivals("x")
        self.assertEqual(self.conn().requests[-1][1], {"op": "forget", "tag": {"s": "x"}})
        self.assertEqual(worker.metrics(), {"role": "decode", "callsSucceeded": 1})
        self.assertEqual(worker.metrics_text(), "kvtransfer_calls_total 1\n")
        info = worker.peer_info("h", 1)
        self.assertEqual(info, kvtransfer.PeerInfo("tcp", "tcp: no RDMA", {}, True))
        self.assertIsNone(worker.peer_info("h", 2))
        # Pushed events: queued, then iterated.
        conn = self.conn()
        for layer in range(3):
            conn.push_arrival("writer", {"s": "req"}, layer, 5)
        got = list(worker.arrivals(timeout=0.5))
        self.assertEqual([a.layer_idx for a in got], [0, 1, 2])
        self.assertEqual(got[0], kvtransfer.Arrival("writer", "req", 0, 5))
        # Events are read by any waiting call and kept for later.
        conn.push_arrival("writer", {"u": "7"}, 0, 1)
        worker.metrics()
        worker.metrics()
        self.assertEqual(next(worker.arrivals(timeout=0)), kvtransfer.Arrival("writer", 7, 0, 1))

    def test_arrival_queue_bound_and_callbacks(self) -> None:
        self.start()
        worker = self.attach(role="decode", max_queued_arrivals=4)
        conn = self.conn()
        for layer in range(10):
            conn.push_arrival("w", {"s": "t"}, layer, 1)
        deadline = time.monotonic() + 5
        while worker.dropped_arrivals < 6 and time.monotonic() < deadline:
            worker.pump(0.1)
        self.assertEqual(worker.dropped_arrivals, 6)
        self.assertEqual([a.layer_idx for a in worker.arrivals(timeout=0)], [6, 7, 8, 9])
        seen: list = []
        got_all = threading.Event()

        def on_arrival(arrival) -> None:
            seen.append(arrival.layer_idx)
            if len(seen) == 3:
                got_all.set()

        remove = worker.on_arrival(on_arrival)
        worker.start_reader_thread()
        for layer in range(3):
            conn.push_arrival("w", {"s": "t"}, layer, 1)
        self.assertTrue(got_all.wait(5))
        self.assertEqual(seen, [0, 1, 2])
        # With the reader thread, calls still work from this thread.
        worker.metrics()
        remove()
        conn.push_arrival("w", {"s": "t"}, 9, 1)
        self.assertEqual([a.layer_idx for a in worker.arrivals(timeout=2)][:1], [9])

    def test_done_callback(self) -> None:
        pending = []
        self.start(lambda conn, rid, m: pending.append((conn, rid)) if m["op"] == "write" else {"ok": {}})
        worker = self.attach()
        future = worker.write_cache("p:1", [0], [0], 0)
        done = threading.Event()
        future.add_done_callback(lambda f: done.set())
        worker.start_reader_thread()
        wait_until(lambda: pending)
        conn, rid = pending[0]
        conn.answer(rid)
        self.assertTrue(done.wait(5))
        called = []
        future.add_done_callback(called.append)  # already done: at once
        self.assertEqual(called, [future])

    # -- the end of the connection -------------------------------------------------------

    def test_sidecar_death_detaches(self) -> None:
        pending = []
        self.start(lambda conn, rid, m: pending.append(rid) if m["op"] in ("write", "wait") else {"ok": {}})
        worker = self.attach(role="decode")
        futures = [worker.write_cache("p:1", [0], [0], layer) for layer in range(3)]
        outcome: list = []

        def waiter() -> None:
            try:
                worker.wait_for_arrival("t", timeout=None)
            except BaseException as error:
                outcome.append(error)

        thread = threading.Thread(target=waiter)
        thread.start()
        wait_until(lambda: len(pending) == 4)
        self.conn().drop()
        thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], kvtransfer.Detached)
        self.assertIn("attach again", outcome[0].message)
        self.assertIn(self.path, outcome[0].message)
        for future in futures:
            with self.assertRaises(kvtransfer.Detached):
                future.result(1)
        with self.assertRaises(kvtransfer.Detached):
            worker.metrics()
        with self.assertRaises(kvtransfer.Detached):
            worker.write_cache("p:1", [0], [0], 0)
        with self.assertRaises(kvtransfer.Detached):
            list(worker.arrivals(timeout=0))
        self.assertFalse(worker.attached)
        worker.detach()  # no error: only closes
        # A new attach on the (restarted) sidecar works.
        self.fake.close()
        self.start()
        self.attach()

    def test_send_to_a_dead_sidecar(self) -> None:
        self.start()
        worker = self.attach()
        self.conn().drop()
        self.fake.close()
        time.sleep(0.1)
        with self.assertRaises(kvtransfer.Detached):
            worker.write_cache_sync("p:1", [0], [0], 0)
        with self.assertRaises(kvtransfer.Detached):
            worker.metrics()

    def test_detach_and_context_manager(self) -> None:
        self.start()
        with self.attach() as worker:
            worker.metrics()
        self.assertFalse(worker.attached)
        self.assertEqual(self.conn().requests[-1][1], {"op": "detach"})
        with self.assertRaises(kvtransfer.Closed) as caught:
            worker.metrics()
        self.assertIn("detached", caught.exception.message)
        worker.detach()  # idempotent

    def test_names_from_the_attach_answer(self) -> None:
        self.start()
        original = self.fake.respond  # type: ignore[union-attr]
        names = iter(["from-sidecar", None])

        def respond(conn, rid, message):
            if message["op"] == "attach":
                answer = original(conn, rid, message)
                name = next(names)
                if name is None:
                    del answer["ok"]["name"]  # a sidecar that predates `name` in the answer
                else:
                    answer["ok"]["name"] = name
                return answer
            return original(conn, rid, message)

        self.fake.respond = respond  # type: ignore[union-attr, method-assign]
        self.assertEqual(self.attach(name="asked").name, "from-sidecar")  # the sidecar's word
        older = self.attach()
        self.assertEqual(older.name, f"{socket.gethostname()}:{older.port}")  # the communicator's default

    def test_older_sidecar_peer_info_and_detach(self) -> None:
        # Before their fixes, the sidecar answered peerInfo of an unknown peer with {} (not
        # null) and ended the connection on detach without answering it.
        self.start(lambda c, r, m: {"ok": {}})
        original = self.fake.respond  # type: ignore[union-attr]

        def respond(conn, rid, message):
            if message["op"] == "detach":
                conn.drop()
                return None
            return original(conn, rid, message)

        self.fake.respond = respond  # type: ignore[union-attr, method-assign]
        worker = self.attach()
        self.assertIsNone(worker.peer_info("h", 2))
        worker.detach()
        self.assertFalse(worker.attached)
        with self.assertRaises(kvtransfer.Closed):
            worker.metrics()

    def test_frames_are_valid_json_objects(self) -> None:
        # Every request the client sent (including the fast path of prepared writes) parsed.
        self.start(lambda c, r, m: {"ok": {"peer": "h:1", "prepared": 3}})
        worker = self.attach()
        peer = worker.connect("h", 1)
        prepared = worker.prepare_blocks(peer, [0], [1])
        worker.write_cache_sync(peer, prepared, layer=4)
        self.assertEqual(json.loads(json.dumps(self.conn().requests[-1][1])), {"op": "write", "peer": "h:1", "prepared": 3, "layer": 4})


if __name__ == "__main__":
    unittest.main()
