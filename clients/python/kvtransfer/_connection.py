"""One worker's connection to the sidecar: the socket, sending and reading frames, the
requests awaiting answers, and the queue of pushed arrival events.

Concurrency: by default there is no background thread. Whichever thread waits (a future's
``result()``, ``wait_for_arrival``, ``arrivals``, any synchronous request) reads the
socket for everyone, one reader at a time: it hands answers to their futures by request
id and queues pushed arrival events; other waiting threads sleep on a condition until
their answer is in. A call issued and awaited by one thread thus costs no thread switch.
Calls may be pipelined: issue many ``write_cache`` calls, then wait for their futures.
:meth:`Connection.start_reader_thread` adds a reader thread for callback-style use
(``Worker.on_arrival``, ``add_done_callback``).
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import select
import socket
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ._protocol import MAX_FRAME_BYTES, FrameDecoder, _encode_json, _HEADER, send_frame
from .errors import KvTransferError, ProtocolError, invalid_argument, make_error
from .futures import Request, run_callback
from .values import Arrival, parse_arrival

_log = logging.getLogger("kvtransfer")

#: Arrival events kept for ``Worker.arrivals`` (oldest dropped beyond it).
DEFAULT_MAX_QUEUED_ARRIVALS = 65536
_RECV_BYTES = 256 * 1024

#: (callback, argument) pairs collected under the lock and run after it is released.
_Callbacks = List[Tuple[Callable[..., None], Any]]

_CONNECTIONS: "weakref.WeakSet[Connection]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child must not share its parent's sidecar connection: the sidecar would not
    # see the parent's exit, and both would read the same stream. Close it in the child only.
    for conn in list(_CONNECTIONS):
        conn.forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Connection:
    """The socket to the sidecar and everything read from it (thread-safe).

    ``dead`` is set once the connection ended: ``(code, message)`` of the error every
    pending and later request fails with (``ERR_DETACHED`` when the sidecar went away,
    ``ERR_CLOSED`` after a detach, or what the sidecar said before closing).
    """

    def __init__(self, sock: socket.socket, socket_path: str, max_queued_arrivals: int) -> None:
        self._sock = sock
        self.socket_path = socket_path
        # `with self.lock` (C-level) where only the lock is needed; `_cv` waits and notifies on it.
        self.lock = threading.Lock()
        self._cv = threading.Condition(self.lock)
        self._send_lock = threading.Lock()
        self._pending: Dict[int, Request] = {}
        self._next_id = 1
        self._reading = False
        self._decoder = FrameDecoder()
        self._rbuf = bytearray(_RECV_BYTES)
        self._rview = memoryview(self._rbuf)
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        self.dead: Optional[Tuple[str, str]] = None
        self._fatal: Optional[KvTransferError] = None  # an unasked error frame (e.g. ERR_AUTH)
        #: Set by ``Worker.detach``: a connection that ends now ends as ``ERR_CLOSED``.
        self.detaching = False
        self._sock_closed = False
        self._close_when_idle = False
        self._events: Deque[Arrival] = collections.deque()
        self._max_events = max_queued_arrivals
        #: Arrival events dropped from the queue (oldest first, beyond its bound).
        self.dropped = 0
        self._arrival_callbacks: List[Callable[[Arrival], None]] = []
        self._reader: Optional[threading.Thread] = None
        self._pid = os.getpid()
        _CONNECTIONS.add(self)

    @property
    def pending_count(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    # -- requests ----------------------------------------------------------------------

    def call(self, message: Dict[str, Any], timeout: Optional[float], fds: Sequence[int] = ()) -> Any:
        """Sends ``message`` and waits up to ``timeout`` s (None: forever) for its ``ok``."""
        return self.submit(str(message.get("op")), message, Request, fds=fds)._answer(timeout)

    def submit(
        self,
        op: str,
        message: Optional[Dict[str, Any]],
        cls: type,
        fds: Sequence[int] = (),
        body: Optional[bytes] = None,
    ) -> Any:
        """Sends ``message`` (or the already-encoded JSON ``body``) with a fresh request id;
        returns the ``cls`` future its answer will settle."""
        if body is None:
            body = _encode_json(message).encode("utf-8")
        if len(body) + 8 > MAX_FRAME_BYTES:
            raise invalid_argument(
                op, f"the request is {len(body) + 8} bytes; a frame is at most {MAX_FRAME_BYTES} (fewer block ids per call)"
            )
        with self.lock:
            if self.dead is not None:
                raise self.dead_error()
            request_id = self._next_id
            while request_id in self._pending:  # 2^32 ids wrap; skip one still in flight
                request_id = request_id % 0xFFFF_FFFF + 1
            self._next_id = request_id % 0xFFFF_FFFF + 1
            request = cls(self, request_id, op)
            self._pending[request_id] = request
        frame = _HEADER.pack(len(body) + 4, request_id) + body
        try:
            with self._send_lock:
                send_frame(self._sock, frame, fds)
        except OSError as error:
            if fds and error.errno == errno.EBADF:
                with self.lock:
                    self._pending.pop(request_id, None)
                raise invalid_argument("regions", f"a descriptor could not be sent: {error.strerror}") from None
            self._send_failed(f"sending failed: {error.strerror or error}")
        return request

    def _send_failed(self, cause: str) -> None:
        """A send failed: the sidecar closed the connection. What it sent before closing (an
        answer, or an unasked error such as ``ERR_AUTH``) is still readable: read it to the
        end of the stream, so that the requests fail with what the sidecar said."""
        for _ in range(64):
            with self.lock:
                if self.dead is not None or self._reading:
                    return  # ended already, or another thread reads up to the end
                self._reading = True
            self._read_once(0)
        self._lost(cause)

    # -- arrival events ----------------------------------------------------------------

    def next_arrival(self, timeout: Optional[float]) -> Optional[Arrival]:
        """The oldest queued arrival, reading up to ``timeout`` s (None: forever) for one;
        None when none came. Raises the connection's error once it ended and none is queued."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wait_for(self._has_event, deadline)
        with self.lock:
            event = self._events.popleft() if self._events else None
        if event is None and self.dead is not None:
            raise self.dead_error()
        return event

    def _has_event(self) -> bool:
        return bool(self._events)

    def on_arrival(self, callback: Callable[[Arrival], None]) -> Callable[[], None]:
        """Hands every later arrival to ``callback`` instead of the queue; returns its remover."""
        with self.lock:
            self._arrival_callbacks.append(callback)

        def remove() -> None:
            with self.lock:
                if callback in self._arrival_callbacks:
                    self._arrival_callbacks.remove(callback)

        return remove

    # -- reading -----------------------------------------------------------------------

    def pump(self, timeout: float) -> None:
        """One read, waiting up to ``timeout`` s, unless another thread reads already."""
        with self.lock:
            if self._reading or self.dead is not None:
                return  # another thread reads (and dispatches) already
            self._reading = True
        self._read_once(timeout)

    def start_reader_thread(self, name: str) -> threading.Thread:
        """Starts (once) a daemon thread that reads whenever no other thread does."""
        with self.lock:
            if self._reader is not None and self._reader.is_alive():
                return self._reader
            thread = threading.Thread(target=self._reader_loop, name=name, daemon=True)
            self._reader = thread
        thread.start()
        return thread

    def _reader_loop(self) -> None:
        try:
            self.wait_for(self._is_dead, None)
        except BaseException:  # pragma: no cover - the thread's last words
            _log.exception("kvtransfer: the reader thread stopped")

    def _is_dead(self) -> bool:
        return self.dead is not None

    def wait_for(self, predicate: Callable[[], bool], deadline: Optional[float]) -> bool:
        """Reads the socket (one thread at a time) until ``predicate()`` holds or ``deadline``
        (a ``time.monotonic()``) passes; returns ``predicate()``."""
        cv = self._cv
        while True:
            with self.lock:
                while True:
                    if predicate():
                        return True
                    if self.dead is not None:
                        return predicate()
                    if deadline is None:
                        remaining = None
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                    if not self._reading:
                        self._reading = True
                        break
                    cv.wait(remaining)
            self._read_once(remaining)

    def _read_once(self, timeout: Optional[float]) -> None:
        """One read as the reading thread: waits up to ``timeout`` for data, dispatches it."""
        frames: List[Tuple[int, Dict[str, Any]]] = []
        lost: Optional[str] = None
        fatal: Optional[KvTransferError] = None
        try:
            try:
                ready = self._poller.poll(-1 if timeout is None else max(0, math.ceil(timeout * 1000)))
                if ready:
                    count = self._sock.recv_into(self._rbuf, _RECV_BYTES, socket.MSG_DONTWAIT)
                    if count == 0:
                        lost = "the sidecar closed the connection"
                    else:
                        frames = self._decoder.feed(self._rview[:count])
            except (BlockingIOError, InterruptedError):
                pass
            except ProtocolError as error:
                fatal = error
                lost = error.message
            except OSError as error:
                lost = f"reading failed: {error.strerror or error}"
        finally:
            callbacks: _Callbacks = []
            with self.lock:
                self._reading = False
                if frames:
                    self._dispatch(frames, callbacks)
                if fatal is not None and self._fatal is None:
                    self._fatal = fatal
                if lost is not None:
                    self._mark_dead(*self._lost_error(lost), callbacks)
                if lost is not None or self._close_when_idle:
                    self._close_now()
                self._cv.notify_all()
            for fn, arg in callbacks:
                run_callback(fn, arg)

    def _dispatch(self, frames: List[Tuple[int, Dict[str, Any]]], callbacks: _Callbacks) -> None:
        """Settles answered requests and takes events (under the lock)."""
        for request_id, message in frames:
            if request_id:
                request = self._pending.pop(request_id, None)
                if request is None:
                    continue  # e.g. a request whose sender gave up on the connection
                error = message.get("error")
                if error is not None:
                    if isinstance(error, dict):
                        request._error = make_error(error.get("code"), error.get("message", ""))
                    else:
                        request._error = ProtocolError("ERR_PROTOCOL", f"the sidecar sent a malformed error: {error!r}")
                elif "ok" in message:
                    request._ok = message["ok"]
                else:
                    request._error = ProtocolError(
                        "ERR_PROTOCOL", f"the sidecar's answer to {request.op} has neither 'ok' nor 'error'"
                    )
                request._done = True
                if request._callbacks:
                    callbacks.extend((fn, request) for fn in request._callbacks)
                    request._callbacks = None
                continue
            event = message.get("event")
            if event == "arrival":
                arrival = parse_arrival(message)
                if arrival is None:
                    continue
                if self._arrival_callbacks:
                    callbacks.extend((fn, arrival) for fn in self._arrival_callbacks)
                else:
                    if len(self._events) >= self._max_events:
                        self._events.popleft()
                        self.dropped += 1
                    self._events.append(arrival)
            elif event is None and isinstance(message.get("error"), dict):
                # Unasked error (e.g. ERR_AUTH before any request was read): the connection ends.
                error = message["error"]
                self._fatal = make_error(error.get("code"), error.get("message", ""))
            # Other events: newer sidecars may send them; ignored.

    # -- the end -----------------------------------------------------------------------

    def _lost_error(self, cause: str) -> Tuple[str, str]:
        if self._fatal is not None:
            return self._fatal.code, self._fatal.message
        if self.detaching:
            return "ERR_CLOSED", "the worker detached from the sidecar; attach again"
        return (
            "ERR_DETACHED",
            f"the connection to the sidecar at {self.socket_path} ended ({cause}): the sidecar exited or "
            "restarted; attach again",
        )

    def _mark_dead(self, code: str, message: str, callbacks: _Callbacks) -> None:
        """Ends the connection (under the lock): every pending request fails with ``code``."""
        if self.dead is not None:
            return
        self.dead = (code, message)
        pending = list(self._pending.values())
        self._pending.clear()
        for request in pending:
            request._error = make_error(code, message)
            request._done = True
            if request._callbacks:
                callbacks.extend((fn, request) for fn in request._callbacks)
                request._callbacks = None
        self._cv.notify_all()

    def dead_error(self) -> KvTransferError:
        """The error of calls on the ended connection."""
        code, message = self.dead or ("ERR_DETACHED", "the worker is detached")
        return make_error(code, message)

    def _lost(self, cause: str) -> None:
        """The connection failed outside a read (a send): end it, wake the reader."""
        self._end(None, cause)

    def finish(self, code: str, message: str) -> None:
        """Ends the connection with ``code`` (detach, or a failed attach) and closes the socket."""
        self._end((code, message), "")

    def _end(self, error: Optional[Tuple[str, str]], cause: str) -> None:
        callbacks: _Callbacks = []
        with self.lock:
            self._mark_dead(*(error or self._lost_error(cause)), callbacks)
        self.close_socket()
        for fn, arg in callbacks:
            run_callback(fn, arg)

    def close_socket(self) -> None:
        """Closes the socket now, or (while a thread reads it) wakes that thread to close it."""
        with self.lock:
            if self._sock_closed:
                return
            if self._reading:
                self._close_when_idle = True
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self._close_now()

    def _close_now(self) -> None:
        # Under the lock, with no reader. The shutdown wakes a sender blocked in sendall, so
        # that the send lock comes free: closing while another thread sends could hand the
        # descriptor number to a file opened meanwhile.
        if self._sock_closed:
            return
        self._sock_closed = True
        self._close_when_idle = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._poller.unregister(self._sock.fileno())
        except (KeyError, ValueError, OSError):
            pass
        with self._send_lock:
            self._sock.close()

    def forked(self) -> None:
        """In a forked child: drop the inherited connection without touching the parent's."""
        if self._pid == os.getpid():
            return
        self.lock = threading.Lock()
        self._cv = threading.Condition(self.lock)
        self._send_lock = threading.Lock()
        self._reading = False
        self._reader = None
        message = "this process was forked from the one that attached; attach again in this process"
        if self.dead is None:
            self.dead = ("ERR_DETACHED", message)
        self._pending.clear()
        if not self._sock_closed:
            self._sock_closed = True
            try:
                self._sock.close()  # close only: shutdown would end the parent's connection
            except OSError:
                pass
