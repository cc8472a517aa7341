"""The usage model: per slice, a time series of measured use, in the ledger's database.

What is measured (:class:`UsageSample`), and by whom (its ``source``):

* memory in use: reported by the guest (``REPORT_USAGE``, C302h; source :data:`GUEST`), or,
  for a VM that runs as a QEMU guest of the firmware, read from QEMU's virtio-balloon guest
  statistics and virtio-mem (``slicefab_qemu.usage``; source :data:`QEMU_BALLOON`). When
  both measured a slice in the same bucket, the guest's report wins (it is per slice; QEMU's
  is per VM, shared out over its slices): :data:`SOURCE_RANK`;
* busy cores: reported by the guest;
* port traffic, Mbit/s on the busiest of the slice's crossbar ports (flit counters read by
  :meth:`firmware.adaptive.controller.AdaptiveController.sample_fabric`; source
  :data:`FABRIC`).

Samples are keyed by slice and by the slice's owner and
application class, so the forecaster can learn from a VM's history across slices that come
and go (a daily batch job's slice is a new slice every day).

Where it is kept: tables of their own in the ledger's SQLite file, written through a
second connection with ``synchronous=NORMAL``. Usage is not allocation state: losing the
last seconds of it in a power cut costs nothing, and a failed usage write must not stop
the firmware, so it does not go through the ledger's fsync'ing, fail-stop group commit.
Policies and decisions are kept the same way. The tables are additive: a firmware that
does not know them ignores them.

Bounded retention (docs/adaptive.md, "Retention"):

* samples are bucketed: one row per slice per :data:`RESOLUTION_S` seconds; a report
  into a bucket that has one keeps the peak of each measure (what the controller and the
  forecaster need: the highest use in the interval), among the samples of the
  highest-ranked source for memory;
* rows older than :data:`RETENTION_S` before the newest sample are deleted
  (:meth:`UsageStore.prune`, run every :data:`PRUNE_EVERY_S` of sample time), so a slice
  never has more than ``(RETENTION_S + PRUNE_EVERY_S) / RESOLUTION_S + 1`` rows (11,531
  with the defaults, about 1 MB), and the table at most that many per slice that
  reported in the last ``RETENTION_S``;
* decisions: the most recent :data:`DECISION_RETENTION` are kept.

Time is whatever clock the caller passes (``at``, seconds): the daemon passes
``time.time()``, tests and the benchmark a simulated clock.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from firmware.errors import LedgerError

#: one row per slice per this many seconds (reports within it keep the peak)
RESOLUTION_S = 60
#: rows older than this before the newest sample are deleted (8 days: the forecaster
#: looks back 7 days, plus one for the day in progress)
RETENTION_S = 8 * 86400
#: prune at most this often (seconds of sample time)
PRUNE_EVERY_S = 600
#: the number of controller decisions kept
DECISION_RETENTION = 10_000

#: usage sources (UsageSample.source)
GUEST = "guest"  # REPORT_USAGE from the VM
QEMU_BALLOON = "qemu-balloon"  # QEMU's balloon statistics + virtio-mem (slicefab_qemu.usage)
FABRIC = "fabric"  # the crossbar's flit counters
#: which memory measure wins in a bucket both measured: the higher rank
SOURCE_RANK = {GUEST: 2, QEMU_BALLOON: 1}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_samples (
    slice INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    owner TEXT NOT NULL,
    app_class TEXT NOT NULL,
    at REAL NOT NULL,
    memory_used INTEGER,
    cores_busy REAL,
    port_mbps REAL,
    memory_source TEXT,
    PRIMARY KEY (slice, bucket)
);
CREATE INDEX IF NOT EXISTS usage_by_bucket ON usage_samples (bucket);
CREATE INDEX IF NOT EXISTS usage_by_class ON usage_samples (owner, app_class, bucket);
CREATE TABLE IF NOT EXISTS adaptive_policies (
    slice INTEGER NOT NULL,
    resource TEXT NOT NULL,
    policy TEXT NOT NULL,
    PRIMARY KEY (slice, resource)
);
CREATE TABLE IF NOT EXISTS adaptive_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    slice INTEGER NOT NULL,
    owner TEXT NOT NULL,
    resource TEXT NOT NULL,
    action TEXT NOT NULL,
    before INTEGER NOT NULL,
    after INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""


class Resource(enum.Enum):
    """What a policy controls: memory in bytes, cores (a count), or bandwidth (the Mbit/s
    the slice holds on each of its crossbar ports)."""

    MEMORY = "memory"
    CORES = "cores"
    BANDWIDTH = "bandwidth"


class Action(enum.Enum):
    """What the controller decided for one slice and resource (docs/adaptive.md)."""

    UP = "up"  # usage near the limit: grow
    DOWN = "down"  # usage stayed low: shrink
    RESERVE = "reserve"  # grow ahead of predicted demand
    RELEASE = "release"  # a reservation whose demand did not come: shrink back
    YIELD = "yield"  # shrunk so that a higher-priority slice can grow
    BOUNDS = "bounds"  # brought within the policy's [minimum, maximum]
    REFUSED = "refused"  # wanted to grow, the device could not give it


@dataclass(frozen=True)
class UsageSample:
    """One measurement of a slice. ``None``: not measured by this source. ``source`` says
    who measured ``memory_used`` (:data:`GUEST` or :data:`QEMU_BALLOON`); as read back
    from the store, it is the source whose memory measure won the bucket."""

    slice_id: int
    owner: str
    app_class: str
    at: float
    memory_used: int | None = None  # bytes
    cores_busy: float | None = None  # cores' worth of busy time
    port_mbps: float | None = None  # traffic entering the busiest of the slice's ports
    source: str = GUEST

    def value(self, resource: Resource) -> float | None:
        """The measure ``resource`` is controlled by (None if this sample lacks it)."""
        if resource is Resource.MEMORY:
            return None if self.memory_used is None else float(self.memory_used)
        if resource is Resource.BANDWIDTH:
            return self.port_mbps
        return self.cores_busy


@dataclass(frozen=True)
class SliceMemory:
    """What a :class:`UsageSource` is told of a slice: its owner and the memory it holds."""

    owner: str
    memory: int  # bytes


class UsageSource(Protocol):
    """A measure of slices' memory use taken by the firmware itself, besides the guest's
    ``REPORT_USAGE`` and the fabric counters: the QEMU backend's balloon statistics
    (``slicefab_qemu.usage.QemuUsage``). ``sample`` gets every slice that holds memory
    and returns samples for those it could measure (``source`` set, ``app_class``
    filled in by the controller); it may raise, and the controller then logs it and
    goes on without this source for the tick."""

    name: str

    def sample(self, now: float, slices: Mapping[int, SliceMemory]) -> list[UsageSample]: ...


#: the usage_samples column each resource is controlled by
_COLUMN = {
    Resource.MEMORY: "memory_used",
    Resource.CORES: "cores_busy",
    Resource.BANDWIDTH: "port_mbps",
}


def _rank(column: str) -> str:
    """SQL: the rank of a memory source (:data:`SOURCE_RANK`; unknown and NULL rank 0)."""
    cases = " ".join(f"WHEN '{k}' THEN {v}" for k, v in SOURCE_RANK.items())
    return f"(CASE coalesce({column}, '{GUEST}') {cases} ELSE 0 END)"


# A report into a bucket that has a row: memory from the higher-ranked source (the peak
# of the two if they rank the same); cores and port traffic keep their peak.
_NEW, _OLD = _rank("excluded.memory_source"), _rank("memory_source")
_MERGE = (
    "INSERT INTO usage_samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (slice, bucket) DO UPDATE SET "
    "at = max(at, excluded.at), owner = excluded.owner, app_class = excluded.app_class, "
    "memory_used = CASE "
    "  WHEN excluded.memory_used IS NULL THEN memory_used "
    "  WHEN memory_used IS NULL THEN excluded.memory_used "
    f"  WHEN {_NEW} > {_OLD} THEN excluded.memory_used "
    f"  WHEN {_NEW} < {_OLD} THEN memory_used "
    "  ELSE max(memory_used, excluded.memory_used) END, "
    "memory_source = CASE "
    "  WHEN excluded.memory_used IS NULL THEN memory_source "
    "  WHEN memory_used IS NULL THEN excluded.memory_source "
    f"  WHEN {_NEW} > {_OLD} THEN excluded.memory_source "
    "  ELSE memory_source END, "
    "cores_busy = max(coalesce(cores_busy, excluded.cores_busy), "
    "                 coalesce(excluded.cores_busy, cores_busy)), "
    "port_mbps = max(coalesce(port_mbps, excluded.port_mbps), "
    "                coalesce(excluded.port_mbps, port_mbps))"
)


@dataclass(frozen=True)
class Decision:
    """One controller decision, as stored (``id`` 0 until stored)."""

    at: float
    slice_id: int
    owner: str
    resource: Resource
    action: Action
    before: int
    after: int
    reason: str
    id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "at": self.at, "slice": self.slice_id, "owner": self.owner,
            "resource": self.resource.value, "action": self.action.value,
            "before": self.before, "after": self.after, "reason": self.reason,
        }  # fmt: skip


def _source_of(memory_used: int | None, cores_busy: float | None) -> str:
    """The source of a row with no memory_source: a guest's report (rows written before
    sources were recorded were all the guest's), or the fabric's if it only has traffic."""
    return GUEST if memory_used is not None or cores_busy is not None else FABRIC


class UsageStore:
    """Usage samples, adaptive policies and decisions in the ledger's database file.

    Thread-safe (one connection behind a lock: the mailbox workers report usage while the
    controller reads it). Raises :class:`LedgerError` when the database cannot be opened
    or written."""

    def __init__(
        self,
        path: Path | str,
        *,
        resolution_s: int = RESOLUTION_S,
        retention_s: int = RETENTION_S,
        decision_retention: int = DECISION_RETENTION,
    ) -> None:
        if resolution_s <= 0 or retention_s < resolution_s:
            raise ValueError("usage store: need 0 < resolution_s <= retention_s")
        self.path = Path(path)
        self.resolution_s = resolution_s
        self.retention_s = retention_s
        self.decision_retention = decision_retention
        self._lock = threading.Lock()
        self._next_prune = float("-inf")
        self._newest = float("-inf")
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=5.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(usage_samples)")}
            if "memory_source" not in columns:  # a file from before usage sources
                self._db.execute("ALTER TABLE usage_samples ADD COLUMN memory_source TEXT")
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open usage tables in {self.path}: {e}") from e

    def _write(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, tuple(params))
        except sqlite3.Error as e:
            raise LedgerError(f"usage store {self.path}: {e}") from e

    # ---------------------------------------------------------------- samples

    def record(self, samples: Iterable[UsageSample]) -> None:
        """Store samples (one transaction); a sample into a bucket that has one keeps the
        peak of each measure. Prunes old rows every ``PRUNE_EVERY_S`` of sample time."""
        rows = [
            (s.slice_id, int(s.at // self.resolution_s), s.owner, s.app_class, s.at,
             s.memory_used, s.cores_busy, s.port_mbps,
             s.source if s.memory_used is not None else None)
            for s in samples
        ]  # fmt: skip
        if not rows:
            return
        with self._lock:
            self._write("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_MERGE, rows)
                self._newest = max(self._newest, max(r[4] for r in rows))
                if self._newest >= self._next_prune:
                    self._prune_locked(self._newest)
                self._write("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def prune(self, now: float) -> int:
        """Delete samples older than the retention before ``now``; returns how many."""
        with self._lock:
            return self._prune_locked(now)

    def _prune_locked(self, now: float) -> int:
        self._next_prune = now + PRUNE_EVERY_S
        oldest = int((now - self.retention_s) // self.resolution_s)
        return self._write("DELETE FROM usage_samples WHERE bucket < ?", (oldest,)).rowcount

    def window(self, slice_id: int, since: float) -> list[UsageSample]:
        """The slice's samples at or after ``since``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT slice, owner, app_class, at, memory_used, cores_busy, port_mbps, "
                "memory_source FROM usage_samples WHERE slice = ? AND bucket >= ? "
                "ORDER BY bucket",
                (slice_id, int(since // self.resolution_s)),
            ).fetchall()
        return [
            UsageSample(sid, owner, cls, at, mem, cores, mbps, src or _source_of(mem, cores))
            for sid, owner, cls, at, mem, cores, mbps, src in rows
            if at >= since
        ]

    def history(
        self, owner: str, app_class: str, resource: Resource, since: float
    ) -> list[tuple[float, float]]:
        """``(at, value)`` of ``resource`` for every slice of ``owner`` labelled
        ``app_class``, from ``since``, oldest first (the forecaster's input)."""
        column = _COLUMN[resource]
        with self._lock:
            rows = self._db.execute(
                f"SELECT at, {column} FROM usage_samples WHERE owner = ? AND app_class = ? "
                f"AND bucket >= ? AND {column} IS NOT NULL ORDER BY bucket",
                (owner, app_class, int(since // self.resolution_s)),
            ).fetchall()
        return [(float(a), float(v)) for a, v in rows]

    def sample_count(self, slice_id: int | None = None) -> int:
        with self._lock:
            if slice_id is None:
                row = self._db.execute("SELECT count(*) FROM usage_samples").fetchone()
            else:
                row = self._db.execute(
                    "SELECT count(*) FROM usage_samples WHERE slice = ?", (slice_id,)
                ).fetchone()
        return int(row[0])

    # ---------------------------------------------------------------- policies

    def put_policy(self, slice_id: int, resource: Resource, policy: dict[str, Any]) -> None:
        with self._lock:
            self._write(
                "INSERT OR REPLACE INTO adaptive_policies VALUES (?, ?, ?)",
                (slice_id, resource.value, json.dumps(policy, sort_keys=True)),
            )

    def delete_policy(self, slice_id: int, resource: Resource | None = None) -> int:
        """Forget the slice's policy for ``resource`` (None: every resource)."""
        with self._lock:
            if resource is None:
                cur = self._write("DELETE FROM adaptive_policies WHERE slice = ?", (slice_id,))
            else:
                cur = self._write(
                    "DELETE FROM adaptive_policies WHERE slice = ? AND resource = ?",
                    (slice_id, resource.value),
                )
        return cur.rowcount

    def policies(self) -> list[dict[str, Any]]:
        """Every stored policy (as :meth:`AdaptivePolicy.to_dict` wrote it), by slice."""
        with self._lock:
            rows = self._db.execute(
                "SELECT policy FROM adaptive_policies ORDER BY slice, resource"
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    # ---------------------------------------------------------------- decisions

    def record_decision(self, d: Decision) -> Decision:
        """Store a decision; returns it with its id. Keeps the most recent
        ``decision_retention``."""
        with self._lock:
            cur = self._write(
                "INSERT INTO adaptive_decisions "
                "(at, slice, owner, resource, action, before, after, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (d.at, d.slice_id, d.owner, d.resource.value, d.action.value, d.before,
                 d.after, d.reason),
            )  # fmt: skip
            new_id = int(cur.lastrowid or 0)
            if new_id % 256 == 0:
                self._write(
                    "DELETE FROM adaptive_decisions WHERE id <= ?",
                    (new_id - self.decision_retention,),
                )
        return Decision(d.at, d.slice_id, d.owner, d.resource, d.action, d.before, d.after,
                        d.reason, new_id)  # fmt: skip

    def decisions(
        self,
        *,
        slice_id: int | None = None,
        owner: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[Decision]:
        """Stored decisions, oldest first: those with an id above ``after``; with
        ``after`` 0, the most recent ``limit``. Optionally of one slice or one owner."""
        where: list[str] = ["id > ?"]
        params: list[object] = [after]
        if slice_id is not None:
            where.append("slice = ?")
            params.append(slice_id)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        order = "ASC" if after else "DESC"
        with self._lock:
            rows = self._db.execute(
                "SELECT at, slice, owner, resource, action, before, after, reason, id FROM "
                f"adaptive_decisions WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT ?",
                (*params, limit),
            ).fetchall()
        out = [
            Decision(at, s, o, Resource(r), Action(a), b, af, reason, i)
            for at, s, o, r, a, b, af, reason, i in rows
        ]
        return out if after else out[::-1]

    def close(self) -> None:
        with self._lock:
            self._db.close()
