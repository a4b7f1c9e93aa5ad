"""Errors of the kvtransfer client.

Every error raised by this package is a :class:`KvTransferError` whose ``code`` is one of
:data:`ERROR_CODES`: the stable codes of the TypeScript API (``KV_TRANSFER_ERROR_CODES``),
plus ``ERR_DETACHED``, which only the client raises (the sidecar connection ended).

Each code has its own subclass (``error_class(code)``), so both styles work::

    try:
        worker.write_cache_sync(peer, prepared, layer=3)
    except kvtransfer.Timeout:
        ...
    except kvtransfer.KvTransferError as error:
        if error.code == "ERR_PEER_DISCONNECTED":
            ...
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

__all__ = [
    "ERROR_CODES",
    "KvTransferError",
    "BlockIdOutOfRange",
    "InvalidBlockId",
    "BlockCountMismatch",
    "LayerOutOfRange",
    "LayoutMismatch",
    "RegionOverflow",
    "InvalidArgument",
    "NotConnected",
    "Closed",
    "ProtocolError",
    "IoError",
    "PeerDisconnected",
    "RdmaUnavailable",
    "TransportUnavailable",
    "RdmaError",
    "RdmaCompletionError",
    "CudaError",
    "Timeout",
    "Aborted",
    "Fenced",
    "AuthError",
    "TpMismatch",
    "Unsupported",
    "ChecksumMismatch",
    "RegistryUnavailable",
    "NameTaken",
    "InternalError",
    "Detached",
    "error_class",
    "make_error",
    "invalid_argument",
]


class KvTransferError(Exception):
    """An error from kvtransfer.

    Attributes:
        code: the stable machine-readable code (``"ERR_INVALID_ARGUMENT"``, ...).
        message: what was wrong, naming the value and the limit.
    """

    #: The code of this class (``None`` for the base class: any code).
    CODE: Optional[str] = None

    def __init__(self, code: str, message: Optional[str] = None) -> None:
        """``KvTransferError(code, message)``; a subclass also takes ``Subclass(message)``."""
        if message is None:
            if self.CODE is None:
                raise TypeError("KvTransferError(code, message): the message is missing")
            code, message = self.CODE, code
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"

    def __reduce__(self):  # pickles (multiprocessing) with both fields
        return (type(self), (self.code, self.message))


class BlockIdOutOfRange(KvTransferError):
    """A block id is not below ``block_number`` (local or remote)."""

    CODE = "ERR_BLOCK_ID_OUT_OF_RANGE"


class InvalidBlockId(KvTransferError):
    """A block id is not a non-negative integer."""

    CODE = "ERR_INVALID_BLOCK_ID"


class BlockCountMismatch(KvTransferError):
    """The local and remote id lists differ in length."""

    CODE = "ERR_BLOCK_COUNT_MISMATCH"


class LayerOutOfRange(KvTransferError):
    """The layer index is past the last layer."""

    CODE = "ERR_LAYER_OUT_OF_RANGE"


class LayoutMismatch(KvTransferError):
    """The peer's layout (block bytes, layers, ...) differs from this side's."""

    CODE = "ERR_LAYOUT_MISMATCH"


class RegionOverflow(KvTransferError):
    """A region is too small for ``block_number x block_bytes``, or its address range overflows."""

    CODE = "ERR_REGION_OVERFLOW"


class InvalidArgument(KvTransferError):
    """An argument was refused; the message names the value and the limit."""

    CODE = "ERR_INVALID_ARGUMENT"


class NotConnected(KvTransferError):
    """The peer was never connected, or is no longer."""

    CODE = "ERR_NOT_CONNECTED"


class Closed(KvTransferError):
    """The worker's communicator is closed: it detached, or the sidecar is stopping."""

    CODE = "ERR_CLOSED"


class ProtocolError(KvTransferError):
    """A protocol violation: a version mismatch, or a malformed message."""

    CODE = "ERR_PROTOCOL"


class IoError(KvTransferError):
    """An I/O failure, e.g. no sidecar listens on the socket path (start ``kvtransfer serve``)."""

    CODE = "ERR_IO"


class PeerDisconnected(KvTransferError):
    """The connection to the peer broke."""

    CODE = "ERR_PEER_DISCONNECTED"


class RdmaUnavailable(KvTransferError):
    """RDMA was asked for and is not usable."""

    CODE = "ERR_RDMA_UNAVAILABLE"


class TransportUnavailable(KvTransferError):
    """The transport asked for is not usable."""

    CODE = "ERR_TRANSPORT_UNAVAILABLE"


class RdmaError(KvTransferError):
    """An RDMA verb failed."""

    CODE = "ERR_RDMA"


class RdmaCompletionError(KvTransferError):
    """An RDMA work completion failed."""

    CODE = "ERR_RDMA_COMPLETION"


class CudaError(KvTransferError):
    """A CUDA call failed (e.g. opening an IPC handle)."""

    CODE = "ERR_CUDA"


class Timeout(KvTransferError, TimeoutError):
    """A call or a wait timed out.

    Also a builtin :class:`TimeoutError` (hence a ``concurrent.futures.TimeoutError``)."""

    CODE = "ERR_TIMEOUT"


class Aborted(KvTransferError):
    """The call was aborted (its peer connection was torn down)."""

    CODE = "ERR_ABORTED"


class Fenced(KvTransferError):
    """The receiving side fenced the call's tag or this writer; none of its bytes can land."""

    CODE = "ERR_FENCED"


class AuthError(KvTransferError):
    """Authentication failed: the handshake token, or the sidecar's uid check."""

    CODE = "ERR_AUTH"


class TpMismatch(KvTransferError):
    """The peer's tensor-parallel size is not the one expected."""

    CODE = "ERR_TP_MISMATCH"


class Unsupported(KvTransferError):
    """The connection cannot give what the call asked for (a checksum or an acknowledged
    delivery over a transport or memory that does not offer it); nothing was sent."""

    CODE = "ERR_UNSUPPORTED"


class ChecksumMismatch(KvTransferError):
    """The received bytes of a checksummed call do not have the writer's CRC-32C."""

    CODE = "ERR_CHECKSUM_MISMATCH"


class RegistryUnavailable(KvTransferError):
    """The instance registry (etcd) cannot be reached (raised by the TypeScript API)."""

    CODE = "ERR_REGISTRY_UNAVAILABLE"


class NameTaken(KvTransferError):
    """Another live instance holds this name in the registry (raised by the TypeScript API)."""

    CODE = "ERR_NAME_TAKEN"


class InternalError(KvTransferError):
    """A bug in kvtransfer: please report it."""

    CODE = "ERR_INTERNAL"


class Detached(KvTransferError):
    """The connection to the sidecar ended (it exited or restarted).

    Raised by every pending and every later call of the worker; attach again (a restarted
    sidecar on the same socket path accepts a new attach)."""

    CODE = "ERR_DETACHED"


_CLASSES: Tuple[Type[KvTransferError], ...] = (
    BlockIdOutOfRange,
    InvalidBlockId,
    BlockCountMismatch,
    LayerOutOfRange,
    LayoutMismatch,
    RegionOverflow,
    InvalidArgument,
    NotConnected,
    Closed,
    ProtocolError,
    IoError,
    PeerDisconnected,
    RdmaUnavailable,
    TransportUnavailable,
    RdmaError,
    RdmaCompletionError,
    CudaError,
    Timeout,
    Aborted,
    Fenced,
    AuthError,
    TpMismatch,
    Unsupported,
    ChecksumMismatch,
    RegistryUnavailable,
    NameTaken,
    InternalError,
    Detached,
)

#: Every code this package raises: the TypeScript API's codes, then ``ERR_DETACHED``.
ERROR_CODES: Tuple[str, ...] = tuple(str(cls.CODE) for cls in _CLASSES)

_BY_CODE: Dict[str, Type[KvTransferError]] = {str(cls.CODE): cls for cls in _CLASSES}


def error_class(code: str) -> Type[KvTransferError]:
    """The class raised for ``code`` (:class:`KvTransferError` itself for an unknown code)."""
    return _BY_CODE.get(code, KvTransferError)


def make_error(code: object, message: object) -> KvTransferError:
    """An instance of ``error_class(code)``; a code that is not a string gives ``ERR_PROTOCOL``."""
    if not isinstance(code, str):
        return ProtocolError("ERR_PROTOCOL", f"the sidecar sent an error without a code: {message!r}")
    return error_class(code)(code, message if isinstance(message, str) else str(message))


def invalid_argument(name: str, reason: str) -> InvalidArgument:
    """``ERR_INVALID_ARGUMENT`` for argument ``name``: ``invalid <name>: <reason>`` (the TS wording)."""
    return InvalidArgument("ERR_INVALID_ARGUMENT", f"invalid {name}: {reason}")
