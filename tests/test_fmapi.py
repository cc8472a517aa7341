"""The CXL FM API commands (firmware/fmapi.py): LDs, QoS and Dynamic Capacity on slices.

Every handler is called directly and through the request pipeline (admin frames, and
sealed VM frames where a VM may send the command), with ``firmware.api.HANDLERS``
extended by ``FMAPI_HANDLERS``. Every refusal is checked to change nothing: the slice
table and the crossbar's registers are compared before and after. The invariant checkers
run after every test (the ``api`` fixture).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import firmware.api
from abi import regmap
from abi.commands import BY_NAME, Role, decode_request, decode_response, encode_request
from abi.envelope import REQUEST_DOMAIN, RESPONSE_DOMAIN, open_sealed, seal
from abi.examples import EXAMPLES
from abi.fmapi import slice_tag
from firmware.api import Api, Channel
from firmware.errors import FabricError, InsufficientResources, SlicefabError
from firmware.fabric.image import rate_for, weight_for
from firmware.fabric.model import CrossbarModel
from firmware.fmapi import FMAPI_HANDLERS, QOS_CONTROL
from firmware.inventory import default_device_path
from firmware.manager import ResourceManager, StateDir, open_manager
from firmware.slices import SliceSpec

MiB = 1 << 20
GiB = 1 << 30
G = 2 * MiB  # the default device's granule
UNIT = 256 * MiB  # its LD allocation granularity
CAP = 100_000  # Mbit/s per crossbar port
ADMIN = Channel(Role.ADMIN)


@pytest.fixture
def api(rm: ResourceManager, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    monkeypatch.setattr(firmware.api, "HANDLERS", {**firmware.api.HANDLERS, **FMAPI_HANDLERS})
    yield Api(rm, rm.vms)
    assert rm.check_invariants() == []


# ------------------------------------------------------------------ helpers


def alloc(
    rm: ResourceManager,
    owner: str,
    *,
    memory: int | None = None,
    contiguous: bool = False,
    ports: int = 1,
    g: int = 0,
    mx: int = 0,
    prio: int = 0,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "owner": owner,
        "cores": {"count": 1},
        "ports": ports,
        "qos": {"priority": prio, "guaranteed": g, "maximum": mx},
    }
    if memory is not None:
        spec["memory"] = {"size": memory, "contiguous": contiguous}
    return rm.allocate(SliceSpec.from_dict(spec))


def parsed(name: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The payload as the pipeline hands it to a handler (built and parsed)."""
    return decode_request(encode_request(name, payload)).payload


def direct(api: Api, name: str, payload: Mapping[str, Any], ch: Channel = ADMIN) -> Any:
    return FMAPI_HANDLERS[name](api, ch, parsed(name, payload))


def frame(api: Api, name: str, payload: Mapping[str, Any]) -> Any:
    """One admin frame through the pipeline; the decoded response."""
    return decode_response(api.handle_admin_frame(ADMIN, encode_request(name, payload)))


def ok(api: Api, name: str, payload: Mapping[str, Any]) -> Any:
    r = frame(api, name, payload)
    assert r.ok, r.error
    return r.payload


def snapshot(rm: ResourceManager) -> Any:
    return rm.list_slices(), rm.fabric.read_image(), rm.allocator.memory.free_granules


def refused(api: Api, name: str, payload: Mapping[str, Any], code: str, field: str | None) -> None:
    """Refused with ``code`` naming ``field``, by frame and by direct call; nothing changed."""
    before = snapshot(api.manager)
    r = frame(api, name, payload)
    assert not r.ok, (name, payload)
    assert r.error["code"] == code, r.error
    if field is not None:
        assert r.error["details"].get("field") == field, r.error
    with pytest.raises(SlicefabError) as e:
        direct(api, name, payload)
    assert e.value.code == code
    if field is not None:
        assert e.value.details.get("field") == field
    assert snapshot(api.manager) == before


def key_of(view: Mapping[str, Any]) -> int:
    return int(view["alloc"]["key"])


def granules(rm: ResourceManager, sid: int) -> list[list[int]]:
    return [list(e) for e in rm.get(sid)["alloc"]["extents"]]


def port_register(rm: ResourceManager, port: int, offset: int) -> int:
    return rm.fabric.read_image()[regmap.port_reg(port, offset)]


class VmClient:
    """A VM speaking through the sealed-frame pipeline (Api.handle_vm_frame)."""

    def __init__(self, api: Api, vm: str, tmp: Path) -> None:
        self.api, self.vm = api, vm
        self.key = api.vms.add(vm, str(tmp / f"{vm}.mbox")).key
        self.channel = Channel(Role.VM, vm)
        self.seq = 0

    def call(self, name: str, payload: Mapping[str, Any]) -> Any:
        self.seq += 1
        sealed = seal(self.key, REQUEST_DOMAIN, self.vm, self.seq, encode_request(name, payload))
        answer = self.api.handle_vm_frame(self.channel, sealed)
        message, _ = open_sealed(self.key, RESPONSE_DOMAIN, self.vm, answer)
        return decode_response(message)


# ------------------------------------------------------------------ the table


def test_every_fm_api_command_is_handled_and_its_example_answered(api: Api) -> None:
    fm = {c.name for op, c in BY_NAME.items() if c.opcode >> 8 in (0x54, 0x56)}
    assert set(FMAPI_HANDLERS) == fm
    for name in sorted(fm):
        r = frame(api, name, EXAMPLES[BY_NAME[name].opcode][0])
        # the examples name LD 3 and slice 7, which need not exist: any firmware error is
        # fine, but never "not implemented" nor a response that does not fit its layout
        assert r.ok or r.error["code"] not in ("unsupported", "internal"), (name, r.error)


def test_the_module_does_not_import_the_pipeline_at_run_time() -> None:
    """firmware.api imports firmware.fmapi at its end: the reverse import would be circular."""
    code = "import sys, firmware.fmapi; assert 'firmware.api' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ------------------------------------------------------------------ LD info and allocations


def test_ld_info_is_the_device(api: Api) -> None:
    expected = {
        "memory_size": 64 * GiB,
        "ld_count": 16,
        "qos_telemetry_capability": {
            "egress_port_congestion": True,
            "temporary_throughput_reduction": False,
        },
    }
    assert direct(api, "GET_LD_INFO", {}) == expected
    assert ok(api, "GET_LD_INFO", {}) == expected


def test_ld_allocations_reflect_the_slices(api: Api, rm: ResourceManager) -> None:
    a1 = alloc(rm, "vm-a", memory=1 * GiB)
    a2 = alloc(rm, "vm-a", memory=512 * MiB)
    b = alloc(rm, "vm-b", memory=302 * MiB)  # 1.18 units: reported as 2 (rounded up)
    c = alloc(rm, "vm-c")  # no memory
    ka, kb, kc = key_of(a1), key_of(b), key_of(c)
    assert key_of(a2) == ka and len({ka, kb, kc}) == 3

    payload = {"start_ld_id": 0, "ld_allocation_list_limit": 255}
    got = direct(api, "GET_LD_ALLOCATIONS", payload)
    assert ok(api, "GET_LD_ALLOCATIONS", payload) == got
    assert got["number_ld"] == 16 and got["memory_granularity"] == UNIT
    r1 = [e["range_1_allocation_multiplier"] for e in got["ld_allocation_list"]]
    assert r1 == [{ka: 6, kb: 2}.get(i, 0) for i in range(16)]
    assert all(e["range_2_allocation_multiplier"] == 0 for e in got["ld_allocation_list"])

    tail = ok(api, "GET_LD_ALLOCATIONS", {"start_ld_id": 15, "ld_allocation_list_limit": 9})
    assert tail["start_ld_id"] == 15 and len(tail["ld_allocation_list"]) == 1
    one = ok(api, "GET_LD_ALLOCATIONS", {"start_ld_id": ka, "ld_allocation_list_limit": 1})
    assert one["ld_allocation_list"] == [got["ld_allocation_list"][ka]]

    rm.free(a2["id"])
    after = ok(api, "GET_LD_ALLOCATIONS", {"start_ld_id": ka, "ld_allocation_list_limit": 1})
    assert after["ld_allocation_list"][0]["range_1_allocation_multiplier"] == 4
    refused(
        api,
        "GET_LD_ALLOCATIONS",
        {"start_ld_id": 16, "ld_allocation_list_limit": 1},
        "invalid",
        "start_ld_id",
    )


def test_a_vm_reads_only_its_own_ld(api: Api, rm: ResourceManager, tmp_path: Path) -> None:
    a = alloc(rm, "vm-a", memory=1 * GiB, g=10_000)
    b = alloc(rm, "vm-b", memory=1 * GiB)
    ka, kb = key_of(a), key_of(b)
    assert kb == ka + 1
    vm = VmClient(api, "vm-a", tmp_path)
    before = snapshot(rm)

    # its own LD, even when the limit reaches past it: the list stops at the next LD
    r = vm.call("GET_LD_ALLOCATIONS", {"start_ld_id": ka, "ld_allocation_list_limit": 16})
    assert r.ok, r.error
    assert r.payload["ld_allocation_list"] == [
        {"range_1_allocation_multiplier": 4, "range_2_allocation_multiplier": 0}
    ]
    assert direct(
        api, "GET_LD_ALLOCATIONS", {"start_ld_id": ka, "ld_allocation_list_limit": 16}, vm.channel
    ) == r.payload  # fmt: skip
    r = vm.call("GET_QOS_ALLOCATED_BW", {"number_ld": 1, "start_ld_id": ka})
    assert r.ok and r.payload["qos_allocation_fraction"] == [25]  # 10 of 100 Gbit/s
    r = vm.call("GET_QOS_BW_LIMIT", {"number_ld": 1, "start_ld_id": ka})
    assert r.ok and r.payload["qos_limit_fraction"] == [255]  # no maximum

    # another VM's LD and an LD nobody holds get the same answer: denied
    for start in (kb, 9):
        r = vm.call("GET_LD_ALLOCATIONS", {"start_ld_id": start, "ld_allocation_list_limit": 1})
        assert r.error["code"] == "denied" and r.error["details"]["field"] == "start_ld_id"
        for name in ("GET_QOS_ALLOCATED_BW", "GET_QOS_BW_LIMIT"):
            r = vm.call(name, {"number_ld": 1, "start_ld_id": start})
            assert r.error["code"] == "denied", (name, r.error)
    r = vm.call("GET_QOS_ALLOCATED_BW", {"number_ld": 2, "start_ld_id": ka})  # ka and kb
    assert r.error["code"] == "denied" and r.error["details"]["field"] == "number_ld"
    with pytest.raises(SlicefabError) as e:
        direct(api, "GET_QOS_BW_LIMIT", {"number_ld": 1, "start_ld_id": kb}, vm.channel)
    assert e.value.code == "denied"

    # the administrator's commands: refused on the mailbox, and by the handlers themselves
    for name in ("GET_LD_INFO", "SET_QOS_ALLOCATED_BW", "INITIATE_DC_ADD", "GET_QOS_STATUS"):
        r = vm.call(name, EXAMPLES[BY_NAME[name].opcode][0])
        assert r.error["code"] == "opcode_not_allowed", (name, r.error)
    for name in sorted(FMAPI_HANDLERS):
        if BY_NAME[name].allowed(Role.VM):
            continue
        with pytest.raises(SlicefabError) as e:
            direct(api, name, EXAMPLES[BY_NAME[name].opcode][0], vm.channel)
        assert e.value.code == "denied", name
    assert snapshot(rm) == before


def test_set_ld_allocations_resizes_the_ld_s_memory_slice(api: Api, rm: ResourceManager) -> None:
    a = alloc(rm, "vm-a", memory=1 * GiB)
    b = alloc(rm, "vm-b", memory=512 * MiB)
    ka, kb = key_of(a), key_of(b)

    def entry(units: int) -> dict[str, int]:
        return {"range_1_allocation_multiplier": units, "range_2_allocation_multiplier": 0}

    got = ok(api, "SET_LD_ALLOCATIONS", {"start_ld_id": ka, "ld_allocation_list": [entry(6)]})
    assert got == {"start_ld_id": ka, "ld_allocation_list": [entry(6)]}
    assert rm.get(a["id"])["spec"]["memory"]["size"] == 6 * UNIT
    assert sum(n for _, n in granules(rm, a["id"])) == 6 * UNIT // G
    got = direct(api, "SET_LD_ALLOCATIONS", {"start_ld_id": ka, "ld_allocation_list": [entry(1)]})
    assert got["ld_allocation_list"] == [entry(1)]
    assert granules(rm, a["id"]) == [[a["alloc"]["extents"][0][0], UNIT // G]]  # the head kept

    # a whole table written back with one entry changed changes only that LD
    table = ok(api, "GET_LD_ALLOCATIONS", {"start_ld_id": 0, "ld_allocation_list_limit": 16})
    entries = table["ld_allocation_list"]
    entries[kb] = entry(4)
    a_before = rm.get(a["id"])
    got = ok(api, "SET_LD_ALLOCATIONS", {"start_ld_id": 0, "ld_allocation_list": entries})
    assert got["ld_allocation_list"] == entries
    assert rm.get(a["id"]) == a_before
    assert rm.get(b["id"])["spec"]["memory"]["size"] == 1 * GiB


def test_set_ld_allocations_refusals_change_nothing(api: Api, rm: ResourceManager) -> None:
    a = alloc(rm, "vm-a", memory=1 * GiB)
    alloc(rm, "vm-a", memory=1 * GiB)
    b = alloc(rm, "vm-b", memory=1 * GiB)
    c = alloc(rm, "vm-c")  # no memory
    ka, kb, kc = key_of(a), key_of(b), key_of(c)
    free = next(k for k in range(16) if k not in (ka, kb, kc))

    def one(ld: int, r1: int, r2: int = 0) -> dict[str, Any]:
        return {
            "start_ld_id": ld,
            "ld_allocation_list": [
                {"range_1_allocation_multiplier": r1, "range_2_allocation_multiplier": r2}
            ],
        }

    f1 = "ld_allocation_list[0].range_1_allocation_multiplier"
    for payload, code, field in (
        (one(kb, 4, 1), "invalid", "ld_allocation_list[0].range_2_allocation_multiplier"),
        (one(ka, 4), "invalid", "ld_allocation_list[0]"),  # two slices with memory
        (one(kc, 4), "invalid", "ld_allocation_list[0]"),  # no slice with memory
        (one(free, 4), "not_found", f1),
        (one(kb, 0), "invalid", f1),
        (one(kb, 257), "invalid", f1),  # more than the device's 64 GiB
        (one(16, 1), "invalid", "start_ld_id"),
        ({**one(15, 0), "ld_allocation_list": one(15, 0)["ld_allocation_list"] * 2},
         "invalid", "ld_allocation_list"),
        (one(kb, 250), "insufficient", None),  # 62.5 GiB: 3 GiB are held already
    ):  # fmt: skip
        refused(api, "SET_LD_ALLOCATIONS", payload, code, field)
    # the entries of LDs that read the same are no-ops, so the bad entry alone is refused
    assert rm.get(b["id"])["spec"]["memory"]["size"] == 1 * GiB


def test_set_ld_allocations_is_all_or_nothing(api: Api, rm: ResourceManager) -> None:
    a = alloc(rm, "vm-a", memory=512 * MiB)
    b = alloc(rm, "vm-b", memory=512 * MiB, contiguous=True)  # right after a
    alloc(rm, "vm-c", memory=1 * GiB, contiguous=True)  # right after b: b cannot grow
    ka, kb = key_of(a), key_of(b)
    assert kb == ka + 1
    entries = [{"range_1_allocation_multiplier": 4, "range_2_allocation_multiplier": 0}] * 2
    before = snapshot(rm)
    r = frame(api, "SET_LD_ALLOCATIONS", {"start_ld_id": ka, "ld_allocation_list": entries})
    assert r.error["code"] == "insufficient"  # a grew first, then b could not: a shrank back
    assert snapshot(rm) == before


def test_set_ld_allocations_respects_the_granule(tmp_path: Path) -> None:
    toml = default_device_path().read_text().replace('granule = "2 MiB"', 'granule = "2 GiB"')
    assert '"2 GiB"' in toml
    (tmp_path / "dev.toml").write_text(toml)
    state = StateDir(tmp_path / "state")
    rm = open_manager(state, tmp_path / "dev.toml")
    try:
        api = Api(rm, rm.vms)
        a = alloc(rm, "vm-a", memory=2 * GiB)
        ka = key_of(a)
        got = direct(api, "GET_LD_ALLOCATIONS", {"start_ld_id": ka, "ld_allocation_list_limit": 1})
        assert got["memory_granularity"] == GiB  # no CXL unit is a whole number of granules
        assert got["ld_allocation_list"][0]["range_1_allocation_multiplier"] == 2

        def entry(units: int) -> dict[str, Any]:
            return {
                "start_ld_id": ka,
                "ld_allocation_list": [
                    {"range_1_allocation_multiplier": units, "range_2_allocation_multiplier": 0}
                ],
            }

        before = snapshot(rm)
        with pytest.raises(SlicefabError) as e:
            direct(api, "SET_LD_ALLOCATIONS", entry(3))  # 3 GiB: not a multiple of 2 GiB
        assert e.value.code == "invalid"
        assert e.value.details["field"] == "ld_allocation_list[0].range_1_allocation_multiplier"
        assert snapshot(rm) == before
        direct(api, "SET_LD_ALLOCATIONS", entry(4))
        assert rm.get(a["id"])["spec"]["memory"]["size"] == 4 * GiB
        assert rm.check_invariants() == []
    finally:
        rm.close()
        state.unlock()


# ------------------------------------------------------------------ QoS bandwidth


def test_set_qos_allocated_bw_programs_the_guarantees(api: Api, rm: ResourceManager) -> None:
    a = alloc(rm, "vm-a", g=10_000, prio=2)
    b1 = alloc(rm, "vm-b", g=10_000)
    b2 = alloc(rm, "vm-b", g=30_000)
    c1, c2 = alloc(rm, "vm-c"), alloc(rm, "vm-c")
    ka, kb, kc = key_of(a), key_of(b1), key_of(c1)
    assert (
        b1["alloc"]["ports"] == b2["alloc"]["ports"]
        and c1["alloc"]["ports"] == c2["alloc"]["ports"]
    )  # a VM's slices share its port
    (pa,) = a["alloc"]["ports"]
    read = {"number_ld": 3, "start_ld_id": ka}
    assert (ka, kb, kc) == (ka, ka + 1, ka + 2)
    got = direct(api, "GET_QOS_ALLOCATED_BW", read)
    assert ok(api, "GET_QOS_ALLOCATED_BW", read) == got
    assert got["qos_allocation_fraction"] == [25, 102, 0]  # 10, 40 and 0 of 100 Gbit/s

    got = ok(api, "SET_QOS_ALLOCATED_BW",
             {"start_ld_id": ka, "qos_allocation_fraction": [51, 128, 64]})  # fmt: skip
    assert got == {"start_ld_id": ka, "qos_allocation_fraction": [51, 128, 64]}
    assert rm.get(a["id"])["spec"]["qos"]["guaranteed"] == 19_922  # ⌈51 × 100000 / 256⌉
    weight = port_register(rm, pa, regmap.PORT_WEIGHT_OFFSET) & regmap.PORT_WEIGHT_WEIGHT_MASK
    assert weight == weight_for(2, 19_922, CAP) != weight_for(2, 10_000, CAP)
    # vm-b's slices keep their 1:3 split of 50 Gbit/s; vm-c's, guaranteeing nothing, halve it
    assert [rm.get(s["id"])["spec"]["qos"]["guaranteed"] for s in (b1, b2, c1, c2)] == [
        12_500, 37_500, 12_500, 12_500,
    ]  # fmt: skip
    assert ok(api, "GET_QOS_ALLOCATED_BW", read)["qos_allocation_fraction"] == [51, 128, 64]

    direct(api, "SET_QOS_ALLOCATED_BW", {"start_ld_id": kc, "qos_allocation_fraction": [0]})
    assert [rm.get(s["id"])["spec"]["qos"]["guaranteed"] for s in (c1, c2)] == [0, 0]


def test_set_qos_bw_limit_programs_the_token_buckets(api: Api, rm: ResourceManager) -> None:
    a = alloc(rm, "vm-a")
    b1, b2 = alloc(rm, "vm-b", mx=50_000), alloc(rm, "vm-b", mx=50_000)
    ka, kb = key_of(a), key_of(b1)
    (pa,), (pb,) = a["alloc"]["ports"], b1["alloc"]["ports"]
    clock = rm.device.crossbar.clock_mhz
    read = {"number_ld": 2, "start_ld_id": ka}
    assert kb == ka + 1
    got = direct(api, "GET_QOS_BW_LIMIT", read)
    assert ok(api, "GET_QOS_BW_LIMIT", read) == got
    assert got["qos_limit_fraction"] == [255, 255]  # no maximum; 2 × 50 Gbit/s = the port
    assert port_register(rm, pa, regmap.PORT_TB_RATE_OFFSET) == rate_for(CAP, clock)

    got = ok(api, "SET_QOS_BW_LIMIT", {"start_ld_id": ka, "qos_limit_fraction": [64, 64]})
    assert got["qos_limit_fraction"] == [64, 64]
    assert rm.get(a["id"])["spec"]["qos"]["maximum"] == 25_000
    assert port_register(rm, pa, regmap.PORT_TB_RATE_OFFSET) == rate_for(25_000, clock)
    # two slices on vm-b's port share the limit: 12.5 Gbit/s each, 25 on the bucket
    assert [rm.get(s["id"])["spec"]["qos"]["maximum"] for s in (b1, b2)] == [12_500, 12_500]
    assert port_register(rm, pb, regmap.PORT_TB_RATE_OFFSET) == rate_for(25_000, clock)
    assert ok(api, "GET_QOS_BW_LIMIT", read)["qos_limit_fraction"] == [64, 64]

    direct(api, "SET_QOS_BW_LIMIT", {"start_ld_id": ka, "qos_limit_fraction": [255]})
    assert rm.get(a["id"])["spec"]["qos"]["maximum"] == 0  # no maximum again
    assert port_register(rm, pa, regmap.PORT_TB_RATE_OFFSET) == rate_for(CAP, clock)


def test_qos_refusals_change_nothing(api: Api, rm: ResourceManager) -> None:
    a = alloc(rm, "vm-a", g=10_000, mx=20_000)
    n = alloc(rm, "vm-n", ports=0)  # no crossbar port
    ka, kn = key_of(a), key_of(n)
    free = next(k for k in range(16) if k not in (ka, kn))

    def qa(ld: int, *f: int) -> dict[str, Any]:
        return {"start_ld_id": ld, "qos_allocation_fraction": list(f)}

    def ql(ld: int, *f: int) -> dict[str, Any]:
        return {"start_ld_id": ld, "qos_limit_fraction": list(f)}

    for name, payload, code, field in (
        ("SET_QOS_ALLOCATED_BW", qa(ka, 128), "invalid", "qos_allocation_fraction[0]"),  # > max
        ("SET_QOS_ALLOCATED_BW", qa(kn, 10), "invalid", "qos_allocation_fraction[0]"),
        ("SET_QOS_ALLOCATED_BW", qa(free, 10), "not_found", "qos_allocation_fraction[0]"),
        ("SET_QOS_ALLOCATED_BW", qa(15, 0, 0), "invalid", "qos_allocation_fraction"),
        ("SET_QOS_BW_LIMIT", ql(ka, 10), "invalid", "qos_limit_fraction[0]"),  # < guarantee
        ("SET_QOS_BW_LIMIT", ql(ka, 0), "invalid", "qos_limit_fraction[0]"),
        ("SET_QOS_BW_LIMIT", ql(kn, 64), "invalid", "qos_limit_fraction[0]"),
        ("SET_QOS_BW_LIMIT", ql(free, 64), "not_found", "qos_limit_fraction[0]"),
        ("SET_QOS_BW_LIMIT", ql(16), "invalid", "start_ld_id"),
        ("GET_QOS_BW_LIMIT", {"number_ld": 2, "start_ld_id": 15}, "invalid", "number_ld"),
    ):
        refused(api, name, payload, code, field)

    # what the GETs report, written back whole, is accepted and changes nothing
    before = snapshot(rm)
    for kind, key in (("ALLOCATED_BW", "qos_allocation_fraction"),
                      ("BW_LIMIT", "qos_limit_fraction")):  # fmt: skip
        get, put = f"GET_QOS_{kind}", f"SET_QOS_{kind}"
        table = ok(api, get, {"number_ld": 16, "start_ld_id": 0})
        assert ok(api, put, {"start_ld_id": 0, key: table[key]}) == table
    assert snapshot(rm) == before


def test_a_qos_set_that_fails_part_way_is_undone(
    api: Api, rm: ResourceManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = alloc(rm, "vm-a"), alloc(rm, "vm-b")
    ka = key_of(a)
    assert key_of(b) == ka + 1
    real = rm.resize
    calls: list[int] = []

    def failing_second(error: SlicefabError, *, recorded: bool) -> Any:
        def resize(slice_id: int, rs: Any, **kw: Any) -> Any:
            calls.append(slice_id)
            if len(calls) == 2:
                if recorded:  # FabricError: the resize stays recorded in the ledger
                    real(slice_id, rs, **kw)
                raise error
            return real(slice_id, rs, **kw)

        return resize

    payload = {"start_ld_id": ka, "qos_limit_fraction": [64, 64]}
    for error, recorded in (
        (InsufficientResources("bandwidth", 1, 0), False),
        (FabricError("the crossbar refused"), True),
    ):
        calls.clear()
        before = snapshot(rm)
        monkeypatch.setattr(rm, "resize", failing_second(error, recorded=recorded))
        r = frame(api, "SET_QOS_BW_LIMIT", payload)
        assert r.error["code"] == error.code
        assert calls == [a["id"], b["id"], *([b["id"]] if recorded else []), a["id"]]
        monkeypatch.setattr(rm, "resize", real)
        assert snapshot(rm) == before


# ------------------------------------------------------------------ QoS control and status


def test_qos_control_is_static(api: Api) -> None:
    assert direct(api, "GET_QOS_CONTROL", {}) == QOS_CONTROL
    assert ok(api, "GET_QOS_CONTROL", {}) == QOS_CONTROL
    assert ok(api, "SET_QOS_CONTROL", QOS_CONTROL) == QOS_CONTROL  # the same values: accepted
    telemetry = dict(QOS_CONTROL["qos_telemetry_control"])
    telemetry["temporary_throughput_reduction_enable"] = True
    for payload, field in (
        ({**QOS_CONTROL, "egress_moderate_percentage": 60}, "egress_moderate_percentage"),
        ({**QOS_CONTROL, "recmpbasis": 1000}, "recmpbasis"),
        ({**QOS_CONTROL, "qos_telemetry_control": telemetry},
         "qos_telemetry_control.temporary_throughput_reduction_enable"),
    ):  # fmt: skip
        refused(api, "SET_QOS_CONTROL", payload, "invalid", field)


def test_qos_status_is_the_measured_token_bucket_backpressure(
    api: Api, rm: ResourceManager
) -> None:
    assert ok(api, "GET_QOS_STATUS", {}) == {"backpressure_avg_percentage": 0}  # no traffic
    alloc(rm, "vm-z")  # port 0: the traffic below uses other ports
    a = alloc(rm, "vm-a", ports=2, mx=1_000)  # 1 Gbit/s: its bucket stalls most cycles
    b = alloc(rm, "vm-b", ports=2)  # no maximum: no stalls
    model = rm.fabric.bus
    assert isinstance(model, CrossbarModel)
    for view in (a, b):
        src, dst = view["alloc"]["ports"]
        model.send(src, dst, bytes(4096), key=key_of(view))
    model.run_until_idle(100_000)
    flits = stalls = 0
    for port in range(rm.device.crossbar.ports):
        flits += port_register_counter(rm, port, regmap.PORT_CNT_FLITS_OFFSET)
        stalls += port_register_counter(rm, port, regmap.PORT_CNT_STALLS_OFFSET)
    assert flits == 2 * 4096 // rm.device.crossbar.data_bytes and stalls > flits
    expected = {"backpressure_avg_percentage": 100 * stalls // (flits + stalls)}
    assert direct(api, "GET_QOS_STATUS", {}) == expected
    assert ok(api, "GET_QOS_STATUS", {}) == expected
    assert 50 < expected["backpressure_avg_percentage"] < 100


def port_register_counter(rm: ResourceManager, port: int, offset: int) -> int:
    return int(rm.fabric.bus.read(regmap.port_reg(port, offset)))


# ------------------------------------------------------------------ Dynamic Capacity


def dc_add(
    view: Mapping[str, Any], policy: str, length: int, extents: Sequence[tuple[int, int]] = ()
) -> dict[str, Any]:
    tag = slice_tag(view["id"])
    return {
        "host_id": key_of(view),
        "selection_policy": policy,
        "region_number": 0,
        "length": length,
        "tag": tag,
        "extents": [
            {"start_dpa": s * G, "length": n * G, "tag": tag, "shared_seq": 0} for s, n in extents
        ],
    }


def dc_release(
    view: Mapping[str, Any],
    length: int,
    extents: Sequence[tuple[int, int]] = (),
    *,
    forced: bool = False,
    sanitize: bool = False,
) -> dict[str, Any]:
    tag = slice_tag(view["id"])
    return {
        "host_id": key_of(view),
        "flags": {
            "removal_policy": "prescriptive" if extents else "tag_based",
            "forced_removal": forced,
            "sanitize_on_release": sanitize,
        },
        "length": length,
        "tag": tag,
        "extents": [
            {"start_dpa": s * G, "length": n * G, "tag": tag, "shared_seq": 0} for s, n in extents
        ],
    }


def test_dc_add_and_release_change_memory_by_exactly_the_extents(
    api: Api, rm: ResourceManager
) -> None:
    a = alloc(rm, "vm-a", memory=512 * MiB)
    sid = a["id"]
    assert granules(rm, sid) == [[0, 256]]
    assert ok(api, "INITIATE_DC_ADD", dc_add(a, "free", 256 * MiB)) == {}
    assert granules(rm, sid) == [[0, 384]]  # grown in place
    assert direct(api, "INITIATE_DC_ADD", dc_add(a, "contiguous", 64 * MiB)) == {}
    assert granules(rm, sid) == [[0, 416]]
    b = alloc(rm, "vm-b", memory=G)  # right after vm-a's slice: no more growth in place
    assert granules(rm, b["id"]) == [[416, 1]]
    ok(api, "INITIATE_DC_ADD", dc_add(a, "contiguous", 10 * G))
    assert granules(rm, sid) == [[0, 416], [417, 10]]  # one new extent: the best fit
    ok(api, "INITIATE_DC_ADD", dc_add(a, "prescriptive", 4 * G, [(427, 4)]))
    assert granules(rm, sid) == [[0, 416], [417, 14]]  # exactly the extent asked
    ok(api, "INITIATE_DC_ADD", dc_add(a, "prescriptive", 0, [(431, 1), (432, 1)]))
    assert granules(rm, sid) == [[0, 416], [417, 16]]
    assert rm.get(sid)["spec"]["memory"]["size"] == 432 * G

    assert ok(api, "INITIATE_DC_RELEASE", dc_release(a, 16 * G, sanitize=True)) == {}
    assert granules(rm, sid) == [[0, 416]]  # from the tail
    assert direct(api, "INITIATE_DC_RELEASE", dc_release(a, 0, [(400, 16)], forced=True)) == {}
    assert granules(rm, sid) == [[0, 400]]
    ok(api, "INITIATE_DC_RELEASE", dc_release(a, 20 * G, [(380, 20)]))
    assert granules(rm, sid) == [[0, 380]]
    assert rm.get(sid)["spec"]["memory"]["size"] == 380 * G
    assert rm.allocator.memory.free_granules == rm.device.granules - 381


def test_dc_refusals_change_nothing(api: Api, rm: ResourceManager) -> None:
    a = alloc(rm, "vm-a", memory=512 * MiB)  # granules 0..255
    b = alloc(rm, "vm-b", memory=G, contiguous=True)  # granule 256: vm-a cannot grow in place
    alloc(rm, "vm-c", memory=G)  # granule 257: nor can vm-b (contiguous: only in place)
    n = alloc(rm, "vm-n")  # no memory
    good_tag = slice_tag(a["id"])
    for name, payload, code, field in (
        ("INITIATE_DC_ADD", {**dc_add(a, "free", G), "region_number": 1}, "invalid",
         "region_number"),
        ("INITIATE_DC_ADD", dc_add(a, "enable_shared_access", G), "invalid", "selection_policy"),
        ("INITIATE_DC_ADD", {**dc_add(a, "free", G), "tag": good_tag[:8] + b"\x01" * 8},
         "invalid", "tag"),
        ("INITIATE_DC_ADD", {**dc_add(a, "free", G), "tag": slice_tag(999)}, "not_found", None),
        ("INITIATE_DC_ADD", {**dc_add(a, "free", G), "host_id": key_of(a) + 5}, "invalid",
         "host_id"),
        ("INITIATE_DC_ADD", dc_add(n, "free", G), "invalid", "tag"),
        ("INITIATE_DC_ADD", dc_add(a, "free", 3 * MiB), "invalid", "length"),
        ("INITIATE_DC_ADD", dc_add(a, "free", 0), "invalid", "length"),
        ("INITIATE_DC_ADD", dc_add(a, "free", G, [(257, 1)]), "invalid", "extents"),
        ("INITIATE_DC_ADD", dc_add(a, "prescriptive", G), "invalid", "extents"),
        ("INITIATE_DC_ADD", dc_add(a, "prescriptive", G, [(1000, 1)]), "invalid", "extents"),
        ("INITIATE_DC_ADD", dc_add(a, "prescriptive", G, [(256, 1)]), "conflict", "extents"),
        ("INITIATE_DC_ADD", dc_add(a, "prescriptive", 2 * G, [(256, 1)]), "invalid", "length"),
        ("INITIATE_DC_ADD", dc_add(a, "prescriptive", 0, [(256, 2), (257, 1)]), "invalid",
         "extents"),  # overlapping
        ("INITIATE_DC_ADD", dc_add(b, "contiguous", G), "insufficient", "length"),
        ("INITIATE_DC_RELEASE", dc_release(a, 512 * MiB), "invalid", "length"),  # all of it
        ("INITIATE_DC_RELEASE", dc_release(a, 0, [(0, 16)]), "invalid", "extents"),  # the head
        ("INITIATE_DC_RELEASE", {**dc_release(a, G), "host_id": 15}, "invalid", "host_id"),
        ("INITIATE_DC_RELEASE", dc_release(a, G + MiB), "invalid", "length"),
    ):  # fmt: skip
        refused(api, name, payload, code, field)

    with pytest.raises(SlicefabError, match="overlap"):
        direct(api, "INITIATE_DC_RELEASE", dc_release(a, 0, [(250, 6), (254, 2)]))

    def with_extent(**change: Any) -> dict[str, Any]:
        p = dc_add(a, "prescriptive", 0, [(256, 1)])
        p["extents"][0].update(change)
        return p

    for payload, field in (
        (with_extent(tag=slice_tag(999)), "extents[0].tag"),
        (with_extent(shared_seq=1), "extents[0].shared_seq"),
        (with_extent(start_dpa=256 * G + 4096), "extents[0].start_dpa"),
        (with_extent(length=G // 2), "extents[0].length"),
        (with_extent(start_dpa=rm.device.memory_bytes), "extents[0].start_dpa"),
    ):
        refused(api, "INITIATE_DC_ADD", payload, "invalid", field)


def test_dc_add_when_no_extent_is_long_enough(api: Api, rm: ResourceManager) -> None:
    a = alloc(rm, "vm-a", memory=G)  # granule 0
    b = alloc(rm, "vm-b", memory=(rm.device.granules - 8) * G, contiguous=True)  # 1..32760
    assert rm.allocator.memory.largest_free == 7
    refused(api, "INITIATE_DC_ADD", dc_add(a, "contiguous", 8 * G), "insufficient", "length")
    refused(api, "INITIATE_DC_ADD", dc_add(a, "free", 8 * G), "insufficient", None)
    refused(api, "INITIATE_DC_ADD", dc_add(b, "contiguous", 8 * G), "insufficient", "length")
    ok(api, "INITIATE_DC_ADD", dc_add(a, "contiguous", 7 * G))
    assert granules(rm, a["id"]) == [[0, 1], [rm.device.granules - 7, 7]]
