"""The admin service: one dispatch table shared by the daemon's socket and the in-process CLI.

A request is a JSON object ``{"op": ..., "args": {...}, "request_id": ...}``; the answer
is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message",
"details"}}``. The same :func:`dispatch` serves the admin Unix socket of ``slicefab serve``
and the CLI when it works on a state directory in-process, so both behave identically.
(The VM-facing API, with the CXL CCI message format and authentication, is issue 3's.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firmware.errors import ConfigError, RequestError, SlicefabError
from firmware.manager import ADMIN, ResourceManager, StateDir
from firmware.slices import ResizeSpec, SliceSpec

#: a request line larger than this is refused before it is parsed
MAX_REQUEST_BYTES = 64 * 1024
#: an admin connection idle for longer than this is closed
IDLE_TIMEOUT_S = 300.0
#: the longest Unix socket path Linux accepts (sun_path is 108 bytes with the NUL)
MAX_SOCKET_PATH = 107

log = logging.getLogger("slicefab.service")

Handler = Callable[[ResourceManager, dict[str, Any], str | None], Any]


def _arg(args: dict[str, Any], name: str) -> dict[str, Any]:
    value = args.get(name)
    if not isinstance(value, dict):
        raise RequestError(f"args.{name}", f"expected a JSON object, got {value!r:.60}")
    return value


def _vm_add(m: ResourceManager, args: dict[str, Any]) -> dict[str, Any]:
    """The answer carries the key: the admin channel is the state directory owner's only."""
    cred = m.provision_vm(args.get("vm"), args.get("mailbox"))  # type: ignore[arg-type]
    return {"vm": cred.vm, "key": cred.key.hex(), "mailbox": cred.mailbox}


def _vm_remove(m: ResourceManager, args: dict[str, Any]) -> dict[str, Any]:
    m.remove_vm(args.get("vm"))  # type: ignore[arg-type]
    return {"vm": args.get("vm")}


def _slice(args: dict[str, Any]) -> Any:
    """The slice id as sent; the manager checks it (one check for every channel)."""
    return args.get("slice")


OPS: dict[str, Handler] = {
    "device": lambda m, a, r: m.device.summary(),
    "status": lambda m, a, r: m.status(),
    "list": lambda m, a, r: m.list_slices(owner=a.get("owner")),
    "show": lambda m, a, r: m.get(_slice(a)),
    "allocate": lambda m, a, r: m.allocate(SliceSpec.from_dict(_arg(a, "spec")), request_id=r),
    "resize": lambda m, a, r: m.resize(
        _slice(a), ResizeSpec.from_dict(_arg(a, "resize")), request_id=r
    ),
    "free": lambda m, a, r: m.free(_slice(a), request_id=r),
    "fabric": lambda m, a, r: m.fabric.describe(),
    "vm_add": lambda m, a, r: _vm_add(m, a),
    "vm_list": lambda m, a, r: [
        {"vm": c.vm, "mailbox": c.mailbox, "last_seq": m.vms.last_seq(c.vm)}
        for c in m.vms.credentials()
    ],
    "vm_remove": lambda m, a, r: _vm_remove(m, a),
    "check": lambda m, a, r: {"violations": m.check_invariants()},
}


def dispatch(manager: ResourceManager, request: object) -> dict[str, Any]:
    """Execute one admin request; never raises for a bad request (answers an error)."""
    try:
        if not isinstance(request, dict):
            raise RequestError("request", "expected a JSON object")
        op = request.get("op")
        if not isinstance(op, str) or op not in OPS:
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
    except Exception as e:  # a bug: answer it, log it, keep serving
        log.exception("internal error while handling %.200r", request)
        return {
            "ok": False,
            "error": {"code": "internal", "message": f"internal error: {e!r}", "details": {}},
        }


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


class _Connection(socketserver.StreamRequestHandler):
    server: AdminServer
    timeout = IDLE_TIMEOUT_S  # an idle connection is closed, its thread freed

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
                request = json.loads(line, parse_constant=_refuse_constant)
            except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError too
                answer = {
                    "ok": False,
                    "error": RequestError("request", f"not acceptable JSON: {e}").to_dict(),
                }
            else:
                answer = dispatch(self.server.manager, request)
            self.wfile.write(json.dumps(answer).encode() + b"\n")


class AdminServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The admin socket of ``slicefab serve``: owner-only permissions (0600)."""

    daemon_threads = True

    def __init__(self, path: Path, manager: ResourceManager) -> None:
        self.manager = manager
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"admin socket path {path} is {len(str(path).encode())} bytes; Unix sockets "
                f"allow at most {MAX_SOCKET_PATH}: use a shorter --state-dir",
                limit=MAX_SOCKET_PATH,
            )
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
    """The same interface as :class:`AdminClient`, on an in-process manager that owns
    (and on close releases) its state directory."""

    def __init__(self, manager: ResourceManager, state: StateDir) -> None:
        self.manager = manager
        self.state = state

    def call(
        self, op: str, args: dict[str, Any] | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        msg = request_message(op, args, request_id)
        # round-trip through JSON so the in-process path sees exactly what a socket would
        return dict(json.loads(json.dumps(dispatch(self.manager, json.loads(json.dumps(msg))))))

    def close(self) -> None:
        self.manager.close()
        self.state.unlock()


__all__ = ["ADMIN", "OPS", "AdminClient", "AdminServer", "LocalClient", "dispatch"]
