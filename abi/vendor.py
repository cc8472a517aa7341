"""Slicefab's vendor-specific payloads (command sets C0h-C4h of CXL's vendor range
C000h-FFFFh; CXL r3.1 §8.2.9 reserves it for vendor commands).

Everything is binary and little-endian. Optional parts of a structure are announced by
a ``_flags`` bit field that is *derived* on build from which parts are present (``None``
means absent), so the dicts never carry the flags themselves and cannot disagree with
them. Strings are UTF-8 with a one- or two-byte length (:class:`~abi.layout.Text`) or
NUL-padded in a fixed field (:class:`~abi.layout.FixedText`). Amounts use the firmware's
units: bytes, Mbit/s, memory granules (extents), core and lane indices.

Slice identity comes from the authenticated mailbox: a VM's request never names its
owner. Only the administrator's variants (``ALLOCATE_FOR``, ``LIST_FOR``) carry one.
"""

from __future__ import annotations

from typing import Any

import construct as cs

from abi.layout import (
    Choice,
    FixedText,
    Flags,
    FromFlag,
    Layout,
    List,
    Raw,
    Struct,
    Text,
    When,
    derived,
    get,
    u8,
    u16,
    u32,
    u64,
)

#: major << 8 | minor, bumped on any layout change: a new command or enum value is a minor
#: step (1.1: adaptive allocation; 1.2: POOL_COMPOSITIONS; 1.3: adaptive bandwidth), a
#: changed layout a major one
ABI_VERSION = 0x0103

MAX_CORES = 4096  # firmware.slices.MAX_CORES_PER_SLICE
MAX_EXTENTS = 4096  # the inventory's cap on max_extents_per_slice
MAX_PORTS = 64  # crossbar ports (firmware.inventory.MAX_XBAR_PORTS)
MAX_KEYS = 255
NAME_BYTES = 255  # slice names: the firmware allows 64 characters
OWNER_BYTES = 64  # VM ids: 1-64 of [A-Za-z0-9_.-]
REQUEST_ID_BYTES = 128  # the manager's REQUEST_ID_MAX
ENDPOINT_BYTES = 32
MESSAGE_BYTES = 1024
PATH_BYTES = 1024
NONCE_BYTES = 16
KEY_BYTES = 32  # abi.envelope.KEY_BYTES

#: slice lifecycle states (firmware.slices.SliceState values) on the wire
SLICE_STATES = {
    0: "requested",
    1: "reserved",
    2: "programmed",
    3: "active",
    4: "releasing",
    5: "freed",
    6: "error",
}

boolean = Choice(u8, {0: False, 1: True})


def _owner() -> Any:
    return "owner" / Text(OWNER_BYTES) * "the VM that owns the slice(s)"


def _request_id() -> Any:
    return (
        "request_id"
        / Text(REQUEST_ID_BYTES, optional=True)
        * ("idempotency key of the caller's choosing (≤ 128 bytes); 0 length = none")
    )


# ------------------------------------------------------------------ slice specs

_SPEC_FLAGS = Flags(
    2,
    {
        0: "has_cores",
        1: "has_core_ids",
        2: "same_cluster",
        3: "has_memory",
        4: "contiguous",
        5: "has_lanes",
        6: "has_lane_first",
        7: "key_auto",
    },
)


def _spec_flags(c: Any) -> dict[str, bool]:
    cores, memory, lanes = c["cores"], c["memory"], c["lanes"]
    return {
        "has_cores": cores is not None,
        "has_core_ids": get(cores, "ids") is not None,
        "same_cluster": get(cores, "same_cluster") is True,
        "has_memory": memory is not None,
        "contiguous": get(memory, "contiguous") is True,
        "has_lanes": lanes is not None,
        "has_lane_first": get(lanes, "first") is not None,
        "key_auto": c["key"] is None,
    }


#: the fields of a slice spec, shared by requests and slice descriptions
SPEC_FIELDS: tuple[Any, ...] = (
    "_flags" / derived(_SPEC_FLAGS, _spec_flags) * "which parts are present",
    "name" / Text(NAME_BYTES) * "label (the firmware allows 64 characters); may be empty",
    "cores"
    / When(
        "has_cores",
        Struct(
            "count" / u16 * "cores wanted (equal to the number of ids when ids are given)",
            "same_cluster" / FromFlag("same_cluster") * "all in one cluster",
            "ids"
            / When("has_core_ids", List(u16, prefix=2, max_items=MAX_CORES), up=1)
            * "explicit core ids, or None",
        ),
    )
    * "cores, or None",
    "memory"
    / When(
        "has_memory",
        Struct(
            "size" / u64 * "bytes, a multiple of the device granule",
            "contiguous" / FromFlag("contiguous") * "one extent",
        ),
    )
    * "memory, or None",
    "lanes"
    / When(
        "has_lanes",
        Struct(
            "width" / u8 * "link width: 1, 2, 4, 8 or 16",
            "first" / When("has_lane_first", u8, up=1) * "explicit first lane, or None",
            "endpoint"
            / FixedText(ENDPOINT_BYTES, optional=True)
            * "pin to this endpoint (e.g. nvme0), or None (all NUL)",
        ),
    )
    * "PCIe lanes, or None",
    "key" / When("key_auto", u8, invert=True) * "protection key 0..15, or None for auto",
    "ports" / u8 * "crossbar ports the slice's traffic enters by (0..64)",
    "qos"
    / Struct(
        "priority" / u8 * "0 (lowest) .. 7",
        "guaranteed_mbps" / u32 * "admitted guaranteed bandwidth per port, Mbit/s",
        "maximum_mbps" / u32 * "token-bucket limit per port, Mbit/s; 0 = port capacity",
    )
    * "quality of service",
)

ALLOCATE_REQ = Layout(
    "allocate.request",
    *SPEC_FIELDS,
    _request_id(),
    doc="A slice spec without owner: the owner is the authenticated VM.",
)

ALLOCATE_FOR_REQ = Layout(
    "allocate_for.request",
    _owner(),
    *SPEC_FIELDS,
    _request_id(),
    doc="A slice spec with the owner named by the administrator.",
)

# ------------------------------------------------------------------ slice descriptions

_ALLOC_FLAGS = Flags(1, {0: "has_lanes"})

SLICE = Struct(
    "id" / u32 * "slice id (never reused)",
    _owner(),
    "state" / Choice(u8, SLICE_STATES) * "lifecycle state",
    "spec" / Struct(*SPEC_FIELDS) * "what was asked for",
    "alloc"
    / Struct(
        "_flags"
        / derived(_ALLOC_FLAGS, lambda c: {"has_lanes": c["lanes"] is not None})
        * "which parts are present",
        "cores" / List(u16, prefix=2, max_items=MAX_CORES) * "core ids held",
        "extents"
        / List(
            Struct("start" / u64 * "first granule", "length" / u64 * "granules"),
            prefix=2,
            max_items=MAX_EXTENTS,
        )
        * "memory extents held, in granules",
        "lanes"
        / When(
            "has_lanes",
            Struct(
                "port" / u8 * "PCIe port",
                "first" / u8 * "first lane (global index)",
                "width" / u8 * "link width",
            ),
        )
        * "the lane group held, or None",
        "key" / u8 * "protection key held",
        "ports" / List(u8, prefix=1, max_items=MAX_PORTS) * "crossbar ports held",
    )
    * "what is held",
    "granule_bytes" / u64 * "bytes per memory granule (extents × this = bytes)",
)

SLICE_RSP = Layout("slice", *SLICE.subcons, doc="One slice, as the firmware sees it.")

SLICE_REF_REQ = Layout("slice_ref.request", "slice" / u32 * "slice id")

FREE_REQ = Layout("free.request", "slice" / u32 * "slice id", _request_id())

_RESIZE_FLAGS = Flags(
    1,
    {
        0: "has_memory",
        1: "has_cores",
        2: "has_qos",
        3: "has_priority",
        4: "has_guaranteed",
        5: "has_maximum",
    },
)


def _resize_flags(c: Any) -> dict[str, bool]:
    qos = c["qos"]
    return {
        "has_memory": c["memory"] is not None,
        "has_cores": c["cores"] is not None,
        "has_qos": qos is not None,
        "has_priority": get(qos, "priority") is not None,
        "has_guaranteed": get(qos, "guaranteed_mbps") is not None,
        "has_maximum": get(qos, "maximum_mbps") is not None,
    }


RESIZE_REQ = Layout(
    "resize.request",
    "slice" / u32 * "slice id",
    "_flags" / derived(_RESIZE_FLAGS, _resize_flags) * "which targets are present",
    "memory" / When("has_memory", u64) * "new memory size in bytes, or None",
    "cores" / When("has_cores", u16) * "new core count, or None",
    "qos"
    / When(
        "has_qos",
        Struct(
            "priority" / When("has_priority", u8, up=1) * "new priority, or None (keep)",
            "guaranteed_mbps" / When("has_guaranteed", u32, up=1) * "or None (keep)",
            "maximum_mbps" / When("has_maximum", u32, up=1) * "or None (keep)",
        ),
    )
    * "QoS changes, or None",
    _request_id(),
    doc="Absolute targets; what is None keeps its value.",
)

LIST_REQ = Layout(
    "list.request", "start_id" / u32 * "list slices with id >= start_id (0: from the first)"
)

LIST_FOR_REQ = Layout(
    "list_for.request",
    _owner(),
    "start_id" / u32 * "list slices with id >= start_id",
)

LIST_RSP = Layout(
    "list.response",
    "total" / u32 * "slices visible to the caller",
    "next_id" / u32 * "start_id of the next page; 0 when this page is the last",
    "slices" / List(SLICE, prefix=2, max_items=1024) * "as many as fit one payload",
)

# ------------------------------------------------------------------ inventory (C1h)

_ENDPOINT = Struct(
    "name" / FixedText(ENDPOINT_BYTES) * "endpoint name",
    "kind" / FixedText(16) * "e.g. nvme",
    "port" / u8 * "PCIe port",
    "first_lane" / u8 * "first lane (global index)",
    "width" / u8 * "link width",
)

DEVICE_INFO_RSP = Layout(
    "device_info.response",
    "name" / Text(64) * "device name",
    "model" / Text(128) * "device model",
    "abi_version" / u16 * "ABI version: major << 8 | minor",
    "clusters" / List(u8, prefix=1, max_items=64) * "cores per cluster",
    "memory_bytes" / u64 * "device memory",
    "granule_bytes" / u64 * "allocation granule",
    "max_extents_per_slice" / u16 * "extents a non-contiguous slice may have",
    "port_lanes" / List(u8, prefix=1, max_items=16) * "lanes per PCIe port",
    "endpoints" / List(_ENDPOINT, prefix=1, max_items=64) * "devices behind fixed lanes",
    "keys" / u8 * "protection keys",
    "crossbar_ports" / u8 * "crossbar ports",
    "port_mbps" / u32 * "bandwidth of one crossbar port, Mbit/s",
    "data_width_bits" / u16 * "crossbar data width",
    "clock_mhz" / u16 * "crossbar clock",
)

CORES_RSP = Layout(
    "cores.response",
    "clusters" / List(Struct("size" / u8, "free" / u8), prefix=1, max_items=64) * "per cluster",
    "held" / List(u16, prefix=2, max_items=MAX_CORES) * "core ids held by the caller's slices",
)

MEMORY_RSP = Layout(
    "memory.response",
    "memory_bytes" / u64 * "device memory",
    "granule_bytes" / u64 * "allocation granule",
    "free_granules" / u32 * "granules free",
    "largest_free_granules" / u32 * "the largest free extent (the largest contiguous request)",
    "max_extents_per_slice" / u16 * "extents a non-contiguous slice may have",
    "held_granules" / u32 * "granules held by the caller's slices",
)

LANES_RSP = Layout(
    "lanes.response",
    "ports" / List(Struct("lanes" / u8, "free" / u8), prefix=1, max_items=16) * "per port",
    "endpoints"
    / List(Struct(*_ENDPOINT.subcons, "free" / boolean * "no slice holds its lanes"), prefix=1,
           max_items=64)
    * "devices behind fixed lanes",
)  # fmt: skip

KEYS_RSP = Layout(
    "keys.response",
    "total" / u8 * "protection keys",
    "free" / u8 * "keys no VM holds",
    "held" / List(u8, prefix=1, max_items=MAX_KEYS) * "keys held by the caller",
)

PORTS_RSP = Layout(
    "ports.response",
    "total" / u8 * "crossbar ports",
    "free" / u8 * "ports no VM holds",
    "port_mbps" / u32 * "bandwidth of one port, Mbit/s",
    "held"
    / List(
        Struct(
            "port" / u8 * "port index",
            "guaranteed_mbps" / u32 * "sum admitted on this port",
            "maximum_mbps" / u32 * "token-bucket limit programmed",
        ),
        prefix=1,
        max_items=MAX_PORTS,
    )
    * "ports held by the caller",
)

# ------------------------------------------------------------------ authentication (C2h)

HELLO_REQ = Layout(
    "hello.request",
    "client_nonce" / Raw(NONCE_BYTES) * "fresh random bytes, echoed in the response",
)

HELLO_RSP = Layout(
    "hello.response",
    "client_nonce" / Raw(NONCE_BYTES) * "the request's nonce: this answer is fresh",
    "boot_nonce" / Raw(NONCE_BYTES) * "random per firmware start: a change means restart",
    "last_seq" / u64 * "the last sequence number accepted from this VM",
    "abi_version" / u16 * "ABI version: major << 8 | minor",
    "max_payload" / u32 * "the firmware's payload cap in bytes",
    "vm" / Text(OWNER_BYTES) * "the identity this mailbox is bound to",
)

NOP = Layout("nop", "data" / cs.GreedyBytes * "any bytes, echoed back")

# ------------------------------------------------------------------ telemetry (C3h)

PORT_COUNTERS = Struct(
    "port" / u8 * "crossbar port",
    "packets" / u64 * "packets forwarded (CNT_PKTS)",
    "flits" / u64 * "flits forwarded (CNT_FLITS)",
    "drops" / u64 * "packets dropped by the permission table (CNT_DROPS)",
    "stalls" / u64 * "token-bucket stall cycles (CNT_STALLS)",
)

SLICE_TELEMETRY_RSP = Layout(
    "slice_telemetry.response",
    "slice" / u32 * "slice id",
    "state" / Choice(u8, SLICE_STATES) * "lifecycle state",
    "cores" / u16 * "cores held",
    "memory_bytes" / u64 * "memory held",
    "lane_width" / u8 * "link width held (0: none)",
    "ports"
    / List(PORT_COUNTERS, prefix=1, max_items=MAX_PORTS)
    * "counters of the slice's ports (shared by the VM's slices on them)",
)

_USED_TOTAL = Struct("used" / u32, "total" / u32)

UTILISATION = Struct(
    "cores" / _USED_TOTAL * "cores",
    "memory_granules" / _USED_TOTAL * "memory granules",
    "lanes" / _USED_TOTAL * "PCIe lanes",
    "keys" / _USED_TOTAL * "protection keys",
    "ports" / _USED_TOTAL * "crossbar ports",
    "guaranteed_mbps" / _USED_TOTAL * "guaranteed bandwidth over all ports",
)

DEVICE_TELEMETRY_RSP = Layout(
    "device_telemetry.response",
    "slices" / u32 * "live slices",
    "utilisation" / UTILISATION * "used / total per resource",
    "generation" / u32 * "crossbar configuration generation",
    "ports" / List(PORT_COUNTERS, prefix=1, max_items=MAX_PORTS) * "every crossbar port",
)

REPORT_USAGE_REQ = Layout(
    "report_usage.request",
    "slice" / u32 * "slice id",
    "memory_used_bytes" / u64 * "memory the guest uses of the slice (≤ what it holds)",
    "cores_busy_milli" / u32 * "busy time of the slice's cores, in thousandths of a core",
)

REPORT_USAGE_RSP = Layout(
    "report_usage.response",
    "slice" / u32 * "slice id",
    "memory_bytes" / u64 * "memory the slice holds now",
    "cores" / u16 * "cores the slice holds now",
)

# ------------------------------------------------------------------ adaptive allocation

#: what an adaptive policy controls (firmware.adaptive.usage.Resource values; bandwidth in
#: Mbit/s per crossbar port, since ABI 1.3)
ADAPTIVE_RESOURCES = {0: "memory", 1: "cores", 2: "bandwidth"}
#: controller decisions (firmware.adaptive.usage.Action values)
ADAPTIVE_ACTIONS = {
    0: "up",
    1: "down",
    2: "reserve",
    3: "release",
    4: "yield",
    5: "bounds",
    6: "refused",
}
APP_CLASS_BYTES = 32  # firmware.adaptive.policy.APP_CLASS_RE
REASON_BYTES = 160
#: decisions in one ADAPTIVE_DECISIONS answer (what fits the 4 KiB payload cap)
MAX_DECISIONS = 16

ADAPTIVE_POLICY = Layout(
    "adaptive_policy",
    "slice" / u32 * "slice id",
    "resource" / Choice(u8, ADAPTIVE_RESOURCES) * "what the policy controls",
    "enabled" / boolean * "false: opt the slice's resource out (the other fields are ignored)",
    "predictive" / boolean * "also pre-allocate ahead of forecast demand",
    "minimum" / u64 * "never below: bytes (memory), cores, or Mbit/s per port (bandwidth)",
    "maximum" / u64 * "never above: bytes (memory), cores, or Mbit/s per port (bandwidth)",
    "step" / u64 * "the unit of every change: bytes, cores, or Mbit/s",
    "cooldown_s" / u32 * "seconds between two changes; how long use must stay low to shrink",
    "app_class"
    / Text(APP_CLASS_BYTES)
    * "the forecaster's key with the VM; empty: the slice's name, else \"default\"",
)

ADAPTIVE_DECISIONS_REQ = Layout(
    "adaptive_decisions.request",
    "slice" / u32 * "one slice's decisions; 0: every slice the caller may see",
    "after" / u32 * "decisions with a higher id, oldest first; 0: the most recent ones",
)

ADAPTIVE_DECISIONS_RSP = Layout(
    "adaptive_decisions.response",
    "decisions"
    / List(
        Struct(
            "id" / u32 * "decision id (increasing)",
            "at_ms" / u64 * "when, in ms since the epoch",
            "slice" / u32 * "slice id",
            "resource" / Choice(u8, ADAPTIVE_RESOURCES) * "resource",
            "action" / Choice(u8, ADAPTIVE_ACTIONS) * "what was decided",
            "before" / u64 * "allocation before: bytes, cores or Mbit/s",
            "after" / u64 * "allocation after (equal to before when refused)",
            "reason" / Text(REASON_BYTES) * "why, in words (cut to fit)",
        ),
        prefix=1,
        max_items=MAX_DECISIONS,
    )
    * "oldest first",
)

# ------------------------------------------------------------------ pool compositions

#: a composition's or a part's state in a pool (firmware.pool.composer._view): reserved
#: (not programmed yet), active, failed (the device refused it), lost (its device left the
#: pool or restarted)
POOL_STATES = {0: "reserved", 1: "active", 2: "failed", 3: "lost"}
POOL_ID_BYTES = 64  # composition and device ids: firmware.pool.model.DEVICE_ID_RE
#: parts of one composition: firmware.pool.model.MAX_DEVICES_PER_COMPOSITION
MAX_POOL_PARTS = 8
#: local slices of one part: one, plus one per further NVMe endpoint
MAX_PART_SLICES = 32

POOL_COMPOSITIONS_REQ = Layout(
    "pool_compositions.request",
    "start" / u32 * "index of the first composition (by id); 0: from the first",
)

POOL_PART = Struct(
    "device" / Text(POOL_ID_BYTES) * "the device that holds the part",
    "state" / Choice(u8, POOL_STATES) * "the part's state",
    "cores" / u32 * "cores",
    "memory" / u64 * "memory bytes",
    "nvme" / u8 * "NVMe endpoints (lane groups)",
    "slices"
    / List(u32, prefix=1, max_items=MAX_PART_SLICES)
    * "the part's slice ids on its device (active parts; empty otherwise)",
    "reason" / Text(REASON_BYTES) * "why lost or failed, in words (cut to fit); empty otherwise",
)

POOL_COMPOSITIONS_RSP = Layout(
    "pool_compositions.response",
    "total" / u32 * "compositions of the caller in the pool",
    "next" / u32 * "start of the next page; 0 when this page is the last",
    "compositions"
    / List(
        Struct(
            "id" / Text(POOL_ID_BYTES) * "composition id",
            "state"
            / Choice(u8, POOL_STATES)
            * "lost if any part is lost, else failed if any failed, else active if all are",
            "parts" / List(POOL_PART, prefix=1, max_items=MAX_POOL_PARTS) * "one per device",
        ),
        prefix=1,
        max_items=255,
    )
    * "as many as fit one payload",
)

# ------------------------------------------------------------------ admin (C4h)

VM_LIST_REQ = Layout("vm_list.request", "start" / u16 * "index of the first VM (by id)")

VM_LIST_RSP = Layout(
    "vm_list.response",
    "total" / u16 * "provisioned VMs",
    "next" / u16 * "start of the next page; 0 when this page is the last",
    "vms"
    / List(
        Struct(
            "vm" / Text(OWNER_BYTES) * "VM id",
            "mailbox" / Text(PATH_BYTES, prefix=2) * "its mailbox (file or PCI device)",
            "last_seq" / u64 * "last sequence number accepted",
            "slices" / u32 * "live slices it owns",
        ),
        prefix=2,
        max_items=1024,
    )
    * "as many as fit one payload",
)

VM_ADD_REQ = Layout(
    "vm_add.request",
    "vm" / Text(OWNER_BYTES) * "VM id",
    "mailbox" / Text(PATH_BYTES, prefix=2) * "its mailbox (file or PCI device)",
)

VM_ADD_RSP = Layout(
    "vm_add.response",
    "vm" / Text(OWNER_BYTES) * "VM id",
    "key" / Raw(KEY_BYTES) * "its fresh 32-byte key: put it in the credential file",
    "mailbox" / Text(PATH_BYTES, prefix=2) * "its mailbox",
)

VM_REF_REQ = Layout("vm_ref.request", "vm" / Text(OWNER_BYTES) * "VM id")

STATUS_RSP = Layout(
    "status.response",
    "device" / Text(64) * "device name",
    "slices" / u32 * "live slices",
    "utilisation" / UTILISATION * "used / total per resource",
    "fabric"
    / Struct(
        "backend" / Text(32) * "register bus backend (model, cocotb, qemu)",
        "ports" / u8 * "crossbar ports",
        "generation" / u32 * "configuration generation",
        "syncs" / u64 * "fabric syncs",
        "register_writes" / u64 * "register writes",
    )
    * "fabric driver figures",
    "ledger" / Struct("batches" / u64 * "group commits", "records" / u64 * "records") * "ledger",
)

CHECK_RSP = Layout(
    "check.response",
    "violations"
    / List(Text(MESSAGE_BYTES, prefix=2), prefix=2, max_items=1024)
    * "invariant violations found (empty: all hold)",
)

FABRIC_RSP = Layout(
    "fabric.response",
    "backend" / Text(32) * "register bus backend",
    "generation" / u32 * "configuration generation",
    "syncs" / u64 * "fabric syncs",
    "register_writes" / u64 * "register writes",
    "ports"
    / List(
        Struct(
            "permission" / u64 * "PERM_HI:PERM_LO, the outputs this input may reach",
            "weight" / u32 * "WEIGHT register",
            "keys" / u32 * "KEYS register",
            "tb_rate" / u32 * "TB_RATE register",
        ),
        prefix=1,
        max_items=MAX_PORTS,
    )
    * "per input port, as programmed",
)

__all__ = [
    "ABI_VERSION",
    "ADAPTIVE_ACTIONS",
    "ADAPTIVE_DECISIONS_REQ",
    "ADAPTIVE_DECISIONS_RSP",
    "ADAPTIVE_POLICY",
    "ADAPTIVE_RESOURCES",
    "ALLOCATE_FOR_REQ",
    "ALLOCATE_REQ",
    "CHECK_RSP",
    "CORES_RSP",
    "DEVICE_INFO_RSP",
    "DEVICE_TELEMETRY_RSP",
    "FABRIC_RSP",
    "FREE_REQ",
    "HELLO_REQ",
    "HELLO_RSP",
    "KEYS_RSP",
    "LANES_RSP",
    "LIST_FOR_REQ",
    "LIST_REQ",
    "LIST_RSP",
    "MEMORY_RSP",
    "NOP",
    "POOL_COMPOSITIONS_REQ",
    "POOL_COMPOSITIONS_RSP",
    "POOL_PART",
    "POOL_STATES",
    "PORTS_RSP",
    "REPORT_USAGE_REQ",
    "REPORT_USAGE_RSP",
    "RESIZE_REQ",
    "SLICE",
    "SLICE_REF_REQ",
    "SLICE_RSP",
    "SLICE_STATES",
    "SLICE_TELEMETRY_RSP",
    "SPEC_FIELDS",
    "STATUS_RSP",
    "UTILISATION",
    "VM_ADD_REQ",
    "VM_ADD_RSP",
    "VM_LIST_REQ",
    "VM_LIST_RSP",
    "VM_REF_REQ",
    "boolean",
]
