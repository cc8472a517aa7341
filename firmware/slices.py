"""Hardware slices: what a VM asks for (:class:`SliceSpec`), what it got (:class:`Allocation`),
and where it is in its life (:class:`SliceState`).

A slice spec has the same shape in a slice file (TOML), in a ``--json`` request and on the
admin socket::

    owner = "vm-a"              # the VM that owns the slice
    name = "web"                # optional label
    key = "auto"                # protection key: "auto" (the VM's key, else a free one) or 0..15
    ports = 1                   # crossbar ports the slice's traffic enters by (0..64)

    [cores]                     # count, or explicit ids; optional same-cluster affinity
    count = 4
    same_cluster = true

    [memory]                    # a multiple of the device granule; contiguous or not
    size = "4 GiB"
    contiguous = false

    [lanes]                     # x1/x2/x4/x8/x16, naturally aligned; optionally pinned
    width = 4
    endpoint = "nvme0"          # or: first = 8 (explicit lanes; must be naturally aligned)

    [qos]                       # per crossbar port of the slice
    priority = 5                # 0 (lowest) .. 7
    guaranteed = "10 Gbit/s"    # admitted only while the port's guaranteed sum <= capacity
    maximum = "25 Gbit/s"       # token-bucket limit; 0 / absent = the port's capacity

Protection keys and crossbar ports are the VM's isolation domain: slices of one VM share
them, two VMs never do (DESIGN.md, "Invariants").
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from firmware.errors import LifecycleError, RequestError
from firmware.resources.lanes import LaneGroup
from firmware.resources.memory import Extent
from firmware.schema import Table, load_toml
from firmware.units import format_bandwidth, format_size, parse_bandwidth, parse_size

OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch
MAX_CORES_PER_SLICE = 4096
MAX_PRIORITY = 7
MAX_PORTS_PER_SLICE = 64


class SliceState(enum.Enum):
    """The slice lifecycle (DESIGN.md, "Resources and slices")."""

    REQUESTED = "requested"  # validated, nothing held yet
    RESERVED = "reserved"  # units held in the allocator, durable in the ledger
    PROGRAMMED = "programmed"  # the fabric's register image includes the slice
    ACTIVE = "active"  # acknowledged to the VM; may be resized live
    RELEASING = "releasing"  # being taken out of the fabric
    FREED = "freed"  # every unit returned; terminal
    ERROR = "error"  # programming failed; only releasing is allowed


_TRANSITIONS: dict[SliceState, frozenset[SliceState]] = {
    SliceState.REQUESTED: frozenset({SliceState.RESERVED, SliceState.ERROR}),
    SliceState.RESERVED: frozenset({SliceState.PROGRAMMED, SliceState.RELEASING, SliceState.ERROR}),
    SliceState.PROGRAMMED: frozenset({SliceState.ACTIVE, SliceState.RELEASING, SliceState.ERROR}),
    SliceState.ACTIVE: frozenset({SliceState.RELEASING, SliceState.ERROR}),
    SliceState.RELEASING: frozenset({SliceState.FREED, SliceState.ERROR}),
    SliceState.ERROR: frozenset({SliceState.RELEASING}),
    SliceState.FREED: frozenset(),
}

#: states in which a slice holds units and belongs in the fabric's register image
LIVE_STATES = frozenset({SliceState.RESERVED, SliceState.PROGRAMMED, SliceState.ACTIVE})


# The same table keyed by the states' values: looking a member up hashes it through the
# Python-level Enum.__hash__, which was a tenth of a release; a str hash is cached.
_ALLOWED: dict[str, frozenset[str]] = {
    state.value: frozenset(n.value for n in allowed) for state, allowed in _TRANSITIONS.items()
}


def check_transition(current: SliceState, new: SliceState) -> None:
    """Raise :class:`LifecycleError` unless ``current -> new`` is a legal transition."""
    if new._value_ not in _ALLOWED[current._value_]:
        allowed = ", ".join(sorted(s.value for s in _TRANSITIONS[current])) or "none (terminal)"
        raise LifecycleError(
            f"illegal slice transition {current.value} -> {new.value} (allowed: {allowed})",
            state=current.value,
            requested=new.value,
        )


@dataclass(frozen=True)
class CoreRequest:
    count: int
    ids: tuple[int, ...] | None = None
    same_cluster: bool = False


@dataclass(frozen=True)
class MemoryRequest:
    size: int  # bytes
    contiguous: bool = False


@dataclass(frozen=True)
class LaneRequest:
    width: int
    endpoint: str | None = None
    first: int | None = None  # an explicit first lane (global index), naturally aligned


@dataclass(frozen=True)
class QoS:
    priority: int = 0
    guaranteed_mbps: int = 0
    max_mbps: int = 0  # 0: limited only by the port's capacity

    def limit_mbps(self, capacity_mbps: int) -> int:
        """The rate this slice may use on a port of ``capacity_mbps``: its maximum, or the
        port's capacity when it sets none (what the token bucket admits for it)."""
        return self.max_mbps or capacity_mbps


@dataclass(frozen=True)
class SliceSpec:
    """What a VM asks for. Device-independent checks are done here; the allocator checks
    the rest against the device (core ids exist, widths fit, bandwidth <= capacity)."""

    owner: str
    name: str = ""
    cores: CoreRequest | None = None
    memory: MemoryRequest | None = None
    lanes: LaneRequest | None = None
    key: int | None = None  # None: "auto"
    ports: int = 1
    qos: QoS = field(default_factory=QoS)

    @classmethod
    def from_dict(cls, data: object, *, request: bool = True) -> SliceSpec:
        """Parse and validate a spec. Raises :class:`RequestError` (``request=True``) or
        :class:`ConfigError` (a slice file) naming the field, the limit and what was expected."""
        if type(data) is dict and cls is SliceSpec:
            spec = _plain_spec(data)  # the usual request, accepted in a few microseconds
            if spec is not None:
                return spec
        return cls.parse(data, request=request)

    @classmethod
    def parse(cls, data: object, *, request: bool = True) -> SliceSpec:
        """:meth:`from_dict` field by field, for any input: what decides and words every
        error, and the reference :func:`_plain_spec` is held to (tests/test_slices.py)."""
        t = Table(data, "", request=request)
        owner = t.text("owner")
        if not OWNER_RE.fullmatch(owner):
            raise t.error(
                "owner",
                f"{owner!r} is not a VM id (1-64 of A-Z a-z 0-9 _ . -, not starting with a symbol)",
            )
        name = t.raw("name", "")
        if not isinstance(name, str) or len(name) > 64:
            raise t.error("name", "expected a string of at most 64 characters")

        cores = None
        if t.has("cores"):
            c = t.table("cores")
            ids: tuple[int, ...] | None = None
            if c.has("ids"):
                raw_ids = c.raw("ids")
                if (
                    not isinstance(raw_ids, list)
                    or not raw_ids
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw_ids)
                ):
                    raise c.error("ids", "expected a non-empty list of core ids", got=raw_ids)
                if len(set(raw_ids)) != len(raw_ids):
                    raise c.error("ids", "core ids must not repeat", got=raw_ids)
                ids = tuple(sorted(raw_ids))
                count = c.integer("count", lo=len(ids), hi=len(ids), default=len(ids))
            else:
                count = c.integer("count", lo=1, hi=MAX_CORES_PER_SLICE)
            cores = CoreRequest(count, ids, c.flag("same_cluster", False))
            c.done()

        memory = None
        if t.has("memory"):
            m = t.table("memory")
            size = m.quantity("size", parse_size)
            if size <= 0:
                raise m.error("size", f"must be > 0, got {size}", got=size)
            memory = MemoryRequest(size, m.flag("contiguous", False))
            m.done()

        lanes = None
        if t.has("lanes"):
            ln = t.table("lanes")
            width = ln.integer("width", lo=1, hi=16)
            if width not in (1, 2, 4, 8, 16):
                raise ln.error(
                    "width", f"x{width} is not a PCIe link width", expected=[1, 2, 4, 8, 16]
                )
            endpoint = ln.text("endpoint") if ln.has("endpoint") else None
            first = ln.integer("first", lo=0, hi=255) if ln.has("first") else None
            if endpoint is not None and first is not None:
                raise ln.error("first", "give either lanes.endpoint or lanes.first, not both")
            lanes = LaneRequest(width, endpoint, first)
            ln.done()

        raw_key = t.raw("key", "auto")
        key = None if raw_key == "auto" or raw_key is None else t.integer("key", lo=0, hi=15)

        ports = t.integer("ports", lo=0, hi=MAX_PORTS_PER_SLICE, default=1)
        qos = QoS()
        if t.has("qos"):
            q = t.table("qos")
            priority = q.integer("priority", lo=0, hi=MAX_PRIORITY, default=0)
            guaranteed = q.quantity("guaranteed", parse_bandwidth, default=0)
            maximum = q.quantity("maximum", parse_bandwidth, default=0)
            for bw_field, value in (("guaranteed", guaranteed), ("maximum", maximum)):
                if value < 0:
                    raise q.error(bw_field, f"bandwidth must be >= 0, got {value}", got=value)
            if maximum and guaranteed > maximum:
                raise q.error(
                    "guaranteed",
                    f"{format_bandwidth(guaranteed)} exceeds qos.maximum "
                    f"{format_bandwidth(maximum)}",
                )
            if (guaranteed or maximum) and ports == 0:
                raise q.error(
                    "guaranteed", "bandwidth needs at least one crossbar port (ports >= 1)"
                )
            qos = QoS(priority, guaranteed, maximum)
            q.done()
        t.done()
        if cores is None and memory is None and lanes is None:
            raise (t.error("", "a slice must ask for at least one of cores, memory, lanes"))
        return cls(owner, name, cores, memory, lanes, key, ports, qos)

    @classmethod
    def from_file(cls, path: Path | str) -> SliceSpec:
        """Read a slice file (TOML). Raises :class:`ConfigError`."""
        return cls.from_dict(load_toml(path, "slice"), request=False)

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON form (bytes and Mbit/s as integers); ``from_dict`` reads it back."""
        d: dict[str, Any] = {"owner": self.owner, "ports": self.ports}
        if self.name:
            d["name"] = self.name
        if self.cores:
            d["cores"] = {"count": self.cores.count, "same_cluster": self.cores.same_cluster}
            if self.cores.ids is not None:
                d["cores"]["ids"] = list(self.cores.ids)
        if self.memory:
            d["memory"] = {"size": self.memory.size, "contiguous": self.memory.contiguous}
        if self.lanes:
            d["lanes"] = {"width": self.lanes.width}
            if self.lanes.endpoint:
                d["lanes"]["endpoint"] = self.lanes.endpoint
            if self.lanes.first is not None:
                d["lanes"]["first"] = self.lanes.first
        d["key"] = "auto" if self.key is None else self.key
        d["qos"] = {
            "priority": self.qos.priority,
            "guaranteed": self.qos.guaranteed_mbps,
            "maximum": self.qos.max_mbps,
        }
        return d


_SPEC_KEYS = frozenset({"owner", "name", "cores", "memory", "lanes", "key", "ports", "qos"})
_CORE_KEYS = frozenset({"count", "same_cluster"})
_MEMORY_KEYS = frozenset({"size", "contiguous"})
_LANE_KEYS = frozenset({"width", "endpoint", "first"})
_QOS_KEYS = frozenset({"priority", "guaranteed", "maximum"})
_WIDTHS = frozenset({1, 2, 4, 8, 16})
_NO_QOS = QoS()


def _plain_spec(d: dict[str, Any]) -> SliceSpec | None:
    """The spec of a request that :meth:`SliceSpec.parse` accepts, in plain form (every
    number an ``int`` in the base unit, no core ids: what the API and ``to_dict`` give),
    checked by the same rules with a few type tests instead of a :class:`Table` per
    field; None for anything else, which ``parse`` then accepts or refuses, naming the
    field. It returns a spec only where ``parse`` returns the equal spec (a differential
    test holds the two together): a profile of allocate+free had ``parse`` at 7 % of the
    firmware's time per pair."""
    if not d.keys() <= _SPEC_KEYS:
        return None
    owner = d.get("owner")
    if type(owner) is not str or not OWNER_RE.fullmatch(owner):
        return None
    name = d.get("name", "")
    ports = d.get("ports", 1)
    if (
        type(name) is not str
        or len(name) > 64
        or type(ports) is not int
        or not 0 <= ports <= MAX_PORTS_PER_SLICE
    ):
        return None
    cores = memory = lanes = None
    if "cores" in d:
        c = d["cores"]
        if type(c) is not dict or not c.keys() <= _CORE_KEYS:
            return None  # core ids, or not plain: parse decides
        count = c.get("count")
        same = c.get("same_cluster", False)
        if (
            type(count) is not int
            or not 1 <= count <= MAX_CORES_PER_SLICE
            or type(same) is not bool
        ):
            return None
        cores = CoreRequest(count, None, same)
    if "memory" in d:
        m = d["memory"]
        if type(m) is not dict or not m.keys() <= _MEMORY_KEYS:
            return None
        size = m.get("size")
        contiguous = m.get("contiguous", False)
        if type(size) is not int or size <= 0 or type(contiguous) is not bool:
            return None
        memory = MemoryRequest(size, contiguous)
    if "lanes" in d:
        ln = d["lanes"]
        if type(ln) is not dict or not ln.keys() <= _LANE_KEYS:
            return None
        width = ln.get("width")
        endpoint = ln.get("endpoint")
        first = ln.get("first")
        if (
            type(width) is not int
            or width not in _WIDTHS
            or ("endpoint" in ln and (type(endpoint) is not str or not endpoint.strip()))
            or ("first" in ln and (type(first) is not int or not 0 <= first <= 255))
            or (endpoint is not None and first is not None)
        ):
            return None
        lanes = LaneRequest(width, endpoint, first)
    if cores is None and memory is None and lanes is None:
        return None
    key = d.get("key")
    if key is not None and not (type(key) is str and key == "auto"):
        if type(key) is not int or not 0 <= key <= 15:
            return None
    else:
        key = None
    qos = _NO_QOS
    if "qos" in d:
        q = d["qos"]
        if type(q) is not dict or not q.keys() <= _QOS_KEYS:
            return None
        priority = q.get("priority", 0)
        guaranteed = q.get("guaranteed", 0)
        maximum = q.get("maximum", 0)
        if (
            type(priority) is not int
            or not 0 <= priority <= MAX_PRIORITY
            or type(guaranteed) is not int
            or type(maximum) is not int
            or guaranteed < 0
            or maximum < 0
            or (maximum and guaranteed > maximum)
            or ((guaranteed or maximum) and ports == 0)
        ):
            return None
        if priority or guaranteed or maximum:  # else the default, shared (QoS is frozen)
            qos = QoS(priority, guaranteed, maximum)
    return SliceSpec(owner, name, cores, memory, lanes, key, ports, qos)


@dataclass(frozen=True)
class ResizeSpec:
    """A live resize: absolute targets for what may change while the slice stays active."""

    memory: int | None = None  # bytes
    cores: int | None = None
    qos: QoS | None = None

    @classmethod
    def from_dict(cls, data: object) -> ResizeSpec:
        t = Table(data, "", request=True)
        memory = t.quantity("memory", parse_size) if t.has("memory") else None
        if memory is not None and memory <= 0:
            raise t.error(
                "memory", f"must be > 0 (free the slice to release everything), got {memory}"
            )
        cores = t.integer("cores", lo=1, hi=MAX_CORES_PER_SLICE) if t.has("cores") else None
        qos = None
        if t.has("qos"):
            q = t.table("qos")
            # keys absent here keep their current value: marked by -1, resolved by the allocator
            priority = q.integer("priority", lo=0, hi=MAX_PRIORITY) if q.has("priority") else -1
            bw = {
                k: q.quantity(k, parse_bandwidth) if q.has(k) else -1
                for k in ("guaranteed", "maximum")
            }
            for k in bw:
                if q.has(k) and bw[k] < 0:
                    raise q.error(k, f"bandwidth must be >= 0, got {bw[k]}")
            qos = QoS(priority, bw["guaranteed"], bw["maximum"])
            q.done()
        for key in ("lanes", "key", "ports", "owner"):
            if t.has(key):
                raise t.error(key, "cannot change on a live slice; free it and allocate a new one")
        t.done()
        if memory is None and cores is None and qos is None:
            raise RequestError("resize", "nothing to change: give memory, cores or qos")
        return cls(memory, cores, qos)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.memory is not None:
            d["memory"] = self.memory
        if self.cores is not None:
            d["cores"] = self.cores
        if self.qos is not None:
            d["qos"] = {
                k: v
                for k, v in (
                    ("priority", self.qos.priority),
                    ("guaranteed", self.qos.guaranteed_mbps),
                    ("maximum", self.qos.max_mbps),
                )
                if v >= 0
            }
        return d


@dataclass(frozen=True)
class Allocation:
    """The units a slice holds."""

    cores: tuple[int, ...] = ()
    extents: tuple[Extent, ...] = ()
    lanes: LaneGroup | None = None
    key: int = 0
    ports: tuple[int, ...] = ()

    def __init__(
        self,
        cores: tuple[int, ...] = (),
        extents: tuple[Extent, ...] = (),
        lanes: LaneGroup | None = None,
        key: int = 0,
        ports: tuple[int, ...] = (),
    ) -> None:
        # As Extent.__init__: the instance dict instead of one object.__setattr__ per field
        # (an allocation is built per slice, on both paths).
        d = self.__dict__
        d["cores"] = cores
        d["extents"] = extents
        d["lanes"] = lanes
        d["key"] = key
        d["ports"] = ports

    @property
    def granules(self) -> int:
        return sum(e.length for e in self.extents)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cores": list(self.cores),
            "extents": [[e.start, e.length] for e in self.extents],
            "lanes": None
            if self.lanes is None
            else {"port": self.lanes.port, "first": self.lanes.first, "width": self.lanes.width},
            "key": self.key,
            "ports": list(self.ports),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Allocation:
        lanes = d.get("lanes")
        return cls(
            cores=tuple(d["cores"]),
            extents=tuple(Extent(s, n) for s, n in d["extents"]),
            lanes=None
            if lanes is None
            else LaneGroup(lanes["port"], lanes["first"], lanes["width"]),
            key=d["key"],
            ports=tuple(d["ports"]),
        )


@dataclass
class Slice:
    """A slice: its id, what it asked for, what it holds, and its lifecycle state."""

    id: int
    spec: SliceSpec
    alloc: Allocation
    state: SliceState = SliceState.REQUESTED

    @property
    def owner(self) -> str:
        return self.spec.owner

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def transition(self, new: SliceState) -> None:
        """Move to ``new``; raises :class:`LifecycleError` if the move is illegal."""
        check_transition(self.state, new)
        self.state = new

    def with_spec(self, spec: SliceSpec, alloc: Allocation) -> Slice:
        return replace(self, spec=spec, alloc=alloc)

    def to_dict(self, granule_bytes: int) -> dict[str, Any]:
        """JSON view for clients: the spec, the allocation and derived sizes."""
        return {
            "id": self.id,
            "owner": self.owner,
            "name": self.spec.name,
            "state": self.state._value_,  # .value is a Python-level property: slower
            "spec": self.spec.to_dict(),
            "alloc": self.alloc.to_dict(),
            "memory": format_size(self.alloc.granules * granule_bytes),
        }
