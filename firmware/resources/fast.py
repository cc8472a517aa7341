"""C-backed twins of the unit allocators (the fast path, ``cffi_ext/src/{cores,lanes,extents}.c``).

Each class subclasses its Python reference and keeps its public interface, its policy and
its errors exactly (``tests/test_fastpath_alloc.py`` runs both side by side); only the state
and the searches live in C:

* :class:`CCoreAllocator` — one free-core bitmap plus free counts per cluster;
* :class:`CLaneAllocator` — held-lane and group-start arrays, the aligned-group search;
* :class:`CExtentAllocator` — free extents in two treaps (by start, by size): O(log n).

A successful call goes straight to C after the cheap state-independent checks the
reference makes (shared methods). When C refuses, the wrapper builds the reference's exact
exception from the reference's own checks and the public queries, so error messages and
details never differ between the two paths. The reference's Python state is dropped after
construction, so a method that was not overridden fails loudly instead of using it.

Not thread-safe (like the references): the manager serialises allocator calls.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from firmware.errors import SlicefabError
from firmware.fastpath import describe_error, extension
from firmware.resources import cores as _cores
from firmware.resources import memory as _memory
from firmware.resources.cores import CoreAllocator
from firmware.resources.lanes import LaneAllocator, LaneGroup
from firmware.resources.memory import Extent, ExtentAllocator

__all__ = ["CCoreAllocator", "CExtentAllocator", "CLaneAllocator"]


def _disagree(err: Any, what: str) -> Exception:
    """C refused what the reference's checks accept: out of memory (``MemoryError``), or a
    bug in one of the two (a :class:`SlicefabError` naming the field and value)."""
    message, details = describe_error(err)
    if int(err.code) == extension().lib.SF_ENOMEM:
        return MemoryError(f"fast path: out of memory for {what}")
    return SlicefabError(
        f"fast path refused {what} that the reference accepts: {message}", **details
    )


def _ints(values: Sequence[Any]) -> bool:
    """True if every value is a plain int (bool is not; the reference refuses it)."""
    return all(type(v) is int for v in values)


class _Scratch:
    """A C array of ``ctype`` reused between calls, grown (doubling) when one needs more."""

    def __init__(self, ffi: Any, ctype: str) -> None:
        self._ffi, self._ctype = ffi, ctype
        self.cap = 64
        self._array = ffi.new(ctype, self.cap)

    def get(self, n: int) -> Any:
        """The array, with room for at least ``n`` elements (``cap`` of them)."""
        if n > self.cap:
            self.cap = max(n, 2 * self.cap)
            self._array = self._ffi.new(self._ctype, self.cap)
        return self._array


class _CState:
    """The compiled module, one error record, and a scratch array of uint32_t."""

    def __init__(self) -> None:
        mod = extension()
        self.ffi, self.lib = mod.ffi, mod.lib
        self.err = self.ffi.new("sf_error *")
        self.u32 = _Scratch(self.ffi, "uint32_t[]")

    def check_new(self, obj: Any, what: str) -> Any:
        if obj == self.ffi.NULL:
            raise _disagree(self.err, what)
        return self.ffi.gc(obj, getattr(self.lib, f"sf_{what}_free"))


# ------------------------------------------------------------------------------- cores


class CCoreAllocator(CoreAllocator):
    """:class:`CoreAllocator` with its free-core bitmap in C."""

    def __init__(self, cluster_sizes: Sequence[int]) -> None:
        super().__init__(cluster_sizes)  # validates the configuration exactly
        del self._free, self._free_total
        self._c = c = _CState()
        sizes = c.ffi.new("uint32_t[]", list(self._sizes))
        self._state = c.check_new(c.lib.sf_cores_new(sizes, len(self._sizes), c.err), "cores")
        self._one = c.ffi.new("uint32_t *")
        self._flag = c.ffi.new("int *")

    def free_count(self, cluster: int | None = None) -> int:
        c = self._c
        if cluster is None:
            return int(c.lib.sf_cores_free_count(self._state))
        self._check_cluster(cluster)
        if c.lib.sf_cores_cluster_free(self._state, cluster, self._one, c.err):
            raise _disagree(c.err, "a cluster")
        return int(self._one[0])

    def is_free(self, core: int) -> bool:
        self._check_id(core)
        c = self._c
        if c.lib.sf_cores_is_free(self._state, core, self._flag, c.err):
            raise _disagree(c.err, "a core id")
        return bool(self._flag[0])

    def free_ids(self) -> list[int]:
        c = self._c
        n = int(c.lib.sf_cores_free_count(self._state))
        out = c.u32.get(max(1, n))
        if c.lib.sf_cores_free_ids(self._state, out, max(1, n), self._one, c.err):
            raise _disagree(c.err, "free_ids")
        return list(out[0 : self._one[0]])

    def allocate(
        self, count: int, *, same_cluster: bool = False, cluster: int | None = None
    ) -> list[int]:
        self._check_allocate(count, same_cluster, cluster)
        c = self._c
        lib = c.lib
        mode = (
            lib.SF_CORES_IN_CLUSTER
            if cluster is not None
            else lib.SF_CORES_SAME_CLUSTER
            if same_cluster
            else lib.SF_CORES_PACK
        )
        out = c.u32.get(count)
        rc = lib.sf_cores_allocate(self._state, count, mode, cluster or 0, out, count, c.err)
        if rc == lib.SF_ENOSPC:
            raise self._no_cores(count, same_cluster, cluster)
        if rc:
            raise _disagree(c.err, "a core request")
        return list(out[0:count])

    def _ids(self, ids: Iterable[int], take: bool) -> None:
        given = ids if isinstance(ids, (list, tuple)) else list(ids)
        if not given:
            return  # nothing to take or give (the reference accepts an empty list too)
        c = self._c
        if _ints(given):
            buf = c.u32.get(len(given))
            try:
                for i, core in enumerate(given):
                    buf[i] = core
            except OverflowError:  # negative or beyond 32 bits: the checks below say so
                pass
            else:
                fn = c.lib.sf_cores_take if take else c.lib.sf_cores_give
                if not fn(self._state, buf, len(given), c.err):
                    return
        # refused: the reference's checks say why, with its exact message
        checked = self._check_ids(given)
        if take:
            held = [core for core in checked if not self.is_free(core)]
            if held:
                raise _cores._already_held(held)
        else:
            free = [core for core in checked if self.is_free(core)]
            if free:
                raise _cores._double_free(free)
        raise _disagree(c.err, "a core id list")

    def allocate_ids(self, ids: Iterable[int]) -> None:
        self._ids(ids, take=True)

    def release(self, ids: Iterable[int]) -> None:
        self._ids(ids, take=False)


# ------------------------------------------------------------------------------- lanes


class CLaneAllocator(LaneAllocator):
    """:class:`LaneAllocator` with held lanes, group starts and the search in C."""

    def __init__(self, port_lanes: Sequence[int]) -> None:
        super().__init__(port_lanes)
        del self._held, self._groups, self._port_free
        self._c = c = _CState()
        lanes = c.ffi.new("uint32_t[]", list(self._port_lanes))
        self._state = c.check_new(c.lib.sf_lanes_new(lanes, len(self._port_lanes), c.err), "lanes")
        self._one = c.ffi.new("uint32_t *")
        self._two = c.ffi.new("uint32_t *")
        self._flag = c.ffi.new("int *")
        self._exclude_key: frozenset[int] | None = None  # what _exclude holds, checked
        self._exclude: Any = c.ffi.NULL
        self._n_exclude = 0

    def free_lanes(self, port: int | None = None) -> int:
        c = self._c
        if port is None:
            return int(c.lib.sf_lanes_free_total(self._state))
        self._check_port(port)
        if c.lib.sf_lanes_port_free(self._state, port, self._one, c.err):
            raise _disagree(c.err, "a port")
        return int(self._one[0])

    def is_free(self, group: LaneGroup) -> bool:
        self.validate(group)
        c = self._c
        if c.lib.sf_lanes_is_free(self._state, group.first, group.width, self._flag, c.err):
            raise _disagree(c.err, "a lane group")
        return bool(self._flag[0])

    def _lane_held(self, lane: int) -> bool:
        c = self._c
        if c.lib.sf_lanes_lane_held(self._state, lane, self._flag, c.err):
            raise _disagree(c.err, "a lane")
        return bool(self._flag[0])

    def _group_at(self, first: int) -> LaneGroup | None:
        c = self._c
        if c.lib.sf_lanes_group_at(self._state, first, self._one, c.err):
            raise _disagree(c.err, "a lane")
        width = int(self._one[0])
        if not width:
            return None
        port = max(p for p, base in enumerate(self._port_base) if base <= first)
        return LaneGroup(port, first, width)

    def held_groups(self) -> list[LaneGroup]:
        return [g for first in range(self._total) if (g := self._group_at(first)) is not None]

    def _holders(self, lanes: Iterable[int]) -> list[LaneGroup]:
        wanted = set(lanes)
        return [g for g in self.held_groups() if not wanted.isdisjoint(g.lanes)]

    def allocate(
        self, width: int, *, port: int | None = None, exclude: Collection[int] = ()
    ) -> LaneGroup:
        # the reference's checks, in its order
        if port is not None:
            self._check_port(port)
        self._check_width(width, port)
        if not (isinstance(exclude, frozenset) and exclude == self._exclude_key):
            # converted once (the allocator passes the same endpoint lanes every time)
            excluded = self._check_exclude(exclude)
            lanes = sorted(excluded)
            self._exclude = self._c.ffi.new("uint32_t[]", lanes) if lanes else self._c.ffi.NULL
            self._n_exclude = len(lanes)
            self._exclude_key = excluded
        c = self._c
        rc = c.lib.sf_lanes_allocate(
            self._state,
            width,
            -1 if port is None else port,
            self._exclude,
            self._n_exclude,
            self._one,
            self._two,
            c.err,
        )
        if rc == c.lib.SF_ENOSPC:
            assert self._exclude_key is not None
            raise self._no_group(width, port, self._exclude_key, int(c.err.limit))
        if rc:
            raise _disagree(c.err, "a lane request")
        return LaneGroup(int(self._one[0]), int(self._two[0]), width)

    def allocate_exact(self, group: LaneGroup) -> None:
        self.validate(group)
        c = self._c
        rc = c.lib.sf_lanes_take(self._state, group.port, group.first, group.width, c.err)
        if rc == c.lib.SF_ECONFLICT:
            raise self._conflict(group, [lane for lane in group.lanes if self._lane_held(lane)])
        if rc:
            raise _disagree(c.err, "a lane group")

    def release(self, group: LaneGroup) -> None:
        self.validate(group)
        c = self._c
        rc = c.lib.sf_lanes_give(self._state, group.port, group.first, group.width, c.err)
        if rc == c.lib.SF_ENOTHELD:
            free = [lane for lane in group.lanes if not self._lane_held(lane)]
            raise self._not_held(group, free)
        if rc:
            raise _disagree(c.err, "a lane group")


# ------------------------------------------------------------------------------ memory


class CExtentAllocator(ExtentAllocator):
    """:class:`ExtentAllocator` with its free-extent indexes (two treaps) in C."""

    def __init__(self, total_granules: int) -> None:
        super().__init__(total_granules)
        del self._by_start, self._by_size, self._free
        self._c = c = _CState()
        self._state = c.check_new(c.lib.sf_extents_new(total_granules, c.err), "extents")
        self._extents = _Scratch(c.ffi, "sf_extent[]")
        self._n = c.ffi.new("uint32_t *")
        self._flag = c.ffi.new("int *")

    @property
    def free_granules(self) -> int:
        return int(self._c.lib.sf_extents_free_granules(self._state))

    @property
    def largest_free(self) -> int:
        return int(self._c.lib.sf_extents_largest(self._state))

    def free_extents(self) -> list[Extent]:
        c = self._c
        n = int(c.lib.sf_extents_count(self._state))
        buf = self._extents.get(max(1, n))
        if c.lib.sf_extents_list(self._state, buf, max(1, n), self._n, c.err):
            raise _disagree(c.err, "free_extents")
        return [Extent(buf[i].start, buf[i].length) for i in range(self._n[0])]

    def free_run_at(self, start: int) -> int:
        if not isinstance(start, int) or not 0 <= start < 1 << 32:
            return 0  # no free extent starts there (the reference's dict lookup misses)
        return int(self._c.lib.sf_extents_free_at(self._state, int(start)))

    def is_free(self, extent: Extent) -> bool:
        self._check_extent(extent)
        c = self._c
        if c.lib.sf_extents_is_free(self._state, extent.start, extent.length, self._flag, c.err):
            raise _disagree(c.err, "an extent")
        return bool(self._flag[0])

    def any_free(self, extent: Extent) -> bool:
        self._check_extent(extent)
        c = self._c
        if c.lib.sf_extents_any_free(self._state, extent.start, extent.length, self._flag, c.err):
            raise _disagree(c.err, "an extent")
        return bool(self._flag[0])

    def __repr__(self) -> str:
        return (
            f"CExtentAllocator(total={self._total}, free={self.free_granules}, "
            f"free_extents={int(self._c.lib.sf_extents_count(self._state))})"
        )

    def allocate(self, granules: int, *, contiguous: bool, max_extents: int = 64) -> list[Extent]:
        if not (
            type(granules) is int
            and 0 < granules <= self._total
            and type(max_extents) is int
            and max_extents >= 1
        ):
            self._check_allocate(granules, max_extents)  # raises the reference's error
        c = self._c
        lib = c.lib
        # at most one extent per free extent: the buffer never needs more than the total
        most = min(max_extents, self._total)
        buf = self._extents.get(most)
        rc = lib.sf_extents_allocate(
            self._state, granules, contiguous, most, buf, self._extents.cap, self._n, c.err
        )
        if rc == 0:
            n = self._n[0]
            if n == 1:  # the usual answer: one extent
                e = buf[0]
                return [Extent(e.start, e.length)]
            return [Extent(buf[i].start, buf[i].length) for i in range(n)]
        if rc == lib.SF_ENOSPC:
            raise self._no_memory(granules, contiguous)
        if rc == lib.SF_EFRAG:
            raise self._fragmented(granules, int(c.err.limit), max_extents)
        raise _disagree(c.err, "a memory request")

    def _fill(self, given: Sequence[Any]) -> Any:
        """The extents in the C buffer, or None if one is not a plain in-range Extent."""
        buf = self._extents.get(max(1, len(given)))
        total = self._total
        for i, e in enumerate(given):
            if type(e) is not Extent or e.start + e.length > total:
                return None
            b = buf[i]
            b.start = e.start
            b.length = e.length
        return buf

    def allocate_at(self, extents: Iterable[Extent]) -> None:
        given = extents if isinstance(extents, (list, tuple)) else list(extents)
        if not given:
            return
        c = self._c
        buf = self._fill(given)
        if buf is not None and not c.lib.sf_extents_take(self._state, buf, len(given), c.err):
            return
        wanted = self._check_extents(given)
        busy = [extent for extent in wanted if not self.is_free(extent)]
        if busy:
            raise _memory._busy(busy)
        raise _disagree(c.err, "an extent list")

    def release(self, extents: Iterable[Extent]) -> None:
        given = extents if isinstance(extents, (list, tuple)) else list(extents)
        if not given:
            return
        c = self._c
        buf = self._fill(given)
        if buf is not None and not c.lib.sf_extents_give(self._state, buf, len(given), c.err):
            return
        checked = self._check_extents(given)
        double = [extent for extent in checked if self.any_free(extent)]
        if double:
            raise _memory._double_free(double)
        raise _disagree(c.err, "an extent list")

    def extend(self, extent: Extent, granules: int) -> Extent | None:
        self._check_extent(extent)
        self._check_count("memory", granules, limit=None)
        c = self._c
        if granules >= 1 << 32:  # more than the device could ever have free
            if self.any_free(extent):
                raise _memory._extend_free(extent)
            return None
        rc = c.lib.sf_extents_extend(
            self._state, extent.start, extent.length, granules, self._flag, c.err
        )
        if rc == c.lib.SF_ECONFLICT:
            raise _memory._extend_free(extent)
        if rc:
            raise _disagree(c.err, "an extent")
        return Extent(extent.start, extent.length + granules) if self._flag[0] else None
