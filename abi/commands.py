"""The opcode table: every command Slicefab's firmware answers, in one place.

Each :class:`Command` names its opcode (``command_set << 8 | command``), the roles that may
send it (:class:`Role`; the firmware refuses any other role *before* authentication and
parsing, docs/security.md), its request and response payload layouts, and a docstring
that cites the CXL section or libcxlmi structure it mirrors and says how Slicefab maps it.
``docs/abi/commands.md`` is generated from this table (``python -m abi.gen_docs``).

Command sets:

====  ===========================================================================
54h   CXL FM API, MLD components: LD info, LD allocations, QoS (CXL r3.1 §7.6.7.4)
56h   CXL FM API, DCD management: Dynamic Capacity add/release (CXL r3.1 §7.6.7.6)
C0h   vendor: slice lifecycle (allocate, resize, free, get, list, adaptive policy, pool)
C1h   vendor: device inventory (cores, memory, lanes, keys, ports)
C2h   vendor: session (hello, no-op)
C3h   vendor: telemetry (per slice, per device, guest-reported usage, adaptive decisions)
C4h   vendor: administration (VM provisioning, status, invariants, fabric)
====  ===========================================================================

Opcodes C000h-FFFFh are CXL's vendor-specific range (CXL r3.1 §8.2.9).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from abi import fmapi, vendor
from abi.cci import MAX_PAYLOAD, Category, Message, request_bytes, success_bytes
from abi.errors import DecodeError, EncodeError, UnknownOpcode
from abi.layout import Layout, Payload
from abi.retcodes import ReturnCode, error_from_response, error_payload


class Role(enum.Flag):
    """Who may send a command: a VM on its mailbox, the administrator on the admin
    socket, or both (a VM then acts only on what it owns)."""

    VM = enum.auto()
    ADMIN = enum.auto()
    BOTH = VM | ADMIN


@dataclass(frozen=True)
class Command:
    """One row of the opcode table."""

    opcode: int
    name: str
    roles: Role
    request: Layout
    response: Layout
    doc: str

    @property
    def command_set(self) -> int:
        return self.opcode >> 8

    @property
    def command(self) -> int:
        return self.opcode & 0xFF

    def allowed(self, role: Role) -> bool:
        """True when ``role`` may send this command."""
        return bool(role & self.roles) and role in self.roles


VM, ADMIN, BOTH = Role.VM, Role.ADMIN, Role.BOTH
_V = vendor
_F = fmapi

_TABLE = (
    # ---------------------------------------------------------------- CXL FM API, 54h
    Command(0x5400, "GET_LD_INFO", ADMIN, _F.EMPTY, _F.GET_LD_INFO_RSP, """
        CXL r3.1 §7.6.7.4.1 Get LD Info; libcxlmi struct cxlmi_cmd_fmapi_get_ld_info_rsp.
        Slicefab: memory_size is the device's memory, ld_count its protection keys (an LD
        is a VM's isolation domain and LD id = the VM's key index, so up to 16 LDs).
        Admin only: a VM learns its own share from GET_LD_ALLOCATIONS."""),
    Command(0x5401, "GET_LD_ALLOCATIONS", BOTH, _F.GET_LD_ALLOCATIONS_REQ,
            _F.GET_LD_ALLOCATIONS_RSP, """
        CXL r3.1 §7.6.7.4.2 Get LD Allocations; libcxlmi struct
        cxlmi_cmd_fmapi_get_ld_allocations_req/_rsp. Slicefab: LD i's range 1 is the
        memory of the slices of the VM holding key i, in units of memory_granularity
        (rounded up; exact sizes come from LIST); range 2 is always 0. A VM may read its
        own LD only (start_ld_id = its key, limit 1); other LDs are refused (denied)."""),
    Command(0x5402, "SET_LD_ALLOCATIONS", ADMIN, _F.SET_LD_ALLOCATIONS,
            _F.SET_LD_ALLOCATIONS, """
        CXL r3.1 §7.6.7.4.3 Set LD Allocations; libcxlmi struct
        cxlmi_cmd_fmapi_set_ld_allocations_req/_rsp. Slicefab: sets the memory of the VM
        of each LD (range 1 × granularity): it grows or shrinks that VM's slice memory like
        a RESIZE (refused unless the VM has exactly one slice with memory); the response
        lists what was granted."""),
    Command(0x5403, "GET_QOS_CONTROL", ADMIN, _F.EMPTY, _F.QOS_CONTROL, """
        CXL r3.1 §7.6.7.4.4 Get QoS Control; libcxlmi struct
        cxlmi_cmd_fmapi_get_qos_control_rsp. Slicefab: the congestion telemetry settings
        of the crossbar (the thresholds apply to port utilisation)."""),
    Command(0x5404, "SET_QOS_CONTROL", ADMIN, _F.QOS_CONTROL, _F.QOS_CONTROL, """
        CXL r3.1 §7.6.7.4.5 Set QoS Control; libcxlmi struct
        cxlmi_cmd_fmapi_set_qos_control_req/_rsp. Slicefab: the controls drive CXL's DevLoad
        signal, which Slicefab's messages do not carry, so only the values GET_QOS_CONTROL
        reports are accepted; any other value is refused naming its field."""),
    Command(0x5405, "GET_QOS_STATUS", ADMIN, _F.EMPTY, _F.GET_QOS_STATUS_RSP, """
        CXL r3.1 §7.6.7.4.6 Get QoS Status; libcxlmi struct
        cxlmi_cmd_fmapi_get_qos_status_rsp. Slicefab: the measured token-bucket backpressure:
        100 x stall cycles / (flits + stall cycles) over all crossbar inputs. Admin only:
        it reveals other VMs' load."""),
    Command(0x5406, "GET_QOS_ALLOCATED_BW", BOTH, _F.LD_RANGE_REQ, _F.QOS_ALLOCATED_BW, """
        CXL r3.1 §7.6.7.4.7 Get QoS Allocated BW; libcxlmi struct
        cxlmi_cmd_fmapi_get_qos_allocated_bw_req/_rsp. Slicefab: the guaranteed share of
        each LD: the guaranteed bandwidth per port of the VM's slices as a fraction of 256
        of one crossbar port (rounded down, at most 255/256). A VM may read its own LD."""),
    Command(0x5407, "SET_QOS_ALLOCATED_BW", ADMIN, _F.QOS_ALLOCATED_BW,
            _F.QOS_ALLOCATED_BW, """
        CXL r3.1 §7.6.7.4.8 Set QoS Allocated BW; libcxlmi struct
        cxlmi_cmd_fmapi_set_qos_allocated_bw_req/_rsp. Slicefab: sets each LD's guaranteed
        share (fraction/256 of a port), spread over the VM's slices in proportion to their
        current guarantees and admitted like a RESIZE; the response holds what was set."""),
    Command(0x5408, "GET_QOS_BW_LIMIT", BOTH, _F.LD_RANGE_REQ, _F.QOS_BW_LIMIT, """
        CXL r3.1 §7.6.7.4.9 Get QoS BW Limit; libcxlmi struct
        cxlmi_cmd_fmapi_get_qos_bw_limit_req/_rsp. Slicefab: the maximum share of each LD
        (its token-bucket limit per port as a fraction of 256 of a port; 0 maximum, i.e.
        the port's capacity, reads 255). A VM may read its own LD."""),
    Command(0x5409, "SET_QOS_BW_LIMIT", ADMIN, _F.QOS_BW_LIMIT, _F.QOS_BW_LIMIT, """
        CXL r3.1 §7.6.7.4.10 Set QoS BW Limit; libcxlmi struct
        cxlmi_cmd_fmapi_set_qos_bw_limit_req/_rsp. Slicefab: limits the LD's busiest port to
        fraction/256 of a port, split across the slices sharing it so that GET reads back
        the fraction set; 255 removes the limit; never below a slice's guarantee."""),
    # ---------------------------------------------------------------- CXL FM API, 56h
    Command(0x5604, "INITIATE_DC_ADD", ADMIN, _F.INITIATE_DC_ADD_REQ, _F.EMPTY, """
        CXL r3.1 §7.6.7.6.5 Initiate Dynamic Capacity Add; libcxlmi struct
        cxlmi_cmd_fmapi_initiate_dc_add_req. Slicefab: grows the memory of the slice named
        by tag (slice_tag()) of the VM whose LD is host_id: by length bytes of extents the
        device picks (free, contiguous), or by exactly the given extents (prescriptive;
        DPA = granule index × granule size). The slice stays active."""),
    Command(0x5605, "INITIATE_DC_RELEASE", ADMIN, _F.INITIATE_DC_RELEASE_REQ, _F.EMPTY, """
        CXL r3.2 §7.6.7.6.6 Initiate Dynamic Capacity Release (as cited by libcxlmi and
        QEMU); libcxlmi struct cxlmi_cmd_fmapi_initiate_dc_release_req. Slicefab: shrinks
        the slice named by tag: length bytes from its tail (tag-based) or exactly the given
        extents (prescriptive). A slice keeps at least one granule; FREE releases all."""),
    # ---------------------------------------------------------------- C0h slice lifecycle
    Command(0xC000, "ALLOCATE", VM, _V.ALLOCATE_REQ, _V.SLICE_RSP, """
        Vendor. Allocate a slice for the calling VM (its identity is the authenticated
        mailbox; the spec has no owner). Answers the slice once it is durable and
        programmed. firmware: ResourceManager.allocate."""),
    Command(0xC001, "RESIZE", BOTH, _V.RESIZE_REQ, _V.SLICE_RSP, """
        Vendor. Live resize to absolute targets (memory, cores, QoS); the slice stays
        active. A VM may resize only its own slices. firmware: ResourceManager.resize."""),
    Command(0xC002, "FREE", BOTH, _V.FREE_REQ, _V.SLICE_RSP, """
        Vendor. Take the slice out of the fabric and give back its units; answers its last
        view (state freed). A VM may free only its own. firmware: ResourceManager.free."""),
    Command(0xC003, "GET", BOTH, _V.SLICE_REF_REQ, _V.SLICE_RSP, """
        Vendor. One slice. A VM sees only its own (another's is not_found or denied).
        firmware: ResourceManager.get."""),
    Command(0xC004, "LIST", BOTH, _V.LIST_REQ, _V.LIST_RSP, """
        Vendor. The caller's slices (a VM: its own; the administrator: all), by id from
        start_id, as many as fit one payload; next_id continues. firmware:
        ResourceManager.list_slices."""),
    Command(0xC005, "ALLOCATE_FOR", ADMIN, _V.ALLOCATE_FOR_REQ, _V.SLICE_RSP, """
        Vendor. ALLOCATE on behalf of a VM: the administrator names the owner."""),
    Command(0xC006, "LIST_FOR", ADMIN, _V.LIST_FOR_REQ, _V.LIST_RSP, """
        Vendor. LIST the slices of one VM (the administrator's owner filter)."""),
    Command(0xC007, "SET_ADAPTIVE", BOTH, _V.ADAPTIVE_POLICY, _V.ADAPTIVE_POLICY, """
        Vendor. Opt a slice's memory, cores or bandwidth (since ABI 1.3: the QoS rate on
        each of its crossbar ports) in to adaptive allocation with the owner's
        bounds (minimum, maximum, step, cooldown), optionally predictive; enabled = false
        opts out. Answers the policy as stored (app_class resolved). A VM may set only its
        own slices'. firmware: firmware.adaptive.policy.set_policy (docs/adaptive.md)."""),
    Command(0xC008, "POOL_COMPOSITIONS", VM, _V.POOL_COMPOSITIONS_REQ,
            _V.POOL_COMPOSITIONS_RSP, """
        Vendor. The calling VM's compositions in the device's pool, a page at a time, with
        each part's device and state: a part whose device left the pool (its lease
        expired) or restarted is lost. Answered by a pool member (slicefab serve --pool);
        any other device answers unsupported. firmware: Pool.compositions(owner=VM)
        (docs/pool.md)."""),
    # ---------------------------------------------------------------- C1h inventory
    Command(0xC100, "DEVICE_INFO", BOTH, _F.EMPTY, _V.DEVICE_INFO_RSP, """
        Vendor. The device inventory (firmware: Device.summary()) and the ABI version."""),
    Command(0xC101, "CORES", BOTH, _F.EMPTY, _V.CORES_RSP, """
        Vendor. Cores per cluster and how many are free; the core ids the caller's slices
        hold (a VM: its own; the administrator: all held)."""),
    Command(0xC102, "MEMORY", BOTH, _F.EMPTY, _V.MEMORY_RSP, """
        Vendor. Device memory, free granules, the largest free extent (the largest
        contiguous request that can succeed) and what the caller holds."""),
    Command(0xC103, "LANES", BOTH, _F.EMPTY, _V.LANES_RSP, """
        Vendor. Lanes per PCIe port and how many are free; the endpoints and whether their
        lanes are free."""),
    Command(0xC104, "KEYS", BOTH, _F.EMPTY, _V.KEYS_RSP, """
        Vendor. Protection keys: total, free, and the ones the caller holds (a VM holds at
        most one; its LD id in the FM API commands)."""),
    Command(0xC105, "PORTS", BOTH, _F.EMPTY, _V.PORTS_RSP, """
        Vendor. Crossbar ports: total, free, and per port the caller holds the admitted
        guaranteed bandwidth and the programmed maximum."""),
    # ---------------------------------------------------------------- C2h session
    Command(0xC200, "HELLO", BOTH, _V.HELLO_REQ, _V.HELLO_RSP, """
        Vendor. Start or resynchronise a session: the firmware's boot nonce (a new value
        means it restarted), the last sequence number it accepted from this VM (send
        anything above it), the ABI version and payload cap, and the identity the mailbox
        is bound to (empty on the admin socket). HELLO is the one request whose sequence
        number the firmware does not require to increase (it is how a client learns the
        counter); its sealed response echoes client_nonce, so it cannot be replayed."""),
    Command(0xC201, "NOP", BOTH, _V.NOP, _V.NOP, """
        Vendor. Echoes its payload: the authenticated no-op of the mailbox round-trip
        benchmark (slicefab bench mailbox)."""),
    # ---------------------------------------------------------------- C3h telemetry
    Command(0xC300, "SLICE_TELEMETRY", BOTH, _V.SLICE_REF_REQ, _V.SLICE_TELEMETRY_RSP, """
        Vendor. One slice's sizes and the counters of its crossbar ports (ports belong to
        the VM, so the counters include its other slices on them). A VM: its own only."""),
    Command(0xC301, "DEVICE_TELEMETRY", ADMIN, _F.EMPTY, _V.DEVICE_TELEMETRY_RSP, """
        Vendor. Device utilisation (firmware: Allocator.utilisation()) and every port's
        counters. Admin only: it shows other VMs' load."""),
    Command(0xC302, "REPORT_USAGE", BOTH, _V.REPORT_USAGE_REQ, _V.REPORT_USAGE_RSP, """
        Vendor. The guest reports what it uses of a slice (memory, busy cores): a sample
        of the usage model the adaptive controller and the forecaster read
        (firmware.adaptive.usage). Use above what the slice holds is refused. Answers
        what the slice holds now, so the guest sees a resize. A VM: its own slices."""),
    Command(0xC303, "ADAPTIVE_DECISIONS", BOTH, _V.ADAPTIVE_DECISIONS_REQ,
            _V.ADAPTIVE_DECISIONS_RSP, """
        Vendor. The adaptive controller's decisions with their reasons, a page of up to 16
        (firmware: UsageStore.decisions). A VM sees only its own slices'."""),
    # ---------------------------------------------------------------- C4h administration
    Command(0xC400, "VM_LIST", ADMIN, _V.VM_LIST_REQ, _V.VM_LIST_RSP, """
        Vendor. The provisioned VMs (firmware: VmRegistry.list()), a page at a time."""),
    Command(0xC401, "VM_ADD", ADMIN, _V.VM_ADD_REQ, _V.VM_ADD_RSP, """
        Vendor. Provision a VM with a fresh key (slicefab vm add while the daemon runs);
        the key travels only on the admin socket (mode 0600)."""),
    Command(0xC402, "VM_REMOVE", ADMIN, _V.VM_REF_REQ, _F.EMPTY, """
        Vendor. Revoke a VM's credential: its next request fails authentication."""),
    Command(0xC403, "STATUS", ADMIN, _F.EMPTY, _V.STATUS_RSP, """
        Vendor. Device status (firmware: ResourceManager.status(), without host paths)."""),
    Command(0xC404, "CHECK", ADMIN, _F.EMPTY, _V.CHECK_RSP, """
        Vendor. Run the invariant checkers (firmware: ResourceManager.check_invariants())."""),
    Command(0xC405, "FABRIC", ADMIN, _F.EMPTY, _V.FABRIC_RSP, """
        Vendor. The crossbar configuration as programmed (firmware:
        FabricDriver.describe())."""),
)  # fmt: skip


def _clean(cmd: Command) -> Command:
    lines = [line.strip() for line in cmd.doc.strip().splitlines()]
    return Command(cmd.opcode, cmd.name, cmd.roles, cmd.request, cmd.response, " ".join(lines))


#: opcode -> command, in opcode order
COMMANDS: Mapping[int, Command] = MappingProxyType(
    {c.opcode: c for c in sorted(map(_clean, _TABLE), key=lambda c: c.opcode)}
)
#: command name -> command
BY_NAME: Mapping[str, Command] = MappingProxyType({c.name: c for c in COMMANDS.values()})

if len(COMMANDS) != len(_TABLE) or len(BY_NAME) != len(_TABLE):
    raise RuntimeError("abi.commands: duplicate opcode or name in the table")

# lookup()'s table: opcodes and names in one plain dict (a read-only proxy's get() costs
# more than the rest of a lookup). Enum members read once: see abi.cci.
_BY_KEY: dict[int | str, Command] = {}
for _cmd in COMMANDS.values():
    _BY_KEY[_cmd.opcode] = _BY_KEY[_cmd.name] = _cmd
_REQUEST, _RESPONSE = Category.REQUEST, Category.RESPONSE
_SUCCESS, _STARTED = int(ReturnCode.SUCCESS), int(ReturnCode.BACKGROUND_COMMAND_STARTED)


def lookup(opcode: int | str) -> Command:
    """The command for an opcode (or a name).

    Raises:
        UnknownOpcode: not in the table (the firmware answers *Unsupported*).
    """
    cmd = _BY_KEY.get(opcode)
    if cmd is None:
        shown = opcode if isinstance(opcode, str) else f"{opcode:04X}h"
        raise UnknownOpcode("header.opcode", f"unknown opcode {shown}", offset=3)
    return cmd


def allowed_opcodes(role: Role) -> frozenset[int]:
    """Every opcode ``role`` may send: the allowlist of a mailbox of that role."""
    return frozenset(op for op, c in COMMANDS.items() if c.allowed(role))


class Request(NamedTuple):
    """A decoded request: the command, the message and its parsed payload."""

    command: Command
    message: Message
    payload: Payload


class Response(NamedTuple):
    """A decoded response. ``payload`` is the parsed response on success, else None;
    ``error`` the firmware-shaped error dict (``{"code", "message", "details"}``) of an
    error response, else None. ``command`` is None only for an error answering a request
    whose opcode was unknown or unreadable (the firmware echoes what it could read)."""

    command: Command | None
    message: Message
    payload: Payload | None
    error: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.error is None


def encode_request(
    opcode: int | str, payload: Mapping[str, Any], *, tag: int = 0, max_payload: int = MAX_PAYLOAD
) -> bytes:
    """A whole request message. Raises :class:`EncodeError` (an unknown opcode included)."""
    try:
        cmd = lookup(opcode)
    except UnknownOpcode as e:
        raise EncodeError(e.field, e.message) from None
    return request_bytes(tag, cmd.opcode, cmd.request.build(payload), max_payload=max_payload)


def decode_request(buf: bytes, *, max_payload: int = MAX_PAYLOAD) -> Request:
    """Decode a whole request: header, opcode, payload.

    Raises:
        DecodeError: a bad header, a response where a request was expected, a payload
            that is not the command's request layout.
        UnknownOpcode: (a DecodeError) the opcode is not in the table.
    """
    msg = Message.decode(buf, max_payload=max_payload)
    if msg.category is not _REQUEST:
        raise DecodeError("header.category", "expected a request", offset=0, expected="0")
    cmd = lookup(msg.opcode)
    return Request(cmd, msg, cmd.request.parse(msg.payload))


def encode_response(
    request: Message,
    payload: Mapping[str, Any],
    *,
    max_payload: int = MAX_PAYLOAD,
    command: Command | None = None,
) -> bytes:
    """The success response to ``request`` (whose command the caller may pass, saving the
    lookup). Raises :class:`EncodeError`, e.g. when the payload exceeds ``max_payload``
    (answer an error instead)."""
    cmd = lookup(request.opcode) if command is None else command
    return success_bytes(request, cmd.response.build(payload), max_payload=max_payload)


def encode_error(request: Message, error: Mapping[str, Any]) -> bytes:
    """The error response to ``request`` for a firmware error dict
    (``SlicefabError.to_dict()``, or ``{"code": "malformed", ...}`` from the mailbox's
    own checks). Never raises for any ``error`` (the detail is cut to fit)."""
    rc, vs, body = error_payload(error)
    return request.reply(body, rc, vs).encode()


def decode_response(buf: bytes, *, max_payload: int = MAX_PAYLOAD) -> Response:
    """Decode a whole response: success payload or error detail.

    Raises:
        DecodeError: a bad header, a request where a response was expected, a payload
            that is neither the command's response layout nor an error detail.
    """
    msg = Message.decode(buf, max_payload=max_payload)
    category, _, opcode, payload, rc, vs, _ = msg
    if category is not _RESPONSE:
        raise DecodeError("header.category", "expected a response", offset=0, expected="1")
    if rc != _SUCCESS and rc != _STARTED:
        error = error_from_response(rc, vs, payload)
        return Response(COMMANDS.get(opcode), msg, None, error)
    cmd = lookup(opcode)
    if rc == _SUCCESS:
        return Response(cmd, msg, cmd.response.parse(payload), None)
    if msg.payload:  # BACKGROUND_COMMAND_STARTED
        raise DecodeError("payload", "a background start carries no payload", offset=12)
    return Response(cmd, msg, None, None)


__all__ = [
    "BY_NAME",
    "COMMANDS",
    "Command",
    "Request",
    "Response",
    "Role",
    "allowed_opcodes",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_response",
    "lookup",
]
