"""The allocator's C fast path: :class:`CAllocator`, twin of :class:`~firmware.allocator.Allocator`.

``Allocator(device)`` builds a :class:`CAllocator` unless ``SLICEFAB_FASTPATH=0``. It has
the reference's interface, policy and errors (``tests/test_fastpath_alloc.py`` runs both on
the same workloads), but an allocation's whole transaction — validation against the device,
the protection key, the crossbar ports, cores, memory extents and the lane group — is one C
call (``cffi_ext/src/alloc.c``), and so is a release. C keeps the key and port bookkeeping
and a record of each live slice's units; the unit allocators are the C twins of
:mod:`firmware.resources.fast`, the same state objects the transaction draws from.

What stays in Python: the slice table (``slices``, ``Slice``/``Allocation`` objects and
their lifecycle), and the reference's code for what is not on the hot path — resize and
recovery run the reference's steps over C primitives (``_claim_key``, ``_claim_ports``
and the unit twins), then refresh the slice's C record.

Errors: when C refuses, it says which step failed (validation, key, ports, cores, memory,
lanes). Nothing has changed, and each step depends only on its own resource, so the
reference's own step run now fails exactly as it would have in the reference: that is the
exception raised (same type, message and details). A step that C refuses and the
reference accepts is a bug in one of the two, raised as :class:`SlicefabError`.

``key_owner``, ``key_users`` and ``ports`` are views of the C state (reads and writes, so
the invariant checker's tests can corrupt it); ``check_invariants`` also compares every
slice's C record with its ``Allocation``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableSequence
from struct import Struct, unpack_from
from typing import Any, TypeVar, overload

from firmware.allocator import (
    Allocator,
    PortState,
    key_held,
    no_key,
    no_ports,
    port_held,
)
from firmware.errors import SlicefabError
from firmware.fabric.image import PortDemand
from firmware.fastpath import describe_error, extension
from firmware.inventory import Device
from firmware.resources.fast import CCoreAllocator, CExtentAllocator, CLaneAllocator
from firmware.resources.lanes import LaneGroup
from firmware.resources.memory import Extent
from firmware.slices import Allocation, QoS, ResizeSpec, Slice, SliceSpec, SliceState

__all__ = ["CAllocator", "PortView"]

_lib = extension().lib
_ASK_CORES = int(_lib.SF_ASK_CORES)
_ASK_SAME = int(_lib.SF_ASK_CORES | _lib.SF_ASK_SAME_CLUSTER)
_ASK_MEMORY = int(_lib.SF_ASK_MEMORY)
_ASK_CONTIGUOUS = int(_lib.SF_ASK_MEMORY | _lib.SF_ASK_CONTIGUOUS)
_ASK_LANES = int(_lib.SF_ASK_LANES)
_NOBODY = int(_lib.SF_NOBODY)
_RESERVED, _RELEASING, _FREED = SliceState.RESERVED, SliceState.RELEASING, SliceState.FREED

_HEAD = Struct(f"={int(_lib.SF_GRANT_HEAD)}I")  # out[] of sf_alloc_allocate (native order)
_PAIR = Struct("=2I")
_HEAD_PAIR = Struct(f"={int(_lib.SF_GRANT_HEAD) + 2}I")  # the head and a first extent
assert (_lib.SF_G_SLICE, _lib.SF_G_N_EXTENTS, _HEAD.size) == (0, 8, 36), "grant layout changed"

T = TypeVar("T")

Units = tuple[int, int, int, tuple[int, ...], tuple[Extent, ...], LaneGroup | None]


def _decode(buf: bytearray) -> Units:
    """(record handle, key, port mask, cores, extents, lanes) from a grant buffer."""
    h, key, lo, hi, lane_port, lane_first, width, nc, ne = _HEAD.unpack_from(buf)
    cores: tuple[int, ...] = unpack_from(f"={nc}I", buf, 36) if nc else ()
    if ne == 1:
        extents: tuple[Extent, ...] = (Extent(*_PAIR.unpack_from(buf, 36 + 4 * nc)),)
    else:
        x = unpack_from(f"={2 * ne}I", buf, 36 + 4 * nc)
        extents = tuple(Extent(x[i], x[i + 1]) for i in range(0, 2 * ne, 2))
    lanes = LaneGroup(lane_port, lane_first, width) if width else None
    return h, key, hi << 32 | lo, cores, extents, lanes


def _disagree(err: Any, what: str) -> Exception:
    """C refused what the reference accepts: out of memory, or a bug in one of the two."""
    message, details = describe_error(err)
    if int(err.code) == _lib.SF_ENOMEM:
        return MemoryError(f"fast path: out of memory for {what}")
    return SlicefabError(
        f"fast path refused {what} that the reference accepts: {message}", **details
    )


def _mask(ports: Iterable[int]) -> int:
    mask = 0
    for p in ports:
        mask |= 1 << p
    return mask


class CAllocator(Allocator):
    """:class:`Allocator` with each allocation's and release's transaction in C."""

    fastpath = True

    def __init__(self, device: Device) -> None:
        self._setup(device)
        cores = CCoreAllocator(device.cluster_sizes)
        memory = CExtentAllocator(device.granules)
        lanes = CLaneAllocator(device.port_lanes)
        self.cores, self.memory, self.lanes = cores, memory, lanes
        self._units = (cores, memory, lanes)  # the C state borrows theirs: keep them alive
        mod = extension()
        self._ffi, self._l = ffi, lib = mod.ffi, mod.lib
        self._err = err = ffi.new("sf_error *")
        params = ffi.new("sf_alloc_params *")
        params.n_keys = device.keys
        params.n_ports = device.crossbar.ports
        params.port_mbps = device.crossbar.port_mbps
        params.granule_bytes = device.granule_bytes
        params.memory_bytes = device.memory_bytes
        params.max_extents = device.max_extents_per_slice
        endpoint_lanes = sorted(device.endpoint_lanes)
        self._endpoint_buf = ffi.new("uint32_t[]", endpoint_lanes or [0])
        params.endpoint_lanes = self._endpoint_buf
        params.n_endpoint_lanes = len(endpoint_lanes)
        state = lib.sf_alloc_new(params, cores._state, lanes._state, memory._state, err)
        if state == ffi.NULL:
            raise _disagree(err, "the device")
        self._state = ffi.gc(state, lib.sf_alloc_free)
        # what C took, written by each allocation (see _decode)
        self._words = int(lib.SF_GRANT_HEAD) + device.cores + 2 * device.max_extents_per_slice
        self._out_bytes = bytearray(4 * self._words)
        self._out = ffi.from_buffer("uint32_t[]", self._out_bytes)
        self._request = ffi.new("sf_request *")
        self._allocate_simple = lib.sf_alloc_allocate_simple
        self._release = lib.sf_alloc_release
        # VM names <-> the numbers C knows them by (never reused: a VM keeps its number)
        self._owner_no: dict[str, int] = {}
        self._owner_names: list[str] = []
        self._handle: dict[int, int] = {}  # slice id -> its C record
        self._port_tuples: dict[int, tuple[int, ...]] = {0: ()}  # port mask -> sorted ports
        n_ports = device.crossbar.ports
        self._demand = [PortDemand() for _ in range(n_ports)]
        self._demand_buf = ffi.new("sf_port_demand[]", n_ports)
        self._changed = ffi.new("uint64_t *")
        self._u32 = ffi.new("uint32_t[2]")
        self.key_owner = KeyOwners(self)
        self.key_users = KeyUsers(self)
        self.ports = [PortView(self, p) for p in range(n_ports)]

    # ------------------------------------------------------------------ owners

    def _number(self, owner: str) -> int:
        n = self._owner_no.get(owner)
        if n is None:
            n = self._owner_no[owner] = len(self._owner_names)
            self._owner_names.append(owner)
        return n

    def _name(self, number: int) -> str | None:
        return None if number == _NOBODY else self._owner_names[number]

    # ------------------------------------------------------------------ allocate

    def allocate(self, spec: SliceSpec) -> Slice:
        """As :meth:`Allocator.allocate`: one C call for validation and every unit."""
        c, m, ln, q = spec.cores, spec.memory, spec.lanes, spec.qos
        flags = n_cores = n_bytes = width = 0
        if c is not None:
            if c.ids is not None:
                return self._allocate_pinned(spec)
            flags = _ASK_SAME if c.same_cluster else _ASK_CORES
            n_cores = c.count
        if m is not None:
            flags |= _ASK_CONTIGUOUS if m.contiguous else _ASK_MEMORY
            n_bytes = m.size
        if ln is not None:
            if ln.first is not None or ln.endpoint is not None:
                return self._allocate_pinned(spec)
            flags |= _ASK_LANES
            width = ln.width
        key = spec.key
        if key is None:
            key = -1
        elif key < 0:
            return self._allocate_pinned(spec)  # -1 means "auto" to C; validate() refuses it
        owner = self._owner_no.get(spec.owner)
        if owner is None:
            owner = self._number(spec.owner)
        try:
            rc = self._allocate_simple(
                self._state, owner, key, spec.ports, flags, n_cores, n_bytes, width,
                q.priority, q.guaranteed_mbps, q.max_mbps, self._out, self._words, self._err,
            )  # fmt: skip
        except (OverflowError, TypeError):  # not even a C integer: the reference says why
            raise self._refused(spec, None) from None
        if rc:
            raise self._refused(spec, rc)
        return self._admit(spec)

    def _allocate_pinned(self, spec: SliceSpec) -> Slice:
        """A request naming units (core ids, lanes by first lane or endpoint): the
        reference's checks of those first, then the same C transaction."""
        self.validate(spec)
        ffi, rq = self._ffi, self._request
        ids_buf: Any = ffi.NULL
        try:
            rq.owner = self._number(spec.owner)
            rq.key = -1 if spec.key is None else spec.key
            rq.ports = spec.ports
            rq.priority = spec.qos.priority
            rq.guaranteed_mbps = spec.qos.guaranteed_mbps
            rq.max_mbps = spec.qos.max_mbps
            c, m, ln = spec.cores, spec.memory, spec.lanes
            rq.has_cores = c is not None
            rq.cores = 0 if c is None else c.count
            rq.same_cluster = c is not None and c.same_cluster
            if c is not None and c.ids is not None:
                ids_buf = ffi.new("uint32_t[]", list(c.ids))
                rq.cores = len(c.ids)
            rq.core_ids = ids_buf
            rq.has_memory = m is not None
            rq.memory_bytes = 0 if m is None else m.size
            rq.contiguous = m is not None and m.contiguous
            rq.lane_mode = self._l.SF_LANES_NONE
            if ln is not None:
                rq.lane_width = ln.width
                rq.lane_mode = self._l.SF_LANES_SEARCH
                group: LaneGroup | None = None
                if ln.first is not None:
                    group = self._lane_group(ln.first, ln.width)
                    rq.lane_mode = self._l.SF_LANES_EXACT
                elif ln.endpoint is not None:
                    ep = self.device.endpoint(ln.endpoint)
                    assert ep is not None  # validate() checked it
                    group = LaneGroup(ep.port, ep.first_lane, ep.width)
                    rq.lane_mode = self._l.SF_LANES_PINNED
                if group is not None:
                    rq.lane_port, rq.lane_first = group.port, group.first
            rc = self._l.sf_alloc_allocate(self._state, rq, self._out, self._words, self._err)
        except (OverflowError, TypeError):
            raise self._refused(spec, None) from None
        if rc:
            raise self._refused(spec, rc)
        return self._admit(spec)

    def _admit(self, spec: SliceSpec) -> Slice:
        """The new slice, from what C granted."""
        buf = self._out_bytes
        h, key, lo, hi, lane_port, lane_first, width, nc, ne, s0, n0 = _HEAD_PAIR.unpack_from(buf)
        if nc == 0 and ne == 1:  # the usual grant: memory as one extent, no cores
            cores: tuple[int, ...] = ()
            extents: tuple[Extent, ...] = (Extent(s0, n0),)
        else:
            _, _, _, cores, extents, _ = _decode(buf)
        lanes = LaneGroup(lane_port, lane_first, width) if width else None
        mask = hi << 32 | lo
        ports = self._port_tuples.get(mask)
        if ports is None:
            ports = self._port_tuples[mask] = tuple(p for p in range(64) if mask >> p & 1)
        sid = self.next_id
        self.next_id = sid + 1
        s = Slice(sid, spec, Allocation(cores, extents, lanes, key, ports), _RESERVED)
        self.slices[sid] = s
        self._handle[sid] = h
        return s

    def _refused(self, spec: SliceSpec, rc: int | None) -> Exception:
        """The reference's exception for a transaction C refused (``rc``), or for a spec
        whose numbers do not fit C's types (``rc`` None)."""
        lib, err = self._l, self._err
        if rc == lib.SF_ENOMEM:
            return MemoryError("fast path: out of memory for a slice")
        step = lib.SF_STEP_SPEC if rc is None else self._out[0]
        if step == lib.SF_STEP_SPEC:
            self.validate(spec)
        elif step == lib.SF_STEP_KEY:
            return no_key() if rc == lib.SF_ENOSPC else key_held(int(err.value))
        elif step == lib.SF_STEP_PORTS:
            return no_ports(spec.qos, spec.ports, int(err.limit))
        elif step == lib.SF_STEP_CORES and spec.cores is not None:
            cores = spec.cores
            self._replay(lambda: self._take_cores(cores), self.cores.release)
        elif step == lib.SF_STEP_MEMORY and spec.memory is not None:
            memory = spec.memory
            self._replay(lambda: self._take_memory(memory), self.memory.release)
        elif step == lib.SF_STEP_LANES and spec.lanes is not None:
            self._replay(lambda: self._take_lanes(spec), self.lanes.release)
        if rc is None:
            return SlicefabError(
                "fast path: the slice spec holds values that are not C integers",
                owner=spec.owner,
            )
        return _disagree(err, "a slice")

    @staticmethod
    def _replay(step: Callable[[], T], undo: Callable[[T], None]) -> None:
        """Run the reference's step for a refused one: it raises the reference's error.
        If it succeeds instead (the paths disagree), give back what it took."""
        undo(step())

    # ------------------------------------------------------------------ release

    def release(self, slice_id: int) -> Slice:
        """As :meth:`Allocator.release`: every unit given back in one C call."""
        s = self.slices.get(slice_id)
        if s is None:
            s = self.get(slice_id)  # raises NotFound
        if s.state is not _RELEASING:
            s.transition(_RELEASING)
        withdrawn = slice_id in self._withdrawn
        if self._release(self._state, self._handle[slice_id], withdrawn, self._err):
            raise self._release_refused(s)
        del self._handle[slice_id]
        if withdrawn:
            self._withdrawn.discard(slice_id)
        del self.slices[slice_id]
        s.transition(_FREED)
        return s

    def _release_refused(self, s: Slice) -> Exception:
        """A unit of the slice is no longer held: the unit twin's own error says which."""
        lib, err, a = self._l, self._err, s.alloc
        field = int(err.field)
        if field == lib.SF_F_CORE:
            self.cores.release(a.cores)
        elif field == lib.SF_F_START:
            self.memory.release(a.extents)
        elif field == lib.SF_F_GROUP and a.lanes is not None:
            self.lanes.release(a.lanes)
        return _disagree(err, f"releasing slice {s.id}")

    # ------------------------------------------------------------------ records

    def _adopt(self, s: Slice) -> int:
        """A C record of the units ``s`` holds (taken through the primitives)."""
        ffi, a, q = self._ffi, s.alloc, s.spec.qos
        cores = ffi.new("uint32_t[]", list(a.cores)) if a.cores else ffi.NULL
        extents: Any = ffi.NULL
        if a.extents:
            extents = ffi.new("sf_extent[]", [(e.start, e.length) for e in a.extents])
        lanes = a.lanes or LaneGroup(0, 0, 0)
        out = self._u32
        if self._l.sf_alloc_adopt(
            self._state, self._number(s.owner), a.key, _mask(a.ports), q.priority,
            q.guaranteed_mbps, q.max_mbps, cores, len(a.cores), extents, len(a.extents),
            lanes.port, lanes.first, lanes.width, out, self._err,
        ):  # fmt: skip
            raise _disagree(self._err, f"the record of slice {s.id}")
        return int(out[0])

    def restore(self, s: Slice) -> None:
        """As :meth:`Allocator.restore` (the reference's steps over the C primitives),
        then the slice's C record."""
        super().restore(s)
        try:
            self._handle[s.id] = self._adopt(s)
        except Exception:
            a = s.alloc
            self._give_ports(a.ports, s.spec.qos, a.key)
            self.cores.release(a.cores)
            self.memory.release(a.extents)
            if a.lanes is not None:
                self.lanes.release(a.lanes)
            self._give_key(a.key)
            del self.slices[s.id]
            raise

    def resize(self, slice_id: int, rs: ResizeSpec) -> Slice:
        """As :meth:`Allocator.resize`; the slice's C record follows its new units."""
        s = super().resize(slice_id, rs)
        old = self._handle[slice_id]
        self._handle[slice_id] = self._adopt(s)
        self._l.sf_alloc_forget(self._state, old, self._err)
        return s

    # ------------------------------------------------------------------ primitives

    def _claim_key(self, owner: str, key: int) -> None:
        if self._l.sf_alloc_claim_key(self._state, self._number(owner), key, self._err):
            if self._err.code == self._l.SF_ECONFLICT:
                raise key_held(key)
            raise _disagree(self._err, f"key {key}")

    def _give_key(self, key: int) -> None:
        if self._l.sf_alloc_give_key(self._state, key, self._err):
            raise _disagree(self._err, f"giving back key {key}")

    def _claim_ports(self, owner: str, ports: Iterable[int], qos: QoS, key: int) -> None:
        ports = tuple(ports)
        if self._l.sf_alloc_claim_ports(
            self._state, self._number(owner), _mask(ports), qos.priority, qos.guaranteed_mbps,
            qos.max_mbps, key, self._err,
        ):  # fmt: skip
            for p in ports:  # the reference's checks, in its order, say which port
                holder = self.ports[p].owner
                if holder is not None and holder != owner:
                    raise port_held(p)
            self._admit_bandwidth(ports, qos.guaranteed_mbps)
            raise _disagree(self._err, f"ports {list(ports)}")

    def _give_ports(
        self, ports: Iterable[int], qos: QoS, key: int, *, quarantine: bool = False
    ) -> None:
        if self._l.sf_alloc_give_ports(
            self._state, _mask(ports), qos.priority, qos.guaranteed_mbps, qos.max_mbps, key,
            quarantine, self._err,
        ):  # fmt: skip
            raise _disagree(self._err, "giving back ports")

    # ------------------------------------------------------------------ views

    def port_demand(self) -> list[PortDemand]:
        """What every crossbar port must carry now; a port whose totals did not change
        keeps its :class:`PortDemand` object (the fabric driver copies only new ones)."""
        buf, changed = self._demand_buf, self._changed
        if self._l.sf_alloc_demand(self._state, buf, len(self._demand), changed, self._err):
            raise _disagree(self._err, "the port demand")
        mask = int(changed[0])
        names, demand = self._owner_names, self._demand
        while mask:  # only the ports C marked (usually one or two of them)
            low = mask & -mask
            mask ^= low
            p = low.bit_length() - 1
            d = buf[p]
            owner = None if d.owner < 0 else names[d.owner]
            demand[p] = PortDemand(owner, d.priority, d.guaranteed_mbps, d.limit_mbps, d.keys)
        return list(demand)

    def _port_state(self, port: int) -> Any:
        st = self._ffi.new("sf_port_state *")
        if self._l.sf_alloc_port(self._state, port, st, self._err):
            raise IndexError(f"no crossbar port {port}")
        return st

    def _index_violations(self) -> list[str]:
        """The C records against the slices: each live slice has one, holding its units."""
        bad: list[str] = []
        if set(self._handle) != set(self.slices):
            bad.append(f"C records for slices {sorted(self._handle)}, live {sorted(self.slices)}")
        buf = bytearray(4 * self._words)
        out = self._ffi.from_buffer("uint32_t[]", buf)
        for sid, h in self._handle.items():
            s = self.slices.get(sid)
            if s is None:
                continue
            if self._l.sf_alloc_record(self._state, h, out, self._words, self._err):
                bad.append(f"slice {sid}: no C record {h}")
                continue
            _, key, mask, cores, extents, lanes = _decode(buf)
            a = s.alloc
            held = (sorted(cores), extents, lanes, key, mask)
            if held != (sorted(a.cores), a.extents, a.lanes, a.key, _mask(a.ports)):
                bad.append(f"slice {sid}: C record {held} differs from its allocation {a}")
        return bad


class PortView(PortState):
    """``CAllocator.ports[i]``: port ``i``'s totals, read from (and written to) C."""

    def __init__(self, allocator: CAllocator, port: int) -> None:  # no dataclass fields
        self._a = allocator
        self._i = port

    def _get(self) -> Any:
        return self._a._port_state(self._i)

    def _put(self, st: Any) -> None:
        a = self._a
        if a._l.sf_alloc_set_port(a._state, self._i, st, a._err):
            raise _disagree(a._err, f"port {self._i}")

    @property
    def owner(self) -> str | None:
        return self._a._name(int(self._get().owner))

    @owner.setter
    def owner(self, value: str | None) -> None:
        st = self._get()
        st.owner = _NOBODY if value is None else self._a._number(value)
        self._put(st)

    @property
    def slices(self) -> int:
        return int(self._get().slices)

    @slices.setter
    def slices(self, value: int) -> None:
        st = self._get()
        st.slices = value
        self._put(st)

    @property
    def quarantined(self) -> int:
        return int(self._get().quarantined)

    @quarantined.setter
    def quarantined(self, value: int) -> None:
        st = self._get()
        st.quarantined = value
        self._put(st)

    @property
    def guaranteed_mbps(self) -> int:
        return int(self._get().guaranteed_mbps)

    @guaranteed_mbps.setter
    def guaranteed_mbps(self, value: int) -> None:
        st = self._get()
        st.guaranteed_mbps = value
        self._put(st)

    @property
    def limit_mbps(self) -> int:
        return int(self._get().limit_mbps)

    @limit_mbps.setter
    def limit_mbps(self, value: int) -> None:
        st = self._get()
        st.limit_mbps = value
        self._put(st)

    @property
    def priorities(self) -> list[int]:
        return list(self._get().priorities)

    @priorities.setter
    def priorities(self, value: list[int]) -> None:
        st = self._get()
        st.priorities = value
        self._put(st)

    @property
    def keys(self) -> dict[int, int]:
        counts = self._get().keys
        return {k: int(counts[k]) for k in range(self._a.device.keys) if counts[k]}

    @keys.setter
    def keys(self, value: dict[int, int]) -> None:
        st = self._get()
        for k in range(len(st.keys)):
            st.keys[k] = value.get(k, 0)
        self._put(st)

    def snapshot(self) -> PortState:
        """The port's totals now, as a detached :class:`PortState`."""
        return PortState(
            self.owner,
            self.slices,
            self.quarantined,
            self.guaranteed_mbps,
            self.limit_mbps,
            self.priorities,
            self.keys,
        )

    def demand(self) -> PortDemand:
        return self._a.port_demand()[self._i]

    def compute_demand(self) -> PortDemand:
        return self.snapshot().compute_demand()

    def __repr__(self) -> str:
        return f"PortView({self._i}, {self.snapshot()!r})"


class _KeyView(MutableSequence[T]):
    """One entry per protection key, read from (and written to) C; fixed length."""

    def __init__(self, allocator: CAllocator) -> None:
        self._a = allocator

    def __len__(self) -> int:
        return self._a.device.keys

    def _read(self, key: int) -> tuple[int, int]:
        a, out = self._a, self._a._u32
        key = range(len(self))[key]  # IndexError like a list's, negative indexes too
        if a._l.sf_alloc_key(a._state, key, out, out + 1, a._err):
            raise _disagree(a._err, f"key {key}")
        return int(out[0]), int(out[1])

    def _write(self, key: int, owner: int | None, users: int | None) -> None:
        a = self._a
        key = range(len(self))[key]
        now_owner, now_users = self._read(key)
        if a._l.sf_alloc_set_key(
            a._state,
            key,
            now_owner if owner is None else owner,
            now_users if users is None else users,
            a._err,
        ):
            raise _disagree(a._err, f"key {key}")

    def _value(self, key: int) -> T:
        raise NotImplementedError

    def _store(self, key: int, value: T) -> None:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self._value(k) for k in range(len(self))[index]]
        return self._value(index)

    @overload
    def __setitem__(self, index: int, value: T) -> None: ...
    @overload
    def __setitem__(self, index: slice, value: Iterable[T]) -> None: ...
    def __setitem__(self, index: int | slice, value: Any) -> None:
        if isinstance(index, slice):
            for k, v in zip(range(len(self))[index], value, strict=True):
                self._store(k, v)
        else:
            self._store(index, value)

    def __delitem__(self, index: int | slice) -> None:
        raise TypeError("the device has a fixed number of protection keys")

    def insert(self, index: int, value: T) -> None:
        raise TypeError("the device has a fixed number of protection keys")

    def __iter__(self) -> Iterator[T]:
        return (self._value(k) for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (list, _KeyView)) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


class KeyOwners(_KeyView[str | None]):
    """``CAllocator.key_owner``: the VM holding each key (None: free)."""

    def _value(self, key: int) -> str | None:
        return self._a._name(self._read(key)[0])

    def _store(self, key: int, value: str | None) -> None:
        self._write(key, _NOBODY if value is None else self._a._number(value), None)


class KeyUsers(_KeyView[int]):
    """``CAllocator.key_users``: how many slices use each key."""

    def _value(self, key: int) -> int:
        return self._read(key)[1]

    def _store(self, key: int, value: int) -> None:
        self._write(key, None, value)
