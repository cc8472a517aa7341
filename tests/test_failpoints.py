"""Failpoints: parsing and firing in-process, and a daemon killed at each ledger failpoint
in the middle of an allocation recovers to a state that is exactly "applied" or "not"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware import failpoints
from firmware.errors import ConfigError, FabricError, LedgerError
from firmware.ledger import Ledger, PutMeta
from tests.test_cli import Daemon, run, run_json


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    failpoints.disarm()
    yield
    failpoints.disarm()


@pytest.mark.parametrize(
    "spec",
    ["ledger.after_comit=crash", "ledger.after_commit", "ledger.after_commit=explode",
     "ledger.after_commit=crash@0", "ledger.after_commit=crash@x"],
)  # fmt: skip
def test_bad_specs_are_refused_with_the_names(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        failpoints.arm(spec)
    assert spec.split("=")[0] in e.value.message or "failpoint" in e.value.message
    assert not failpoints.armed


def test_an_error_fires_on_the_nth_hit_as_the_steps_own_error_then_disarms() -> None:
    failpoints.arm("fabric.after_writes=error@3, reply.before_send=error")
    assert failpoints.armed
    failpoints.hit("fabric.after_writes", FabricError)
    failpoints.hit("fabric.after_writes", FabricError)
    failpoints.hit("ledger.after_commit")  # not armed: nothing
    with pytest.raises(FabricError, match=r"fabric\.after_writes"):
        failpoints.hit("fabric.after_writes", FabricError)
    failpoints.hit("fabric.after_writes", FabricError)  # disarmed after firing
    with pytest.raises(failpoints.FailpointError):
        failpoints.hit("reply.before_send")
    assert not failpoints.armed


def test_a_ledger_error_failpoint_is_a_failed_write_and_fail_stop(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite", "dev")
    failpoints.arm("ledger.before_commit=error")
    with pytest.raises(LedgerError):
        led.write([PutMeta("x", "1")])
    with pytest.raises(LedgerError):  # fail-stop: nothing more is written
        led.write([PutMeta("y", "1")])
    led.close()
    again = Ledger(tmp_path / "l.sqlite", "dev")
    assert again.meta("x") is None and again.meta("y") is None
    again.close()


ALLOC = ("alloc", "--owner", "vm-a", "--memory", "64MiB", "--cores", "2", "--request-id", "r1")


@pytest.mark.parametrize(
    ("point", "applied"),
    [("ledger.before_write", False), ("ledger.before_commit", False),
     ("ledger.after_commit", True), ("fabric.after_writes", True),
     ("fabric.after_commit", True), ("reply.before_send", True)],
)  # fmt: skip
def test_a_daemon_killed_mid_allocation_recovers_all_or_nothing(
    tmp_path: Path, point: str, applied: bool
) -> None:
    daemon = Daemon(tmp_path / "state")
    state = daemon.state
    try:
        daemon.start(env={failpoints.ENV: f"{point}=crash"})
        lost = run(*ALLOC, "--json", state=state, check=False)
        assert lost.returncode == 4, lost.stderr  # the daemon died before answering
        assert daemon.proc is not None and daemon.proc.wait(timeout=30) == -9
        daemon.stop()
        daemon.start()
        slices = run_json("slices", "list", state=state)
        assert len(slices) == (1 if applied else 0)
        assert run_json("check", state=state) == {"violations": []}
        run_json(*ALLOC, state=state)  # the client retries with the same request id
        again = run_json("slices", "list", state=state)
        assert len(again) == 1  # applied exactly once
        if applied:
            assert again[0]["alloc"] == slices[0]["alloc"]
    finally:
        daemon.stop()


def test_a_fabric_error_failpoint_is_a_refused_reconfiguration(tmp_path: Path) -> None:
    """error at a fabric point is a bus error: the allocation is refused and rolled back,
    and the next reconfiguration puts the crossbar right."""
    from firmware.errors import FabricError
    from firmware.manager import StateDir, open_manager
    from firmware.slices import SliceSpec

    state = StateDir(tmp_path / "state")
    m = open_manager(state)
    try:
        failpoints.arm("fabric.after_writes=error")
        spec = SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "64MiB"}})
        with pytest.raises(FabricError, match=r"fabric\.after_writes"):
            m.allocate(spec)
        assert m.allocate(spec)["state"] == "active"  # disarmed: the retry goes through
        assert m.check_invariants() == []
    finally:
        m.close()
        state.unlock()
