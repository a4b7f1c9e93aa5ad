"""Attaching to the sidecar: :func:`attach` (hello, then attach with the cache regions) and
where the sidecar's socket is (:func:`default_socket_path`)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Dict, List, Optional, Sequence

from ._checks import check_int, check_port, check_regions, check_seconds, check_str
from ._connection import DEFAULT_MAX_QUEUED_ARRIVALS, Connection
from ._protocol import PROTOCOL_VERSION
from ._version import __version__
from .errors import IoError, ProtocolError, Timeout, invalid_argument
from .regions import Region, encode_caches
from .worker import Worker

__all__ = ["attach", "default_socket_path", "DEFAULT_MAX_QUEUED_ARRIVALS"]

_TRANSPORTS = ("auto", "nvlink", "rdma", "tcp")


def default_socket_path() -> str:
    """The sidecar's socket path: ``$KVTRANSFER_SOCKET``, else ``$XDG_RUNTIME_DIR/kvtransfer.sock``,
    else ``/tmp/kvtransfer-<uid>.sock`` (the defaults of ``kvtransfer serve``)."""
    explicit = os.environ.get("KVTRANSFER_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "kvtransfer.sock")
    return f"/tmp/kvtransfer-{os.getuid()}.sock"


def attach(
    socket_path: Optional[str] = None,
    *,
    role: str,
    block_number: int,
    block_bytes: int,
    key_cache: Sequence[Region],
    value_cache: Sequence[Region],
    key_scale_cache: Optional[Sequence[Region]] = None,
    value_scale_cache: Optional[Sequence[Region]] = None,
    scale_block_bytes: int = 0,
    gpu_idx: int = 0,
    port: int = 0,
    name: Optional[str] = None,
    slot: Optional[str] = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    transport: Optional[str] = None,
    rdma_devices: Optional[Sequence[str]] = None,
    auth_token: Optional[str] = None,
    timeout: float = 30.0,
    max_queued_arrivals: int = DEFAULT_MAX_QUEUED_ARRIVALS,
) -> Worker:
    """Attaches this process's KV cache to the sidecar and returns the :class:`Worker`.

    Connects to ``kvtransfer serve`` on ``socket_path``, says ``hello`` (protocol 1), then
    ``attach`` with the regions; their descriptors travel with ``SCM_RIGHTS`` (at most 253
    distinct ones: put several layers in one shared object). The sidecar imports the
    regions and starts a communicator listening on ``port``.

    Args:
        socket_path: default :func:`default_socket_path` (``$KVTRANSFER_SOCKET``, else
            ``$XDG_RUNTIME_DIR/kvtransfer.sock``, else ``/tmp/kvtransfer-<uid>.sock``).
        role: ``"prefill"`` (writes blocks to peers) or ``"decode"`` (receives them).
        block_number: blocks in every region (ids ``0..block_number-1``).
        block_bytes: bytes per block; must match the peer's.
        key_cache: one region per layer (:mod:`kvtransfer.regions`).
        value_cache: one region per layer, or ``[]`` for key-only caches (MLA).
        key_scale_cache, value_scale_cache: fp8 scale regions, one per layer
            (``block_number * scale_block_bytes`` bytes each).
        scale_block_bytes: bytes per block of the scale regions (0: none).
        gpu_idx: GPU index (also picks the RDMA NIC).
        port: the communicator's control-plane port (0: any; see ``Worker.port``).
        name: the name peers see in arrivals (default ``hostname:port``, chosen by the sidecar).
        slot: this worker's identity for a warm re-attach (e.g. ``"<instance>/tp<rank>"``,
            at most 255 characters). When a worker that attached with a slot ends, the sidecar
            keeps its communicator and its links to peers for its grace period
            (``--warm-grace-ms``); a worker attaching with the same slot and the same layout
            gets that communicator back (``Worker.reattached``), with its regions swapped to
            this process's memory. A different layout is refused with ``LayoutMismatch``
            (``ERR_LAYOUT_MISMATCH``, naming the field) and the kept communicator is closed.
            Host-memory regions over TCP or RDMA (``Worker.warm`` says whether it applies).
        tp_size, tp_rank: this side's tensor-parallel size and rank.
        transport: ``"auto"``, ``"nvlink"``, ``"rdma"`` or ``"tcp"`` (default: the sidecar's
            ``KVCACHE_TRANSPORT``, else auto).
        rdma_devices: the RDMA devices to write over, one rail each (``["mlx5_0",
            "mlx5_1"]``; the sidecar checks the names: 1..8, none empty or repeated). Wins
            over the sidecar's ``KVCACHE_RDMA_NICS``; default: that, else the NICs nearest
            the GPU, else every active port.
        auth_token: the peers' shared handshake secret (default: the sidecar's
            ``KVCACHE_AUTH_TOKEN``).
        timeout: seconds for connecting, ``hello`` and ``attach`` together; also the bound of
            later requests the sidecar does not time itself (prepare, metrics, detach, ...).
        max_queued_arrivals: arrival events kept for ``Worker.arrivals``.

    Raises:
        IoError: no sidecar listens on ``socket_path`` (start ``kvtransfer serve``).
        InvalidArgument: an argument or region was refused (client-side, or by the sidecar).
        KvTransferError: what the sidecar refused otherwise (``ERR_AUTH``, ``ERR_PROTOCOL``, ...).
    """
    path = default_socket_path() if socket_path is None else socket_path
    path = os.fspath(path)
    check_str("socket_path", path, allow_empty=False)
    if role not in ("prefill", "decode"):
        raise invalid_argument("role", f"{role!r} is not 'prefill' or 'decode'")
    message: Dict[str, Any] = {
        "op": "attach",
        "role": role,
        "gpuIdx": check_int("gpu_idx", gpu_idx, 0, 0xFFFF_FFFF),
        "port": check_port("port", port),
        "blockNumber": check_int("block_number", block_number, 0, 0xFFFF_FFFF),
        "blockBytes": check_int("block_bytes", block_bytes, 0, (1 << 53) - 1),
    }
    if name is not None:
        message["name"] = check_str("name", name)
    if slot is not None:
        message["slot"] = check_str("slot", slot, allow_empty=False)
        if len(slot) > 255:
            raise invalid_argument("slot", f"{len(slot)} characters; at most 255")
    scale_block_bytes = check_int("scale_block_bytes", scale_block_bytes, 0, (1 << 53) - 1)
    if scale_block_bytes:
        message["scaleBlockBytes"] = scale_block_bytes
    tp_size = check_int("tp_size", tp_size, 1, 0xFFFF_FFFF)
    tp_rank = check_int("tp_rank", tp_rank, 0, tp_size - 1)
    if tp_size != 1 or tp_rank != 0:
        message["tpSize"] = tp_size
        message["tpRank"] = tp_rank
    if transport is not None:
        if transport not in _TRANSPORTS:
            raise invalid_argument("transport", f"{transport!r} is not one of {', '.join(_TRANSPORTS)}")
        message["transport"] = transport
    if rdma_devices is not None:
        if isinstance(rdma_devices, str) or not isinstance(rdma_devices, (list, tuple)):
            raise invalid_argument("rdma_devices", f"expected a list of str, got {type(rdma_devices).__name__}")
        message["rdmaDevices"] = [check_str(f"rdma_devices[{i}]", d) for i, d in enumerate(rdma_devices)]
    if auth_token is not None:
        message["authToken"] = check_str("auth_token", auth_token)
    check_seconds("timeout", timeout, allow_zero=False)
    check_int("max_queued_arrivals", max_queued_arrivals, 1, 1 << 30)
    caches: Dict[str, List[Region]] = {
        "keyCache": check_regions("key_cache", key_cache),
        "valueCache": check_regions("value_cache", value_cache),
    }
    if key_scale_cache is not None:
        caches["keyScaleCache"] = check_regions("key_scale_cache", key_scale_cache)
    if value_scale_cache is not None:
        caches["valueScaleCache"] = check_regions("value_scale_cache", value_scale_cache)
    encoded, fds = encode_caches(caches)
    message.update(encoded)

    deadline = time.monotonic() + timeout
    conn = Connection(_connect_unix(path, timeout), path, max_queued_arrivals)
    try:
        hello = conn.call(
            {"op": "hello", "protocol": PROTOCOL_VERSION, "client": f"kvtransfer-python/{__version__}", "pid": os.getpid()},
            max(0.0, deadline - time.monotonic()),
        )
        protocol = hello.get("protocol") if isinstance(hello, dict) else None
        if protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                "ERR_PROTOCOL",
                f"the sidecar at {path} speaks protocol {protocol!r}; this client speaks {PROTOCOL_VERSION}",
            )
        ok = conn.call(message, max(0.0, deadline - time.monotonic()), fds=fds)
        if not isinstance(ok, dict):
            raise ProtocolError("ERR_PROTOCOL", f"the sidecar's answer to attach is not an object: {ok!r}")
        bound = ok.get("port")
        if isinstance(bound, bool) or not isinstance(bound, int) or not 0 < bound <= 65535:
            raise ProtocolError("ERR_PROTOCOL", f"the sidecar's answer to attach has no port: {ok!r}")
    except Timeout as error:
        conn.finish("ERR_CLOSED", "attach did not complete")
        raise Timeout("ERR_TIMEOUT", f"the sidecar at {path} did not attach within {timeout} s ({error.message})") from None
    except BaseException:
        conn.finish("ERR_CLOSED", "attach did not complete")
        raise
    answered_name = ok.get("name")
    if not isinstance(answered_name, str) or not answered_name:
        # Sidecars before `name` was added to the answer: what their communicator defaults to.
        answered_name = name if name is not None else f"{socket.gethostname()}:{bound}"
    return Worker(
        conn,
        timeout=float(timeout),
        role=role,
        block_number=block_number,
        block_bytes=block_bytes,
        port=bound,
        transport=str(ok.get("transport", "")),
        name=answered_name,
        sidecar_version=str(hello.get("sidecar", "")),
        reattached=ok.get("reattached") is True,
        warm=ok.get("warm") is True,
    )


def _connect_unix(path: str, timeout: float) -> socket.socket:
    """A blocking Unix socket connected to ``path``; each failure says what to do about it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    hint = f"start `kvtransfer serve --socket {path}` (or set KVTRANSFER_SOCKET to the socket it serves)"
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise IoError("ERR_IO", f"no sidecar socket at {path}: {hint}") from None
    except ConnectionRefusedError:
        sock.close()
        raise IoError("ERR_IO", f"no sidecar answers on {path} (a stale socket file): {hint}") from None
    except PermissionError:
        sock.close()
        raise IoError(
            "ERR_IO",
            f"permission denied connecting to {path}: the sidecar admits its own uid (and --allow-uid); "
            "check the socket's owner and mode",
        ) from None
    except socket.timeout:
        sock.close()
        raise Timeout("ERR_TIMEOUT", f"connecting to the sidecar at {path} took more than {timeout} s") from None
    except OSError as error:
        sock.close()
        if "too long" in str(error):
            raise invalid_argument("socket_path", f"{path!r} is too long for a Unix socket (108 bytes at most)") from None
        raise IoError("ERR_IO", f"connecting to the sidecar at {path} failed ({error}): {hint}") from None
    sock.setblocking(True)
    return sock
