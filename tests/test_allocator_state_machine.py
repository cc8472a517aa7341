"""Model-based run of the allocator on the default device: random allocations for a few VMs
(many refused), resizes and releases, checked after every step against a deliberately
simple model — slice id -> owner and the amounts it holds — and against the allocator's
own invariant checker. A refused call must change nothing; when everything is freed, every
pool is back to its initial state exactly. Slices may sit in RELEASING (out of their ports,
still holding their other units) while other VMs go on allocating."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from firmware.allocator import Allocator
from firmware.errors import (
    InsufficientResources,
    LifecycleError,
    NotFound,
    RequestError,
    SlicefabError,
)
from firmware.inventory import Device, load_device
from firmware.resources.memory import Extent
from firmware.slices import Allocation, QoS, ResizeSpec, Slice, SliceSpec, SliceState

DEVICE: Device = load_device()
GRANULE = DEVICE.granule_bytes
CAP = DEVICE.crossbar.port_mbps
VMS = [f"vm-{i}" for i in range(6)]


@dataclass(frozen=True)
class Held:
    """What the model knows about one slice: its owner and the amounts it asked for."""

    owner: str
    cores: int
    memory: int  # bytes
    width: int  # lanes
    ports: int
    guaranteed: int  # Mbit/s, per port


def held_from(spec: SliceSpec) -> Held:
    return Held(
        owner=spec.owner,
        cores=spec.cores.count if spec.cores else 0,
        memory=spec.memory.size if spec.memory else 0,
        width=spec.lanes.width if spec.lanes else 0,
        ports=spec.ports,
        guaranteed=spec.qos.guaranteed_mbps,
    )


def snapshot(a: Allocator) -> dict[str, Any]:
    """Everything observable about the allocator's state."""
    return {
        "free_core_ids": a.cores.free_ids(),
        "free_extents": a.memory.free_extents(),
        "free_lanes": [a.lanes.free_lanes(p) for p in range(len(DEVICE.port_lanes))],
        "lane_groups": a.lanes.held_groups(),
        "key_owner": list(a.key_owner),
        "key_users": list(a.key_users),
        "port_demand": a.port_demand(),
        "port_slices": [p.slices for p in a.ports],
        "slices": sorted((s.to_dict(GRANULE) for s in a.slices.values()), key=lambda d: d["id"]),
        "releasing": sorted(a._withdrawn),
        "next_id": a.next_id,
    }


def pools(a: Allocator) -> dict[str, Any]:
    """The free pools and port/key bookkeeping, without the slice-id counter."""
    snap = snapshot(a)
    del snap["next_id"]
    return snap


# ---------------------------------------------------------------- request strategies


@st.composite
def slice_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Small slice requests: mostly valid for the device, some not (refused by validate)."""
    d: dict[str, Any] = {"owner": draw(st.sampled_from(VMS))}
    parts = draw(st.sets(st.sampled_from(["cores", "memory", "lanes"]), min_size=1))
    if "cores" in parts:
        if draw(st.integers(0, 4)) == 0:
            d["cores"] = {"ids": draw(st.lists(st.integers(0, 63), min_size=1, max_size=3,
                                               unique=True))}  # fmt: skip
        else:
            same_cluster = draw(st.booleans())
            top = 9 if same_cluster and draw(st.integers(0, 9)) else 16  # 9: sometimes too many
            d["cores"] = {"count": draw(st.integers(1, top)), "same_cluster": same_cluster}
    if "memory" in parts:
        granules = draw(st.one_of(st.integers(1, 64), st.integers(1, 12_000)))
        size = granules * GRANULE + (4096 if draw(st.integers(0, 19)) == 0 else 0)
        d["memory"] = {"size": size, "contiguous": draw(st.booleans())}
    if "lanes" in parts:
        if draw(st.integers(0, 3)) == 0:
            d["lanes"] = {
                "width": draw(st.sampled_from([4, 4, 4, 2])),
                "endpoint": draw(st.sampled_from(["nvme0", "nvme1"])),
            }
        else:
            d["lanes"] = {"width": draw(st.sampled_from([1, 2, 4, 8]))}
    if draw(st.integers(0, 3)) == 0:
        # usually the key this VM tends to get, sometimes any key (often another VM's)
        d["key"] = draw(st.sampled_from([VMS.index(d["owner"]), draw(st.integers(0, 15))]))
    ports = draw(st.integers(0, 3))
    d["ports"] = ports
    qos: dict[str, Any] = {"priority": draw(st.integers(0, 7))}
    if ports:
        qos["maximum"] = draw(st.sampled_from([0, 60_000, CAP]))
        qos["guaranteed"] = draw(st.sampled_from([0, 0, 10_000, 30_000, 60_000]))
    d["qos"] = qos
    return d


@st.composite
def resize_requests(draw: st.DrawFn, held: Held) -> dict[str, Any]:
    """Mostly resizes of what the slice has; now and then anything (refused if it has not)."""
    anything = draw(st.integers(0, 9)) == 0
    kinds = [
        k
        for k, has in (("memory", held.memory), ("cores", held.cores), ("qos", held.ports))
        if has or anything
    ] or ["qos"]
    d: dict[str, Any] = {}
    for kind in draw(st.sets(st.sampled_from(kinds), min_size=1)):
        if kind == "memory":
            size = draw(st.integers(1, 12_000)) * GRANULE
            d["memory"] = size + (4096 if draw(st.integers(0, 19)) == 0 else 0)
        elif kind == "cores":
            d["cores"] = draw(st.integers(1, 16))
        else:
            q: dict[str, Any] = {}
            if draw(st.booleans()):
                q["priority"] = draw(st.integers(0, 7))
            if draw(st.booleans()):
                q["guaranteed"] = draw(st.sampled_from([0, 10_000, 30_000, 60_000]))
            if draw(st.booleans()):
                q["maximum"] = draw(st.sampled_from([0, 20_000, CAP]))
            d["qos"] = q
    return d


# ---------------------------------------------------------------- the machine


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.a = Allocator(DEVICE)
        self.initial = pools(self.a)
        self.model: dict[int, Held] = {}  # live (RESERVED) slices
        self.releasing: dict[int, Held] = {}  # begin_release done, release not yet

    # -------------------------------------------------------------- helpers

    def refused(self, call: Any, before: dict[str, Any]) -> SlicefabError | None:
        """Run ``call``; if it raises, the state must be exactly ``before``."""
        try:
            call()
        except SlicefabError as e:
            assert snapshot(self.a) == before, f"{type(e).__name__} changed the state: {e}"
            return e
        return None

    def holding(self) -> list[Held]:
        """Every slice that still holds units: live and releasing."""
        return [*self.model.values(), *self.releasing.values()]

    def free_cores(self) -> int:
        return DEVICE.cores - sum(h.cores for h in self.holding())

    # -------------------------------------------------------------- rules

    @rule(request=slice_requests())
    def allocate(self, request: dict[str, Any]) -> None:
        spec = SliceSpec.from_dict(request)
        before = snapshot(self.a)
        got: list[Slice] = []
        err = self.refused(lambda: got.append(self.a.allocate(spec)), before)
        event(f"allocate: {type(err).__name__ if err else 'ok'}")
        if err is not None:
            if isinstance(err, InsufficientResources) and err.details["resource"] == "cores":
                # the only reason to refuse plain cores is that there are not enough free
                assert spec.cores is not None
                if spec.cores.ids is None and not spec.cores.same_cluster:
                    assert self.free_cores() < spec.cores.count
            return
        s = got[0]
        assert s.id not in self.model and s.id not in self.releasing
        assert s.state is SliceState.RESERVED
        assert s.spec == spec
        self.model[s.id] = held_from(spec)

    @rule(owner=st.sampled_from(VMS), count=st.integers(1, 16))
    def allocate_plain_cores(self, owner: str, count: int) -> None:
        """Cores without affinity, no port, the VM's own key: refused iff too few are free."""
        has_key = owner in self.a.key_owner
        spec = SliceSpec.from_dict({"owner": owner, "cores": {"count": count}, "ports": 0})
        before = snapshot(self.a)
        got: list[Slice] = []
        err = self.refused(lambda: got.append(self.a.allocate(spec)), before)
        if has_key or None in self.a.key_owner:
            assert (err is None) == (self.free_cores() >= count), err
        if got:
            self.model[got[0].id] = held_from(spec)

    @precondition(lambda self: any(h.ports for h in self.model.values()))
    @rule(data=st.data(), guaranteed=st.sampled_from([0, 10_000, 20_000, 40_000]))
    def allocate_next_to_own_slices(self, data: st.DataObject, guaranteed: int) -> None:
        """A VM's new slice joins one of its own ports that has the headroom, if any."""
        owner = data.draw(
            st.sampled_from(sorted({h.owner for h in self.model.values() if h.ports}))
        )
        demand = self.a.port_demand()
        own = [p for p, d in enumerate(demand) if d.owner == owner]
        fits = [p for p in own if demand[p].guaranteed_mbps + guaranteed <= CAP]
        free = [p for p, st_ in enumerate(self.a.ports) if st_.owner is None]  # not quarantined
        # policy: the VM's own port with the fewest slices, else the lowest free port
        expected = (
            min(fits, key=lambda p: (self.a.ports[p].slices, p)) if fits else min(free, default=-1)
        )
        spec = SliceSpec.from_dict(
            {"owner": owner, "memory": {"size": GRANULE}, "qos": {"guaranteed": guaranteed}}
        )
        got: list[Slice] = []
        err = self.refused(lambda: got.append(self.a.allocate(spec)), snapshot(self.a))
        event(f"allocate next to own slices: {type(err).__name__ if err else 'ok'}")
        if got:
            assert got[0].alloc.ports == (expected,)
            self.model[got[0].id] = held_from(spec)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.model)))
        old = self.model[sid]
        rs = ResizeSpec.from_dict(data.draw(resize_requests(old)))
        before = snapshot(self.a)
        err = self.refused(lambda: self.a.resize(sid, rs), before)
        event(f"resize: {type(err).__name__ if err else 'ok'}")
        if err is not None:
            return
        new = old
        if rs.memory is not None and old.memory:
            new = replace(new, memory=rs.memory)
        if rs.cores is not None and old.cores:
            new = replace(new, cores=rs.cores)
        if rs.qos is not None and rs.qos.guaranteed_mbps >= 0:
            new = replace(new, guaranteed=rs.qos.guaranteed_mbps)
        self.model[sid] = new
        # a resize never changes what cannot change on a live slice
        s = self.a.get(sid)
        assert s.owner == old.owner and len(s.alloc.ports) == old.ports
        assert (s.alloc.lanes.width if s.alloc.lanes else 0) == old.width

    @precondition(lambda self: any(h.ports for h in self.model.values()))
    @rule(data=st.data(), over=st.booleans())
    def resize_guaranteed_to_the_ports_headroom(self, data: st.DataObject, over: bool) -> None:
        """QoS resize re-admits: raising a slice's guaranteed bandwidth by exactly the
        headroom left on its fullest port is admitted; one Mbit/s more is refused (by
        admission when other slices share the port, else as above a port's capacity)."""
        demand = self.a.port_demand()

        def others(sid: int) -> int:  # guaranteed of the other slices on its fullest port
            s = self.a.slices[sid]
            return (
                max(demand[p].guaranteed_mbps for p in s.alloc.ports) - s.spec.qos.guaranteed_mbps
            )

        candidates = sorted(k for k, h in self.model.items() if h.ports)
        shared = [k for k in candidates if others(k) > 0]
        sid = data.draw(st.sampled_from(shared if shared and over else candidates))
        s = self.a.get(sid)
        headroom = min(CAP - demand[p].guaranteed_mbps for p in s.alloc.ports)
        target = s.spec.qos.guaranteed_mbps + headroom + over
        rs = ResizeSpec(qos=QoS(priority=-1, guaranteed_mbps=target, max_mbps=0))
        err = self.refused(lambda: self.a.resize(sid, rs), snapshot(self.a))
        event(f"resize to headroom{' + 1' if over else ''}: {type(err).__name__ if err else 'ok'}")
        if not over:
            assert err is None, err
            self.model[sid] = replace(self.model[sid], guaranteed=target)
            assert max(self.a.port_demand()[p].guaranteed_mbps for p in s.alloc.ports) == CAP
        elif target > CAP:
            assert isinstance(err, RequestError) and err.field == "qos.guaranteed", err
        else:
            assert isinstance(err, InsufficientResources), err

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def begin_release(self, data: st.DataObject) -> None:
        """Withdraw a slice from its ports; it keeps its other units until finish_release."""
        sid = data.draw(st.sampled_from(sorted(self.model)))
        self.a.begin_release(sid)
        self.releasing[sid] = self.model.pop(sid)
        before = snapshot(self.a)
        assert isinstance(self.refused(lambda: self.a.begin_release(sid), before), LifecycleError)
        err = self.refused(lambda: self.a.resize(sid, ResizeSpec(qos=QoS(-1, 0, -1))), before)
        assert err is not None, "a RELEASING slice was resized"

    @precondition(lambda self: self.releasing)
    @rule(data=st.data())
    def finish_release(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.releasing)))
        assert self.a.release(sid).state is SliceState.FREED
        del self.releasing[sid]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.model)))
        s = self.a.get(sid)
        free_before = self.a.cores.free_count(), self.a.memory.free_granules
        self.a.begin_release(sid)
        assert self.a.check_invariants() == []
        before = snapshot(self.a)
        again = self.refused(lambda: self.a.begin_release(sid), before)
        assert isinstance(again, LifecycleError)
        self.a.release(sid)
        assert s.state is SliceState.FREED
        held = self.model.pop(sid)
        assert self.a.cores.free_count() == free_before[0] + held.cores
        assert self.a.memory.free_granules == free_before[1] + held.memory // GRANULE

    @rule(sid=st.integers(0, 200))
    def release_unknown(self, sid: int) -> None:
        if sid in self.a.slices:
            return
        before = snapshot(self.a)
        err = self.refused(lambda: self.a.release(sid), before)
        assert isinstance(err, NotFound)
        err = self.refused(lambda: self.a.resize(sid, ResizeSpec(cores=1)), before)
        assert isinstance(err, NotFound)

    @precondition(lambda self: self.model and not self.releasing)
    @rule()
    def restore_reproduces_the_state(self) -> None:
        b = Allocator(DEVICE)
        for s in sorted(self.a.slices.values(), key=lambda s: s.id):
            copy = Slice(
                s.id,
                SliceSpec.from_dict(s.spec.to_dict()),
                Allocation.from_dict(s.alloc.to_dict()),
            )
            b.restore(copy)
            copy.transition(SliceState.RESERVED)
        assert pools(b) == pools(self.a)
        assert b.check_invariants() == []

    @precondition(lambda self: len(self.model) >= 4)
    @rule()
    def release_everything(self) -> None:
        self._release_all()

    def _release_all(self) -> None:
        event(f"slices live at release-all: {min(len(self.model), 10)}")
        for sid in sorted(self.model):
            self.a.begin_release(sid)
            self.a.release(sid)
            assert self.a.check_invariants() == []
        for sid in sorted(self.releasing):
            self.a.release(sid)
            assert self.a.check_invariants() == []
        self.model.clear()
        self.releasing.clear()
        assert pools(self.a) == self.initial
        assert self.a.memory.free_extents() == [Extent(0, DEVICE.granules)]
        assert self.a.cores.free_ids() == list(range(DEVICE.cores))
        assert self.a.lanes.free_lanes() == DEVICE.lanes
        assert all(k is None for k in self.a.key_owner)
        assert all(p.owner is None and p.guaranteed_mbps == 0 for p in self.a.port_demand())

    def teardown(self) -> None:
        self._release_all()

    # -------------------------------------------------------------- invariants

    @invariant()
    def allocator_invariants_hold(self) -> None:
        assert self.a.check_invariants() == []

    @invariant()
    def model_agrees_with_the_allocator(self) -> None:
        a = self.a
        assert set(a.slices) == set(self.model) | set(self.releasing)
        for state, table in (
            (SliceState.RESERVED, self.model),
            (SliceState.RELEASING, self.releasing),
        ):
            for sid, h in table.items():
                s = a.slices[sid]
                assert s.state is state
                assert s.owner == h.owner
                assert len(s.alloc.cores) == h.cores
                assert s.alloc.granules * GRANULE == h.memory
                assert (s.alloc.lanes.width if s.alloc.lanes else 0) == h.width
                assert len(s.alloc.ports) == h.ports
                assert s.spec.qos.guaranteed_mbps == h.guaranteed
        used = {k: v["used"] for k, v in a.utilisation().items()}
        held = self.holding()  # units are held until release()...
        assert used["cores"] == sum(h.cores for h in held)
        assert used["memory_granules"] == sum(h.memory for h in held) // GRANULE
        assert used["lanes"] == sum(h.width for h in held)
        assert used["keys"] == len({s.alloc.key for s in a.slices.values()})
        # guaranteed bandwidth leaves the ports at begin_release(); the ports themselves stay
        # held (quarantined) until release(), so no other VM gets them while still in use
        assert used["guaranteed_mbps"] == sum(h.guaranteed * h.ports for h in self.model.values())
        assert used["ports"] == len({p for s in a.slices.values() for p in s.alloc.ports})

    @invariant()
    def vms_are_isolated(self) -> None:
        """Recomputed here, independently of check_invariants: a key or a port belongs to
        one VM; the guaranteed bandwidth on a port fits its capacity."""
        key_vm: dict[int, set[str]] = {}
        port_vm: dict[int, set[str]] = {}
        port_g: dict[int, int] = {}
        for s in self.a.slices.values():
            key_vm.setdefault(s.alloc.key, set()).add(s.owner)
            if s.id in self.releasing:
                continue  # its ports were given back by begin_release()
            for p in s.alloc.ports:
                port_vm.setdefault(p, set()).add(s.owner)
                port_g[p] = port_g.get(p, 0) + s.spec.qos.guaranteed_mbps
        assert all(len(v) == 1 for v in key_vm.values())
        assert all(len(v) == 1 for v in port_vm.values())
        assert all(g <= CAP for g in port_g.values())
        for k, vms in key_vm.items():
            assert self.a.key_owner[k] in vms


AllocatorMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# A passing run takes ~10 s. A failing one is shrunk for up to Hypothesis's 300 s shrink
# budget, the project's default pytest timeout: without more room the timeout kills the
# shrink and the minimal failing example is lost.
TestAllocatorStateMachine = pytest.mark.timeout(900)(AllocatorMachine.TestCase)
