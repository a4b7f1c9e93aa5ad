"""Unit tests that need no sidecar: framing, tags, errors, regions, PyTorch handle records."""

from __future__ import annotations

import json
import os
import struct
import unittest
from multiprocessing import shared_memory

from _support import kvtransfer  # noqa: F401  (sys.path)
from kvtransfer import _protocol as protocol
from kvtransfer import errors
from kvtransfer.regions import CudaIpcRegion, CudaVmmRegion, HostRegion, encode_caches
from kvtransfer.torch_regions import cache_layout, parse_share_handle, region_of


class FramingTest(unittest.TestCase):
    def test_layout(self) -> None:
        frame = protocol.encode_frame(7, {"op": "hello", "protocol": 1})
        length, request_id = struct.unpack_from("<II", frame)
        self.assertEqual(length, len(frame) - 4)
        self.assertEqual(request_id, 7)
        self.assertEqual(json.loads(frame[8:].decode("utf-8")), {"op": "hello", "protocol": 1})

    def test_utf8_body(self) -> None:
        frame = protocol.encode_frame(1, {"name": "décode-ü"})
        self.assertIn("décode-ü".encode("utf-8"), frame)
        self.assertEqual(protocol.FrameDecoder().feed(frame), [(1, {"name": "décode-ü"})])

    def test_split_and_joined_frames(self) -> None:
        frames = [protocol.encode_frame(i, {"i": i, "pad": "x" * i}) for i in range(1, 20)]
        stream = b"".join(frames)
        decoder = protocol.FrameDecoder()
        got = []
        for b in range(len(stream)):  # a byte at a time
            got.extend(decoder.feed(stream[b : b + 1]))
        self.assertEqual([rid for rid, _ in got], list(range(1, 20)))
        self.assertEqual(decoder.buffered, 0)
        decoder = protocol.FrameDecoder()
        got = decoder.feed(stream)  # all at once
        self.assertEqual(len(got), 19)
        self.assertEqual(got[4], (5, {"i": 5, "pad": "xxxxx"}))
        # A frame and a half, then the rest.
        half = len(frames[0]) + len(frames[1]) // 2
        decoder = protocol.FrameDecoder()
        self.assertEqual(len(decoder.feed(stream[:half])), 1)
        self.assertEqual(len(decoder.feed(stream[half:])), 18)

    def test_event_frame(self) -> None:
        frame = protocol.encode_frame(0, {"event": "arrival"})
        self.assertEqual(protocol.FrameDecoder().feed(frame), [(0, {"event": "arrival"})])

    def test_bad_frames(self) -> None:
        for bad in (
            struct.pack("<II", 3, 1),  # shorter than its id
            struct.pack("<II", protocol.MAX_FRAME_BYTES, 1),  # over 16 MiB
            struct.pack("<II", 4 + 3, 1) + b"[1]",  # not an object
            struct.pack("<II", 4 + 3, 1) + b"{x}",  # not JSON
            struct.pack("<II", 4 + 2, 1) + b"\xff\xfe",  # not UTF-8
        ):
            with self.assertRaises(errors.ProtocolError, msg=repr(bad)) as caught:
                protocol.FrameDecoder().feed(bad)
            self.assertEqual(caught.exception.code, "ERR_PROTOCOL")

    def test_frame_limit(self) -> None:
        with self.assertRaises(errors.InvalidArgument) as caught:
            protocol.encode_frame(1, {"ids": "x" * protocol.MAX_FRAME_BYTES})
        self.assertIn(str(protocol.MAX_FRAME_BYTES), caught.exception.message)

    def test_send_fds_on_a_frame(self) -> None:
        a, b = __import__("socket").socketpair()
        r, w = os.pipe()
        try:
            frame = protocol.encode_frame(2, {"op": "attach"})
            protocol.send_frame(a, frame, [r, w])
            import socket

            data, fds, _, _ = socket.recv_fds(b, 1 << 16, 8)
            self.assertEqual(data, frame)
            self.assertEqual(len(fds), 2)
            self.assertEqual([os.fstat(fd).st_ino for fd in fds], [os.fstat(r).st_ino, os.fstat(w).st_ino])
            for fd in fds:
                os.close(fd)
            with self.assertRaises(errors.InvalidArgument):
                protocol.send_frame(a, frame, [r] * 254)
        finally:
            for fd in (r, w):
                os.close(fd)
            a.close()
            b.close()


class TagTest(unittest.TestCase):
    def test_encode(self) -> None:
        self.assertEqual(protocol.encode_tag("req-1"), {"s": "req-1"})
        self.assertEqual(protocol.encode_tag(""), {"s": ""})
        self.assertEqual(protocol.encode_tag(0), {"u": "0"})
        self.assertEqual(protocol.encode_tag(2**64 - 1), {"u": "18446744073709551615"})
        self.assertEqual(protocol.encode_tag("é" * 127), {"s": "é" * 127})  # 254 bytes

    def test_refused(self) -> None:
        for bad in (-1, 2**64, True, 1.5, None, b"x", "x" * 255, "é" * 128):
            with self.assertRaises(errors.InvalidArgument, msg=repr(bad)) as caught:
                protocol.encode_tag(bad)  # type: ignore[arg-type]
            self.assertTrue(caught.exception.message.startswith("invalid tag: "), caught.exception.message)

    def test_round_trip(self) -> None:
        for tag in ("a", "", "ü", 0, 1, 2**63, 2**64 - 1):
            self.assertEqual(protocol.decode_tag(protocol.encode_tag(tag)), tag)
            self.assertIs(type(protocol.decode_tag(protocol.encode_tag(tag))), type(tag))
        self.assertNotEqual(protocol.tag_key(42), protocol.tag_key("42"))

    def test_decode_refused(self) -> None:
        for bad in ({"u": "-1"}, {"u": "x"}, {"x": 1}, "s", None, {"u": "²"}):
            with self.assertRaises(errors.ProtocolError, msg=repr(bad)):
                protocol.decode_tag(bad)


class BlockIdsTest(unittest.TestCase):
    def test_forms(self) -> None:
        import array

        ids = [3, 1, 2]
        self.assertIs(protocol.block_ids("local_ids", ids), ids)
        self.assertEqual(protocol.block_ids("local_ids", (3, 1)), [3, 1])
        self.assertEqual(protocol.block_ids("local_ids", range(3)), [0, 1, 2])
        self.assertEqual(protocol.block_ids("local_ids", array.array("i", [5, 6])), [5, 6])
        for bad in ("12", None, {"a": 1}, (1.5,)):
            with self.assertRaises(errors.InvalidArgument):
                protocol.block_ids("local_ids", bad)  # type: ignore[arg-type]


class ErrorsTest(unittest.TestCase):
    TS_CODES = [
        "ERR_BLOCK_ID_OUT_OF_RANGE", "ERR_INVALID_BLOCK_ID", "ERR_BLOCK_COUNT_MISMATCH", "ERR_LAYER_OUT_OF_RANGE",
        "ERR_LAYOUT_MISMATCH", "ERR_REGION_OVERFLOW", "ERR_INVALID_ARGUMENT", "ERR_NOT_CONNECTED", "ERR_CLOSED",
        "ERR_PROTOCOL", "ERR_IO", "ERR_PEER_DISCONNECTED", "ERR_RDMA_UNAVAILABLE", "ERR_TRANSPORT_UNAVAILABLE",
        "ERR_RDMA", "ERR_RDMA_COMPLETION", "ERR_CUDA", "ERR_TIMEOUT", "ERR_ABORTED", "ERR_FENCED", "ERR_AUTH",
        "ERR_TP_MISMATCH", "ERR_UNSUPPORTED", "ERR_CHECKSUM_MISMATCH", "ERR_REGISTRY_UNAVAILABLE",
        "ERR_NAME_TAKEN", "ERR_INTERNAL",
    ]

    def test_codes_match_the_ts_api(self) -> None:
        # ts/errors.ts KV_TRANSFER_ERROR_CODES, plus the client's own ERR_DETACHED.
        self.assertEqual(list(errors.ERROR_CODES), self.TS_CODES + ["ERR_DETACHED"])
        ts = os.path.join(os.path.dirname(__file__), "..", "..", "..", "ts", "errors.ts")
        if os.path.exists(ts):
            with open(ts, encoding="utf-8") as f:
                text = f.read()
            block = text[text.index("KV_TRANSFER_ERROR_CODES = [") : text.index("] as const")]
            self.assertEqual([c for c in self.TS_CODES if f"'{c}'" in block], self.TS_CODES)
            self.assertEqual(block.count("'ERR_"), len(self.TS_CODES))

    def test_classes(self) -> None:
        for code in errors.ERROR_CODES:
            cls = errors.error_class(code)
            self.assertIsNot(cls, errors.KvTransferError)
            error = errors.make_error(code, "what")
            self.assertIsInstance(error, cls)
            self.assertIsInstance(error, errors.KvTransferError)
            self.assertEqual((error.code, error.message), (code, "what"))
            self.assertEqual(str(error), f"{code}: what")
        self.assertIs(errors.error_class("ERR_INVALID_ARGUMENT"), errors.InvalidArgument)
        self.assertIs(errors.error_class("ERR_TIMEOUT"), errors.Timeout)
        self.assertIs(errors.error_class("ERR_CLOSED"), errors.Closed)
        self.assertIs(errors.error_class("ERR_DETACHED"), errors.Detached)
        self.assertIs(errors.error_class("ERR_PROTOCOL"), errors.ProtocolError)
        self.assertIsInstance(errors.make_error("ERR_TIMEOUT", "t"), TimeoutError)
        unknown = errors.make_error("ERR_FROM_THE_FUTURE", "x")
        self.assertIs(type(unknown), errors.KvTransferError)
        self.assertEqual(unknown.code, "ERR_FROM_THE_FUTURE")
        self.assertEqual(errors.make_error(None, "x").code, "ERR_PROTOCOL")
        self.assertEqual(errors.InvalidArgument("short form").code, "ERR_INVALID_ARGUMENT")

    def test_pickles(self) -> None:
        import pickle

        for error in (errors.make_error("ERR_TIMEOUT", "t"), errors.make_error("ERR_NEW", "n")):
            copy = pickle.loads(pickle.dumps(error))
            self.assertEqual((type(copy), copy.code, copy.message), (type(error), error.code, error.message))


class RegionsTest(unittest.TestCase):
    def setUp(self) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=4 * 8192)

    def tearDown(self) -> None:
        self.shm.close()
        self.shm.unlink()

    def test_shared_memory(self) -> None:
        region = HostRegion.from_shared_memory(self.shm, 8192, 4096)
        self.assertEqual((region.fd, region.offset, region.bytes), (self.shm._fd, 8192, 4096))
        self.assertEqual(HostRegion.from_shared_memory(self.shm).bytes, 4 * 8192)
        self.assertEqual(HostRegion.from_shared_memory(self.shm, 8192).bytes, 3 * 8192)
        with self.assertRaises(errors.InvalidArgument) as caught:
            HostRegion.from_shared_memory(self.shm, 8192, 4 * 8192)
        self.assertIn("past the shared memory's size 32768", caught.exception.message)

    def test_dedup_and_indexes(self) -> None:
        memfd = os.memfd_create("kvt-test")
        try:
            os.ftruncate(memfd, 8192)
            shm = [HostRegion.from_shared_memory(self.shm, i * 8192, 8192) for i in range(4)]
            other = HostRegion(memfd, 0, 8192)
            encoded, fds = encode_caches({"keyCache": [shm[0], other, shm[1]], "valueCache": [shm[2], shm[3]]})
            self.assertEqual(fds, [self.shm._fd, memfd])
            self.assertEqual([r["fd"] for r in encoded["keyCache"]], [0, 1, 0])
            self.assertEqual(encoded["valueCache"], [{"fd": 0, "offset": 16384, "bytes": 8192}, {"fd": 0, "offset": 24576, "bytes": 8192}])
        finally:
            os.close(memfd)

    def test_client_side_checks(self) -> None:
        r, w = os.pipe()
        os.close(w)
        closed = os.dup(r)
        os.close(closed)
        try:
            cases = [
                (HostRegion(self.shm._fd, 0, 4 * 8192 + 1), "past the end of fd"),
                (HostRegion(self.shm._fd, 4 * 8192, 1), "past the end of fd"),
                (HostRegion(r, 0, 1), "is not a memory file"),
            ]
            for region, words in cases:
                with self.assertRaises(errors.InvalidArgument, msg=repr(region)) as caught:
                    encode_caches({"keyCache": [region], "valueCache": []})
                self.assertIn(words, caught.exception.message)
                self.assertIn("key_cache[0]", caught.exception.message)
            with self.assertRaises(errors.InvalidArgument) as caught:
                HostRegion(closed, 0, 1).check("value_cache[3]")
            self.assertIn(f"fd {closed} is not an open file descriptor", caught.exception.message)
            for bad in (dict(fd=-1, offset=0, bytes=1), dict(fd=3, offset=-1, bytes=1), dict(fd=True, offset=0, bytes=1)):
                with self.assertRaises(errors.InvalidArgument):
                    HostRegion(**bad)
            with self.assertRaises(errors.InvalidArgument):
                encode_caches({"keyCache": ["not a region"], "valueCache": []})  # type: ignore[list-item]
        finally:
            os.close(r)

    def test_too_many_descriptors(self) -> None:
        memfd = os.memfd_create("kvt-many")
        dups = []
        try:
            os.ftruncate(memfd, 4096)
            dups = [os.dup(memfd) for _ in range(254)]
            regions = [HostRegion(fd, 0, 4096) for fd in dups]
            with self.assertRaises(errors.InvalidArgument) as caught:
                encode_caches({"keyCache": regions, "valueCache": []})
            self.assertIn("254 distinct file descriptors", caught.exception.message)
            self.assertIn("253", caught.exception.message)
            encode_caches({"keyCache": regions[:253], "valueCache": []})  # the limit itself passes
            # attach refuses before connecting anywhere.
            with self.assertRaises(errors.InvalidArgument):
                kvtransfer.attach("/nonexistent/kvt.sock", role="prefill", block_number=1, block_bytes=4096,
                                  key_cache=regions, value_cache=[])
        finally:
            for fd in dups + [memfd]:
                os.close(fd)

    def test_cuda_ipc(self) -> None:
        raw = bytes(range(64))
        self.assertEqual(CudaIpcRegion(raw, 0, 10).to_json({})["cudaIpcHandle"], raw.hex())
        record = b"\x02c" + raw
        self.assertEqual(CudaIpcRegion(record, 512, 10).to_json({}), {"cudaIpcHandle": record.hex(), "offset": 512, "bytes": 10})
        for bad in (raw[:63], b"\x02e" + raw, b"\x01c" + raw, "00" * 64):
            with self.assertRaises(errors.InvalidArgument):
                CudaIpcRegion(bad, 0, 1)  # type: ignore[arg-type]

    def test_cuda_vmm(self) -> None:
        r, w = os.pipe()
        try:
            region = CudaVmmRegion([r, w], 2 << 20, 1 << 20, 3 << 20)
            self.assertEqual(region.descriptors(), (r, w))
            encoded, fds = encode_caches({"keyCache": [region], "valueCache": [CudaVmmRegion([w], 2 << 20, 0, 1)]})
            self.assertEqual(fds, [r, w])
            self.assertEqual(encoded["keyCache"][0], {"cudaVmmFds": [0, 1], "segmentBytes": 2 << 20, "offset": 1 << 20, "bytes": 3 << 20})
            self.assertEqual(encoded["valueCache"][0]["cudaVmmFds"], [1])
            with self.assertRaises(errors.InvalidArgument) as caught:
                CudaVmmRegion([r, w], 2 << 20, 1 << 20, 3 << 20 + 1)
            self.assertIn("past the 2 segments", caught.exception.message)
            with self.assertRaises(errors.InvalidArgument):
                CudaVmmRegion([], 1, 0, 0)
        finally:
            os.close(r)
            os.close(w)


class FakeStorage:
    def __init__(self, record: bytes, size: int, offset: int) -> None:
        self.record, self.size, self.offset = record, size, offset

    def _share_cuda_(self):
        return (0, self.record, self.size, self.offset, b"ref", 0, b"event", False)


class FakeTensor:
    """What region_of uses of a torch.Tensor."""

    is_cuda = True
    device = "cuda:0"

    def __init__(self, storage: FakeStorage, shape, element: int = 2, storage_offset: int = 0) -> None:
        self.storage, self.shape, self.element, self._storage_offset = storage, tuple(shape), element, storage_offset

    def untyped_storage(self) -> FakeStorage:
        return self.storage

    def element_size(self) -> int:
        return self.element

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def storage_offset(self) -> int:
        return self._storage_offset

    def is_contiguous(self) -> bool:
        return True

    def stride(self):
        return ()

    def __getitem__(self, i: int) -> "FakeTensor":
        inner = self.shape[1:]
        step = 1
        for d in inner:
            step *= d
        return FakeTensor(self.storage, inner, self.element, self._storage_offset + i * step)


class TorchHandleTest(unittest.TestCase):
    def expandable(self, fds, segment: int, pid: int, aligned: bool = True) -> bytes:
        header = struct.pack("<i4xQQ" if aligned else "<iQQ", pid, segment, len(fds))
        return b"\x02e" + header + struct.pack(f"<{len(fds)}i", *fds)

    def test_record_lengths(self) -> None:
        # fleet.md: "42 bytes for a 64 MiB tensor" = 2 + 24-byte aligned header + 4 fds of 20 MiB.
        record = self.expandable([10, 11, 12, 13], 20 << 20, 1234)
        self.assertEqual(len(record), 42)
        parsed = parse_share_handle(record)
        self.assertEqual((parsed.kind, parsed.pid, parsed.segment_bytes, parsed.fds), ("e", 1234, 20 << 20, (10, 11, 12, 13)))
        packed = parse_share_handle(self.expandable([7, 8], 2 << 20, 99, aligned=False))
        self.assertEqual((packed.pid, packed.segment_bytes, packed.fds), (99, 2 << 20, (7, 8)))
        self.assertEqual(parse_share_handle(b"\x02c" + bytes(64)).kind, "c")
        for bad in (record[:-1], record + b"\0", b"\x02c" + bytes(63), b"\x03c" + bytes(64), b"\x02x" + bytes(64), b""):
            with self.assertRaises(errors.InvalidArgument, msg=repr(bad[:4])):
                parse_share_handle(bad)

    def test_region_of_cuda_malloc(self) -> None:
        record = b"\x02c" + bytes(range(64))
        storage = FakeStorage(record, size=1 << 20, offset=4096)
        tensor = FakeTensor(storage, (2, 8, 16, 4), element=2)  # [2, blocks, tokens, heads*dim]
        region = region_of(tensor)
        self.assertIsInstance(region, CudaIpcRegion)
        self.assertEqual((region.offset, region.bytes), (4096, 2 * 8 * 16 * 4 * 2))
        value = region_of(tensor[1])  # the storage offset of t[1] is added
        self.assertEqual((value.offset, value.bytes), (4096 + 8 * 16 * 4 * 2, 8 * 16 * 4 * 2))
        self.assertEqual(value.handle, record)

    def test_region_of_expandable(self) -> None:
        r, w = os.pipe()
        try:
            record = self.expandable([r, w], 2 << 20, os.getpid())
            tensor = FakeTensor(FakeStorage(record, 3 << 20, 1 << 20), (3 << 19,), element=2)
            region = region_of(tensor)
            self.assertIsInstance(region, CudaVmmRegion)
            self.assertEqual((region.fds, region.segment_bytes, region.offset, region.bytes), ((r, w), 2 << 20, 1 << 20, 3 << 20))
            with self.assertRaises(errors.InvalidArgument) as caught:
                region_of(FakeTensor(FakeStorage(self.expandable([r], 2 << 20, os.getpid() + 1), 1, 0), (1,), 1))
            self.assertIn("belongs to pid", caught.exception.message)
        finally:
            os.close(r)
            os.close(w)

    def test_cache_layout(self) -> None:
        record = b"\x02c" + bytes(64)
        layers = [FakeTensor(FakeStorage(record, 1 << 24, 0), (2, 16, 8, 2, 64), element=2) for _ in range(3)]
        layout = cache_layout(layers)
        self.assertEqual(layout["block_number"], 16)
        self.assertEqual(layout["block_bytes"], 8 * 2 * 64 * 2)
        self.assertEqual(len(layout["key_cache"]), 3)
        self.assertEqual(layout["value_cache"][0].offset, 16 * 8 * 2 * 64 * 2)
        self.assertEqual(cache_layout({"layer.0": layers[0]})["block_number"], 16)
        with self.assertRaises(errors.InvalidArgument):
            cache_layout([FakeTensor(FakeStorage(record, 1 << 24, 0), (16, 2, 8, 2, 64))])
        with self.assertRaises(errors.InvalidArgument):
            cache_layout(layers + [FakeTensor(FakeStorage(record, 1 << 24, 0), (2, 8, 8, 2, 64), element=2)])
        with self.assertRaises(errors.InvalidArgument):
            cache_layout([])


if __name__ == "__main__":
    unittest.main()
