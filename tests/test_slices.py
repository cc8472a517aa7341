"""Slice specs (parsing, canonical form, slice files), resize specs, and the slice lifecycle
(firmware/slices.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.errors import ConfigError, LifecycleError, RequestError
from firmware.resources.lanes import LaneGroup
from firmware.resources.memory import Extent
from firmware.slices import (
    LIVE_STATES,
    Allocation,
    CoreRequest,
    LaneRequest,
    MemoryRequest,
    QoS,
    ResizeSpec,
    Slice,
    SliceSpec,
    SliceState,
    _plain_spec,
    check_transition,
)
from firmware.units import GiB, MiB

S = SliceState


def spec_dict(**fields: Any) -> dict[str, Any]:
    """A minimal valid request (owner + 1 core) with ``fields`` overriding it."""
    d: dict[str, Any] = {"owner": "vm-a", "cores": {"count": 1}}
    d.update(fields)
    return d


# ---------------------------------------------------------------- parsing valid specs


def test_full_spec_from_the_module_docstring() -> None:
    spec = SliceSpec.from_dict(
        {
            "owner": "vm-a",
            "name": "web",
            "key": "auto",
            "ports": 1,
            "cores": {"count": 4, "same_cluster": True},
            "memory": {"size": "4 GiB", "contiguous": False},
            "lanes": {"width": 4, "endpoint": "nvme0"},
            "qos": {"priority": 5, "guaranteed": "10 Gbit/s", "maximum": "25 Gbit/s"},
        }
    )
    assert spec == SliceSpec(
        owner="vm-a",
        name="web",
        cores=CoreRequest(4, None, True),
        memory=MemoryRequest(4 * GiB, False),
        lanes=LaneRequest(4, "nvme0"),
        key=None,
        ports=1,
        qos=QoS(5, 10_000, 25_000),
    )


def test_defaults() -> None:
    spec = SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "2 MiB"}})
    assert spec.name == ""
    assert spec.cores is None and spec.lanes is None
    assert spec.memory == MemoryRequest(2 * MiB, contiguous=False)
    assert spec.key is None
    assert spec.ports == 1
    assert spec.qos == QoS(0, 0, 0)


def test_explicit_core_ids_are_sorted_and_set_the_count() -> None:
    spec = SliceSpec.from_dict(spec_dict(cores={"ids": [9, 2, 5]}))
    assert spec.cores == CoreRequest(3, (2, 5, 9), False)
    spec = SliceSpec.from_dict(spec_dict(cores={"ids": [9, 2], "count": 2}))
    assert spec.cores == CoreRequest(2, (2, 9), False)


@pytest.mark.parametrize(("raw", "key"), [("auto", None), (None, None), (0, 0), (15, 15)])
def test_key_auto_or_an_index(raw: object, key: int | None) -> None:
    assert SliceSpec.from_dict(spec_dict(key=raw)).key == key


def test_bandwidth_with_only_a_maximum_is_fine() -> None:
    spec = SliceSpec.from_dict(spec_dict(qos={"maximum": "1 Gbit/s"}))
    assert spec.qos == QoS(0, 0, 1000)


def test_guaranteed_equal_to_maximum_is_fine() -> None:
    spec = SliceSpec.from_dict(spec_dict(qos={"guaranteed": 5000, "maximum": "5 Gbit/s"}))
    assert spec.qos == QoS(0, 5000, 5000)


def test_ports_zero_without_bandwidth_is_fine() -> None:
    spec = SliceSpec.from_dict(spec_dict(ports=0, qos={"priority": 7}))
    assert spec.ports == 0 and spec.qos == QoS(7, 0, 0)


# ---------------------------------------------------------------- round trip (hypothesis)

owners = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)
sizes = st.one_of(
    st.integers(1, 1 << 50),
    st.builds(lambda n, u: f"{n} {u}", st.integers(1, 4096), st.sampled_from(["MiB", "GiB", "kB"])),
)
bandwidths = st.integers(0, 10**7)


@st.composite
def valid_spec_dicts(draw: st.DrawFn) -> dict[str, Any]:
    d: dict[str, Any] = {"owner": draw(owners)}
    if draw(st.booleans()):
        d["name"] = draw(st.text(max_size=64))
    parts = draw(st.sets(st.sampled_from(["cores", "memory", "lanes"]), min_size=1))
    if "cores" in parts:
        if draw(st.booleans()):
            ids = draw(st.lists(st.integers(0, 4095), min_size=1, max_size=16, unique=True))
            cores: dict[str, Any] = {"ids": ids}
            if draw(st.booleans()):
                cores["count"] = len(ids)
        else:
            cores = {"count": draw(st.integers(1, 4096))}
        if draw(st.booleans()):
            cores["same_cluster"] = draw(st.booleans())
        d["cores"] = cores
    if "memory" in parts:
        memory: dict[str, Any] = {"size": draw(sizes)}
        if draw(st.booleans()):
            memory["contiguous"] = draw(st.booleans())
        d["memory"] = memory
    if "lanes" in parts:
        lanes: dict[str, Any] = {"width": draw(st.sampled_from([1, 2, 4, 8, 16]))}
        if draw(st.booleans()):
            lanes["endpoint"] = draw(st.from_regex(r"[a-z]{1,8}[0-9]", fullmatch=True))
        d["lanes"] = lanes
    if draw(st.booleans()):
        d["key"] = draw(st.one_of(st.just("auto"), st.integers(0, 15)))
    ports = draw(st.integers(0, 64))
    if draw(st.booleans()) or ports != 1:
        d["ports"] = ports
    if draw(st.booleans()):
        qos: dict[str, Any] = {}
        if draw(st.booleans()):
            qos["priority"] = draw(st.integers(0, 7))
        if ports:
            maximum = draw(bandwidths)
            guaranteed = draw(st.integers(0, maximum) if maximum else bandwidths)
            if draw(st.booleans()):
                qos["maximum"] = maximum
            if draw(st.booleans()):
                qos["guaranteed"] = guaranteed
        d["qos"] = qos
    return d


@settings(max_examples=300, deadline=None)
@given(valid_spec_dicts())
def test_valid_specs_round_trip_through_to_dict(d: dict[str, Any]) -> None:
    spec = SliceSpec.from_dict(d)
    # the parsed spec says what the request said
    assert spec.owner == d["owner"]
    assert spec.name == d.get("name", "")
    assert (spec.cores is None) == ("cores" not in d)
    if spec.cores is not None:
        ids = d["cores"].get("ids")
        assert spec.cores.ids == (None if ids is None else tuple(sorted(ids)))
        assert spec.cores.count == (len(ids) if ids else d["cores"]["count"])
        assert spec.cores.same_cluster == d["cores"].get("same_cluster", False)
    assert (spec.memory is None) == ("memory" not in d)
    assert (spec.lanes is None) == ("lanes" not in d)
    if spec.lanes is not None:
        assert spec.lanes == LaneRequest(d["lanes"]["width"], d["lanes"].get("endpoint"))
    assert spec.ports == d.get("ports", 1)
    # the canonical form reads back to the same spec, and is stable and JSON-able
    canon = spec.to_dict()
    assert json.loads(json.dumps(canon)) == canon
    again = SliceSpec.from_dict(canon)
    assert again == spec
    assert again.to_dict() == canon
    assert SliceSpec.from_dict(canon, request=False) == spec


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4096), st.sampled_from([("MiB", MiB), ("GiB", GiB), ("kB", 1000)]))
def test_memory_units_are_scaled_to_bytes(n: int, unit: tuple[str, int]) -> None:
    spec = SliceSpec.from_dict({"owner": "vm", "memory": {"size": f"{n} {unit[0]}"}})
    assert spec.memory is not None and spec.memory.size == n * unit[1]


# ---------------------------------------------------------------- invalid requests

# (id, request, field named by the error, fragment of the message or None)
BAD: list[tuple[str, Any, str, str | None]] = [
    # cores.count
    ("cores-negative", spec_dict(cores={"count": -1}), "cores.count", "[1, 4096]"),
    ("cores-zero", spec_dict(cores={"count": 0}), "cores.count", "[1, 4096]"),
    ("cores-huge", spec_dict(cores={"count": 4097}), "cores.count", "[1, 4096]"),
    ("cores-enormous", spec_dict(cores={"count": 10**30}), "cores.count", "[1, 4096]"),
    ("cores-string", spec_dict(cores={"count": "4"}), "cores.count", "integer"),
    ("cores-float", spec_dict(cores={"count": 4.0}), "cores.count", "integer"),
    ("cores-half", spec_dict(cores={"count": 1.5}), "cores.count", "integer"),
    ("cores-bool", spec_dict(cores={"count": True}), "cores.count", "integer"),
    ("cores-null", spec_dict(cores={"count": None}), "cores.count", "integer"),
    ("cores-missing-count", spec_dict(cores={"same_cluster": True}), "cores.count", "missing"),
    ("cores-not-a-table", spec_dict(cores=4), "cores", "expected a table"),
    ("cores-unknown-key", spec_dict(cores={"count": 1, "cluster": 2}), "cores.cluster",
     "unknown key"),
    ("same-cluster-not-bool", spec_dict(cores={"count": 1, "same_cluster": "yes"}),
     "cores.same_cluster", "true or false"),
    # cores.ids
    ("ids-empty", spec_dict(cores={"ids": []}), "cores.ids", "non-empty list"),
    ("ids-not-a-list", spec_dict(cores={"ids": "1,2"}), "cores.ids", "non-empty list"),
    ("ids-strings", spec_dict(cores={"ids": ["1"]}), "cores.ids", "non-empty list"),
    ("ids-bools", spec_dict(cores={"ids": [True]}), "cores.ids", "non-empty list"),
    ("ids-repeat", spec_dict(cores={"ids": [1, 1]}), "cores.ids", "repeat"),
    ("ids-count-mismatch", spec_dict(cores={"ids": [1, 2], "count": 3}), "cores.count",
     "[2, 2]"),
    # memory.size
    ("memory-negative", spec_dict(memory={"size": -1}), "memory.size", "> 0"),
    ("memory-zero", spec_dict(memory={"size": 0}), "memory.size", "> 0"),
    ("memory-zero-unit", spec_dict(memory={"size": "0 GiB"}), "memory.size", "> 0"),
    ("memory-negative-text", spec_dict(memory={"size": "-4 GiB"}), "memory.size", None),
    ("memory-bandwidth-unit", spec_dict(memory={"size": "4 GB/s"}), "memory.size", "GB/s"),
    ("memory-unknown-unit", spec_dict(memory={"size": "4 parsecs"}), "memory.size", None),
    ("memory-words", spec_dict(memory={"size": "lots"}), "memory.size", None),
    ("memory-fraction-of-a-byte", spec_dict(memory={"size": "1.5 B"}), "memory.size",
     "whole number"),
    ("memory-float", spec_dict(memory={"size": 1.5}), "memory.size", "float"),
    ("memory-bool", spec_dict(memory={"size": True}), "memory.size", "boolean"),
    ("memory-list", spec_dict(memory={"size": [4]}), "memory.size", "list"),
    ("memory-missing-size", spec_dict(memory={"contiguous": True}), "memory.size", "missing"),
    ("memory-contiguous-not-bool", spec_dict(memory={"size": "2 MiB", "contiguous": 1}),
     "memory.contiguous", "true or false"),
    # lanes
    ("lanes-x3", spec_dict(lanes={"width": 3}), "lanes.width", "not a PCIe link width"),
    ("lanes-x0", spec_dict(lanes={"width": 0}), "lanes.width", "[1, 16]"),
    ("lanes-x32", spec_dict(lanes={"width": 32}), "lanes.width", "[1, 16]"),
    ("lanes-text", spec_dict(lanes={"width": "x4"}), "lanes.width", "integer"),
    ("lanes-endpoint-empty", spec_dict(lanes={"width": 4, "endpoint": ""}), "lanes.endpoint",
     "non-empty"),
    ("lanes-endpoint-number", spec_dict(lanes={"width": 4, "endpoint": 0}), "lanes.endpoint",
     "non-empty"),
    # unknown resource types and keys
    ("unknown-resource-gpus", spec_dict(gpus=1), "gpus", "unknown key"),
    ("typo-memroy", {"owner": "vm-a", "memroy": {"size": "1 GiB"}}, "memroy", "unknown key"),
    ("qos-unknown-key", spec_dict(qos={"burst": 5}), "qos.burst", "unknown key"),
    # owner
    ("owner-missing", {"cores": {"count": 1}}, "owner", "missing"),
    ("owner-empty", spec_dict(owner=""), "owner", "non-empty"),
    ("owner-blank", spec_dict(owner="   "), "owner", "non-empty"),
    ("owner-symbol-first", spec_dict(owner="-vm"), "owner", "VM id"),
    ("owner-space", spec_dict(owner="vm a"), "owner", "VM id"),
    ("owner-slash", spec_dict(owner="vm/a"), "owner", "VM id"),
    ("owner-too-long", spec_dict(owner="v" * 65), "owner", "VM id"),
    ("owner-number", spec_dict(owner=5), "owner", "non-empty string"),
    ("owner-null", spec_dict(owner=None), "owner", "non-empty string"),
    # name
    ("name-number", spec_dict(name=5), "name", "string"),
    ("name-too-long", spec_dict(name="n" * 65), "name", "64"),
    # key
    ("key-16", spec_dict(key=16), "key", "[0, 15]"),
    ("key-negative", spec_dict(key=-1), "key", "[0, 15]"),
    ("key-AUTO", spec_dict(key="AUTO"), "key", "integer"),
    ("key-float", spec_dict(key=1.0), "key", "integer"),
    ("key-bool", spec_dict(key=True), "key", "integer"),
    # ports
    ("ports-negative", spec_dict(ports=-1), "ports", "[0, 64]"),
    ("ports-65", spec_dict(ports=65), "ports", "[0, 64]"),
    ("ports-string", spec_dict(ports="1"), "ports", "integer"),
    # qos
    ("priority-8", spec_dict(qos={"priority": 8}), "qos.priority", "[0, 7]"),
    ("priority-negative", spec_dict(qos={"priority": -1}), "qos.priority", "[0, 7]"),
    ("guaranteed-above-maximum",
     spec_dict(qos={"guaranteed": "10 Gbit/s", "maximum": "5 Gbit/s"}), "qos.guaranteed",
     "exceeds qos.maximum"),
    ("guaranteed-negative", spec_dict(qos={"guaranteed": -1}), "qos.guaranteed", ">= 0"),
    ("guaranteed-size-unit", spec_dict(qos={"guaranteed": "10 GiB"}), "qos.guaranteed", None),
    ("guaranteed-words", spec_dict(qos={"guaranteed": "fast"}), "qos.guaranteed", None),
    ("guaranteed-with-no-port", spec_dict(ports=0, qos={"guaranteed": "1 Gbit/s"}),
     "qos.guaranteed", "ports >= 1"),
    ("maximum-with-no-port", spec_dict(ports=0, qos={"maximum": "1 Gbit/s"}),
     "qos.guaranteed", "ports >= 1"),
    ("qos-not-a-table", spec_dict(qos=5), "qos", "expected a table"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "field", "fragment"), [pytest.param(d, f, m, id=i) for i, d, f, m in BAD]
)
def test_bad_request_raises_request_error_naming_the_field(
    data: Any, field: str, fragment: str | None
) -> None:
    with pytest.raises(RequestError) as info:
        SliceSpec.from_dict(data)
    err = info.value
    assert err.field == field
    assert err.details["field"] == field
    assert err.message.startswith(f"{field}: ")
    if fragment is not None:
        assert fragment in err.message


def test_empty_slice_is_refused() -> None:
    with pytest.raises(RequestError) as info:
        SliceSpec.from_dict({"owner": "vm-a", "name": "nothing", "ports": 2})
    assert "at least one of cores, memory, lanes" in info.value.message


@pytest.mark.parametrize("data", [[], "owner=vm-a", None, 5])
def test_a_request_that_is_not_a_table_is_refused(data: object) -> None:
    with pytest.raises(RequestError, match="expected a table"):
        SliceSpec.from_dict(data)


def test_owner_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(RequestError) as info:
        SliceSpec.from_dict(spec_dict(owner="vm-a\n"))
    assert info.value.field == "owner"


def test_negative_maximum_names_qos_maximum() -> None:
    with pytest.raises(RequestError) as info:
        SliceSpec.from_dict(spec_dict(qos={"maximum": -1}))
    assert info.value.field == "qos.maximum"


def test_decimal_bandwidth_that_is_a_whole_number_of_mbits_is_accepted() -> None:
    spec = SliceSpec.from_dict(spec_dict(qos={"guaranteed": "2.01 Gbit/s"}))
    assert spec.qos.guaranteed_mbps == 2010


def test_decimal_quantities_are_scaled() -> None:
    spec = SliceSpec.from_dict(
        spec_dict(memory={"size": "1.5 GiB"}, qos={"guaranteed": "2.5 Gbit/s"})
    )
    assert spec.memory == MemoryRequest(3 * GiB // 2)
    assert spec.qos.guaranteed_mbps == 2500


# ---------------------------------------------------------------- the plain-request path

# Values that sit on or across the edge of some rule, for any field: every type the JSON
# and TOML readers produce, bools (which are ints to Python), subclasses of str and int,
# and the bounds of each range.


class _Str(str):
    pass


class _Int(int):
    pass


ODD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 17, 64, 65, 255, 256, 4096, 4097,
    2 * MiB, 2.0, "1", "auto", "AUTO", "", " ", "vm-a", "nvme0", "2 MiB", [], [1], {},
    {"count": 1}, _Str("auto"), _Str("vm-a"), _Int(1), _Int(16), "n" * 64, "n" * 65,
]  # fmt: skip
SPEC_FIELDS = {
    "": ["owner", "name", "cores", "memory", "lanes", "key", "ports", "qos", "gpus"],
    "cores": ["count", "same_cluster", "ids", "cluster"],
    "memory": ["size", "contiguous", "granules"],
    "lanes": ["width", "endpoint", "first", "port"],
    "qos": ["priority", "guaranteed", "maximum", "burst"],
}


#: plain requests (the API's form) that between them hold every field of a spec
PLAIN_BASES: list[dict[str, Any]] = [
    {"owner": "vm-a", "ports": 2, "name": "web", "cores": {"count": 4, "same_cluster": True},
     "memory": {"size": 4 * MiB, "contiguous": True}, "lanes": {"width": 4}, "key": 3,
     "qos": {"priority": 5, "guaranteed": 1000, "maximum": 5000}},
    {"owner": "vm-b", "ports": 1, "lanes": {"width": 2, "endpoint": "nvme0"}, "key": "auto",
     "qos": {"priority": 0, "guaranteed": 0, "maximum": 0}},
    {"owner": "vm-c", "ports": 0, "lanes": {"width": 8, "first": 8},
     "qos": {"priority": 7, "guaranteed": 0, "maximum": 0}},
    {"owner": "v", "cores": {"count": 1}, "memory": {"size": 2 * MiB}},
]  # fmt: skip


def _single_edits() -> list[dict[str, Any]]:
    """Every base with one field (known or not) set to each odd value, or removed."""
    out: list[dict[str, Any]] = []
    for base in PLAIN_BASES:
        for table, keys in SPEC_FIELDS.items():
            for key in keys:
                for value in [*ODD_VALUES, _MISSING]:
                    d = json.loads(json.dumps(base))
                    target = d if not table else d.setdefault(table, {})
                    if value is _MISSING:
                        target.pop(key, None)
                    else:
                        target[key] = value
                    out.append(d)
    return out


_MISSING = object()


@st.composite
def near_plain_spec_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A plain request, then up to three edits as in ``_single_edits``."""
    spec = SliceSpec.from_dict(draw(valid_spec_dicts()))
    d = json.loads(json.dumps(spec.to_dict()))  # plain: every number an int
    for _ in range(draw(st.integers(1, 3))):
        table = draw(st.sampled_from(sorted(SPEC_FIELDS)))
        target = d if not table else d.setdefault(table, {})
        if not isinstance(target, dict):  # an earlier edit made the table a value
            continue
        key = draw(st.sampled_from(SPEC_FIELDS[table]))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(st.sampled_from(ODD_VALUES))
    return d


def _outcome(parse: Any, data: object) -> tuple[str, Any]:
    try:
        return ("spec", parse(data))
    except (RequestError, ConfigError) as e:
        return (type(e).__name__, (e.message, e.details))


def _assert_same_outcome(d: dict[str, Any], request: bool) -> None:
    fast = _outcome(lambda x: SliceSpec.from_dict(x, request=request), d)
    assert fast == _outcome(lambda x: SliceSpec.parse(x, request=request), d), d
    plain = _plain_spec(d)
    if plain is not None:
        assert fast == ("spec", plain), d


def test_the_plain_request_path_decides_as_the_field_by_field_parser() -> None:
    """from_dict's plain-request path (``_plain_spec``) may only take a spec that
    ``parse`` accepts, and must then give the same spec; everything else goes to
    ``parse``, so the two always give the same outcome, the same error included. Every
    single edit of every base, each way of reporting."""
    edits = _single_edits()
    taken = 0
    for d in edits:
        for request in (True, False):
            _assert_same_outcome(d, request)
        taken += _plain_spec(d) is not None
    assert 0 < taken < len(edits)  # the path took some and left some


@settings(max_examples=200, deadline=None)
@given(near_plain_spec_dicts(), st.booleans())
def test_the_plain_request_path_decides_as_the_parser_after_several_edits(
    d: dict[str, Any], request: bool
) -> None:
    _assert_same_outcome(d, request)


@settings(max_examples=300, deadline=None)
@given(valid_spec_dicts())
def test_the_plain_request_path_takes_every_plain_request(d: dict[str, Any]) -> None:
    """Every valid spec in plain form but one naming core ids goes the quick way (so the
    differential test above compares the path on the requests it serves)."""
    spec = SliceSpec.parse(d)
    plain = json.loads(json.dumps(spec.to_dict()))
    if spec.cores is not None and spec.cores.ids is not None:
        assert _plain_spec(plain) is None
    else:
        assert _plain_spec(plain) == spec


# ---------------------------------------------------------------- slice files


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slice.toml"
    path.write_text(text)
    return path


def test_slice_file_reads_like_the_request(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
owner = "vm-a"
name = "web"
key = 3
ports = 2

[cores]
ids = [8, 9]
same_cluster = true

[memory]
size = "4 GiB"
contiguous = true

[lanes]
width = 4
endpoint = "nvme1"

[qos]
priority = 5
guaranteed = "10 Gbit/s"
maximum = "25 Gbit/s"
""",
    )
    spec = SliceSpec.from_file(path)
    assert spec == SliceSpec(
        "vm-a",
        "web",
        CoreRequest(2, (8, 9), True),
        MemoryRequest(4 * GiB, True),
        LaneRequest(4, "nvme1"),
        3,
        2,
        QoS(5, 10_000, 25_000),
    )
    assert SliceSpec.from_file(str(path)) == spec


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param('owner = "vm-a"\n[cores]\ncount = 0\n', "cores.count", id="range"),
        pytest.param('owner = "vm-a"\n[memory]\nsize = "4 GB/s"\n', "memory.size", id="unit"),
        pytest.param('owner = "vm-a"\n[gpus]\ncount = 1\n', "gpus", id="unknown-key"),
        pytest.param('owner = "vm a"\n[cores]\ncount = 1\n', "owner", id="owner"),
        pytest.param(
            'owner = "vm-a"\n[cores]\ncount = 1\n[qos]\npriority = 8\n', "qos.priority", id="prio"
        ),
    ],
)
def test_invalid_slice_file_is_a_config_error(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        SliceSpec.from_file(write(tmp_path, text))
    assert not isinstance(info.value, RequestError)
    assert info.value.details["field"] == field
    assert info.value.message.startswith(f"{field}: ")


def test_empty_slice_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one of cores, memory, lanes"):
        SliceSpec.from_file(write(tmp_path, 'owner = "vm-a"\n'))


def test_malformed_slice_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        SliceSpec.from_file(write(tmp_path, 'owner = "vm-a\n[cores\n'))


def test_missing_slice_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="slice file not found"):
        SliceSpec.from_file(tmp_path / "absent.toml")


# ---------------------------------------------------------------- resize specs


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param({"memory": "4 GiB"}, ResizeSpec(memory=4 * GiB), id="memory"),
        pytest.param({"memory": 2 * MiB}, ResizeSpec(memory=2 * MiB), id="memory-bytes"),
        pytest.param({"cores": 3}, ResizeSpec(cores=3), id="cores"),
        pytest.param(
            {"qos": {"guaranteed": "5 Gbit/s"}}, ResizeSpec(qos=QoS(-1, 5000, -1)), id="guaranteed"
        ),
        pytest.param({"qos": {"priority": 3}}, ResizeSpec(qos=QoS(3, -1, -1)), id="priority"),
        pytest.param({"qos": {"maximum": 0}}, ResizeSpec(qos=QoS(-1, -1, 0)), id="max-zero"),
        pytest.param(
            {"memory": "1 GiB", "cores": 2, "qos": {"priority": 0, "guaranteed": 0, "maximum": 7}},
            ResizeSpec(GiB, 2, QoS(0, 0, 7)),
            id="everything",
        ),
    ],
)
def test_resize_spec_parses_and_round_trips(data: dict[str, Any], expected: ResizeSpec) -> None:
    rs = ResizeSpec.from_dict(data)
    assert rs == expected
    assert ResizeSpec.from_dict(rs.to_dict()) == rs


def test_partial_qos_resize_marks_absent_keys_as_unchanged() -> None:
    rs = ResizeSpec.from_dict({"qos": {"maximum": "20 Gbit/s"}})
    assert rs.qos == QoS(priority=-1, guaranteed_mbps=-1, max_mbps=20_000)
    assert rs.memory is None and rs.cores is None
    assert rs.to_dict() == {"qos": {"maximum": 20_000}}


@pytest.mark.parametrize("key", ["lanes", "key", "ports", "owner"])
def test_resize_refuses_what_cannot_change_on_a_live_slice(key: str) -> None:
    with pytest.raises(RequestError) as info:
        ResizeSpec.from_dict({"cores": 2, key: 1})
    assert info.value.field == key
    assert "cannot change on a live slice" in info.value.message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param({}, "resize", id="nothing"),
        pytest.param({"memory": 0}, "memory", id="memory-zero"),
        pytest.param({"memory": -(2 * MiB)}, "memory", id="memory-negative"),
        pytest.param({"memory": "4 GB/s"}, "memory", id="memory-unit"),
        pytest.param({"cores": 0}, "cores", id="cores-zero"),
        pytest.param({"cores": 4097}, "cores", id="cores-huge"),
        pytest.param({"cores": "2"}, "cores", id="cores-string"),
        pytest.param({"qos": {"priority": 8}}, "qos.priority", id="priority-8"),
        pytest.param({"qos": {"guaranteed": -1}}, "qos.guaranteed", id="guaranteed-negative"),
        pytest.param({"qos": {"maximum": -5}}, "qos.maximum", id="maximum-negative"),
        pytest.param({"qos": {"maximum": "fast"}}, "qos.maximum", id="maximum-words"),
        pytest.param({"qos": {"burst": 1}}, "qos.burst", id="qos-unknown"),
        pytest.param({"qos": 1}, "qos", id="qos-not-a-table"),
        pytest.param({"cores": 2, "gpus": 1}, "gpus", id="unknown"),
    ],
)
def test_bad_resize_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        ResizeSpec.from_dict(data)
    assert info.value.field == field


# ---------------------------------------------------------------- lifecycle

#: the lifecycle of DESIGN.md, written out independently of the code under test
LEGAL: frozenset[tuple[SliceState, SliceState]] = frozenset(
    {
        # the normal path
        (S.REQUESTED, S.RESERVED),
        (S.RESERVED, S.PROGRAMMED),
        (S.PROGRAMMED, S.ACTIVE),
        (S.ACTIVE, S.RELEASING),
        (S.RELEASING, S.FREED),
        # a reservation given back before it became active (rollback)
        (S.RESERVED, S.RELEASING),
        (S.PROGRAMMED, S.RELEASING),
        # error paths: any non-terminal state may fail; an error slice can only be released
        (S.REQUESTED, S.ERROR),
        (S.RESERVED, S.ERROR),
        (S.PROGRAMMED, S.ERROR),
        (S.ACTIVE, S.ERROR),
        (S.RELEASING, S.ERROR),
        (S.ERROR, S.RELEASING),
    }
)
ALL_PAIRS = list(itertools.product(SliceState, repeat=2))


def test_all_states_are_covered() -> None:
    assert len(ALL_PAIRS) == 49
    assert {s.value for s in SliceState} == {
        "requested", "reserved", "programmed", "active", "releasing", "freed", "error"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("current", "new"),
    [pytest.param(c, n, id=f"{c.value}->{n.value}") for c, n in ALL_PAIRS if (c, n) in LEGAL],
)
def test_legal_transition_succeeds(current: SliceState, new: SliceState) -> None:
    check_transition(current, new)
    s = Slice(1, SliceSpec.from_dict(spec_dict()), Allocation(), state=current)
    s.transition(new)
    assert s.state is new


@pytest.mark.parametrize(
    ("current", "new"),
    [pytest.param(c, n, id=f"{c.value}->{n.value}") for c, n in ALL_PAIRS if (c, n) not in LEGAL],
)
def test_illegal_transition_raises_and_changes_nothing(
    current: SliceState, new: SliceState
) -> None:
    with pytest.raises(LifecycleError) as info:
        check_transition(current, new)
    assert info.value.details == {"state": current.value, "requested": new.value}
    assert f"{current.value} -> {new.value}" in info.value.message
    s = Slice(1, SliceSpec.from_dict(spec_dict()), Allocation(), state=current)
    with pytest.raises(LifecycleError):
        s.transition(new)
    assert s.state is current


def test_freed_is_terminal() -> None:
    for new in SliceState:
        with pytest.raises(LifecycleError, match=r"none \(terminal\)"):
            check_transition(S.FREED, new)


def test_no_state_may_stay_where_it_is() -> None:
    for state in SliceState:
        with pytest.raises(LifecycleError):
            check_transition(state, state)


def test_the_normal_life_of_a_slice() -> None:
    s = Slice(7, SliceSpec.from_dict(spec_dict()), Allocation())
    assert s.state is S.REQUESTED and not s.live
    seen = []
    for state in (S.RESERVED, S.PROGRAMMED, S.ACTIVE, S.RELEASING, S.FREED):
        s.transition(state)
        seen.append(s.live)
    assert seen == [True, True, True, False, False]
    assert {S.RESERVED, S.PROGRAMMED, S.ACTIVE} == LIVE_STATES


def test_every_state_can_reach_freed_except_through_freed() -> None:
    """No dead ends: from every state but freed, some legal path ends in freed."""
    reach = {S.FREED}
    changed = True
    while changed:
        changed = False
        for c, n in LEGAL:
            if n in reach and c not in reach:
                reach.add(c)
                changed = True
    assert reach == set(SliceState)


# ---------------------------------------------------------------- allocation view


def test_allocation_round_trips_through_to_dict() -> None:
    a = Allocation(
        cores=(1, 2, 9),
        extents=(Extent(0, 4), Extent(10, 2)),
        lanes=LaneGroup(1, 12, 4),
        key=3,
        ports=(0, 5),
    )
    d = a.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Allocation.from_dict(d) == a
    assert a.granules == 6
    assert Allocation.from_dict(Allocation().to_dict()) == Allocation()


def test_slice_to_dict_reports_memory_in_human_units() -> None:
    spec = SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "8 MiB"}})
    s = Slice(3, spec, Allocation(extents=(Extent(0, 4),)), state=S.ACTIVE)
    d = s.to_dict(2 * MiB)
    assert d["id"] == 3 and d["owner"] == "vm-a" and d["state"] == "active"
    assert d["memory"] == "8 MiB"
    assert d["spec"] == spec.to_dict()
