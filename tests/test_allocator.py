"""The allocator's policies and errors on the default device (firmware/allocator.py).

Every refused call is checked to leave the allocator's observable state exactly as it was
(:func:`refused`), and ``check_invariants()`` is checked after every successful step
(:func:`ok`) — and shown to detect corrupted state, so that it can fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from firmware.allocator import Allocator
from firmware.errors import (
    InsufficientResources,
    LifecycleError,
    NotFound,
    RequestError,
    ResourceConflict,
    SlicefabError,
)
from firmware.inventory import Device, parse_device
from firmware.resources.lanes import LaneGroup
from firmware.resources.memory import Extent
from firmware.slices import Allocation, QoS, ResizeSpec, Slice, SliceSpec, SliceState
from firmware.units import GiB, MiB

CAP = 100_000  # Mbit/s per crossbar port on the default device
GRANULES = 32768
GRANULE = 2 * MiB
NVME0 = LaneGroup(0, 0, 4)
NVME1 = LaneGroup(1, 8, 4)


# ---------------------------------------------------------------- helpers


@pytest.fixture
def a(device: Device) -> Allocator:
    return Allocator(device)


def spec(owner: str = "vm-a", **fields: Any) -> SliceSpec:
    return SliceSpec.from_dict({"owner": owner, **fields})


def resize(**fields: Any) -> ResizeSpec:
    return ResizeSpec.from_dict(fields)


def snapshot(a: Allocator) -> dict[str, Any]:
    """Everything observable about the allocator's state."""
    return {
        "free_cores": a.cores.free_count(),
        "free_core_ids": a.cores.free_ids(),
        "free_extents": a.memory.free_extents(),
        "free_lanes": [a.lanes.free_lanes(p) for p in range(len(a.device.port_lanes))],
        "lane_groups": a.lanes.held_groups(),
        "key_owner": list(a.key_owner),
        "key_users": list(a.key_users),
        "port_demand": a.port_demand(),
        "port_slices": [p.slices for p in a.ports],
        "slices": sorted(
            (s.to_dict(a.device.granule_bytes) for s in a.slices.values()), key=lambda d: d["id"]
        ),
        "releasing": sorted(a._withdrawn),
        "next_id": a.next_id,
        "utilisation": a.utilisation(),
    }


def ok(a: Allocator, s: SliceSpec) -> Slice:
    """Allocate; the slice is RESERVED and every invariant holds."""
    got = a.allocate(s)
    assert got.state is SliceState.RESERVED
    assert a.slices[got.id] is got
    assert a.check_invariants() == []
    return got


def resized(a: Allocator, slice_id: int, rs: ResizeSpec) -> Slice:
    got = a.resize(slice_id, rs)
    assert a.check_invariants() == []
    return got


def freed(a: Allocator, slice_id: int) -> None:
    a.begin_release(slice_id)
    assert a.check_invariants() == []
    assert a.release(slice_id).state is SliceState.FREED
    assert a.check_invariants() == []


def refused(
    a: Allocator,
    exc: type[SlicefabError],
    call: Callable[[], object],
    *,
    field: str | None = None,
) -> SlicefabError:
    """``call`` raises ``exc`` and the allocator is exactly as it was before."""
    before = snapshot(a)
    with pytest.raises(exc) as info:
        call()
    assert snapshot(a) == before
    assert a.check_invariants() == []
    if field is not None:
        assert isinstance(info.value, RequestError)
        assert info.value.field == field
    return info.value


def cluster(core: int) -> int:
    return core // 8


def initial(device: Device) -> dict[str, Any]:
    return snapshot(Allocator(device))


# ---------------------------------------------------------------- cores


def test_cores_by_count(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 5}))
    assert len(s.alloc.cores) == 5 == len(set(s.alloc.cores))
    assert list(s.alloc.cores) == sorted(s.alloc.cores)
    assert a.cores.free_count() == 59
    assert not any(a.cores.is_free(c) for c in s.alloc.cores)


def test_cores_by_explicit_ids(a: Allocator) -> None:
    s = ok(a, spec(cores={"ids": [40, 5, 17]}))
    assert s.alloc.cores == (5, 17, 40)
    assert s.spec.cores is not None and s.spec.cores.count == 3


def test_explicit_core_held_by_another_slice_conflicts(a: Allocator) -> None:
    ok(a, spec(cores={"ids": [5, 17]}))
    err = refused(a, ResourceConflict, lambda: a.allocate(spec("vm-b", cores={"ids": [17, 18]})))
    assert err.details["cores"] == [17]
    # the same VM cannot take it twice either: cores are per slice, not per VM
    refused(a, ResourceConflict, lambda: a.allocate(spec(cores={"ids": [5]})))


def test_core_id_that_does_not_exist_is_a_request_error(a: Allocator) -> None:
    err = refused(
        a, RequestError, lambda: a.allocate(spec(cores={"ids": [3, 64]})), field="cores.ids"
    )
    assert err.details["limit"] == 63


def test_same_cluster_affinity_puts_all_cores_in_one_cluster(a: Allocator) -> None:
    ok(a, spec(cores={"ids": [0, 1, 2, 3, 8, 9, 10, 16, 17]}))  # no cluster has 8 free now
    s = ok(a, spec(cores={"count": 8, "same_cluster": True}))
    assert {cluster(c) for c in s.alloc.cores} == {3}
    s = ok(a, spec(cores={"count": 5, "same_cluster": True}))
    assert len({cluster(c) for c in s.alloc.cores}) == 1


def test_same_cluster_larger_than_a_cluster_is_a_request_error(a: Allocator) -> None:
    err = refused(
        a,
        RequestError,
        lambda: a.allocate(spec(cores={"count": 9, "same_cluster": True})),
        field="cores.count",
    )
    assert err.details["limit"] == 8


def test_same_cluster_ids_spanning_clusters_are_a_request_error(a: Allocator) -> None:
    refused(
        a,
        RequestError,
        lambda: a.allocate(spec(cores={"ids": [7, 8], "same_cluster": True})),
        field="cores.ids",
    )


def test_same_cluster_refused_when_no_cluster_has_room(a: Allocator) -> None:
    ok(a, spec(cores={"ids": [8 * c for c in range(8)]}))  # one core taken in every cluster
    err = refused(
        a, InsufficientResources, lambda: a.allocate(spec(cores={"count": 8, "same_cluster": True}))
    )
    assert err.details["available"] == 7
    ok(a, spec(cores={"count": 8}))  # without affinity the same count fits


def test_more_cores_than_the_device_is_a_request_error(a: Allocator) -> None:
    err = refused(
        a, RequestError, lambda: a.allocate(spec(cores={"count": 65})), field="cores.count"
    )
    assert err.details["limit"] == 64


def test_cores_exhausted(a: Allocator) -> None:
    ok(a, spec(cores={"count": 60}))
    err = refused(a, InsufficientResources, lambda: a.allocate(spec("vm-b", cores={"count": 5})))
    assert err.details["available"] == 4
    ok(a, spec("vm-b", cores={"count": 4}))
    assert a.cores.free_count() == 0


# ---------------------------------------------------------------- memory


def test_contiguous_memory_is_one_extent(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "4 GiB", "contiguous": True}))
    assert s.alloc.extents == (Extent(0, 2048),)
    assert a.memory.free_extents() == [Extent(2048, GRANULES - 2048)]


def fragment(a: Allocator) -> list[Slice]:
    """Four 16 GiB slices, the 1st and 3rd freed: two free holes of 8192 granules."""
    quarters = [ok(a, spec(memory={"size": "16 GiB", "contiguous": True})) for _ in range(4)]
    freed(a, quarters[0].id)
    freed(a, quarters[2].id)
    assert a.memory.free_extents() == [Extent(0, 8192), Extent(16384, 8192)]
    return quarters


def test_contiguous_memory_refused_when_fragmented(a: Allocator) -> None:
    fragment(a)
    err = refused(
        a,
        InsufficientResources,
        lambda: a.allocate(spec(memory={"size": "32 GiB", "contiguous": True})),
    )
    assert err.details["available"] == 8192


def test_non_contiguous_memory_spans_the_holes(a: Allocator) -> None:
    fragment(a)
    s = ok(a, spec(memory={"size": "32 GiB"}))
    assert s.alloc.extents == (Extent(0, 8192), Extent(16384, 8192))
    assert s.alloc.granules * GRANULE == 32 * GiB
    assert a.memory.free_extents() == []


def test_memory_not_a_multiple_of_the_granule_is_a_request_error(a: Allocator) -> None:
    err = refused(
        a, RequestError, lambda: a.allocate(spec(memory={"size": "3 MiB"})), field="memory.size"
    )
    assert "2 MiB granule" in err.message


def test_memory_larger_than_the_device_is_a_request_error(a: Allocator) -> None:
    err = refused(
        a, RequestError, lambda: a.allocate(spec(memory={"size": "66 GiB"})), field="memory.size"
    )
    assert err.details["limit"] == 64 * GiB


def test_memory_exhausted(a: Allocator) -> None:
    ok(a, spec(memory={"size": "64 GiB"}))
    refused(a, InsufficientResources, lambda: a.allocate(spec("vm-b", memory={"size": "2 MiB"})))


# ---------------------------------------------------------------- lanes


def test_lanes_by_width_are_naturally_aligned(a: Allocator, device: Device) -> None:
    for width in (1, 2, 4, 8):
        s = ok(a, spec(lanes={"width": width}))
        g = s.alloc.lanes
        assert g is not None and g.width == width
        assert (g.first - device.port_first_lane(g.port)) % width == 0
        assert set(g.lanes) <= set(a.lanes.port_range(g.port))


def test_pinned_lanes_get_exactly_the_endpoint(a: Allocator) -> None:
    assert ok(a, spec(lanes={"width": 4, "endpoint": "nvme0"})).alloc.lanes == NVME0
    assert ok(a, spec("vm-b", lanes={"width": 4, "endpoint": "nvme1"})).alloc.lanes == NVME1


def test_second_pin_of_an_endpoint_conflicts(a: Allocator) -> None:
    ok(a, spec(lanes={"width": 4, "endpoint": "nvme0"}))
    for owner in ("vm-a", "vm-b"):
        err = refused(
            a,
            ResourceConflict,
            lambda o=owner: a.allocate(spec(o, lanes={"width": 4, "endpoint": "nvme0"})),
        )
        assert err.details["endpoint"] == "nvme0"


def test_pin_with_the_wrong_width_or_an_unknown_endpoint(a: Allocator) -> None:
    err = refused(
        a,
        RequestError,
        lambda: a.allocate(spec(lanes={"width": 2, "endpoint": "nvme0"})),
        field="lanes.width",
    )
    assert err.details["expected"] == 4
    err = refused(
        a,
        RequestError,
        lambda: a.allocate(spec(lanes={"width": 4, "endpoint": "nvme7"})),
        field="lanes.endpoint",
    )
    assert err.details["expected"] == ["nvme0", "nvme1"]


def test_unpinned_requests_never_take_endpoint_lanes(a: Allocator, device: Device) -> None:
    taken: set[int] = set()
    while True:
        try:
            s = a.allocate(spec(lanes={"width": 1}, ports=0))
        except InsufficientResources:
            break
        assert s.alloc.lanes is not None
        taken.update(s.alloc.lanes.lanes)
        assert a.check_invariants() == []
    assert taken.isdisjoint(device.endpoint_lanes)
    assert len(taken) == device.lanes - len(device.endpoint_lanes) == 24
    # the endpoints are still there for the requests pinned to them
    assert ok(a, spec(lanes={"width": 4, "endpoint": "nvme0"})).alloc.lanes == NVME0
    assert ok(a, spec(lanes={"width": 4, "endpoint": "nvme1"})).alloc.lanes == NVME1
    assert a.lanes.free_lanes() == 0


def test_unpinned_x8_only_fits_ports_without_endpoints(a: Allocator) -> None:
    assert ok(a, spec(lanes={"width": 8})).alloc.lanes == LaneGroup(2, 16, 8)
    assert ok(a, spec(lanes={"width": 8})).alloc.lanes == LaneGroup(3, 24, 8)
    # ports 0 and 1 still have 8 free lanes each, but half of each is an endpoint's
    assert a.lanes.free_lanes(0) == 8
    refused(a, InsufficientResources, lambda: a.allocate(spec(lanes={"width": 8})))


def test_lane_width_wider_than_a_port_is_a_request_error(a: Allocator) -> None:
    err = refused(
        a, RequestError, lambda: a.allocate(spec(lanes={"width": 16})), field="lanes.width"
    )
    assert err.details["limit"] == 8


# ---------------------------------------------------------------- keys


def test_auto_key_is_the_vms_existing_key(a: Allocator) -> None:
    first = ok(a, spec(cores={"count": 1}))
    again = ok(a, spec(cores={"count": 1}))
    other = ok(a, spec("vm-b", cores={"count": 1}))
    assert again.alloc.key == first.alloc.key
    assert other.alloc.key != first.alloc.key
    assert a.key_owner[first.alloc.key] == "vm-a"
    assert a.key_owner[other.alloc.key] == "vm-b"


def test_auto_key_takes_a_free_one(a: Allocator) -> None:
    ok(a, spec(cores={"count": 1}, key=0))
    assert ok(a, spec("vm-b", cores={"count": 1})).alloc.key == 1


def test_explicit_key_held_by_another_vm_conflicts(a: Allocator) -> None:
    ok(a, spec(cores={"count": 1}, key=7))
    err = refused(a, ResourceConflict, lambda: a.allocate(spec("vm-b", cores={"count": 1}, key=7)))
    assert err.details["key"] == 7
    assert ok(a, spec(cores={"count": 1}, key=7)).alloc.key == 7  # its holder may reuse it


def test_a_vm_may_hold_a_second_key_explicitly(a: Allocator) -> None:
    ok(a, spec(cores={"count": 1}, key=4))
    ok(a, spec(cores={"count": 1}, key=2))
    assert a.key_owner[2] == a.key_owner[4] == "vm-a"
    assert ok(a, spec(cores={"count": 1})).alloc.key == 2  # auto: the VM's lowest key


def test_keys_exhausted_then_freed(a: Allocator) -> None:
    slices = [ok(a, spec(f"vm-{i}", cores={"count": 1}, ports=0)) for i in range(16)]
    assert sorted(s.alloc.key for s in slices) == list(range(16))
    refused(a, InsufficientResources, lambda: a.allocate(spec("vm-x", cores={"count": 1})))
    freed(a, slices[5].id)
    assert a.key_owner[slices[5].alloc.key] is None
    assert ok(a, spec("vm-x", cores={"count": 1}, ports=0)).alloc.key == slices[5].alloc.key


def test_key_that_the_device_does_not_have_is_a_request_error() -> None:
    small = _small_device(keys=4)
    a = Allocator(small)
    err = refused(a, RequestError, lambda: a.allocate(spec(cores={"count": 1}, key=4)), field="key")
    assert err.details["limit"] == 3


def _small_device(**overrides: Any) -> Device:
    doc: dict[str, Any] = {
        "device": {"name": "small"},
        "cores": {"clusters": 2, "cores_per_cluster": 4},
        "memory": {"size": "16 MiB", "granule": "2 MiB", "max_extents_per_slice": 2},
        "pcie": {"port_lanes": [4, 4]},
        "keys": {"count": overrides.get("keys", 16)},
        "crossbar": {
            "ports": 4,
            "port_bandwidth": "10 Gbit/s",
            "data_width_bits": 64,
            "clock_mhz": 250,
        },
    }
    return parse_device(doc)


# ---------------------------------------------------------------- crossbar ports


def test_a_vms_slices_share_its_ports(a: Allocator) -> None:
    s1 = ok(a, spec(cores={"count": 1}))
    s2 = ok(a, spec(cores={"count": 1}))
    assert s1.alloc.ports == s2.alloc.ports == (0,)
    s3 = ok(a, spec(cores={"count": 1}, ports=2))
    assert s3.alloc.ports == (0, 1)  # its own port first, then a free one
    assert a.ports[0].slices == 3 and a.ports[1].slices == 1


def test_ports_are_never_shared_by_two_vms(a: Allocator) -> None:
    sa = ok(a, spec(cores={"count": 1}, ports=2))
    sb = ok(a, spec("vm-b", cores={"count": 1}, ports=2))
    assert set(sa.alloc.ports).isdisjoint(sb.alloc.ports)
    assert [d.owner for d in a.port_demand()[:4]] == ["vm-a", "vm-a", "vm-b", "vm-b"]


def test_no_free_port_for_another_vm(a: Allocator) -> None:
    ok(a, spec(cores={"count": 1}, ports=16))
    refused(a, InsufficientResources, lambda: a.allocate(spec("vm-b", cores={"count": 1})))
    assert ok(a, spec("vm-b", cores={"count": 1}, ports=0)).alloc.ports == ()
    assert ok(a, spec(cores={"count": 1}, ports=3)).alloc.ports == (0, 1, 2)  # its own


def test_released_ports_are_free_again(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 1}, ports=16))
    freed(a, s.id)
    assert all(d.owner is None for d in a.port_demand())
    assert ok(a, spec("vm-b", cores={"count": 1}, ports=16)).alloc.ports == tuple(range(16))


def test_more_ports_than_the_crossbar_is_a_request_error(a: Allocator) -> None:
    err = refused(
        a, RequestError, lambda: a.allocate(spec(cores={"count": 1}, ports=17)), field="ports"
    )
    assert err.details["limit"] == 16


def test_port_demand_sums_the_slices_on_each_port(a: Allocator) -> None:
    ok(a, spec(cores={"count": 1}, key=3, qos={"priority": 2, "guaranteed": 10_000}))
    ok(a, spec(cores={"count": 1}, key=5, qos={"priority": 6, "maximum": 30_000}))
    d = a.port_demand()[0]
    assert d.owner == "vm-a"
    assert d.priority == 6
    assert d.guaranteed_mbps == 10_000
    assert d.limit_mbps == CAP + 30_000  # a slice without a maximum counts as the capacity
    assert d.keys == (1 << 3) | (1 << 5)
    assert all(p.owner is None for p in a.port_demand()[1:])


# ---------------------------------------------------------------- QoS admission


def max_guaranteed(a: Allocator) -> int:
    return max(d.guaranteed_mbps for d in a.port_demand())


def test_admission_refuses_more_guaranteed_bandwidth_than_a_port_has(a: Allocator) -> None:
    ok(a, spec(cores={"count": 1}, ports=16, qos={"guaranteed": "60 Gbit/s"}))
    err = refused(
        a,
        InsufficientResources,
        lambda: a.allocate(spec(cores={"count": 1}, qos={"guaranteed": "50 Gbit/s"})),
    )
    assert "guaranteed" in err.message
    s = ok(a, spec(cores={"count": 1}, qos={"guaranteed": "40 Gbit/s"}))
    assert a.port_demand()[s.alloc.ports[0]].guaranteed_mbps == CAP  # exactly full is fine
    assert max_guaranteed(a) <= CAP


def test_admission_prefers_a_vms_port_with_headroom(a: Allocator) -> None:
    s1 = ok(a, spec(cores={"count": 1}, qos={"guaranteed": "60 Gbit/s"}))
    s2 = ok(a, spec(cores={"count": 1}, qos={"guaranteed": "50 Gbit/s"}))
    assert s1.alloc.ports == (0,) and s2.alloc.ports == (1,)  # port 0 has no room for 50
    s3 = ok(a, spec(cores={"count": 1}, qos={"guaranteed": "40 Gbit/s"}))
    assert s3.alloc.ports == (0,)
    assert [d.guaranteed_mbps for d in a.port_demand()[:2]] == [CAP, 50_000]


@pytest.mark.parametrize("name", ["guaranteed", "maximum"])
def test_bandwidth_above_a_ports_capacity_is_a_request_error(a: Allocator, name: str) -> None:
    err = refused(
        a,
        RequestError,
        lambda: a.allocate(spec(cores={"count": 1}, qos={name: "101 Gbit/s"})),
        field=f"qos.{name}",
    )
    assert err.details["limit"] == CAP


def test_qos_resize_re_admits(a: Allocator) -> None:
    s1 = ok(a, spec(cores={"count": 1}, qos={"guaranteed": "60 Gbit/s"}))
    s2 = ok(a, spec(cores={"count": 1}, qos={"guaranteed": "30 Gbit/s", "maximum": "45 Gbit/s"}))
    assert s1.alloc.ports == s2.alloc.ports == (0,)
    refused(
        a,
        InsufficientResources,
        lambda: a.resize(s2.id, resize(qos={"guaranteed": "41 Gbit/s"})),
    )
    resized(a, s2.id, resize(qos={"guaranteed": "40 Gbit/s"}))
    assert a.port_demand()[0].guaranteed_mbps == CAP
    assert s2.spec.qos == QoS(0, 40_000, 45_000)  # maximum kept
    # lowering one slice makes room for the other
    refused(a, InsufficientResources, lambda: a.resize(s1.id, resize(qos={"guaranteed": 70_000})))
    resized(a, s2.id, resize(qos={"guaranteed": 0}))
    resized(a, s1.id, resize(qos={"guaranteed": 100_000}))
    assert a.port_demand()[0].guaranteed_mbps == CAP


def test_qos_resize_of_priority_and_maximum_keeps_the_rest(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 1}, qos={"priority": 1, "guaranteed": 10_000}))
    resized(a, s.id, resize(qos={"priority": 6}))
    assert s.spec.qos == QoS(6, 10_000, 0)
    resized(a, s.id, resize(qos={"maximum": "20 Gbit/s"}))
    assert s.spec.qos == QoS(6, 10_000, 20_000)
    d = a.port_demand()[0]
    assert (d.priority, d.guaranteed_mbps, d.limit_mbps) == (6, 10_000, 20_000)


def test_invalid_qos_resizes(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 1}, qos={"guaranteed": 10_000, "maximum": 20_000}))
    refused(
        a,
        RequestError,
        lambda: a.resize(s.id, resize(qos={"guaranteed": 30_000})),
        field="qos.guaranteed",
    )
    refused(
        a,
        RequestError,
        lambda: a.resize(s.id, resize(qos={"maximum": "200 Gbit/s"})),
        field="qos.maximum",
    )
    portless = ok(a, spec(cores={"count": 1}, ports=0))
    refused(a, RequestError, lambda: a.resize(portless.id, resize(qos={"maximum": 1})), field="qos")
    resized(a, portless.id, resize(qos={"priority": 3}))  # priority needs no port


# ---------------------------------------------------------------- resize memory


def test_memory_grows_in_place_when_the_next_granules_are_free(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "1 GiB", "contiguous": True}))
    resized(a, s.id, resize(memory="2 GiB"))
    assert s.alloc.extents == (Extent(0, 1024),)
    assert s.spec.memory is not None and s.spec.memory.size == 2 * GiB
    assert a.memory.free_extents() == [Extent(1024, GRANULES - 1024)]


def test_non_contiguous_memory_grows_with_a_new_extent(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "1 GiB"}))
    ok(a, spec("vm-b", memory={"size": "1 GiB"}))  # right behind it
    resized(a, s.id, resize(memory="2 GiB"))
    assert s.alloc.extents == (Extent(0, 512), Extent(1024, 512))
    assert s.spec.memory is not None and s.spec.memory.size == 2 * GiB


def test_contiguous_memory_that_cannot_grow_in_place_fails_cleanly(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "1 GiB", "contiguous": True}))
    ok(a, spec("vm-b", memory={"size": "1 GiB"}))
    refused(a, InsufficientResources, lambda: a.resize(s.id, resize(memory="2 GiB")))
    assert s.alloc.extents == (Extent(0, 512),)


def test_memory_shrink_gives_back_the_tail(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "2 GiB", "contiguous": True}))
    resized(a, s.id, resize(memory="1 GiB"))
    assert s.alloc.extents == (Extent(0, 512),)
    assert s.spec.memory is not None and s.spec.memory.size == 1 * GiB
    assert a.memory.free_extents() == [Extent(512, GRANULES - 512)]


def test_memory_shrink_keeps_the_lowest_addresses(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "1 GiB"}))
    b = ok(a, spec("vm-b", memory={"size": "1 GiB"}))
    resized(a, s.id, resize(memory="2 GiB"))  # (0, 512) + (1024, 512)
    resized(a, s.id, resize(memory=768 * GRANULE))
    assert s.alloc.extents == (Extent(0, 512), Extent(1024, 256))
    resized(a, s.id, resize(memory=256 * GRANULE))
    assert s.alloc.extents == (Extent(0, 256),)
    freed(a, b.id)
    assert a.memory.free_extents() == [Extent(256, GRANULES - 256)]


def test_memory_resize_to_the_same_size_changes_nothing(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "1 GiB"}))
    before = snapshot(a)
    resized(a, s.id, resize(memory="1 GiB"))
    assert snapshot(a) == before


def test_memory_growth_refused_beyond_the_extent_limit() -> None:
    a = Allocator(_small_device())  # 8 granules, at most 2 extents per slice
    s = ok(a, spec(memory={"size": "2 MiB"}))
    ok(a, spec("vm-b", memory={"size": "2 MiB"}))
    resized(a, s.id, resize(memory="4 MiB"))
    assert s.alloc.extents == (Extent(0, 1), Extent(2, 1))
    ok(a, spec("vm-c", memory={"size": "2 MiB"}))  # granule 3: no in-place growth
    err = refused(a, InsufficientResources, lambda: a.resize(s.id, resize(memory="6 MiB")))
    assert "extents" in err.message


def test_invalid_memory_resizes(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "1 GiB"}))
    cores_only = ok(a, spec(cores={"count": 1}))
    refused(a, RequestError, lambda: a.resize(s.id, resize(memory="3 MiB")), field="memory")
    refused(a, RequestError, lambda: a.resize(s.id, resize(memory="65 GiB")), field="memory")
    refused(
        a, RequestError, lambda: a.resize(cores_only.id, resize(memory="2 MiB")), field="memory"
    )
    refused(a, NotFound, lambda: a.resize(99, resize(memory="2 MiB")))


def test_memory_growth_beyond_what_is_free(a: Allocator) -> None:
    s = ok(a, spec(memory={"size": "32 GiB"}))
    ok(a, spec("vm-b", memory={"size": "31 GiB"}))
    refused(a, InsufficientResources, lambda: a.resize(s.id, resize(memory="34 GiB")))
    resized(a, s.id, resize(memory="33 GiB"))
    assert a.memory.free_granules == 0


# ---------------------------------------------------------------- resize cores


def test_same_cluster_growth_stays_in_the_cluster(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 2, "same_cluster": True}))
    assert s.alloc.cores == (0, 1)
    ok(a, spec("vm-b", cores={"ids": [2, 3]}))  # cluster 0: 4 free
    ok(a, spec("vm-c", cores={"ids": [8, 9, 10, 11, 12]}))  # cluster 1: 3 free, a better fit
    resized(a, s.id, resize(cores=5))
    assert s.alloc.cores == (0, 1, 4, 5, 6)
    assert s.spec.cores is not None and s.spec.cores.count == 5


def test_growth_without_affinity_may_leave_the_cluster(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 2}))
    assert s.alloc.cores == (0, 1)
    ok(a, spec("vm-b", cores={"ids": [2, 3]}))
    ok(a, spec("vm-c", cores={"ids": [8, 9, 10, 11, 12]}))
    resized(a, s.id, resize(cores=5))
    assert s.alloc.cores == (0, 1, 13, 14, 15)  # best-fit cluster 1, not the slice's


def test_same_cluster_growth_beyond_the_cluster_is_a_request_error(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 2, "same_cluster": True}))
    err = refused(a, RequestError, lambda: a.resize(s.id, resize(cores=9)), field="cores")
    assert err.details["limit"] == 8


def test_same_cluster_growth_refused_when_the_cluster_is_full(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 2, "same_cluster": True}))
    ok(a, spec("vm-b", cores={"ids": [2, 3, 4, 5, 6]}))  # cluster 0 has 1 free core
    refused(a, InsufficientResources, lambda: a.resize(s.id, resize(cores=4)))
    resized(a, s.id, resize(cores=3))
    assert s.alloc.cores == (0, 1, 7)


def test_core_shrink_gives_back_the_highest_ids(a: Allocator) -> None:
    s = ok(a, spec(cores={"ids": [41, 3, 20, 9]}))
    resized(a, s.id, resize(cores=2))
    assert s.alloc.cores == (3, 9)
    assert s.spec.cores is not None
    assert s.spec.cores.count == 2 and s.spec.cores.ids is None
    assert a.cores.is_free(20) and a.cores.is_free(41)
    assert a.cores.free_count() == 62


def test_invalid_core_resizes(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 2}))
    memory_only = ok(a, spec(memory={"size": "2 MiB"}))
    refused(a, RequestError, lambda: a.resize(s.id, resize(cores=65)), field="cores")
    refused(a, RequestError, lambda: a.resize(memory_only.id, resize(cores=1)), field="cores")
    ok(a, spec("vm-b", cores={"count": 60}))
    refused(a, InsufficientResources, lambda: a.resize(s.id, resize(cores=5)))


def test_a_resize_is_all_or_nothing(a: Allocator) -> None:
    """Cores can grow but memory cannot: the extra cores taken first are given back."""
    s = ok(a, spec(cores={"count": 2}, memory={"size": "1 GiB", "contiguous": True}))
    ok(a, spec("vm-b", memory={"size": "1 GiB"}))
    refused(a, InsufficientResources, lambda: a.resize(s.id, resize(cores=6, memory="2 GiB")))
    # and the QoS part is not applied either
    refused(
        a,
        InsufficientResources,
        lambda: a.resize(s.id, resize(cores=6, memory="2 GiB", qos={"priority": 7})),
    )
    assert s.spec.qos.priority == 0


# ---------------------------------------------------------------- allocation is all-or-nothing


def test_a_late_failure_gives_back_everything_taken_before_it(a: Allocator) -> None:
    ok(a, spec("vm-b", lanes={"width": 4, "endpoint": "nvme0"}))
    # key, port, cores and memory are taken before the lanes conflict
    refused(
        a,
        ResourceConflict,
        lambda: a.allocate(
            spec(
                cores={"count": 4},
                memory={"size": "1 GiB"},
                lanes={"width": 4, "endpoint": "nvme0"},
                qos={"priority": 5, "guaranteed": 1000},
            )
        ),
    )
    assert a.key_owner.count("vm-a") == 0
    assert all(d.owner != "vm-a" for d in a.port_demand())


def test_a_failure_on_a_shared_port_restores_its_totals(a: Allocator) -> None:
    ok(a, spec(cores={"count": 1}, qos={"priority": 3, "guaranteed": 5000, "maximum": 7000}))
    # the second slice joins port 0 (its VM's), then runs out of cores: 63 are free
    refused(
        a,
        InsufficientResources,
        lambda: a.allocate(spec(cores={"count": 64}, qos={"priority": 7, "guaranteed": 100})),
    )


# ---------------------------------------------------------------- release


def test_release_gives_back_exactly_what_was_taken(a: Allocator, device: Device) -> None:
    start = snapshot(a)
    s1 = ok(
        a,
        spec(
            cores={"count": 3, "same_cluster": True},
            memory={"size": "3 GiB"},
            lanes={"width": 4, "endpoint": "nvme1"},
            qos={"priority": 4, "guaranteed": 20_000},
            ports=2,
        ),
    )
    s2 = ok(a, spec("vm-b", cores={"ids": [63]}, memory={"size": "2 MiB"}, lanes={"width": 2}))
    resized(a, s1.id, resize(cores=5, memory="5 GiB", qos={"guaranteed": 30_000}))
    freed(a, s1.id)
    freed(a, s2.id)
    after = snapshot(a)
    assert after.pop("next_id") == 3
    start.pop("next_id")
    assert after == start
    assert a.memory.free_extents() == [Extent(0, GRANULES)]


def test_begin_release_withdraws_from_the_ports_but_keeps_the_units(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 2}, memory={"size": "1 GiB"}, qos={"guaranteed": 1000}))
    assert a.begin_release(s.id) is s
    assert s.state is SliceState.RELEASING
    assert a.check_invariants() == []
    assert a.port_demand()[0].owner is None  # out of the fabric image
    assert a.cores.free_count() == 62  # but its units are still held
    assert a.memory.free_granules == GRANULES - 512
    assert a.key_owner[s.alloc.key] == "vm-a"
    a.release(s.id)
    assert s.state is SliceState.FREED
    assert a.cores.free_count() == 64 and a.key_owner[s.alloc.key] is None
    refused(a, NotFound, lambda: a.get(s.id))


def test_begin_release_twice_is_a_lifecycle_error(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 1}))
    a.begin_release(s.id)
    refused(a, LifecycleError, lambda: a.begin_release(s.id))


def test_release_without_begin_release(a: Allocator, device: Device) -> None:
    s = ok(a, spec(cores={"count": 1}, qos={"guaranteed": 1000}))
    a.release(s.id)
    assert a.check_invariants() == []
    start = initial(device)
    start.pop("next_id")
    after = snapshot(a)
    after.pop("next_id")
    assert after == start


def test_release_of_an_unknown_slice(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 1}))
    a.release(s.id)
    refused(a, NotFound, lambda: a.release(s.id))
    refused(a, NotFound, lambda: a.begin_release(s.id))


def test_release_of_a_slice_in_error(a: Allocator) -> None:
    s = ok(a, spec(cores={"count": 1}))
    s.transition(SliceState.ERROR)
    a.release(s.id)
    assert s.state is SliceState.FREED
    assert a.cores.free_count() == 64


def test_slice_ids_are_never_reused(a: Allocator) -> None:
    s1 = ok(a, spec(cores={"count": 1}))
    a.release(s1.id)
    s2 = ok(a, spec(cores={"count": 1}))
    assert s2.id == s1.id + 1
    a.release(s2.id)
    assert ok(a, spec(cores={"count": 1})).id == s2.id + 1


def test_allocate_cannot_choose_the_slice_id() -> None:
    # ids come only from the allocator (next_id); a caller-chosen id could replace a live
    # slice in the table and leak its units
    import inspect

    assert list(inspect.signature(Allocator.allocate).parameters) == ["self", "spec"]


def test_resize_of_a_releasing_slice_is_refused(a: Allocator) -> None:
    keep = ok(a, spec(cores={"count": 1}, qos={"guaranteed": 1000}))
    going = ok(a, spec(cores={"count": 1}, qos={"guaranteed": 1000}))
    assert keep.alloc.ports == going.alloc.ports
    a.begin_release(going.id)
    refused(a, SlicefabError, lambda: a.resize(going.id, resize(qos={"guaranteed": 2000})))


def test_a_withdrawn_slice_keeps_its_ports_quarantined_until_release(a: Allocator) -> None:
    """Between begin_release and release the fabric may still carry the slice's traffic,
    so its ports must not go to anybody until the release."""
    going = ok(a, spec(cores={"count": 1}))
    a.begin_release(going.id)
    assert a.port_demand()[going.alloc.ports[0]].owner is None  # out of the fabric image
    other = a.allocate(spec("vm-b", cores={"count": 1}))
    same_vm = a.allocate(spec("vm-a", cores={"count": 1}))
    assert going.alloc.ports[0] not in other.alloc.ports + same_vm.alloc.ports
    assert a.check_invariants() == []
    a.release(going.id)
    assert a.check_invariants() == []
    third = a.allocate(spec("vm-c", cores={"count": 1}))
    assert third.alloc.ports == going.alloc.ports  # free again once released
    assert a.check_invariants() == []


# ---------------------------------------------------------------- restore


def build_table(a: Allocator) -> None:
    """A varied slice table: every resource kind, resized and released slices."""
    s1 = ok(
        a,
        spec(
            cores={"count": 3, "same_cluster": True},
            memory={"size": "1 GiB"},
            lanes={"width": 4, "endpoint": "nvme0"},
            qos={"priority": 3, "guaranteed": 20_000, "maximum": 50_000},
            ports=2,
            key=5,
        ),
    )
    s2 = ok(a, spec("vm-b", cores={"ids": [60, 61]}, memory={"size": "2 GiB"}))
    ok(a, spec("vm-b", lanes={"width": 2}, ports=3, qos={"guaranteed": 10_000}))
    s4 = ok(a, spec("vm-c", memory={"size": "4 GiB", "contiguous": True}, ports=0))
    ok(a, spec("vm-a", cores={"count": 1}, qos={"priority": 7}))
    resized(a, s1.id, resize(memory="3 GiB", cores=5, qos={"guaranteed": 25_000}))
    resized(a, s2.id, resize(cores=1))
    freed(a, s4.id)
    ok(a, spec("vm-d", memory={"size": "2 MiB"}, lanes={"width": 8}))


def ledger_copy(s: Slice) -> Slice:
    """The slice as recovery rebuilds it from the ledger's JSON rows."""
    return Slice(
        s.id, SliceSpec.from_dict(s.spec.to_dict()), Allocation.from_dict(s.alloc.to_dict())
    )


def restore_all(device: Device, slices: list[Slice]) -> Allocator:
    b = Allocator(device)
    for s in slices:
        copy = ledger_copy(s)
        b.restore(copy)
        copy.transition(SliceState.RESERVED)
        assert b.check_invariants() == []
    return b


@pytest.mark.parametrize("order", ["by-id", "reversed"])
def test_restore_reproduces_identical_state(a: Allocator, device: Device, order: str) -> None:
    build_table(a)
    slices = sorted(a.slices.values(), key=lambda s: s.id, reverse=order == "reversed")
    b = restore_all(device, slices)
    want, got = snapshot(a), snapshot(b)
    assert got.pop("next_id") == max(s.id for s in slices) + 1
    want.pop("next_id")
    assert got == want
    # and the restored allocator goes on exactly like the original
    for x in (a, b):
        x.next_id = 100
    s_a = ok(a, spec("vm-e", cores={"count": 4}, memory={"size": "1 GiB"}, lanes={"width": 1}))
    s_b = ok(b, spec("vm-e", cores={"count": 4}, memory={"size": "1 GiB"}, lanes={"width": 1}))
    assert s_a.alloc == s_b.alloc
    assert snapshot(a) == snapshot(b)


def test_restore_sets_next_id_past_the_restored_ids(device: Device) -> None:
    a = Allocator(device)
    a.next_id = 41  # as after 40 earlier slices, all freed
    ok(a, spec(cores={"count": 1}))
    b = restore_all(device, list(a.slices.values()))
    assert b.next_id == 42


def _conflict_cases() -> list[Any]:
    base = Slice(
        1,
        spec(
            cores={"count": 2},
            memory={"size": "4 MiB"},
            lanes={"width": 4},
            key=1,
            qos={"guaranteed": "1 Gbit/s"},
        ),
        Allocation(
            cores=(0, 1), extents=(Extent(0, 2),), lanes=LaneGroup(2, 16, 4), key=1, ports=(0,)
        ),
    )
    other = spec("vm-b", cores={"count": 1})
    free_alloc = Allocation(cores=(9,), key=2, ports=(5,))

    def case(id_: str, s: Slice, exc: type[SlicefabError]) -> Any:
        return pytest.param(base, s, exc, id=id_)

    return [
        case("same-id", Slice(1, other, free_alloc), ResourceConflict),
        case("core", Slice(2, other, replace(free_alloc, cores=(1,))), ResourceConflict),
        case(
            "granule",
            Slice(
                2,
                spec("vm-b", memory={"size": "2 MiB"}),
                replace(free_alloc, cores=(), extents=(Extent(1, 1),)),
            ),
            ResourceConflict,
        ),
        case(
            "lanes",
            Slice(
                2,
                spec("vm-b", lanes={"width": 2}),
                replace(free_alloc, cores=(), lanes=LaneGroup(2, 18, 2)),
            ),
            ResourceConflict,
        ),
        case("key-of-another-vm", Slice(2, other, replace(free_alloc, key=1)), ResourceConflict),
        case(
            "port-of-another-vm", Slice(2, other, replace(free_alloc, ports=(0,))), ResourceConflict
        ),
        case(
            "bandwidth-over-capacity",
            Slice(
                2,
                spec(cores={"count": 1}, key=1, qos={"guaranteed": "100 Gbit/s"}),
                replace(free_alloc, key=1, ports=(0,)),
            ),
            InsufficientResources,
        ),
    ]


@pytest.mark.parametrize(("base", "bad", "exc"), _conflict_cases())
def test_restore_of_conflicting_slices_raises_and_changes_nothing(
    device: Device, base: Slice, bad: Slice, exc: type[SlicefabError]
) -> None:
    a = Allocator(device)
    a.restore(ledger_copy(base))
    assert a.check_invariants() == []
    refused(a, exc, lambda: a.restore(bad))


def test_restore_of_a_slice_without_conflict_next_to_them(device: Device) -> None:
    """The control for the conflict table: the same base and a disjoint slice restore."""
    a = Allocator(device)
    base, *_ = (p.values[0] for p in _conflict_cases())
    a.restore(ledger_copy(base))
    a.restore(Slice(2, spec("vm-b", cores={"count": 1}), Allocation(cores=(9,), key=2, ports=(5,))))
    assert a.check_invariants() == []
    assert a.key_owner[1] == "vm-a" and a.key_owner[2] == "vm-b"


# ---------------------------------------------------------------- the checker can fail


def populated(device: Device) -> tuple[Allocator, Slice, Slice]:
    a = Allocator(device)
    sa = ok(
        a,
        spec(
            cores={"count": 2},
            memory={"size": "4 MiB"},
            lanes={"width": 2},
            qos={"priority": 2, "guaranteed": 10_000},
        ),
    )
    sb = ok(a, spec("vm-b", cores={"count": 2}, memory={"size": "4 MiB"}, lanes={"width": 2}))
    return a, sa, sb


def _set_alloc(s: Slice, **changes: Any) -> None:
    s.alloc = replace(s.alloc, **changes)


def _set_qos(s: Slice, qos: QoS) -> None:
    s.spec = replace(s.spec, qos=qos)


TAMPERING: list[tuple[str, Callable[[Allocator, Slice, Slice], None], str]] = [
    (
        "core-of-a-in-b",
        lambda a, sa, sb: _set_alloc(sb, cores=(*sb.alloc.cores, sa.alloc.cores[0])),
        "core unit",
    ),
    ("core-dropped", lambda a, sa, sb: _set_alloc(sb, cores=sb.alloc.cores[:1]), "core:"),
    ("core-freed-behind-its-back", lambda a, sa, sb: a.cores.release(sa.alloc.cores[:1]), "core:"),
    (
        "granule-of-a-in-b",
        lambda a, sa, sb: _set_alloc(sb, extents=(*sb.alloc.extents, sa.alloc.extents[0])),
        "granule unit",
    ),
    (
        "extent-also-free",
        lambda a, sa, sb: a.memory.release(sa.alloc.extents),
        "granule",
    ),
    (
        "lanes-of-a-in-b",
        lambda a, sa, sb: _set_alloc(sb, lanes=sa.alloc.lanes),
        "lane unit",
    ),
    ("lanes-freed", lambda a, sa, sb: a.lanes.release(sa.alloc.lanes), "lane:"),  # type: ignore[arg-type]
    ("key-of-a-in-b", lambda a, sa, sb: _set_alloc(sb, key=sa.alloc.key), "key"),
    ("key-users", lambda a, sa, sb: a.key_users.__setitem__(sa.alloc.key, 5), "key"),
    ("key-owner-lost", lambda a, sa, sb: a.key_owner.__setitem__(sa.alloc.key, None), "key"),
    ("port-of-a-in-b", lambda a, sa, sb: _set_alloc(sb, ports=sa.alloc.ports), "port"),
    (
        "port-guaranteed-total",
        lambda a, sa, sb: setattr(a.ports[0], "guaranteed_mbps", 1),
        "port 0",
    ),
    ("port-slice-count", lambda a, sa, sb: setattr(a.ports[0], "slices", 2), "port 0"),
    ("port-owner", lambda a, sa, sb: setattr(a.ports[0], "owner", "vm-b"), "port 0"),
    ("ghost-port", lambda a, sa, sb: setattr(a.ports[9], "owner", "vm-x"), "port 9"),
    (
        "over-capacity",
        lambda a, sa, sb: _set_qos(sa, QoS(2, 2 * CAP, 0)),
        "capacity",
    ),
    ("priority", lambda a, sa, sb: _set_qos(sa, QoS(7, 10_000, 0)), "port 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("tamper", "fragment"), [pytest.param(t, f, id=i) for i, t, f in TAMPERING]
)
def test_check_invariants_detects_corruption(
    device: Device, tamper: Callable[[Allocator, Slice, Slice], None], fragment: str
) -> None:
    a, sa, sb = populated(device)
    assert a.check_invariants() == []
    tamper(a, sa, sb)
    bad = a.check_invariants()
    assert bad, "corruption went unnoticed"
    assert any(fragment in v for v in bad), bad


def test_check_invariants_detects_a_key_recorded_for_the_wrong_vm(device: Device) -> None:
    a, sa, _ = populated(device)
    a.key_owner[sa.alloc.key] = "vm-b"
    assert a.check_invariants() != []


# ---------------------------------------------------------------- utilisation


def test_utilisation_counts_used_units(a: Allocator) -> None:
    assert a.utilisation() == {
        "cores": {"used": 0, "total": 64},
        "memory_granules": {"used": 0, "total": GRANULES},
        "lanes": {"used": 0, "total": 32},
        "keys": {"used": 0, "total": 16},
        "ports": {"used": 0, "total": 16},
        "guaranteed_mbps": {"used": 0, "total": 16 * CAP},
    }
    ok(a, spec(cores={"count": 3}, memory={"size": "1 GiB"}, ports=2, qos={"guaranteed": 5000}))
    ok(a, spec(cores={"count": 1}, lanes={"width": 4, "endpoint": "nvme0"}))
    ok(a, spec("vm-b", lanes={"width": 8}, ports=0))
    used = {k: v["used"] for k, v in a.utilisation().items()}
    assert used == {
        "cores": 4,
        "memory_granules": 512,
        "lanes": 12,
        "keys": 2,
        "ports": 2,
        "guaranteed_mbps": 2 * 5000,
    }


@pytest.mark.parametrize(
    "alloc",
    [
        pytest.param(Allocation(cores=(1,), key=99), id="key"),
        pytest.param(Allocation(cores=(1,), key=1, ports=(40,)), id="port"),
    ],
)
def test_restore_of_a_unit_the_device_does_not_have_is_refused(
    a: Allocator, alloc: Allocation
) -> None:
    refused(a, SlicefabError, lambda: a.restore(Slice(1, spec(cores={"count": 1}), alloc)))
