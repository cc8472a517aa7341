"""Pool records, the placement algorithm and its cost function, the pool invariant checker,
and the placement benchmark's quality (no etcd needed: tests/test_pool_etcd.py has those)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from firmware.errors import RequestError
from firmware.inventory import load_device
from firmware.pool.bench import bench_placement, ilp_optimum, online, pool_devices
from firmware.pool.composer import check_pool
from firmware.pool.etcd import gateway_path, parse_endpoints, prefix_end
from firmware.pool.model import (
    Capacity,
    CompositionRequest,
    DeviceRecord,
    Part,
    composition_of,
)
from firmware.pool.placement import NoPlacement, cost, first_fit, place
from firmware.units import GiB


def req(**kw: Any) -> CompositionRequest:
    return CompositionRequest.from_dict({"owner": "vm-a", **kw})


def devices(n: int = 3, zones: int = 1) -> list[DeviceRecord]:
    cap = Capacity.of_device(load_device())
    return [DeviceRecord(f"dev{i}", f"i{i}", f"zone{i % zones}", cap, cap) for i in range(n)]


# ---------------------------------------------------------------------- records


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"owner": "vm a", "cores": 1}, "owner"),
        ({"owner": "vm-a", "memory": "3 MiB"}, "memory"),
        ({"owner": "vm-a", "cores": -1}, "cores"),
        ({"owner": "vm-a", "cores": 1, "nvme_width": 3}, "nvme_width"),
        ({"owner": "vm-a", "cores": 1, "max_devices": 9}, "max_devices"),
        ({"owner": "vm-a", "cores": 1, "max_latency_us": -2}, "max_latency_us"),
        ({"owner": "vm-a", "cores": 1, "affinity": "near"}, "affinity"),
        ({"owner": "vm-a", "nvme": 1}, "nvme_with_cores"),
        ({"owner": "vm-a", "cores": 1, "colour": "red"}, "colour"),
    ],
)
def test_bad_requests_name_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as e:
        CompositionRequest.from_dict(data)
    assert e.value.field == field, e.value.message


def test_empty_request_is_refused() -> None:
    with pytest.raises(RequestError, match="at least one"):
        CompositionRequest.from_dict({"owner": "vm-a"})


def test_request_round_trips() -> None:
    r = req(cores=8, memory="32 GiB", nvme=1, max_latency_us=2, affinity="spread")
    assert CompositionRequest.from_dict(r.to_dict()) == r


def test_take_and_give_back_are_inverse() -> None:
    d = devices(1)[0]
    p = Part("dev0", 8, 4 * GiB, ("nvme0",), "i0")
    taken = d.take(p, "vm-a")
    assert taken.free.cores == 56 and "nvme0" not in taken.free.nvme
    assert taken.free.vm_slots == d.free.vm_slots - 1
    twice = taken.take(Part("dev0", 1, 0, (), "i0"), "vm-a")
    assert twice.free.vm_slots == taken.free.vm_slots  # the VM already has a slot here
    assert twice.give_back(Part("dev0", 1, 0, (), "i0"), "vm-a").give_back(p, "vm-a") == d
    with pytest.raises(ValueError):
        d.take(Part("dev0", 65, 0, (), "i0"), "vm-a")
    with pytest.raises(ValueError):
        taken.take(Part("dev0", 1, 0, ("nvme0",), "i0"), "vm-b")


def test_part_becomes_slices() -> None:
    p = Part("dev0", 4, 2 * GiB, ("nvme0", "nvme1"), "i0")
    specs = p.slice_specs("vm-a", "c1", {"nvme0": 4, "nvme1": 4})
    assert [s["name"] for s in specs] == ["pool:c1:0", "pool:c1:1"]
    assert specs[0]["cores"] == {"count": 4} and specs[0]["lanes"]["endpoint"] == "nvme0"
    assert specs[1] == {
        "owner": "vm-a",
        "name": "pool:c1:1",
        "lanes": {"width": 4, "endpoint": "nvme1"},
    }
    assert composition_of("pool:c1:1") == "c1" and composition_of("web") is None


def test_etcd_helpers() -> None:
    assert gateway_path("3.4.23") == "/v3/"
    assert gateway_path("3.5.0") == "/v3/"
    assert gateway_path("3.3.1") == "/v3beta/"
    with pytest.raises(Exception, match="too old"):
        gateway_path("3.2.0")
    assert prefix_end("/a/") == "/a0"
    assert parse_endpoints("http://127.0.0.1:1,http://127.0.0.1:2/") == [
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
    ]
    with pytest.raises(Exception, match="not an etcd client URL"):
        parse_endpoints("127.0.0.1:2379")


# ---------------------------------------------------------------------- placement


def test_a_request_that_fits_one_device_stays_on_one() -> None:
    p = place(req(cores=8, memory="32 GiB", nvme=1), devices())
    assert len(p.parts) == 1
    assert (p.parts[0].cores, p.parts[0].memory, len(p.parts[0].nvme)) == (8, 32 * GiB, 1)


def test_split_when_no_device_has_enough() -> None:
    p = place(req(cores=100, memory="100 GiB", nvme=3, max_devices=2), devices())
    assert len(p.parts) == 2
    assert sum(x.cores for x in p.parts) == 100
    assert sum(x.memory for x in p.parts) == 100 * GiB
    assert sum(len(x.nvme) for x in p.parts) == 3
    assert all(x.cores >= 1 for x in p.parts if x.nvme)  # NVMe next to cores


def test_max_devices_and_latency_are_obeyed() -> None:
    devs = devices(4, zones=2)  # dev0, dev2 in zone0; dev1, dev3 in zone1
    with pytest.raises(NoPlacement, match="cores: requested 300"):
        place(req(cores=300), devs)
    with pytest.raises(NoPlacement, match="at most 2 device"):
        place(req(cores=140, max_devices=2), devs)
    p = place(req(cores=100, max_devices=2, max_latency_us=2), devs)
    zones = {d.zone for d in devs if d.device in p.devices}
    assert len(zones) == 1
    # only one device per zone has room left: within 2 µs no pair exists any more
    devs = [replace(d, free=replace(d.free, cores=10)) if d.device in ("dev2", "dev3") else d
            for d in devs]  # fmt: skip
    with pytest.raises(NoPlacement):
        place(req(cores=100, max_devices=2, max_latency_us=2), devs)
    assert len(place(req(cores=100, max_devices=2), devs).parts) == 2


def test_pack_prefers_the_fuller_device_and_spread_spreads() -> None:
    devs = devices(3)
    devs[1] = devs[1].take(Part("dev1", 32, 32 * GiB, (), "i1"), "vm-x")
    p = place(req(cores=8, memory="8 GiB"), devs)
    assert p.devices == ["dev1"]  # best fit: keeps dev0 and dev2 whole
    s = place(req(cores=8, memory="8 GiB", affinity="spread"), devs)
    assert len(s.parts) == 3


def test_cost_terms_move_the_way_they_should() -> None:
    devs = devices(2, zones=2)
    one = [Part("dev0", 8, 8 * GiB, (), "i0")]
    two = [Part("dev0", 4, 4 * GiB, (), "i0"), Part("dev1", 4, 4 * GiB, (), "i1")]
    r = req(cores=8, memory="8 GiB")
    c1, t1 = cost(r, one, devs[:1])
    c2, t2 = cost(r, two, devs)
    assert t2["devices"] > t1["devices"] and t2["latency"] > t1["latency"] == 0
    assert c2 > c1
    # a device left with cores but no memory is fragmented
    lop = [Part("dev0", 2, 60 * GiB, (), "i0")]
    bal = [Part("dev0", 30, 30 * GiB, (), "i0")]
    assert cost(r, lop, devs[:1])[1]["fragmentation"] > cost(r, bal, devs[:1])[1]["fragmentation"]


def test_vm_slots_limit_devices() -> None:
    devs = devices(1)
    devs[0] = replace(devs[0], free=replace(devs[0].free, vm_slots=0))
    with pytest.raises(NoPlacement):
        place(req(cores=1), devs)
    devs[0] = replace(devs[0], owners={"vm-a": 1})
    assert place(req(cores=1), devs).devices == ["dev0"]


def test_first_fit_fills_in_order() -> None:
    p = first_fit(req(cores=70, max_devices=2), devices())
    assert [(x.device, x.cores) for x in p.parts] == [("dev0", 64), ("dev1", 6)]


# ---------------------------------------------------------------------- invariants


def composition(cid: str, owner: str, parts: list[Part], state: str = "active") -> dict[str, Any]:
    return {"id": cid, "owner": owner, "parts": [{**p.to_dict(), "state": state} for p in parts]}


def test_check_pool_passes_on_consistent_state_and_catches_corruption() -> None:
    d = devices(1)[0]
    p = Part("dev0", 8, 8 * GiB, ("nvme0",), "i0")
    good = d.take(p, "vm-a")
    comps = [composition("c1", "vm-a", [p])]
    assert check_pool([good], comps) == []
    assert any("oversubscribed cores" in v for v in check_pool([d], comps))
    twice = [*comps, composition("c2", "vm-b", [Part("dev0", 1, 0, ("nvme0",), "i0")])]
    assert any("nvme0 in compositions" in v for v in check_pool([good], twice))
    assert any("not among its owners" in v for v in check_pool([replace(good, owners={})], comps))
    # a part reserved with an older incarnation is not counted against the device
    old = [composition("c1", "vm-a", [replace(p, incarnation="old")])]
    assert check_pool([d], old) == []
    # the device's own slices must match the part
    slice_view = {
        "id": 1,
        "name": "pool:c1:0",
        "owner": "vm-a",
        "alloc": {"cores": list(range(8))},
        "spec": {"memory": {"size": 8 * GiB}, "lanes": {"width": 4, "endpoint": "nvme0"}},
    }
    assert check_pool([good], comps, {"dev0": [slice_view]}) == []
    short = {**slice_view, "alloc": {"cores": [0]}}
    assert any("holds 1 cores" in v for v in check_pool([good], comps, {"dev0": [short]}))
    stray = {**slice_view, "name": "pool:zz:0"}
    assert any(
        "have no part" in v for v in check_pool([good], comps, {"dev0": [slice_view, stray]})
    )


# ---------------------------------------------------------------------- quality


def test_ilp_is_an_upper_bound_and_ours_beats_first_fit() -> None:
    from firmware.pool.bench import batch

    reqs = batch(5, 1.0)
    _ours_acc, ours = online(reqs, place)
    _ff_acc, ff = online(reqs, first_fit)
    opt, _opt_acc, proven = ilp_optimum(reqs, time_limit=20)
    assert proven
    assert ours <= opt + 1e-9 and ff <= opt + 1e-9
    assert ours >= ff
    assert len(pool_devices()) == 4


def test_placement_bench_meets_its_target() -> None:
    figures = bench_placement(quick=True)
    assert figures["load 1.0: ours / optimum (mean)"] >= 0.97, figures
    assert figures["dynamic: accepted ratio ours / first-fit"] >= 1.0, figures
