"""ExtentAllocator: every policy rule, every error, and a model-based run against a set."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from itertools import pairwise

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from firmware.errors import (
    ConfigError,
    InsufficientResources,
    RequestError,
    ResourceConflict,
    SlicefabError,
)
from firmware.resources.memory import Extent, ExtentAllocator


def with_free(total: int, *free: Extent) -> ExtentAllocator:
    """An allocator of ``total`` granules where exactly the ``free`` extents are free."""
    alloc = ExtentAllocator(total)
    taken: list[Extent] = []
    cursor = 0
    for extent in sorted(free):
        if extent.start > cursor:
            taken.append(Extent(cursor, extent.start - cursor))
        cursor = extent.end
    if cursor < total:
        taken.append(Extent(cursor, total - cursor))
    alloc.allocate_at(taken)
    assert alloc.free_extents() == sorted(free)
    return alloc


def state(alloc: ExtentAllocator) -> tuple[list[Extent], int, int]:
    return alloc.free_extents(), alloc.free_granules, alloc.largest_free


# ---------------------------------------------------------------- Extent


def test_extent_end_and_order() -> None:
    assert Extent(4, 3).end == 7
    assert sorted([Extent(5, 1), Extent(2, 9)]) == [Extent(2, 9), Extent(5, 1)]


@pytest.mark.parametrize(
    ("start", "length"), [(0, 0), (0, -1), (-1, 1), (True, 1), (0, True), (1.0, 1)]
)
def test_extent_rejects_empty_or_negative_runs(start: int, length: int) -> None:
    with pytest.raises(RequestError) as info:
        Extent(start, length)
    assert info.value.field == "memory.extent"


@pytest.mark.parametrize("total", [0, -5, True, 2.0])
def test_constructor_rejects_bad_total(total: int) -> None:
    with pytest.raises(ConfigError) as info:
        ExtentAllocator(total)
    assert info.value.details["field"] == "memory.granules"


def test_fresh_allocator_is_one_free_extent() -> None:
    alloc = ExtentAllocator(32768)
    assert alloc.total == 32768
    assert alloc.free_granules == 32768
    assert alloc.largest_free == 32768
    assert alloc.free_extents() == [Extent(0, 32768)]
    assert alloc.is_free(Extent(0, 32768))


# ---------------------------------------------------------------- contiguous policy


def test_contiguous_is_best_fit_smallest_sufficient_extent() -> None:
    alloc = with_free(100, Extent(0, 10), Extent(20, 5), Extent(40, 8), Extent(60, 40))
    assert alloc.allocate(6, contiguous=True) == [Extent(40, 6)]
    assert alloc.free_extents() == [Extent(0, 10), Extent(20, 5), Extent(46, 2), Extent(60, 40)]


def test_contiguous_best_fit_ties_take_lowest_start() -> None:
    alloc = with_free(100, Extent(70, 8), Extent(10, 8), Extent(40, 8), Extent(90, 10))
    assert alloc.allocate(8, contiguous=True) == [Extent(10, 8)]
    assert alloc.allocate(8, contiguous=True) == [Extent(40, 8)]


def test_contiguous_exact_fit_removes_the_hole() -> None:
    alloc = with_free(50, Extent(0, 3), Extent(10, 5), Extent(20, 30))
    assert alloc.allocate(5, contiguous=True) == [Extent(10, 5)]
    assert alloc.free_extents() == [Extent(0, 3), Extent(20, 30)]
    assert alloc.free_granules == 33


def test_contiguous_insufficient_reports_largest_free_and_changes_nothing() -> None:
    alloc = with_free(100, Extent(0, 10), Extent(20, 30), Extent(60, 30))
    before = state(alloc)
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(31, contiguous=True)
    err = info.value
    assert err.details["resource"] == "memory"
    assert err.details["requested"] == 31
    assert err.details["available"] == 30
    assert err.details["unit"] == "granules"
    assert err.details["reason"] == "no_contiguous_extent"
    assert "contiguous" in err.message and "largest free extent: 30" in err.message
    assert str(err) == err.message
    assert state(alloc) == before


# ---------------------------------------------------------------- non-contiguous policy


def test_non_contiguous_uses_one_best_fit_extent_when_one_fits() -> None:
    alloc = with_free(100, Extent(0, 30), Extent(40, 7), Extent(60, 9))
    assert alloc.allocate(7, contiguous=False) == [Extent(40, 7)]
    assert alloc.allocate(8, contiguous=False) == [Extent(60, 8)]


def test_non_contiguous_takes_largest_extents_first_last_one_partially() -> None:
    alloc = with_free(100, Extent(0, 5), Extent(20, 10), Extent(50, 8))
    got = alloc.allocate(15, contiguous=False)
    assert got == [Extent(20, 10), Extent(50, 5)]  # sorted by start, 8-extent cut from its start
    assert alloc.free_extents() == [Extent(0, 5), Extent(55, 3)]


def test_non_contiguous_equal_sizes_take_lowest_start_first() -> None:
    alloc = with_free(40, Extent(20, 6), Extent(0, 6), Extent(10, 6), Extent(30, 2))
    assert alloc.allocate(14, contiguous=False) == [Extent(0, 6), Extent(10, 6), Extent(20, 2)]


def test_non_contiguous_uses_fewest_extents() -> None:
    holes = [Extent(2 * i, 1) for i in range(10)] + [Extent(30, 4), Extent(40, 3)]
    alloc = with_free(50, *holes)
    got = alloc.allocate(9, contiguous=False, max_extents=4)
    assert got == [Extent(0, 1), Extent(2, 1), Extent(30, 4), Extent(40, 3)]


def test_fragmentation_error_when_more_than_max_extents_needed() -> None:
    alloc = with_free(40, *(Extent(2 * i, 1) for i in range(10)))
    before = state(alloc)
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(5, contiguous=False, max_extents=4)
    err = info.value
    assert err.details["reason"] == "fragmentation"
    assert "fragmented" in err.message
    assert err.details["available"] == 4  # what 4 extents could give
    assert err.details["free_total"] == 10
    assert err.details["max_extents"] == 4
    assert state(alloc) == before
    # the same request within the extent budget succeeds
    assert len(alloc.allocate(5, contiguous=False, max_extents=5)) == 5


def test_exhausted_error_is_not_called_fragmentation() -> None:
    alloc = with_free(40, *(Extent(2 * i, 1) for i in range(10)))
    before = state(alloc)
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(11, contiguous=False, max_extents=64)
    assert info.value.details["reason"] == "exhausted"
    assert info.value.details["available"] == 10
    assert "fragment" not in info.value.message
    assert state(alloc) == before


def test_default_max_extents_is_64() -> None:
    alloc = with_free(200, *(Extent(2 * i, 1) for i in range(70)))
    with pytest.raises(InsufficientResources):
        alloc.allocate(65, contiguous=False)
    assert len(alloc.allocate(64, contiguous=False)) == 64


@pytest.mark.parametrize("granules", [0, -1, True, 1.5, "4", 101])
@pytest.mark.parametrize("contiguous", [True, False])
def test_allocate_rejects_bad_granules_without_change(granules: int, contiguous: bool) -> None:
    alloc = with_free(100, Extent(0, 50), Extent(60, 10))
    before = state(alloc)
    with pytest.raises(RequestError) as info:
        alloc.allocate(granules, contiguous=contiguous)
    assert info.value.field == "memory"
    assert "expected" in info.value.details
    assert state(alloc) == before


@pytest.mark.parametrize("max_extents", [0, -1, True, 2.0])
def test_allocate_rejects_bad_max_extents(max_extents: int) -> None:
    alloc = ExtentAllocator(10)
    with pytest.raises(RequestError) as info:
        alloc.allocate(2, contiguous=False, max_extents=max_extents)
    assert info.value.field == "memory.max_extents"
    assert alloc.free_extents() == [Extent(0, 10)]


# ---------------------------------------------------------------- allocate_at


def test_allocate_at_takes_exactly_those_extents() -> None:
    alloc = ExtentAllocator(100)
    alloc.allocate_at([Extent(50, 10), Extent(10, 5)])
    assert alloc.free_extents() == [Extent(0, 10), Extent(15, 35), Extent(60, 40)]
    assert alloc.free_granules == 85
    alloc.allocate_at([])
    assert alloc.free_granules == 85


def test_allocate_at_is_all_or_nothing_on_conflict() -> None:
    alloc = with_free(100, Extent(0, 50), Extent(60, 40))
    before = state(alloc)
    with pytest.raises(ResourceConflict) as info:
        alloc.allocate_at([Extent(0, 10), Extent(45, 10)])  # second spans 50..54, allocated
    assert info.value.details["extents"] == [{"start": 45, "length": 10}]
    assert "45..54" in info.value.message
    assert state(alloc) == before


def test_allocate_at_rejects_overlapping_request() -> None:
    alloc = ExtentAllocator(100)
    with pytest.raises(RequestError) as info:
        alloc.allocate_at([Extent(0, 10), Extent(9, 2)])
    assert info.value.field == "memory.extents"
    assert alloc.free_extents() == [Extent(0, 100)]


@pytest.mark.parametrize("bad", [Extent(95, 6), Extent(100, 1), (0, 4)])
def test_allocate_at_rejects_extents_off_the_device(bad: Extent) -> None:
    alloc = ExtentAllocator(100)
    with pytest.raises(RequestError) as info:
        alloc.allocate_at([Extent(0, 1), bad])
    assert info.value.field == "memory.extent"
    assert alloc.free_extents() == [Extent(0, 100)]


# ---------------------------------------------------------------- extend


def test_extend_grows_in_place_when_the_next_granules_are_free() -> None:
    alloc = ExtentAllocator(100)
    [held] = alloc.allocate(10, contiguous=True)
    assert alloc.extend(held, 5) == Extent(0, 15)
    assert alloc.free_extents() == [Extent(15, 85)]


def test_extend_returns_none_and_changes_nothing_when_blocked() -> None:
    alloc = with_free(100, Extent(10, 3), Extent(20, 80))
    before = state(alloc)
    assert alloc.extend(Extent(0, 10), 4) is None  # only 3 free after it
    assert alloc.extend(Extent(13, 2), 1) is None  # next granule allocated
    assert state(alloc) == before
    assert alloc.extend(Extent(0, 10), 3) == Extent(0, 13)  # exactly fits


def test_extend_at_the_end_of_memory_returns_none() -> None:
    alloc = with_free(100, Extent(0, 10))
    assert alloc.extend(Extent(90, 10), 1) is None
    assert alloc.free_extents() == [Extent(0, 10)]


def test_extend_refuses_an_extent_that_is_not_allocated() -> None:
    alloc = with_free(100, Extent(5, 10))
    before = state(alloc)
    with pytest.raises(ResourceConflict):
        alloc.extend(Extent(0, 6), 2)  # granule 5 is free
    assert state(alloc) == before


@pytest.mark.parametrize("granules", [0, -3, True])
def test_extend_rejects_bad_granules(granules: int) -> None:
    alloc = with_free(100, Extent(10, 90))
    with pytest.raises(RequestError) as info:
        alloc.extend(Extent(0, 10), granules)
    assert info.value.field == "memory"
    assert alloc.free_extents() == [Extent(10, 90)]


# ---------------------------------------------------------------- release


def test_release_coalesces_with_both_neighbours() -> None:
    alloc = with_free(100, Extent(0, 10), Extent(20, 10))
    alloc.release([Extent(10, 10)])
    assert alloc.free_extents() == [Extent(0, 30)]
    assert alloc.largest_free == 30
    assert alloc.free_granules == 30


def test_release_of_adjacent_extents_in_one_call_coalesces() -> None:
    alloc = with_free(100)
    alloc.release([Extent(30, 5), Extent(20, 10), Extent(35, 1)])
    assert alloc.free_extents() == [Extent(20, 16)]


def test_release_part_of_an_allocation_shrinks_it() -> None:
    alloc = ExtentAllocator(100)
    [held] = alloc.allocate(40, contiguous=True)
    alloc.release([Extent(30, 10)])
    assert alloc.free_extents() == [Extent(30, 70)]
    assert held == Extent(0, 40)


def test_double_free_is_a_conflict_and_all_or_nothing() -> None:
    alloc = with_free(100, Extent(50, 10))
    before = state(alloc)
    with pytest.raises(ResourceConflict) as info:
        alloc.release([Extent(0, 10), Extent(55, 10)])  # second overlaps free 55..59
    assert info.value.details["extents"] == [Extent(55, 10).to_dict()]
    assert "double free" in info.value.message
    assert state(alloc) == before


def test_release_rejects_overlapping_request() -> None:
    alloc = with_free(100)
    with pytest.raises(RequestError) as info:
        alloc.release([Extent(0, 10), Extent(0, 10)])
    assert info.value.field == "memory.extents"
    assert alloc.free_extents() == []


def test_is_free_checks_every_granule() -> None:
    alloc = with_free(100, Extent(10, 10))
    assert alloc.is_free(Extent(10, 10))
    assert alloc.is_free(Extent(12, 3))
    assert not alloc.is_free(Extent(9, 2))
    assert not alloc.is_free(Extent(19, 2))
    with pytest.raises(RequestError):
        alloc.is_free(Extent(99, 2))


def _failing_calls() -> list[Callable[[], object]]:
    alloc = with_free(40, *(Extent(2 * i, 1) for i in range(10)))
    return [
        lambda: ExtentAllocator(0),
        lambda: Extent(0, 0),
        lambda: alloc.allocate(0, contiguous=True),
        lambda: alloc.allocate(41, contiguous=True),
        lambda: alloc.allocate(2, contiguous=True),
        lambda: alloc.allocate(5, contiguous=False, max_extents=2),
        lambda: alloc.allocate(11, contiguous=False),
        lambda: alloc.allocate_at([Extent(0, 2)]),
        lambda: alloc.allocate_at([Extent(39, 2)]),
        lambda: alloc.release([Extent(1, 1), Extent(1, 2)]),
        lambda: alloc.release([Extent(0, 1)]),
        lambda: alloc.extend(Extent(0, 1), 1),
    ]


@pytest.mark.parametrize("index", range(len(_failing_calls())))
def test_errors_are_json_able_with_code_message_details(index: int) -> None:
    with pytest.raises(SlicefabError) as info:
        _failing_calls()[index]()
    wire = json.loads(json.dumps(info.value.to_dict()))
    assert wire["code"] in {"config", "invalid", "insufficient", "conflict"}
    assert wire["message"].startswith("memory")
    assert wire["details"]


# ---------------------------------------------------------------- scale


def _ops_per_second(fragments: int) -> float:
    """allocate/release pairs per second with ``fragments`` free single-granule holes."""
    total = 1 << 20
    alloc = ExtentAllocator(total)
    alloc.allocate_at(Extent(2 * i, 1) for i in range(fragments))
    if 2 * fragments < total:
        alloc.allocate_at([Extent(2 * fragments, total - 2 * fragments)])
    assert len(alloc.free_extents()) == fragments
    rounds = 1000
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(rounds):
            got = alloc.allocate(1, contiguous=True)
            alloc.release(got)
            middle = Extent(2 * (i * 7919 % fragments) + 1, 1)
            alloc.allocate_at([middle])
            alloc.release([middle])
        best = min(best, time.perf_counter() - t0)
    return rounds / best


def test_cost_per_operation_grows_only_logarithmically_up_to_2_20_granules() -> None:
    small = _ops_per_second(1 << 8)
    large = _ops_per_second(1 << 16)
    # log2 of the free-list size grows 8 -> 16 (x2); a linear scan would be 256 times slower
    print(f"memory: {small:.0f} op-rounds/s at 2**8 free extents, {large:.0f} at 2**16")
    assert small / large < 6, f"{small:.0f} ops/s at 2**8 holes, {large:.0f} at 2**16"


# ---------------------------------------------------------------- model-based


def expected_allocation(
    free: list[Extent], granules: int, contiguous: bool, max_extents: int
) -> list[Extent] | None:
    """The documented policy, restated over a plain list."""
    fits = [e for e in free if e.length >= granules]
    if fits:
        best = min(fits, key=lambda e: (e.length, e.start))
        return [Extent(best.start, granules)]
    if contiguous:
        return None
    taken: list[Extent] = []
    remaining = granules
    for e in sorted(free, key=lambda e: (-e.length, e.start)):
        if remaining == 0:
            break
        part = min(e.length, remaining)
        taken.append(Extent(e.start, part))
        remaining -= part
    if remaining or len(taken) > max_extents:
        return None
    return sorted(taken)


def units(extents: list[Extent]) -> set[int]:
    return {g for e in extents for g in range(e.start, e.end)}


TOTAL = 40


class ExtentMachine(RuleBasedStateMachine):
    """The allocator against a set of free granule numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = ExtentAllocator(TOTAL)
        self.free: set[int] = set(range(TOTAL))

    def held_runs(self) -> list[Extent]:
        runs: list[Extent] = []
        for g in sorted(set(range(TOTAL)) - self.free):
            if runs and runs[-1].end == g:
                runs[-1] = Extent(runs[-1].start, runs[-1].length + 1)
            else:
                runs.append(Extent(g, 1))
        return runs

    def pick_held(self, run: int, offset: int, length: int) -> Extent:
        runs = self.held_runs()
        chosen = runs[run % len(runs)]
        start = chosen.start + offset % chosen.length
        return Extent(start, 1 + length % (chosen.end - start))

    @rule(
        granules=st.integers(1, TOTAL),
        contiguous=st.booleans(),
        max_extents=st.integers(1, 4),
    )
    def allocate(self, granules: int, contiguous: bool, max_extents: int) -> None:
        before = self.alloc.free_extents()
        expected = expected_allocation(before, granules, contiguous, max_extents)
        try:
            got = self.alloc.allocate(granules, contiguous=contiguous, max_extents=max_extents)
        except InsufficientResources:
            assert expected is None
            assert self.alloc.free_extents() == before
            return
        assert got == expected
        taken = units(got)
        assert len(taken) == granules == sum(e.length for e in got)  # no granule twice
        assert taken <= self.free  # nothing already held handed out
        self.free -= taken

    @rule(start=st.integers(0, TOTAL - 1), length=st.integers(1, 12))
    def allocate_at(self, start: int, length: int) -> None:
        extent = Extent(start, length)
        before = self.alloc.free_extents()
        wanted = set(range(start, extent.end))
        try:
            self.alloc.allocate_at([extent])
        except RequestError:
            assert extent.end > TOTAL
        except ResourceConflict:
            assert not wanted <= self.free
        else:
            assert wanted <= self.free
            self.free -= wanted
            return
        assert self.alloc.free_extents() == before

    @rule(a=st.integers(0, TOTAL - 1), b=st.integers(0, TOTAL - 1), n=st.integers(1, 6))
    def allocate_at_two(self, a: int, b: int, n: int) -> None:
        first, second = Extent(a, 1), Extent(b, min(n, TOTAL - b))
        before = self.alloc.free_extents()
        wanted = units([first, second])
        try:
            self.alloc.allocate_at([first, second])
        except RequestError:
            assert len(wanted) < 1 + second.length  # overlapping request
        except ResourceConflict:
            assert not wanted <= self.free
        else:
            assert wanted <= self.free
            self.free -= wanted
            return
        assert self.alloc.free_extents() == before

    @precondition(lambda self: len(self.free) < TOTAL)
    @rule(run=st.integers(0, 99), offset=st.integers(0, 99), length=st.integers(0, 99))
    def release_held(self, run: int, offset: int, length: int) -> None:
        extent = self.pick_held(run, offset, length)
        self.alloc.release([extent])
        self.free |= units([extent])

    @rule(start=st.integers(0, TOTAL - 1), length=st.integers(1, 8))
    def release_any(self, start: int, length: int) -> None:
        extent = Extent(start, min(length, TOTAL - start))
        given = units([extent])
        before = self.alloc.free_extents()
        try:
            self.alloc.release([extent])
        except ResourceConflict:
            assert given & self.free
            assert self.alloc.free_extents() == before
        else:
            assert not given & self.free
            self.free |= given

    @precondition(lambda self: len(self.free) < TOTAL)
    @rule(
        run=st.integers(0, 99),
        offset=st.integers(0, 99),
        length=st.integers(0, 99),
        granules=st.integers(1, 6),
    )
    def extend(self, run: int, offset: int, length: int, granules: int) -> None:
        extent = self.pick_held(run, offset, length)
        after = set(range(extent.end, extent.end + granules))
        possible = extent.end + granules <= TOTAL and after <= self.free
        before = self.alloc.free_extents()
        grown = self.alloc.extend(extent, granules)
        if possible:
            assert grown == Extent(extent.start, extent.length + granules)
            self.free -= after
        else:
            assert grown is None
            assert self.alloc.free_extents() == before

    @rule(granules=st.integers(1, TOTAL), contiguous=st.booleans())
    def allocate_then_release_restores_exactly(self, granules: int, contiguous: bool) -> None:
        before = self.alloc.free_extents()
        try:
            got = self.alloc.allocate(granules, contiguous=contiguous, max_extents=3)
        except InsufficientResources:
            return
        self.alloc.release(got)
        assert self.alloc.free_extents() == before

    @invariant()
    def free_space_matches_model(self) -> None:
        extents = self.alloc.free_extents()
        for left, right in pairwise(extents):
            assert left.end < right.start, f"{left} and {right} overlap or are not coalesced"
        assert units(extents) == self.free
        assert sum(e.length for e in extents) == len(self.free)
        assert self.alloc.free_granules == len(self.free)
        assert self.alloc.largest_free == max((e.length for e in extents), default=0)


ExtentMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestExtentMachine = ExtentMachine.TestCase
