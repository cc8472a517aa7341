"""VM provisioning, credential files, the replay counter across restarts, the limiter."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.errors import NotFound, RequestError
from firmware.ledger import Ledger
from firmware.vms import (
    BadRequestLimiter,
    ReplayError,
    VmRegistry,
    write_credential_file,
)
from hostlib.credentials import load_credential


def test_add_get_remove_and_credential_file(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite", "dev")
    reg = VmRegistry(led)
    cred = reg.add("vm-a", str(tmp_path / "vm-a.mbox"))
    assert len(cred.key) == 32 and reg.get("vm-a") == cred
    assert reg.add("vm-b", "x").key != cred.key
    with pytest.raises(RequestError, match="already provisioned"):
        reg.add("vm-a", "y")
    with pytest.raises(RequestError, match="not a VM id"):
        reg.add("vm a\n", "y")
    f = tmp_path / "vm-a.cred"
    write_credential_file(f, cred)
    assert oct(f.stat().st_mode & 0o777) == "0o600"
    read = load_credential(f)  # what the VM reads (hostlib) is what the firmware wrote
    assert (read.vm, read.key, read.mailbox) == (cred.vm, cred.key, cred.mailbox)
    reg.remove("vm-b")
    with pytest.raises(NotFound):
        reg.get("vm-b")
    led.close()
    again = VmRegistry(Ledger(tmp_path / "l.sqlite", "dev"))
    assert [c.vm for c in again.credentials()] == ["vm-a"] and again.get("vm-a") == cred


def test_sequence_numbers_only_go_up_and_survive_restart(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite", "dev")
    reg = VmRegistry(led)
    reg.add("vm-a", "m")
    reg.accept_seq("vm-a", 1)
    reg.accept_seq("vm-a", 5)
    for replayed in (5, 4, 1, 0):
        with pytest.raises(ReplayError):
            reg.accept_seq("vm-a", replayed)
    with pytest.raises(NotFound):
        reg.accept_seq("vm-z", 1)
    reg.close()  # flushes the accepted counter
    led.close()
    reg2 = VmRegistry(Ledger(tmp_path / "l.sqlite", "dev"))
    assert reg2.last_seq("vm-a") == 5
    with pytest.raises(ReplayError):
        reg2.accept_seq("vm-a", 5)
    reg2.accept_seq("vm-a", 6)


def test_limiter_refuses_after_a_burst_of_bad_requests() -> None:
    lim = BadRequestLimiter(burst=3, per_second=0.001)
    for _ in range(3):
        assert not lim.limited()
        lim.charge()
    assert lim.limited() and lim.rejected == 1


def test_an_accepted_counter_rides_with_the_next_commit(tmp_path: Path) -> None:
    """A state-changing request is accepted before its change is queued, so the change's
    own commit carries the counter: durable before the ack, with no extra fsync."""
    import sqlite3

    from firmware.ledger import PutMeta

    led = Ledger(tmp_path / "l.sqlite", "dev")
    reg = VmRegistry(led)
    reg.add("vm-a", "m")
    reg.accept_seq("vm-a", 9)
    led.write([PutMeta("change", "x")])  # the request's change
    db = sqlite3.connect(tmp_path / "l.sqlite")
    assert db.execute("SELECT last_seq FROM vms WHERE vm = 'vm-a'").fetchone() == (9,)
    db.close()
    reg.close()
    led.close()
