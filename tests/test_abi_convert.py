"""The converters of abi/convert.py and the error table of abi/retcodes.py, checked against
the real firmware classes (abi may not import the firmware; its tests may)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import firmware.errors as fw_errors
from abi.commands import COMMANDS, Role, allowed_opcodes
from abi.convert import (
    device_info_to_payload,
    resize_from_payload,
    resize_to_payload,
    slice_view_from_payload,
    slice_view_to_payload,
    spec_from_payload,
    spec_to_payload,
    status_to_payload,
    utilisation_from_payload,
    utilisation_to_payload,
)
from abi.errors import DecodeError, EncodeError
from abi.retcodes import (
    ERRORS,
    ReturnCode,
    VendorStatus,
    codes_for,
    error_code,
    error_from_response,
    error_payload,
)
from abi.vendor import (
    ABI_VERSION,
    ALLOCATE_FOR_REQ,
    ALLOCATE_REQ,
    DEVICE_INFO_RSP,
    RESIZE_REQ,
    SLICE_RSP,
    STATUS_RSP,
    UTILISATION,
)
from firmware.allocator import Allocator
from firmware.errors import RequestError, SlicefabError
from firmware.inventory import Device, load_device
from firmware.manager import ResourceManager
from firmware.slices import ResizeSpec, SliceSpec
from firmware.units import parse_size
from firmware.vms import ReplayError
from tests.test_abi_roundtrip import payload_of

MiB = 1 << 20

# ------------------------------------------------------------------ valid firmware specs

_cores = st.none() | st.one_of(
    st.fixed_dictionaries({"count": st.integers(1, 64), "same_cluster": st.booleans()}),
    st.fixed_dictionaries(
        {
            "ids": st.lists(st.integers(0, 63), min_size=1, max_size=4, unique=True),
            "same_cluster": st.booleans(),
        }
    ),
)
_memory = st.none() | st.fixed_dictionaries(
    {"size": st.integers(1, 2048).map(lambda n: n * 2 * MiB), "contiguous": st.booleans()}
)
_lanes = st.none() | st.one_of(
    st.fixed_dictionaries({"width": st.sampled_from([1, 2, 4, 8, 16])}),
    st.fixed_dictionaries({"width": st.just(4), "endpoint": st.sampled_from(["nvme0", "nvme1"])}),
    st.fixed_dictionaries(
        {"width": st.sampled_from([1, 2, 4]), "first": st.sampled_from([16, 24])}
    ),
)


@st.composite
def firmware_specs(draw: st.DrawFn) -> dict[str, Any]:
    d: dict[str, Any] = {"owner": draw(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,15}", fullmatch=True))}
    if draw(st.booleans()):
        d["name"] = draw(st.text(st.characters(codec="utf-8"), max_size=16))
    for key, strategy in (("cores", _cores), ("memory", _memory), ("lanes", _lanes)):
        value = draw(strategy)
        if value is not None:
            d[key] = value
    assume(any(k in d for k in ("cores", "memory", "lanes")))
    d["key"] = draw(st.sampled_from(["auto", 0, 3, 15]))
    d["ports"] = draw(st.integers(0, 64))
    if d["ports"]:
        maximum = draw(st.integers(0, 100_000))
        d["qos"] = {
            "priority": draw(st.integers(0, 7)),
            "guaranteed": draw(st.integers(0, maximum or 100_000)),
            "maximum": maximum,
        }
    return d


def _firmware_spec(d: dict[str, Any]) -> SliceSpec:
    try:
        return SliceSpec.from_dict(d)
    except RequestError:
        assume(False)
        raise


@settings(max_examples=60, deadline=None)
@given(firmware_specs(), st.none() | st.text(st.characters(codec="utf-8"), min_size=1, max_size=20))
def test_spec_round_trips_through_the_wire(raw: dict[str, Any], request_id: str | None) -> None:
    spec = _firmware_spec(raw)
    canonical = spec.to_dict()
    wire = ALLOCATE_REQ.build(spec_to_payload(canonical, request_id=request_id))
    back, rid = spec_from_payload(ALLOCATE_REQ.parse(wire), owner=spec.owner)
    assert rid == request_id
    assert back == canonical and list(back) == list(canonical)  # the exact shape, key order too
    assert SliceSpec.from_dict(back) == spec
    admin = ALLOCATE_FOR_REQ.build(spec_to_payload(canonical, owner=True))
    assert spec_from_payload(ALLOCATE_FOR_REQ.parse(admin))[0] == canonical


@settings(max_examples=40, deadline=None)
@given(payload_of(ALLOCATE_REQ))
def test_spec_payload_shape_round_trips(payload: dict[str, Any]) -> None:
    spec, rid = spec_from_payload(payload, owner="vm-a")
    assert spec_to_payload(spec, request_id=rid) == payload


def test_spec_owner_comes_from_exactly_one_place() -> None:
    payload = spec_to_payload({"owner": "vm-a", "memory": {"size": 2 * MiB}})
    assert "owner" not in payload
    with pytest.raises(ValueError, match="owner"):
        spec_from_payload(payload)
    with pytest.raises(ValueError, match="owner"):
        spec_from_payload({**payload, "owner": "vm-a"}, owner="vm-b")
    with pytest.raises(EncodeError):
        spec_to_payload({"memory": {"size": 2 * MiB}}, owner=True)


@settings(max_examples=40, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "memory": st.integers(1, 100).map(lambda n: f"{n * 2} MiB"),
            "cores": st.integers(1, 64),
            "qos": st.fixed_dictionaries(
                {},
                optional={
                    "priority": st.integers(0, 7),
                    "guaranteed": st.integers(0, 10_000),
                    "maximum": st.integers(0, 10_000),
                },
            ),
        },
    ),
    st.integers(0, 2**32 - 1),
)
def test_resize_round_trips_through_the_wire(raw: dict[str, Any], slice_id: int) -> None:
    try:
        rs = ResizeSpec.from_dict(raw)
    except RequestError:
        assume(False)
        raise
    wire = RESIZE_REQ.build(resize_to_payload(slice_id, rs.to_dict(), request_id="r"))
    sid, back, rid = resize_from_payload(RESIZE_REQ.parse(wire))
    assert (sid, back, rid) == (slice_id, rs.to_dict(), "r")
    assert ResizeSpec.from_dict(back) == rs


@pytest.fixture(scope="module")
def device() -> Device:
    return load_device()


@pytest.mark.parametrize(
    "raw",
    [
        {"owner": "vm-a", "name": "web", "cores": {"count": 4, "same_cluster": True},
         "memory": {"size": "4 GiB"}, "lanes": {"width": 4, "endpoint": "nvme0"},
         "qos": {"priority": 5, "guaranteed": "10 Gbit/s", "maximum": "25 Gbit/s"}},
        {"owner": "vm-b", "cores": {"ids": [40, 41]}, "key": 7, "ports": 0},
        {"owner": "vm-c", "memory": {"size": "64 MiB", "contiguous": True},
         "lanes": {"width": 2, "first": 18}},
    ],
)  # fmt: skip
def test_slice_view_of_a_real_slice(device: Device, raw: dict[str, Any]) -> None:
    s = Allocator(device).allocate(SliceSpec.from_dict(raw))
    view = s.to_dict(device.granule_bytes)
    wire = SLICE_RSP.build(slice_view_to_payload(view, device.granule_bytes))
    back = slice_view_from_payload(SLICE_RSP.parse(wire))
    expected = {k: v for k, v in view.items() if k != "memory"}
    assert {k: v for k, v in back.items() if k not in ("memory_bytes", "granule_bytes")} == expected
    assert back["memory_bytes"] == s.alloc.granules * device.granule_bytes
    assert back["memory_bytes"] == parse_size("memory", view["memory"])
    assert back["granule_bytes"] == device.granule_bytes


def test_device_info_and_status(device: Device, open_rm: Callable[[], ResourceManager]) -> None:
    payload = device_info_to_payload(device.summary(), ABI_VERSION)
    info = DEVICE_INFO_RSP.parse(DEVICE_INFO_RSP.build(payload))
    assert info["granule_bytes"] == device.granule_bytes
    assert info["memory_bytes"] == device.memory_bytes
    assert [e["name"] for e in info["endpoints"]] == [e.name for e in device.endpoints]
    manager = open_rm()
    manager.allocate(SliceSpec.from_dict({"owner": "vm-a", "cores": {"count": 2}}))
    status = manager.status()
    parsed = STATUS_RSP.parse(STATUS_RSP.build(status_to_payload(status)))
    assert parsed["slices"] == 1 and parsed["device"] == device.name
    assert utilisation_from_payload(parsed["utilisation"]) == status["utilisation"]
    util = UTILISATION.build(utilisation_to_payload(status["utilisation"]))
    assert UTILISATION.parse(util) == parsed["utilisation"]


# ------------------------------------------------------------------ error codes


def _firmware_error_classes() -> list[type[SlicefabError]]:
    seen: list[type[SlicefabError]] = []
    todo: list[type[SlicefabError]] = [SlicefabError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += cls.__subclasses__()
    return seen


def test_every_firmware_error_code_has_wire_codes() -> None:
    codes = {cls.code for cls in _firmware_error_classes()}
    assert ReplayError.code in codes and fw_errors.LedgerError.code in codes
    assert codes <= set(ERRORS), codes - set(ERRORS)
    mailbox = {"auth_failed", "replay", "rate_limited", "opcode_not_allowed",
               "payload_too_large", "malformed"}  # fmt: skip
    assert mailbox <= set(ERRORS)


def test_vendor_status_identifies_the_error_and_back() -> None:
    statuses = [vs for _, vs in ERRORS.values()]
    assert len(set(statuses)) == len(statuses)  # one vendor status per code
    assert set(statuses) == set(VendorStatus) - {VendorStatus.NONE}
    for code, (rc, vs) in ERRORS.items():
        assert rc != ReturnCode.SUCCESS
        assert codes_for(code) == (rc, vs)
        assert error_code(rc, vs) == code


def test_unknown_codes_never_read_as_success() -> None:
    assert codes_for("no-such-code") == (ReturnCode.INTERNAL_ERROR, VendorStatus.INTERNAL)
    assert error_code(ReturnCode.SUCCESS, 0) is None
    assert error_code(ReturnCode.INVALID_INPUT, 0xFFFF) == "invalid"  # bare CXL code
    assert error_code(ReturnCode.INVALID_INPUT, VendorStatus.LEDGER) == "invalid"  # mismatch
    assert error_code(0x7777, 0) == "error"


@pytest.mark.parametrize(
    "error",
    [
        fw_errors.InsufficientResources("memory", 40960, 30720, "granules"),
        RequestError("lanes.width", "x3 is not a PCIe link width"),
        fw_errors.NotFound("no slice 9", slice=9),
        ReplayError("sequence number 3 is not above 7"),
        fw_errors.LedgerError("x" * 5000),
    ],
)
def test_firmware_errors_cross_the_wire(error: SlicefabError) -> None:
    rc, vs, payload = error_payload(error.to_dict())
    back = error_from_response(rc, vs, payload)
    assert back["code"] == error.code
    assert back["message"] == error.message[:1024]
    assert back["details"].get("field", "") == error.details.get("field", "")
    assert error_from_response(rc, vs, b"") == {"code": error.code, "message": "", "details": {}}
    with pytest.raises(DecodeError):
        error_from_response(rc, vs, payload[:-1])
    with pytest.raises(DecodeError):
        error_from_response(ReturnCode.SUCCESS, 0, payload)


def test_error_payload_never_fails() -> None:
    rc, vs, payload = error_payload({"code": 5, "message": "é" * 2000, "details": "junk"})
    assert (rc, vs) == codes_for("error")
    assert len(payload) <= 2 + 1 + 1024 + 1
    back = error_from_response(rc, vs, payload)
    assert back["message"] == "é" * 512


def test_allowlists() -> None:
    vm = allowed_opcodes(Role.VM)
    admin = allowed_opcodes(Role.ADMIN)
    assert 0xC000 in vm and 0xC000 not in admin  # ALLOCATE: the VM's own identity
    assert 0xC005 in admin and 0xC005 not in vm  # ALLOCATE_FOR names an owner
    for op in (0x5400, 0x5402, 0x5404, 0x5405, 0x5407, 0x5409, 0x5604, 0x5605, 0xC301,
               0xC400, 0xC401, 0xC402, 0xC403, 0xC404, 0xC405):  # fmt: skip
        assert op not in vm, f"{op:04X}h must be admin-only"
    assert vm | admin == set(COMMANDS)
    assert not any("owner" in {f.name for f in COMMANDS[op].request.fields} for op in vm)
