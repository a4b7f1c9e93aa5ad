"""kvtransfer's Python client: hand a worker's KV cache to the ``kvtransfer serve`` sidecar.

A PyTorch serving engine (vLLM, SGLang, FastDeploy) keeps its KV cache; this package
attaches it to a sidecar on the same host over a Unix socket (docs/sidecar.md, protocol 1)
and drives the sidecar's communicator with the API of the TypeScript ``RDMACommunicator``::

    import kvtransfer
    from kvtransfer.regions import HostRegion

    with kvtransfer.attach(role="prefill", block_number=64, block_bytes=4096,
                           key_cache=[HostRegion.from_shared_memory(shm, 0, 64 * 4096)],
                           value_cache=[HostRegion.from_shared_memory(shm, 64 * 4096, 64 * 4096)]) as worker:
        peer = worker.connect("10.0.0.2", decode_port)
        prepared = worker.prepare_blocks(peer, local_ids, remote_ids)
        futures = [worker.write_cache(peer, prepared, layer=l, tag="req-1") for l in range(layers)]
        for f in futures:
            f.result()

Standard library only; :mod:`kvtransfer.torch_regions` (imports torch lazily) builds regions
from CUDA tensors.
"""

from ._version import __version__
from ._attach import attach, default_socket_path
from .futures import FenceFuture, WriteFuture
from .values import Arrival, FenceResult, Peer, PeerInfo, PreparedBlocks
from .worker import Worker
from .errors import (
    ERROR_CODES,
    Aborted,
    AuthError,
    BlockCountMismatch,
    BlockIdOutOfRange,
    Closed,
    CudaError,
    Detached,
    Fenced,
    InternalError,
    InvalidArgument,
    InvalidBlockId,
    IoError,
    KvTransferError,
    LayerOutOfRange,
    LayoutMismatch,
    NotConnected,
    PeerDisconnected,
    ProtocolError,
    RdmaCompletionError,
    RdmaError,
    RdmaUnavailable,
    RegionOverflow,
    Timeout,
    TpMismatch,
    Unsupported,
    ChecksumMismatch,
    RegistryUnavailable,
    NameTaken,
    TransportUnavailable,
    error_class,
)
from .regions import CudaIpcRegion, CudaVmmRegion, HostRegion, Region

__all__ = [
    "__version__",
    "attach",
    "default_socket_path",
    "Worker",
    "Peer",
    "PreparedBlocks",
    "WriteFuture",
    "FenceFuture",
    "FenceResult",
    "Arrival",
    "PeerInfo",
    "Region",
    "HostRegion",
    "CudaIpcRegion",
    "CudaVmmRegion",
    "ERROR_CODES",
    "error_class",
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
]
