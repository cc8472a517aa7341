"""CrossbarModel: the register semantics of slicefab_xbar.rdl and the cycle-level datapath.

Addresses come from abi.regmap; expected numbers in the tests are worked out by hand from
the semantics in docs/abi/registers.md (a model that drifts from them must fail here).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import abi.regmap as rm
from abi.regmap import port_reg
from firmware.errors import FabricError
from firmware.fabric.bus import RegisterBus
from firmware.fabric.model import CrossbarModel, Packet

ONE_BYTE_PER_CYCLE = 1 << rm.PORT_TB_RATE_RATE_FRACWIDTH


def configure(
    m: CrossbarModel,
    port: int,
    *,
    outputs: tuple[int, ...] = (),
    keys: tuple[int, ...] = (0,),
    weight: int | None = None,
    rate: float | None = None,
    burst: int | None = None,
) -> None:
    """Write port's shadow registers (no commit). ``rate`` in bytes/cycle enables the limit."""
    width = rm.PORT_PERM_LO_ALLOWED_WIDTH
    lo = sum(1 << o for o in outputs if o < width)
    hi = sum(1 << (o - width) for o in outputs if o >= width)
    m.write(port_reg(port, rm.PORT_PERM_LO_OFFSET), lo)
    m.write(port_reg(port, rm.PORT_PERM_HI_OFFSET), hi)
    m.write(port_reg(port, rm.PORT_KEYS_OFFSET), sum(1 << k for k in keys))
    if weight is not None:
        m.write(port_reg(port, rm.PORT_WEIGHT_OFFSET), weight)
    if rate is not None:
        m.write(port_reg(port, rm.PORT_TB_RATE_OFFSET), round(rate * ONE_BYTE_PER_CYCLE))
        m.write(
            port_reg(port, rm.PORT_TB_BURST_OFFSET),
            (burst or 0) | rm.PORT_TB_BURST_ENABLE_MASK,
        )


def commit(m: CrossbarModel) -> None:
    m.write(rm.CTRL_OFFSET, rm.CTRL_COMMIT_MASK)


def gen(m: CrossbarModel) -> tuple[int, int]:
    """(GEN.committed, GEN.adopted)."""
    value = m.read(rm.GEN_OFFSET)
    return (
        (value & rm.GEN_COMMITTED_MASK) >> rm.GEN_COMMITTED_LSB,
        (value & rm.GEN_ADOPTED_MASK) >> rm.GEN_ADOPTED_LSB,
    )


def pending(m: CrossbarModel) -> bool:
    return bool(m.read(rm.STATUS_OFFSET) & rm.STATUS_PENDING_MASK)


def active_gen(m: CrossbarModel, port: int) -> int:
    return m.read(port_reg(port, rm.PORT_ACTIVE_GEN_OFFSET)) & rm.PORT_ACTIVE_GEN_GEN_MASK


def counters(m: CrossbarModel, port: int) -> dict[str, int]:
    return {
        name: m.read(port_reg(port, offset))
        for offset, name in rm.PORT_REGISTERS.items()
        if name.startswith("CNT_")
    }


def all_to_all(n_ports: int, data_bytes: int = 8, **kw: object) -> CrossbarModel:
    """A model where every input may reach every output with key 0, committed."""
    m = CrossbarModel(n_ports, data_bytes=data_bytes)
    for p in range(n_ports):
        configure(m, p, outputs=tuple(range(n_ports)), **kw)  # type: ignore[arg-type]
    commit(m)
    return m


# --- registers ----------------------------------------------------------------------------


def test_is_a_register_bus() -> None:
    assert isinstance(CrossbarModel(2), RegisterBus)


@pytest.mark.parametrize(
    ("n_ports", "n_keys", "data_bytes"), [(1, 1, 1), (4, 16, 64), (64, 8, 255)]
)
def test_identity_version_and_caps(n_ports: int, n_keys: int, data_bytes: int) -> None:
    m = CrossbarModel(n_ports, n_keys=n_keys, data_bytes=data_bytes)
    assert m.read(rm.ID_OFFSET) == 0x53465842
    assert m.read(rm.VERSION_OFFSET) == 0x0100
    assert m.read(rm.CAPS_OFFSET) == n_ports | n_keys << 8 | data_bytes << 16


@pytest.mark.parametrize(
    ("kwargs", "name", "limit"),
    [
        ({"n_ports": 0}, "n_ports", 64),
        ({"n_ports": 65}, "n_ports", 64),
        ({"n_ports": 2, "n_keys": 17}, "n_keys", 16),
        ({"n_ports": 2, "n_keys": 0}, "n_keys", 16),
        ({"n_ports": 2, "data_bytes": 256}, "data_bytes", 255),
    ],
)
def test_parameters_out_of_range_are_refused(kwargs: dict[str, int], name: str, limit: int) -> None:
    with pytest.raises(FabricError, match=rf"{name}=.* 1\.\.{limit}") as err:
        CrossbarModel(**kwargs)
    assert err.value.details["limit"] == limit


def test_every_register_reads_its_reset_value() -> None:
    m = CrossbarModel(3)
    assert m.read(rm.GEN_OFFSET) == rm.GEN_RESET == 0
    assert m.read(rm.STATUS_OFFSET) == rm.STATUS_RESET == 0
    assert m.read(rm.CTRL_OFFSET) == 0
    for port in range(3):
        for offset, name in rm.PORT_REGISTERS.items():
            assert m.read(port_reg(port, offset)) == getattr(rm, f"PORT_{name}_RESET"), name
    assert m.read(port_reg(2, rm.PORT_WEIGHT_OFFSET)) == 1


@pytest.mark.parametrize(
    "addr",
    [
        0x018,  # after STATUS
        0x0FC,  # last word before the port array
        0x002,  # unaligned
        -4,
        port_reg(0, rm.PORT_ACTIVE_GEN_OFFSET) + 4,  # +0x1C, reserved
        port_reg(1, rm.PORT_CNT_STALLS_OFFSET) + 4,  # +0x30, reserved
        port_reg(1, 0) + rm.PORT_STRIDE - 4,  # +0x3C, reserved
        rm.ADDRMAP_SIZE,
    ],
)
def test_unmapped_addresses_fail_on_read_and_write(addr: int) -> None:
    m = CrossbarModel(4)
    with pytest.raises(FabricError) as err:
        m.read(addr)
    assert err.value.details["address"] == addr
    assert f"{addr:#06x}" in err.value.message
    with pytest.raises(FabricError):
        m.write(addr, 0)


def test_registers_of_missing_ports_fail_naming_port_and_limit() -> None:
    m = CrossbarModel(4)
    addr = port_reg(4, rm.PORT_WEIGHT_OFFSET)
    with pytest.raises(FabricError, match=r"port\[4\]\.WEIGHT.*ports 0\.\.3") as err:
        m.read(addr)
    assert err.value.details == {"address": addr, "register": "WEIGHT", "port": 4, "limit": 4}
    with pytest.raises(FabricError, match=r"port\[63\]"):
        m.write(port_reg(63, rm.PORT_WEIGHT_OFFSET), 1)
    m.read(port_reg(3, rm.PORT_WEIGHT_OFFSET))  # the last port exists


READ_ONLY = [
    *[(offset, None, name) for offset, name in rm.GLOBAL_REGISTERS.items() if name != "CTRL"],
    *[
        (offset, 1, name)
        for offset, name in rm.PORT_REGISTERS.items()
        if getattr(rm, f"PORT_{name}_ACCESS") == "r"
    ],
]


@pytest.mark.parametrize(("offset", "port", "name"), READ_ONLY)
def test_writes_to_read_only_registers_fail(offset: int, port: int | None, name: str) -> None:
    m = CrossbarModel(2)
    addr = offset if port is None else port_reg(port, offset)
    before = m.read(addr)
    with pytest.raises(FabricError, match=rf"{name}\)?: register is read-only") as err:
        m.write(addr, 0x1234)
    assert err.value.details["register"] == name
    assert err.value.details["port"] == port
    assert m.read(addr) == before


def test_read_only_set_is_the_rdl_one() -> None:
    # The parametrisation above must not be empty or miss a register.
    assert {name for _, _, name in READ_ONLY} == {
        "ID", "VERSION", "CAPS", "GEN", "STATUS",
        "ACTIVE_GEN", "CNT_PKTS", "CNT_FLITS", "CNT_DROPS", "CNT_STALLS",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("offset", "written", "read_back"),
    [
        (rm.PORT_WEIGHT_OFFSET, 0xFFFF_FFFF, 0xFF),
        (rm.PORT_WEIGHT_OFFSET, 0x1_05, 0x05),
        (rm.PORT_TB_RATE_OFFSET, 0xFFFF_FFFF, 0xFFFF_FFFF),
        (rm.PORT_TB_BURST_OFFSET, 0xFFFF_FFFF, 0x80FF_FFFF),
        (rm.PORT_TB_BURST_OFFSET, 0x7F00_0010, 0x0000_0010),
        (rm.PORT_KEYS_OFFSET, 0xFFFF_0003, 0x0003),  # bits above the field are reserved
        (rm.PORT_PERM_LO_OFFSET, 0x0000_0005, 0x0000_0005),
    ],
)
def test_writes_are_masked_to_the_fields(offset: int, written: int, read_back: int) -> None:
    m = CrossbarModel(4)
    m.write(port_reg(2, offset), written)
    assert m.read(port_reg(2, offset)) == read_back
    assert m.read(port_reg(1, offset)) == getattr(rm, f"PORT_{rm.PORT_REGISTERS[offset]}_RESET")


@pytest.mark.parametrize("value", [-1, 1 << 32])
def test_values_beyond_32_bits_are_refused(value: int) -> None:
    with pytest.raises(FabricError, match="not a 32-bit value"):
        CrossbarModel(2).write(port_reg(0, rm.PORT_WEIGHT_OFFSET), value)


def test_permission_bits_of_missing_outputs_are_refused() -> None:
    m = CrossbarModel(4)
    lo = port_reg(1, rm.PORT_PERM_LO_OFFSET)
    m.write(lo, 0b1111)
    with pytest.raises(FabricError, match=r"port\[1\]\.PERM_LO.*outputs \[4\].*0\.\.3") as err:
        m.write(lo, 0b1_0001)
    assert err.value.details["register"] == "PERM_LO"
    assert err.value.details["port"] == 1
    assert err.value.details["limit"] == 4
    assert m.read(lo) == 0b1111  # unchanged
    with pytest.raises(FabricError, match=r"PERM_HI.*outputs \[32\]"):
        m.write(port_reg(1, rm.PORT_PERM_HI_OFFSET), 1)

    wide = CrossbarModel(40)
    hi = port_reg(0, rm.PORT_PERM_HI_OFFSET)
    wide.write(hi, 0xFF)  # outputs 32..39
    with pytest.raises(FabricError, match=r"outputs \[40\]"):
        wide.write(hi, 0x1FF)


def test_key_bits_of_missing_keys_are_refused() -> None:
    m = CrossbarModel(2, n_keys=4)
    keys = port_reg(0, rm.PORT_KEYS_OFFSET)
    m.write(keys, 0xF)
    with pytest.raises(FabricError, match=r"port\[0\]\.KEYS.*keys \[4, 5\].*0\.\.3") as err:
        m.write(keys, 0x3F)
    assert err.value.details["limit"] == 4
    assert m.read(keys) == 0xF


def test_image_holds_every_shadow_register() -> None:
    m = CrossbarModel(3)
    configure(m, 2, outputs=(0, 1), keys=(3,), weight=7, rate=1.5, burst=100)
    image = m.image()
    shadow_offsets = [
        o for o, n in rm.PORT_REGISTERS.items() if getattr(rm, f"PORT_{n}_ACCESS") == "rw"
    ]
    assert len(shadow_offsets) == 6
    assert set(image) == {port_reg(p, o) for p in range(3) for o in shadow_offsets}
    assert all(m.read(addr) == value for addr, value in image.items())
    assert image[port_reg(2, rm.PORT_WEIGHT_OFFSET)] == 7
    assert image[port_reg(2, rm.PORT_TB_BURST_OFFSET)] == 100 | rm.PORT_TB_BURST_ENABLE_MASK


# --- commit, generations ------------------------------------------------------------------


def test_shadow_is_not_in_service_until_commit() -> None:
    m = CrossbarModel(2, data_bytes=4)
    configure(m, 0, outputs=(1,))
    assert m.read(port_reg(0, rm.PORT_PERM_LO_OFFSET)) == 0b10  # reads the shadow
    m.send(0, 1, b"early")
    m.run_until_idle(10)
    assert [p.generation for p in m.dropped(0)] == [0]  # reset config: nothing permitted
    commit(m)
    assert (gen(m), pending(m), active_gen(m, 0)) == ((1, 1), False, 1)  # idle: adopted at once
    m.send(0, 1, b"late")
    m.run_until_idle(10)
    assert [(p.payload, p.generation) for p in m.delivered(1)] == [(b"late", 1)]


def test_generation_wraps_at_16_bits() -> None:
    m = CrossbarModel(1)
    for _ in range(0xFFFF):
        commit(m)
    assert gen(m) == (0xFFFF, 0xFFFF)
    commit(m)
    assert gen(m) == (0, 0)
    assert active_gen(m, 0) == 0


def test_packet_in_flight_finishes_under_its_generation() -> None:
    m = all_to_all(2, data_bytes=4)  # generation 1
    m.send(0, 1, bytes(range(40)))  # 10 flits: cycles 0..9
    m.send(0, 1, b"next")
    m.step(3)
    configure(m, 0, outputs=())  # revoke everything
    configure(m, 1, outputs=(0,))
    commit(m)  # generation 2
    assert gen(m) == (2, 1)
    assert pending(m)
    assert (active_gen(m, 0), active_gen(m, 1)) == (1, 2)  # port 1 was idle
    m.step(6)  # cycles 3..8: the last flit has not moved yet
    assert pending(m) and active_gen(m, 0) == 1
    m.step(1)  # cycle 9: last flit, then adoption
    assert not pending(m)
    assert gen(m) == (2, 2) and active_gen(m, 0) == 2
    m.run_until_idle(10)
    [packet] = m.delivered(1)
    assert (packet.payload, packet.generation) == (bytes(range(40)), 1)
    assert (packet.first_cycle, packet.last_cycle) == (0, 9)
    assert [(p.payload, p.generation, p.first_cycle) for p in m.dropped(0)] == [(b"next", 2, 10)]


def test_commit_stages_a_snapshot_of_the_shadow() -> None:
    m = all_to_all(3, data_bytes=4)
    m.send(0, 1, bytes(20))  # 5 flits
    m.step()
    configure(m, 0, outputs=(2,))
    commit(m)  # staged for port 0: only output 2
    configure(m, 0, outputs=(1,))  # written after the commit: belongs to the next one
    m.send(0, 1, b"to 1")
    m.send(0, 2, b"to 2")
    m.run_until_idle(50)
    assert [p.payload for p in m.delivered(1)] == [bytes(20)]
    assert [(p.payload, p.generation) for p in m.delivered(2)] == [(b"to 2", 2)]
    assert [(p.payload, p.generation) for p in m.dropped(0)] == [(b"to 1", 2)]


def test_a_commit_after_a_staged_snapshot_was_adopted_takes_the_newer_shadow() -> None:
    """A commit re-decodes only the ports whose shadow changed since they adopted it: a
    port that adopted a staged snapshot while its shadow moved on must not count as up
    to date."""
    m = all_to_all(3, data_bytes=4)
    m.send(0, 1, bytes(20))  # 5 flits
    m.step()
    configure(m, 0, outputs=(2,))
    commit(m)  # generation 2, staged for port 0
    configure(m, 0, outputs=(1,))  # the shadow moves on
    m.run_until_idle(50)  # port 0 adopts the snapshot: output 2 only
    assert m.active_config(0).permitted_outputs == 0b100
    commit(m)  # generation 3: no write since, yet port 0 must now run the newer shadow
    assert m.active_config(0).permitted_outputs == 0b010
    m.send(0, 1, b"to 1")
    m.run_until_idle(50)
    assert [(p.payload, p.generation) for p in m.delivered(1)][-1] == (b"to 1", 3)


def test_a_second_commit_supersedes_a_staged_one() -> None:
    m = all_to_all(2, data_bytes=4)
    m.send(0, 1, bytes(40))
    m.step()
    configure(m, 0, outputs=())
    commit(m)
    configure(m, 0, outputs=(0,))
    commit(m)
    assert gen(m) == (3, 1)
    m.send(0, 0, b"ok")
    m.run_until_idle(50)
    assert active_gen(m, 0) == 3
    assert [(p.payload, p.generation) for p in m.delivered(0)] == [(b"ok", 3)]


def test_adopted_is_the_oldest_active_generation() -> None:
    m = all_to_all(3, data_bytes=4)  # generation 1
    m.send(0, 2, bytes(4 * 8))  # cycles 0..7
    m.step()
    commit(m)  # 2: ports 1, 2 adopt, port 0 lags
    m.send(1, 1, bytes(4 * 12))  # cycles 1..12
    m.step()
    commit(m)  # 3: port 1 now lags too, at 2
    assert [active_gen(m, p) for p in range(3)] == [1, 2, 3]
    assert gen(m) == (3, 1)
    m.step(6)  # cycles 2..7: port 0 done
    assert [active_gen(m, p) for p in range(3)] == [3, 2, 3]
    assert gen(m) == (3, 2) and pending(m)
    m.run_until_idle(20)
    assert gen(m) == (3, 3) and not pending(m)


def test_waiting_head_packet_is_checked_again_after_a_commit() -> None:
    m = all_to_all(3, data_bytes=4)
    m.send(0, 2, bytes(40))  # holds output 2 for cycles 0..9
    m.step()
    m.send(1, 2, b"waits")  # requests output 2, not granted: not started
    m.step(2)
    configure(m, 1, outputs=(0, 1))  # output 2 no longer allowed for input 1
    commit(m)
    assert active_gen(m, 1) == 2  # at a packet boundary: adopted at once
    m.run_until_idle(20)
    assert [p.src for p in m.delivered(2)] == [0]
    assert [(p.payload, p.generation) for p in m.dropped(1)] == [(b"waits", 2)]


def test_clear_counters() -> None:
    m = all_to_all(2, data_bytes=4)
    m.send(0, 1, bytes(9))
    m.send(1, 1, b"x", key=1)  # key 1 not permitted
    m.run_until_idle(20)
    assert counters(m, 0) == {"CNT_PKTS": 1, "CNT_FLITS": 3, "CNT_DROPS": 0, "CNT_STALLS": 0}
    assert counters(m, 1) == {"CNT_PKTS": 0, "CNT_FLITS": 0, "CNT_DROPS": 1, "CNT_STALLS": 0}
    m.write(rm.CTRL_OFFSET, rm.CTRL_CLEAR_COUNTERS_MASK)
    assert counters(m, 0) == counters(m, 1) == dict.fromkeys(counters(m, 0), 0)
    assert gen(m) == (1, 1)  # clear alone does not commit


def test_counters_wrap_at_32_bits() -> None:
    m = all_to_all(2, data_bytes=4)
    m._inputs[0].counters[rm.PORT_CNT_PKTS_OFFSET] = 0xFFFF_FFFF  # white-box: 2^32 packets
    m._inputs[0].counters[rm.PORT_CNT_FLITS_OFFSET] = 0xFFFF_FFFE
    m.send(0, 1, bytes(12))
    m.run_until_idle(10)
    assert counters(m, 0)["CNT_PKTS"] == 0
    assert counters(m, 0)["CNT_FLITS"] == 1


# --- routing and drops --------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 8, 9, 64, 65])
def test_packets_arrive_whole_at_their_destination(length: int) -> None:
    m = all_to_all(4)
    payload = bytes((i * 7) % 256 for i in range(length))
    seq = m.send(3, 1, payload)
    cycles = m.run_until_idle(100)
    flits = -(-length // 8)
    assert cycles == flits
    [p] = m.delivered(1)
    assert p == Packet(seq, 3, 1, 0, payload, 1, 0, flits - 1)
    assert all(not m.delivered(d) for d in (0, 2, 3))
    assert counters(m, 3) == {"CNT_PKTS": 1, "CNT_FLITS": flits, "CNT_DROPS": 0, "CNT_STALLS": 0}


@pytest.mark.parametrize(
    ("dest", "key", "why"),
    [
        (2, 0, "output not permitted"),
        (1, 1, "key not permitted"),
        (3, 0, "output beyond n_ports"),
        (1, 3, "key beyond n_keys"),
    ],
)
def test_forbidden_packets_are_dropped_whole(dest: int, key: int, why: str) -> None:
    m = CrossbarModel(3, n_keys=3, data_bytes=4)
    configure(m, 0, outputs=(0, 1), keys=(0, 2))
    commit(m)
    m.send(0, dest, bytes(10), key=key)  # 3 flits, drained in cycles 0..2
    m.send(0, 1, b"after", key=2)
    m.run_until_idle(20)
    [dropped] = m.dropped(0)
    assert (dropped.dest, dropped.key, dropped.generation) == (dest, key, 1), why
    assert (dropped.first_cycle, dropped.last_cycle) == (0, 2), why
    assert [(p.payload, p.first_cycle) for p in m.delivered(1)] == [(b"after", 3)]
    assert not m.delivered(0) and not m.delivered(2)
    assert counters(m, 0) == {"CNT_PKTS": 1, "CNT_FLITS": 2, "CNT_DROPS": 1, "CNT_STALLS": 0}


def test_outputs_work_in_parallel_and_back_to_back() -> None:
    m = all_to_all(3, data_bytes=4)
    m.send(0, 1, bytes(8))
    m.send(1, 2, bytes(8))
    m.send(2, 1, bytes(8))
    m.run_until_idle(10)
    assert [(p.src, p.first_cycle, p.last_cycle) for p in m.delivered(1)] == [
        (0, 0, 1),
        (2, 2, 3),  # no bubble: granted in the cycle after the last flit
    ]
    assert [(p.src, p.first_cycle, p.last_cycle) for p in m.delivered(2)] == [(1, 0, 1)]


def test_send_validates_its_arguments() -> None:
    m = CrossbarModel(2)
    with pytest.raises(FabricError, match=r"src=2: this crossbar has ports 0\.\.1"):
        m.send(2, 0, b"x")
    with pytest.raises(FabricError, match=r"dest=64 .* 0\.\.63"):
        m.send(0, 64, b"x")
    with pytest.raises(FabricError, match=r"key=16 .* 0\.\.15"):
        m.send(0, 0, b"x", key=16)
    with pytest.raises(FabricError, match="empty payload"):
        m.send(0, 0, b"")
    with pytest.raises(FabricError, match="dest=5"):
        m.delivered(5)
    with pytest.raises(FabricError, match="cycles=-1"):
        m.step(-1)


# --- weighted round-robin -----------------------------------------------------------------


def grant_order(weights: list[int], packets: int, length: int = 8) -> list[int]:
    """Sources, in delivery order at output 0, with every input backlogged."""
    m = all_to_all(len(weights))
    for p, w in enumerate(weights):
        m.write(port_reg(p, rm.PORT_WEIGHT_OFFSET), w)
    commit(m)
    for _ in range(packets):
        for p in range(len(weights)):
            m.send(p, 0, bytes(length))
    m.run_until_idle(10 * packets * len(weights))
    return [p.src for p in m.delivered(0)]


def test_wrr_exact_grant_sequence() -> None:
    assert grant_order([3, 1], 12)[:12] == [0, 0, 0, 1] * 3
    assert grant_order([1, 2, 1], 8)[:8] == [0, 1, 1, 2, 0, 1, 1, 2]
    assert grant_order([0, 1], 4)[:4] == [0, 1, 0, 1]  # weight 0 counts as 1


@pytest.mark.parametrize("weights", [[3, 1], [1, 2, 3], [5, 1, 1, 1]])
def test_wrr_shares_follow_the_weights(weights: list[int]) -> None:
    total = sum(weights)
    order = grant_order(weights, packets=40 * max(weights), length=24)
    window = order[: 40 * total]  # every input still backlogged
    share = Counter(window)
    for p, w in enumerate(weights):
        assert abs(share[p] - 40 * w) <= 1, (p, share)


def test_wrr_is_work_conserving() -> None:
    m = all_to_all(2)
    for _ in range(5):
        m.send(0, 0, bytes(8))
    m.run_until_idle(20)
    assert [p.first_cycle for p in m.delivered(0)] == [0, 1, 2, 3, 4]


def test_wrr_holds_the_output_for_a_whole_packet() -> None:
    m = all_to_all(2, data_bytes=4)
    m.send(0, 1, bytes(40))
    m.send(1, 1, bytes(4))
    m.run_until_idle(20)
    assert [(p.src, p.first_cycle, p.last_cycle) for p in m.delivered(1)] == [
        (0, 0, 9),
        (1, 10, 10),
    ]


# --- token bucket -------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.3, 2.5, 5.0, 7.75])
def test_token_bucket_throughput(rate: float) -> None:
    data_bytes = 8
    m = all_to_all(2, data_bytes=data_bytes)
    configure(m, 0, outputs=(1,), rate=rate, burst=4 * data_bytes)
    commit(m)
    cycles = 6000
    for _ in range(int(cycles * rate / 64) + 8):  # keep the input backlogged
        m.send(0, 1, bytes(64))
    m.step(cycles)
    sent = counters(m, 0)["CNT_FLITS"] * data_bytes
    assert sent == pytest.approx(rate * cycles, rel=0.02)
    # backlogged and alone on its output: every cycle moves a flit or stalls for tokens
    assert counters(m, 0)["CNT_STALLS"] + counters(m, 0)["CNT_FLITS"] == cycles


def test_token_bucket_disabled_means_line_rate() -> None:
    m = all_to_all(2, data_bytes=8)
    m.write(port_reg(0, rm.PORT_TB_RATE_OFFSET), ONE_BYTE_PER_CYCLE)  # rate without enable
    commit(m)
    for _ in range(10):
        m.send(0, 1, bytes(64))
    assert m.run_until_idle(100) == 80
    assert counters(m, 0)["CNT_STALLS"] == 0


def test_token_bucket_burst_then_rate() -> None:
    m = all_to_all(2, data_bytes=8)
    configure(m, 0, outputs=(1,), rate=2.0, burst=32)
    commit(m)
    m.step(100)  # idle: the bucket fills to its cap, 32 bytes
    for _ in range(8):
        m.send(0, 1, bytes(8))
    m.run_until_idle(100)
    starts = [p.first_cycle - 100 for p in m.delivered(1)]
    # refill, then spend 8 per flit: 32 (capped) -> 24, 26 -> 18, 20 -> 12, 14 -> 6, 8 -> 0:
    # five flits at line rate, then the rate: 8 tokens every 4 cycles
    assert starts == [0, 1, 2, 3, 4, 8, 12, 16]


def test_partial_flits_cost_their_bytes() -> None:
    m = all_to_all(2, data_bytes=8)
    configure(m, 0, outputs=(1,), rate=1.0, burst=8)
    commit(m)
    m.step(8)  # bucket full: 8 bytes
    for _ in range(4):
        m.send(0, 1, bytes(2))
    m.run_until_idle(100)
    # a 2-byte flit costs 2 tokens: 8 -> 6, 7 -> 5, 6 -> 4, 5 -> 3; all at line rate
    # (charging the full 8-byte flit width would space them 8 cycles apart)
    assert [p.first_cycle - 8 for p in m.delivered(1)] == [0, 1, 2, 3]


def test_bucket_smaller_than_a_flit_blocks_and_run_until_idle_says_so() -> None:
    m = all_to_all(2, data_bytes=8)
    configure(m, 1, outputs=(0,), rate=1.0, burst=4)
    commit(m)
    m.send(1, 0, bytes(8))
    with pytest.raises(FabricError, match=r"not idle after 50 cycles: inputs \[1\]") as err:
        m.run_until_idle(50)
    assert err.value.details["limit"] == 50
    assert counters(m, 1)["CNT_STALLS"] == 50
    m.write(port_reg(1, rm.PORT_TB_BURST_OFFSET), 0)  # a commit repairs it: not started
    commit(m)
    assert m.run_until_idle(5) == 1


def test_idle_fast_forward_is_the_same_as_stepping() -> None:
    def run(keep_busy: bool) -> list[tuple[int, int]]:
        m = all_to_all(2, data_bytes=8)
        configure(m, 0, outputs=(1,), rate=0.7, burst=40)
        commit(m)
        if keep_busy:  # traffic elsewhere: the 37 cycles are simulated one by one
            m.send(1, 0, bytes(8 * 50))
        m.step(37)
        for _ in range(6):
            m.send(0, 1, bytes(8))
        m.run_until_idle(200)
        return [(p.first_cycle, p.last_cycle) for p in m.delivered(1)]

    assert run(keep_busy=False) == run(keep_busy=True)


# --- the key property ---------------------------------------------------------------------


@dataclass
class Tracker:
    """Independent record of what was sent and configured, for the property test."""

    n_ports: int
    n_keys: int
    shadow: list[tuple[int, int]]  # per port: (permitted outputs, keys)
    configs: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    sent: dict[int, tuple[int, int, int, bytes]] = field(default_factory=dict)
    gen_at: list[list[int]] = field(default_factory=list)  # per cycle: ACTIVE_GEN per port
    committed_at: list[int] = field(default_factory=list)  # per cycle: GEN.committed

    def permits(self, generation: int, src: int, dest: int, key: int) -> bool:
        outputs, keys = self.configs[generation][src]
        return (
            dest < self.n_ports
            and key < self.n_keys
            and bool(outputs >> dest & 1)
            and bool(keys >> key & 1)
        )


def simulate_cycle(m: CrossbarModel, t: Tracker) -> None:
    t.gen_at.append([active_gen(m, p) for p in range(t.n_ports)])
    t.committed_at.append(gen(m)[0])
    m.step()


MASK = st.one_of(st.just(0xF), st.just(0xF), st.integers(0, 0xF))  # mostly "all permitted"
SEND = st.tuples(
    st.just("send"),
    st.integers(0, 3),  # src (mod n_ports)
    st.integers(0, 4),  # dest (mod n_ports), or 4: beyond n_ports
    st.integers(1, 40),  # length
    st.one_of(st.just(0), st.integers(0, 4)),  # key, may exceed n_keys
)
STEP = st.tuples(st.just("step"), st.integers(1, 12))
COMMIT = st.tuples(st.just("commit"))
OPS = st.one_of(
    SEND,
    SEND,
    SEND,
    STEP,
    STEP,
    COMMIT,
    COMMIT,
    st.tuples(st.just("perm"), st.integers(0, 3), MASK),
    st.tuples(st.just("keys"), st.integers(0, 3), MASK),
    st.tuples(st.just("weight"), st.integers(0, 3), st.integers(0, 4)),
    st.tuples(
        st.just("bucket"),
        st.integers(0, 3),
        st.integers(ONE_BYTE_PER_CYCLE // 4, 4 * ONE_BYTE_PER_CYCLE),  # > 0: the run ends
        st.integers(0, 3),  # burst in flits beyond one
        st.booleans(),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_ports=st.integers(2, 4),
    n_keys=st.integers(1, 3),
    data_bytes=st.sampled_from([4, 8]),
    initial=st.lists(st.tuples(MASK, MASK), min_size=4, max_size=4),
    ops=st.lists(OPS, min_size=20, max_size=100),
)
def test_reconfiguration_never_loses_duplicates_or_misroutes(
    n_ports: int,
    n_keys: int,
    data_bytes: int,
    initial: list[tuple[int, int]],
    ops: list[tuple[Any, ...]],
) -> None:
    m = CrossbarModel(n_ports, n_keys=n_keys, data_bytes=data_bytes)
    t = Tracker(n_ports, n_keys, shadow=[(0, 0)] * n_ports)
    t.configs[0] = list(t.shadow)
    for port in range(n_ports):
        perm, keys = initial[port][0] % (1 << n_ports), initial[port][1] % (1 << n_keys)
        m.write(port_reg(port, rm.PORT_PERM_LO_OFFSET), perm)
        m.write(port_reg(port, rm.PORT_KEYS_OFFSET), keys)
        t.shadow[port] = (perm, keys)
    commit(m)
    committed = 1
    t.configs[committed] = list(t.shadow)
    for op in ops:
        kind, *args = op
        ints = [int(a) for a in args]
        if kind == "send":
            src, length, key = ints[0] % n_ports, ints[2], ints[3]
            dest = ints[1] % n_ports if ints[1] < 4 else ints[1]
            payload = bytes([len(t.sent) % 256]) * length
            t.sent[m.send(src, dest, payload, key=key)] = (src, dest, key, payload)
        elif kind == "perm":
            port, mask = ints[0] % n_ports, ints[1] & ((1 << n_ports) - 1)
            m.write(port_reg(port, rm.PORT_PERM_LO_OFFSET), mask)
            t.shadow[port] = (mask, t.shadow[port][1])
        elif kind == "keys":
            port, mask = ints[0] % n_ports, ints[1] & ((1 << n_keys) - 1)
            m.write(port_reg(port, rm.PORT_KEYS_OFFSET), mask)
            t.shadow[port] = (t.shadow[port][0], mask)
        elif kind == "weight":
            m.write(port_reg(ints[0] % n_ports, rm.PORT_WEIGHT_OFFSET), ints[1])
        elif kind == "bucket":
            port, rate, extra_flits, enable = ints[0] % n_ports, ints[1], ints[2], ints[3]
            burst = data_bytes * (1 + extra_flits)
            m.write(port_reg(port, rm.PORT_TB_RATE_OFFSET), rate)
            m.write(
                port_reg(port, rm.PORT_TB_BURST_OFFSET),
                burst | (rm.PORT_TB_BURST_ENABLE_MASK if enable else 0),
            )
        elif kind == "commit":
            commit(m)
            committed += 1
            t.configs[committed] = list(t.shadow)
            if pending(m):
                event("commit while a packet is in flight")
        else:
            for _ in range(ints[0]):
                simulate_cycle(m, t)
    for _ in range(20_000):
        if m.idle:
            break
        simulate_cycle(m, t)
    assert m.idle
    assert len(t.gen_at) == m.cycle

    delivered = [p for d in range(n_ports) for p in m.delivered(d)]
    dropped = [p for s in range(n_ports) for p in m.dropped(s)]
    event(f"packets delivered: {bool(delivered)}, dropped: {bool(dropped)}")

    # every packet exactly once: delivered or dropped
    seqs = Counter(p.seq for p in delivered + dropped)
    assert set(seqs) == set(t.sent)
    assert max(seqs.values(), default=1) == 1

    for d in range(n_ports):
        for p in m.delivered(d):
            src, dest, key, payload = t.sent[p.seq]
            assert (p.src, p.dest, p.key, p.payload) == (src, dest, key, payload)
            assert p.dest == d
            assert t.permits(p.generation, src, dest, key), "delivered under a forbidding config"
    for p in dropped:
        src, dest, key, payload = t.sent[p.seq]
        assert (p.src, p.dest, p.key, p.payload) == (src, dest, key, payload)
        assert not t.permits(p.generation, src, dest, key), "dropped under a permitting config"

    for p in delivered + dropped:
        flits = -(-len(p.payload) // data_bytes)
        assert p.last_cycle - p.first_cycle + 1 >= flits
        if t.committed_at[p.last_cycle] != p.generation:
            event("a packet finished under an older generation than the committed one")
        # the input ran the packet's generation from its first flit to its last
        assert {t.gen_at[c][p.src] for c in range(p.first_cycle, p.last_cycle + 1)} == {
            p.generation
        }

    # one packet at a time per output and per input; inputs are FIFOs
    for group in [m.delivered(d) for d in range(n_ports)] + [
        sorted((p for p in delivered + dropped if p.src == s), key=lambda p: p.first_cycle)
        for s in range(n_ports)
    ]:
        for a, b in itertools.pairwise(group):
            assert a.last_cycle < b.first_cycle
    for s in range(n_ports):
        mine = [p for p in delivered + dropped if p.src == s]
        assert [p.seq for p in sorted(mine, key=lambda p: p.first_cycle)] == sorted(
            p.seq for p in mine
        )

    # counters agree with what happened
    for s in range(n_ports):
        c = counters(m, s)
        mine = [p for p in delivered if p.src == s]
        assert c["CNT_PKTS"] == len(mine)
        assert c["CNT_FLITS"] == sum(-(-len(p.payload) // data_bytes) for p in mine)
        assert c["CNT_DROPS"] == len(m.dropped(s))

    assert gen(m) == (committed, committed) and not pending(m)


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(OPS, min_size=10, max_size=60))
def test_every_commit_runs_the_configuration_decoded_from_the_shadow(
    ops: list[tuple[Any, ...]],
) -> None:
    """After any sequence of writes, commits and traffic, each input runs what decoding
    its shadow at its last adoption gives: compared with a twin whose ports never count
    as up to date, i.e. decode at every commit (what the model did before it skipped
    unchanged ports)."""
    fast = CrossbarModel(3, n_keys=2, data_bytes=4)
    full = CrossbarModel(3, n_keys=2, data_bytes=4)
    for op in ops:
        kind, *args = op
        ints = [int(a) for a in args]
        for m in (fast, full):
            if kind == "send":
                m.send(ints[0] % 3, ints[1] % 3, bytes(ints[2]), key=ints[3] % 2)
            elif kind in ("perm", "keys"):
                perm = kind == "perm"
                offset = rm.PORT_PERM_LO_OFFSET if perm else rm.PORT_KEYS_OFFSET
                mask = 0b111 if perm else 0b11
                m.write(port_reg(ints[0] % 3, offset), ints[1] & mask)
            elif kind == "weight":
                m.write(port_reg(ints[0] % 3, rm.PORT_WEIGHT_OFFSET), ints[1])
            elif kind == "bucket":
                m.write(port_reg(ints[0] % 3, rm.PORT_TB_RATE_OFFSET), ints[1])
                m.write(port_reg(ints[0] % 3, rm.PORT_TB_BURST_OFFSET), 4 * (1 + ints[2]))
            elif kind == "commit":
                if m is full:
                    for port in m._inputs:  # white-box: the twin decodes every port
                        port.current = False
                commit(m)
            else:
                m.step(ints[0])
        assert [fast.active_config(p) for p in range(3)] == [
            full.active_config(p) for p in range(3)
        ]
        assert [active_gen(fast, p) for p in range(3)] == [active_gen(full, p) for p in range(3)]
    fast.run_until_idle(20_000)
    full.run_until_idle(20_000)
    assert [fast.delivered(d) for d in range(3)] == [full.delivered(d) for d in range(3)]
