"""The SQLite ledger: durable writes, group commit, identity checks, fail-stop."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from firmware.errors import LedgerError
from firmware.ledger import (
    DeleteSlice,
    Durability,
    Durable,
    Ledger,
    PutMeta,
    PutRequest,
    PutSlice,
)


def test_writes_are_visible_to_a_second_connection(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite", "dev1")
    led.write(
        [
            PutSlice(1, "vm-a", {"owner": "vm-a"}, {"cores": [1]}),
            PutRequest("vm-a", "r1", "d", {"id": 1}),
        ]
    )
    db = sqlite3.connect(tmp_path / "l.sqlite")
    assert db.execute("SELECT id, owner FROM slices").fetchall() == [(1, "vm-a")]
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    led.write([DeleteSlice(1)])
    assert db.execute("SELECT count(*) FROM slices").fetchone() == (0,)
    db.close()
    led.close()
    again = Ledger(tmp_path / "l.sqlite", "dev1")
    assert again.slices() == []
    assert [r.request_id for r in again.requests()] == ["r1"]
    assert again.meta("next_slice_id") == "2"  # ids are never reused, even after delete
    again.close()


def test_group_commit_shares_transactions(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite", "dev1")
    n_threads, per = 16, 20
    barrier = threading.Barrier(n_threads)

    def writer(i: int) -> None:
        barrier.wait()
        for k in range(per):
            led.write([PutMeta(f"k{i}-{k}", "v")])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert led.records == n_threads * per
    assert led.batches < led.records  # some fsyncs carried several writers' records
    led.close()
    db = sqlite3.connect(tmp_path / "l.sqlite")
    assert db.execute("SELECT count(*) FROM meta WHERE key LIKE 'k%'").fetchone() == (
        n_threads * per,
    )


def test_ledger_of_another_device_is_refused(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.sqlite", "dev1").close()
    with pytest.raises(LedgerError, match="another device"):
        Ledger(tmp_path / "l.sqlite", "dev2")


def test_failed_write_stops_the_ledger(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite", "dev1")
    led.write([PutSlice(1, "vm-a", {}, {})])
    # sabotage: a trigger makes the next slice insert fail inside the transaction
    db = sqlite3.connect(tmp_path / "l.sqlite")
    db.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON slices BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
    )
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="disk on fire"):
        led.write([PutMeta("x", "1"), PutSlice(2, "vm-a", {}, {})])
    with pytest.raises(LedgerError, match="stopped"):
        led.write([PutMeta("y", "1")])
    led.close()
    again = Ledger(tmp_path / "l.sqlite", "dev1")
    assert [s.id for s in again.slices()] == [1]  # the failed transaction left nothing
    assert again.meta("x") is None
    again.close()


def test_commits_are_fsynced(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite", "dev1")
    assert led.durability is Durability.POWER  # the default
    assert led._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert led._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    led.close()


def test_crash_durability_skips_the_per_commit_fsync(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite", "dev1", durability=Durability.CRASH)
    assert led._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert led._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    led.write([PutMeta("x", "1")])
    led.close()
    again = Ledger(tmp_path / "l.sqlite", "dev1")  # the level is not a property of the file
    assert again.meta("x") == "1"
    again.close()


def test_schema_1_ledger_is_migrated(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.sqlite", "dev1").close()
    db = sqlite3.connect(tmp_path / "l.sqlite")
    db.execute("DROP TABLE vms")  # what a schema-1 ledger looks like
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.commit()
    db.close()
    led = Ledger(tmp_path / "l.sqlite", "dev1")
    assert led.meta("schema") == "2" and led.vms() == []
    led.close()
    db = sqlite3.connect(tmp_path / "l.sqlite")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="schema 99"):
        Ledger(tmp_path / "l.sqlite", "dev1")


def _committed_meta(path: Path, key: str) -> str | None:
    """What a second connection sees committed."""
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


def test_a_write_nobody_waits_for_rides_with_the_next_commit(tmp_path: Path) -> None:
    """Queuing wakes nobody (no writer thread): a write becomes durable when some caller
    waits, in the same transaction as that caller's, FIFO; close() commits the rest."""
    led = Ledger(tmp_path / "l.sqlite", "dev1")
    first = led.submit([PutMeta("a", "1")])
    assert not first.done()
    assert _committed_meta(tmp_path / "l.sqlite", "a") is None
    led.write([PutMeta("b", "2")])  # its leader takes the whole queue
    assert first.done() and led.batches == 1 and led.records == 2
    assert _committed_meta(tmp_path / "l.sqlite", "a") == "1"
    led.wait(first)  # done already: returns at once, commits nothing
    assert led.batches == 1
    last = led.submit([PutMeta("c", "3")])
    led.close()
    assert last.done()
    assert _committed_meta(tmp_path / "l.sqlite", "c") == "3"


def test_waiters_behind_a_commit_in_progress_share_the_next_one(tmp_path: Path) -> None:
    """While a leader commits, callers queue and wait; the first to get the commit lock
    commits them all in one transaction, and the others find theirs done."""
    led = Ledger(tmp_path / "l.sqlite", "dev1")
    in_commit, release = threading.Event(), threading.Event()
    calls = 0

    def stall() -> list[PutMeta]:  # runs inside the leader's transaction
        nonlocal calls
        calls += 1
        if calls == 1:
            in_commit.set()
            assert release.wait(10)
        return []

    led.precommit.append(stall)
    leader = threading.Thread(target=led.write, args=([PutMeta("lead", "1")],))
    leader.start()
    assert in_commit.wait(10)
    followers = [
        threading.Thread(target=led.write, args=([PutMeta(f"f{i}", "1")],)) for i in range(4)
    ]
    for t in followers:
        t.start()
    while len(led._queued) < 4:  # white-box: every follower has queued its write
        threading.Event().wait(0.001)
    release.set()
    for t in [leader, *followers]:
        t.join(10)
        assert not t.is_alive()
    assert (led.batches, led.records) == (2, 5)
    led.close()


def test_a_write_that_was_never_committed_does_not_read_as_durable() -> None:
    d = Durable()
    with pytest.raises(LedgerError, match="never committed"):
        d.result()
