"""Named failpoints: places where a test can make the firmware crash or fail on purpose.

Each durable step of the firmware is bracketed by failpoints (the list is :data:`POINTS`
and docs/reliability.md). They are off unless the environment variable
``SLICEFAB_FAILPOINTS`` names some when the process starts::

    SLICEFAB_FAILPOINTS="ledger.after_commit=crash@3,fabric.after_writes=error"

Each entry is ``NAME=ACTION[@N]``: the action fires on the N-th time the point is reached
(default: the first), then the point disarms. Actions:

* ``crash`` — the process kills itself with SIGKILL on the spot: no cleanup, no flush, no
  atexit, exactly what a power-off of the firmware process looks like to the files;
* ``error`` — the step fails as it would on its own: a ledger step raises (the ledger's
  fail-stop follows), a fabric step raises FabricError (a bus error), a reply is dropped.

Zero cost when off: every call site is ``if failpoints.armed: failpoints.hit(NAME)``, a
module attribute test. A name that is not in :data:`POINTS` is refused at start, so a typo
in a test cannot silently test nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from firmware.errors import ConfigError, SlicefabError

ENV = "SLICEFAB_FAILPOINTS"

#: every failpoint, before and after each durable step, with what is being done there
POINTS: dict[str, str] = {
    "ledger.before_write": "a group commit is about to apply its records (nothing written)",
    "ledger.before_commit": "the records are applied in the open transaction; COMMIT "
    "(write + fsync of the WAL, done together by SQLite) is next",
    "ledger.after_commit": "the transaction is durable; its callers are not yet told",
    "fabric.before_writes": "the write list for a reconfiguration is computed, none sent",
    "fabric.after_writes": "the shadow registers are written, the commit is not",
    "fabric.after_commit": "CTRL.commit is written; the ports have not all adopted",
    "qmp.before_call": "the QEMU backend is about to send a QMP command that changes a VM's "
    "hardware (qom-set, blockdev-add/del, device_add/del); nothing sent",
    "qmp.after_call": "QEMU has answered that command (a device_del's DEVICE_DELETED "
    "included); the backend has not recorded it",
    "reply.before_send": "the response is built; the client has not got it",
    "reply.after_send": "the response is published to the client",
    "etcd.before_txn": "a pool composer placed a composition; its reservation transaction "
    "is not sent (firmware/pool/composer.py)",
    "etcd.after_txn": "the reservation transaction committed in etcd; the composer has not "
    "waited for the devices to program their parts",
}

ACTIONS = ("crash", "error")


class FailpointError(SlicefabError):
    """An ``error`` failpoint fired (a deliberately injected failure; on the wire it is the
    generic firmware error)."""


@dataclass
class _Arm:
    action: str
    countdown: int  # hits left before it fires (1: the next one)


#: True when any failpoint is armed (the only thing call sites look at when off)
armed = False
_arms: dict[str, _Arm] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """``NAME=ACTION[@N],...`` → {name: (action, n)}. Raises ConfigError naming the entry."""
    out: dict[str, tuple[str, int]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, rest = entry.partition("=")
        action, at, count = rest.partition("@")
        if not sep or name not in POINTS:
            raise ConfigError(
                f"{ENV}: {entry!r} does not name a failpoint",
                expected=sorted(POINTS),
            )
        if action not in ACTIONS:
            raise ConfigError(f"{ENV}: {entry!r}: unknown action {action!r}", expected=ACTIONS)
        try:
            n = int(count) if at else 1
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"{ENV}: {entry!r}: expected @N with N >= 1")
        out[name] = (action, n)
    return out


def arm(spec: str) -> None:
    """Arm the failpoints of ``spec`` (replacing any armed ones)."""
    global armed
    parsed = parse(spec)
    with _lock:
        _arms.clear()
        _arms.update({name: _Arm(action, n) for name, (action, n) in parsed.items()})
        armed = bool(_arms)


def disarm() -> None:
    arm("")


def hit(name: str, error: type[SlicefabError] = FailpointError) -> None:
    """Reach failpoint ``name``: fire it if armed and its count is up. ``error`` is what
    an ``error`` action raises (the step's own failure, e.g. FabricError for a bus)."""
    with _lock:
        a = _arms.get(name)
        if a is None:
            return
        a.countdown -= 1
        if a.countdown > 0:
            return
        del _arms[name]
        global armed
        armed = bool(_arms)
    if a.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    raise error(f"failpoint {name} fired", failpoint=name)


arm(os.environ.get(ENV, ""))
