"""The futures of requests sent to the sidecar: :class:`WriteFuture` (``write_cache``) and
the plain request every other call waits on.

A future is settled by whichever thread reads the sidecar's socket (see
:mod:`kvtransfer._connection`); waiting on it makes the waiting thread that reader when no
other thread is.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, List, Optional, Protocol

from .errors import KvTransferError, Timeout, invalid_argument
from .values import FenceResult, parse_fence_result



class _Pump(Protocol):
    """What a future needs of the connection that answers it (``_connection.Connection``)."""

    lock: Any

    def wait_for(self, done: Callable[[], bool], deadline: Optional[float]) -> bool: ...

__all__ = ["WriteFuture", "FenceFuture"]

_log = logging.getLogger("kvtransfer")


def run_callback(fn: Callable[..., None], *args: Any) -> None:
    """Calls a user callback; what it raises is logged, never passed to the reader."""
    try:
        fn(*args)
    except Exception:  # a user callback must not break the reader
        _log.exception("kvtransfer: a callback raised")


class Request:
    """A request sent to the sidecar and the answer it awaits (settled by whichever thread reads).

    The connection settles it under its lock: ``_ok`` or ``_error``, then ``_done``, then the
    callbacks (outside the lock).
    """

    __slots__ = ("_conn", "_id", "op", "_done", "_ok", "_error", "_callbacks")

    def __init__(self, conn: _Pump, request_id: int, op: str) -> None:
        self._conn = conn
        self._id = request_id
        self.op = op
        self._done = False
        self._ok: Any = None
        self._error: Optional[KvTransferError] = None
        self._callbacks: Optional[List[Callable[[Any], None]]] = None

    def done(self) -> bool:
        """Whether the answer is in (or the call failed)."""
        return self._done

    def running(self) -> bool:
        """Whether the call is still pending."""
        return not self._done

    def cancelled(self) -> bool:
        """Always False: a call handed to the sidecar cannot be cancelled."""
        return False

    def cancel(self) -> bool:
        """Does nothing and returns False (``concurrent.futures`` semantics of a running call)."""
        return False

    def _wait(self, timeout: Optional[float]) -> None:
        if self._done:
            return
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout != timeout or timeout < 0):
            raise invalid_argument("timeout", f"{timeout!r} is not a number of seconds >= 0 (or None: no limit)")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._conn.wait_for(self._is_done, deadline) and not self._done:
            raise Timeout(
                "ERR_TIMEOUT",
                f"{self.op}: no answer from the sidecar within {timeout} s (the call is still pending there)",
            )

    def _is_done(self) -> bool:
        return self._done

    def _answer(self, timeout: Optional[float]) -> Any:
        """Waits up to ``timeout`` s for the answer; returns its ``ok`` or raises its error."""
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._ok

    def exception(self, timeout: Optional[float] = None) -> Optional[KvTransferError]:
        """The call's error, or None once it succeeded; waits like ``result``."""
        self._wait(timeout)
        return self._error

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Calls ``fn(future)`` once the call is settled, in the thread that read the answer
        (at once, in this thread, when it already is)."""
        with self._conn.lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        run_callback(fn, self)


class WriteFuture(Request):
    """The outcome of a ``write_cache`` call (a ``concurrent.futures.Future``-like object).

    ``result()`` returns None once every byte is in the peer's memory, or raises the call's
    :class:`~kvtransfer.KvTransferError`. Waiting on it reads the sidecar's socket in the
    calling thread (no thread switch).
    """

    __slots__ = ()

    def result(self, timeout: Optional[float] = None) -> None:
        """Waits up to ``timeout`` seconds (None: no limit) for the call.

        Raises the call's error (typed: ``Timeout``, ``PeerDisconnected``, ...), or
        :class:`~kvtransfer.Timeout` when ``timeout`` passed first; the call then stays
        pending in the sidecar (its own ``timeout`` given to ``write_cache`` bounds it), and
        ``result`` may be called again.
        """
        self._answer(timeout)

    def __repr__(self) -> str:
        state = "pending" if not self._done else ("failed: " + str(self._error) if self._error else "done")
        return f"<WriteFuture #{self._id} {state}>"


class FenceFuture(Request):
    """The outcome of a ``fence`` call (a ``concurrent.futures.Future``-like object).

    ``result()`` returns a :class:`~kvtransfer.FenceResult` once no write of the fenced tag
    (or writer) can land in this worker's memory any more, or raises the typed error.
    """

    __slots__ = ()

    def result(self, timeout: Optional[float] = None) -> FenceResult:
        """Waits up to ``timeout`` seconds (None: no limit) for the fence; raises
        :class:`~kvtransfer.Timeout` when ``timeout`` passed first (the fence goes on in the
        sidecar; ``result`` may be called again)."""
        return parse_fence_result(self._answer(timeout))

    def __repr__(self) -> str:
        state = "pending" if not self._done else ("failed: " + str(self._error) if self._error else "done")
        return f"<FenceFuture #{self._id} {state}>"
