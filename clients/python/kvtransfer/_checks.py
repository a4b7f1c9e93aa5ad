"""Client-side argument checks: each raises :class:`~kvtransfer.InvalidArgument` naming the argument."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from ._protocol import Tag, encode_tag
from .errors import invalid_argument
from .regions import Region

#: The largest timeout the sidecar takes (Node's timers), in ms.
MAX_TIMEOUT_MS = 0x7FFF_FFFF
#: The longest a fence holds (``hold_ms``) and waits for a writer (``ack_timeout_ms``), as
#: the TS API's ``fence`` takes them.
MAX_FENCE_HOLD_MS = 3_600_000
MAX_FENCE_ACK_TIMEOUT_MS = 600_000


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """An int (not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_argument(name, f"expected an int in {low}..{high}, got {type(value).__name__}")
    if value < low or value > high:
        raise invalid_argument(name, f"{value} is not in {low}..{high}")
    return value


def check_port(name: str, value: Any) -> int:
    """A port number (an int, or a str of digits)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return check_int(name, value, 0, 65535)


def check_str(name: str, value: Any, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise invalid_argument(name, f"expected a str, got {type(value).__name__}")
    if not allow_empty and not value:
        raise invalid_argument(name, "empty")
    return value


def check_seconds(name: str, value: Any, allow_zero: bool) -> float:
    """A number of seconds: ``>= 0`` with ``allow_zero``, else ``> 0``; not NaN, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid_argument(name, f"{value!r} is not a number of seconds")
    if value < 0 or (value == 0 and not allow_zero):
        raise invalid_argument(name, f"{value!r} is not a number of seconds {'>=' if allow_zero else '>'} 0")
    return value


def timeout_ms(name: str, seconds: Optional[float]) -> Optional[int]:
    """Seconds → the whole milliseconds the sidecar takes (None stays None)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds != seconds:
        raise invalid_argument(name, f"{seconds!r} is not a number of seconds")
    limit_s = MAX_TIMEOUT_MS / 1000
    if seconds < 0 or seconds > limit_s:
        raise invalid_argument(name, f"{seconds} s is not in 0..{limit_s} s")
    return int(math.ceil(seconds * 1000))


def check_regions(name: str, regions: Any, allow_none: bool = False) -> List[Region]:
    """A list (or tuple) of regions, one per layer."""
    if regions is None and allow_none:
        return []
    if isinstance(regions, (str, bytes, Region)) or not isinstance(regions, (list, tuple)):
        raise invalid_argument(name, f"expected a list of regions (one per layer), got {type(regions).__name__}")
    return list(regions)


def fence_request(tag: Optional[Tag], peer: Optional[str], hold_ms: Optional[int], ack_timeout_ms: Optional[int]) -> Dict[str, Any]:
    """The ``fence`` request: exactly one of ``tag`` (str or int) and ``peer`` (a writer's
    name, as arrivals report it), and the optional ``hold_ms`` / ``ack_timeout_ms``."""
    if (tag is None) == (peer is None):
        raise invalid_argument(
            "target", f"{'both' if tag is not None else 'neither'} of tag and peer given; give exactly one"
        )
    message: Dict[str, Any] = {"op": "fence"}
    if tag is not None:
        message["tag"] = encode_tag(tag)
    else:
        message["peer"] = check_str("peer", peer, allow_empty=False)
    if hold_ms is not None:
        message["holdMs"] = check_int("hold_ms", hold_ms, 0, MAX_FENCE_HOLD_MS)
    if ack_timeout_ms is not None:
        message["ackTimeoutMs"] = check_int("ack_timeout_ms", ack_timeout_ms, 0, MAX_FENCE_ACK_TIMEOUT_MS)
    return message
