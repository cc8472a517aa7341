"""The crash-consistency test (issue 8, firmware/crashtest.py): the daemon SIGKILLed at
random failpoints in the middle of a random history from several VMs, restarted, and the
recovered state checked against the history, the invariants and the crossbar's registers.

CI runs ``SLICEFAB_CRASH_POINTS`` crash points (default 100); ``make crash-test`` runs
1,000 (``CRASH_POINTS=N`` for another count, ``CRASH_SEED`` for another history). The
checker itself is tested against states that break each rule, so it can fail."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from firmware import crashtest
from firmware.crashtest import CrashTest, History, Op, check_registers, check_vm
from firmware.fabric.regfile import RegisterFile
from firmware.manager import StateDir, open_manager
from firmware.slices import SliceSpec
from hostlib.client import QoS, SliceInfo

POINTS = int(os.environ.get("SLICEFAB_CRASH_POINTS", "100"))
SEED = int(os.environ.get("SLICEFAB_CRASH_SEED", "1"))
MiB = 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(max(300, POINTS * 3))
def test_every_crash_point_recovers_to_the_history(tmp_path: Path) -> None:
    test = CrashTest(tmp_path, seed=SEED)
    report = test.run(POINTS)
    history = tmp_path / "history.json"
    test.dump(history)
    figures = report.figures()
    print(figures)
    assert report.violations == [], (
        f"seed {SEED}: {len(report.violations)} violations (history in {history}):\n"
        + "\n".join(report.violations[:40])
    )
    assert report.points == POINTS
    # the crashes were at failpoints in the middle of operations, not at quiet moments
    assert report.fired >= 0.9 * POINTS, figures
    assert report.lost_ops > 0 and report.acked_ops > POINTS
    if POINTS >= 100:  # every point a single device reaches was crashed at
        assert set(report.by_point) == set(crashtest.REACHABLE), figures


def _info(sid: int, memory: int, cores: int = 0, prio: int = 0) -> SliceInfo:
    return SliceInfo(sid, "vm-a", "", "active", tuple(range(cores)), memory, (), None, 1,
                     (0,), QoS(prio, 0, 0), 2 * MiB)


def test_the_checker_accepts_all_or_nothing_and_refuses_anything_else() -> None:
    s1, s2 = _info(1, 64 * MiB), _info(2, 128 * MiB, cores=2)
    model = {1: s1, 2: s2}
    assert check_vm("vm-a", model, None, dict(model)) == []
    # an acknowledged slice lost, or one never acknowledged present
    assert "are lost" in check_vm("vm-a", model, None, {1: s1})[0]
    assert "never acknowledged" in check_vm("vm-a", model, None, {**model, 3: s1})[0]
    # an acknowledged slice changed
    assert "acknowledged as" in check_vm("vm-a", model, None, {1: s1, 2: _info(2, 2 * MiB)})[0]
    # a lost resize: before or fully after are fine, half is not
    resize = Op(0, "vm-a", "resize", {"slice": 2, "memory": 256 * MiB, "priority": 5}, "r")
    assert check_vm("vm-a", model, resize, dict(model)) == []
    done = _info(2, 256 * MiB, cores=2, prio=5)
    assert check_vm("vm-a", model, resize, {1: s1, 2: done}) == []
    half = _info(2, 256 * MiB, cores=2, prio=0)
    assert "half applied" in check_vm("vm-a", model, resize, {1: s1, 2: half})[0]
    # a lost allocate: absent, or one slice that is exactly the request
    alloc = Op(0, "vm-a", "allocate", {"memory": 32 * MiB, "cores": 1}, "a")
    assert check_vm("vm-a", model, alloc, dict(model)) == []
    assert check_vm("vm-a", model, alloc, {**model, 7: _info(7, 32 * MiB, cores=1)}) == []
    assert check_vm("vm-a", model, alloc, {**model, 7: _info(7, 32 * MiB, cores=2)})
    two = {**model, 7: _info(7, 32 * MiB, cores=1), 8: _info(8, 32 * MiB, cores=1)}
    assert check_vm("vm-a", model, alloc, two)
    # a lost free: there as it was, or gone
    free = Op(0, "vm-a", "free", {"slice": 1}, "f")
    assert check_vm("vm-a", model, free, {2: s2}) == []
    assert check_vm("vm-a", model, free, dict(model)) == []
    assert check_vm("vm-a", model, free, {1: _info(1, 2 * MiB), 2: s2})
    assert "not active" in check_vm("vm-a", model, None,
                                    {1: replace(s1, state="error"), 2: s2})[0]


def test_the_register_check_sees_a_crossbar_that_differs_from_the_ledger(
    tmp_path: Path,
) -> None:
    state = StateDir(tmp_path / "state")
    m = open_manager(state)
    try:
        m.allocate(SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "64MiB"}}))
        device = m.device
    finally:
        m.close()
        state.unlock()
    slices = crashtest.ledger_slices(state)
    assert len(slices) == 1 and check_registers(state, device, slices) == []
    assert check_registers(state, device, [])  # the ledger says nothing: the port is held
    xb = device.crossbar
    regs = RegisterFile(state.crossbar, xb.ports, device.keys, xb.data_bytes)
    regs._w[regs._bank_index(regs.generation & 1, 0, 0)] ^= 1  # the running permission
    regs.close()
    bad = check_registers(state, device, slices)
    assert len(bad) == 1 and "committed register 0x0100" in bad[0]


def test_histories_are_reproducible_from_the_seed() -> None:
    def ops(seed: int) -> list[tuple[str, str]]:
        h = History(["vm-0", "vm-1"], seed, 2 * MiB)
        return [(o.kind, str(o.args)) for o in (h.next_op(0, f"vm-{i % 2}") for i in range(30))]

    assert ops(3) == ops(3) and ops(3) != ops(4)
