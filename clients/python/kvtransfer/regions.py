"""Cache regions a worker hands to the sidecar at ``attach`` (one per layer and cache).

Three kinds, as docs/sidecar.md defines them:

- :class:`HostRegion`: host memory behind a file descriptor (a memfd, or a ``/dev/shm`` file
  such as :class:`multiprocessing.shared_memory.SharedMemory` creates). The descriptor
  travels with ``SCM_RIGHTS``; the sidecar maps ``offset .. offset + bytes`` of it.
- :class:`CudaIpcRegion`: device memory of a ``cudaMalloc`` allocation, by its CUDA IPC
  handle (64 bytes, or PyTorch's 66-byte record from ``untyped_storage()._share_cuda_()``).
- :class:`CudaVmmRegion`: device memory of cuMem (VMM) allocations exported as POSIX fds,
  mapped back to back (PyTorch's expandable segments).

For PyTorch tensors, :mod:`kvtransfer.torch_regions` builds these from the tensor.

Several layers may (and, beyond 253 of them, must) share one descriptor: give each its own
``offset``. Identical descriptor numbers are sent once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._protocol import MAX_FDS_PER_FRAME
from .errors import invalid_argument

__all__ = ["Region", "HostRegion", "CudaIpcRegion", "CudaVmmRegion"]

_MAX_SIZE = (1 << 63) - 1


def _check_int(name: str, value: Any, low: int = 0, high: int = _MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_argument(name, f"expected an int in {low}..{high}, got {type(value).__name__}")
    if value < low or value > high:
        raise invalid_argument(name, f"{value} is not in {low}..{high}")
    return value


def _file_size(name: str, fd: int) -> int:
    """The size of the memory file behind ``fd``; InvalidArgument when it is not one."""
    try:
        info = os.fstat(fd)
    except OSError as error:
        raise invalid_argument(name, f"fd {fd} is not an open file descriptor ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise invalid_argument(
            name, f"fd {fd} is not a memory file (a memfd or a /dev/shm file); its mode is {oct(info.st_mode)}"
        )
    return info.st_size


class Region:
    """Base class of the region kinds. ``offset`` and ``bytes`` locate it in its object."""

    offset: int
    bytes: int

    def descriptors(self) -> Tuple[int, ...]:
        """The descriptors this region needs sent (none for a CUDA IPC handle)."""
        return ()

    def check(self, name: str) -> None:
        """Client-side checks (open descriptors, bounds); raises InvalidArgument naming ``name``."""

    def to_json(self, fd_index: Dict[int, int]) -> Dict[str, Any]:
        """The region as ``attach`` carries it; ``fd_index`` maps a descriptor to its index."""
        raise NotImplementedError


@dataclass(frozen=True)
class HostRegion(Region):
    """Host memory: ``bytes`` bytes at ``offset`` of the memory file ``fd``.

    ``fd`` is sent with ``SCM_RIGHTS`` when attaching; the sidecar maps it and keeps the
    mapping while the worker stays attached (even if this process closes ``fd`` or exits).
    Keep ``fd`` open until :func:`kvtransfer.attach` returns, and do not shrink the file
    while attached.

    Args:
        fd: a memfd (``os.memfd_create``) or a ``/dev/shm`` file.
        offset: where the region starts in the file.
        bytes: its length (``block_number * block_bytes`` for a cache region); ``None``: the
            rest of the file from ``offset``.
    """

    fd: int
    offset: int = 0
    bytes: Optional[int] = None  # type: ignore[assignment]
    _owner: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("fd", self.fd, 0, 0x7FFF_FFFF)
        _check_int("offset", self.offset)
        if self.bytes is None:
            object.__setattr__(self, "bytes", max(0, _file_size("fd", self.fd) - self.offset))
        _check_int("bytes", self.bytes)

    @classmethod
    def from_shared_memory(cls, shm: Any, offset: int = 0, bytes: Optional[int] = None) -> "HostRegion":
        """The region ``offset .. offset + bytes`` of a ``multiprocessing.shared_memory.SharedMemory``.

        Uses the POSIX descriptor the object holds (``shm._fd``, a ``/dev/shm`` file), so it
        works where ``SharedMemory`` is POSIX shared memory (Linux, not Windows). The region
        keeps a reference to ``shm`` so its descriptor stays open until attached. ``bytes``
        defaults to the rest of the object (``shm.size - offset``).
        """
        fd = getattr(shm, "_fd", None)
        if not isinstance(fd, int) or fd < 0:
            raise invalid_argument(
                "shm",
                "it has no open POSIX descriptor (closed, or not POSIX shared memory: Windows is not supported)",
            )
        size = int(getattr(shm, "size", 0))
        _check_int("offset", offset, 0, size)
        if bytes is None:
            bytes = size - offset
        _check_int("bytes", bytes)
        if offset + bytes > size:
            raise invalid_argument(
                "bytes", f"offset {offset} + bytes {bytes} = {offset + bytes} is past the shared memory's size {size}"
            )
        return cls(fd, offset, bytes, shm)

    def descriptors(self) -> Tuple[int, ...]:
        return (self.fd,)

    def check(self, name: str) -> None:
        size = _file_size(name, self.fd)
        end = self.offset + int(self.bytes or 0)
        if end > size:
            raise invalid_argument(
                name, f"offset {self.offset} + bytes {self.bytes} = {end} is past the end of fd {self.fd} ({size} bytes)"
            )

    def to_json(self, fd_index: Dict[int, int]) -> Dict[str, Any]:
        return {"fd": fd_index[self.fd], "offset": self.offset, "bytes": self.bytes}


@dataclass(frozen=True)
class CudaIpcRegion(Region):
    """Device memory of a ``cudaMalloc`` allocation: ``bytes`` at ``offset`` from its base.

    Args:
        handle: the 64-byte ``cudaIpcMemHandle_t`` of the allocation base, or PyTorch's
            66-byte record (``untyped_storage()._share_cuda_()[1]``: version 2, type ``'c'``,
            then the handle). Sent as hex.
        offset: from the allocation base (PyTorch: the storage's ``offset_bytes`` plus the
            tensor's ``storage_offset() * element_size()``).
        bytes: the region's length.
    """

    handle: bytes
    offset: int
    bytes: int  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.handle, (bytes, bytearray, memoryview)):
            raise invalid_argument("handle", f"expected bytes, got {type(self.handle).__name__}")
        handle = bytes(self.handle)
        object.__setattr__(self, "handle", handle)
        if len(handle) == 66:
            if handle[0] != 2 or handle[1] != ord("c"):
                raise invalid_argument(
                    "handle",
                    f"a 66-byte handle must be PyTorch's record of version 2 and type 'c'; it starts {handle[:2]!r}",
                )
        elif len(handle) != 64:
            raise invalid_argument("handle", f"{len(handle)} bytes; expected 64 (a CUDA IPC handle) or 66 (PyTorch's)")
        _check_int("offset", self.offset)
        _check_int("bytes", self.bytes)

    def to_json(self, fd_index: Dict[int, int]) -> Dict[str, Any]:
        return {"cudaIpcHandle": self.handle.hex(), "offset": self.offset, "bytes": self.bytes}


@dataclass(frozen=True)
class CudaVmmRegion(Region):
    """Device memory of cuMem (VMM) allocations exported as POSIX fds, mapped back to back.

    Args:
        fds: one descriptor per allocation (``cuMemExportToShareableHandle`` with
            ``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``), in address order. They must be
            this process's own descriptors (they travel with ``SCM_RIGHTS``); keep them open
            until :func:`kvtransfer.attach` returns.
        segment_bytes: the size of each allocation.
        offset: from the start of the first allocation.
        bytes: the region's length; ``offset + bytes <= len(fds) * segment_bytes``.
    """

    fds: Tuple[int, ...]
    segment_bytes: int
    offset: int
    bytes: int  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if isinstance(self.fds, (str, bytes)) or not hasattr(self.fds, "__iter__"):
            raise invalid_argument("fds", f"expected a list of descriptors, got {type(self.fds).__name__}")
        fds = tuple(self.fds)
        object.__setattr__(self, "fds", fds)
        if not fds:
            raise invalid_argument("fds", "empty; at least one descriptor is needed")
        for i, fd in enumerate(fds):
            _check_int(f"fds[{i}]", fd, 0, 0x7FFF_FFFF)
        _check_int("segment_bytes", self.segment_bytes, 1)
        _check_int("offset", self.offset)
        _check_int("bytes", self.bytes)
        total = len(fds) * self.segment_bytes
        end = self.offset + self.bytes
        if end > total:
            raise invalid_argument(
                "bytes",
                f"offset {self.offset} + bytes {self.bytes} = {end} is past the {len(fds)} segments of "
                f"{self.segment_bytes} bytes ({total} bytes)",
            )

    def descriptors(self) -> Tuple[int, ...]:
        return self.fds

    def check(self, name: str) -> None:
        for fd in self.fds:
            try:
                os.fstat(fd)
            except OSError as error:
                raise invalid_argument(name, f"fd {fd} is not an open file descriptor ({error.strerror})") from None

    def to_json(self, fd_index: Dict[int, int]) -> Dict[str, Any]:
        return {
            "cudaVmmFds": [fd_index[fd] for fd in self.fds],
            "segmentBytes": self.segment_bytes,
            "offset": self.offset,
            "bytes": self.bytes,
        }


def encode_caches(caches: Dict[str, Sequence[Region]]) -> Tuple[Dict[str, List[Dict[str, Any]]], List[int]]:
    """``attach``'s cache fields and the descriptors to send with it, deduplicated, in index order.

    ``caches`` maps a field (``keyCache``, ...) to its regions. Every region is checked
    (:meth:`Region.check`); more than :data:`MAX_FDS_PER_FRAME` distinct descriptors raise
    InvalidArgument.
    """
    fd_index: Dict[int, int] = {}
    for field_name, regions in caches.items():
        for i, region in enumerate(regions):
            if not isinstance(region, Region):
                raise invalid_argument(
                    f"{_python_name(field_name)}[{i}]",
                    f"expected a HostRegion, CudaIpcRegion or CudaVmmRegion, got {type(region).__name__}",
                )
            region.check(f"{_python_name(field_name)}[{i}]")
            for fd in region.descriptors():
                if fd not in fd_index:
                    fd_index[fd] = len(fd_index)
    if len(fd_index) > MAX_FDS_PER_FRAME:
        raise invalid_argument(
            "regions",
            f"they need {len(fd_index)} distinct file descriptors; attach passes at most {MAX_FDS_PER_FRAME}: "
            "put several layers in one shared object (one SharedMemory or memfd, a layer per offset)",
        )
    encoded = {name: [region.to_json(fd_index) for region in regions] for name, regions in caches.items()}
    return encoded, list(fd_index)


_PYTHON_NAMES = {
    "keyCache": "key_cache",
    "valueCache": "value_cache",
    "keyScaleCache": "key_scale_cache",
    "valueScaleCache": "value_scale_cache",
}


def _python_name(field_name: str) -> str:
    return _PYTHON_NAMES.get(field_name, field_name)
