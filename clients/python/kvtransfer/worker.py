"""The :class:`Worker`: a worker's calls to its communicator in the sidecar, in the style of
the TypeScript ``RDMACommunicator`` (``connect``, ``prepare_blocks``, ``write_cache``,
``wait_for_arrival``, ``peer_info``, ``metrics``, ``detach``). Make one with
:func:`kvtransfer.attach`; how calls are sent and answered is :mod:`kvtransfer._connection`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

from ._checks import check_int, check_port, check_seconds, check_str, fence_request, timeout_ms
from ._connection import Connection
from ._protocol import Tag, block_ids, encode_tag
from .errors import Closed, Detached, KvTransferError, ProtocolError, invalid_argument
from .futures import FenceFuture, WriteFuture
from .values import Arrival, Peer, PeerInfo, PreparedBlocks, parse_arrival, parse_peer_info

__all__ = ["Worker"]

#: Seconds the client waits for an answer beyond a timeout the sidecar enforces itself.
_GRACE_S = 10.0
#: The sidecar's default timeout of ``connect`` and ``write`` (the TS API's 30 000 ms).
_SIDECAR_DEFAULT_TIMEOUT_S = 30.0
_U32 = 0xFFFF_FFFF


class Worker:
    """A worker attached to the sidecar: its communicator lives there. Make one with :func:`attach`.

    Mirrors the TypeScript ``RDMACommunicator``: ``connect``, ``prepare_blocks``,
    ``write_cache``, ``wait_for_arrival``, ``peer_info``, ``metrics``; ``detach`` closes
    it. A context manager (``with attach(...) as worker:`` detaches at the end).

    Thread-safe: any thread may issue calls and wait on them; the waiting thread reads the
    sidecar's socket for all of them (no background thread unless
    :meth:`start_reader_thread`). Once the sidecar connection ends, every pending and later
    call raises :class:`~kvtransfer.Detached`; after :meth:`detach`, later calls raise
    :class:`~kvtransfer.Closed`.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        timeout: float,
        role: str,
        block_number: int,
        block_bytes: int,
        port: int,
        transport: str,
        name: str,
        sidecar_version: str,
        reattached: bool = False,
        warm: bool = False,
    ) -> None:
        """Internal: use :func:`kvtransfer.attach`."""
        self._conn = conn
        self._timeout = timeout
        # Bound once: the hot path (write_cache) calls them directly.
        self._submit = conn.submit
        self._call = conn.call
        self._role = role
        self._block_number = block_number
        self._block_bytes = block_bytes
        self._port = port
        self._transport = transport
        self._name = name
        self._sidecar_version = sidecar_version
        self._reattached = reattached
        self._warm = warm

    # -- properties --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The control-plane port of this worker's communicator (the bound one with ``port=0``)."""
        return self._port

    @property
    def reattached(self) -> bool:
        """Whether this worker took over the communicator its slot's predecessor left (warm
        re-attach: same port, the peers' links kept)."""
        return self._reattached

    @property
    def warm(self) -> bool:
        """Whether the sidecar keeps this worker's communicator for a successor attaching with
        its ``slot`` when it ends (host regions over TCP, grace period not 0)."""
        return self._warm

    @property
    def transport(self) -> str:
        """The transport this side offers: ``"tcp"``, ``"rdma"`` or ``"nvlink"``."""
        return self._transport

    @property
    def name(self) -> str:
        """The name peers see in arrivals (the sidecar's answer to attach; default ``hostname:port``)."""
        return self._name

    @property
    def role(self) -> str:
        """``"prefill"`` or ``"decode"``."""
        return self._role

    @property
    def block_number(self) -> int:
        """Number of blocks in every region."""
        return self._block_number

    @property
    def block_bytes(self) -> int:
        """Bytes per block."""
        return self._block_bytes

    @property
    def socket_path(self) -> str:
        """The sidecar's socket path."""
        return self._conn.socket_path

    @property
    def sidecar_version(self) -> str:
        """The sidecar's version, from ``hello``."""
        return self._sidecar_version

    @property
    def attached(self) -> bool:
        """Whether the connection to the sidecar is up (not detached, not lost)."""
        return self._conn.dead is None

    @property
    def dropped_arrivals(self) -> int:
        """Arrival events dropped from the :meth:`arrivals` queue (oldest first, beyond its bound)."""
        return self._conn.dropped

    @property
    def pending_calls(self) -> int:
        """Requests sent and not answered yet."""
        return self._conn.pending_count

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<kvtransfer.Worker {self._role} port={self._port} {self._transport} via {self.socket_path} {state}>"

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.detach()
        except KvTransferError:
            if exc_type is None:
                raise

    # -- calls -------------------------------------------------------------------------

    def peer(self, ip: str, port: Union[int, str]) -> Peer:
        """The :class:`Peer` for ``ip:port`` without connecting (the sidecar refuses calls to a
        peer never connected with ``ERR_NOT_CONNECTED``)."""
        check_str("ip", ip, allow_empty=False)
        port = check_port("port", port)
        return Peer(ip, port, f"{ip}:{port}", self)

    def connect(
        self,
        ip: str,
        port: Union[int, str],
        *,
        dst_tp_size: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Peer:
        """Handshakes with the communicator listening on ``ip:port`` and opens the data path.

        Args:
            ip: the peer's host (name or address).
            port: its control-plane port (its worker's ``port``).
            dst_tp_size: the peer's tensor-parallel size this side expects (a peer declaring
                another is refused with ``ERR_TP_MISMATCH``); None or 0: not checked.
            timeout: seconds to wait for the peer (it may start later); None: the sidecar's
                default, 30 s.

        Returns the :class:`Peer` to pass to ``write_cache`` and ``prepare_blocks``.
        """
        check_str("ip", ip, allow_empty=False)
        port = check_port("port", port)
        message: Dict[str, Any] = {"op": "connect", "ip": ip, "port": port}
        if dst_tp_size is not None and dst_tp_size != 0:
            message["dstTpSize"] = check_int("dst_tp_size", dst_tp_size, 0, _U32)
        ms = timeout_ms("timeout", timeout)
        if ms is not None:
            message["timeoutMs"] = ms
        ok = self._call(message, self._bound(timeout))
        key = ok.get("peer") if isinstance(ok, dict) else None
        return Peer(ip, port, key if isinstance(key, str) else f"{ip}:{port}", self)

    def prepare_blocks(self, peer: Union[Peer, str], local_ids: Iterable[int], remote_ids: Iterable[int]) -> PreparedBlocks:
        """Validates and plans ``local_ids[i] → remote_ids[i]`` once for ``peer``.

        Pass the result to ``write_cache(peer, prepared, layer=...)`` for every layer. Bad
        ids raise here, typed as ``write_cache`` would (``BlockIdOutOfRange``, ...).
        """
        key = self._peer_key(peer)
        local = block_ids("local_ids", local_ids)
        remote = block_ids("remote_ids", remote_ids)
        ok = self._call({"op": "prepare", "peer": key, "local": local, "remote": remote}, self._timeout)
        if not isinstance(ok, dict) or isinstance(ok.get("prepared"), bool) or not isinstance(ok.get("prepared"), int):
            raise ProtocolError("ERR_PROTOCOL", f"the sidecar's answer to prepare has no 'prepared' handle: {ok!r}")
        runs = ok.get("runs")
        return PreparedBlocks(self, key, ok["prepared"], len(local), runs if isinstance(runs, int) else None)

    def write_cache(
        self,
        peer: Union[Peer, str],
        local_or_prepared: Union[Iterable[int], PreparedBlocks],
        remote_ids: Optional[Union[Iterable[int], int]] = None,
        layer: int = 0,
        *,
        tag: Optional[Tag] = None,
        timeout: Optional[float] = None,
    ) -> WriteFuture:
        """Writes K (and V, when present) of blocks into the peer's blocks of ``layer``.

        Forms: ``write_cache(peer, local_ids, remote_ids, layer)`` or, with a list from
        :meth:`prepare_blocks`, ``write_cache(peer, prepared, layer=layer)`` (also
        ``write_cache(peer, prepared, layer)``, as in the TS API).

        Args:
            peer: a :class:`Peer` from :meth:`connect` (or its ``"ip:port"`` key).
            local_or_prepared: this side's block ids, or a :class:`PreparedBlocks`.
            remote_ids: the peer's block ids (``remote_ids[i]`` receives ``local_ids[i]``).
            layer: the layer index.
            tag: a str (≤ 254 UTF-8 bytes) or an int (0..2^64-1): the peer gets an arrival
                for it once every byte landed.
            timeout: seconds until the call fails with ``Timeout`` (None: the sidecar's
                default, 30 s; 0: none). A timed-out call tears the peer connection down
                first, so none of its bytes land later; ``connect`` again to go on.

        Returns a :class:`WriteFuture` at once (the request is sent): its ``result()`` is
        None once every byte is in the peer's memory, or raises the typed error. Any number
        of calls may be in flight.
        """
        if type(layer) is not int:
            layer = check_int("layer", layer, 0, _U32)
        if isinstance(local_or_prepared, PreparedBlocks):
            prepared = local_or_prepared
            if remote_ids is not None:
                if isinstance(remote_ids, int) and not isinstance(remote_ids, bool) and layer == 0:
                    layer = remote_ids  # write_cache(peer, prepared, layer)
                else:
                    raise invalid_argument("remote_ids", "must be None with a PreparedBlocks (pass layer=...)")
            self._check_prepared(peer, prepared)
            if tag is None and timeout is None:
                if layer < 0:
                    raise invalid_argument("layer", f"{layer} is not in 0..{_U32}")
                return self._submit("write", None, WriteFuture, body=prepared._prefix + b"%d}" % layer)
            message: Dict[str, Any] = {"op": "write", "peer": prepared.peer, "layer": layer, "prepared": prepared.handle}
        else:
            if remote_ids is None:
                raise invalid_argument("remote_ids", "missing; pass the peer's block ids (or a PreparedBlocks)")
            message = {
                "op": "write",
                "peer": self._peer_key(peer),
                "layer": layer,
                "local": block_ids("local_ids", local_or_prepared),  # type: ignore[arg-type]
                "remote": block_ids("remote_ids", remote_ids),  # type: ignore[arg-type]
            }
        if layer < 0:
            raise invalid_argument("layer", f"{layer} is not in 0..{_U32}")
        if tag is not None:
            message["tag"] = encode_tag(tag)
        ms = timeout_ms("timeout", timeout)
        if ms is not None:
            message["timeoutMs"] = ms
        return self._submit("write", message, WriteFuture)

    def write_cache_sync(
        self,
        peer: Union[Peer, str],
        local_or_prepared: Union[Iterable[int], PreparedBlocks],
        remote_ids: Optional[Union[Iterable[int], int]] = None,
        layer: int = 0,
        *,
        tag: Optional[Tag] = None,
        timeout: Optional[float] = None,
    ) -> None:
        """``write_cache(...).result()``: returns once every byte is in the peer's memory."""
        future = self.write_cache(peer, local_or_prepared, remote_ids, layer, tag=tag, timeout=timeout)
        future.result(None if timeout == 0 else self._bound(timeout))

    def wait_for_arrival(
        self,
        tag: Tag,
        layers: Optional[Union[int, Iterable[int]]] = None,
        timeout: Optional[float] = None,
    ) -> List[Arrival]:
        """Returns once every requested layer of ``tag`` has arrived (arrivals that came
        before the call count too).

        Args:
            tag: the writer's tag (str or int).
            layers: layers to wait for: an int ``n`` means ``0..n-1``; a list names them;
                None: layer 0.
            timeout: seconds until ``Timeout`` is raised (None: no limit).

        Returns the arrivals of those layers.
        """
        message: Dict[str, Any] = {"op": "wait", "tag": encode_tag(tag)}
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                message["layers"] = check_int("layers", layers, 0, _U32)
            else:
                if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                    raise invalid_argument("layers", f"expected an int or a list of ints, got {type(layers).__name__}")
                message["layers"] = [check_int("layers[]", layer, 0, _U32) for layer in layers]
        ms = timeout_ms("timeout", timeout)
        if ms is not None:
            message["timeoutMs"] = ms
        ok = self._call(message, None if timeout is None else timeout + _GRACE_S)
        raw = ok.get("arrivals") if isinstance(ok, dict) else None
        if not isinstance(raw, list):
            raise ProtocolError("ERR_PROTOCOL", f"the sidecar's answer to wait has no 'arrivals' list: {ok!r}")
        arrivals = [parse_arrival(item) for item in raw]
        return [a for a in arrivals if a is not None]

    def forget_arrivals(self, tag: Tag) -> None:
        """Forgets the kept arrivals of ``tag`` in the sidecar (call after consuming a request)."""
        self._call({"op": "forget", "tag": encode_tag(tag)}, self._timeout)

    def fence(
        self,
        tag: Optional[Tag] = None,
        *,
        peer: Optional[str] = None,
        hold_ms: Optional[int] = None,
        ack_timeout_ms: Optional[int] = None,
    ) -> FenceFuture:
        """Receiving side: makes sure no write of ``tag`` (or from the writer named ``peer``)
        can land in this worker's memory any more, e.g. before its blocks are reused.

        Every writer connected to this worker is asked to fail its pending calls of that tag
        (or all of them, for ``peer``) with :class:`~kvtransfer.Fenced` (``ERR_FENCED``) and
        to refuse new ones for ``hold_ms``; a writer that does not answer within
        ``ack_timeout_ms`` is cut off by this side and must connect again.

        Args:
            tag: the tag to fence (str or int), or
            peer: a writer's name (as arrivals report it): every call of that writer.
                Exactly one of ``tag`` and ``peer``.
            hold_ms: milliseconds the writers refuse new calls of the fenced tag (or, for
                ``peer``, every call) to this worker (default 30000; at most 3600000).
            ack_timeout_ms: milliseconds each writer has to acknowledge (default 1000; 0: cut
                every writer off at once; at most 600000).

        Returns a :class:`~kvtransfer.FenceFuture` at once: its ``result()`` is a
        :class:`~kvtransfer.FenceResult` (writers that acknowledged, writers cut off) once
        none of the fenced writes can land, or raises the typed error.
        """
        return self._submit("fence", fence_request(tag, peer, hold_ms, ack_timeout_ms), FenceFuture)

    def peer_info(self, ip: str, port: Union[int, str]) -> Optional[PeerInfo]:
        """The transport used with ``ip:port`` and why; None when this side never connected to it."""
        check_str("ip", ip, allow_empty=False)
        port = check_port("port", port)
        return parse_peer_info(self._call({"op": "peerInfo", "ip": ip, "port": port}, self._timeout))

    def metrics(self) -> Dict[str, Any]:
        """Counters of this worker's communicator (the TS ``Metrics`` object, as a dict)."""
        ok = self._call({"op": "metrics"}, self._timeout)
        metrics = ok.get("metrics") if isinstance(ok, dict) else None
        return metrics if isinstance(metrics, dict) else {}

    def metrics_text(self) -> str:
        """The same counters in the Prometheus text exposition format (``kvtransfer_*``)."""
        ok = self._call({"op": "metrics"}, self._timeout)
        text = ok.get("text") if isinstance(ok, dict) else None
        return text if isinstance(text, str) else ""

    def detach(self, timeout: Optional[float] = None) -> None:
        """Closes this worker's communicator in the sidecar and the connection. Idempotent.

        The sidecar answers ``detach``, then closes the communicator and the connection.
        Pending calls fail (``Closed``); later calls raise ``Closed``. When the sidecar is
        already gone, this only closes the connection.
        """
        conn = self._conn
        if conn.dead is None and not conn.detaching:
            conn.detaching = True
            try:
                self._call({"op": "detach"}, self._timeout if timeout is None else timeout)
            except (Detached, Closed):
                pass  # the connection ended first (a sidecar that did not answer detach)
            finally:
                conn.finish("ERR_CLOSED", "the worker detached from the sidecar; attach again")
        else:
            conn.close_socket()

    close = detach

    # -- arrivals ----------------------------------------------------------------------

    def arrivals(self, timeout: Optional[float] = None) -> Iterator[Arrival]:
        """Iterates over arrival events as the sidecar pushes them (every tagged write this
        side receives), reading the socket while it waits.

        The iteration ends when none comes within ``timeout`` seconds (None: never); it raises
        :class:`~kvtransfer.Detached` once the sidecar connection ended (after the queued ones).
        Events are queued (up to 65536; the oldest dropped beyond, see ``dropped_arrivals``)
        unless an :meth:`on_arrival` callback takes them.
        """
        while True:
            event = self._conn.next_arrival(timeout)
            if event is None:
                return
            yield event

    def on_arrival(self, callback: Callable[[Arrival], None]) -> Callable[[], None]:
        """Calls ``callback(arrival)`` for every arrival event from now on, in the thread that
        reads the socket; returns a function that removes it.

        While a callback is registered, events are not queued for :meth:`arrivals`. Without
        :meth:`start_reader_thread`, callbacks run only while some thread waits on this worker
        (or calls :meth:`pump`).
        """
        if not callable(callback):
            raise invalid_argument("callback", f"{callback!r} is not callable")
        return self._conn.on_arrival(callback)

    def pump(self, timeout: float = 0.0) -> None:
        """Reads and dispatches what the sidecar sent, waiting up to ``timeout`` seconds for
        something (for callbacks without a reader thread)."""
        self._conn.pump(check_seconds("timeout", timeout, allow_zero=True))

    def start_reader_thread(self) -> threading.Thread:
        """Starts (once) a daemon thread that reads the socket whenever no other thread does,
        so callbacks run promptly. Calls then settle in that thread: each costs a thread
        switch, which the default (no thread) avoids."""
        return self._conn.start_reader_thread(f"kvtransfer-reader-{self._port}")

    # -- helpers -----------------------------------------------------------------------

    def _peer_key(self, peer: Union[Peer, str]) -> str:
        if isinstance(peer, Peer):
            if peer._worker is not None and peer._worker is not self:
                raise invalid_argument(
                    "peer", f"the Peer {peer.key} belongs to another worker; use the one this worker's connect returned"
                )
            return peer.key
        if isinstance(peer, str) and peer:
            return peer
        raise invalid_argument("peer", f"expected a Peer (from connect) or an 'ip:port' str, got {type(peer).__name__}")

    def _check_prepared(self, peer: Union[Peer, str], prepared: PreparedBlocks) -> None:
        if prepared._worker is not self:
            raise invalid_argument("prepared", "it was prepared by another worker; prepare it on this one")
        if prepared._released:
            raise invalid_argument("prepared", f"the list (handle {prepared.handle}) was released")
        key = self._peer_key(peer)
        if key != prepared.peer:
            raise invalid_argument("prepared", f"it was prepared for {prepared.peer}, not {key}")

    @staticmethod
    def _bound(timeout: Optional[float]) -> float:
        """How long the client waits for an answer whose timeout the sidecar enforces."""
        return (_SIDECAR_DEFAULT_TIMEOUT_S if timeout is None else timeout) + _GRACE_S
