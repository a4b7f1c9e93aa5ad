"""A scripted stand-in for ``kvtransfer serve`` speaking protocol 1 (client unit tests only).

It answers ``hello`` and ``attach`` (recording the descriptors received with SCM_RIGHTS),
and hands every other request to ``handler(conn, request_id, message)``, which returns an
answer (``{"ok": ...}`` / ``{"error": ...}``) or None to answer later with ``conn.answer``.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from _support import kvtransfer  # noqa: F401  (sys.path)
from kvtransfer._protocol import FrameDecoder, encode_frame


class FakeConnection:
    def __init__(self, sidecar: "FakeSidecar", sock: socket.socket) -> None:
        self.sidecar = sidecar
        self.sock = sock
        self.fds: List[int] = []  # the connection's descriptor list
        self.requests: List[Tuple[int, Dict[str, Any]]] = []
        self.lock = threading.Lock()

    def send(self, request_id: int, message: Dict[str, Any]) -> None:
        with self.lock:
            self.sock.sendall(encode_frame(request_id, message))

    def answer(self, request_id: int, ok: Any = None, error: Optional[Tuple[str, str]] = None) -> None:
        if error is not None:
            self.send(request_id, {"error": {"code": error[0], "message": error[1]}})
        else:
            self.send(request_id, {"ok": {} if ok is None else ok})

    def push_arrival(self, peer: str, tag: Dict[str, str], layer: int, blocks: int) -> None:
        self.send(0, {"event": "arrival", "peer": peer, "tag": tag, "layerIdx": layer, "blocks": blocks})

    def drop(self) -> None:
        """The sidecar dies: the connection ends."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 253)
                self.fds.extend(fds)
                if not data:
                    return
                for request_id, message in decoder.feed(data):
                    self.requests.append((request_id, message))
                    reply = self.sidecar.respond(self, request_id, message)
                    if reply is not None:
                        self.send(request_id, reply)
        except OSError:
            return
        finally:
            for fd in self.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.sock.close()


class FakeSidecar:
    def __init__(
        self,
        path: str,
        handler: Optional[Callable[[FakeConnection, int, Dict[str, Any]], Optional[Dict[str, Any]]]] = None,
        hello: Optional[Dict[str, Any]] = None,
        on_connect: Optional[Callable[[FakeConnection], bool]] = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.hello = hello if hello is not None else {"ok": {"protocol": 1, "sidecar": "fake/0"}}
        self.on_connect = on_connect
        self.connections: List[FakeConnection] = []
        self.attached = threading.Event()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            conn = FakeConnection(self, sock)
            self.connections.append(conn)
            if self.on_connect is not None and not self.on_connect(conn):
                continue
            threading.Thread(target=conn.serve, daemon=True).start()

    def respond(self, conn: FakeConnection, request_id: int, message: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        op = message.get("op")
        if op == "hello":
            return self.hello
        if op == "attach":
            conn.attach_fds = [os.fstat(fd).st_ino for fd in conn.fds]  # type: ignore[attr-defined]
            self.attached.set()
            return {"ok": {"port": 40000 + len(self.connections), "transport": "tcp", "name": message.get("name") or "fake:1"}}
        if op == "detach":
            conn.send(request_id, {"ok": {}})
            conn.drop()
            return None
        if self.handler is not None:
            return self.handler(conn, request_id, message)
        return {"ok": {}}

    def close(self) -> None:
        self.server.close()
        for conn in self.connections:
            conn.drop()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
