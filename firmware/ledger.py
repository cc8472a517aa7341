"""The durable ledger: the device's resource map in SQLite.

What is in it: one row per live slice (its spec and the exact units it holds), the
results of recent client requests (for idempotent retries), and metadata (schema version,
the device fingerprint, the next slice id). On start the firmware reads it back, re-takes
every unit and re-programs the fabric from it (:mod:`firmware.manager`).

Durability: WAL journal with ``synchronous=FULL`` — a transaction is on disk (the WAL is
fsync'ed) before :meth:`Ledger.write` returns, and only then does the firmware acknowledge.

Group commit: concurrent callers hand their records to one writer thread, which applies
everything queued in one transaction and one fsync, then wakes them all. Order is kept
(FIFO), so a later operation never becomes durable before an earlier one it may depend on.
If a write fails the ledger stops accepting writes (fail-stop): the in-memory state may now
be ahead of the disk, and the only safe way on is a restart that recovers from the disk.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.errors import LedgerError

SCHEMA_VERSION = 2  # 2: the vms table (VM credentials and request counters)
#: how many recent request ids are kept for idempotent retries (oldest pruned first)
REQUEST_RETENTION = 65536

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS slices (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    spec TEXT NOT NULL,
    alloc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    vm TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    mailbox TEXT NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    request_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    response TEXT NOT NULL,
    UNIQUE (owner, request_id)
);
"""


@dataclass(frozen=True)
class PutSlice:
    id: int
    owner: str
    spec: dict[str, Any]
    alloc: dict[str, Any]


@dataclass(frozen=True)
class DeleteSlice:
    id: int


@dataclass(frozen=True)
class PutRequest:
    owner: str
    request_id: str
    digest: str
    response: dict[str, Any]


@dataclass(frozen=True)
class DeleteRequest:
    """Forget a request's stored result (its change was rolled back)."""

    owner: str
    request_id: str


@dataclass(frozen=True)
class PutMeta:
    key: str
    value: str


@dataclass(frozen=True)
class PutVm:
    """A VM's credential and mailbox (``slicefab vm add``)."""

    vm: str
    key: bytes
    mailbox: str
    last_seq: int = 0


@dataclass(frozen=True)
class DeleteVm:
    vm: str


@dataclass(frozen=True)
class PutVmSeq:
    """The highest request sequence number accepted from a VM (never goes down)."""

    vm: str
    seq: int


Record = (
    PutSlice | DeleteSlice | PutRequest | DeleteRequest | PutMeta | PutVm | DeleteVm | PutVmSeq
)


_STOP = object()


class Ledger:
    """A SQLite ledger with a group-committing writer thread.

    Raises :class:`LedgerError` when the file cannot be opened, belongs to another device,
    has an unknown schema, or a write fails (after which every write fails: fail-stop).
    """

    def __init__(self, path: Path | str, device_fingerprint: str) -> None:
        self.path = Path(path)
        self.batches = 0  # transactions committed (for group-commit figures)
        self.records = 0
        self._failed: BaseException | None = None
        self._closed = False
        #: called by the writer before each commit; what they return joins the transaction
        #: (the VM registry's request counters ride along with every commit this way)
        self.precommit: list[Callable[[], list[Record]]] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open ledger {self.path}: {e}", path=str(self.path)) from e
        self._check_identity(device_fingerprint)
        self._writer = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._writer.start()

    def _check_identity(self, fingerprint: str) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("schema", str(SCHEMA_VERSION)), ("device", fingerprint), ("next_slice_id", "1")],
            )
            self._db.execute("COMMIT")
            return
        if meta.get("schema") == "1":  # v1 -> v2 only added the vms table (created above)
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),)
            )
            meta["schema"] = str(SCHEMA_VERSION)
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise LedgerError(
                f"ledger {self.path} has schema {meta.get('schema')}, "
                f"this firmware reads {SCHEMA_VERSION}",
                path=str(self.path),
            )
        if meta.get("device") != fingerprint:
            raise LedgerError(
                f"ledger {self.path} was written for another device (fingerprint "
                f"{meta.get('device')}, this one is {fingerprint}); use the same --device or "
                "a new --state-dir",
                path=str(self.path),
                expected=fingerprint,
                got=meta.get("device"),
            )

    # ---------------------------------------------------------------- reading (recovery)
    # Reads return the same record types that were written.

    def slices(self) -> list[PutSlice]:
        rows = self._db.execute("SELECT id, owner, spec, alloc FROM slices ORDER BY id").fetchall()
        return [PutSlice(i, o, json.loads(s), json.loads(a)) for i, o, s, a in rows]

    def vms(self) -> list[PutVm]:
        rows = self._db.execute("SELECT vm, key, mailbox, last_seq FROM vms ORDER BY vm").fetchall()
        return [PutVm(v, bytes(k), m, s) for v, k, m, s in rows]

    def requests(self) -> list[PutRequest]:
        rows = self._db.execute(
            "SELECT owner, request_id, digest, response FROM requests ORDER BY seq"
        ).fetchall()
        return [PutRequest(o, r, d, json.loads(resp)) for o, r, d, resp in rows]

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # ---------------------------------------------------------------- writing

    def submit(self, records: Sequence[Record]) -> Future[None]:
        """Queue ``records`` to be written atomically; the future completes once durable."""
        if self._failed is not None:
            raise LedgerError(f"ledger {self.path} stopped after a failed write: {self._failed}")
        if self._closed:
            raise LedgerError(f"ledger {self.path} is closed")
        fut: Future[None] = Future()
        self._queue.put((list(records), fut))
        return fut

    def write(self, records: Sequence[Record]) -> None:
        """Write ``records`` atomically and durably; returns when they are on disk."""
        fut = self.submit(records)
        try:
            fut.result()
        except LedgerError:
            raise
        except Exception as e:
            raise LedgerError(f"ledger write failed: {e}") from e

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < 1024:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[list[Record], Future[None]]]) -> None:
        if self._failed is not None:
            for _, fut in batch:
                fut.set_exception(
                    LedgerError(f"ledger stopped after a failed write: {self._failed}")
                )
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for hook in self.precommit:
                for r in hook():
                    self._apply(r)
            for records, _ in batch:
                for r in records:
                    self._apply(r)
            self._db.execute("COMMIT")  # synchronous=FULL: the WAL is fsync'ed here
        except BaseException as e:  # disk full, I/O error, corrupt file: stop writing
            self._failed = e
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            for _, fut in batch:
                fut.set_exception(LedgerError(f"ledger write failed: {e}"))
            return
        self.batches += 1
        self.records += len(batch)
        for _, fut in batch:
            fut.set_result(None)

    def _apply(self, r: Record) -> None:
        db = self._db
        if isinstance(r, PutSlice):
            db.execute(
                "INSERT OR REPLACE INTO slices VALUES (?, ?, ?, ?)",
                (
                    r.id,
                    r.owner,
                    json.dumps(r.spec, sort_keys=True),
                    json.dumps(r.alloc, sort_keys=True),
                ),
            )
            db.execute(
                "UPDATE meta SET value = MAX(CAST(value AS INTEGER), ?) "
                "WHERE key = 'next_slice_id'",
                (r.id + 1,),
            )
        elif isinstance(r, DeleteSlice):
            db.execute("DELETE FROM slices WHERE id = ?", (r.id,))
        elif isinstance(r, PutRequest):
            cur = db.execute(
                "INSERT OR REPLACE INTO requests (owner, request_id, digest, response) "
                "VALUES (?, ?, ?, ?)",
                (r.owner, r.request_id, r.digest, json.dumps(r.response, sort_keys=True)),
            )
            seq = cur.lastrowid or 0
            if seq % 1024 == 0:
                db.execute("DELETE FROM requests WHERE seq <= ?", (seq - REQUEST_RETENTION,))
        elif isinstance(r, DeleteRequest):
            db.execute(
                "DELETE FROM requests WHERE owner = ? AND request_id = ?", (r.owner, r.request_id)
            )
        elif isinstance(r, PutMeta):
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (r.key, r.value))
        elif isinstance(r, PutVm):
            db.execute(
                "INSERT OR REPLACE INTO vms VALUES (?, ?, ?, ?)",
                (r.vm, r.key, r.mailbox, r.last_seq),
            )
        elif isinstance(r, DeleteVm):
            db.execute("DELETE FROM vms WHERE vm = ?", (r.vm,))
        else:
            db.execute("UPDATE vms SET last_seq = MAX(last_seq, ?) WHERE vm = ?", (r.seq, r.vm))

    def close(self) -> None:
        """Finish queued writes and close the database."""
        self._closed = True
        if self._writer.is_alive():
            self._queue.put(_STOP)
            self._writer.join()
        self._db.close()
