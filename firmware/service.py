"""The admin service: one dispatch table shared by the daemon's socket and the in-process CLI.

A request is a JSON object ``{"op": ..., "args": {...}, "request_id": ...}``; the answer
is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message",
"details"}}``. The same :func:`dispatch` serves the admin Unix socket of ``slicefab serve``
and the CLI when it works on a state directory in-process, so both behave identically.
(The VM-facing API, with the CXL CCI message format and authentication, is issue 3's.)
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firmware.errors import RequestError, SlicefabError
from firmware.manager import ADMIN, ResourceManager
from firmware.slices import ResizeSpec, SliceSpec

#: a request line larger than this is refused before it is parsed
MAX_REQUEST_BYTES = 64 * 1024

Handler = Callable[[ResourceManager, dict[str, Any], str | None], Any]


def _slice_id(args: dict[str, Any]) -> int:
    sid = args.get("slice")
    if isinstance(sid, bool) or not isinstance(sid, int):
        raise RequestError("slice", f"expected an integer slice id, got {sid!r}")
    return sid


OPS: dict[str, Handler] = {
    "device": lambda m, a, r: m.device.summary(),
    "status": lambda m, a, r: m.status(),
    "list": lambda m, a, r: m.list_slices(owner=a.get("owner")),
    "show": lambda m, a, r: m.get(_slice_id(a)),
    "allocate": lambda m, a, r: m.allocate(SliceSpec.from_dict(a.get("spec")), request_id=r),
    "resize": lambda m, a, r: m.resize(
        _slice_id(a), ResizeSpec.from_dict(a.get("resize")), request_id=r
    ),
    "free": lambda m, a, r: m.free(_slice_id(a), request_id=r),
    "fabric": lambda m, a, r: m.fabric.describe(),
    "check": lambda m, a, r: {"violations": m.check_invariants()},
}


def dispatch(manager: ResourceManager, request: object) -> dict[str, Any]:
    """Execute one admin request; never raises for a bad request (answers an error)."""
    try:
        if not isinstance(request, dict):
            raise RequestError("request", "expected a JSON object")
        op = request.get("op")
        if op not in OPS:
            raise RequestError("op", f"unknown operation {op!r}", expected=sorted(OPS))
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise RequestError("args", "expected a JSON object")
        rid = request.get("request_id")
        if rid is not None and not isinstance(rid, str):
            raise RequestError("request_id", "expected a string")
        return {"ok": True, "result": OPS[op](manager, args, rid)}
    except SlicefabError as e:
        return {"ok": False, "error": e.to_dict()}


class _Connection(socketserver.StreamRequestHandler):
    server: AdminServer

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES:
                answer: dict[str, Any] = {
                    "ok": False,
                    "error": RequestError(
                        "request", f"larger than {MAX_REQUEST_BYTES} bytes", limit=MAX_REQUEST_BYTES
                    ).to_dict(),
                }
                self.wfile.write(json.dumps(answer).encode() + b"\n")
                return  # the rest of the line is unread: the stream is out of step, hang up
            try:
                request = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                answer = {"ok": False, "error": RequestError("request", f"not JSON: {e}").to_dict()}
            else:
                answer = dispatch(self.server.manager, request)
            self.wfile.write(json.dumps(answer).encode() + b"\n")


class AdminServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The admin socket of ``slicefab serve``: owner-only permissions (0600)."""

    daemon_threads = True

    def __init__(self, path: Path, manager: ResourceManager) -> None:
        self.manager = manager
        path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            super().__init__(str(path), _Connection)
        finally:
            os.umask(old)


def request_message(
    op: str, args: dict[str, Any] | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """The admin request object for ``op`` (what a client sends)."""
    msg: dict[str, Any] = {"op": op, "args": args or {}}
    if request_id is not None:
        msg["request_id"] = request_id
    return msg


class AdminClient:
    """Talks to a running daemon over its admin socket (used by the CLI)."""

    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")
        self._lock = threading.Lock()

    def call(
        self, op: str, args: dict[str, Any] | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        msg = request_message(op, args, request_id)
        with self._lock:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            line = self._file.readline()
        if not line:
            raise ConnectionError("the daemon closed the admin connection")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        self._file.close()
        self.sock.close()


class LocalClient:
    """The same interface as :class:`AdminClient`, on an in-process manager."""

    def __init__(self, manager: ResourceManager) -> None:
        self.manager = manager

    def call(
        self, op: str, args: dict[str, Any] | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        msg = request_message(op, args, request_id)
        # round-trip through JSON so the in-process path sees exactly what a socket would
        return dict(json.loads(json.dumps(dispatch(self.manager, json.loads(json.dumps(msg))))))

    def close(self) -> None:
        self.manager.close()


__all__ = ["ADMIN", "OPS", "AdminClient", "AdminServer", "LocalClient", "dispatch"]
