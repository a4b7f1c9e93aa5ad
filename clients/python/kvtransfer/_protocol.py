"""The sidecar's socket protocol, version 1 (docs/sidecar.md): framing and tags.

A frame is a 4-byte little-endian length of the rest, a 4-byte little-endian request id,
then a UTF-8 JSON object; at most 16 MiB in all. File descriptors ride as ``SCM_RIGHTS``
on a frame's bytes. Requests carry a nonzero id and an ``op``; answers carry the same id
and ``{"ok": {...}}`` or ``{"error": {"code", "message"}}``; frames sent unasked have id 0
and an ``event``.

Nothing here touches a worker's state: these are the pure pieces (tested without a sidecar).
"""

from __future__ import annotations

import json
import operator
import socket
import struct
from typing import Any, Dict, Iterable, List, Sequence, Tuple, Union

from .errors import ProtocolError, invalid_argument

#: The protocol version this client speaks (``hello``'s ``protocol``).
PROTOCOL_VERSION = 1
#: The largest frame, length field included.
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: The most descriptors Linux passes in one ``SCM_RIGHTS`` message (``SCM_MAX_FD``).
MAX_FDS_PER_FRAME = 253
#: The longest string tag, in UTF-8 bytes (the engine's limit).
MAX_TAG_STRING_BYTES = 254
#: The largest integer tag (u64).
MAX_TAG_INT = (1 << 64) - 1

_HEADER = struct.Struct("<II")  # length of the rest, request id
HEADER_BYTES = _HEADER.size

#: A request tag: a u64 as ``int`` or a short ``str``.
Tag = Union[int, str]

_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_decode_json = json.JSONDecoder().decode


def encode_frame(request_id: int, message: Dict[str, Any]) -> bytes:
    """The frame of ``message`` with ``request_id`` (0 only for events, which clients never send).

    Raises InvalidArgument when the frame would exceed :data:`MAX_FRAME_BYTES` (e.g. block id
    lists of millions of ids).
    """
    return encode_body(request_id, _encode_json(message).encode("utf-8"))


def encode_body(request_id: int, body: bytes) -> bytes:
    """The frame of an already-encoded JSON ``body``."""
    length = 4 + len(body)
    if 4 + length > MAX_FRAME_BYTES:
        raise invalid_argument(
            "request", f"its frame is {4 + length} bytes; a frame is at most {MAX_FRAME_BYTES} bytes"
        )
    return _HEADER.pack(length, request_id) + body


class FrameDecoder:
    """Splits a byte stream into ``(request_id, message)`` pairs.

    Feed it whatever ``recv`` returned; it keeps a partial frame for the next call. A frame
    longer than :data:`MAX_FRAME_BYTES`, shorter than its id, or whose body is not a JSON
    object raises :class:`ProtocolError` (the stream cannot be trusted after that).
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame kept for the next :meth:`feed`."""
        return len(self._buffer)

    def feed(self, data: bytes) -> List[Tuple[int, Dict[str, Any]]]:
        """Appends ``data``; returns the frames it completed, in order."""
        buffer = self._buffer
        buffer += data
        frames: List[Tuple[int, Dict[str, Any]]] = []
        start = 0
        end = len(buffer)
        while end - start >= HEADER_BYTES:
            length, request_id = _HEADER.unpack_from(buffer, start)
            if length < 4 or length + 4 > MAX_FRAME_BYTES:
                raise ProtocolError(
                    "ERR_PROTOCOL",
                    f"the sidecar sent a frame of length {length}; it must be 4..{MAX_FRAME_BYTES - 4}",
                )
            if end - start < 4 + length:
                break
            body = bytes(buffer[start + HEADER_BYTES : start + 4 + length])
            start += 4 + length
            frames.append((request_id, decode_body(body)))
        if start:
            del buffer[:start]
        return frames


def decode_body(body: bytes) -> Dict[str, Any]:
    """A frame's JSON object; anything else raises :class:`ProtocolError`."""
    try:
        message = _decode_json(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError("ERR_PROTOCOL", f"the sidecar sent a frame that is not UTF-8 JSON: {error}") from None
    if not isinstance(message, dict):
        raise ProtocolError("ERR_PROTOCOL", f"the sidecar sent a frame that is not a JSON object: {body[:80]!r}")
    return message


def send_frame(sock: socket.socket, frame: bytes, fds: Sequence[int] = ()) -> None:
    """Sends ``frame`` whole; ``fds`` (at most :data:`MAX_FDS_PER_FRAME`) ride on its first bytes."""
    if fds:
        if len(fds) > MAX_FDS_PER_FRAME:
            raise invalid_argument("fds", f"{len(fds)} descriptors; one frame carries at most {MAX_FDS_PER_FRAME}")
        sent = socket.send_fds(sock, [frame], list(fds), socket.MSG_NOSIGNAL)
        if sent < len(frame):
            sock.sendall(memoryview(frame)[sent:], socket.MSG_NOSIGNAL)
    else:
        sock.sendall(frame, socket.MSG_NOSIGNAL)


def encode_tag(tag: Tag) -> Dict[str, str]:
    """``{"s": text}`` for a string tag, ``{"u": "decimal"}`` for an int tag (0..2^64-1).

    Raises InvalidArgument for a bool, a negative or too large int, a string over 254 UTF-8
    bytes, or another type.
    """
    if isinstance(tag, str):
        size = len(tag.encode("utf-8"))
        if size > MAX_TAG_STRING_BYTES:
            raise invalid_argument("tag", f"{tag[:16]!r}... is {size} bytes of UTF-8; at most {MAX_TAG_STRING_BYTES}")
        return {"s": tag}
    if isinstance(tag, bool):
        raise invalid_argument("tag", f"{tag!r} is a bool; expected an int in 0..2^64-1 or a str")
    try:
        value = operator.index(tag)
    except TypeError:
        raise invalid_argument("tag", f"expected an int in 0..2^64-1 or a str, got {type(tag).__name__}") from None
    if value < 0 or value > MAX_TAG_INT:
        raise invalid_argument("tag", f"{value} is not a u64 (0..2^64-1)")
    return {"u": str(value)}


def decode_tag(encoded: Any) -> Tag:
    """The tag of an arrival (``{"s": ...}`` → str, ``{"u": "..."}`` → int)."""
    if isinstance(encoded, dict):
        if isinstance(encoded.get("s"), str):
            return encoded["s"]
        value = encoded.get("u")
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ProtocolError("ERR_PROTOCOL", f"the sidecar sent a tag that is not {{'s': str}} or {{'u': decimal}}: {encoded!r}")


def tag_key(tag: Tag) -> Tuple[str, Union[int, str]]:
    """A key that keeps ``42`` and ``"42"`` apart."""
    return ("s", tag) if isinstance(tag, str) else ("u", int(tag))


def block_ids(name: str, ids: Iterable[int]) -> List[int]:
    """A block id list as JSON takes it.

    A ``list`` passes as is (the engine refuses a non-integer naming its index, as with the
    TS API's arrays); a tuple, ``range``, ``array.array`` or NumPy array is converted.
    """
    if type(ids) is list:
        return ids  # type: ignore[return-value]
    if isinstance(ids, (str, bytes, dict)) or ids is None:
        raise invalid_argument(name, f"expected a sequence of block ids, got {type(ids).__name__}")
    tolist = getattr(ids, "tolist", None)  # NumPy arrays and array.array
    if callable(tolist):
        converted = tolist()
        if isinstance(converted, list):
            return converted
    try:
        return [operator.index(i) for i in ids]
    except TypeError:
        raise invalid_argument(name, "expected a sequence of int block ids") from None
