"""Regions of PyTorch CUDA tensors (``pip install kvtransfer-client[torch]``).

Nothing here imports torch: the functions take tensors and call their methods, so this
module loads (and its parsers are tested) without torch.

:func:`region_of` shares a tensor's memory the way ``torch.multiprocessing`` does, through
``tensor.untyped_storage()._share_cuda_()``, whose second value is PyTorch's shareable
handle record (version 2):

- type ``'c'`` (the default caching allocator): 66 bytes, the ``cudaIpcMemHandle`` of the
  ``cudaMalloc`` segment's base after the 2 header bytes → :class:`CudaIpcRegion` with
  the 66-byte record as is;
- type ``'e'`` (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``): a header ``{pid
  (int32, padded to 8), segment_size (size_t), num_handles (size_t)}`` then one 4-byte POSIX
  fd per segment (cuMem allocations mapped back to back). The fds are numbers in the
  process that allocated the tensor, so :func:`region_of` must run in that process; it
  sends them over ``SCM_RIGHTS`` → :class:`CudaVmmRegion`.

The storage's ``offset_bytes`` (third value after the handle) is the storage's place in the
segment; the tensor's own ``storage_offset()`` is added to it.

Side effect, as with ``torch.multiprocessing``: ``_share_cuda_`` marks the storage shared,
so PyTorch keeps its block allocated (not reused by the caching allocator) until the process
exits. For KV caches, which live as long as the engine, that is what is wanted.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Mapping, NamedTuple, Sequence, Tuple, Union

from .errors import invalid_argument
from .regions import CudaIpcRegion, CudaVmmRegion, Region

__all__ = ["region_of", "cache_regions", "cache_layout", "parse_share_handle", "ShareHandle"]

_VERSION = 2
_TYPE_CUDA_MALLOC = ord("c")
_TYPE_EXPANDABLE = ord("e")
# The two header layouts an expandable-segment record may have: natural alignment (pid
# padded to 8: what a C struct {pid_t; size_t; size_t} is on x86-64 and aarch64), or packed.
_HEADER_ALIGNED = struct.Struct("<i4xQQ")
_HEADER_PACKED = struct.Struct("<iQQ")


class ShareHandle(NamedTuple):
    """A parsed PyTorch shareable handle record.

    ``kind`` is ``'c'`` (``ipc_handle`` set) or ``'e'`` (``pid``, ``segment_bytes`` and ``fds``
    set).
    """

    kind: str
    ipc_handle: bytes = b""
    pid: int = 0
    segment_bytes: int = 0
    fds: Tuple[int, ...] = ()


def parse_share_handle(handle: bytes) -> ShareHandle:
    """Parses the handle record of ``untyped_storage()._share_cuda_()[1]``.

    Raises InvalidArgument for an unknown version or type, or an ``'e'`` record whose length
    matches neither header layout (see the module docstring).
    """
    if not isinstance(handle, (bytes, bytearray, memoryview)):
        raise invalid_argument("handle", f"expected bytes, got {type(handle).__name__}")
    handle = bytes(handle)
    if len(handle) < 2 or handle[0] != _VERSION:
        raise invalid_argument(
            "handle", f"not a PyTorch shareable handle of version {_VERSION} (starts {handle[:2]!r}, {len(handle)} bytes)"
        )
    kind = handle[1]
    if kind == _TYPE_CUDA_MALLOC:
        if len(handle) != 66:
            raise invalid_argument("handle", f"a type 'c' record is 66 bytes; got {len(handle)}")
        return ShareHandle("c", ipc_handle=handle)
    if kind == _TYPE_EXPANDABLE:
        body = handle[2:]
        for header in (_HEADER_ALIGNED, _HEADER_PACKED):
            if len(body) < header.size:
                continue
            pid, segment_bytes, count = header.unpack_from(body)
            if count < 1 or header.size + 4 * count != len(body):
                continue
            fds = struct.unpack_from(f"<{count}i", body, header.size)
            return ShareHandle("e", pid=pid, segment_bytes=segment_bytes, fds=tuple(fds))
        raise invalid_argument(
            "handle",
            f"a type 'e' record of {len(handle)} bytes matches neither header layout: 2 bytes, "
            "{pid: int32 padded to 8, segment_size: u64, num_handles: u64} (or unpadded), then 4 bytes per fd",
        )
    raise invalid_argument("handle", f"unknown record type {chr(kind)!r}; expected 'c' or 'e'")


def region_of(tensor: Any) -> Region:
    """The region of a contiguous CUDA tensor's bytes (``numel() * element_size()`` of them).

    Returns a :class:`CudaIpcRegion` (default allocator) or a :class:`CudaVmmRegion`
    (expandable segments). Keep the tensor alive while attached.
    """
    if not hasattr(tensor, "untyped_storage") or not hasattr(tensor, "element_size"):
        raise invalid_argument("tensor", f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not getattr(tensor, "is_cuda", False):
        raise invalid_argument(
            "tensor", f"it is on {getattr(tensor, 'device', '?')}; region_of takes CUDA tensors (host memory: HostRegion)"
        )
    if not tensor.is_contiguous():
        raise invalid_argument("tensor", f"it is not contiguous (shape {tuple(tensor.shape)}, stride {tensor.stride()})")
    element = int(tensor.element_size())
    length = int(tensor.numel()) * element
    shared = tensor.untyped_storage()._share_cuda_()
    _device, handle, storage_bytes, storage_offset_bytes = shared[:4]
    within = int(tensor.storage_offset()) * element
    if within + length > int(storage_bytes):
        raise invalid_argument(
            "tensor", f"its bytes {within}..{within + length} are past its storage's {storage_bytes} bytes"
        )
    offset = int(storage_offset_bytes) + within
    record = parse_share_handle(handle)
    if record.kind == "c":
        return CudaIpcRegion(record.ipc_handle, offset, length)
    if record.pid != os.getpid():
        raise invalid_argument(
            "tensor",
            f"its expandable segment belongs to pid {record.pid}, not this process ({os.getpid()}): call region_of "
            "in the process that allocated the cache (its fds are that process's)",
        )
    return CudaVmmRegion(record.fds, record.segment_bytes, offset, length)


def _layers(kv_caches: Union[Sequence[Any], Mapping[str, Any]]) -> List[Tuple[str, Any]]:
    if isinstance(kv_caches, Mapping):
        return [(str(name), tensor) for name, tensor in kv_caches.items()]
    if isinstance(kv_caches, (list, tuple)):
        return [(str(i), tensor) for i, tensor in enumerate(kv_caches)]
    raise invalid_argument("kv_caches", f"expected a list of tensors (one per layer) or a dict, got {type(kv_caches).__name__}")


def cache_layout(kv_caches: Union[Sequence[Any], Mapping[str, Any]]) -> Dict[str, Any]:
    """``attach``'s cache arguments for vLLM's layout: ``attach(role=..., **cache_layout(kv_caches))``.

    ``kv_caches``: one tensor per layer (a list, or vLLM's dict by layer name, in its order),
    each ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K is ``t[0]``, V is
    ``t[1]``), contiguous, all of one shape and dtype.

    Returns ``{"block_number", "block_bytes", "key_cache", "value_cache"}`` where
    ``block_bytes = block_size * num_kv_heads * head_dim * element_size``.
    """
    layers = _layers(kv_caches)
    if not layers:
        raise invalid_argument("kv_caches", "empty; one tensor per layer is needed")
    shape0 = None
    keys: List[Region] = []
    values: List[Region] = []
    block_number = block_bytes = 0
    for name, tensor in layers:
        shape = tuple(int(d) for d in getattr(tensor, "shape", ()))
        if len(shape) < 3 or shape[0] != 2:
            raise invalid_argument(
                f"kv_caches[{name}]",
                f"shape {shape}; expected [2, num_blocks, block_size, num_kv_heads, head_dim] (K = t[0], V = t[1])",
            )
        element = int(tensor.element_size())
        if shape0 is None:
            shape0 = (shape, element)
            block_number = shape[1]
            block_bytes = element
            for d in shape[2:]:
                block_bytes *= d
        elif (shape, element) != shape0:
            raise invalid_argument(
                f"kv_caches[{name}]", f"shape {shape} x {element} bytes differs from the first layer's {shape0[0]} x {shape0[1]}"
            )
        if not tensor.is_contiguous():
            raise invalid_argument(f"kv_caches[{name}]", "not contiguous")
        keys.append(region_of(tensor[0]))
        values.append(region_of(tensor[1]))
    return {"block_number": block_number, "block_bytes": block_bytes, "key_cache": keys, "value_cache": values}


def cache_regions(kv_caches: Union[Sequence[Any], Mapping[str, Any]]) -> Tuple[List[Region], List[Region]]:
    """``(key_regions, value_regions)`` of vLLM's per-layer ``[2, num_blocks, ...]`` tensors
    (see :func:`cache_layout`, which also gives ``block_number`` and ``block_bytes``)."""
    layout = cache_layout(kv_caches)
    return layout["key_cache"], layout["value_cache"]
