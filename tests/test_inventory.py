"""Device inventory: the shipped default, every validation rule of a device file, and the
fingerprint that ties a ledger to its device (firmware/inventory.py)."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from firmware.errors import ConfigError
from firmware.inventory import (
    MAX_GRANULES,
    Device,
    Endpoint,
    default_device_path,
    load_device,
    parse_device,
)
from firmware.units import GiB, KiB, MiB

Doc = dict[str, Any]
Mutation = Callable[[Doc], None]


# ---------------------------------------------------------------- helpers


def default_doc() -> Doc:
    """The shipped default device file as a plain TOML document (a fresh copy)."""
    with default_device_path().open("rb") as f:
        return tomllib.load(f)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as a TOML value")


def dump_toml(doc: Doc) -> str:
    """A minimal TOML writer for device documents: scalars, lists, tables and arrays of
    tables, two levels deep (all the device format uses)."""
    lines: list[str] = []

    def table(path: str, t: Doc) -> None:
        scalars = {k: v for k, v in t.items() if not _is_table(v) and not _is_table_array(v)}
        if path:
            lines.append(f"[{path}]")
        lines.extend(f"{k} = {_value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in t.items():
            sub = f"{path}.{k}" if path else k
            if _is_table(v):
                table(sub, v)
            elif _is_table_array(v):
                for item in v:
                    lines.append(f"[[{sub}]]")
                    lines.extend(f"{ik} = {_value(iv)}" for ik, iv in item.items())
                    lines.append("")

    table("", doc)
    return "\n".join(lines)


def _is_table(v: Any) -> bool:
    return isinstance(v, dict)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def write_device(tmp_path: Path, doc: Doc, name: str = "device.toml") -> Path:
    path = tmp_path / name
    path.write_text(dump_toml(doc))
    return path


def mutated(mutation: Mutation) -> Doc:
    doc = default_doc()
    mutation(doc)
    return doc


def setter(section: str, key: str, value: Any) -> Mutation:
    def apply(doc: Doc) -> None:
        doc[section][key] = value

    return apply


def endpoint_setter(index: int, key: str, value: Any) -> Mutation:
    def apply(doc: Doc) -> None:
        doc["pcie"]["endpoint"][index][key] = value

    return apply


def deleter(section: str, key: str | None = None) -> Mutation:
    def apply(doc: Doc) -> None:
        if key is None:
            del doc[section]
        else:
            del doc[section][key]

    return apply


def chain(*mutations: Mutation) -> Mutation:
    def apply(doc: Doc) -> None:
        for m in mutations:
            m(doc)

    return apply


# ---------------------------------------------------------------- the default device


def test_default_device_has_the_issue_numbers() -> None:
    dev = load_device()
    assert dev.name == "sf-dpu0"
    # 64 cores in 8 clusters of 8
    assert dev.cores == 64
    assert dev.cluster_sizes == (8,) * 8
    # 64 GiB in 2 MiB granules
    assert dev.memory_bytes == 64 * GiB
    assert dev.granule_bytes == 2 * MiB
    assert dev.granules == 32768
    assert dev.max_extents_per_slice == 64
    # 32 lanes in 4 ports of 8
    assert dev.port_lanes == (8, 8, 8, 8)
    assert dev.lanes == 32
    assert [dev.port_first_lane(p) for p in range(4)] == [0, 8, 16, 24]
    # two NVMe SSDs, x4, at the start of ports 0 and 1
    assert dev.endpoints == (
        Endpoint("nvme0", "nvme", 0, 0, 4),
        Endpoint("nvme1", "nvme", 1, 8, 4),
    )
    assert dev.endpoint("nvme1") == dev.endpoints[1]
    assert dev.endpoint("nvme9") is None
    assert dev.endpoints[1].lanes == range(8, 12)
    assert dev.endpoint_lanes == frozenset({0, 1, 2, 3, 8, 9, 10, 11})
    # 16 protection keys, a 16-port crossbar at 100 Gbit/s
    assert dev.keys == 16
    assert dev.crossbar.ports == 16
    assert dev.crossbar.port_mbps == 100_000
    assert dev.crossbar.data_width_bits == 512
    assert dev.crossbar.data_bytes == 64
    assert dev.crossbar.raw_port_mbps == 512 * 250


def test_default_path_is_the_default() -> None:
    assert load_device(default_device_path()) == load_device(None)


def test_summary_uses_human_units() -> None:
    s = load_device().summary()
    assert s["cores"] == {"total": 64, "clusters": [8] * 8}
    assert s["memory"]["size"] == "64 GiB"
    assert s["memory"]["granule"] == "2 MiB"
    assert s["memory"]["granules"] == 32768
    assert s["pcie"]["lanes"] == 32
    assert [e["name"] for e in s["pcie"]["endpoints"]] == ["nvme0", "nvme1"]
    assert s["keys"] == 16
    assert s["crossbar"]["port_bandwidth"] == "100 Gbit/s"
    assert s["crossbar"]["ports"] == 16


def test_the_test_writer_reproduces_the_default(tmp_path: Path) -> None:
    """The TOML writer used by the broken-file table writes a file that loads back to the
    same device, so a failure below is due to the mutation, not to the writer."""
    assert load_device(write_device(tmp_path, default_doc())) == load_device()


# ---------------------------------------------------------------- broken device files

# (id, mutation, dotted field, a fragment of the message naming the limit or None)
BROKEN: list[tuple[str, Mutation, str, str | None]] = [
    # missing sections and keys
    *[(f"missing-section-{s}", deleter(s), s, "missing") for s in
      ("device", "cores", "memory", "pcie", "keys", "crossbar")],
    ("missing-device-name", deleter("device", "name"), "device.name", "missing"),
    ("missing-clusters", deleter("cores", "clusters"), "cores.clusters", "missing"),
    ("missing-granule", deleter("memory", "granule"), "memory.granule", "missing"),
    ("missing-port-lanes", deleter("pcie", "port_lanes"), "pcie.port_lanes", "missing"),
    ("missing-key-count", deleter("keys", "count"), "keys.count", "missing"),
    ("missing-clock", deleter("crossbar", "clock_mhz"), "crossbar.clock_mhz", "missing"),
    (
        "missing-endpoint-name",
        lambda d: d["pcie"]["endpoint"][1].pop("name"),
        "pcie.endpoint[1].name",
        "missing",
    ),
    # unknown keys: a typo must not be silently ignored
    ("typo-optional-key", chain(deleter("memory", "max_extents_per_slice"),
                                setter("memory", "max_extent_per_slice", 64)),
     "memory.max_extent_per_slice", "unknown key"),
    ("typo-model", chain(deleter("device", "model"), setter("device", "modle", "x")),
     "device.modle", "unknown key"),
    ("extra-crossbar-key", setter("crossbar", "port_bandwith", "100 Gbit/s"),
     "crossbar.port_bandwith", "unknown key"),
    ("unknown-section", lambda d: d.update(gpus={"count": 2}), "gpus", "unknown key"),
    ("typo-endpoint-key", endpoint_setter(0, "knd", "nvme"), "pcie.endpoint[0].knd",
     "unknown key"),
    # wrong types
    ("section-not-a-table", lambda d: d.update(keys=16), "keys", "expected a table"),
    ("clusters-string", setter("cores", "clusters", "8"), "cores.clusters", "integer"),
    ("clusters-bool", setter("cores", "clusters", True), "cores.clusters", "integer"),
    ("clusters-float", setter("cores", "clusters", 8.0), "cores.clusters", "integer"),
    ("name-empty", setter("device", "name", "  "), "device.name", "non-empty"),
    ("size-bandwidth-unit", setter("memory", "size", "64 GB/s"), "memory.size", None),
    ("bandwidth-size-unit", setter("crossbar", "port_bandwidth", "100 GiB"),
     "crossbar.port_bandwidth", None),
    ("port-lanes-not-a-list", setter("pcie", "port_lanes", 8), "pcie.port_lanes", "1..16"),
    # every numeric field out of range, both ends
    ("clusters-zero", setter("cores", "clusters", 0), "cores.clusters", "[1, 64]"),
    ("clusters-65", setter("cores", "clusters", 65), "cores.clusters", "[1, 64]"),
    ("per-cluster-zero", setter("cores", "cores_per_cluster", 0), "cores.cores_per_cluster",
     "[1, 64]"),
    ("per-cluster-65", setter("cores", "cores_per_cluster", 65), "cores.cores_per_cluster",
     "[1, 64]"),
    ("max-extents-zero", setter("memory", "max_extents_per_slice", 0),
     "memory.max_extents_per_slice", "[1, 4096]"),
    ("max-extents-4097", setter("memory", "max_extents_per_slice", 4097),
     "memory.max_extents_per_slice", "[1, 4096]"),
    ("size-zero", setter("memory", "size", 0), "memory.size", "multiple of the granule"),
    ("size-negative", setter("memory", "size", -(2 * MiB)), "memory.size",
     "multiple of the granule"),
    ("granule-zero", setter("memory", "granule", 0), "memory.granule", ">= 4 KiB"),
    ("granule-below-4k", setter("memory", "granule", "2 KiB"), "memory.granule", ">= 4 KiB"),
    ("keys-zero", setter("keys", "count", 0), "keys.count", "[1, 16]"),
    ("keys-17", setter("keys", "count", 17), "keys.count", "[1, 16]"),
    ("xbar-ports-zero", setter("crossbar", "ports", 0), "crossbar.ports", "[1, 64]"),
    ("xbar-ports-65", setter("crossbar", "ports", 65), "crossbar.ports", "[1, 64]"),
    ("data-width-4", setter("crossbar", "data_width_bits", 4), "crossbar.data_width_bits",
     "[8, 1024]"),
    ("data-width-2048", setter("crossbar", "data_width_bits", 2048),
     "crossbar.data_width_bits", "[8, 1024]"),
    ("data-width-not-pow2", setter("crossbar", "data_width_bits", 384),
     "crossbar.data_width_bits", "power of two"),
    ("clock-zero", setter("crossbar", "clock_mhz", 0), "crossbar.clock_mhz", "[1, 5000]"),
    ("clock-5001", setter("crossbar", "clock_mhz", 5001), "crossbar.clock_mhz", "[1, 5000]"),
    ("bandwidth-zero", setter("crossbar", "port_bandwidth", 0), "crossbar.port_bandwidth",
     "128 Gbit/s"),
    ("bandwidth-negative", setter("crossbar", "port_bandwidth", -1), "crossbar.port_bandwidth",
     "128 Gbit/s"),
    ("no-ports", setter("pcie", "port_lanes", []), "pcie.port_lanes", "1..16"),
    ("17-ports", setter("pcie", "port_lanes", [1] * 17), "pcie.port_lanes", "1..16"),
    # memory geometry
    ("granule-not-pow2", setter("memory", "granule", "3 MiB"), "memory.granule",
     "power of two"),
    ("size-not-multiple", setter("memory", "size", "63 MiB"), "memory.size",
     "2097152 bytes"),
    ("too-many-granules", chain(setter("memory", "size", "128 GiB"),
                                setter("memory", "granule", "4 KiB")),
     "memory.size", str(MAX_GRANULES)),
    # PCIe ports and endpoints
    ("port-with-3-lanes", setter("pcie", "port_lanes", [8, 3, 8, 8]), "pcie.port_lanes",
     "(1, 2, 4, 8, 16)"),
    ("port-with-32-lanes", setter("pcie", "port_lanes", [32]), "pcie.port_lanes",
     "(1, 2, 4, 8, 16)"),
    ("port-lanes-bool", setter("pcie", "port_lanes", [8, True]), "pcie.port_lanes",
     "(1, 2, 4, 8, 16)"),
    ("endpoint-misaligned", endpoint_setter(0, "first_lane", 2), "pcie.endpoint[0].first_lane",
     "multiple of 4"),
    ("endpoint-past-its-port", endpoint_setter(0, "first_lane", 6),
     "pcie.endpoint[0].first_lane", "[0, 4]"),
    ("endpoint-width-3", endpoint_setter(0, "width", 3), "pcie.endpoint[0].width",
     "(1, 2, 4, 8, 16)"),
    ("endpoint-wider-than-port", endpoint_setter(0, "width", 16), "pcie.endpoint[0].width",
     "[1, 8]"),
    ("endpoint-width-zero", endpoint_setter(0, "width", 0), "pcie.endpoint[0].width", "[1, 8]"),
    ("endpoint-overlaps-whole", endpoint_setter(1, "port", 0), "pcie.endpoint[1].first_lane",
     "nvme0"),
    ("endpoint-overlaps-part", chain(endpoint_setter(1, "port", 0),
                                     endpoint_setter(1, "width", 2),
                                     endpoint_setter(1, "first_lane", 2)),
     "pcie.endpoint[1].first_lane", "nvme0"),
    ("endpoint-missing-port", endpoint_setter(1, "port", 4), "pcie.endpoint[1].port",
     "[0, 3]"),
    ("endpoint-negative-port", endpoint_setter(1, "port", -1), "pcie.endpoint[1].port",
     "[0, 3]"),
    ("endpoint-duplicate-name", endpoint_setter(1, "name", "nvme0"), "pcie.endpoint[1].name",
     "duplicate"),
    ("endpoint-not-a-table-array", setter("pcie", "endpoint", "nvme0"), "pcie.endpoint",
     "array of tables"),
    # the crossbar
    ("bandwidth-above-raw-rate", setter("crossbar", "port_bandwidth", "200 Gbit/s"),
     "crossbar.port_bandwidth", "128 Gbit/s"),
    ("bandwidth-one-above-raw-rate", setter("crossbar", "port_bandwidth", 128_001),
     "crossbar.port_bandwidth", "128 Gbit/s"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutation", "field", "limit"),
    [pytest.param(m, f, lim, id=i) for i, m, f, lim in BROKEN],
)
def test_broken_device_file_is_refused_naming_the_field(
    tmp_path: Path, mutation: Mutation, field: str, limit: str | None
) -> None:
    path = write_device(tmp_path, mutated(mutation))
    with pytest.raises(ConfigError) as info:
        load_device(path)
    err = info.value
    assert f"{field}:" in err.message
    assert err.details["field"] == field
    assert err.details["file"] == str(path)
    assert err.message.startswith(f"{path}: ")
    if limit is not None:
        assert limit in err.message


def test_every_broken_case_is_distinct_and_the_table_is_broad() -> None:
    ids = [i for i, *_ in BROKEN]
    assert len(ids) == len(set(ids))
    fields = {f for _, _, f, _ in BROKEN}
    # every leaf field of the device format appears at least once
    for f in (
        "device.name", "cores.clusters", "cores.cores_per_cluster", "memory.size",
        "memory.granule", "memory.max_extents_per_slice", "pcie.port_lanes",
        "pcie.endpoint[0].first_lane", "pcie.endpoint[0].width", "pcie.endpoint[1].port",
        "pcie.endpoint[1].name", "keys.count", "crossbar.ports", "crossbar.port_bandwidth",
        "crossbar.data_width_bits", "crossbar.clock_mhz",
    ):  # fmt: skip
        assert f in fields, f


def test_out_of_range_error_carries_the_limit_in_details(tmp_path: Path) -> None:
    path = write_device(tmp_path, mutated(setter("keys", "count", 17)))
    with pytest.raises(ConfigError) as info:
        load_device(path)
    assert info.value.details["limit"] == [1, 16]
    assert info.value.details["got"] == 17


def test_raw_rate_error_carries_the_limit_in_details(tmp_path: Path) -> None:
    path = write_device(tmp_path, mutated(setter("crossbar", "port_bandwidth", "200 Gbit/s")))
    with pytest.raises(ConfigError) as info:
        load_device(path)
    assert info.value.details["limit"] == 128_000


def test_too_many_granules_carries_the_limit_in_details(tmp_path: Path) -> None:
    doc = mutated(chain(setter("memory", "size", "128 GiB"), setter("memory", "granule", "4 KiB")))
    with pytest.raises(ConfigError) as info:
        load_device(write_device(tmp_path, doc))
    assert info.value.details["limit"] == MAX_GRANULES
    assert "33554432 granules" in info.value.message


def test_malformed_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('[device]\nname = "sf"\n[cores\nclusters = 8\n')
    with pytest.raises(ConfigError) as info:
        load_device(path)
    assert "not valid TOML" in info.value.message
    assert info.value.details["file"] == str(path)


def test_duplicate_key_in_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text(dump_toml(default_doc()).replace("count = 16", "count = 16\ncount = 8"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_device(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_device(path)
    assert "not found" in info.value.message
    assert str(path) in info.value.message


def test_parse_device_raises_without_a_file_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        parse_device(mutated(setter("keys", "count", 17)))
    assert info.value.message.startswith("keys.count: ")


def test_a_top_level_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ConfigError):
        parse_device([])  # type: ignore[arg-type]


# ---------------------------------------------------------------- limits are inclusive


@pytest.mark.parametrize(
    ("mutation", "check"),
    [
        pytest.param(
            setter("cores", "clusters", 64), lambda d: d.cores == 64 * 8, id="64-clusters"
        ),
        pytest.param(
            setter("cores", "cores_per_cluster", 64),
            lambda d: d.cores == 8 * 64,
            id="64-per-cluster",
        ),
        pytest.param(setter("keys", "count", 16), lambda d: d.keys == 16, id="16-keys"),
        pytest.param(setter("keys", "count", 1), lambda d: d.keys == 1, id="1-key"),
        pytest.param(
            setter("crossbar", "ports", 64), lambda d: d.crossbar.ports == 64, id="64-ports"
        ),
        pytest.param(
            setter("crossbar", "port_bandwidth", "128 Gbit/s"),
            lambda d: d.crossbar.port_mbps == d.crossbar.raw_port_mbps,
            id="bandwidth-at-raw-rate",
        ),
        pytest.param(
            chain(setter("memory", "size", "64 GiB"), setter("memory", "granule", "4 KiB")),
            lambda d: d.granules == MAX_GRANULES,
            id="exactly-max-granules",
        ),
        pytest.param(
            setter("memory", "granule", "4 KiB"),
            lambda d: d.granule_bytes == 4 * KiB,
            id="4k-granule",
        ),
        pytest.param(
            setter("pcie", "port_lanes", [16] * 16), lambda d: d.lanes == 256, id="16-x16-ports"
        ),
        pytest.param(
            chain(endpoint_setter(1, "port", 0), endpoint_setter(1, "first_lane", 4)),
            lambda d: d.endpoint_lanes == frozenset(range(8)),
            id="two-endpoints-fill-a-port",
        ),
        pytest.param(
            lambda d: d["pcie"].pop("endpoint"), lambda d: d.endpoints == (), id="no-endpoints"
        ),
        pytest.param(
            deleter("device", "model"), lambda d: d.model == "unspecified", id="model-optional"
        ),
        pytest.param(
            lambda d: d["pcie"]["endpoint"][0].pop("kind"),
            lambda d: d.endpoints[0].kind == "nvme",
            id="kind-defaults-to-nvme",
        ),
        pytest.param(
            deleter("memory", "max_extents_per_slice"),
            lambda d: d.max_extents_per_slice == 64,
            id="max-extents-default",
        ),
    ],
)
def test_values_at_the_limits_are_accepted(
    tmp_path: Path, mutation: Mutation, check: Callable[[Device], bool]
) -> None:
    assert check(load_device(write_device(tmp_path, mutated(mutation))))


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_for_equal_files(tmp_path: Path) -> None:
    a = write_device(tmp_path, default_doc(), "a.toml")
    b = write_device(tmp_path, default_doc(), "b.toml")
    fp = load_device(a).fingerprint()
    assert fp == load_device(a).fingerprint()  # same file read twice
    assert fp == load_device(b).fingerprint()  # another file, same content
    assert fp == load_device().fingerprint()  # the shipped file (comments, layout differ)
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_fingerprint_ignores_spelling_of_equal_quantities(tmp_path: Path) -> None:
    doc = default_doc()
    doc["memory"]["size"] = 64 * GiB  # bytes instead of "64 GiB"
    doc["memory"]["granule"] = "2048 KiB"
    doc["crossbar"]["port_bandwidth"] = "100000 Mbit/s"
    doc["crossbar"] = dict(reversed(list(doc["crossbar"].items())))  # key order
    assert load_device(write_device(tmp_path, doc)).fingerprint() == load_device().fingerprint()


FIELD_CHANGES: list[tuple[str, Mutation]] = [
    ("device.name", setter("device", "name", "sf-dpu1")),
    ("device.model", setter("device", "model", "other")),
    ("cores.clusters", chain(setter("cores", "clusters", 4),
                             setter("cores", "cores_per_cluster", 16))),
    ("cores.cores_per_cluster", setter("cores", "cores_per_cluster", 4)),
    ("memory.size", setter("memory", "size", "32 GiB")),
    ("memory.granule", setter("memory", "granule", "4 MiB")),
    ("memory.max_extents_per_slice", setter("memory", "max_extents_per_slice", 32)),
    ("pcie.port_lanes", setter("pcie", "port_lanes", [8, 8, 8, 4])),
    ("pcie.endpoint.name", endpoint_setter(1, "name", "ssd1")),
    ("pcie.endpoint.kind", endpoint_setter(1, "kind", "gpu")),
    ("pcie.endpoint.port", endpoint_setter(1, "port", 2)),
    ("pcie.endpoint.first_lane", endpoint_setter(1, "first_lane", 4)),
    ("pcie.endpoint.width", endpoint_setter(1, "width", 2)),
    ("pcie.endpoint.count", lambda d: d["pcie"]["endpoint"].pop()),
    ("keys.count", setter("keys", "count", 8)),
    ("crossbar.ports", setter("crossbar", "ports", 8)),
    ("crossbar.port_bandwidth", setter("crossbar", "port_bandwidth", "50 Gbit/s")),
    ("crossbar.data_width_bits", setter("crossbar", "data_width_bits", 1024)),
    ("crossbar.clock_mhz", setter("crossbar", "clock_mhz", 500)),
]  # fmt: skip


@pytest.mark.parametrize(("mutation",), [pytest.param(m, id=i) for i, m in FIELD_CHANGES])
def test_fingerprint_changes_when_a_field_changes(tmp_path: Path, mutation: Mutation) -> None:
    changed = load_device(write_device(tmp_path, mutated(mutation)))
    assert changed != load_device()
    assert changed.fingerprint() != load_device().fingerprint()


def test_fingerprints_of_all_field_changes_are_pairwise_distinct(tmp_path: Path) -> None:
    prints = {load_device().fingerprint()}
    for i, (name, mutation) in enumerate(FIELD_CHANGES):
        prints.add(
            load_device(write_device(tmp_path, mutated(mutation), f"{i}.toml")).fingerprint()
        )
        assert len(prints) == i + 2, name


def test_device_is_immutable() -> None:
    dev = load_device()
    with pytest.raises(AttributeError):
        dev.keys = 8  # type: ignore[misc]
    assert copy.deepcopy(dev) == dev


def test_port_lane_count_must_be_an_integer(tmp_path: Path) -> None:
    path = write_device(tmp_path, mutated(setter("pcie", "port_lanes", [8.0, 8, 8, 8])))
    with pytest.raises(ConfigError) as info:
        load_device(path)
    assert info.value.details["field"] == "pcie.port_lanes"
