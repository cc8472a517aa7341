"""The durable ledger: the device's resource map in SQLite.

What is in it: one row per live slice (its spec and the exact units it holds), the
results of recent client requests (for idempotent retries), and metadata (schema version,
the device fingerprint, the next slice id). On start the firmware reads it back, re-takes
every unit and re-programs the fabric from it (:mod:`firmware.manager`).

Durability (:class:`Durability`, chosen when the daemon starts):

* ``power`` (the default): WAL journal with ``synchronous=FULL`` — a transaction is on disk
  (the WAL is fsync'ed) before :meth:`Ledger.write` returns, and only then does the firmware
  acknowledge. An acknowledged operation survives a power loss.
* ``crash``: WAL journal with ``synchronous=NORMAL`` — a transaction is in the WAL file (in
  the kernel's page cache) before it is acknowledged, and the WAL is fsync'ed only at
  checkpoints. An acknowledged operation survives the firmware process being killed at any
  instant (the crash the firmware can recover from); a power loss or kernel crash may roll
  back the last acknowledged transactions, and the database stays consistent either way.
  It costs no fsync per group commit (see docs/benchmarks.md for what that is worth).

Group commit: callers queue their records (:meth:`Ledger.submit`) and wait for them
(:meth:`Ledger.wait`). A waiter whose records are not yet durable becomes the leader as soon
as no commit is in progress: it takes everything queued, applies it in one transaction and
one fsync, and sets the outcome (:class:`Durable`) of every write in it; a caller that
arrives during a commit waits for it to end, then finds its records committed by a later
leader or leads the next commit itself. There is no writer thread: queuing wakes nobody, so
the common single-caller case commits in the caller's own thread with no hand-off (a thread
woken at every submit cost about a quarter of the in-process allocate+free rate), and
concurrent callers still share one fsync. Records nobody waits for are committed with the
next commit, or by :meth:`Ledger.close`. Order is kept (FIFO: the queue is taken and
committed under one lock), so a later operation never becomes durable before an earlier one
it may depend on.
If a write fails the ledger stops accepting writes (fail-stop): the in-memory state may now
be ahead of the disk, and the only safe way on is a restart that recovers from the disk.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware import failpoints
from firmware.errors import LedgerError

SCHEMA_VERSION = 2  # 2: the vms table (VM credentials and request counters)
#: ``json.dumps(obj, sort_keys=True)`` without building an encoder per call
_dumps = json.JSONEncoder(sort_keys=True).encode
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


class Durable:
    """The outcome of one submitted write (:meth:`Ledger.submit`), set once by the commit
    that carries it, under the ledger's commit lock.

    Waiting goes through :meth:`Ledger.wait`, which takes that lock, so no condition
    variable is needed; a ``concurrent.futures.Future`` (a condition and a lock to make,
    take and notify on every write) cost several microseconds per commit for nothing.
    """

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = False
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the write committed or failed."""
        return self._done

    def result(self) -> None:
        """Raise the write's error if it failed, LedgerError if it is not done."""
        if self._error is not None:
            raise self._error
        if not self._done:
            raise LedgerError("ledger write was never committed")

    def _set(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done = True


class Durability(enum.Enum):
    """What an acknowledged ledger write survives (module docstring)."""

    POWER = "power"
    CRASH = "crash"

    @property
    def synchronous(self) -> str:
        """SQLite's ``PRAGMA synchronous`` value for this level (in WAL mode)."""
        return "FULL" if self is Durability.POWER else "NORMAL"


class Ledger:
    """A SQLite ledger whose waiting callers commit in groups (module docstring).

    Raises :class:`LedgerError` when the file cannot be opened, belongs to another device,
    has an unknown schema, or a write fails (after which every write fails: fail-stop).
    """

    def __init__(
        self,
        path: Path | str,
        device_fingerprint: str,
        *,
        durability: Durability = Durability.POWER,
    ) -> None:
        self.path = Path(path)
        self.durability = durability
        self.batches = 0  # transactions committed (for group-commit figures)
        self.records = 0
        self._failed: BaseException | None = None
        self._closed = False
        #: called by the leader before each commit; what they return joins the transaction
        #: (the VM registry's request counters ride along with every commit this way)
        self.precommit: list[Callable[[], list[Record]]] = []
        # the queue of (records, outcome), guarded by _queue_lock; _commit_lock is held by
        # whoever takes the queue and commits it (the leader)
        self._queued: list[tuple[list[Record], Durable]] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._read_lock = threading.Lock()  # guards _reader
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={durability.synchronous}")
            self._db.executescript(_SCHEMA)
            # a second connection for lookups while the daemon runs: it sees committed
            # transactions only, and never waits behind the writer's (WAL)
            self._reader = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open ledger {self.path}: {e}", path=str(self.path)) from e
        self._check_identity(device_fingerprint)

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

    def requests(self, last: int | None = None) -> list[PutRequest]:
        """The stored request results, oldest first; only the ``last`` newest if given."""
        rows = self._db.execute(
            "SELECT owner, request_id, digest, response FROM requests ORDER BY seq DESC "
            "LIMIT ?",
            (-1 if last is None else last,),  # SQLite: a negative limit is no limit
        ).fetchall()
        return [PutRequest(o, r, d, json.loads(resp)) for o, r, d, resp in reversed(rows)]

    def request(self, owner: str, request_id: str) -> PutRequest | None:
        """The committed result of request ``request_id`` of ``owner``, if still retained.
        Safe from any thread while the ledger is being written."""
        with self._read_lock:
            row = self._reader.execute(
                "SELECT digest, response FROM requests WHERE owner = ? AND request_id = ?",
                (owner, request_id),
            ).fetchone()
        if row is None:
            return None
        return PutRequest(owner, request_id, row[0], json.loads(row[1]))

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # ---------------------------------------------------------------- writing

    def submit(self, records: Sequence[Record]) -> Durable:
        """Queue ``records`` to be written atomically; :meth:`wait` on the returned
        :class:`Durable` makes them durable (nothing commits the queue on its own)."""
        if self._failed is not None:
            raise LedgerError(f"ledger {self.path} stopped after a failed write: {self._failed}")
        if self._closed:
            raise LedgerError(f"ledger {self.path} is closed")
        fut = Durable()
        with self._queue_lock:
            self._queued.append((list(records), fut))
        return fut

    def wait(self, fut: Durable) -> None:
        """Wait until a submitted write is durable: once no commit is in progress, commit
        the queue in this thread (the leader) unless a commit already carried this write.
        Raises LedgerError if the write failed."""
        # Whoever takes the queue sets the outcome of every write in it before it releases
        # the commit lock, so holding that lock, ``fut`` is either done or still queued.
        if not fut.done():
            with self._commit_lock:
                if not fut.done():
                    self._commit_queued()
        try:
            fut.result()
        except LedgerError:
            raise
        except Exception as e:
            raise LedgerError(f"ledger write failed: {e}") from e

    def write(self, records: Sequence[Record]) -> None:
        """Write ``records`` atomically and durably; returns when they are on disk."""
        self.wait(self.submit(records))

    def _commit_queued(self) -> None:
        """Take the whole queue and commit it as one transaction (commit lock held)."""
        with self._queue_lock:
            batch, self._queued = self._queued, []
        if batch:
            self._commit(batch)

    def _commit(self, batch: list[tuple[list[Record], Durable]]) -> None:
        if self._failed is not None:
            for _, fut in batch:
                fut._set(LedgerError(f"ledger stopped after a failed write: {self._failed}"))
            return
        try:
            if failpoints.armed:
                failpoints.hit("ledger.before_write", LedgerError)
            self._db.execute("BEGIN IMMEDIATE")
            for hook in self.precommit:
                for r in hook():
                    self._apply(r)
            for records, _ in batch:
                for r in records:
                    self._apply(r)
            if failpoints.armed:
                failpoints.hit("ledger.before_commit", LedgerError)
            self._db.execute("COMMIT")  # durability POWER: the WAL is fsync'ed here
            if failpoints.armed:
                failpoints.hit("ledger.after_commit", LedgerError)
        except BaseException as e:  # disk full, I/O error, corrupt file: stop writing
            self._failed = e
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            for _, fut in batch:
                fut._set(LedgerError(f"ledger write failed: {e}"))
            return
        self.batches += 1
        self.records += len(batch)
        for _, fut in batch:
            fut._set()

    def _apply(self, r: Record) -> None:
        db = self._db
        if isinstance(r, PutSlice):
            db.execute(
                "INSERT OR REPLACE INTO slices VALUES (?, ?, ?, ?)",
                (
                    r.id,
                    r.owner,
                    _dumps(r.spec),
                    _dumps(r.alloc),
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
                (r.owner, r.request_id, r.digest, _dumps(r.response)),
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
        with self._commit_lock:
            self._commit_queued()
        with self._read_lock:
            self._reader.close()
        self._db.close()
