"""The CXL Fabric Manager API commands (54h MLD components, 56h DCD management) on slices.

:data:`FMAPI_HANDLERS` maps every FM API command of the opcode table (``abi.commands``) to
its handler; ``firmware.api`` runs them like its own (the pipeline checks the role, parses
the payload and turns the errors raised here into return codes). The layouts are in
``abi.fmapi``; this module says what they mean on a Slicefab device.

**The objects.** An *LD* (logical device) is a VM's isolation domain and **LD id = the
protection key index**: LD *i* exists while key *i* is held by a VM (some live slice of
that VM uses key *i*), so a device has as many LDs as keys. LD *i*'s slices are the slices
that use key *i* — all of them its VM's; a VM normally holds one key, and then LD *i*'s
slices are simply the VM's slices. LD *i*'s **memory** is the sum of its slices' memory.
Its **bandwidth** is per crossbar port, as in the fabric: on each port, the guaranteed
bandwidth of its slices on that port adds up (admission control), and so do their maxima
(the port's token bucket, ``min(capacity, Σ max)``, a slice with no maximum counting as
the capacity). The LD's *allocated bandwidth* and *bandwidth limit* are those sums on its
busiest port, as a fraction of 256 of one port's capacity (``abi.fmapi.fraction``:
rounded down, at most 255). Only slices in the fabric image count (reserved, programmed,
active) and only those with a crossbar port (a slice without one carries no bandwidth).

**Who may read what.** GET_LD_ALLOCATIONS and GET_QOS_ALLOCATED_BW / GET_QOS_BW_LIMIT are
open to VMs; a VM sees only the LDs whose key it holds, and naming any other LD is refused
(*denied*) — the same answer whether another VM holds it or nobody does, so the refusal
tells nothing. Everything else is administrator-only (the opcode table already refuses it
on a VM mailbox; the handlers check again).

**Writes.** Every SET first validates the whole request, then applies it slice by slice
through ``ResourceManager.resize`` (so each change is admitted, durable and programmed
like a RESIZE), the changes that free something first, then the ones that take something.
If one fails, the ones already made are undone in reverse order and the error is raised
(its ``details["not_restored"]`` lists any slice the undo could not restore). The undo
restores sizes and QoS values; a slice whose memory grew by new extents and was shrunk
back may hold different granules than before (its size is what it was). A SET is not
atomic with respect to requests that VMs make meanwhile; each slice change is. **An entry
equal to what the matching GET reports is a no-op**, so a fabric manager may write back a
whole table it read with only some entries changed.

Per command:

``GET_LD_INFO`` (5400h)
    ``memory_size`` = the device's memory, ``ld_count`` = its protection keys. QoS
    telemetry: egress port congestion yes (GET_QOS_STATUS), temporary throughput
    reduction no.
``GET_LD_ALLOCATIONS`` (5401h)
    ``number_ld`` = the device's LDs (keys); ``memory_granularity`` = the smallest of CXL's
    256 MiB / 512 MiB / 1 GiB that is a multiple of the device granule (1 GiB if none is);
    from ``start_ld_id``, at most ``ld_allocation_list_limit`` entries (up to the last LD):
    range 1 = LD memory / granularity **rounded up** (exact sizes: LIST), range 2 = 0. For
    a VM ``start_ld_id`` must be its own LD and the list stops before the first LD that is
    not (the limit is an upper bound).
``SET_LD_ALLOCATIONS`` (5402h)
    For each entry, LD memory := range 1 × granularity (range 2 must be 0). The LD must
    have exactly one slice with memory, which is resized to that total (grown in place
    when the next granules are free, else by new extents; shrunk from the tail); an LD
    with no or several such slices is refused (resize those with RESIZE). The total must
    be ≥ 1 unit (FREE releases a slice's memory) and a multiple of the device granule. The
    response lists the LDs' allocations afterwards (what GET_LD_ALLOCATIONS now reports).
``GET_QOS_CONTROL`` / ``SET_QOS_CONTROL`` (5403h / 5404h)
    Slicefab's QoS is fixed by the crossbar: admission control of guaranteed bandwidth
    and a token bucket per port. The reported control is static: egress port congestion
    on (the crossbar counts token-bucket stall cycles on every input; it cannot be turned
    off), temporary throughput reduction off (not implemented, as GET_LD_INFO says).
    ``recmpbasis`` = 0 (CXL: the completion-counting mechanism is disabled; Slicefab's
    limits are token buckets, not ReqCmpBasis fractions). The egress moderate / severe
    percentages (10, 25), backpressure sample interval (8) and completion collection
    interval (64) are the values CXL gives as defaults; they drive CXL's DevLoad
    indication, which Slicefab's messages do not carry, so they change nothing here.
    SET_QOS_CONTROL accepts exactly these values (and answers them); any other value is
    refused with *invalid* naming the field, rather than stored and silently ignored.
``GET_QOS_STATUS`` (5405h)
    ``backpressure_avg_percentage`` = the share of the crossbar's busy input cycles that
    were stalled by token buckets: ``100 × Σ CNT_STALLS / (Σ CNT_FLITS + Σ CNT_STALLS)``
    over every port, rounded down, 0 with no traffic; the counters run from the last
    counter clear.
``GET_QOS_ALLOCATED_BW`` / ``SET_QOS_ALLOCATED_BW`` (5406h / 5407h)
    GET: each LD's guaranteed bandwidth on its busiest port as a fraction (0 for an LD
    with no slice on a port, or no VM). SET: the LD's guarantees are scaled so that its
    busiest port's guarantee becomes the smallest bandwidth that reads back as the
    fraction, ``⌈f × capacity / 256⌉``: each slice keeps its share of the guarantee
    (slices that all guarantee nothing share it equally; a slice that guarantees nothing
    next to one that does keeps nothing), rounded up per slice. Refused if a slice's new
    guarantee would exceed its maximum (raise the limit first), or if rounding would make
    the LD read back another fraction; admission (a port's guarantees within its
    capacity) is the allocator's, as for a RESIZE.
``GET_QOS_BW_LIMIT`` / ``SET_QOS_BW_LIMIT`` (5408h / 5409h)
    GET: each LD's token-bucket limit on its busiest port as a fraction (a slice with no
    maximum counts as the capacity, so such an LD reads 255; an LD with no slice on a
    port, or no VM, reads 0). SET 255: every slice of the LD loses its maximum (the port's
    capacity). SET f in 1..254: every slice's maximum becomes ``⌈⌈f × capacity / 256⌉ /
    n⌉``, n the most slices of the LD on one port, so the busiest port's bucket reads back
    f. Refused: 0 (it would stop the LD's traffic), a limit below a slice's guarantee
    (lower the allocated bandwidth first), an LD with no slice on a port.
``INITIATE_DC_ADD`` (5604h)
    Grows the slice named by ``tag`` (``abi.fmapi.slice_tag``; a tag that is not one is
    *invalid*, an unknown slice *not_found*) by ``length`` bytes; ``host_id`` must be the
    slice's LD, ``region_number`` 0. Selection policies: *free* — as a RESIZE grows
    (in place when the next granules are free, else new extents; a contiguous slice only
    in place); *contiguous* — the added capacity is one extent: in place, or the best-fit
    free extent (refused as *insufficient* when no free extent is long enough, or, for a
    contiguous slice, when the granules right after it are not free); *prescriptive* —
    only the extent that continues the slice's last extent (``start_dpa`` = its end) is
    honoured, since the allocator places every other growth itself (*conflict* when those
    granules are held); ``length`` must then be 0 or the extents' total. If a concurrent
    allocation took the promised granules between the check and the resize, the growth
    is undone and refused as *conflict*. *enable_shared_access* is refused:
    Slicefab shares no extents. Lengths and DPAs are multiples of the granule; extents
    carry the request's tag and ``shared_seq`` 0; the extent list must be empty for the
    other policies. The response is empty (success: the slice has grown).
``INITIATE_DC_RELEASE`` (5605h)
    Shrinks the slice named by ``tag`` (``host_id`` its LD) from its tail, as a RESIZE
    does. *tag_based*: by ``length`` bytes; *prescriptive*: by exactly the given extents,
    which must be the slice's last granules by address (``length`` 0 or their total). A
    slice keeps at least one granule (FREE releases all). *forced_removal* changes
    nothing: the VM is never asked, as for an administrator's RESIZE. *sanitize_on_release*
    is honoured trivially: the emulated device keeps no data in the granules it hands out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from abi.errors import DecodeError
from abi.fmapi import FRACTION_DENOMINATOR, MEMORY_GRANULARITY, fraction, tag_slice
from firmware.errors import (
    FabricError,
    InsufficientResources,
    NotFound,
    PermissionDenied,
    RequestError,
    ResourceConflict,
    SlicefabError,
)
from firmware.manager import ADMIN
from firmware.resources.memory import Extent
from firmware.slices import QoS, ResizeSpec

if TYPE_CHECKING:  # no runtime import of firmware.api: it imports this module at its end
    from firmware.api import Api, Channel, Handler
    from firmware.inventory import Device

#: slice states that are in the fabric image (their QoS counts on their ports)
_IN_IMAGE = frozenset({"reserved", "programmed", "active"})
#: the largest fraction a byte holds; as a limit it means "no maximum"
_FULL = 255

#: the static QoS control (GET_QOS_CONTROL), the only values SET_QOS_CONTROL accepts
QOS_CONTROL: Mapping[str, Any] = {
    "qos_telemetry_control": {
        "egress_port_congestion_enable": True,
        "temporary_throughput_reduction_enable": False,
    },
    "egress_moderate_percentage": 10,
    "egress_severe_percentage": 25,
    "backpressure_sample_interval": 8,
    "recmpbasis": 0,
    "completion_collection_interval": 64,
}

_QOS_CONTROL_WHY = {
    "qos_telemetry_control.egress_port_congestion_enable": "the crossbar always counts "
    "token-bucket stalls (GET_QOS_STATUS); it cannot be turned off",
    "qos_telemetry_control.temporary_throughput_reduction_enable": "temporary throughput "
    "reduction is not implemented (GET_LD_INFO reports no such capability)",
    "recmpbasis": "bandwidth limits are per-port token buckets (SET_QOS_BW_LIMIT), not "
    "fractions of a completion-rate basis",
}
_DEVLOAD_WHY = "it tunes CXL's DevLoad indication, which Slicefab's messages do not carry"


# ------------------------------------------------------------------ the LD table


@dataclass(frozen=True)
class _Ld:
    """One LD as seen by a caller: its id, the VM holding its key, and its slices."""

    id: int
    vm: str | None
    slices: tuple[dict[str, Any], ...]

    def memory_granules(self) -> int:
        return sum(n for v in self.slices for _, n in v["alloc"]["extents"])

    def carriers(self) -> list[dict[str, Any]]:
        """The slices whose QoS the fabric enforces: in the image, on a crossbar port."""
        return [v for v in self.slices if v["state"] in _IN_IMAGE and v["alloc"]["ports"]]

    def memory_slices(self) -> list[dict[str, Any]]:
        return [v for v in self.slices if v["spec"].get("memory") is not None]


def _caller(channel: Channel) -> str | None:
    return ADMIN if channel.vm is None else channel.vm


def _lds(api: Api, channel: Channel) -> list[_Ld]:
    """Every LD of the device, from one consistent snapshot of the caller's slices (a VM
    sees its own slices only, so every other LD looks unheld to it)."""
    by_key: list[list[dict[str, Any]]] = [[] for _ in range(api.manager.device.keys)]
    for view in api.manager.list_slices(caller=_caller(channel)):
        by_key[view["alloc"]["key"]].append(view)
    return [
        _Ld(i, views[0]["owner"] if views else None, tuple(views)) for i, views in enumerate(by_key)
    ]


def _admin_only(channel: Channel, command: str) -> None:
    if channel.vm is not None:
        raise PermissionDenied(f"{command} is an administrator command", caller=channel.vm)


def _check_readable(channel: Channel, ld: _Ld, field: str) -> None:
    if channel.vm is not None and ld.vm != channel.vm:
        raise PermissionDenied(
            f"LD {ld.id} is not {channel.vm}'s; a VM reads only the LDs of its own keys",
            field=field,
            ld=ld.id,
            caller=channel.vm,
        )


def _check_range(device: Device, start: int, count: int, count_field: str) -> range:
    last = device.keys - 1
    if start > last:
        raise RequestError(
            "start_ld_id", f"no LD {start}: LDs are 0..{last} (one per protection key)", limit=last
        )
    if start + count > device.keys:
        raise RequestError(
            count_field,
            f"{count} LDs from LD {start} run past the last LD ({last})",
            limit=device.keys - start,
        )
    return range(start, start + count)


# ------------------------------------------------------------------ bandwidth arithmetic


def _capacity(api: Api) -> int:
    return api.manager.device.crossbar.port_mbps


def _at_least(fraction_256: int, capacity: int) -> int:
    """The smallest bandwidth that reads back as ``fraction_256`` (``fraction`` rounds down)."""
    return -(-fraction_256 * capacity // FRACTION_DENOMINATOR)


def _port_sums(
    slices: Iterable[dict[str, Any]], value: Callable[[dict[str, Any]], int]
) -> dict[int, int]:
    sums: dict[int, int] = {}
    for v in slices:
        for port in v["alloc"]["ports"]:
            sums[port] = sums.get(port, 0) + value(v)
    return sums


def _guaranteed(v: Mapping[str, Any]) -> int:
    return int(v["spec"]["qos"]["guaranteed"])


def _maximum(v: Mapping[str, Any]) -> int:
    return int(v["spec"]["qos"]["maximum"])


def _allocated_fraction(
    carriers: Sequence[dict[str, Any]], capacity: int, guaranteed: Mapping[int, int] | None = None
) -> int:
    """The LD's allocated-bandwidth fraction (with ``guaranteed``: slice id -> a planned
    guarantee in place of the current one)."""
    g = guaranteed or {}
    sums = _port_sums(carriers, lambda v: g.get(v["id"], _guaranteed(v)))
    return fraction(max(sums.values(), default=0), capacity)


def _limit_fraction(
    carriers: Sequence[dict[str, Any]], capacity: int, maxima: Mapping[int, int] | None = None
) -> int:
    """The LD's bandwidth-limit fraction: its busiest token bucket, ``min(capacity, Σ max)``
    with no maximum counting as the capacity (with ``maxima``: planned maxima)."""
    m = maxima or {}
    sums = _port_sums(carriers, lambda v: m.get(v["id"], _maximum(v)) or capacity)
    return fraction(min(capacity, max(sums.values(), default=0)), capacity)


# ------------------------------------------------------------------ applying changes


@dataclass(frozen=True)
class _Change:
    """One slice resize of a SET, with the resize that undoes it."""

    slice: int
    do: ResizeSpec
    undo: ResizeSpec
    takes: bool  # it takes resources (memory, guaranteed bandwidth): applied after the rest


def _apply(api: Api, changes: Sequence[_Change]) -> None:
    """Apply every change or none: on an error, undo the ones made (in reverse) and raise.

    A resize that fails with FabricError stays recorded (the crossbar gets it at the next
    successful sync), so it is undone too; an undo that fails that way is recorded as well.
    """
    done: list[_Change] = []
    try:
        for c in sorted(changes, key=lambda c: c.takes):  # stable: frees first
            try:
                api.manager.resize(c.slice, c.do, caller=ADMIN)
            except FabricError:
                done.append(c)
                raise
            done.append(c)
    except SlicefabError as e:
        not_restored = []
        for c in reversed(done):
            try:
                api.manager.resize(c.slice, c.undo, caller=ADMIN)
            except FabricError:
                pass  # the undo is recorded; the crossbar gets it at the next sync
            except SlicefabError:
                not_restored.append(c.slice)
        if not_restored:
            e.details["not_restored"] = not_restored
        raise


# ------------------------------------------------------------------ 54h: LD info, allocations


def _granularity(device: Device) -> int:
    """The smallest CXL allocation unit that is a whole number of granules (else 1 GiB)."""
    units = sorted(MEMORY_GRANULARITY.values())
    return next((u for u in units if u % device.granule_bytes == 0), units[-1])


def _allocation(ld: _Ld, device: Device) -> dict[str, int]:
    unit = _granularity(device)
    size = ld.memory_granules() * device.granule_bytes
    return {"range_1_allocation_multiplier": -(-size // unit), "range_2_allocation_multiplier": 0}


def get_ld_info(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """GET_LD_INFO (5400h): the device's memory and LD count (administrator)."""
    _admin_only(channel, "GET_LD_INFO")
    device = api.manager.device
    return {
        "memory_size": device.memory_bytes,
        "ld_count": device.keys,
        "qos_telemetry_capability": {
            "egress_port_congestion": True,
            "temporary_throughput_reduction": False,
        },
    }


def get_ld_allocations(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """GET_LD_ALLOCATIONS (5401h): each LD's memory in units of the granularity."""
    device = api.manager.device
    start, limit = payload["start_ld_id"], payload["ld_allocation_list_limit"]
    _check_range(device, start, 0, "ld_allocation_list_limit")
    lds = _lds(api, channel)
    _check_readable(channel, lds[start], "start_ld_id")
    ids = range(start, min(device.keys, start + limit))
    if channel.vm is not None:  # the limit is an upper bound: stop before another's LD
        ids = range(start, next((i for i in ids if lds[i].vm != channel.vm), ids.stop))
    return {
        "number_ld": device.keys,
        "memory_granularity": _granularity(device),
        "start_ld_id": start,
        "ld_allocation_list": [_allocation(lds[i], device) for i in ids],
    }


def set_ld_allocations(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """SET_LD_ALLOCATIONS (5402h): resize each LD's one memory slice to the given total."""
    _admin_only(channel, "SET_LD_ALLOCATIONS")
    device = api.manager.device
    start, entries = payload["start_ld_id"], payload["ld_allocation_list"]
    ids = _check_range(device, start, len(entries), "ld_allocation_list")
    unit = _granularity(device)
    lds = _lds(api, channel)
    changes: list[_Change] = []
    for pos, (i, entry) in enumerate(zip(ids, entries, strict=True)):
        field = f"ld_allocation_list[{pos}]"
        ld = lds[i]
        if entry["range_2_allocation_multiplier"] != 0:
            raise RequestError(
                f"{field}.range_2_allocation_multiplier",
                "must be 0: an LD's memory is one range",
                expected=0,
            )
        multiplier = entry["range_1_allocation_multiplier"]
        if multiplier == _allocation(ld, device)["range_1_allocation_multiplier"]:
            continue  # what GET_LD_ALLOCATIONS reports: nothing to change
        mfield = f"{field}.range_1_allocation_multiplier"
        if ld.vm is None:
            raise NotFound(
                f"LD {i} has no memory to set: no VM holds key {i} (allocate a slice first)",
                field=mfield,
                ld=i,
            )
        if multiplier == 0:
            raise RequestError(mfield, "must be >= 1: FREE the slice to release all its memory")
        target = multiplier * unit
        if target % device.granule_bytes:
            raise RequestError(
                mfield,
                f"{multiplier} × {unit} bytes is not a multiple of the device granule "
                f"({device.granule_bytes} bytes)",
                expected=f"a multiple of {device.granule_bytes} bytes",
            )
        if target > device.memory_bytes:
            raise RequestError(
                mfield,
                f"{target} bytes exceeds the device's memory ({device.memory_bytes} bytes)",
                limit=device.memory_bytes // unit,
            )
        memory = ld.memory_slices()
        if len(memory) != 1:
            raise RequestError(
                field,
                f"LD {i} ({ld.vm}) has {len(memory)} slices with memory; Set LD Allocations "
                "resizes an LD with exactly one (resize the others with RESIZE)",
                slices=[v["id"] for v in memory],
            )
        (view,) = memory
        current = sum(length for _, length in view["alloc"]["extents"]) * device.granule_bytes
        if target != current:
            changes.append(
                _Change(
                    view["id"], ResizeSpec(memory=target), ResizeSpec(memory=current),
                    takes=target > current,
                )
            )  # fmt: skip
    _check_memory_available(api, changes)
    _apply(api, changes)
    after = _lds(api, channel)
    return {
        "start_ld_id": start,
        "ld_allocation_list": [_allocation(after[i], device) for i in ids],
    }


def _check_memory_available(api: Api, changes: Sequence[_Change]) -> None:
    """Refuse up front a set of memory changes that needs more than is free."""
    net = sum((c.do.memory or 0) - (c.undo.memory or 0) for c in changes)
    free = api.manager.allocator.memory.free_granules * api.manager.device.granule_bytes
    if net > free:
        raise InsufficientResources("memory", net, free, "bytes", "the LDs would grow by more")


# ------------------------------------------------------------------ 54h: QoS


def get_qos_control(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """GET_QOS_CONTROL (5403h): the crossbar's static QoS telemetry control."""
    _admin_only(channel, "GET_QOS_CONTROL")
    return _qos_control()


def _qos_control() -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in QOS_CONTROL.items()}


def set_qos_control(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """SET_QOS_CONTROL (5404h): accepted only as the static values (a no-op)."""
    _admin_only(channel, "SET_QOS_CONTROL")
    fixed = _qos_control()
    flat: list[tuple[str, Any, Any]] = []
    for key, value in fixed.items():
        if isinstance(value, dict):
            flat += [(f"{key}.{k}", v, payload[key][k]) for k, v in value.items()]
        else:
            flat.append((key, value, payload[key]))
    for field, value, asked in flat:
        if asked != value:
            why = _QOS_CONTROL_WHY.get(field, _DEVLOAD_WHY)
            raise RequestError(
                field, f"fixed at {value!r} on this device: {why}", expected=value, got=asked
            )
    return fixed


def get_qos_status(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """GET_QOS_STATUS (5405h): the share of busy input cycles stalled by token buckets."""
    _admin_only(channel, "GET_QOS_STATUS")
    counters = [
        api.manager.fabric.port_counters(p) for p in range(api.manager.device.crossbar.ports)
    ]
    flits = sum(c["flits"] for c in counters)
    stalls = sum(c["stalls"] for c in counters)
    busy = flits + stalls
    return {"backpressure_avg_percentage": 100 * stalls // busy if busy else 0}


def _read_fractions(
    api: Api, channel: Channel, payload: Mapping[str, Any], value: Callable[[_Ld], int]
) -> tuple[int, list[int]]:
    ids = _check_range(
        api.manager.device, payload["start_ld_id"], payload["number_ld"], "number_ld"
    )
    lds = _lds(api, channel)
    for i in ids:
        _check_readable(channel, lds[i], "start_ld_id" if i == ids.start else "number_ld")
    return ids.start, [value(lds[i]) for i in ids]


def get_qos_allocated_bw(
    api: Api, channel: Channel, payload: Mapping[str, Any]
) -> Mapping[str, Any]:
    """GET_QOS_ALLOCATED_BW (5406h): each LD's guarantee on its busiest port, /256."""
    cap = _capacity(api)
    start, fractions = _read_fractions(
        api, channel, payload, lambda ld: _allocated_fraction(ld.carriers(), cap)
    )
    return {"start_ld_id": start, "qos_allocation_fraction": fractions}


def get_qos_bw_limit(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """GET_QOS_BW_LIMIT (5408h): each LD's token-bucket limit on its busiest port, /256."""
    cap = _capacity(api)
    start, fractions = _read_fractions(
        api, channel, payload, lambda ld: _limit_fraction(ld.carriers(), cap)
    )
    return {"start_ld_id": start, "qos_limit_fraction": fractions}


def _qos_targets(
    api: Api, channel: Channel, payload: Mapping[str, Any], list_field: str
) -> list[tuple[_Ld, int, str]]:
    """``(LD, wanted fraction, field)`` for each entry of a SET QoS request."""
    fractions = payload[list_field]
    ids = _check_range(api.manager.device, payload["start_ld_id"], len(fractions), list_field)
    lds = _lds(api, channel)
    return [
        (lds[i], f, f"{list_field}[{n}]")
        for n, (i, f) in enumerate(zip(ids, fractions, strict=True))
    ]


def _need_carriers(ld: _Ld, field: str) -> list[dict[str, Any]]:
    if ld.vm is None:
        raise NotFound(f"no VM holds LD {ld.id} (key {ld.id})", field=field, ld=ld.id)
    carriers = ld.carriers()
    if not carriers:
        raise RequestError(
            field, f"LD {ld.id} ({ld.vm}) has no slice on a crossbar port to carry bandwidth"
        )
    return carriers


def _plan_guaranteed(ld: _Ld, wanted: int, field: str, cap: int) -> list[_Change]:
    carriers = _need_carriers(ld, field)
    target = _at_least(wanted, cap)
    weight = {v["id"]: _guaranteed(v) for v in carriers}
    if not any(weight.values()):
        weight = dict.fromkeys(weight, 1)  # nothing guaranteed yet: an equal share each
    heaviest = max(_port_sums(carriers, lambda v: weight[v["id"]]).values())
    new = {sid: -(-target * w // heaviest) for sid, w in weight.items()}
    for v in carriers:
        if _maximum(v) and new[v["id"]] > _maximum(v):
            raise RequestError(
                field,
                f"LD {ld.id}: slice {v['id']} would guarantee {new[v['id']]} Mbit/s, above its "
                f"maximum of {_maximum(v)} Mbit/s (raise the LD's limit first: SET_QOS_BW_LIMIT)",
                slice=v["id"],
            )
    if _allocated_fraction(carriers, cap, new) != wanted:
        raise RequestError(
            field,
            f"LD {ld.id}: {wanted}/256 cannot be spread over its {len(carriers)} slices "
            "without rounding it to another fraction",
        )
    return [
        _Change(
            v["id"],
            ResizeSpec(qos=QoS(-1, new[v["id"]], -1)),
            ResizeSpec(qos=QoS(-1, _guaranteed(v), -1)),
            takes=new[v["id"]] > _guaranteed(v),
        )
        for v in carriers
        if new[v["id"]] != _guaranteed(v)
    ]


def _plan_limit(ld: _Ld, wanted: int, field: str, cap: int) -> list[_Change]:
    carriers = _need_carriers(ld, field)
    if wanted == 0:
        raise RequestError(
            field, "0 would stop the LD's traffic: the smallest limit is 1/256 of a port", limit=1
        )
    if wanted == _FULL:
        maximum = 0  # no maximum: the port's capacity
    else:
        crowd = max(_port_sums(carriers, lambda v: 1).values())
        maximum = -(-_at_least(wanted, cap) // crowd)
        for v in carriers:
            if _guaranteed(v) > maximum:
                raise RequestError(
                    field,
                    f"LD {ld.id}: a maximum of {maximum} Mbit/s per slice is below slice "
                    f"{v['id']}'s guarantee of {_guaranteed(v)} Mbit/s (lower the allocated "
                    "bandwidth first: SET_QOS_ALLOCATED_BW)",
                    slice=v["id"],
                )
    new = {v["id"]: maximum for v in carriers}
    if _limit_fraction(carriers, cap, new) != wanted:
        raise RequestError(
            field,
            f"LD {ld.id}: {wanted}/256 cannot be set on its {len(carriers)} slices without "
            "rounding it to another fraction",
        )
    return [
        _Change(
            v["id"],
            ResizeSpec(qos=QoS(-1, -1, maximum)),
            ResizeSpec(qos=QoS(-1, -1, _maximum(v))),
            takes=False,
        )
        for v in carriers
        if _maximum(v) != maximum
    ]


def set_qos_allocated_bw(
    api: Api, channel: Channel, payload: Mapping[str, Any]
) -> Mapping[str, Any]:
    """SET_QOS_ALLOCATED_BW (5407h): scale each LD's guarantees to the fraction."""
    _admin_only(channel, "SET_QOS_ALLOCATED_BW")
    cap = _capacity(api)
    changes: list[_Change] = []
    for ld, wanted, field in _qos_targets(api, channel, payload, "qos_allocation_fraction"):
        if wanted != _allocated_fraction(ld.carriers(), cap):
            changes += _plan_guaranteed(ld, wanted, field, cap)
    _apply(api, changes)
    return get_qos_allocated_bw(
        api, channel, {"start_ld_id": payload["start_ld_id"],
                       "number_ld": len(payload["qos_allocation_fraction"])}
    )  # fmt: skip


def set_qos_bw_limit(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """SET_QOS_BW_LIMIT (5409h): set each LD's slices' maxima to the fraction."""
    _admin_only(channel, "SET_QOS_BW_LIMIT")
    cap = _capacity(api)
    changes: list[_Change] = []
    for ld, wanted, field in _qos_targets(api, channel, payload, "qos_limit_fraction"):
        if wanted != _limit_fraction(ld.carriers(), cap):
            changes += _plan_limit(ld, wanted, field, cap)
    _apply(api, changes)
    return get_qos_bw_limit(
        api, channel, {"start_ld_id": payload["start_ld_id"],
                       "number_ld": len(payload["qos_limit_fraction"])}
    )  # fmt: skip


# ------------------------------------------------------------------ 56h: Dynamic Capacity

_Run = tuple[int, int]  # (first granule, granules)


def _normalise(runs: Iterable[_Run]) -> list[_Run]:
    """Sorted, adjacent runs merged (overlaps are checked by the caller)."""
    out: list[_Run] = []
    for start, n in sorted(runs):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out


def _subtract(have: Iterable[_Run], had: Iterable[_Run]) -> list[_Run]:
    """The granules of ``have`` not in ``had`` (``had`` ⊆ ``have`` after a growth)."""
    gone = _normalise(had)
    out: list[_Run] = []
    for start, n in _normalise(have):
        cursor, end = start, start + n
        for s, m in gone:
            if s + m <= cursor or s >= end:
                continue
            if s > cursor:
                out.append((cursor, s - cursor))
            cursor = max(cursor, s + m)
        if cursor < end:
            out.append((cursor, end - cursor))
    return out


def _tail(extents: Iterable[_Run], granules: int) -> list[_Run]:
    """The last ``granules`` granules by address: what a shrink gives back."""
    out: list[_Run] = []
    left = granules
    for start, n in sorted(extents, reverse=True):
        if left <= 0:
            break
        take = min(n, left)
        out.append((start + n - take, take))
        left -= take
    return _normalise(out)


@dataclass(frozen=True)
class _DcTarget:
    view: dict[str, Any]
    extents: list[_Run]  # the slice's extents now, in granules

    @property
    def id(self) -> int:
        return int(self.view["id"])

    @property
    def granules(self) -> int:
        return sum(n for _, n in self.extents)


def _dc_target(api: Api, channel: Channel, payload: Mapping[str, Any]) -> _DcTarget:
    """The slice a DC request names (by tag), checked against ``host_id``."""
    try:
        sid = tag_slice(payload["tag"])
    except DecodeError as e:
        raise RequestError("tag", e.message, expected=e.expected) from None
    view = api.manager.get(sid, caller=_caller(channel))
    if payload["host_id"] != view["alloc"]["key"]:
        raise RequestError(
            "host_id",
            f"slice {sid} is in LD {view['alloc']['key']}, not LD {payload['host_id']}",
            expected=view["alloc"]["key"],
        )
    if view["spec"].get("memory") is None:
        raise RequestError("tag", f"slice {sid} has no memory (it was allocated without)")
    return _DcTarget(view, [(s, n) for s, n in view["alloc"]["extents"]])


def _granules(api: Api, field: str, nbytes: int, *, positive: bool = True) -> int:
    g = api.manager.device.granule_bytes
    if nbytes % g or (positive and nbytes <= 0):
        what = "a positive multiple" if positive else "a multiple"
        raise RequestError(
            field,
            f"{nbytes} bytes is not {what} of the {g}-byte granule",
            expected=f"{what} of {g}",
        )
    return nbytes // g


def _dc_extents(api: Api, payload: Mapping[str, Any], prescriptive: bool) -> list[_Run]:
    """The request's extents in granules (normalised), or [] when the policy takes none."""
    extents = payload["extents"]
    if not prescriptive:
        if extents:
            raise RequestError("extents", "extents are given only with the prescriptive policy")
        return []
    if not extents:
        raise RequestError("extents", "the prescriptive policy needs at least one extent")
    total = api.manager.device.granules
    runs: list[_Run] = []
    for n, e in enumerate(extents):
        field = f"extents[{n}]"
        start = _granules(api, f"{field}.start_dpa", e["start_dpa"], positive=False)
        length = _granules(api, f"{field}.length", e["length"])
        if start + length > total:
            raise RequestError(
                f"{field}.start_dpa",
                "the extent runs past the end of the device's memory",
                limit=api.manager.device.memory_bytes,
            )
        if e["tag"] != payload["tag"]:
            raise RequestError(f"{field}.tag", "must be the request's tag (the slice's)")
        if e["shared_seq"] != 0:
            raise RequestError(f"{field}.shared_seq", "must be 0: Slicefab shares no extents")
        runs.append((start, length))
    merged = _normalise(runs)
    if sum(n for _, n in merged) != sum(n for _, n in runs) or any(
        a[0] + a[1] > b[0] for a, b in pairwise(merged)
    ):
        raise RequestError("extents", "the extents overlap")
    length = payload["length"]
    wanted = sum(n for _, n in runs) * api.manager.device.granule_bytes
    if length not in (0, wanted):
        raise RequestError(
            "length", f"{length} bytes disagrees with the extents' {wanted}", expected=wanted
        )
    return merged


def _describe(runs: Iterable[_Run], granule: int) -> str:
    return ", ".join(f"[DPA {s * granule:#x}, {n * granule} bytes]" for s, n in runs)


def initiate_dc_add(api: Api, channel: Channel, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """INITIATE_DC_ADD (5604h): grow the tagged slice's memory by extents."""
    _admin_only(channel, "INITIATE_DC_ADD")
    if payload["region_number"] != 0:
        raise RequestError("region_number", "Slicefab has one DC region: 0", expected=0)
    policy = payload["selection_policy"]
    if policy not in ("free", "contiguous", "prescriptive"):
        raise RequestError(
            "selection_policy",
            f"{policy!r} is not supported: Slicefab shares no extents",
            expected=["free", "contiguous", "prescriptive"],
        )
    runs = _dc_extents(api, payload, policy == "prescriptive")
    target = _dc_target(api, channel, payload)
    device = api.manager.device
    grow = sum(n for _, n in runs) if runs else _granules(api, "length", payload["length"])
    last_start, last_len = max(target.extents)
    after_last = (last_start + last_len, grow)
    memory = api.manager.allocator.memory
    in_place = after_last[0] + grow <= device.granules and memory.is_free(Extent(*after_last))
    if policy == "prescriptive":
        if runs != [after_last]:
            raise RequestError(
                "extents",
                "Slicefab places a slice's growth itself; the one prescriptive extent it "
                f"honours continues slice {target.id}'s last extent: "
                f"{_describe([after_last], device.granule_bytes)}",
            )
        if not in_place:
            raise ResourceConflict(
                f"memory: {_describe(runs, device.granule_bytes)} is not free",
                field="extents",
            )
    if policy == "contiguous" and not in_place:
        if target.view["spec"]["memory"]["contiguous"]:
            raise InsufficientResources(
                "memory", grow, 0, "granules",
                f"slice {target.id} is contiguous, so it grows only in place, and the "
                "granules right after it are not free", field="length",
            )  # fmt: skip
        if memory.largest_free < grow:
            raise InsufficientResources(
                "memory", grow, memory.largest_free, "granules",
                "no free extent is that long", field="length",
            )  # fmt: skip
    before = target.granules * device.granule_bytes
    change = _Change(
        target.id,
        ResizeSpec(memory=before + grow * device.granule_bytes),
        ResizeSpec(memory=before),
        takes=True,
    )
    _apply(api, [change])
    if policy != "free":  # check the placement promised (a concurrent request may race us)
        now = api.manager.get(target.id, caller=ADMIN)["alloc"]["extents"]
        added = _subtract([(s, n) for s, n in now], target.extents)
        if len(added) != 1 or (runs and added != runs):
            _apply(api, [_Change(target.id, change.undo, change.do, takes=False)])
            raise ResourceConflict(
                f"slice {target.id} grew by {_describe(added, device.granule_bytes)} instead "
                "(a concurrent request took the memory); undone, retry",
                field="extents" if runs else "length",
            )
    return {}


def initiate_dc_release(
    api: Api, channel: Channel, payload: Mapping[str, Any]
) -> Mapping[str, Any]:
    """INITIATE_DC_RELEASE (5605h): shrink the tagged slice's memory from its tail."""
    _admin_only(channel, "INITIATE_DC_RELEASE")
    flags = payload["flags"]
    policy = flags["removal_policy"]
    if policy not in ("tag_based", "prescriptive"):
        raise RequestError(
            "flags.removal_policy", f"{policy!r} is not supported",
            expected=["tag_based", "prescriptive"],
        )  # fmt: skip
    runs = _dc_extents(api, payload, policy == "prescriptive")
    target = _dc_target(api, channel, payload)
    device = api.manager.device
    shrink = sum(n for _, n in runs) if runs else _granules(api, "length", payload["length"])
    if shrink >= target.granules:
        raise RequestError(
            "extents" if runs else "length",
            f"slice {target.id} has {target.granules * device.granule_bytes} bytes; a release "
            "leaves at least one granule (FREE releases the whole slice)",
            limit=(target.granules - 1) * device.granule_bytes,
        )
    tail = _tail(target.extents, shrink)
    if runs and runs != tail:
        raise RequestError(
            "extents",
            f"a slice shrinks from its tail: the prescriptive release Slicefab honours for "
            f"{shrink} granules of slice {target.id} is {_describe(tail, device.granule_bytes)}",
        )
    before = target.granules * device.granule_bytes
    after = before - shrink * device.granule_bytes
    _apply(api, [_Change(target.id, ResizeSpec(memory=after), ResizeSpec(memory=before), False)])
    return {}


#: every CXL FM API command of the opcode table -> its handler
FMAPI_HANDLERS: dict[str, Handler] = {
    "GET_LD_INFO": get_ld_info,
    "GET_LD_ALLOCATIONS": get_ld_allocations,
    "SET_LD_ALLOCATIONS": set_ld_allocations,
    "GET_QOS_CONTROL": get_qos_control,
    "SET_QOS_CONTROL": set_qos_control,
    "GET_QOS_STATUS": get_qos_status,
    "GET_QOS_ALLOCATED_BW": get_qos_allocated_bw,
    "SET_QOS_ALLOCATED_BW": set_qos_allocated_bw,
    "GET_QOS_BW_LIMIT": get_qos_bw_limit,
    "SET_QOS_BW_LIMIT": set_qos_bw_limit,
    "INITIATE_DC_ADD": initiate_dc_add,
    "INITIATE_DC_RELEASE": initiate_dc_release,
}

__all__ = ["FMAPI_HANDLERS", "QOS_CONTROL"]
