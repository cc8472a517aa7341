"""Differential tests of the C unit allocators (firmware.resources.fast) against the Python
references (firmware.resources), alone and inside the Allocator.

The same seeded random workload runs on both paths, step by step: every call must return
the same value or raise the same exception (type, message, details), and the observable
state (free cores, free extents, held lane groups, free lanes per port) must stay equal.
Invalid inputs (bools, negatives, out of range, double frees, overlaps) are part of the
workload: C bounds-checks them and Python raises exactly what the reference raises.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware import fastpath
from firmware.allocator import Allocator
from firmware.bench import random_resize, random_spec
from firmware.errors import SlicefabError
from firmware.inventory import Device, Endpoint, load_device
from firmware.resources.cores import CoreAllocator
from firmware.resources.fast import CCoreAllocator, CExtentAllocator, CLaneAllocator
from firmware.resources.lanes import LINK_WIDTHS, LaneAllocator, LaneGroup
from firmware.resources.memory import Extent, ExtentAllocator
from firmware.slices import Slice, SliceSpec, SliceState

BASE = load_device()
T = TypeVar("T")


def outcome(
    obj: Any, method: str, *args: Any, post: Callable[[Any], Any] | None = None, **kw: Any
) -> tuple[str, Any]:
    """What ``obj.method(*args, **kw)`` did: its value (through ``post``), or its
    exception's type, message and details."""
    try:
        value = getattr(obj, method)(*args, **kw)
    except SlicefabError as e:
        return (type(e).__name__, (e.message, e.details))
    return ("ok", value if post is None else post(value))


def same(py: Any, c: Any, method: str, *args: Any, **kw: Any) -> tuple[str, Any]:
    """The same call on the reference and on the C twin: the same outcome."""
    a = outcome(py, method, *args, **kw)
    assert a == outcome(c, method, *args, **kw)
    return a


# ------------------------------------------------------------------------------- cores


def core_state(a: CoreAllocator) -> Any:
    n = len(a.cluster_sizes)
    return a.free_ids(), a.free_count(), [a.free_count(c) for c in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    seed=st.integers(0, 2**32),
)
def test_cores_behave_identically(sizes: list[int], seed: int) -> None:
    rng = random.Random(seed)
    py, c = CoreAllocator(sizes), CCoreAllocator(sizes)
    total = sum(sizes)
    held: list[list[int]] = []
    for _ in range(120):
        r = rng.random()
        if r < 0.45:
            count = rng.choice([rng.randint(1, max(1, total // 3)), 0, -1, total + 1, True])
            same_cluster = rng.random() < 0.4
            cluster = rng.choice([None, None, rng.randrange(len(sizes)), len(sizes), -1])
            kind, got = same(py, c, "allocate", count, same_cluster=same_cluster, cluster=cluster)
            if kind == "ok":
                held.append(got)
        elif r < 0.8 and held:
            ids = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.1:  # a bad release: an id twice, a foreign id, a bool
                ids = [*ids, rng.choice([ids[0], total, -3, True])]
                held.append(ids[:-1])
            same(py, c, "release", ids)
        else:
            ids = rng.sample(range(total), rng.randint(1, min(5, total)))
            if rng.random() < 0.1:
                ids.append(rng.choice([total, 2**40, ids[0]]))
            kind, _ = same(py, c, "allocate_ids", ids)
            if kind == "ok":
                held.append(ids)
        probe = rng.randrange(-1, total + 1)
        same(py, c, "is_free", probe)
        assert core_state(py) == core_state(c)


# ------------------------------------------------------------------------------- lanes


def lane_state(a: LaneAllocator) -> Any:
    return a.held_groups(), a.free_lanes(), [a.free_lanes(p) for p in range(len(a.port_lanes))]


@settings(max_examples=60, deadline=None)
@given(
    ports=st.lists(st.sampled_from(LINK_WIDTHS), min_size=1, max_size=8),
    seed=st.integers(0, 2**32),
)
def test_lanes_behave_identically(ports: list[int], seed: int) -> None:
    rng = random.Random(seed)
    py, c = LaneAllocator(ports), CLaneAllocator(ports)
    total = sum(ports)
    excluded = frozenset(rng.sample(range(total), rng.randint(0, min(4, total))))
    held: list[LaneGroup] = []
    for _ in range(100):
        r = rng.random()
        if r < 0.45:
            width = rng.choice([*LINK_WIDTHS, 3, 32])
            port = rng.choice([None, None, rng.randrange(len(ports)), len(ports)])
            exclude = rng.choice([(), excluded, excluded, [total]])
            kind, got = same(py, c, "allocate", width, port=port, exclude=exclude)
            if kind == "ok":
                held.append(got)
        elif r < 0.75 and held:
            group = held.pop(rng.randrange(len(held)))
            if rng.random() < 0.15:  # release twice, or a half of it
                held.append(group)
                if group.width > 1:
                    group = replace(group, width=group.width // 2)
            same(py, c, "release", group)
        else:
            p = rng.randrange(len(ports))
            width = rng.choice([w for w in LINK_WIDTHS if w <= ports[p]])
            first = py.port_range(p).start + rng.randrange(0, ports[p], width)
            group = LaneGroup(p, first + rng.choice([0, 0, 0, 1]), width)
            kind, _ = same(py, c, "allocate_exact", group)
            if kind == "ok":
                held.append(group)
            same(py, c, "is_free", group)
        assert lane_state(py) == lane_state(c)


# ------------------------------------------------------------------------------ memory


def memory_state(a: ExtentAllocator) -> Any:
    return a.free_extents(), a.free_granules, a.largest_free


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 5000), seed=st.integers(0, 2**32))
def test_memory_behaves_identically(total: int, seed: int) -> None:
    rng = random.Random(seed)
    py, c = ExtentAllocator(total), CExtentAllocator(total)
    held: list[Extent] = []
    for _ in range(150):
        r = rng.random()
        if r < 0.4:
            n = rng.choice(
                [rng.randint(1, max(1, total // 8)), rng.randint(1, total), 0, total + 1]
            )
            contiguous = rng.random() < 0.4
            max_extents = rng.choice([64, 1, 2, 3, 0])
            kind, got = same(py, c, "allocate", n, contiguous=contiguous, max_extents=max_extents)
            if kind == "ok":
                held.extend(got)
        elif r < 0.7 and held:
            e = held.pop(rng.randrange(len(held)))
            if e.length > 1 and rng.random() < 0.3:  # give back a part (shrink)
                cut = rng.randint(1, e.length - 1)
                held.append(Extent(e.start, cut))
                e = Extent(e.start + cut, e.length - cut)
            batch = [e]
            if rng.random() < 0.1:
                batch.append(rng.choice([e, Extent(total, 1)]))  # overlap or out of range
            same(py, c, "release", batch)
        elif r < 0.85 and held:
            i = rng.randrange(len(held))
            grow = rng.choice([1, 2, 50, 0])
            kind, got = same(py, c, "extend", held[i], grow)
            if kind == "ok" and got is not None:
                held[i] = got
        else:
            start = rng.randrange(total)
            e = Extent(start, rng.randint(1, max(1, min(total - start, 40))))
            kind, _ = same(py, c, "allocate_at", [e])
            if kind == "ok":
                held.append(e)
        probe = Extent(rng.randrange(total), 1)
        same(py, c, "is_free", probe)
        same(py, c, "any_free", probe)
        same(py, c, "free_run_at", probe.start)
        assert memory_state(py) == memory_state(c)


def test_memory_treaps_stay_consistent_on_a_large_device() -> None:
    """2^20 granules, thousands of free extents: the same answers as sortedcontainers."""
    total = 1 << 20
    py, c = ExtentAllocator(total), CExtentAllocator(total)
    rng = random.Random(7)
    held: list[Extent] = []
    for _ in range(4000):  # small pieces, then every other one back: thousands of holes
        n = rng.randint(1, 8)
        pieces = py.allocate(n, contiguous=True)
        assert c.allocate(n, contiguous=True) == pieces
        held.extend(pieces)
    for e in held[::2]:
        py.release([e])
        c.release([e])
    held = held[1::2]
    assert memory_state(py) == memory_state(c)
    assert len(c.free_extents()) > 1000
    for _ in range(6000):
        if held and rng.random() < 0.45:
            batch = [held.pop(rng.randrange(len(held)))]
            same(py, c, "release", batch)
        else:
            n = rng.choice([1, 2, 3, 7, 64, 300])
            contiguous = rng.random() < 0.5
            got = same(py, c, "allocate", n, contiguous=contiguous)
            if got[0] == "ok":
                held.extend(got[1])
    assert memory_state(py) == memory_state(c)


# ----------------------------------------------------------------------- the allocator


def devices() -> list[Device]:
    """The default device and smaller odd ones, where refusals are frequent."""
    small = replace(
        BASE,
        cluster_sizes=(3, 5, 2),
        memory_bytes=BASE.granule_bytes * 300,
        max_extents_per_slice=3,
        port_lanes=(4, 2, 1),
        endpoints=(Endpoint("nvme0", "nvme", 0, 0, 2),),
        keys=4,
        crossbar=replace(BASE.crossbar, ports=6),
    )
    return [BASE, small]


def allocator(device: Device, enabled: str, monkeypatch: pytest.MonkeyPatch) -> Allocator:
    monkeypatch.setenv(fastpath.ENV, enabled)
    a = Allocator(device)
    assert a.fastpath == (enabled == "1")
    return a


def snapshot(a: Allocator) -> Any:
    return (
        a.cores.free_ids(),
        a.memory.free_extents(),
        a.lanes.held_groups(),
        list(a.key_owner),
        [p.demand() for p in a.ports],
        {sid: s.to_dict(a.device.granule_bytes) for sid, s in a.slices.items()},
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("which", [0, 1])
def test_the_allocator_gives_identical_results_on_seeded_workloads(
    seed: int, which: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = devices()[which]
    py, c = allocator(device, "0", monkeypatch), allocator(device, "1", monkeypatch)
    rng = random.Random(seed)
    g = device.granule_bytes

    def to_dict(s: Slice) -> dict[str, Any]:
        return s.to_dict(g)

    def state(s: Slice) -> SliceState:
        return s.state

    live: list[int] = []
    for step in range(400):
        r = rng.random()
        if not live or r < 0.5:
            spec = random_spec(rng, f"vm-{rng.randrange(6)}", g, ports=rng.randint(0, 2))
            if rng.random() < 0.15:
                spec = replace(spec, lanes=rng.choice([None, *spec_lanes(device)]))
            kind, got = same(py, c, "allocate", spec, post=to_dict)
            if kind == "ok":
                live.append(got["id"])
        elif r < 0.75:
            sid = rng.choice(live)
            mem = py.slices[sid].alloc.granules * g
            rs = random_resize(rng, mem, g, qos=bool(py.slices[sid].alloc.ports))
            same(py, c, "resize", sid, rs, post=to_dict)
        else:
            sid = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.3:  # the manager's two-step free
                same(py, c, "begin_release", sid, post=state)
            same(py, c, "release", sid, post=state)
        assert snapshot(py) == snapshot(c), f"step {step}"
        if step % 50 == 0:
            assert c.check_invariants() == []
    assert c.check_invariants() == [] and py.check_invariants() == []


def spec_lanes(device: Device) -> list[Any]:
    from firmware.slices import LaneRequest

    out: list[Any] = [LaneRequest(w) for w in LINK_WIDTHS if w <= max(device.port_lanes)]
    out += [LaneRequest(e.width, endpoint=e.name) for e in device.endpoints]
    out.append(LaneRequest(1, first=device.lanes - 1))
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_restore_and_refusals_match(data: st.DataObject) -> None:
    """Recovery re-takes exact units: the C pools accept and refuse exactly like Python."""
    with pytest.MonkeyPatch.context() as mp:
        py, c = allocator(BASE, "0", mp), allocator(BASE, "1", mp)
        mp.setenv(fastpath.ENV, "0")
        source = Allocator(BASE)
    slices = []
    for i in range(data.draw(st.integers(1, 12))):
        spec = SliceSpec.from_dict(
            {
                "owner": f"vm-{i % 3}",
                "cores": {"count": data.draw(st.integers(1, 5))},
                "memory": {"size": data.draw(st.sampled_from(["2 MiB", "64 MiB", "1 GiB"]))},
                "lanes": {"width": data.draw(st.sampled_from([1, 2]))},  # 12 x2 fit in 24
            }
        )
        slices.append(source.allocate(spec))
    order = data.draw(st.permutations(slices))
    duplicate = data.draw(st.booleans())
    for s in [*order, order[0]] if duplicate else order:
        fresh = replace(s)
        # each side gets its own Slice object: an allocator keeps the one it restores
        assert outcome(py, "restore", replace(fresh)) == outcome(c, "restore", replace(fresh))
        assert snapshot(py) == snapshot(c)


# ------------------------------------------------- the whole transaction in C (issue 5)


def full_snapshot(a: Allocator) -> Any:
    """Everything observable, the key and port bookkeeping (C views on the fast path) too."""
    ports = [(p.owner, p.slices, p.quarantined, p.guaranteed_mbps, p.limit_mbps) for p in a.ports]
    return (
        snapshot(a),
        list(a.key_users),
        ports,
        [(p.priorities, p.keys) for p in a.ports],
        sorted(a.withdrawn),
        a.next_id,
        a.utilisation(),
    )


@st.composite
def small_devices(draw: st.DrawFn) -> Device:
    """Devices small enough that every kind of refusal happens, up to 64 crossbar ports."""
    port_lanes = tuple(draw(st.lists(st.sampled_from([1, 2, 4, 8, 16]), min_size=1, max_size=3)))
    endpoints: tuple[Endpoint, ...] = ()
    if draw(st.booleans()):
        width = draw(st.sampled_from([w for w in LINK_WIDTHS if w <= port_lanes[0]]))
        endpoints = (Endpoint("nvme0", "nvme", 0, 0, width),)
    return replace(
        BASE,
        cluster_sizes=tuple(draw(st.lists(st.integers(1, 8), min_size=1, max_size=4))),
        memory_bytes=BASE.granule_bytes * draw(st.integers(8, 32)),
        max_extents_per_slice=draw(st.integers(1, 4)),
        port_lanes=port_lanes,
        endpoints=endpoints,
        keys=draw(st.integers(1, 16)),
        crossbar=replace(BASE.crossbar, ports=draw(st.integers(1, 64))),
    )


def specs(device: Device) -> st.SearchStrategy[SliceSpec]:
    """Slice specs as a client or a slice file could give them, mostly memory (so that
    memory fills and fragments), and some that only code building a SliceSpec directly
    could (out-of-range keys, widths, bandwidth)."""
    from firmware.slices import CoreRequest, LaneRequest, MemoryRequest, QoS

    g = device.granule_bytes

    def rarely(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
        return st.one_of(st.none(), st.none(), st.none(), strategy)

    cores = rarely(
        st.one_of(
            st.builds(CoreRequest, st.integers(1, device.cores), st.none(), st.booleans()),
            st.builds(CoreRequest, st.just(device.cores + 1)),  # more than the device has
            st.lists(st.integers(0, device.cores), min_size=1, max_size=3, unique=True).map(
                lambda ids: CoreRequest(len(ids), tuple(sorted(ids)))
            ),
        )
    )
    size = st.integers(1, 13).map(lambda n: g + 1 if n == 13 else n * g)  # 13: not whole
    memory = st.tuples(st.integers(0, 7), size, st.booleans()).map(
        lambda t: None if t[0] == 5 else MemoryRequest(t[1], t[2])  # mostly memory
    )
    lanes = rarely(
        st.one_of(
            st.builds(LaneRequest, st.sampled_from([1, 2, 4, 8, 16, 32])),
            st.builds(LaneRequest, st.sampled_from([1, 2, 4]), st.just("nvme0")),
            st.builds(
                LaneRequest, st.sampled_from([1, 2]), st.none(), st.integers(0, device.lanes - 1)
            ),
        )
    )
    bandwidth = st.sampled_from([0, 0, 0, 10, 50_000, device.crossbar.port_mbps, 10**6])
    return st.builds(
        SliceSpec,
        owner=st.sampled_from(["vm-a", "vm-b", "vm-c", "vm-d"]),
        cores=cores,
        memory=memory,
        lanes=lanes,
        key=rarely(st.integers(-1, 17)),
        ports=st.integers(0, 4),
        qos=st.builds(QoS, st.integers(0, 7), bandwidth, bandwidth),
    )


@settings(
    # under `make sanitize` (the ASan build) a few examples: the C paths are the same
    max_examples=6 if os.environ.get(fastpath.MODULE_ENV) else 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(device=small_devices(), data=st.data())
def test_whole_transactions_match_the_reference(device: Device, data: st.DataObject) -> None:
    """Allocate (C's one-call transaction), two-step and one-step release, resize and
    recovery (the reference's steps over C primitives) on random devices: every call gives
    the same result or the same exception, and everything observable stays equal."""
    with pytest.MonkeyPatch.context() as mp:
        py, c = allocator(device, "0", mp), allocator(device, "1", mp)
    g = device.granule_bytes
    freed: list[Slice] = []
    for step in range(data.draw(st.integers(20, 80), label="steps")):
        live = sorted(py.slices)
        # releases between allocations fragment the small memory: contiguity then matters
        op = data.draw(st.sampled_from(["allocate"] * 5 + ["release"] * 3 + ["resize", "restore"]))
        if op == "allocate" or (not live and op != "restore"):
            spec = data.draw(specs(device), label="spec")
            same(py, c, "allocate", spec, post=lambda s: s.to_dict(g))
        elif op == "resize":
            sid = data.draw(st.sampled_from(live))
            rs = random_resize(random.Random(step), py.slices[sid].alloc.granules * g, g)
            same(py, c, "resize", sid, rs, post=lambda s: s.to_dict(g))
        elif op == "release":
            sid = data.draw(st.sampled_from(live))
            freed.append(replace(py.slices[sid], state=SliceState.RESERVED))
            if data.draw(st.booleans(), label="two-step"):
                same(py, c, "begin_release", sid, post=lambda s: s.state)
                assert py.port_demand() == c.port_demand()  # withdrawn from the image
            same(py, c, "release", sid, post=lambda s: s.state)
        elif freed:  # recovery re-takes a freed slice's units, or is refused
            old = data.draw(st.sampled_from(freed))
            assert outcome(py, "restore", replace(old)) == outcome(c, "restore", replace(old))
        assert full_snapshot(py) == full_snapshot(c), f"step {step}"
    assert c.check_invariants() == [] and py.check_invariants() == []


def test_the_fast_path_is_one_c_transaction_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """allocate and release reach C once each, through the transaction entry points; the
    unit allocators' own entry points are not called on the way."""
    from firmware.fastalloc import CAllocator

    monkeypatch.setenv(fastpath.ENV, "1")
    a = Allocator(BASE)
    assert isinstance(a, CAllocator)
    calls: list[str] = []

    class Spy:
        def __init__(self, lib: Any) -> None:
            self._lib = lib

        def __getattr__(self, name: str) -> Any:
            value = getattr(self._lib, name)
            if name.startswith("sf_") and callable(value):

                def spy(*args: Any) -> Any:
                    calls.append(name)
                    return value(*args)

                return spy
            return value

    lib = a._l
    a._l = Spy(lib)
    a._allocate_simple = a._l.sf_alloc_allocate_simple
    a._release = a._l.sf_alloc_release
    for unit in (a.cores, a.memory, a.lanes):  # the twins' own calls would show up too
        unit._c.lib = Spy(unit._c.lib)  # type: ignore[attr-defined]
    for kw in ({"memory": {"size": "64 MiB"}}, {"cores": {"count": 2}, "lanes": {"width": 2}}):
        s = a.allocate(SliceSpec.from_dict({"owner": "vm-a", **kw}))
        a.release(s.id)
    assert calls == ["sf_alloc_allocate_simple", "sf_alloc_release"] * 2
    assert a.check_invariants() == []


def test_a_missing_extension_is_an_import_error_for_the_allocator() -> None:
    """SLICEFAB_FASTPATH=0 still selects the reference; with it unset the C class is built."""
    with fastpath.selected(False):
        assert type(Allocator(BASE)) is Allocator
    with fastpath.selected(True):
        assert type(Allocator(BASE)).__name__ == "CAllocator"
