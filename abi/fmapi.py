"""CXL Fabric Manager API payloads that Slicefab implements, byte for byte as in CXL.

Each layout below mirrors a libcxlmi structure in ``src/cxlmi/api-types.h``
(github.com/computexpresslink/libcxlmi), which cites the CXL section; the struct is quoted
in the layout's ``doc``. Field names follow libcxlmi's. Where CXL has a counted list
whose count sits away from the list, the count is a private derived field (``_number_ld``,
``_extent_count``): it is computed from the list on build and never appears in the dicts.

How Slicefab maps the CXL objects (the command docstrings in :mod:`abi.commands` say it
per command):

- an **LD** (logical device) is a VM's isolation domain; **LD id = the VM's protection
  key index**, so 16 keys give up to 16 LDs;
- an LD's **memory allocation** is the memory of that VM's slices (one range: range 2 is
  always 0), in multiples of the memory granularity;
- **QoS allocated bandwidth** is the guaranteed share, **QoS bandwidth limit** the maximum
  share; CXL expresses both as fractions of 256 (:func:`fraction`, :func:`mbps`);
- **Dynamic Capacity add/release** grows/shrinks a slice's memory by extents; the 16-byte
  DC **tag** names the slice (:func:`slice_tag`), the **host id** is the LD id.
"""

from __future__ import annotations

from typing import Any

from abi.errors import DecodeError, EncodeError
from abi.layout import (
    Choice,
    Flags,
    Layout,
    List,
    Raw,
    Struct,
    count,
    derived,
    reserved,
    u8,
    u16,
    u32,
    u64,
)

MiB = 1 << 20
#: Get LD Allocations "Memory Granularity": wire value -> bytes
MEMORY_GRANULARITY = {0: 256 * MiB, 1: 512 * MiB, 2: 1024 * MiB}
#: QoS fractions are in 1/256ths of a port's bandwidth
FRACTION_DENOMINATOR = 256
TAG_BYTES = 16
MAX_LDS = 255  # the LD id and the list counts are one byte


def fraction(mbps: int, capacity_mbps: int) -> int:
    """``mbps`` of a port of ``capacity_mbps`` as a CXL QoS fraction of 256, rounded down
    and saturated at 255 (the largest a byte holds)."""
    if capacity_mbps <= 0:
        raise EncodeError("fraction", "port capacity must be > 0", limit=0)
    return max(0, min(255, mbps * FRACTION_DENOMINATOR // capacity_mbps))


def mbps(fraction_256: int, capacity_mbps: int) -> int:
    """The bandwidth a CXL QoS fraction of 256 stands for on a port of ``capacity_mbps``."""
    return fraction_256 * capacity_mbps // FRACTION_DENOMINATOR


def slice_tag(slice_id: int) -> bytes:
    """The 16-byte DC tag of a slice: its id as u64 little-endian, then 8 zero bytes."""
    if isinstance(slice_id, bool) or not isinstance(slice_id, int) or not 0 <= slice_id < 1 << 64:
        raise EncodeError("tag", f"slice id {slice_id!r} is not a u64")
    return slice_id.to_bytes(8, "little") + bytes(8)


def tag_slice(tag: bytes) -> int:
    """The slice id in a DC tag. Raises :class:`DecodeError` if it is not one of ours."""
    if len(tag) != TAG_BYTES or any(tag[8:]):
        raise DecodeError("tag", "not a Slicefab slice tag", expected="u64 slice id + 8 zero bytes")
    return int.from_bytes(tag[:8], "little")


def _number_ld(list_field: str) -> Any:
    return (
        "_number_ld"
        / derived(u8, lambda c: count(c[list_field]))
        * (f"number of LDs: the length of {list_field}")
    )


EMPTY = Layout("empty", doc="No payload.")

# ------------------------------------------------------------------ 54h: MLD components

GET_LD_INFO_RSP = Layout(
    "get_ld_info.response",
    "memory_size" / u64 * "device memory in bytes (the sum every LD can be given)",
    "ld_count" / u16 * "LDs the device supports: its protection keys",
    "qos_telemetry_capability"
    / Flags(1, {0: "egress_port_congestion", 1: "temporary_throughput_reduction"})
    * "QoS telemetry the device supports",
    doc="""struct cxlmi_cmd_fmapi_get_ld_info_rsp {
    uint64_t memory_size; uint16_t ld_count; uint8_t qos_telemetry_capability; }""",
)

GET_LD_ALLOCATIONS_REQ = Layout(
    "get_ld_allocations.request",
    "start_ld_id" / u8 * "first LD to report",
    "ld_allocation_list_limit" / u8 * "at most this many LDs",
    doc="""struct cxlmi_cmd_fmapi_get_ld_allocations_req {
    uint8_t start_ld_id; uint8_t ld_allocation_list_limit; }""",
)

_LD_ALLOCATION = Struct(
    "range_1_allocation_multiplier" / u64 * "LD memory in units of memory_granularity",
    "range_2_allocation_multiplier" / u64 * "second range: always 0 in Slicefab",
)

GET_LD_ALLOCATIONS_RSP = Layout(
    "get_ld_allocations.response",
    "number_ld" / u8 * "LDs the device has enabled",
    "memory_granularity"
    / Choice(u8, MEMORY_GRANULARITY)
    * "allocation unit in bytes (wire: 0 = 256 MiB, 1 = 512 MiB, 2 = 1 GiB)",
    "start_ld_id" / u8 * "LD id of the first list entry",
    "_list_len" / derived(u8, lambda c: count(c["ld_allocation_list"])) * "entries that follow",
    "ld_allocation_list"
    / List(_LD_ALLOCATION, count_field="_list_len", max_items=MAX_LDS)
    * "one entry per LD from start_ld_id",
    doc="""struct cxlmi_cmd_fmapi_get_ld_allocations_rsp {
    uint8_t number_ld; uint8_t memory_granularity; uint8_t start_ld_id;
    uint8_t ld_allocation_list_len;
    struct { uint64_t range_1_allocation_mult, range_2_allocation_mult; }
        ld_allocation_list[]; }""",
)

SET_LD_ALLOCATIONS = Layout(
    "set_ld_allocations",
    _number_ld("ld_allocation_list"),
    "start_ld_id" / u8 * "LD id of the first list entry",
    "_reserved" / reserved(2),
    "ld_allocation_list"
    / List(_LD_ALLOCATION, count_field="_number_ld", max_items=MAX_LDS)
    * "request: the new allocations; response: what was granted",
    doc="""struct cxlmi_cmd_fmapi_set_ld_allocations_req (and _rsp, same layout) {
    uint8_t number_ld; uint8_t start_ld_id; uint8_t rsvd[2];
    struct cxlmi_cmd_fmapi_ld_allocations_list ld_allocation_list[]; }""",
)

QOS_CONTROL = Layout(
    "qos_control",
    "qos_telemetry_control"
    / Flags(1, {0: "egress_port_congestion_enable", 1: "temporary_throughput_reduction_enable"})
    * "which QoS telemetry is on",
    "egress_moderate_percentage" / u8 * "port utilisation (%) reported as moderate congestion",
    "egress_severe_percentage" / u8 * "port utilisation (%) reported as severe congestion",
    "backpressure_sample_interval" / u8 * "sampling interval of the backpressure average",
    "recmpbasis" / u16 * "ReqCmpBasis: the completion-rate basis",
    "completion_collection_interval" / u8 * "completion collection interval",
    doc="""struct cxlmi_cmd_fmapi_get_qos_control_rsp (= set_qos_control_req = _rsp) {
    uint8_t qos_telemetry_control; uint8_t egress_moderate_percentage;
    uint8_t egress_severe_percentage; uint8_t backpressure_sample_interval;
    uint16_t recmpbasis; uint8_t completion_collection_interval; }""",
)

GET_QOS_STATUS_RSP = Layout(
    "get_qos_status.response",
    "backpressure_avg_percentage" / u8 * "average crossbar port utilisation, percent",
    doc="struct cxlmi_cmd_fmapi_get_qos_status_rsp { uint8_t backpressure_avg_percentage; }",
)

LD_RANGE_REQ = Layout(
    "ld_range.request",
    "number_ld" / u8 * "how many LDs",
    "start_ld_id" / u8 * "from this LD id",
    doc="""struct cxlmi_cmd_fmapi_get_qos_allocated_bw_req (= get_qos_bw_limit_req) {
    uint8_t number_ld; uint8_t start_ld_id; }""",
)

QOS_ALLOCATED_BW = Layout(
    "qos_allocated_bw",
    _number_ld("qos_allocation_fraction"),
    "start_ld_id" / u8 * "LD id of the first fraction",
    "qos_allocation_fraction"
    / List(u8, count_field="_number_ld", max_items=MAX_LDS)
    * "guaranteed share per LD, in 1/256ths of a port",
    doc="""struct cxlmi_cmd_fmapi_get_qos_allocated_bw_rsp
    (= set_qos_allocated_bw_req = _rsp) {
    uint8_t number_ld; uint8_t start_ld_id; uint8_t qos_allocation_fraction[]; }""",
)

QOS_BW_LIMIT = Layout(
    "qos_bw_limit",
    _number_ld("qos_limit_fraction"),
    "start_ld_id" / u8 * "LD id of the first fraction",
    "qos_limit_fraction"
    / List(u8, count_field="_number_ld", max_items=MAX_LDS)
    * "maximum share per LD, in 1/256ths of a port",
    doc="""struct cxlmi_cmd_fmapi_get_qos_bw_limit_rsp (= set_qos_bw_limit_req = _rsp) {
    uint8_t number_ld; uint8_t start_ld_id; uint8_t qos_limit_fraction[]; }""",
)

# ------------------------------------------------------------------ 56h: DCD management

#: the extent of a DC add/release request (CXL: Dynamic Capacity Extent)
DC_EXTENT = Struct(
    "start_dpa" / u64 * "device physical address in bytes: granule index × granule size",
    "length" / u64 * "bytes, a multiple of the granule",
    "tag" / Raw(TAG_BYTES) * "the slice's tag (slice_tag())",
    "shared_seq" / u16 * "shared-extent sequence: 0 (Slicefab shares no extents)",
    "_reserved" / reserved(6),
)

MAX_DC_EXTENTS = 4096  # the inventory's cap on extents per slice

INITIATE_DC_ADD_REQ = Layout(
    "initiate_dc_add.request",
    "host_id" / u16 * "the LD id of the slice's VM",
    "selection_policy"
    / Choice(u8, {0: "free", 1: "contiguous", 2: "prescriptive", 3: "enable_shared_access"})
    * "free/contiguous: the device picks the extents; prescriptive: the extents below",
    "region_number" / u8 * "DC region: always 0 (Slicefab has one memory region)",
    "length" / u64 * "bytes to add (free/contiguous policies)",
    "tag" / Raw(TAG_BYTES) * "the slice to grow (slice_tag())",
    "_extent_count" / derived(u32, lambda c: count(c["extents"])) * "extents that follow",
    "extents"
    / List(DC_EXTENT, count_field="_extent_count", max_items=MAX_DC_EXTENTS)
    * "prescriptive policy: exactly these extents",
    doc="""struct cxlmi_cmd_fmapi_initiate_dc_add_req {
    uint16_t host_id; uint8_t selection_policy; uint8_t region_num; uint64_t length;
    uint8_t tag[0x10]; uint32_t ext_count;
    struct { uint64_t start_dpa; uint64_t len; uint8_t tag[0x10]; uint16_t shared_seq;
             uint8_t rsvd[6]; } extents[]; }""",
)

INITIATE_DC_RELEASE_REQ = Layout(
    "initiate_dc_release.request",
    "host_id" / u16 * "the LD id of the slice's VM",
    "flags"
    / Flags(
        1,
        {4: "forced_removal", 5: "sanitize_on_release"},
        fields={"removal_policy": (0, 4, {0: "tag_based", 1: "prescriptive"})},
    )
    * "bits 3:0 removal policy (0 tag-based, 1 prescriptive), 4 forced, 5 sanitize",
    "_reserved" / reserved(1),
    "length" / u64 * "bytes to release (tag-based policy: from the slice's tail)",
    "tag" / Raw(TAG_BYTES) * "the slice to shrink (slice_tag())",
    "_extent_count" / derived(u32, lambda c: count(c["extents"])) * "extents that follow",
    "extents"
    / List(DC_EXTENT, count_field="_extent_count", max_items=MAX_DC_EXTENTS)
    * "prescriptive policy: exactly these extents",
    doc="""struct cxlmi_cmd_fmapi_initiate_dc_release_req {
    uint16_t host_id; uint8_t flags; uint8_t rsvd; uint64_t length; uint8_t tag[0x10];
    uint32_t ext_count; struct { ... as in initiate_dc_add_req ... } extents[]; }""",
)

__all__ = [
    "DC_EXTENT",
    "EMPTY",
    "FRACTION_DENOMINATOR",
    "GET_LD_ALLOCATIONS_REQ",
    "GET_LD_ALLOCATIONS_RSP",
    "GET_LD_INFO_RSP",
    "GET_QOS_STATUS_RSP",
    "INITIATE_DC_ADD_REQ",
    "INITIATE_DC_RELEASE_REQ",
    "LD_RANGE_REQ",
    "MEMORY_GRANULARITY",
    "QOS_ALLOCATED_BW",
    "QOS_BW_LIMIT",
    "QOS_CONTROL",
    "SET_LD_ALLOCATIONS",
    "fraction",
    "mbps",
    "slice_tag",
    "tag_slice",
]
