"""What a worker's calls take and return: :class:`Peer`, :class:`PreparedBlocks`,
:class:`Arrival` and :class:`PeerInfo`, and how the latter two are read from the wire."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol

from ._protocol import Tag, _encode_json, decode_tag
from .errors import Closed, Detached, KvTransferError, ProtocolError



class _Releases(Protocol):
    """What a prepared list needs of its worker (``worker.Worker``)."""

    attached: bool
    _timeout: Optional[float]

    def _call(self, message: Dict[str, Any], timeout: Optional[float]) -> Any: ...

__all__ = ["Peer", "PreparedBlocks", "Arrival", "PeerInfo", "FenceResult"]

_log = logging.getLogger("kvtransfer")


@dataclass(frozen=True)
class Peer:
    """A peer this worker connected to (``Worker.connect``): pass it to calls.

    Attributes:
        ip: the host it was connected as.
        port: its control-plane port.
        key: ``"ip:port"``, how the sidecar, metrics and ``peer_info`` name it.
    """

    ip: str
    port: int
    key: str
    _worker: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Arrival:
    """Delivered on the receiving side after every byte of a tagged write is in its memory.

    Attributes:
        peer: the writer's name (its ``name`` at attach).
        tag: the tag the writer passed to ``write_cache`` (an int stays an int).
        layer_idx: the layer the call wrote.
        blocks: number of blocks the call wrote.
    """

    peer: str
    tag: Tag
    layer_idx: int
    blocks: int


@dataclass(frozen=True)
class PeerInfo:
    """``Worker.peer_info``: the transport used with a peer, and why.

    Attributes:
        transport: ``"tcp"``, ``"rdma"`` or ``"nvlink"``.
        reason: one sentence starting with the transport's name.
        details: what the transport uses on this side (RDMA: device, port, GID, MTU, ...).
        connected: whether the link is still usable.
    """

    transport: str
    reason: str
    details: Dict[str, str]
    connected: bool


class PreparedBlocks:
    """A block list validated and planned once for one peer (``Worker.prepare_blocks``).

    Pass it to ``write_cache`` in place of the two id lists, for any layer: nothing is
    validated or planned again. :meth:`release` frees it in the sidecar (it is freed anyway
    when the worker detaches); it is also a context manager.

    Attributes:
        peer: the peer key (``"ip:port"``) it was prepared for.
        blocks: number of block ids in the list.
        runs: coalesced copies per region and layer (when the sidecar reports it).
        handle: the sidecar's handle number.
    """

    __slots__ = ("_worker", "peer", "blocks", "runs", "handle", "_released", "_prefix", "__weakref__")

    def __init__(self, worker: _Releases, peer: str, handle: int, blocks: int, runs: Optional[int]) -> None:
        self._worker = worker
        self.peer = peer
        self.handle = handle
        self.blocks = blocks
        self.runs = runs
        self._released = False
        # The write request of this list, but for its layer: the hot path only appends it.
        self._prefix = (
            b'{"op":"write","peer":' + _encode_json(peer).encode("utf-8") + b',"prepared":%d,"layer":' % handle
        )

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    def release(self) -> None:
        """Frees the list in the sidecar; later writes with it raise InvalidArgument. Idempotent."""
        if self._released:
            return
        self._released = True
        if self._worker.attached:
            self._worker._call({"op": "release", "prepared": self.handle}, self._worker._timeout)

    def __enter__(self) -> "PreparedBlocks":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.release()
        except (Detached, Closed):
            pass

    def __repr__(self) -> str:
        state = ", released" if self._released else ""
        return f"PreparedBlocks(peer={self.peer!r}, blocks={self.blocks}, handle={self.handle}{state})"


@dataclass(frozen=True)
class FenceResult:
    """How a fence (``Worker.fence``) went.

    Attributes:
        acknowledged: writers (their names) that answered: none of their fenced calls can
            land any more.
        cut_off: writers that did not answer in time and were cut off by this side (they
            must connect again).
    """

    acknowledged: List[str]
    cut_off: List[str]


def parse_fence_result(ok: Any) -> FenceResult:
    """The answer to ``fence``: ``{"acknowledged": [...], "cutOff": [...]}``."""
    if not isinstance(ok, dict):
        raise ProtocolError("ERR_PROTOCOL", f"the sidecar's answer to fence is not an object: {ok!r}")
    lists = [ok.get("acknowledged"), ok.get("cutOff")]
    if not all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in lists):
        raise ProtocolError("ERR_PROTOCOL", f"the sidecar's answer to fence lacks its writer lists: {ok!r}")
    return FenceResult(list(lists[0]), list(lists[1]))  # type: ignore[arg-type]


def parse_arrival(item: Any) -> Optional[Arrival]:
    """An arrival from the wire (an event, or an item of ``wait``'s answer); None if malformed."""
    if not isinstance(item, dict):
        return None
    try:
        raw_tag = item.get("tag")
        tag: Tag = raw_tag if isinstance(raw_tag, (str, int)) and not isinstance(raw_tag, bool) else decode_tag(raw_tag)
        return Arrival(
            peer=str(item.get("peer", "")),
            tag=tag,
            layer_idx=int(item.get("layerIdx", 0)),
            blocks=int(item.get("blocks", 0)),
        )
    except (KvTransferError, TypeError, ValueError):
        _log.warning("kvtransfer: ignored a malformed arrival from the sidecar: %r", item)
        return None


def parse_peer_info(ok: Any) -> Optional[PeerInfo]:
    """``peerInfo``'s answer: the TS ``PeerInfo``, or ``null`` for a peer never connected.

    Sidecars before the fix of that answer sent ``{}`` for ``null``; it means None too.
    """
    if not isinstance(ok, dict) or "transport" not in ok:
        return None
    details = ok.get("details")
    return PeerInfo(
        transport=str(ok.get("transport", "")),
        reason=str(ok.get("reason", "")),
        details=dict(details) if isinstance(details, dict) else {},
        connected=bool(ok.get("connected", False)),
    )
