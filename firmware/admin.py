"""The admin channel: the CLI's operations as CXL CCI messages on the admin Unix socket.

``slicefab serve`` listens on ``<state>/admin.sock`` (mode 0600, and peers must run as the
daemon's user or root) with hostlib's :class:`~hostlib.socket_transport.SocketServer`.
Every frame is a plain CCI request, handled by :meth:`firmware.api.Api.handle_admin_frame`:
the same opcode table, size caps, parsers and handlers as a VM's mailbox, with the admin
role's allowlist and no envelope (the socket's permissions are the authentication; see
docs/security.md). When no daemon runs, the CLI opens the state directory itself and hands
the same frames to an in-process :class:`~firmware.api.Api`, so both paths run the same
code and answer the same bytes.

:class:`AdminClient` and :class:`LocalClient` turn the CLI's operations (``status``,
``allocate``, ``vm_add``, ...) into those requests and the answers back into the shapes the
CLI prints (the firmware's own: ``Slice.to_dict()``, ``ResourceManager.status()``, ...).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from abi import convert
from abi.commands import Role, decode_response, encode_request
from abi.errors import AbiError, EncodeError
from abi.layout import Payload
from firmware import failpoints
from firmware.api import Api, Channel
from firmware.errors import ConfigError, RequestError, SlicefabError
from firmware.manager import ResourceManager, StateDir
from firmware.slices import ResizeSpec, SliceSpec
from firmware.units import format_size
from hostlib.socket_transport import PeerCred, SocketClient, SocketServer
from hostlib.transport import TransportError

#: the longest Unix socket path Linux accepts (sun_path is 108 bytes with the NUL)
MAX_SOCKET_PATH = 107
#: how long the CLI waits for one answer (an allocation waits for the ledger and fabric)
REQUEST_TIMEOUT_S = 60.0


class AdminRefused(Exception):
    """The firmware answered a request with an error (``error``: code, message, details)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "error"))
        self.error = error


# ---------------------------------------------------------------------- the server


class AdminServer:
    """The admin socket of ``slicefab serve``: CCI requests to :meth:`Api.handle_admin_frame`."""

    def __init__(self, path: Path, api: Api) -> None:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"admin socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets "
                f"allow at most {MAX_SOCKET_PATH}: use a shorter --state-dir",
                limit=MAX_SOCKET_PATH,
            )
        self.api = api
        self.channel = Channel(Role.ADMIN, None)
        self._server = SocketServer(path, self._handle)

    def _handle(self, frame: bytes, peer: PeerCred) -> bytes:
        # The socket is 0600 already; a peer that got a descriptor some other way (passed
        # over SCM_RIGHTS, or the mode loosened by hand) is still not the administrator.
        if peer.uid not in (0, os.geteuid()):
            raise TransportError(f"admin socket: refused uid {peer.uid}")
        response = self.api.handle_admin_frame(self.channel, frame)
        if failpoints.armed:
            failpoints.hit("reply.before_send")
        return response

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


# ---------------------------------------------------------------------- the clients


class _Admin:
    """The CLI's operations over any exchange of admin frames."""

    def __init__(self, exchange: Callable[[bytes], bytes]) -> None:
        self._exchange = exchange
        self._tag = 0
        self._lock = threading.Lock()

    def request(self, name: str, payload: Mapping[str, Any] | None = None) -> Payload:
        """One admin command; its response payload. Raises :class:`AdminRefused` for an
        error answer, :class:`RequestError` for a payload that cannot be encoded (nothing
        is sent), TransportError if the daemon cannot be reached."""
        with self._lock:
            self._tag = (self._tag + 1) & 0xFF
            tag = self._tag
        try:
            frame = encode_request(name, payload or {}, tag=tag)
        except EncodeError as e:
            raise RequestError(e.field, e.message) from None
        r = decode_response(self._exchange(frame))
        if r.error is not None:
            raise AdminRefused(r.error)
        if r.message.tag != tag:
            raise TransportError(f"answer tagged {r.message.tag}, expected {tag}")
        assert r.payload is not None
        return r.payload

    def call(
        self, op: str, args: Mapping[str, Any] | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        """``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {...}}`` for one of
        :data:`OPS`; never raises for a refused or invalid request."""
        try:
            if op not in OPS:
                raise RequestError("op", f"unknown operation {op!r}", expected=sorted(OPS))
            return {"ok": True, "result": OPS[op](self, dict(args or {}), request_id)}
        except AdminRefused as e:
            return {"ok": False, "error": e.error}
        except SlicefabError as e:  # refused before anything was sent (spec validation)
            return {"ok": False, "error": e.to_dict()}
        except AbiError as e:  # an answer that does not decode
            return {
                "ok": False,
                "error": {"code": "internal", "message": f"bad answer: {e}", "details": {}},
            }


class AdminClient(_Admin):
    """Talks to a running daemon over its admin socket."""

    def __init__(self, path: Path | str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        """Raises PeerClosed if nothing listens at ``path``, TransportError otherwise."""
        self._transport = SocketClient(path)
        super().__init__(lambda frame: self._transport.request(frame, timeout))

    def close(self) -> None:
        self._transport.close()


class LocalClient(_Admin):
    """The same operations on an in-process manager that owns (and on close releases)
    its state directory: the frames go through the same :class:`Api` as the socket's."""

    def __init__(self, manager: ResourceManager, state: StateDir) -> None:
        self.manager = manager
        self.state = state
        api, channel = Api(manager, manager.vms), Channel(Role.ADMIN, None)
        super().__init__(lambda frame: api.handle_admin_frame(channel, frame))

    def close(self) -> None:
        self.manager.close()
        self.state.unlock()


# ---------------------------------------------------------------------- operations


def _slice_view(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A SLICE payload in ``Slice.to_dict()``'s shape (what the CLI prints)."""
    view = convert.slice_view_from_payload(payload)
    view.pop("granule_bytes")
    view["memory"] = format_size(view.pop("memory_bytes"))
    return view


def _slice_id(args: Mapping[str, Any]) -> Any:
    """The slice id as given: the encoder checks it is a u32, the firmware that it exists."""
    return args.get("slice")


def _arg(args: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = args.get(name)
    if not isinstance(value, dict):
        raise RequestError(name, f"expected a table, got {value!r:.60}")
    return value


def _status(a: _Admin, args: Mapping[str, Any], rid: str | None) -> dict[str, Any]:
    p = a.request("STATUS")
    return {
        "device": p["device"],
        "slices": p["slices"],
        "utilisation": convert.utilisation_from_payload(p["utilisation"]),
        "fabric": dict(p["fabric"]),
        "ledger": dict(p["ledger"]),
    }


def _device(a: _Admin, args: Mapping[str, Any], rid: str | None) -> dict[str, Any]:
    return dict(a.request("DEVICE_INFO"))


def _list(a: _Admin, args: Mapping[str, Any], rid: str | None) -> list[dict[str, Any]]:
    """Every slice (of ``owner`` if given), following the pages to the end."""
    owner = args.get("owner")
    views: list[dict[str, Any]] = []
    start = 0
    while True:
        if owner is None:
            p = a.request("LIST", {"start_id": start})
        else:
            p = a.request("LIST_FOR", {"owner": owner, "start_id": start})
        views.extend(_slice_view(s) for s in p["slices"])
        if not p["next_id"]:
            return views
        start = p["next_id"]


def _allocate(a: _Admin, args: Mapping[str, Any], rid: str | None) -> dict[str, Any]:
    spec = SliceSpec.from_dict(_arg(args, "spec")).to_dict()  # units and fields checked here
    return _slice_view(
        a.request("ALLOCATE_FOR", convert.spec_to_payload(spec, request_id=rid, owner=True))
    )


def _resize(a: _Admin, args: Mapping[str, Any], rid: str | None) -> dict[str, Any]:
    rs = ResizeSpec.from_dict(_arg(args, "resize")).to_dict()
    return _slice_view(
        a.request("RESIZE", convert.resize_to_payload(_slice_id(args), rs, request_id=rid))
    )


def _fabric(a: _Admin, args: Mapping[str, Any], rid: str | None) -> dict[str, Any]:
    """The FABRIC payload in ``FabricDriver.describe()``'s shape (columns per port)."""
    p = a.request("FABRIC")
    ports = p["ports"]
    return {
        "backend": p["backend"],
        "generation": p["generation"],
        "syncs": p["syncs"],
        "register_writes": p["register_writes"],
        "ports": len(ports),
        **{col: [q[col] for q in ports] for col in ("permission", "weight", "keys", "tb_rate")},
    }


def _telemetry(a: _Admin, args: Mapping[str, Any], rid: str | None) -> dict[str, Any]:
    """DEVICE_TELEMETRY: utilisation (``Allocator.utilisation()``'s shape), the fabric's
    generation and the traffic counters of every held crossbar port (``slicefab top``)."""
    p = a.request("DEVICE_TELEMETRY")
    return {
        "slices": p["slices"],
        "utilisation": convert.utilisation_from_payload(p["utilisation"]),
        "generation": p["generation"],
        "ports": [dict(q) for q in p["ports"]],
    }


def _decisions(a: _Admin, args: Mapping[str, Any], rid: str | None) -> list[dict[str, Any]]:
    """ADAPTIVE_DECISIONS: the adaptive controller's most recent decisions (one page),
    optionally of one slice, oldest first (``slicefab top``)."""
    p = a.request("ADAPTIVE_DECISIONS", {"slice": args.get("slice", 0), "after": 0})
    return [dict(d) for d in p["decisions"]]


def _vm_add(a: _Admin, args: Mapping[str, Any], rid: str | None) -> dict[str, Any]:
    p = a.request("VM_ADD", {"vm": args.get("vm"), "mailbox": args.get("mailbox")})
    return {"vm": p["vm"], "key": bytes(p["key"]).hex(), "mailbox": p["mailbox"]}


def _vm_list(a: _Admin, args: Mapping[str, Any], rid: str | None) -> list[dict[str, Any]]:
    vms: list[dict[str, Any]] = []
    start = 0
    while True:
        p = a.request("VM_LIST", {"start": start})
        vms.extend(dict(v) for v in p["vms"])
        if not p["next"]:
            return vms
        start = p["next"]


def _vm_remove(a: _Admin, args: Mapping[str, Any], rid: str | None) -> dict[str, Any]:
    a.request("VM_REMOVE", {"vm": args.get("vm")})
    return {"vm": args.get("vm")}


Op = Callable[[_Admin, Mapping[str, Any], "str | None"], Any]

#: the CLI's operations, each one or more admin commands
OPS: dict[str, Op] = {
    "status": _status,
    "device": _device,
    "list": _list,
    "show": lambda a, args, rid: _slice_view(a.request("GET", {"slice": _slice_id(args)})),
    "allocate": _allocate,
    "resize": _resize,
    "free": lambda a, args, rid: _slice_view(
        a.request("FREE", {"slice": _slice_id(args), "request_id": rid})
    ),
    "fabric": _fabric,
    "telemetry": _telemetry,
    "decisions": _decisions,
    "vm_add": _vm_add,
    "vm_list": _vm_list,
    "vm_remove": _vm_remove,
    "check": lambda a, args, rid: {"violations": list(a.request("CHECK")["violations"])},
}

__all__ = ["OPS", "AdminClient", "AdminRefused", "AdminServer", "LocalClient"]
