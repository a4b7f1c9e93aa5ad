"""Shared helpers of the tests: the package on sys.path, host caches, sidecar processes."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

TESTS = Path(__file__).resolve().parent
CLIENT_ROOT = TESTS.parent  # clients/python
REPO_ROOT = TESTS.parents[2]  # the repository
#: The CLI whose `serve` the end-to-end tests start (KVTRANSFER_CLI may name another build).
CLI_JS = Path(os.environ.get("KVTRANSFER_CLI") or REPO_ROOT / "lib" / "cli.js")


def _env_choice(name: str, default: str, choices: Tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _env_scale(name: str) -> float:
    text = os.environ.get(name) or "1"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={text!r}: expected a number > 0")
    return value


#: The end-to-end tests' settings (the RDMA CI run: rdma, the VM's address, scale 20).
#: KVTRANSFER_TEST_TRANSPORT: the transport every worker attaches with (default tcp).
TEST_TRANSPORT = _env_choice("KVTRANSFER_TEST_TRANSPORT", "tcp", ("tcp", "rdma", "nvlink", "auto"))
#: KVTRANSFER_TEST_HOST: the address a prefill worker connects to its decode peer on.
TEST_HOST = os.environ.get("KVTRANSFER_TEST_HOST") or "127.0.0.1"
#: KVTRANSFER_TEST_TIMEOUT_SCALE: multiplies every timeout and wait of the tests (slow VMs).
TIMEOUT_SCALE = _env_scale("KVTRANSFER_TEST_TIMEOUT_SCALE")


def scaled(seconds: float) -> float:
    """``seconds`` times KVTRANSFER_TEST_TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE

if str(CLIENT_ROOT) not in sys.path:
    sys.path.insert(0, str(CLIENT_ROOT))

import kvtransfer  # noqa: E402
from kvtransfer.regions import HostRegion  # noqa: E402


# -- host caches ------------------------------------------------------------------------


class HostCache:
    """``layers`` x (K, V) regions of ``blocks`` x ``block_bytes`` in one SharedMemory.

    Region (layer, kind) (kind 0: K, 1: V) starts at ``(2 * layer + kind) * blocks * block_bytes``.
    """

    def __init__(self, layers: int, blocks: int, block_bytes: int, fill: str = "zero", name: Optional[str] = None):
        self.layers, self.blocks, self.block_bytes = layers, blocks, block_bytes
        self.region_bytes = blocks * block_bytes
        size = 2 * layers * self.region_bytes
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=size)
            self.owner = True
            if fill == "random":
                self.shm.buf[:size] = os.urandom(size)
        else:
            self.shm = shared_memory.SharedMemory(name=name)
            self.owner = False
            # Python < 3.13 registers an opened segment with the resource tracker, which would
            # unlink the owner's segment when this process exits.
            try:
                from multiprocessing import resource_tracker

                resource_tracker.unregister(self.shm._name, "shared_memory")  # type: ignore[attr-defined]
            except Exception:
                pass

    @property
    def name(self) -> str:
        return self.shm.name

    def offset(self, layer: int, kind: int, block: int = 0) -> int:
        return (2 * layer + kind) * self.region_bytes + block * self.block_bytes

    def block(self, layer: int, kind: int, block: int) -> bytes:
        start = self.offset(layer, kind, block)
        return bytes(self.shm.buf[start : start + self.block_bytes])

    def regions(self) -> Tuple[List[HostRegion], List[HostRegion]]:
        keys = [HostRegion.from_shared_memory(self.shm, self.offset(l, 0), self.region_bytes) for l in range(self.layers)]
        values = [HostRegion.from_shared_memory(self.shm, self.offset(l, 1), self.region_bytes) for l in range(self.layers)]
        return keys, values

    def attach_args(self) -> Dict[str, Any]:
        keys, values = self.regions()
        return {"block_number": self.blocks, "block_bytes": self.block_bytes, "key_cache": keys, "value_cache": values}

    def digest(self) -> str:
        return hashlib.sha256(bytes(self.shm.buf[: 2 * self.layers * self.region_bytes])).hexdigest()

    def close(self) -> None:
        try:
            self.shm.close()
        except BufferError:
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def mismatches(src: HostCache, dst: HostCache, local: List[int], remote: List[int], layers: int) -> List[str]:
    """Blocks where ``dst[remote[i]] != src[local[i]]``, for K and V of every layer."""
    bad = []
    for layer in range(layers):
        for kind in (0, 1):
            for lo, re_ in zip(local, remote):
                if src.block(layer, kind, lo) != dst.block(layer, kind, re_):
                    bad.append(f"layer {layer} {'KV'[kind]} local {lo} -> remote {re_}")
    return bad


# -- the sidecar ------------------------------------------------------------------------


def node_binary() -> Optional[str]:
    return os.environ.get("KVTRANSFER_NODE") or shutil.which("node")


def serve_available() -> Tuple[bool, str]:
    """Whether ``node lib/cli.js serve`` exists; the reason when not."""
    if not CLI_JS.is_file():
        return False, f"{CLI_JS} is missing (build the TypeScript: npm run build)"
    text = CLI_JS.read_text(encoding="utf-8", errors="replace")
    if not re.search(r"""['"`]serve['"`]""", text):
        return False, f"{CLI_JS} has no 'serve' command yet (the sidecar is not built)"
    node = node_binary()
    if not node:
        return False, "no node binary (set KVTRANSFER_NODE)"
    return True, ""


def require_serve() -> None:
    """Raises unittest.SkipTest unless the sidecar can be started."""
    ok, why = serve_available()
    if not ok:
        raise unittest.SkipTest(why)


class Sidecar:
    """One ``kvtransfer serve`` process on ``path`` (log in ``path + '.log'``)."""

    def __init__(self, path: str, extra: Optional[List[str]] = None, startup_s: float = 60.0) -> None:
        startup_s = scaled(startup_s)
        self.path = path
        self.log_path = path + ".log"
        self._log = open(self.log_path, "ab")
        cmd = [node_binary() or "node", str(CLI_JS), "serve", "--socket", path, *(extra or [])]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
            start_new_session=True,
        )
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"`{' '.join(cmd)}` exited with {self.proc.returncode} before serving:\n{self.log()}")
            if os.path.exists(path) and _connectable(path):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"`{' '.join(cmd)}` did not create {path} within {startup_s} s:\n{self.log()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL (the socket file stays: a stale one)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(scaled(10))

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM; a sidecar that has not exited within ``timeout_s`` fails the test (killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(timeout_s))
            except subprocess.TimeoutExpired:
                self.kill()
                self._log.close()
                raise AssertionError(f"the sidecar did not exit within {scaled(timeout_s)} s of SIGTERM:\n{self.log()}")
        self._log.close()


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(scaled(1))
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def short_tmpdir() -> str:
    """A temporary directory short enough for Unix socket paths (108 bytes)."""
    return tempfile.mkdtemp(prefix="kvt-", dir="/tmp")


# -- helper processes -------------------------------------------------------------------


class Helper:
    """A ``_worker_proc.py`` subprocess speaking JSON lines on stdin/stdout."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(CLIENT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "_worker_proc.py"), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line)
        self._lines.put(None)

    def read(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The helper's next line, within ``timeout`` s (default: 60 s scaled)."""
        timeout = scaled(60.0) if timeout is None else timeout
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the helper process said nothing within {timeout:g} s") from None
        if line is None:
            self._lines.put(None)
            raise AssertionError(f"the helper process exited ({self.proc.wait()})")
        message = json.loads(line)
        if "error" in message:
            raise AssertionError(f"the helper process failed: {message['error']}")
        return message

    def ask(self, command: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
        self.proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.read(timeout)

    def kill(self) -> None:
        """SIGKILL, mid-whatever."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(scaled(15))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask({"cmd": "exit"}, scaled(15))
            except (AssertionError, BrokenPipeError, OSError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(scaled(15))
        self._pump_thread.join(scaled(5))
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except (OSError, AttributeError, ValueError):
                pass
