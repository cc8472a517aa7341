"""VM credentials, request counters and bad-request rate limits.

The administrator provisions each VM (``slicefab vm add``): the firmware draws a 32-byte key,
records it with the VM's mailbox path in the ledger, and writes a *credential file* the
administrator hands to the VM (into the guest, or to the process standing in for it).
Every request the VM sends carries a sequence number that must be larger than any accepted
before (:mod:`abi.envelope`); the highest accepted number is kept in the ledger, so a
request captured before a restart cannot be replayed after it.

Persistence of the counter: an accepted counter joins the next ledger commit (a pre-commit
hook), so a state-changing request, acknowledged only once its change is durable, has its
counter durable too, at no extra fsync. Read-only requests commit nothing themselves; a
background flush makes their counters durable within FLUSH_INTERVAL_S. After a crash the
counter may lag by that window of read-only requests, whose replay only re-reads the VM's
own state into the VM's own mailbox (docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from abi.envelope import KEY_BYTES
from firmware.errors import NotFound, RequestError, SlicefabError
from firmware.ledger import DeleteVm, Ledger, PutVm, PutVmSeq, Record
from firmware.slices import OWNER_RE

#: how long an accepted counter of a read-only request may wait for the ledger
FLUSH_INTERVAL_S = 0.1


class ReplayError(SlicefabError):
    """A request sequence number not above the last one accepted from this VM."""

    code = "replay"


@dataclass(frozen=True)
class VmCredential:
    vm: str
    key: bytes
    mailbox: str


class VmRegistry:
    """The provisioned VMs of one firmware instance. Thread-safe."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._lock = threading.Lock()
        self._vms: dict[str, VmCredential] = {}
        self._seq: dict[str, int] = {}
        self._dirty: dict[str, int] = {}  # accepted counters not yet handed to the ledger
        self._stop = threading.Event()
        ledger.precommit.append(self._drain)
        self._flusher = threading.Thread(target=self._flush_loop, name="vm-seq-flush", daemon=True)
        self._flusher.start()
        for row in ledger.vms():
            self._vms[row.vm] = VmCredential(row.vm, row.key, row.mailbox)
            self._seq[row.vm] = row.last_seq

    def add(self, vm: str, mailbox: str) -> VmCredential:
        """Provision ``vm`` with a fresh key (durable before it returns).

        Raises RequestError for a bad VM id, ResourceConflict-like RequestError if it exists.
        """
        if not isinstance(vm, str) or not OWNER_RE.fullmatch(vm):
            raise RequestError("vm", f"{vm!r} is not a VM id (1-64 of A-Z a-z 0-9 _ . -)")
        with self._lock:
            if vm in self._vms:
                raise RequestError("vm", f"VM {vm} is already provisioned; remove it first")
            cred = VmCredential(vm, secrets.token_bytes(KEY_BYTES), mailbox)
            durable = self.ledger.submit([PutVm(vm, cred.key, mailbox)])
            self._vms[vm] = cred
            self._seq[vm] = 0
        self.ledger.wait(durable)
        return cred

    def remove(self, vm: str) -> None:
        with self._lock:
            if vm not in self._vms:
                raise NotFound(f"no VM {vm}", vm=vm)
            durable = self.ledger.submit([DeleteVm(vm)])
            del self._vms[vm]
            del self._seq[vm]
        self.ledger.wait(durable)

    def get(self, vm: str) -> VmCredential:
        with self._lock:
            cred = self._vms.get(vm)
        if cred is None:
            raise NotFound(f"no VM {vm}", vm=vm)
        return cred

    def credentials(self) -> list[VmCredential]:
        with self._lock:
            return sorted(self._vms.values(), key=lambda c: c.vm)

    def last_seq(self, vm: str) -> int:
        with self._lock:
            return self._seq.get(vm, 0)

    def accept_seq(self, vm: str, seq: int) -> None:
        """Accept ``seq`` from ``vm`` if it is above every number accepted before, and queue
        the new high-water mark to the ledger. Raises :class:`ReplayError` otherwise."""
        with self._lock:
            last = self._seq.get(vm)
            if last is None:
                raise NotFound(f"no VM {vm}", vm=vm)
            if seq <= last:
                raise ReplayError(
                    f"sequence number {seq} is not above the last accepted ({last}): "
                    "a replayed or reordered request",
                    seq=seq, last=last,
                )
            self._seq[vm] = seq
            self._dirty[vm] = seq  # joins the next ledger commit (see _drain)

    def _drain(self) -> list[Record]:
        """Pre-commit hook of the ledger: the counters accepted since the last commit. A
        state-changing request is accepted before its change is queued, so its counter is
        in the same transaction as its change or an earlier one: durable before its ack."""
        with self._lock:
            dirty, self._dirty = self._dirty, {}
        return [PutVmSeq(vm, seq) for vm, seq in sorted(dirty.items())]

    def flush(self) -> None:
        """Make every accepted counter durable now."""
        with self._lock:
            pending = bool(self._dirty)
        if pending:
            self.ledger.write([])  # an empty batch: the pre-commit hook supplies the records

    def _flush_loop(self) -> None:
        # read-only traffic commits nothing itself: bound how far the durable counter lags
        while not self._stop.wait(FLUSH_INTERVAL_S):
            with contextlib.suppress(SlicefabError):
                self.flush()

    def close(self) -> None:
        """Stop the background flush and flush what is left."""
        self._stop.set()
        self._flusher.join()
        with contextlib.suppress(SlicefabError):
            self.flush()


def write_credential_file(path: Path, cred: VmCredential) -> None:
    """The file the administrator hands to the VM: its id, key and mailbox (mode 0600).
    The VM reads it with ``hostlib.credentials.load_credential``."""
    text = (
        "# Slicefab VM credential: keep secret. Anyone holding it can act as this VM.\n"
        f'vm = "{cred.vm}"\n'
        f'key = "{cred.key.hex()}"\n'
        f'mailbox = "{cred.mailbox}"\n'
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class BadRequestLimiter:
    """Token bucket of *bad* requests per channel: each authentication failure, replay or
    malformed frame costs a token; with none left the channel is answered ``Busy`` without
    any verification until tokens come back, so a flood of garbage costs the firmware
    almost nothing. Good requests cost nothing."""

    def __init__(self, burst: int = 32, per_second: float = 16.0) -> None:
        self.burst = burst
        self.rate = per_second
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.rejected = 0  # requests refused because the bucket was empty

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def limited(self) -> bool:
        """True when the channel must be refused now (counts the refusal)."""
        if self._tokens >= 1:  # refilling only adds: no clock read on the common path
            return False
        self._refill()
        if self._tokens < 1:
            self.rejected += 1
            return True
        return False

    def charge(self) -> None:
        """A bad request happened."""
        self._refill()
        self._tokens = max(0.0, self._tokens - 1)
