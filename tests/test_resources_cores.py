"""CoreAllocator: best-fit and packing policies, every error, and a model-based run."""

from __future__ import annotations

import json
from collections.abc import Callable

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
from firmware.resources.cores import CoreAllocator


def state(alloc: CoreAllocator) -> tuple[list[int], list[int]]:
    return alloc.free_ids(), [alloc.free_count(c) for c in range(len(alloc.cluster_sizes))]


def holding(sizes: list[int], held: list[int]) -> CoreAllocator:
    alloc = CoreAllocator(sizes)
    alloc.allocate_ids(held)
    return alloc


# ---------------------------------------------------------------- layout


def test_core_ids_follow_cluster_order() -> None:
    alloc = CoreAllocator([4, 2, 3])
    assert alloc.total == 9
    assert [alloc.cluster_of(core) for core in range(9)] == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert alloc.free_count() == 9
    assert [alloc.free_count(c) for c in range(3)] == [4, 2, 3]
    assert all(alloc.is_free(core) for core in range(9))


@pytest.mark.parametrize("sizes", [[], [0], [4, -1], [True], [2.0]])
def test_constructor_rejects_bad_cluster_sizes(sizes: list[int]) -> None:
    with pytest.raises(ConfigError) as info:
        CoreAllocator(sizes)
    assert info.value.details["field"] == "cores.clusters"


@pytest.mark.parametrize("core", [-1, 9, True, "3"])
def test_unknown_core_ids_are_request_errors(core: int) -> None:
    alloc = CoreAllocator([4, 2, 3])
    with pytest.raises(RequestError) as info:
        alloc.cluster_of(core)
    assert info.value.field == "cores.ids"
    with pytest.raises(RequestError):
        alloc.is_free(core)


# ---------------------------------------------------------------- same cluster


def test_same_cluster_is_best_fit_cluster() -> None:
    alloc = holding([8, 8, 8], [0, 1, 2, 3, 4, 8, 9])  # free: 3, 6, 8
    assert alloc.allocate(3, same_cluster=True) == [5, 6, 7]
    assert alloc.allocate(4, same_cluster=True) == [10, 11, 12, 13]  # 6 free, not the empty 8


def test_same_cluster_ties_take_lowest_cluster() -> None:
    alloc = holding([4, 4, 4], [0, 4])  # free: 3, 3, 4
    assert alloc.allocate(2, same_cluster=True) == [1, 2]


def test_lowest_free_ids_first_inside_a_cluster() -> None:
    alloc = holding([8], [0, 1, 2, 3, 4, 5, 6, 7])
    alloc.release([6, 2, 4])
    assert alloc.allocate(2, same_cluster=True) == [2, 4]


def test_same_cluster_insufficient_names_the_constraint_and_changes_nothing() -> None:
    alloc = holding([4, 4, 4], [0, 1, 4, 5, 8])  # free: 2, 2, 3 -> 7 free in total
    before = state(alloc)
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(4, same_cluster=True)
    err = info.value
    assert err.details["resource"] == "cores"
    assert err.details["requested"] == 4
    assert err.details["available"] == 3  # most free in one cluster
    assert err.details["unit"] == "cores"
    assert "same-cluster" in err.message
    assert "cluster 2" in err.message
    assert state(alloc) == before


def test_same_cluster_larger_than_any_cluster_is_a_request_error() -> None:
    alloc = CoreAllocator([4, 8])
    with pytest.raises(RequestError) as info:
        alloc.allocate(9, same_cluster=True)
    assert info.value.field == "cores"
    assert info.value.details["limit"] == 8
    assert alloc.free_count() == 12


# ---------------------------------------------------------------- given cluster


def test_given_cluster_takes_lowest_ids_there() -> None:
    alloc = CoreAllocator([4, 4])
    assert alloc.allocate(2, cluster=1) == [4, 5]
    assert alloc.allocate(2, cluster=1, same_cluster=True) == [6, 7]


def test_given_cluster_insufficient_reports_its_free_count() -> None:
    alloc = holding([4, 4], [4, 5, 6])
    before = state(alloc)
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(2, cluster=1)
    assert info.value.details["available"] == 1
    assert "cluster 1" in info.value.message
    assert state(alloc) == before


@pytest.mark.parametrize(("count", "cluster", "field"), [(5, 0, "cores"), (1, 2, "cores.cluster")])
def test_given_cluster_request_errors(count: int, cluster: int, field: str) -> None:
    alloc = CoreAllocator([4, 4])
    with pytest.raises(RequestError) as info:
        alloc.allocate(count, cluster=cluster)
    assert info.value.field == field
    assert alloc.free_count() == 8


# ---------------------------------------------------------------- packing


def test_pack_uses_the_fullest_cluster_that_fits_whole() -> None:
    alloc = holding([4, 4, 4], [0, 1, 4])  # free: 2, 3, 4
    assert alloc.allocate(3) == [5, 6, 7]
    assert alloc.allocate(2) == [2, 3]


def test_pack_spills_over_the_emptiest_clusters_first() -> None:
    alloc = holding([4, 4, 4, 4], [0, 4, 5, 8, 9, 10])  # free: 3, 2, 1, 4
    got = alloc.allocate(6)  # no cluster holds 6: take cluster 3 (4), then cluster 0 (3)
    assert got == [1, 2, 12, 13, 14, 15]
    assert state(alloc)[1] == [1, 2, 1, 0]


def test_pack_spill_ties_take_lowest_cluster() -> None:
    alloc = holding([4, 4, 4], [0, 4, 8])  # free: 3, 3, 3
    assert alloc.allocate(5) == [1, 2, 3, 5, 6]


def test_pack_insufficient_reports_free_total() -> None:
    alloc = holding([4, 4], [0, 1, 4])
    before = state(alloc)
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(6)
    assert info.value.details["available"] == 5
    assert "same-cluster" not in info.value.message
    assert state(alloc) == before


@pytest.mark.parametrize("count", [0, -2, True, 1.5, "2", 9])
def test_allocate_rejects_bad_count(count: int) -> None:
    alloc = holding([4, 4], [3])
    before = state(alloc)
    with pytest.raises(RequestError) as info:
        alloc.allocate(count)
    assert info.value.field == "cores"
    assert state(alloc) == before


# ---------------------------------------------------------------- explicit ids


def test_allocate_ids_takes_exactly_those() -> None:
    alloc = CoreAllocator([4, 4])
    alloc.allocate_ids([6, 1])
    assert alloc.free_ids() == [0, 2, 3, 4, 5, 7]
    alloc.allocate_ids([])
    assert alloc.free_count() == 6


def test_allocate_ids_conflict_names_held_ids_and_is_all_or_nothing() -> None:
    alloc = holding([4, 4], [2, 5])
    before = state(alloc)
    with pytest.raises(ResourceConflict) as info:
        alloc.allocate_ids([0, 5, 2, 7])
    assert info.value.details["cores"] == [2, 5]
    assert "2, 5" in info.value.message
    assert state(alloc) == before


@pytest.mark.parametrize("ids", [[0, 8], [1, -1], [3, 3], [True]])
def test_allocate_ids_rejects_unknown_or_duplicate_ids(ids: list[int]) -> None:
    alloc = CoreAllocator([4, 4])
    with pytest.raises(RequestError) as info:
        alloc.allocate_ids(ids)
    assert info.value.field == "cores.ids"
    assert alloc.free_count() == 8


def test_release_restores_exactly() -> None:
    alloc = CoreAllocator([4, 4])
    before = state(alloc)
    got = alloc.allocate(6)
    alloc.release(got)
    assert state(alloc) == before


def test_double_free_is_a_conflict_and_all_or_nothing() -> None:
    alloc = holding([4, 4], [0, 1, 2])
    before = state(alloc)
    with pytest.raises(ResourceConflict) as info:
        alloc.release([0, 3, 1, 4])
    assert info.value.details["cores"] == [3, 4]
    assert "double free" in info.value.message
    assert state(alloc) == before


@pytest.mark.parametrize("ids", [[0, 0], [0, 99]])
def test_release_rejects_unknown_or_duplicate_ids(ids: list[int]) -> None:
    alloc = holding([4, 4], [0])
    with pytest.raises(RequestError):
        alloc.release(ids)
    assert alloc.free_ids() == [1, 2, 3, 4, 5, 6, 7]


def _failing_calls() -> list[Callable[[], object]]:
    alloc = holding([4, 4], [0, 1, 4])
    return [
        lambda: CoreAllocator([0]),
        lambda: alloc.cluster_of(8),
        lambda: alloc.allocate(0),
        lambda: alloc.allocate(5, same_cluster=True),
        lambda: alloc.allocate(4, same_cluster=True),
        lambda: alloc.allocate(4, cluster=0),
        lambda: alloc.allocate(6),
        lambda: alloc.allocate(1, cluster=3),
        lambda: alloc.allocate_ids([2, 2]),
        lambda: alloc.allocate_ids([0, 2]),
        lambda: alloc.release([2]),
    ]


@pytest.mark.parametrize("index", range(len(_failing_calls())))
def test_errors_are_json_able_with_code_message_details(index: int) -> None:
    with pytest.raises(SlicefabError) as info:
        _failing_calls()[index]()
    wire = json.loads(json.dumps(info.value.to_dict()))
    assert wire["code"] in {"config", "invalid", "insufficient", "conflict"}
    assert wire["message"].startswith("cores")
    assert wire["details"]


# ---------------------------------------------------------------- model-based

CLUSTERS = (4, 8, 2, 8, 3)
TOTAL = sum(CLUSTERS)
CLUSTER_OF = [c for c, size in enumerate(CLUSTERS) for _ in range(size)]


def expected_cores(free: set[int], count: int, mode: str | int) -> list[int] | None:
    """The documented policy, restated over the model's free set.

    ``mode`` is "pack", "same" or a cluster index.
    """
    by_cluster = [sorted(c for c in free if CLUSTER_OF[c] == k) for k in range(len(CLUSTERS))]
    if isinstance(mode, int):
        return by_cluster[mode][:count] if len(by_cluster[mode]) >= count else None
    fits = [(len(ids), k) for k, ids in enumerate(by_cluster) if len(ids) >= count]
    if fits:
        return by_cluster[min(fits)[1]][:count]
    if mode == "same" or len(free) < count:
        return None
    taken: list[int] = []
    for k in sorted(range(len(CLUSTERS)), key=lambda k: (-len(by_cluster[k]), k)):
        taken += by_cluster[k][: count - len(taken)]
    return sorted(taken)


class CoreMachine(RuleBasedStateMachine):
    """The allocator against a set of free core ids."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = CoreAllocator(CLUSTERS)
        self.free: set[int] = set(range(TOTAL))

    @rule(
        count=st.integers(1, TOTAL),
        mode=st.sampled_from(["pack", "same"]) | st.integers(0, len(CLUSTERS) - 1),
    )
    def allocate(self, count: int, mode: str | int) -> None:
        before = state(self.alloc)
        expected = expected_cores(self.free, count, mode)
        if isinstance(mode, int):
            limit, cluster, same = CLUSTERS[mode], mode, False
        else:
            limit = max(CLUSTERS) if mode == "same" else TOTAL
            cluster, same = None, mode == "same"
        try:
            got = self.alloc.allocate(count, same_cluster=same, cluster=cluster)
        except RequestError:
            assert count > limit
        except InsufficientResources as err:
            assert count <= limit and expected is None
            assert (mode == "same") == ("same-cluster" in err.message)
        else:
            assert got == expected
            assert len(set(got)) == count  # no core twice
            assert set(got) <= self.free  # nothing held handed out
            if mode != "pack":
                assert len({CLUSTER_OF[c] for c in got}) == 1
            self.free -= set(got)
            return
        assert state(self.alloc) == before

    @rule(ids=st.lists(st.integers(0, TOTAL - 1), max_size=5, unique=True))
    def allocate_ids(self, ids: list[int]) -> None:
        before = state(self.alloc)
        try:
            self.alloc.allocate_ids(ids)
        except ResourceConflict as err:
            assert err.details["cores"] == sorted(set(ids) - self.free)
            assert err.details["cores"]
            assert state(self.alloc) == before
        else:
            assert set(ids) <= self.free
            self.free -= set(ids)

    @precondition(lambda self: len(self.free) < TOTAL)
    @rule(data=st.data())
    def release_held(self, data: st.DataObject) -> None:
        held = sorted(set(range(TOTAL)) - self.free)
        ids = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=6, unique=True))
        self.alloc.release(ids)
        self.free |= set(ids)

    @rule(ids=st.lists(st.integers(0, TOTAL - 1), min_size=1, max_size=5, unique=True))
    def release_any(self, ids: list[int]) -> None:
        before = state(self.alloc)
        try:
            self.alloc.release(ids)
        except ResourceConflict as err:
            assert err.details["cores"] == sorted(set(ids) & self.free)
            assert state(self.alloc) == before
        else:
            assert not set(ids) & self.free
            self.free |= set(ids)

    @rule(count=st.integers(1, TOTAL), same=st.booleans())
    def allocate_then_release_restores_exactly(self, count: int, same: bool) -> None:
        before = state(self.alloc)
        try:
            got = self.alloc.allocate(count, same_cluster=same)
        except (InsufficientResources, RequestError):
            return
        self.alloc.release(got)
        assert state(self.alloc) == before

    @invariant()
    def cores_match_model(self) -> None:
        assert self.alloc.free_ids() == sorted(self.free)
        assert self.alloc.free_count() == len(self.free)
        for k in range(len(CLUSTERS)):
            assert self.alloc.free_count(k) == sum(1 for c in self.free if CLUSTER_OF[c] == k)
        for core in range(TOTAL):
            assert self.alloc.is_free(core) == (core in self.free)


CoreMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestCoreMachine = CoreMachine.TestCase
