"""LaneAllocator: bifurcation rules, the buddy-like policy, every error, and a model run."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection

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
from firmware.resources.lanes import LINK_WIDTHS, LaneAllocator, LaneGroup


def state(alloc: LaneAllocator) -> tuple[list[LaneGroup], list[int], int]:
    per_port = [alloc.free_lanes(p) for p in range(len(alloc.port_lanes))]
    return alloc.held_groups(), per_port, alloc.free_lanes()


# ---------------------------------------------------------------- layout


def test_lane_group_lanes() -> None:
    assert LaneGroup(1, 12, 4).lanes == range(12, 16)


def test_global_lane_numbering_follows_port_order() -> None:
    alloc = LaneAllocator([8, 4, 16])
    assert alloc.total == 28
    assert alloc.port_range(0) == range(0, 8)
    assert alloc.port_range(1) == range(8, 12)
    assert alloc.port_range(2) == range(12, 28)
    assert alloc.free_lanes() == 28
    assert [alloc.free_lanes(p) for p in range(3)] == [8, 4, 16]


@pytest.mark.parametrize("ports", [[], [3], [8, 32], [0], [True], [8, 6]])
def test_constructor_rejects_bad_port_widths(ports: list[int]) -> None:
    with pytest.raises(ConfigError) as info:
        LaneAllocator(ports)
    assert info.value.details["field"] == "lanes.ports"


# ---------------------------------------------------------------- validate


def test_validate_accepts_naturally_aligned_groups() -> None:
    alloc = LaneAllocator([16, 8])
    for width in LINK_WIDTHS:
        for offset in range(0, 16, width):
            alloc.validate(LaneGroup(0, offset, width))
    alloc.validate(LaneGroup(1, 16, 8))
    alloc.validate(LaneGroup(1, 22, 2))


@pytest.mark.parametrize("width", [0, 3, 32, -4, True])
def test_validate_rejects_widths_that_are_not_link_widths(width: int) -> None:
    with pytest.raises(RequestError) as info:
        LaneAllocator([16]).validate(LaneGroup(0, 0, width))
    assert info.value.field == "lanes.width"
    assert "x1, x2, x4, x8, x16" in info.value.message


def test_validate_rejects_width_wider_than_port() -> None:
    with pytest.raises(RequestError) as info:
        LaneAllocator([8, 4]).validate(LaneGroup(1, 8, 8))
    assert info.value.field == "lanes.width"
    assert info.value.details["limit"] == 4


def test_validate_rejects_misaligned_group_and_says_which_offsets_are_aligned() -> None:
    alloc = LaneAllocator([4, 16])
    with pytest.raises(RequestError) as info:
        alloc.validate(LaneGroup(1, 4 + 4, 8))  # offset 4 in port 1
    err = info.value
    assert err.field == "lanes.first"
    assert "multiple of 8" in err.message
    assert "offset 0 or 8" in err.message
    assert err.details["offset"] == 4
    assert err.details["expected"] == [0, 8]


def test_alignment_is_relative_to_the_port_not_the_device() -> None:
    alloc = LaneAllocator([2, 8])  # port 1 starts at global lane 2
    alloc.validate(LaneGroup(1, 2, 8))  # global 2 is offset 0 of port 1
    with pytest.raises(RequestError):
        alloc.validate(LaneGroup(1, 4, 4))  # global 4 is offset 2 of port 1


@pytest.mark.parametrize(
    ("group", "field"),
    [
        (LaneGroup(2, 0, 1), "lanes.port"),
        (LaneGroup(-1, 0, 1), "lanes.port"),
        (LaneGroup(1, 0, 1), "lanes.first"),  # lane 0 is on port 0
        (LaneGroup(0, 4, 8), "lanes.first"),  # runs off port 0 into port 1
        (LaneGroup(0, 6, 4), "lanes.first"),  # crosses the port boundary
    ],
)
def test_validate_rejects_groups_not_on_their_port(group: LaneGroup, field: str) -> None:
    with pytest.raises(RequestError) as info:
        LaneAllocator([8, 8]).validate(group)
    assert info.value.field == field


# ---------------------------------------------------------------- allocate policy


def test_fresh_device_takes_lowest_lane() -> None:
    alloc = LaneAllocator([8, 8])
    assert alloc.allocate(4) == LaneGroup(0, 0, 4)


def test_prefers_the_hole_next_to_a_used_link_over_lower_lanes() -> None:
    alloc = LaneAllocator([8])
    alloc.allocate_exact(LaneGroup(0, 5, 1))
    assert alloc.allocate(1) == LaneGroup(0, 4, 1)  # not lane 0: keeps 0..3 whole
    assert alloc.allocate(2) == LaneGroup(0, 6, 2)  # its x4 block 4..7 is partly used
    assert alloc.allocate(4) == LaneGroup(0, 0, 4)


def test_buddy_rule_outranks_the_fuller_port() -> None:
    alloc = LaneAllocator([8, 8])
    alloc.allocate_exact(LaneGroup(0, 0, 4))
    alloc.allocate_exact(LaneGroup(0, 4, 2))  # port 0: 2 free (6, 7), a whole x2 block
    alloc.allocate_exact(LaneGroup(1, 9, 1))  # port 1: 7 free, lane 8's buddy is used
    assert alloc.allocate(1) == LaneGroup(1, 8, 1)


def test_then_the_port_with_fewest_free_lanes() -> None:
    alloc = LaneAllocator([8, 8, 8])
    alloc.allocate_exact(LaneGroup(1, 8, 4))  # port 1: 4 free
    alloc.allocate_exact(LaneGroup(2, 16, 2))  # port 2: 6 free
    # x4 at lane 12 and at lane 20 both sit in a partly used x8 block; port 1 is fuller
    assert alloc.allocate(4) == LaneGroup(1, 12, 4)


def test_fewest_free_port_must_still_fit() -> None:
    alloc = LaneAllocator([4, 8])
    alloc.allocate_exact(LaneGroup(0, 1, 1))  # port 0: 3 free but no aligned x4
    assert alloc.allocate(4) == LaneGroup(1, 4, 4)


def test_whole_port_link_has_no_enclosing_block() -> None:
    alloc = LaneAllocator([4, 8])
    assert alloc.allocate(8) == LaneGroup(1, 4, 8)
    assert alloc.allocate(4) == LaneGroup(0, 0, 4)


def test_port_restricts_the_search() -> None:
    alloc = LaneAllocator([8, 8])
    assert alloc.allocate(2, port=1) == LaneGroup(1, 8, 2)
    assert alloc.free_lanes(0) == 8
    assert alloc.free_lanes(1) == 6


def test_exclude_keeps_endpoint_lanes_for_pinned_requests() -> None:
    alloc = LaneAllocator([8])
    assert alloc.allocate(4, exclude=range(0, 4)) == LaneGroup(0, 4, 4)
    alloc.allocate_exact(LaneGroup(0, 0, 4))  # the pinned request may take them


def test_exclude_applies_to_every_lane_of_the_group() -> None:
    alloc = LaneAllocator([8, 8])
    assert alloc.allocate(8, exclude={7}) == LaneGroup(1, 8, 8)


def test_no_aligned_group_reports_largest_aligned_width_and_changes_nothing() -> None:
    alloc = LaneAllocator([8])
    alloc.allocate_exact(LaneGroup(0, 1, 1))
    alloc.allocate_exact(LaneGroup(0, 5, 1))  # 6 lanes free, none in an aligned x4
    before = state(alloc)
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(4)
    err = info.value
    assert "no free naturally aligned x4 group" in err.message
    assert err.details["resource"] == "lanes"
    assert err.details["requested"] == 4
    assert err.details["available"] == 2
    assert err.details["unit"] == "lanes"
    assert state(alloc) == before


def test_largest_available_honours_port_and_exclude() -> None:
    alloc = LaneAllocator([8, 16])
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(8, port=0, exclude={0, 6})
    assert info.value.details["available"] == 2  # x2 at 2 or 4; x4 blocks hit 0 and 6
    assert "on port 0" in info.value.message
    assert alloc.free_lanes() == 24


def test_exhausted_device_reports_zero_available() -> None:
    alloc = LaneAllocator([2])
    alloc.allocate(2)
    with pytest.raises(InsufficientResources) as info:
        alloc.allocate(1)
    assert info.value.details["available"] == 0


@pytest.mark.parametrize("width", [0, 3, 32, True, 2.0])
def test_allocate_rejects_bad_width(width: int) -> None:
    alloc = LaneAllocator([16])
    with pytest.raises(RequestError) as info:
        alloc.allocate(width)
    assert info.value.field == "lanes.width"
    assert alloc.free_lanes() == 16


def test_allocate_rejects_width_wider_than_every_port_or_the_given_port() -> None:
    alloc = LaneAllocator([8, 4])
    with pytest.raises(RequestError) as info:
        alloc.allocate(16)
    assert info.value.field == "lanes.width"
    with pytest.raises(RequestError) as info:
        alloc.allocate(8, port=1)
    assert info.value.field == "lanes.width"
    assert info.value.details["limit"] == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"port": 2}, "lanes.port"),
        ({"port": -1}, "lanes.port"),
        ({"exclude": {12}}, "lanes.exclude"),
    ],
)
def test_allocate_rejects_bad_port_or_exclude(kwargs: dict[str, object], field: str) -> None:
    alloc = LaneAllocator([8, 4])
    with pytest.raises(RequestError) as info:
        alloc.allocate(1, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert alloc.free_lanes() == 12


# ---------------------------------------------------------------- exact / release


def test_allocate_exact_conflict_names_the_held_lanes() -> None:
    alloc = LaneAllocator([16])
    alloc.allocate_exact(LaneGroup(0, 4, 2))
    before = state(alloc)
    with pytest.raises(ResourceConflict) as info:
        alloc.allocate_exact(LaneGroup(0, 0, 8))
    assert info.value.details["lanes"] == [4, 5]
    assert info.value.details["held_by"] == [{"port": 0, "first": 4, "width": 2}]
    assert "4..5" in info.value.message
    assert state(alloc) == before


def test_allocate_exact_rejects_misaligned_without_change() -> None:
    alloc = LaneAllocator([16])
    with pytest.raises(RequestError):
        alloc.allocate_exact(LaneGroup(0, 2, 4))
    assert alloc.free_lanes() == 16


def test_release_restores_the_lanes() -> None:
    alloc = LaneAllocator([8, 8])
    group = alloc.allocate(8)
    alloc.release(group)
    assert state(alloc) == ([], [8, 8], 16)
    assert alloc.is_free(group)


def test_double_free_is_a_conflict() -> None:
    alloc = LaneAllocator([8])
    group = alloc.allocate(4)
    alloc.release(group)
    with pytest.raises(ResourceConflict) as info:
        alloc.release(group)
    assert "double free" in info.value.message
    assert info.value.details["lanes"] == [0, 1, 2, 3]
    assert alloc.free_lanes() == 8


def test_release_must_name_a_held_group_whole() -> None:
    alloc = LaneAllocator([8])
    held = alloc.allocate(8)
    before = state(alloc)
    with pytest.raises(ResourceConflict) as info:
        alloc.release(LaneGroup(0, 0, 4))  # half of the x8 link
    assert info.value.details["held_by"] == [held.to_dict()]
    assert state(alloc) == before


def test_release_partly_free_group_names_the_free_lanes() -> None:
    alloc = LaneAllocator([8])
    alloc.allocate_exact(LaneGroup(0, 0, 2))
    before = state(alloc)
    with pytest.raises(ResourceConflict) as info:
        alloc.release(LaneGroup(0, 0, 4))
    assert info.value.details["lanes"] == [2, 3]
    assert state(alloc) == before


def test_is_free_and_free_lanes_track_groups() -> None:
    alloc = LaneAllocator([8, 4])
    alloc.allocate_exact(LaneGroup(1, 10, 2))
    assert not alloc.is_free(LaneGroup(1, 8, 4))
    assert alloc.is_free(LaneGroup(1, 8, 2))
    assert alloc.free_lanes(1) == 2
    with pytest.raises(RequestError):
        alloc.free_lanes(2)
    with pytest.raises(RequestError):
        alloc.is_free(LaneGroup(1, 9, 2))


def _failing_calls() -> list[Callable[[], object]]:
    alloc = LaneAllocator([8, 4])
    alloc.allocate_exact(LaneGroup(0, 1, 1))
    alloc.allocate_exact(LaneGroup(1, 8, 4))
    return [
        lambda: LaneAllocator([3]),
        lambda: alloc.validate(LaneGroup(0, 2, 4)),
        lambda: alloc.allocate(3),
        lambda: alloc.allocate(8),
        lambda: alloc.allocate(1, port=1, exclude={9}),
        lambda: alloc.allocate_exact(LaneGroup(0, 0, 2)),
        lambda: alloc.release(LaneGroup(0, 0, 1)),
        lambda: alloc.release(LaneGroup(1, 8, 2)),
    ]


@pytest.mark.parametrize("index", range(len(_failing_calls())))
def test_errors_are_json_able_with_code_message_details(index: int) -> None:
    with pytest.raises(SlicefabError) as info:
        _failing_calls()[index]()
    wire = json.loads(json.dumps(info.value.to_dict()))
    assert wire["code"] in {"config", "invalid", "insufficient", "conflict"}
    assert wire["message"].startswith("lanes")
    assert wire["details"]


# ---------------------------------------------------------------- model-based

PORTS = (8, 4, 16, 1, 2)
BASES = (0, 8, 12, 28, 29)
TOTAL = sum(PORTS)


def expected_group(
    free: set[int], width: int, port: int | None, exclude: Collection[int]
) -> LaneGroup | None:
    """The documented policy, restated by brute force over the model's free set."""
    best: tuple[bool, int, int] | None = None
    chosen = None
    for p in range(len(PORTS)) if port is None else [port]:
        base, size = BASES[p], PORTS[p]
        port_free = sum(1 for lane in range(base, base + size) if lane in free)
        for offset in range(0, size - width + 1, width):
            lanes = range(base + offset, base + offset + width)
            if not all(lane in free and lane not in exclude for lane in lanes):
                continue
            block = 2 * width
            partly = False
            if block <= size:
                start = base + offset - offset % block
                partly = any(lane not in free for lane in range(start, start + block))
            key = (not partly, port_free, base + offset)
            if best is None or key < best:
                best, chosen = key, LaneGroup(p, base + offset, width)
    return chosen


class LaneMachine(RuleBasedStateMachine):
    """The allocator against a set of free lane numbers and the set of held groups."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = LaneAllocator(PORTS)
        self.free: set[int] = set(range(TOTAL))
        self.held: list[LaneGroup] = []

    def take(self, group: LaneGroup) -> None:
        lanes = set(group.lanes)
        assert lanes <= self.free, f"{group} handed out while held"
        self.free -= lanes
        self.held.append(group)

    @rule(
        width=st.sampled_from(LINK_WIDTHS),
        port=st.none() | st.integers(0, len(PORTS) - 1),
        exclude=st.frozensets(st.integers(0, TOTAL - 1), max_size=6),
    )
    def allocate(self, width: int, port: int | None, exclude: frozenset[int]) -> None:
        before = state(self.alloc)
        limit = max(PORTS) if port is None else PORTS[port]
        expected = expected_group(self.free, width, port, exclude)
        try:
            group = self.alloc.allocate(width, port=port, exclude=exclude)
        except RequestError:
            assert width > limit
        except InsufficientResources as err:
            assert width <= limit and expected is None
            assert "no free naturally aligned" in err.message
        else:
            assert group == expected
            assert exclude.isdisjoint(group.lanes)
            self.take(group)
            return
        assert state(self.alloc) == before

    @rule(
        port=st.integers(0, len(PORTS) - 1),
        width=st.sampled_from(LINK_WIDTHS),
        slot=st.integers(0, 15),
    )
    def allocate_exact(self, port: int, width: int, slot: int) -> None:
        if width > PORTS[port]:
            return
        group = LaneGroup(port, BASES[port] + slot % (PORTS[port] // width) * width, width)
        before = state(self.alloc)
        try:
            self.alloc.allocate_exact(group)
        except ResourceConflict as err:
            assert err.details["lanes"] == sorted(set(group.lanes) - self.free)
            assert err.details["lanes"]
            assert state(self.alloc) == before
        else:
            self.take(group)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 99))
    def release_held(self, index: int) -> None:
        group = self.held.pop(index % len(self.held))
        self.alloc.release(group)
        self.free |= set(group.lanes)

    @rule(
        port=st.integers(0, len(PORTS) - 1),
        width=st.sampled_from(LINK_WIDTHS),
        slot=st.integers(0, 15),
    )
    def release_any(self, port: int, width: int, slot: int) -> None:
        if width > PORTS[port]:
            return
        group = LaneGroup(port, BASES[port] + slot % (PORTS[port] // width) * width, width)
        before = state(self.alloc)
        try:
            self.alloc.release(group)
        except ResourceConflict:
            assert group not in self.held
            assert state(self.alloc) == before
        else:
            self.held.remove(group)
            self.free |= set(group.lanes)

    @rule(width=st.sampled_from(LINK_WIDTHS))
    def allocate_then_release_restores_exactly(self, width: int) -> None:
        before = state(self.alloc)
        try:
            group = self.alloc.allocate(width)
        except (InsufficientResources, RequestError):
            return
        self.alloc.release(group)
        assert state(self.alloc) == before

    @invariant()
    def lanes_match_model(self) -> None:
        held_lanes = [lane for group in self.held for lane in group.lanes]
        assert len(held_lanes) == len(set(held_lanes)), "a lane belongs to two groups"
        assert set(held_lanes) == set(range(TOTAL)) - self.free
        assert self.alloc.free_lanes() == len(self.free)
        for p, (base, size) in enumerate(zip(BASES, PORTS, strict=True)):
            assert self.alloc.free_lanes(p) == len(self.free & set(range(base, base + size)))
        assert self.alloc.held_groups() == sorted(self.held, key=lambda g: g.first)
        for group in self.held:
            self.alloc.validate(group)
            assert not self.alloc.is_free(LaneGroup(group.port, group.first, 1))


LaneMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestLaneMachine = LaneMachine.TestCase
