"""PCIe lanes, grouped in ports, allocated as naturally aligned links.

The device's lanes are numbered globally in port order: port ``p``'s lanes start after all
lanes of the ports before it. A port of ``n`` lanes (a power of two, 1..16) bifurcates into
links of width x1/x2/x4/x8/x16; as on real root ports and switches, a link of width ``w``
starts at a lane offset *within its port* that is a multiple of ``w`` (natural alignment).
So a x8 port can carry one x8, or x4+x4, or x4+x2+x1+x1, …, never a x4 at offset 2.

Because every link is naturally aligned, the lanes of a port behave like a buddy system:
an aligned block of ``2w`` lanes is two aligned blocks of ``w``. The allocation policy keeps
large aligned blocks whole (see :meth:`LaneAllocator.allocate`).

The allocator remembers the groups it handed out, so a release must name exactly a group
that is held: releasing half of a x8 link, or a link twice, is refused.

Every mutating method validates its request and checks the current state first, and only
then changes anything: a call that raises leaves the allocator exactly as it was.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeGuard

from firmware.errors import ConfigError, InsufficientResources, RequestError, ResourceConflict

__all__ = ["LINK_WIDTHS", "LaneAllocator", "LaneGroup"]

LINK_WIDTHS: tuple[int, ...] = (1, 2, 4, 8, 16)
"""The PCIe link widths a port may bifurcate into (x32 links are not supported)."""


def _is_int(value: object) -> TypeGuard[int]:
    """True for a real ``int`` (``bool`` is an ``int`` subclass but never a lane)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, order=True)
class LaneGroup:
    """A link of ``width`` lanes on ``port``, starting at global lane ``first``.

    The group is checked against a device by :meth:`LaneAllocator.validate`.
    """

    port: int
    first: int
    width: int

    @property
    def lanes(self) -> range:
        """The global indices of the group's lanes."""
        return range(self.first, self.first + self.width)

    def to_dict(self) -> dict[str, int]:
        """``{"port", "first", "width"}``, as error details and the ledger carry it."""
        return {"port": self.port, "first": self.first, "width": self.width}

    def __str__(self) -> str:
        return f"x{self.width} at lanes {_lane_list(self.lanes)} (port {self.port})"


class LaneAllocator:
    """Allocator of naturally aligned lane groups over ports of ``port_lanes[p]`` lanes.

    Raises:
        ConfigError: if there is no port, or a port's lane count is not a power of two in
            1..16.
    """

    def __init__(self, port_lanes: Sequence[int]) -> None:
        ports = tuple(port_lanes)
        if not ports:
            raise ConfigError(
                "lanes: the device needs at least one port", field="lanes.ports", expected=">= 1"
            )
        for port, lanes in enumerate(ports):
            if not _is_int(lanes) or lanes not in LINK_WIDTHS:
                raise ConfigError(
                    f"lanes: port {port} has {lanes!r} lanes; expected a power of two in 1..16",
                    field="lanes.ports",
                    port=port,
                    value=lanes,
                    expected=list(LINK_WIDTHS),
                )
        self._port_lanes = ports
        bases = [0]
        for lanes in ports:
            bases.append(bases[-1] + lanes)
        self._port_base = tuple(bases[:-1])
        self._total = bases[-1]
        self._held: set[int] = set()
        self._groups: dict[int, LaneGroup] = {}  # first lane -> group handed out
        self._port_free = list(ports)

    # ------------------------------------------------------------------ queries

    @property
    def port_lanes(self) -> tuple[int, ...]:
        """Lanes per port, in port order."""
        return self._port_lanes

    @property
    def total(self) -> int:
        """Number of lanes on the device."""
        return self._total

    def port_range(self, port: int) -> range:
        """The global lane indices of ``port``.

        Raises:
            RequestError: (field ``lanes.port``) if ``port`` does not exist.
        """
        self._check_port(port)
        base = self._port_base[port]
        return range(base, base + self._port_lanes[port])

    def free_lanes(self, port: int | None = None) -> int:
        """Free lanes on ``port``, or on the whole device when ``port`` is None.

        Raises:
            RequestError: (field ``lanes.port``) if ``port`` does not exist.
        """
        if port is None:
            return self._total - len(self._held)
        self._check_port(port)
        return self._port_free[port]

    def is_free(self, group: LaneGroup) -> bool:
        """True if every lane of ``group`` is free.

        Raises:
            RequestError: as :meth:`validate`, if ``group`` is not a valid link here.
        """
        self.validate(group)
        return self._held.isdisjoint(group.lanes)

    def held_groups(self) -> list[LaneGroup]:
        """The groups handed out and not released, sorted by first lane."""
        return [self._groups[first] for first in sorted(self._groups)]

    def validate(self, group: LaneGroup) -> None:
        """Check that ``group`` is a link this device's ports can carry.

        Raises:
            RequestError: (field ``lanes.port``) if the port does not exist;
                (field ``lanes.width``) if the width is not x1/x2/x4/x8/x16 or is wider than
                the port; (field ``lanes.first``) if the group does not lie within its port,
                or is not naturally aligned (offset within the port not a multiple of the
                width) — the message lists the offsets that would be aligned.
        """
        if not isinstance(group, LaneGroup):
            raise RequestError("lanes", f"expected a LaneGroup, got {group!r}", value=repr(group))
        self._check_port(group.port)
        self._check_width(group.width, group.port)
        base, size = self._port_base[group.port], self._port_lanes[group.port]
        if not _is_int(group.first) or not base <= group.first < base + size:
            raise RequestError(
                "lanes.first",
                f"lane {group.first!r} is not on port {group.port} "
                f"(lanes {_lane_list(range(base, base + size))})",
                value=group.first,
                port=group.port,
                expected=f"{base}..{base + size - 1}",
            )
        offset = group.first - base
        if offset % group.width:
            aligned = list(range(0, size, group.width))
            raise RequestError(
                "lanes.first",
                f"a x{group.width} link must start at a lane offset within its port that is a "
                f"multiple of {group.width}; lane {group.first} is offset {offset} of port "
                f"{group.port}; expected offset {_alternatives(aligned)} "
                f"(lane {_alternatives([base + o for o in aligned])})",
                value=group.first,
                offset=offset,
                port=group.port,
                width=group.width,
                expected=aligned,
            )

    # ---------------------------------------------------------------- mutations

    def allocate(
        self, width: int, *, port: int | None = None, exclude: Collection[int] = ()
    ) -> LaneGroup:
        """Take a free, naturally aligned group of ``width`` lanes.

        ``port`` restricts the search to one port; ``exclude`` names global lanes that must
        not be used (lanes wired to endpoints, kept for requests pinned to them).

        Policy (deterministic, buddy-like, against fragmentation). Among every free aligned
        candidate that avoids ``exclude``, take the first by:

        1. its enclosing aligned block of ``2 * width`` lanes is already partly used — the
           request fills a hole next to a used link instead of splitting a whole block
           (a candidate spanning its whole port has no enclosing block and does not qualify);
        2. the port with the fewest free lanes — pack busy ports, keep empty ports whole;
        3. the lowest lane.

        Raises:
            RequestError: (field ``lanes.width``) if ``width`` is not 1/2/4/8/16 or wider
                than ``port`` (or than every port); (field ``lanes.port``) if ``port`` does
                not exist; (field ``lanes.exclude``) for a lane index not on the device.
            InsufficientResources: ``("lanes", width, largest, "lanes")`` where ``largest`` is
                the widest free aligned group the same request could get (0 if none); the
                message says "no free naturally aligned x{width} group".
        """
        if port is not None:
            self._check_port(port)
        self._check_width(width, port)
        excluded = self._check_exclude(exclude)
        ports = range(len(self._port_lanes)) if port is None else (port,)

        best: tuple[bool, int, int] | None = None
        best_group: LaneGroup | None = None
        for p in ports:
            for first in self._aligned_free(p, width, excluded):
                key = (not self._buddy_used(p, first, width), self._port_free[p], first)
                if best is None or key < best:
                    best, best_group = key, LaneGroup(p, first, width)
        if best_group is None:
            largest = max(
                (w for p in ports for w in LINK_WIDTHS if self._aligned_free(p, w, excluded)),
                default=0,
            )
            raise self._no_group(width, port, excluded, largest)
        self._hold(best_group)
        return best_group

    def allocate_exact(self, group: LaneGroup) -> None:
        """Take exactly ``group`` (a link pinned to an endpoint, or ledger recovery).

        Raises:
            RequestError: as :meth:`validate`.
            ResourceConflict: if any of its lanes is held; ``details["lanes"]`` lists them
                and ``details["held_by"]`` the groups holding them.
        """
        self.validate(group)
        taken = sorted(self._held.intersection(group.lanes))
        if taken:
            raise self._conflict(group, taken)
        self._hold(group)

    def _conflict(self, group: LaneGroup, taken: list[int]) -> ResourceConflict:
        """The error for taking ``group`` whose lanes ``taken`` are held."""
        return ResourceConflict(
            f"lanes: cannot take {group}: lane{'s' if len(taken) > 1 else ''} "
            f"{_lane_list(taken)} already held",
            field="lanes",
            group=group.to_dict(),
            lanes=taken,
            held_by=[holder.to_dict() for holder in self._holders(taken)],
            expected="every lane free",
        )

    def release(self, group: LaneGroup) -> None:
        """Give back a group handed out by :meth:`allocate` or :meth:`allocate_exact`.

        Raises:
            RequestError: as :meth:`validate`.
            ResourceConflict: if ``group`` is not held as such: some lanes are free (double
                free; ``details["lanes"]`` lists them), or its lanes are held as part of other
                groups (``details["held_by"]``) — a link is released whole.
        """
        self.validate(group)
        if self._groups.get(group.first) == group:
            self._unhold(group)
            return
        raise self._not_held(group, [lane for lane in group.lanes if lane not in self._held])

    def _not_held(self, group: LaneGroup, free: list[int]) -> ResourceConflict:
        """The error for releasing ``group`` that is not held as such; ``free`` lists its
        free lanes (a double free) or is empty (its lanes belong to other groups)."""
        if free:
            return ResourceConflict(
                f"lanes: double free of {group}: lane{'s' if len(free) > 1 else ''} "
                f"{_lane_list(free)} not held",
                field="lanes",
                group=group.to_dict(),
                lanes=free,
                expected="a held group",
            )
        holders = self._holders(group.lanes)
        return ResourceConflict(
            f"lanes: {group} is not a held group; its lanes are held as "
            + ", ".join(str(holder) for holder in holders),
            field="lanes",
            group=group.to_dict(),
            lanes=list(group.lanes),
            held_by=[holder.to_dict() for holder in holders],
            expected="a held group",
        )

    # ----------------------------------------------------------------- policies

    def _aligned_free(self, port: int, width: int, excluded: Collection[int]) -> list[int]:
        """First lanes of the free aligned ``width``-groups of ``port`` avoiding ``excluded``."""
        base, size = self._port_base[port], self._port_lanes[port]
        return [
            first
            for first in range(base, base + size - width + 1, width)  # none if width > size
            if all(
                lane not in self._held and lane not in excluded
                for lane in range(first, first + width)
            )
        ]

    def _buddy_used(self, port: int, first: int, width: int) -> bool:
        """True if the aligned ``2 * width`` block around ``first`` has a held lane."""
        base, size = self._port_base[port], self._port_lanes[port]
        block = 2 * width
        if block > size:
            return False
        start = base + (first - base) // block * block
        return not self._held.isdisjoint(range(start, start + block))

    def _no_group(
        self, width: int, port: int | None, excluded: Collection[int], largest: int
    ) -> InsufficientResources:
        """The error for "no candidate", with ``largest``, the widest free aligned group
        the same request could get (0 if none)."""
        where = "on any port" if port is None else f"on port {port}"
        if excluded:
            where += f" outside the excluded lanes {_lane_list(sorted(excluded))}"
        largest_text = f"x{largest}" if largest else "none"
        return InsufficientResources(
            "lanes",
            width,
            largest,
            "lanes",
            f"no free naturally aligned x{width} group {where} "
            f"(largest free aligned group: {largest_text})",
            port=port,
            width=width,
            excluded=sorted(excluded),
            largest_free_width=largest,
        )

    # --------------------------------------------------------------- validation

    def _check_port(self, port: object) -> None:
        if not _is_int(port) or not 0 <= port < len(self._port_lanes):
            raise RequestError(
                "lanes.port",
                f"no port {port!r}; the device has ports 0..{len(self._port_lanes) - 1}",
                value=port,
                expected=f"0..{len(self._port_lanes) - 1}",
            )

    def _check_width(self, width: object, port: int | None) -> None:
        """``width`` must be a link width no wider than ``port`` (or the widest port)."""
        if not _is_int(width) or width not in LINK_WIDTHS:
            raise RequestError(
                "lanes.width",
                f"x{width!r} is not a PCIe link width; expected one of x1, x2, x4, x8, x16",
                value=width,
                expected=list(LINK_WIDTHS),
            )
        limit = max(self._port_lanes) if port is None else self._port_lanes[port]
        if width > limit:
            where = "the widest port" if port is None else f"port {port}"
            raise RequestError(
                "lanes.width",
                f"x{width} is wider than {where} ({limit} lanes)",
                value=width,
                port=port,
                limit=limit,
                expected=f"<= {limit}",
            )

    def _check_exclude(self, exclude: Collection[int]) -> frozenset[int]:
        bad = [lane for lane in exclude if not _is_int(lane) or not 0 <= lane < self._total]
        if bad:
            raise RequestError(
                "lanes.exclude",
                f"no lane {bad[0]!r} on the device (lanes 0..{self._total - 1})",
                value=bad,
                expected=f"0..{self._total - 1}",
            )
        return frozenset(exclude)

    # ---------------------------------------------------------------- bookkeeping

    def _hold(self, group: LaneGroup) -> None:
        self._held.update(group.lanes)
        self._groups[group.first] = group
        self._port_free[group.port] -= group.width

    def _unhold(self, group: LaneGroup) -> None:
        self._held.difference_update(group.lanes)
        del self._groups[group.first]
        self._port_free[group.port] += group.width

    def _holders(self, lanes: Iterable[int]) -> list[LaneGroup]:
        """The held groups that contain any of ``lanes``, sorted by first lane."""
        wanted = set(lanes)
        return [
            group
            for first, group in sorted(self._groups.items())
            if not wanted.isdisjoint(group.lanes)
        ]


def _lane_list(lanes: Iterable[int]) -> str:
    """``0..3, 6`` — sorted lanes as inclusive runs."""
    runs: list[list[int]] = []
    for lane in sorted(lanes):
        if runs and runs[-1][1] + 1 == lane:
            runs[-1][1] = lane
        else:
            runs.append([lane, lane])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _alternatives(values: Sequence[int]) -> str:
    """``0, 8 or 16`` for a message."""
    text = [str(value) for value in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]
