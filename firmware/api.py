"""The secure allocation API: one request frame in, one response frame out.

Every frame from a VM mailbox goes through these checks in this order. Each check runs
before the next one costs anything, and the order is the threat model's (docs/security.md):

1. **rate limit**: a channel that sent too many bad requests is answered *Busy* unread;
2. **size caps**: the envelope trailer and the 12-byte CCI header are checked
   (``abi.cci.check_header``) before any payload byte is looked at;
3. **opcode allowlist** for the channel's role (``abi.commands.allowed_opcodes``);
4. **authentication**: the HMAC of the envelope with the VM's key (``abi.envelope``);
5. **replay/reorder**: the sequence number must be above the last accepted (HELLO is the
   one exception: it lets a VM that lost its counter learn it);
6. **parse** the payload with the command's layout;
7. **authorise and execute** with the VM as the caller (the manager enforces ownership).

Every failure is answered with the CXL return code and vendor status of its error code
(``abi.retcodes``); the answer to a VM is sealed with the VM's key and echoes its
sequence number. The admin channel (the admin socket, already authenticated by its
file permissions) skips 4 and 5.
"""

from __future__ import annotations

import secrets
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from abi import convert
from abi.cci import HEADER_BYTES, MAX_PAYLOAD, Category, Header, Message, check_header
from abi.commands import (
    BY_NAME,
    COMMANDS,
    Command,
    Role,
    allowed_opcodes,
    encode_error,
    encode_response,
)
from abi.envelope import REQUEST_DOMAIN, RESPONSE_DOMAIN, TRAILER_BYTES
from abi.envelope import seal as seal_frame
from abi.envelope import verify as verify_frame
from abi.errors import AbiError, DecodeError
from abi.vendor import ABI_VERSION, MAX_DECISIONS, MAX_PART_SLICES, REASON_BYTES
from firmware.adaptive.policy import DEFAULT_APP_CLASS, clear_policy, set_policy
from firmware.adaptive.usage import Resource, UsageSample
from firmware.allocator import Allocator
from firmware.errors import NotFound, RequestError, SlicefabError
from firmware.manager import ADMIN, ResourceManager
from firmware.resources.lanes import LaneGroup
from firmware.slices import ResizeSpec, Slice, SliceSpec
from firmware.vms import BadRequestLimiter, ReplayError, VmRegistry

#: the largest frame a VM may send: envelope trailer + header + payload cap
MAX_FRAME = TRAILER_BYTES + HEADER_BYTES + MAX_PAYLOAD
#: the smallest: an empty payload
_MIN_FRAME = TRAILER_BYTES + HEADER_BYTES
#: a CCI request header (CXL r3.1 Figure 7-19) as the fast path reads it: category, tag,
#: reserved byte, opcode (command, command set), payload length bits 15:0, the byte of bits
#: 23:16 (the length's top 5 bits, 2 reserved bits and the background bit), and the return
#: code and vendor status as one u32 (both zero in a request)
_REQUEST_HEAD = struct.Struct("<BBBHHBI")
#: the sequence number in an envelope's trailer (abi.envelope)
_SEQ = struct.Struct("<Q")
_HELLO = BY_NAME["HELLO"].opcode
_NO_REQUEST = Message(Category.REQUEST, 0, 0)  # what an unreadable header is answered as


class ApiError(SlicefabError):
    """A request refused by the mailbox's own checks (before the manager saw it)."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.code = code  # type: ignore[misc]  # per-instance: malformed, auth_failed, ...


@dataclass
class Counters:
    """Per-channel counts of what the checks refused (telemetry, tests)."""

    requests: int = 0
    rate_limited: int = 0
    malformed: int = 0
    not_allowed: int = 0
    auth_failed: int = 0
    replayed: int = 0


@dataclass
class Channel:
    """One way in: a VM's mailbox (``vm`` set) or the admin channel (``vm`` None)."""

    role: Role
    vm: str | None = None
    limiter: BadRequestLimiter = field(default_factory=BadRequestLimiter)
    counters: Counters = field(default_factory=Counters)
    lock: threading.Lock = field(default_factory=threading.Lock)


Handler = Callable[["Api", Channel, Mapping[str, Any]], Mapping[str, Any]]

#: ``observe(role, command, return_code, seconds)``, see :attr:`Api.observe`
Observer = Callable[[Role, str, int, float], None]


#: the opcode (command, command set: one LE u16 at byte 3) and the return code (byte 8) of
#: a CCI header (abi.cci.HEADER, CXL r3.1 Figure 7-19), read without checking anything:
#: what the mailbox poller and the observer need, cheaply
_OPCODE_AND_RC = struct.Struct("<3xH3xH")

#: commands that may wait for the ledger or the fabric (the others answer from memory)
_MAY_BLOCK = frozenset(
    BY_NAME[name].opcode
    for name in (
        "ALLOCATE", "ALLOCATE_FOR", "RESIZE", "FREE", "VM_ADD", "VM_REMOVE", "CHECK",
        "SET_LD_ALLOCATIONS", "SET_QOS_CONTROL", "SET_QOS_ALLOCATED_BW", "SET_QOS_BW_LIMIT",
        "INITIATE_DC_ADD", "INITIATE_DC_RELEASE",
        # these read the crossbar's registers, which a simulated fabric answers slowly
        "SLICE_TELEMETRY", "DEVICE_TELEMETRY", "GET_QOS_STATUS", "FABRIC",
        # these write or read the usage tables (SQLite, which may wait for the ledger)
        "REPORT_USAGE", "SET_ADAPTIVE", "ADAPTIVE_DECISIONS",
        # this reads the pool's etcd (up to its fail-over deadline when a member is down)
        "POOL_COMPOSITIONS",
    )
)  # fmt: skip


def may_block(frame: bytes) -> bool:
    """Whether the request in ``frame`` may wait for the ledger or the fabric, judged from
    its opcode alone (unchecked: a frame that lies is answered with an error either way).
    The mailbox poller answers the others itself and hands these to a worker thread."""
    if len(frame) < HEADER_BYTES:
        return False
    return _OPCODE_AND_RC.unpack_from(frame)[0] in _MAY_BLOCK


class PoolView(Protocol):
    """What POOL_COMPOSITIONS reads: firmware.pool.member.PoolMember on a pool member."""

    def compositions(self, owner: str) -> list[dict[str, Any]]:
        """``owner``'s compositions with their parts' states (Pool.compositions)."""
        ...


class Api:
    """Executes request frames against a manager and a VM registry."""

    def __init__(self, manager: ResourceManager, vms: VmRegistry) -> None:
        self.manager = manager
        self.vms = vms
        self.boot_nonce = secrets.token_bytes(16)
        self._allowed = {Role.VM: allowed_opcodes(Role.VM), Role.ADMIN: allowed_opcodes(Role.ADMIN)}
        #: the VM role's allowlist as opcode → command (the fast path's one lookup)
        self._vm_commands = {op: COMMANDS[op] for op in self._allowed[Role.VM]}
        #: called once per answered request with the channel's role, the command's name
        #: (``"unknown"`` for an opcode not in the table), the CXL return code answered and
        #: the seconds spent; must not raise (the daemon's metrics: firmware.metrics).
        #: None, the default, costs one attribute test per request.
        self.observe: Observer | None = None
        #: the device's pool membership (``slicefab serve --pool``), None when it has none:
        #: POOL_COMPOSITIONS is then answered unsupported
        self.pool: PoolView | None = None

    # ---------------------------------------------------------------- VM frames

    def handle_vm_frame(self, channel: Channel, frame: bytes) -> bytes:
        """One sealed request from ``channel``'s VM → one sealed response. Never raises."""
        vm = channel.vm
        assert vm is not None
        with channel.lock:  # one outstanding request per mailbox
            observe = self.observe
            start = time.perf_counter() if observe is not None else 0.0
            channel.counters.requests += 1
            try:
                key = self.vms.get(vm).key
            except NotFound:  # revoked while its mailbox was open: nothing to seal with
                return b""
            message = self._vm_request(channel, key, frame)
            n = len(frame) - TRAILER_BYTES
            seq = _SEQ.unpack_from(frame, n)[0] if n >= 0 else 0
            response = seal_frame(key, RESPONSE_DOMAIN, vm, seq, message)
            if observe is not None:
                _observed(observe, Role.VM, message, time.perf_counter() - start)
            return response

    def _vm_request(self, channel: Channel, key: bytes, frame: bytes) -> bytes:
        vm = channel.vm
        assert vm is not None
        if channel.limiter.limited():
            channel.counters.rate_limited += 1
            return encode_error(_NO_REQUEST, _error("rate_limited", "too many bad requests"))
        request = _NO_REQUEST
        try:
            n = len(frame)
            if n > MAX_FRAME:
                raise ApiError(
                    "payload_too_large",
                    f"frame of {n} bytes exceeds {MAX_FRAME}",
                    limit=MAX_FRAME,
                )
            if n < _MIN_FRAME:
                raise ApiError(
                    "malformed",
                    f"frame of {n} bytes is too short",
                    expected=f">= {_MIN_FRAME} bytes",
                )
            # The common case first: a request header with every reserved field zero whose
            # length is the bytes that follow it, of a command the VM role may send. One
            # unpack and one dict lookup; any other frame takes the checks that name the
            # field at fault (the same verdicts, only slower).
            category, tag, reserved, opcode, length, length_hi, codes = _REQUEST_HEAD.unpack_from(
                frame
            )
            cmd = self._vm_commands.get(opcode)
            if (
                cmd is None
                or category | reserved | codes
                or length_hi << 16 | length != n - _MIN_FRAME
            ):
                header = _check_header(frame[:-TRAILER_BYTES])
                request = Message(Category.REQUEST, header.tag, header.opcode)
                cmd = self._allowed_command(Role.VM, header.opcode, channel)
                if header.payload_length != n - _MIN_FRAME:
                    _decode(frame[:-TRAILER_BYTES])  # raises the ApiError naming the field
            else:
                request = Message(Category.REQUEST, tag, opcode)
            seq = verify_frame(key, REQUEST_DOMAIN, vm, frame)
            if seq is None:
                channel.counters.auth_failed += 1
                raise ApiError("auth_failed", "request does not authenticate")
            if request.opcode != _HELLO:
                try:
                    self.vms.accept_seq(vm, seq)
                except ReplayError as e:
                    channel.counters.replayed += 1
                    raise ApiError("replay", e.message, **e.details) from None
            payload = _parse(cmd, frame[HEADER_BYTES : n - TRAILER_BYTES])
        except ApiError as e:
            channel.limiter.charge()
            if e.code == "malformed":
                channel.counters.malformed += 1
            return encode_error(request, e.to_dict())
        return self._execute(channel, cmd, request, payload)

    # ---------------------------------------------------------------- admin frames

    def handle_admin_frame(self, channel: Channel, frame: bytes) -> bytes:
        """One plain CCI request on the admin channel → its response. Never raises."""
        observe = self.observe
        start = time.perf_counter() if observe is not None else 0.0
        response = self._admin_request(channel, frame)
        if observe is not None:
            _observed(observe, Role.ADMIN, response, time.perf_counter() - start)
        return response

    def _admin_request(self, channel: Channel, frame: bytes) -> bytes:
        request = _NO_REQUEST
        try:
            header = _check_header(frame)
            request = Message(Category.REQUEST, header.tag, header.opcode)
            cmd = self._allowed_command(Role.ADMIN, header.opcode, channel)
            message = _decode(frame)
            payload = _parse(cmd, message.payload)
        except ApiError as e:
            return encode_error(request, e.to_dict())
        return self._execute(channel, cmd, message, payload)

    # ---------------------------------------------------------------- common

    def _allowed_command(self, role: Role, opcode: int, channel: Channel) -> Command:
        cmd = COMMANDS.get(opcode)
        if cmd is None:
            raise ApiError("unsupported", f"opcode {opcode:04X}h is not a command", opcode=opcode)
        if opcode not in self._allowed[role]:
            channel.counters.not_allowed += 1
            raise ApiError(
                "opcode_not_allowed",
                f"{cmd.name} ({opcode:04X}h) is not allowed on a {role.name} channel",
                opcode=opcode,
            )
        return cmd

    def _execute(
        self, channel: Channel, cmd: Command, message: Message, payload: Mapping[str, Any]
    ) -> bytes:
        handler = HANDLERS.get(cmd.name)
        if handler is None:
            return encode_error(
                message,
                _error(
                    "unsupported",
                    f"{cmd.name} ({cmd.opcode:04X}h) is not implemented by this firmware",
                ),
            )
        try:
            result = handler(self, channel, payload)
            return encode_response(message, result, command=cmd)
        except SlicefabError as e:
            return encode_error(message, e.to_dict())
        except (AbiError, ValueError) as e:  # a result that does not fit its layout
            return encode_error(message, _error("internal", f"{cmd.name}: {e}"))


_NAMES = {opcode: cmd.name for opcode, cmd in COMMANDS.items()}


def _observed(observe: Observer, role: Role, message: bytes, seconds: float) -> None:
    """Report an answered request, named from its response header (any opcode an attacker
    makes up is "unknown", so the names stay a bounded set)."""
    opcode, return_code = _OPCODE_AND_RC.unpack_from(message)
    observe(role, _NAMES.get(opcode, "unknown"), return_code, seconds)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "details": {}}


def _check_header(message: bytes) -> Header:
    try:
        header = check_header(message)
    except DecodeError as e:
        # a length over the cap is too large; a reserved bit in the length field is not
        too_large = e.field == "header.payload_length" and e.limit is not None
        raise ApiError(
            "payload_too_large" if too_large else "malformed", str(e), field=e.field
        ) from None
    if header.category != Category.REQUEST:
        raise ApiError("malformed", "expected a request", field="header.category")
    return header


def _decode(message: bytes) -> Message:
    """The whole message (the header was checked already; this checks the length)."""
    try:
        return Message.decode(message)
    except DecodeError as e:
        raise ApiError("malformed", str(e), field=e.field) from None


def _parse(cmd: Command, payload: bytes) -> Mapping[str, Any]:
    try:
        return cmd.request.parse(payload)
    except DecodeError as e:
        raise ApiError("malformed", f"{cmd.name}: {e}", field=e.field) from None


# -------------------------------------------------------------------- handlers


def _caller(channel: Channel) -> str | None:
    return ADMIN if channel.vm is None else channel.vm


def _view(api: Api, view: Mapping[str, Any]) -> Mapping[str, Any]:
    return convert.slice_view_to_payload(view, api.manager.device.granule_bytes)


def _hello(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    return {
        "client_nonce": p["client_nonce"],
        "boot_nonce": api.boot_nonce,
        "last_seq": api.vms.last_seq(ch.vm) if ch.vm else 0,
        "abi_version": ABI_VERSION,
        "max_payload": MAX_PAYLOAD,
        "vm": ch.vm or "",
    }


def _allocate(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        spec, rid = convert.spec_from_payload(p, owner=ch.vm)
    except ValueError as e:
        raise RequestError("owner", str(e)) from None
    view = api.manager.allocate(SliceSpec.from_dict(spec), caller=_caller(ch), request_id=rid)
    return _view(api, view)


def _resize(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    sid, rs, rid = convert.resize_from_payload(p)
    view = api.manager.resize(sid, ResizeSpec.from_dict(rs), caller=_caller(ch), request_id=rid)
    return _view(api, view)


def _free(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    view = api.manager.free(p["slice"], caller=_caller(ch), request_id=p["request_id"])
    return _view(api, view)


def _get(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    return _view(api, api.manager.get(p["slice"], caller=_caller(ch)))


#: a LIST page stops before its encoding could exceed the payload cap
_LIST_BUDGET = MAX_PAYLOAD - 64


def _list(
    api: Api, ch: Channel, p: Mapping[str, Any], owner: str | None = None
) -> Mapping[str, Any]:
    views = [
        v
        for v in api.manager.list_slices(caller=_caller(ch), owner=owner)
        if v["id"] >= p["start_id"]
    ]
    layout = BY_NAME["LIST"].response
    page: list[Mapping[str, Any]] = []
    next_id = 0
    for v in views:
        candidate = [*page, _view(api, v)]
        if (
            len(layout.build({"total": len(views), "next_id": 0, "slices": candidate}))
            > _LIST_BUDGET
        ):
            next_id = v["id"]
            break
        page = candidate
    return {"total": len(views), "next_id": next_id, "slices": page}


def _telemetry(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    view = api.manager.get(p["slice"], caller=_caller(ch))
    ports = _port_counters(api, view["alloc"]["ports"])
    lanes = view["alloc"]["lanes"]
    return {
        "slice": view["id"],
        "state": view["state"],
        "cores": len(view["alloc"]["cores"]),
        "memory_bytes": sum(n for _, n in view["alloc"]["extents"])
        * api.manager.device.granule_bytes,
        "lane_width": 0 if lanes is None else lanes["width"],
        "ports": ports,
    }


def _vm_add(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    cred = api.manager.provision_vm(p["vm"], p["mailbox"])
    return {"vm": cred.vm, "key": cred.key, "mailbox": cred.mailbox}


def _vm_remove(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    api.manager.remove_vm(p["vm"])
    return {}


# ---------------------------------------------------------------- inventory views
# Free counts are device-wide (what a VM needs to plan a request); what is *held* is shown
# to a VM only for its own slices, to the admin for everyone.


def _mine(a: Allocator, ch: Channel) -> list[Slice]:
    return [s for s in a.slices.values() if ch.vm is None or s.owner == ch.vm]


def _cores(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    def view(a: Allocator) -> Mapping[str, Any]:
        sizes = api.manager.device.cluster_sizes
        return {
            "clusters": [{"size": n, "free": a.cores.free_count(c)} for c, n in enumerate(sizes)],
            "held": sorted(c for s in _mine(a, ch) for c in s.alloc.cores),
        }

    return api.manager.read(view)


def _memory(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    dev = api.manager.device

    def view(a: Allocator) -> Mapping[str, Any]:
        return {
            "memory_bytes": dev.memory_bytes,
            "granule_bytes": dev.granule_bytes,
            "free_granules": a.memory.free_granules,
            "largest_free_granules": a.memory.largest_free,
            "max_extents_per_slice": dev.max_extents_per_slice,
            "held_granules": sum(s.alloc.granules for s in _mine(a, ch)),
        }

    return api.manager.read(view)


def _lanes(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    dev = api.manager.device

    def view(a: Allocator) -> Mapping[str, Any]:
        return {
            "ports": [
                {"lanes": n, "free": a.lanes.free_lanes(i)} for i, n in enumerate(dev.port_lanes)
            ],
            "endpoints": [
                {
                    "name": e.name, "kind": e.kind, "port": e.port, "first_lane": e.first_lane,
                    "width": e.width,
                    "free": a.lanes.is_free(LaneGroup(e.port, e.first_lane, e.width)),
                }
                for e in dev.endpoints
            ],
        }  # fmt: skip

    return api.manager.read(view)


def _keys(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    def view(a: Allocator) -> Mapping[str, Any]:
        return {
            "total": len(a.key_owner),
            "free": sum(o is None for o in a.key_owner),
            "held": [k for k, o in enumerate(a.key_owner) if o is not None
                     and (ch.vm is None or o == ch.vm)],
        }  # fmt: skip

    return api.manager.read(view)


def _ports(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    cap = api.manager.device.crossbar.port_mbps

    def view(a: Allocator) -> Mapping[str, Any]:
        return {
            "total": len(a.ports),
            "free": sum(st.owner is None for st in a.ports),
            "port_mbps": cap,
            "held": [
                {"port": i, "guaranteed_mbps": st.guaranteed_mbps,
                 "maximum_mbps": min(cap, st.limit_mbps)}
                for i, st in enumerate(a.ports)
                if st.owner is not None and (ch.vm is None or st.owner == ch.vm)
            ],
        }  # fmt: skip

    return api.manager.read(view)


# ---------------------------------------------------------------- admin views


def _port_counters(api: Api, ports: list[int]) -> list[Mapping[str, Any]]:
    return [{"port": port, **api.manager.fabric.port_counters(port)} for port in ports]


def _device_telemetry(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    status = api.manager.status()
    held = api.manager.read(lambda a: [i for i, st in enumerate(a.ports) if st.owner is not None])
    return {
        "slices": status["slices"],
        "utilisation": convert.utilisation_to_payload(status["utilisation"]),
        "generation": status["fabric"]["generation"],
        "ports": _port_counters(api, held),
    }


#: a VM_LIST page holds at most this many VMs (its layout's list bound)
_VM_PAGE = 16


def _vm_list(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    creds = api.vms.credentials()
    per_vm = api.manager.read(lambda a: [s.owner for s in a.slices.values()])
    page = creds[p["start"] : p["start"] + _VM_PAGE]
    nxt = p["start"] + len(page)
    return {
        "total": len(creds),
        "next": nxt if nxt < len(creds) else 0,
        "vms": [{"vm": c.vm, "mailbox": c.mailbox, "last_seq": api.vms.last_seq(c.vm),
                 "slices": per_vm.count(c.vm)} for c in page],
    }  # fmt: skip


def _fabric(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    d = api.manager.fabric.describe()
    return {
        "backend": d["backend"],
        "generation": d["generation"],
        "syncs": d["syncs"],
        "register_writes": d["register_writes"],
        "ports": [
            {"permission": d["permission"][i], "weight": d["weight"][i], "keys": d["keys"][i],
             "tb_rate": d["tb_rate"][i]}
            for i in range(d["ports"])
        ],
    }  # fmt: skip


# ---------------------------------------------------------------- adaptive allocation


def _report_usage(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    """A guest's usage sample of its slice (docs/adaptive.md, "Usage model")."""
    view = api.manager.get(p["slice"], caller=_caller(ch))
    held = sum(n for _, n in view["alloc"]["extents"]) * api.manager.device.granule_bytes
    cores = len(view["alloc"]["cores"])
    if p["memory_used_bytes"] > held:
        raise RequestError(
            "memory_used_bytes",
            f"{p['memory_used_bytes']} exceeds the {held} bytes slice {view['id']} holds",
            limit=held,
        )
    if p["cores_busy_milli"] > 1000 * cores:
        raise RequestError(
            "cores_busy_milli",
            f"{p['cores_busy_milli']} exceeds the {cores} cores slice {view['id']} holds "
            f"(at most {1000 * cores})",
            limit=1000 * cores,
        )
    # the forecaster's key: the class the owner gave the slice's policy, else its name
    classes = [d["app_class"] for d in api.manager.usage.policies() if d["slice"] == view["id"]]
    sample = UsageSample(
        view["id"],
        view["owner"],
        classes[0] if classes else view["name"] or DEFAULT_APP_CLASS,
        time.time(),
        memory_used=p["memory_used_bytes"] if "memory" in view["spec"] else None,
        cores_busy=p["cores_busy_milli"] / 1000 if cores else None,
    )
    api.manager.usage.record([sample])
    return {"slice": view["id"], "memory_bytes": held, "cores": cores}


def _set_adaptive(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    resource = Resource(p["resource"])
    if not p["enabled"]:
        clear_policy(api.manager, api.manager.usage, p["slice"], resource, caller=_caller(ch))
        return dict(p)
    policy = set_policy(
        api.manager, api.manager.usage, p["slice"],
        {"resource": p["resource"], "minimum": p["minimum"], "maximum": p["maximum"],
         "step": p["step"], "cooldown": p["cooldown_s"], "predictive": p["predictive"],
         "app_class": p["app_class"]},
        caller=_caller(ch),
    )  # fmt: skip
    return {**p, "app_class": policy.app_class}


def _adaptive_decisions(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    if p["slice"]:
        api.manager.get(p["slice"], caller=_caller(ch))  # ownership
    found = api.manager.usage.decisions(
        slice_id=p["slice"] or None, owner=ch.vm, after=p["after"], limit=MAX_DECISIONS
    )
    return {
        "decisions": [
            {"id": d.id, "at_ms": max(0, round(d.at * 1000)), "slice": d.slice_id,
             "resource": d.resource.value, "action": d.action.value, "before": d.before,
             "after": d.after, "reason": _cut(d.reason, REASON_BYTES)}
            for d in found
        ]
    }  # fmt: skip


# ---------------------------------------------------------------- pool (docs/pool.md)

_POOL_BUDGET = MAX_PAYLOAD - 64


def _pool_compositions(api: Api, ch: Channel, p: Mapping[str, Any]) -> Mapping[str, Any]:
    """The caller's compositions in the pool, from index ``start``, as many as fit."""
    if api.pool is None:
        raise ApiError(
            "unsupported",
            "POOL_COMPOSITIONS: this device is not a pool member (start its daemon with "
            "slicefab serve --pool URL --device-id ID, docs/pool.md)",
            missing_option="--pool",
        )
    if ch.vm is None:  # the opcode table allows it on VM channels only
        raise ApiError("opcode_not_allowed", "POOL_COMPOSITIONS is a VM's command")
    comps = sorted(api.pool.compositions(ch.vm), key=lambda c: str(c["id"]))
    for c in comps:  # the owner filter is the pool's; authorisation must not rest on it
        if c["owner"] != ch.vm:
            raise ApiError("error", f"composition {c['id']} is not {ch.vm}'s")
    layout = BY_NAME["POOL_COMPOSITIONS"].response
    page: list[Mapping[str, Any]] = []
    nxt = 0
    for i in range(p["start"], len(comps)):
        candidate = [*page, _composition(comps[i])]
        body = {"total": len(comps), "next": 0, "compositions": candidate}
        if len(candidate) > 255 or len(layout.build(body)) > _POOL_BUDGET:
            if not page:  # cannot happen: one composition's worst case is ~2.6 KiB
                raise ApiError("error", f"composition {comps[i]['id']} exceeds a payload")
            nxt = i
            break
        page = candidate
    return {"total": len(comps), "next": nxt, "compositions": page}


def _composition(c: Mapping[str, Any]) -> Mapping[str, Any]:
    parts = []
    for part in c["parts"]:
        reason = part.get("reason") or part.get("error", {}).get("message", "")
        parts.append({
            "device": part["device"], "state": part["state"], "cores": part["cores"],
            "memory": part["memory"], "nvme": len(part["nvme"]),
            "slices": list(part.get("slices", []))[:MAX_PART_SLICES],
            "reason": _cut(str(reason), REASON_BYTES),
        })  # fmt: skip
    return {"id": c["id"], "state": c["state"], "parts": parts}


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (on a character boundary)."""
    return text.encode()[:limit].decode(errors="ignore")


HANDLERS: dict[str, Handler] = {
    "HELLO": _hello,
    "NOP": lambda api, ch, p: {"data": p["data"]},
    "ALLOCATE": _allocate,
    "ALLOCATE_FOR": _allocate,
    "RESIZE": _resize,
    "FREE": _free,
    "GET": _get,
    "LIST": _list,
    "LIST_FOR": lambda api, ch, p: _list(api, ch, p, owner=p["owner"]),
    "SLICE_TELEMETRY": _telemetry,
    "DEVICE_INFO": lambda api, ch, p: convert.device_info_to_payload(
        api.manager.device.summary(), ABI_VERSION
    ),
    "VM_ADD": _vm_add,
    "VM_REMOVE": _vm_remove,
    "VM_LIST": _vm_list,
    "CORES": _cores,
    "MEMORY": _memory,
    "LANES": _lanes,
    "KEYS": _keys,
    "PORTS": _ports,
    "DEVICE_TELEMETRY": _device_telemetry,
    "STATUS": lambda api, ch, p: convert.status_to_payload(api.manager.status()),
    "CHECK": lambda api, ch, p: {"violations": api.manager.check_invariants()},
    "FABRIC": _fabric,
    "REPORT_USAGE": _report_usage,
    "SET_ADAPTIVE": _set_adaptive,
    "ADAPTIVE_DECISIONS": _adaptive_decisions,
    "POOL_COMPOSITIONS": _pool_compositions,
}

# The CXL FM API commands (54h, 56h): their handlers live in firmware.fmapi.
from firmware.fmapi import FMAPI_HANDLERS  # noqa: E402  (imports nothing from this module)

HANDLERS.update(FMAPI_HANDLERS)
