"""The allocator: the Resource Allocation Manager's policy core, pure Python, in memory.

It turns a :class:`SliceSpec` into held units (cores, memory extents, a lane group, a
protection key, crossbar ports with admitted bandwidth), resizes live slices and gives
units back. It does no I/O: durability is the ledger's job, programming the fabric the
fabric driver's; :mod:`firmware.manager` sequences the three.

Every operation is all-or-nothing: it validates the whole request against the device
before taking anything, and if taking one resource fails it gives back what it took.

Isolation domain: protection keys and crossbar ports are held by a *VM*, shared by that
VM's slices and never by two VMs, so the fabric's permission table (which input port may
reach which output port) can isolate VMs from one another. Bandwidth QoS applies per
crossbar port of a slice: the guaranteed bandwidth of all slices on a port never exceeds
its capacity (admission control); the maximum is enforced by the port's token bucket.

This class is the pure-Python reference. Unless ``SLICEFAB_FASTPATH=0``, ``Allocator(device)``
builds its C twin, :class:`firmware.fastalloc.CAllocator`: same interface, same results
(``tests/test_fastpath_alloc.py``), with an allocation's and a release's whole transaction
(key, ports, cores, memory, lanes) in one C call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableSequence
from dataclasses import dataclass, field, replace

from firmware import fastpath
from firmware.errors import (
    InsufficientResources,
    NotFound,
    RequestError,
    ResourceConflict,
)
from firmware.fabric.image import PortDemand, demand_from_slices
from firmware.inventory import Device
from firmware.resources.cores import CoreAllocator
from firmware.resources.lanes import LaneAllocator, LaneGroup
from firmware.resources.memory import Extent, ExtentAllocator
from firmware.slices import (
    MAX_PRIORITY,
    Allocation,
    CoreRequest,
    MemoryRequest,
    QoS,
    ResizeSpec,
    Slice,
    SliceSpec,
    SliceState,
)
from firmware.units import format_bandwidth, format_size


@dataclass
class PortState:
    """One crossbar port: the VM holding it and the running totals of its slices' QoS,
    kept incrementally so that the fabric image costs O(ports), not O(slices)."""

    owner: str | None = None
    slices: int = 0  # slices whose traffic the port carries (in the fabric image)
    # slices withdrawn from the image but not yet released: the port stays held by the VM
    # (so no other VM can take it) until the fabric has confirmed the withdrawal
    quarantined: int = 0
    guaranteed_mbps: int = 0
    limit_mbps: int = 0
    priorities: list[int] = field(default_factory=lambda: [0] * (MAX_PRIORITY + 1))
    keys: dict[int, int] = field(default_factory=dict)  # key -> slices using it here
    # the PortDemand of the totals above; reset by every change (_claim_ports/_give_ports)
    cached: PortDemand | None = field(default=None, repr=False, compare=False)

    def demand(self) -> PortDemand:
        if self.cached is None:
            self.cached = self.compute_demand()
        return self.cached

    def compute_demand(self) -> PortDemand:
        """The demand from the totals, bypassing the cache (for the invariant checker).
        A port held only by quarantined slices carries nothing: reset configuration."""
        if self.slices == 0:
            return PortDemand()
        top = max((p for p, n in enumerate(self.priorities) if n), default=0)
        mask = 0
        for k in self.keys:
            mask |= 1 << k
        return PortDemand(self.owner, top, self.guaranteed_mbps, self.limit_mbps, mask)


class Allocator:
    """Allocate, resize and free slices on one device. Not thread-safe: the manager locks.

    ``Allocator(device)`` is the C fast path (:class:`firmware.fastalloc.CAllocator`, a
    subclass) unless ``SLICEFAB_FASTPATH=0`` selects this pure-Python reference.
    """

    fastpath = False
    # who holds each key and how many slices use it; each crossbar port's totals
    key_owner: MutableSequence[str | None]
    key_users: MutableSequence[int]
    ports: list[PortState]

    def __new__(cls, device: Device) -> Allocator:
        if cls is Allocator and fastpath.enabled():
            from firmware.fastalloc import CAllocator

            cls = CAllocator
        return super().__new__(cls)

    def __init__(self, device: Device) -> None:
        self._setup(device)
        self.cores: CoreAllocator = CoreAllocator(device.cluster_sizes)
        self.memory: ExtentAllocator = ExtentAllocator(device.granules)
        self.lanes: LaneAllocator = LaneAllocator(device.port_lanes)
        self.key_owner = [None] * device.keys
        self.key_users = [0] * device.keys
        self.ports = [PortState() for _ in range(device.crossbar.ports)]
        # VM -> the ports it holds (PortState.owner), so that picking a VM's ports does not
        # scan every port; check_invariants() recomputes it from self.ports
        self._vm_ports: dict[str, set[int]] = {}
        self._free_ports: set[int] = set(range(device.crossbar.ports))  # held by no VM

    def _setup(self, device: Device) -> None:
        """What both paths keep in Python: the device, its figures, the slice table."""
        self.device = device
        # device figures read on every request (Device computes them on each access)
        self._n_cores = device.cores
        self._endpoint_lanes = device.endpoint_lanes
        self._port_mbps = device.crossbar.port_mbps
        self.slices: dict[int, Slice] = {}
        self._withdrawn: set[int] = set()  # RELEASING slices already out of the port totals
        self.next_id = 1

    # ------------------------------------------------------------------ validation

    def validate(self, spec: SliceSpec) -> None:
        """Check ``spec`` against the device. Raises :class:`RequestError` naming the field."""
        dev = self.device
        n_cores = self._n_cores
        if spec.cores is not None:
            if spec.cores.count > n_cores:
                raise RequestError(
                    "cores.count",
                    f"{spec.cores.count} exceeds the device's {n_cores} cores",
                    limit=n_cores,
                )
            if spec.cores.ids is not None:
                bad = [i for i in spec.cores.ids if not 0 <= i < n_cores]
                if bad:
                    raise RequestError(
                        "cores.ids",
                        f"no such core(s) {bad}; cores are 0..{n_cores - 1}",
                        limit=n_cores - 1,
                    )
                if (
                    spec.cores.same_cluster
                    and len({self.cores.cluster_of(i) for i in spec.cores.ids}) > 1
                ):
                    raise RequestError("cores.ids", "same_cluster is set but the ids span clusters")
            elif spec.cores.same_cluster and spec.cores.count > max(dev.cluster_sizes):
                raise RequestError(
                    "cores.count",
                    f"{spec.cores.count} cores cannot share one cluster of "
                    f"{max(dev.cluster_sizes)}",
                    limit=max(dev.cluster_sizes),
                )
        if spec.memory is not None:
            self._check_memory_size("memory.size", spec.memory.size)
        if spec.lanes is not None:
            widest = max(dev.port_lanes)
            if spec.lanes.width > widest:
                raise RequestError(
                    "lanes.width",
                    f"x{spec.lanes.width} is wider than the widest port (x{widest})",
                    limit=widest,
                )
            if spec.lanes.first is not None:
                self.lanes.validate(self._lane_group(spec.lanes.first, spec.lanes.width))
            if spec.lanes.endpoint is not None:
                ep = dev.endpoint(spec.lanes.endpoint)
                if ep is None:
                    raise RequestError(
                        "lanes.endpoint",
                        f"no endpoint {spec.lanes.endpoint!r}",
                        expected=[e.name for e in dev.endpoints],
                    )
                if spec.lanes.width != ep.width:
                    raise RequestError(
                        "lanes.width",
                        f"endpoint {ep.name} is wired as x{ep.width}, not x{spec.lanes.width}",
                        expected=ep.width,
                    )
        if spec.key is not None and not 0 <= spec.key < dev.keys:
            raise RequestError(
                "key",
                f"key {spec.key} does not exist; keys are 0..{dev.keys - 1}",
                limit=dev.keys - 1,
            )
        if spec.ports > dev.crossbar.ports:
            raise RequestError(
                "ports",
                f"{spec.ports} exceeds the crossbar's {dev.crossbar.ports} ports",
                limit=dev.crossbar.ports,
            )
        self._check_qos(spec.qos)

    def _check_memory_size(self, field: str, size: int) -> None:
        g = self.device.granule_bytes
        if size % g:
            raise RequestError(
                field,
                f"{size} bytes is not a multiple of the {format_size(g)} granule",
                expected=f"a multiple of {g}",
            )
        if size > self.device.memory_bytes:
            raise RequestError(
                field,
                f"{format_size(size)} exceeds the device's {format_size(self.device.memory_bytes)}",
                limit=self.device.memory_bytes,
            )

    def _check_qos(self, qos: QoS) -> None:
        cap = self._port_mbps
        if qos.guaranteed_mbps <= cap and qos.max_mbps <= cap:
            return
        for name, value in (("qos.guaranteed", qos.guaranteed_mbps), ("qos.maximum", qos.max_mbps)):
            if value > cap:
                raise RequestError(
                    name,
                    f"{format_bandwidth(value)} exceeds a port's capacity {format_bandwidth(cap)}",
                    limit=cap,
                )

    # ------------------------------------------------------------------ allocate

    def allocate(self, spec: SliceSpec) -> Slice:
        """Reserve everything ``spec`` asks for; the new slice is ``RESERVED``.

        Raises:
            RequestError: the spec does not fit the device at all.
            InsufficientResources: not enough free units now.
            ResourceConflict: a named unit (core id, endpoint lanes, key) is held by another.
        """
        self.validate(spec)
        # what has been taken so far, given back in reverse order if a later step fails
        key: int | None = None
        ports: tuple[int, ...] | None = None
        cores: tuple[int, ...] = ()
        extents: tuple[Extent, ...] = ()
        try:
            key = self._take_key(spec.owner, spec.key)
            ports = self._take_ports(spec.owner, spec.ports, spec.qos, key)
            if spec.cores is not None:
                cores = self._take_cores(spec.cores)
            if spec.memory is not None:
                extents = self._take_memory(spec.memory)
            lanes = self._take_lanes(spec) if spec.lanes is not None else None
        except Exception:
            self.memory.release(extents)
            self.cores.release(cores)
            if ports is not None:
                assert key is not None
                self._give_ports(ports, spec.qos, key)
            if key is not None:
                self._give_key(key)
            raise
        sid = self.next_id
        self.next_id += 1
        # born RESERVED: REQUESTED -> RESERVED is always legal (slices.check_transition)
        s = Slice(sid, spec, Allocation(cores, extents, lanes, key, ports), SliceState.RESERVED)
        self.slices[sid] = s
        return s

    def restore(self, s: Slice) -> None:
        """Re-take exactly the units of a slice read back from the ledger (recovery).

        Raises :class:`ResourceConflict` if any unit is already held (the ledger contradicts
        itself, which recovery reports instead of guessing), :class:`RequestError` if a unit
        does not exist on this device.
        """
        a = s.alloc
        if s.id in self.slices:
            raise ResourceConflict(f"slice {s.id} restored twice", slice=s.id)
        if not 0 <= a.key < self.device.keys:
            raise RequestError(
                "alloc.key", f"no key {a.key} on this device", limit=self.device.keys - 1
            )
        bad_ports = [p for p in a.ports if not 0 <= p < self.device.crossbar.ports]
        if bad_ports or len(set(a.ports)) != len(a.ports):
            raise RequestError(
                "alloc.ports",
                f"ports {list(a.ports)} are not distinct ports of "
                f"this crossbar (0..{self.device.crossbar.ports - 1})",
            )
        self._claim_key(s.owner, a.key)
        undo: list[Callable[[], None]] = [lambda: self._give_key(a.key)]
        try:
            self._claim_ports(s.owner, a.ports, s.spec.qos, a.key)
            undo.append(lambda: self._give_ports(a.ports, s.spec.qos, a.key))
            self.cores.allocate_ids(a.cores)
            undo.append(lambda: self.cores.release(a.cores))
            self.memory.allocate_at(a.extents)
            undo.append(lambda: self.memory.release(a.extents))
            if a.lanes is not None:
                self.lanes.allocate_exact(a.lanes)
        except Exception:
            for step in reversed(undo):
                step()
            raise
        self.slices[s.id] = s
        self.next_id = max(self.next_id, s.id + 1)

    # ------------------------------------------------------------------ free

    def get(self, slice_id: int) -> Slice:
        s = self.slices.get(slice_id)
        if s is None:
            raise NotFound(f"no slice {slice_id}", slice=slice_id)
        return s

    def withdraw(self, slice_id: int, state: SliceState) -> Slice:
        """Move a slice to ``state`` (RELEASING, or ERROR after a failed programming) and
        take it out of its ports' totals, so the next fabric image no longer carries it.
        Its ports stay *quarantined* — held by its VM, given to nobody — and its other
        units stay held, until :meth:`release`, which the manager calls only once the
        fabric has confirmed the withdrawal."""
        s = self.get(slice_id)
        s.transition(state)
        if slice_id not in self._withdrawn:
            self._give_ports(s.alloc.ports, s.spec.qos, s.alloc.key, quarantine=True)
            self._withdrawn.add(slice_id)
        return s

    @property
    def withdrawn(self) -> frozenset[int]:
        """Slices out of the fabric image whose units are still held (quarantined)."""
        return frozenset(self._withdrawn)

    def begin_release(self, slice_id: int) -> Slice:
        """:meth:`withdraw` to ``RELEASING``."""
        return self.withdraw(slice_id, SliceState.RELEASING)

    def release(self, slice_id: int) -> Slice:
        """Give back every unit of a slice and forget it; the slice ends ``FREED``.
        (The manager withdraws it and re-programs the fabric first.)"""
        s = self.get(slice_id)
        if s.state is not SliceState.RELEASING:
            s.transition(SliceState.RELEASING)
        a = s.alloc
        if slice_id in self._withdrawn:
            self._withdrawn.discard(slice_id)
            for p in a.ports:
                st = self.ports[p]
                st.quarantined -= 1
                if st.quarantined == 0 and st.slices == 0:
                    self._free_port(p)
        else:
            self._give_ports(a.ports, s.spec.qos, a.key)
        self.cores.release(a.cores)
        self.memory.release(a.extents)
        if a.lanes is not None:
            self.lanes.release(a.lanes)
        self._give_key(a.key)
        del self.slices[slice_id]
        s.transition(SliceState.FREED)
        return s

    # ------------------------------------------------------------------ resize

    def resize(self, slice_id: int, rs: ResizeSpec) -> Slice:
        """Grow or shrink a live slice in place (memory extents, cores, bandwidth).

        All-or-nothing: on any error the slice and the free pools are unchanged.

        Raises:
            RequestError: a target is invalid for the slice or the device.
            InsufficientResources / ResourceConflict: the growth cannot be satisfied.
        """
        s = self.get(slice_id)
        if not s.live or slice_id in self._withdrawn:
            raise RequestError(
                "slice",
                f"slice {slice_id} is {s.state.value}; only a live slice can be resized",
                state=s.state.value,
            )
        spec, a = s.spec, s.alloc
        new_qos = spec.qos
        if rs.qos is not None:
            new_qos = QoS(
                spec.qos.priority if rs.qos.priority < 0 else rs.qos.priority,
                spec.qos.guaranteed_mbps if rs.qos.guaranteed_mbps < 0 else rs.qos.guaranteed_mbps,
                spec.qos.max_mbps if rs.qos.max_mbps < 0 else rs.qos.max_mbps,
            )
            self._check_qos(new_qos)
            if new_qos.max_mbps and new_qos.guaranteed_mbps > new_qos.max_mbps:
                raise RequestError(
                    "qos.guaranteed",
                    "exceeds qos.maximum",
                    guaranteed=new_qos.guaranteed_mbps,
                    maximum=new_qos.max_mbps,
                )
            if (new_qos.guaranteed_mbps or new_qos.max_mbps) and not a.ports:
                raise RequestError("qos", "the slice has no crossbar port to carry bandwidth")
            self._admit_bandwidth(a.ports, new_qos.guaranteed_mbps - spec.qos.guaranteed_mbps)
        if rs.memory is not None:
            self._check_memory_size("memory", rs.memory)
            if spec.memory is None:
                raise RequestError(
                    "memory", "the slice has no memory; allocate a slice with memory"
                )
        if rs.cores is not None:
            if spec.cores is None:
                raise RequestError("cores", "the slice has no cores; allocate a slice with cores")
            if rs.cores > self.device.cores:
                raise RequestError(
                    "cores",
                    f"{rs.cores} exceeds the device's {self.device.cores}",
                    limit=self.device.cores,
                )
            if spec.cores.same_cluster and a.cores:
                size = self.device.cluster_sizes[self.cores.cluster_of(a.cores[0])]
                if rs.cores > size:
                    raise RequestError(
                        "cores",
                        f"{rs.cores} cores cannot share one cluster of {size} "
                        "(the slice has same_cluster affinity)",
                        limit=size,
                    )

        undo: list[Callable[[], None]] = []
        try:
            cores = a.cores
            if rs.cores is not None and spec.cores is not None:
                cores = self._resize_cores(spec.cores, a.cores, rs.cores, undo)
            extents: tuple[Extent, ...] = a.extents
            shrunk: tuple[Extent, ...] = ()
            if rs.memory is not None and spec.memory is not None:
                extents, shrunk = self._resize_memory(spec.memory, a.extents, rs.memory, undo)
        except Exception:
            for step in reversed(undo):
                step()
            raise
        # Commit point: nothing below can fail.
        if rs.qos is not None:
            self._give_ports(a.ports, spec.qos, a.key)
            self._claim_ports(s.owner, a.ports, new_qos, a.key)  # admitted above
        released_cores = set(a.cores) - set(cores)
        if released_cores:
            self.cores.release(sorted(released_cores))
        if shrunk:
            self.memory.release(shrunk)
        new_spec = replace(
            spec,
            qos=new_qos,
            cores=None
            if spec.cores is None
            else replace(
                spec.cores, count=len(cores), ids=None if rs.cores is not None else spec.cores.ids
            ),
            memory=None
            if spec.memory is None
            else replace(
                spec.memory, size=sum(e.length for e in extents) * self.device.granule_bytes
            ),
        )
        s.spec, s.alloc = new_spec, replace(a, cores=cores, extents=extents)
        return s

    def _resize_cores(
        self, req: CoreRequest, held: tuple[int, ...], target: int, undo: list[Callable[[], None]]
    ) -> tuple[int, ...]:
        if target <= len(held):
            return tuple(sorted(held)[:target])  # keep the lowest ids, give back the highest
        cluster = self.cores.cluster_of(held[0]) if req.same_cluster and held else None
        extra = self.cores.allocate(
            target - len(held), same_cluster=req.same_cluster, cluster=cluster
        )
        undo.append(lambda: self.cores.release(extra))
        return tuple(sorted((*held, *extra)))

    def _resize_memory(
        self,
        req: MemoryRequest,
        held: tuple[Extent, ...],
        target_bytes: int,
        undo: list[Callable[[], None]],
    ) -> tuple[tuple[Extent, ...], tuple[Extent, ...]]:
        """The slice's new extents and the extents a shrink gives back (applied by the
        caller at the commit point)."""
        target = target_bytes // self.device.granule_bytes
        current = sum(e.length for e in held)
        if target <= current:
            return _truncate(held, target)
        grow = target - current
        last = max(held, key=lambda e: e.start)
        bigger = self.memory.extend(last, grow)  # in place first: keeps the extent count low
        if bigger is not None:
            undo.append(lambda: self.memory.release([Extent(last.end, grow)]))
            return tuple(sorted(e for e in (*held, bigger) if e != last)), ()
        if req.contiguous:
            after = self.memory.free_run_at(last.end)
            raise InsufficientResources(
                "memory",
                grow,
                after,
                "granules",
                f"a contiguous slice grows only in place, and only {after} granules right "
                f"after it (from granule {last.end}) are free",
                reason="contiguous_in_place",
            )
        room = self.device.max_extents_per_slice - len(held)
        if room <= 0:
            raise InsufficientResources(
                "memory extents", len(held) + 1, self.device.max_extents_per_slice, "extents"
            )
        extra = self.memory.allocate(grow, contiguous=False, max_extents=room)
        undo.append(lambda: self.memory.release(extra))
        return tuple(_coalesce(sorted((*held, *extra)))), ()

    # ------------------------------------------------------------------ units

    def _take_cores(self, req: CoreRequest) -> tuple[int, ...]:
        if req.ids is not None:
            self.cores.allocate_ids(req.ids)
            return req.ids
        return tuple(self.cores.allocate(req.count, same_cluster=req.same_cluster))

    def _take_memory(self, req: MemoryRequest) -> tuple[Extent, ...]:
        granules = req.size // self.device.granule_bytes
        return tuple(
            self.memory.allocate(
                granules, contiguous=req.contiguous, max_extents=self.device.max_extents_per_slice
            )
        )

    def _lane_group(self, first: int, width: int) -> LaneGroup:
        """The lane group starting at global lane ``first`` (validate() checks alignment)."""
        if not 0 <= first < self.device.lanes:
            raise RequestError(
                "lanes.first",
                f"no lane {first}; lanes are 0..{self.device.lanes - 1}",
                limit=self.device.lanes - 1,
            )
        port = max(
            p for p in range(len(self.device.port_lanes)) if self.device.port_first_lane(p) <= first
        )
        return LaneGroup(port, first, width)

    def _take_lanes(self, spec: SliceSpec) -> LaneGroup:
        assert spec.lanes is not None
        if spec.lanes.first is not None:
            group = self._lane_group(spec.lanes.first, spec.lanes.width)
            taken = [lane for lane in group.lanes if lane in self._endpoint_lanes]
            if taken:
                raise ResourceConflict(
                    f"lanes {taken} are wired to an endpoint; pin the endpoint instead",
                    lanes=taken,
                )
            self.lanes.allocate_exact(group)
            return group
        if spec.lanes.endpoint is not None:
            ep = self.device.endpoint(spec.lanes.endpoint)
            assert ep is not None  # validate() checked it
            group = LaneGroup(ep.port, ep.first_lane, ep.width)
            if not self.lanes.is_free(group):
                raise ResourceConflict(
                    f"endpoint {ep.name} (lanes {ep.first_lane}-{ep.first_lane + ep.width - 1}) "
                    "is already allocated",
                    endpoint=ep.name,
                )
            self.lanes.allocate_exact(group)
            return group
        return self.lanes.allocate(spec.lanes.width, exclude=self._endpoint_lanes)

    def _take_key(self, owner: str, wanted: int | None) -> int:
        if wanted is None:
            # the VM's own key (lowest), else the lowest free one; list.index scans in C
            owners = self.key_owner
            if owner in owners:
                wanted = owners.index(owner)
            elif None in owners:
                wanted = owners.index(None)
            else:
                raise no_key()
        self._claim_key(owner, wanted)
        return wanted

    def _claim_key(self, owner: str, key: int) -> None:
        holder = self.key_owner[key]
        if holder is not None and holder != owner:
            raise key_held(key)
        self.key_owner[key] = owner
        self.key_users[key] += 1

    def _give_key(self, key: int) -> None:
        self.key_users[key] -= 1
        if self.key_users[key] == 0:
            self.key_owner[key] = None

    def _take_ports(self, owner: str, count: int, qos: QoS, key: int) -> tuple[int, ...]:
        """Pick ``count`` ports: the VM's own ports with headroom first (fewest slices first,
        to spread load), then free ports (lowest index). A quarantined port (only slices
        being released on it) is neither: it waits for its release."""
        if count == 0:
            return ()
        room = self._port_mbps - qos.guaranteed_mbps
        ports = self.ports
        mine: list[tuple[int, int]] = []
        for i in self._vm_ports.get(owner, ()):
            st = ports[i]
            if st.slices and st.guaranteed_mbps <= room:
                mine.append((st.slices, i))
        if len(mine) > 1:
            mine.sort()
        picked = [i for _, i in mine[:count]]
        need = count - len(picked)
        if need == 1 and self._free_ports:  # free ports, lowest index first
            picked.append(min(self._free_ports))
        elif need > 0:
            picked += sorted(self._free_ports)[:need]
        if len(picked) < count:
            raise no_ports(qos, count, len(picked))
        chosen = tuple(sorted(picked))
        self._claim_ports(owner, chosen, qos, key)
        return chosen

    def _admit_bandwidth(self, ports: Iterable[int], delta: int) -> None:
        cap = self.device.crossbar.port_mbps
        for p in ports:
            after = self.ports[p].guaranteed_mbps + delta
            if after > cap:
                raise no_headroom(p, delta, cap - self.ports[p].guaranteed_mbps)

    def _claim_ports(self, owner: str, ports: Iterable[int], qos: QoS, key: int) -> None:
        """Add one slice to the totals of ``ports`` (all-or-nothing)."""
        ports = tuple(ports)
        for p in ports:
            holder = self.ports[p].owner
            if holder is not None and holder != owner:
                raise port_held(p)
        self._admit_bandwidth(ports, qos.guaranteed_mbps)
        limit = qos.limit_mbps(self.device.crossbar.port_mbps)
        for p in ports:
            st = self.ports[p]
            if st.owner is None:
                self._vm_ports.setdefault(owner, set()).add(p)
                self._free_ports.discard(p)
            st.owner = owner
            st.slices += 1
            st.cached = None
            st.guaranteed_mbps += qos.guaranteed_mbps
            st.limit_mbps += limit
            st.priorities[qos.priority] += 1
            st.keys[key] = st.keys.get(key, 0) + 1

    def _give_ports(
        self, ports: Iterable[int], qos: QoS, key: int, *, quarantine: bool = False
    ) -> None:
        """Remove one slice from the totals of ``ports``. With ``quarantine`` the port stays
        held for the slice until :meth:`release`; otherwise a port left empty is free."""
        limit = qos.limit_mbps(self.device.crossbar.port_mbps)
        for p in ports:
            st = self.ports[p]
            st.slices -= 1
            st.cached = None
            if quarantine:
                st.quarantined += 1
            if st.slices == 0:
                if st.quarantined == 0:
                    self._free_port(p)
                else:
                    self.ports[p] = PortState(owner=st.owner, quarantined=st.quarantined)
                continue
            st.guaranteed_mbps -= qos.guaranteed_mbps
            st.limit_mbps -= limit
            st.priorities[qos.priority] -= 1
            st.keys[key] -= 1
            if not st.keys[key]:
                del st.keys[key]

    def _free_port(self, p: int) -> None:
        """Port ``p`` carries nothing and holds no quarantine: nobody holds it any more."""
        owner = self.ports[p].owner
        self.ports[p] = PortState()
        self._free_ports.add(p)
        if owner is not None and owner in self._vm_ports:
            held = self._vm_ports[owner]
            held.discard(p)
            if not held:
                del self._vm_ports[owner]

    def port_demand(self) -> list[PortDemand]:
        """What every crossbar port must carry now: the input of the fabric image."""
        return [p.demand() for p in self.ports]

    # ------------------------------------------------------------------ views

    def utilisation(self) -> dict[str, dict[str, int]]:
        """Used / total per resource kind (for tables, telemetry and the demo)."""
        dev = self.device
        return {
            "cores": {"used": dev.cores - self.cores.free_count(), "total": dev.cores},
            "memory_granules": {
                "used": dev.granules - self.memory.free_granules,
                "total": dev.granules,
            },
            "lanes": {"used": dev.lanes - self.lanes.free_lanes(), "total": dev.lanes},
            "keys": {"used": sum(o is not None for o in self.key_owner), "total": dev.keys},
            "ports": {
                "used": sum(p.owner is not None for p in self.ports),
                "total": dev.crossbar.ports,
            },
            "guaranteed_mbps": {
                "used": sum(p.guaranteed_mbps for p in self.ports),
                "total": dev.crossbar.ports * dev.crossbar.port_mbps,
            },
        }

    def check_invariants(self) -> list[str]:
        """The invariants of DESIGN.md, recomputed from the slice table. Returns the
        violations found (empty when all hold); tests assert it is empty after every step."""
        dev = self.device
        bad: list[str] = []
        live = list(self.slices.values())

        def exclusive(kind: str, units: dict[int, list[int]], total: int, free: int) -> None:
            owned: dict[int, int] = {}
            for sid, us in units.items():
                for u in us:
                    if u in owned:
                        bad.append(f"{kind} unit {u} held by slices {owned[u]} and {sid}")
                    owned[u] = sid
            if len(owned) + free != total:
                bad.append(f"{kind}: {len(owned)} held + {free} free != {total} total")

        exclusive(
            "core", {s.id: list(s.alloc.cores) for s in live}, dev.cores, self.cores.free_count()
        )
        exclusive(
            "granule",
            {s.id: [g for e in s.alloc.extents for g in range(e.start, e.end)] for s in live},
            dev.granules,
            self.memory.free_granules,
        )
        exclusive(
            "lane",
            {s.id: list(s.alloc.lanes.lanes) if s.alloc.lanes else [] for s in live},
            dev.lanes,
            self.lanes.free_lanes(),
        )
        in_ports = [s for s in live if s.id not in self._withdrawn]
        key_holders: dict[int, set[str]] = {}
        port_holders: dict[int, set[str]] = {}
        for s in live:  # a withdrawn slice keeps its key and (quarantined) ports until release()
            key_holders.setdefault(s.alloc.key, set()).add(s.owner)
            for port in s.alloc.ports:
                port_holders.setdefault(port, set()).add(s.owner)
        for kind, holders in (("key", key_holders), ("port", port_holders)):
            for u, owners in sorted(holders.items()):
                if len(owners) > 1:
                    bad.append(f"{kind} {u} shared by VMs {sorted(owners)}")
        for k, owners in key_holders.items():
            if self.key_owner[k] not in owners:
                bad.append(f"key {k} recorded as {self.key_owner[k]}'s, used by {sorted(owners)}")
        recomputed = demand_from_slices(dev, in_ports)
        for i, p in enumerate(self.ports):
            on_port = [s for s in in_ports if i in s.alloc.ports]
            g = sum(s.spec.qos.guaranteed_mbps for s in on_port)
            if g > dev.crossbar.port_mbps:
                bad.append(f"port {i}: guaranteed {g} Mbit/s > capacity {dev.crossbar.port_mbps}")
            fresh = p.compute_demand()
            if fresh != recomputed[i] or len(on_port) != p.slices:
                bad.append(f"port {i}: totals {fresh} disagree with its slices {recomputed[i]}")
            if p.demand() != fresh:
                bad.append(f"port {i}: cached demand {p.demand()} is stale (totals: {fresh})")
            withdrawn_here = sum(1 for s in live if s.id in self._withdrawn and i in s.alloc.ports)
            if withdrawn_here != p.quarantined:
                bad.append(
                    f"port {i}: {p.quarantined} quarantined, {withdrawn_here} withdrawn slices"
                )
            vms_here = port_holders.get(i, set())
            if p.owner is not None and p.owner not in vms_here:
                bad.append(f"port {i} held by {p.owner} with no slice of it on the port")
            if vms_here and p.owner is None:
                bad.append(f"port {i} is free but slices of {sorted(vms_here)} are on it")
        bad += self._index_violations()
        for k in range(dev.keys):
            users = sum(1 for s in live if s.alloc.key == k)
            if users != self.key_users[k] or (users == 0) != (self.key_owner[k] is None):
                bad.append(
                    f"key {k}: bookkeeping ({self.key_owner[k]}, {self.key_users[k]}) vs {users}"
                )
        for s in live:
            for e in s.alloc.extents:
                if self.memory.is_free(e) if e.length else False:
                    bad.append(f"slice {s.id} extent {e} is also free")
        return bad

    def _index_violations(self) -> list[str]:
        """The port indexes (``_vm_ports``, ``_free_ports``) against ``ports``."""
        bad: list[str] = []
        for i, p in enumerate(self.ports):
            if p.owner is not None and i not in self._vm_ports.get(p.owner, ()):
                bad.append(f"port {i}: held by {p.owner} but missing from its port index")
            if (p.owner is None) != (i in self._free_ports):
                bad.append(f"port {i}: held by {p.owner} but the free-port index disagrees")
        for vm, indexed in self._vm_ports.items():
            stray = sorted(i for i in indexed if self.ports[i].owner != vm)
            if stray or not indexed:
                bad.append(f"port index: {vm} listed on ports {stray or '(none)'} it does not hold")
        return bad


# The errors of the key and port steps, one definition for both paths.


def no_key() -> InsufficientResources:
    return InsufficientResources("protection keys", 1, 0, "keys")


def key_held(key: int) -> ResourceConflict:
    return ResourceConflict(f"key {key} is held by another VM", key=key)


def no_ports(qos: QoS, count: int, found: int) -> InsufficientResources:
    what = "crossbar ports"
    if qos.guaranteed_mbps:
        what += f" (with {format_bandwidth(qos.guaranteed_mbps)} of guaranteed headroom)"
    return InsufficientResources(what, count, found, "ports")


def port_held(port: int) -> ResourceConflict:
    return ResourceConflict(f"crossbar port {port} is held by another VM", port=port)


def no_headroom(port: int, delta: int, headroom: int) -> InsufficientResources:
    return InsufficientResources(
        f"guaranteed bandwidth on crossbar port {port}", delta, headroom, "Mbit/s"
    )


def _truncate(
    extents: tuple[Extent, ...], target: int
) -> tuple[tuple[Extent, ...], tuple[Extent, ...]]:
    """Keep the first ``target`` granules (by address) and give back the tail.
    Returns ``(kept, released)``; O(number of extents)."""
    kept: list[Extent] = []
    released: list[Extent] = []
    left = target
    for e in sorted(extents):
        if left >= e.length:
            kept.append(e)
        elif left > 0:
            kept.append(Extent(e.start, left))
            released.append(Extent(e.start + left, e.length - left))
        else:
            released.append(e)
        left -= min(left, e.length)
    return tuple(kept), tuple(released)


def _coalesce(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if out and out[-1].end == e.start:
            out[-1] = Extent(out[-1].start, out[-1].length + e.length)
        else:
            out.append(e)
    return out
