"""Device memory, allocated in granules by a free-extent allocator.

The device's memory is a row of ``total`` granules (the allocation unit of the inventory, e.g.
2 MiB). A slice holds memory as a list of :class:`Extent` runs; live resize adds or releases
extents the way a CXL Dynamic Capacity Device adds or releases capacity extents (CXL r3.1,
Dynamic Capacity; FM API 5604h/5605h).

Why extents and not a bitmap: the device may have 2**20 granules, and a slice typically holds
a handful of large runs. The allocator therefore records *free space* as disjoint, coalesced
extents in two indexes that always agree:

* ``_by_start``: ``SortedDict`` start -> length, ordered by address. It answers "which free
  extent contains / follows granule g" and finds the neighbours to coalesce with.
* ``_by_size``: ``SortedList`` of ``(length, start)``, ordered by size then address. It answers
  "smallest free extent of at least n granules" (best fit) and "largest free extent".

Every operation touches a bounded number of entries of each index, so its cost grows with
``log(number of free extents)`` (the non-contiguous path additionally with the number of
extents it hands out, at most ``max_extents``). The free total is a counter, read in O(1).

Invariants (checked by ``tests/test_resources_memory.py`` after every step of a model run):
free extents never overlap, no two are adjacent (coalesced), the two indexes hold the same
extents, and ``free_granules`` is the sum of their lengths.

Every mutating method validates its whole request and checks the current state first, and
only then changes anything: a call that raises leaves the allocator exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, TypeGuard

from sortedcontainers import SortedDict, SortedList

from firmware.errors import ConfigError, InsufficientResources, RequestError, ResourceConflict

__all__ = ["Extent", "ExtentAllocator"]


def _is_int(value: object) -> TypeGuard[int]:
    """True for a real ``int`` (``bool`` is an ``int`` subclass but never a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, order=True)
class Extent:
    """A run of ``length`` granules starting at granule ``start``; ``end`` is exclusive.

    Raises:
        RequestError: (field ``memory.extent``) if ``start`` is not an int >= 0 or ``length``
            is not an int > 0 — an empty or negative run names no memory at all.
    """

    start: int
    length: int

    def __init__(self, start: int, length: int) -> None:
        # The generated __init__ of a frozen dataclass sets each field through
        # object.__setattr__; writing the instance dict is the same for a class without
        # slots or descriptors, at a fraction of the cost (an extent is built per allocation).
        d = self.__dict__
        d["start"] = start
        d["length"] = length
        self.__post_init__()

    def __post_init__(self) -> None:
        if type(self.start) is int and type(self.length) is int and self.start >= 0 < self.length:
            return  # the common case, checked cheaply (extents are made on every allocation)
        if not _is_int(self.start) or self.start < 0:
            raise RequestError(
                "memory.extent",
                f"start must be an int >= 0, got {self.start!r}",
                start=self.start,
                expected=">= 0",
            )
        if not _is_int(self.length) or self.length <= 0:
            raise RequestError(
                "memory.extent",
                f"length must be an int > 0 granules, got {self.length!r}",
                length=self.length,
                expected="> 0",
            )

    @property
    def end(self) -> int:
        """The first granule after the run (``start + length``)."""
        return self.start + self.length

    def to_dict(self) -> dict[str, int]:
        """``{"start", "length"}``, as error details and the ledger carry it (JSON-able)."""
        return {"start": self.start, "length": self.length}


def _insufficient(
    requested: int, available: int, explanation: str, **details: Any
) -> InsufficientResources:
    """An ``InsufficientResources("memory", ...)`` whose message also says *why*.

    ``details["reason"]`` is the machine-readable form of the reason.
    """
    return InsufficientResources("memory", requested, available, "granules", explanation, **details)


class ExtentAllocator:
    """Free-extent allocator over granules ``0 .. total-1`` (all free at start).

    Raises:
        ConfigError: if ``total_granules`` is not an int > 0.
    """

    def __init__(self, total_granules: int) -> None:
        if not _is_int(total_granules) or total_granules <= 0:
            raise ConfigError(
                f"memory: total granules must be an int > 0, got {total_granules!r}",
                field="memory.granules",
                value=total_granules,
                expected="> 0",
            )
        self._total = total_granules
        self._by_start: SortedDict[int, int] = SortedDict({0: total_granules})
        self._by_size: SortedList[tuple[int, int]] = SortedList([(total_granules, 0)])
        self._free = total_granules

    # ------------------------------------------------------------------ queries

    @property
    def total(self) -> int:
        """Number of granules the allocator manages."""
        return self._total

    @property
    def free_granules(self) -> int:
        """Number of free granules, O(1)."""
        return self._free

    @property
    def largest_free(self) -> int:
        """Length of the largest free extent (0 when memory is exhausted), O(log n)."""
        return self._by_size[-1][0] if self._by_size else 0

    def free_extents(self) -> list[Extent]:
        """All free extents, sorted by start, coalesced (no two adjacent)."""
        return [Extent(start, length) for start, length in self._by_start.items()]

    def is_free(self, extent: Extent) -> bool:
        """True if every granule of ``extent`` is free.

        Raises:
            RequestError: (field ``memory.extent``) if ``extent`` is not an :class:`Extent`
                or runs past the last granule.
        """
        self._check_extent(extent)
        return self._containing(extent) is not None

    def free_run_at(self, start: int) -> int:
        """Length of the free extent that starts exactly at granule ``start`` (0 if none).
        O(log n): what a contiguous slice could grow into in place."""
        return int(self._by_start.get(start, 0))

    def any_free(self, extent: Extent) -> bool:
        """True if any granule of ``extent`` is free (``is_free``: all of them).

        Raises:
            RequestError: as :meth:`is_free`.
        """
        self._check_extent(extent)
        return self._overlaps_free(extent)

    def __repr__(self) -> str:
        return (
            f"ExtentAllocator(total={self._total}, free={self._free}, "
            f"free_extents={len(self._by_start)})"
        )

    # ---------------------------------------------------------------- mutations

    def allocate(self, granules: int, *, contiguous: bool, max_extents: int = 64) -> list[Extent]:
        """Take ``granules`` granules; return the extents handed out, sorted by start.

        Policy (deterministic, so the C fast path can mirror it):

        * ``contiguous=True``: **best fit** — the smallest free extent of at least
          ``granules``, the lowest start among equal sizes; the request is carved from its
          start. Best fit leaves the large extents whole for later contiguous requests.
        * ``contiguous=False``: if one free extent is large enough, the same best fit (one
          extent is the cheapest to map). Otherwise the **largest free extents first**, in
          decreasing size (lowest start among equal sizes), the last one taken from its
          start only as far as needed: this hands out the fewest extents possible. At most
          ``max_extents`` extents are handed out.

        Raises:
            RequestError: (field ``memory``) if ``granules`` is not an int in
                ``1 .. total``; (field ``memory.max_extents``) if ``max_extents`` is not an
                int >= 1.
            InsufficientResources: ``("memory", granules, available, "granules")`` with
                ``details["reason"]``:
                ``"no_contiguous_extent"`` (contiguous; available = largest free extent),
                ``"exhausted"`` (fewer free granules in total; available = free total) or
                ``"fragmentation"`` (the free total suffices but more than ``max_extents``
                extents would be needed; available = what ``max_extents`` extents give).
        """
        self._check_allocate(granules, max_extents)
        best = self._best_fit(granules)
        if best is not None:
            taken = [Extent(best, granules)]
        elif contiguous or granules > self._free:
            raise self._no_memory(granules, contiguous)
        else:
            taken = self._largest_first(granules, max_extents)
        for extent in taken:
            self._take(extent)
        return sorted(taken)

    def _check_allocate(self, granules: int, max_extents: int) -> None:
        """The state-independent checks of :meth:`allocate` (shared with the C fast path)."""
        self._check_count("memory", granules, limit=self._total)
        if not _is_int(max_extents) or max_extents < 1:
            raise RequestError(
                "memory.max_extents",
                f"must be an int >= 1, got {max_extents!r}",
                value=max_extents,
                expected=">= 1",
            )

    def _no_memory(self, granules: int, contiguous: bool) -> InsufficientResources:
        """No contiguous extent (``contiguous``) or too few free granules in total, from the
        public queries (so the C fast path raises exactly the same error)."""
        free, largest = self.free_granules, self.largest_free
        if contiguous:
            return _insufficient(
                granules,
                largest,
                f"no free contiguous extent of {granules} granules "
                f"(largest free extent: {largest}, free in total: {free})",
                reason="no_contiguous_extent",
                largest_free=largest,
                free_total=free,
            )
        return _insufficient(
            granules,
            free,
            f"only {free} granules free in total",
            reason="exhausted",
            free_total=free,
        )

    def _fragmented(self, granules: int, available: int, max_extents: int) -> InsufficientResources:
        free = self.free_granules
        return _insufficient(
            granules,
            available,
            f"free memory is fragmented: {free} granules are free in total, but "
            f"the {max_extents} largest free extents hold only {available} "
            f"(max_extents={max_extents})",
            reason="fragmentation",
            free_total=free,
            max_extents=max_extents,
        )

    def allocate_at(self, extents: Iterable[Extent]) -> None:
        """Take exactly these extents (ledger recovery, resize to a known address).

        All or nothing: either every extent is taken or nothing changes.

        Raises:
            RequestError: (field ``memory.extent``) for an invalid or out-of-range extent;
                (field ``memory.extents``) if two of the given extents overlap.
            ResourceConflict: if any granule of any extent is not free; ``details["extents"]``
                lists the offending extents.
        """
        wanted = self._check_extents(extents)
        busy = [extent for extent in wanted if self._containing(extent) is None]
        if busy:
            raise _busy(busy)
        for extent in wanted:
            self._take(extent)

    def extend(self, extent: Extent, granules: int) -> Extent | None:
        """Grow the allocated ``extent`` in place by ``granules`` granules.

        Returns the grown extent (same start, ``length + granules``) if the ``granules``
        granules right after ``extent`` are free, otherwise ``None`` and nothing changes
        (the caller then allocates a separate extent).

        Raises:
            RequestError: (field ``memory.extent``) for an invalid or out-of-range
                ``extent``; (field ``memory``) if ``granules`` is not an int > 0.
            ResourceConflict: if part of ``extent`` itself is free — growing memory that is
                not held is a bookkeeping error of the caller.
        """
        self._check_extent(extent)
        self._check_count("memory", granules, limit=None)
        if self._overlaps_free(extent):
            raise _extend_free(extent)
        if self.free_run_at(extent.end) < granules:
            return None
        self._take(Extent(extent.end, granules))
        return Extent(extent.start, extent.length + granules)

    def release(self, extents: Iterable[Extent]) -> None:
        """Give the extents back, coalescing them with free neighbours.

        Part of an extent handed out earlier may be released (shrinking a slice). All or
        nothing: either every extent is released or nothing changes.

        Raises:
            RequestError: (field ``memory.extent``) for an invalid or out-of-range extent;
                (field ``memory.extents``) if two of the given extents overlap.
            ResourceConflict: if any granule of any extent is already free (double free);
                ``details["extents"]`` lists the offending extents.
        """
        given = self._check_extents(extents)
        double = [extent for extent in given if self._overlaps_free(extent)]
        if double:
            raise _double_free(double)
        for extent in given:
            self._give(extent)

    # ----------------------------------------------------------------- policies

    def _best_fit(self, granules: int) -> int | None:
        """Start of the smallest free extent >= ``granules`` (lowest start on ties)."""
        fit = next(self._by_size.irange(minimum=(granules, -1)), None)
        return None if fit is None else fit[1]

    def _largest_first(self, granules: int, max_extents: int) -> list[Extent]:
        """Largest free extents first until ``granules`` are covered (no state change).

        Within one size the lowest start comes first, so the choice is deterministic.
        The caller guarantees ``granules <= free_granules``.

        Raises:
            InsufficientResources: (reason ``"fragmentation"``) if more than ``max_extents``
                extents would be needed.
        """
        taken: list[Extent] = []
        remaining = granules
        below: tuple[int, int] | None = None  # sizes at or above it have been visited
        while remaining > 0 and len(taken) < max_extents:
            top = next(
                self._by_size.irange(maximum=below, inclusive=(True, False), reverse=True), None
            )
            if top is None:
                break
            size = top[0]
            for _, start in self._by_size.irange((size, -1), (size, self._total)):
                part = min(size, remaining)
                taken.append(Extent(start, part))
                remaining -= part
                if remaining == 0 or len(taken) == max_extents:
                    break
            below = (size, -1)
        if remaining > 0:
            raise self._fragmented(granules, granules - remaining, max_extents)
        return taken

    # --------------------------------------------------------------- validation

    def _check_count(self, field: str, value: object, *, limit: int | None) -> None:
        """Reject a granule count that is not an int in ``1 .. limit``."""
        if not _is_int(value) or value <= 0:
            raise RequestError(
                field, f"granules must be an int > 0, got {value!r}", value=value, expected="> 0"
            )
        if limit is not None and value > limit:
            raise RequestError(
                field,
                f"requested {value} granules, the device has only {limit}",
                value=value,
                limit=limit,
                expected=f"<= {limit}",
            )

    def _check_extent(self, extent: object) -> None:
        """Reject anything that is not an :class:`Extent` inside ``0 .. total``."""
        if not isinstance(extent, Extent):
            raise RequestError(
                "memory.extent", f"expected an Extent, got {extent!r}", value=repr(extent)
            )
        if extent.end > self._total:
            raise RequestError(
                "memory.extent",
                f"{_describe([extent])} runs past the last granule ({self._total - 1})",
                extent=extent.to_dict(),
                limit=self._total,
                expected=f"end <= {self._total}",
            )

    def _check_extents(self, extents: Iterable[Extent]) -> list[Extent]:
        """Validate each extent and that none overlap; return them sorted by start."""
        given = list(extents)
        for extent in given:
            self._check_extent(extent)
        ordered = sorted(given)
        for left, right in pairwise(ordered):
            if right.start < left.end:
                raise RequestError(
                    "memory.extents",
                    f"{_describe([left])} and {_describe([right])} overlap",
                    extents=[left.to_dict(), right.to_dict()],
                    expected="disjoint extents",
                )
        return ordered

    # ------------------------------------------------------ index maintenance

    def _containing(self, extent: Extent) -> int | None:
        """Start of the free extent that contains all of ``extent``, if any.

        Free extents are coalesced, so a fully free run lies inside exactly one of them.
        """
        start = self._last_start(extent.start, inclusive=True)
        if start is None or start + self._by_start[start] < extent.end:
            return None
        return start

    def _overlaps_free(self, extent: Extent) -> bool:
        """True if any granule of ``extent`` is free.

        Only the free extent with the greatest start below ``extent.end`` can overlap it:
        the ones before it end before it starts.
        """
        start = self._last_start(extent.end, inclusive=False)
        return start is not None and start + self._by_start[start] > extent.start

    def _last_start(self, bound: int, *, inclusive: bool) -> int | None:
        """The greatest free-extent start ``<= bound`` (``< bound`` if not inclusive).

        ``irange`` walks the sorted keys without SortedList's positional index, which
        deletions keep invalidating on large free lists.
        """
        keys = self._by_start.irange(maximum=bound, inclusive=(True, inclusive), reverse=True)
        return next(keys, None)

    def _insert(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_size.add((length, start))

    def _delete(self, start: int) -> int:
        length = self._by_start.pop(start)
        self._by_size.remove((length, start))
        return length

    def _take(self, extent: Extent) -> None:
        """Mark a run that lies inside one free extent as allocated (caller checked)."""
        start = self._containing(extent)
        assert start is not None, "caller must check that the extent is free"
        length = self._delete(start)
        if extent.start > start:
            self._insert(start, extent.start - start)
        tail = start + length - extent.end
        if tail > 0:
            self._insert(extent.end, tail)
        self._free -= extent.length

    def _give(self, extent: Extent) -> None:
        """Mark an allocated run free, merging it with free neighbours (caller checked)."""
        start, end = extent.start, extent.end
        before = self._last_start(start, inclusive=False)
        if before is not None and before + self._by_start[before] == start:
            self._delete(before)
            start = before
        if end in self._by_start:
            end += self._delete(end)
        self._insert(start, end - start)
        self._free += extent.length


def _busy(busy: list[Extent]) -> ResourceConflict:
    return ResourceConflict(
        f"memory: {_describe(busy)} not free (already allocated, at least in part)",
        field="memory.extent",
        extents=[extent.to_dict() for extent in busy],
        expected="every granule free",
    )


def _double_free(double: list[Extent]) -> ResourceConflict:
    return ResourceConflict(
        f"memory: double free: {_describe(double)} already free, at least in part",
        field="memory.extent",
        extents=[extent.to_dict() for extent in double],
        expected="every granule allocated",
    )


def _extend_free(extent: Extent) -> ResourceConflict:
    return ResourceConflict(
        f"memory: cannot extend {_describe([extent])}: part of it is free, not allocated",
        field="memory.extent",
        extents=[extent.to_dict()],
        expected="an allocated extent",
    )


def _describe(extents: list[Extent]) -> str:
    """``granules 4..7, 12..12`` — inclusive ranges, as an operator reads them."""
    runs = ", ".join(f"{extent.start}..{extent.end - 1}" for extent in extents)
    return f"granules {runs}"
