"""The Slicefab guest runner: hostlib, in the guest, driven by the host.

One request per line on a virtio-serial port, one answer per line::

    → {"id": 7, "op": "call", "method": "allocate", "kwargs": {"memory": "128 MiB"},
       "expect": [{"memtotal_kib_delta": 131072}], "expect_timeout": 10}
    ← {"id": 7, "ok": true, "result": {...SliceInfo...}, "call_s": 0.41, "visible_s": 0.93}
    ← {"id": 8, "ok": false, "error": {"type": "PermissionDenied", "code": "denied",
       "message": "..."}}

Operations: ``hello``; ``find`` (discovery as hostlib does it: pyudev, the ivshmem
device, the mailbox signature in BAR2); ``open`` (``Device.open()`` with the credential
the guest's init installed); ``call`` (a :class:`hostlib.Device` method, with optional
``expect`` conditions polled until they hold); ``wait`` (``expect`` conditions alone,
e.g. for the guest to finish giving memory back after a rollback); ``state`` (what the
guest kernel shows); ``heartbeat_start`` / ``heartbeat_stop``.

``expect`` conditions, all of which must hold (``visible_s`` counts from the call's start):
``{"memtotal_kib": N}`` or ``{"memtotal_kib_delta": N}`` (against MemTotal before the
call), ``{"nvme_serial": S, "present": bool}``, ``{"cpus_online": N}``.

Imports hostlib and the standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any, BinaryIO

import hostlib
from hostlib import discovery

#: the Device methods the host may call (everything a VM can do)
METHODS = frozenset(
    {"allocate", "resize", "free", "get", "slices", "telemetry", "device_info", "nop"}
)
POLL_S = 0.005


def _cpu_count(path: str) -> int:
    """Count the CPUs in a sysfs list like ``0-2,4``."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return 0
    n = 0
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def memtotal_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    raise RuntimeError("no MemTotal in /proc/meminfo")


def nvme_controllers() -> dict[str, str]:
    """``{controller: serial}`` of every NVMe controller (/sys/class/nvme)."""
    out: dict[str, str] = {}
    try:
        names = sorted(os.listdir("/sys/class/nvme"))
    except OSError:
        return out
    for name in names:
        try:
            with open(f"/sys/class/nvme/{name}/serial") as f:
                out[name] = f.read().strip()
        except OSError:
            continue
    return out


def guest_state() -> dict[str, Any]:
    try:
        cxl = sorted(os.listdir("/sys/bus/cxl/devices"))
    except OSError:
        cxl = []
    return {
        "memtotal_kib": memtotal_kib(),
        "nvme": nvme_controllers(),
        "cpus_online": _cpu_count("/sys/devices/system/cpu/online"),
        "cpus_present": _cpu_count("/sys/devices/system/cpu/present"),
        "cxl": cxl,
    }


def _holds(cond: Mapping[str, Any], base_kib: int) -> bool:
    if "memtotal_kib" in cond:
        return memtotal_kib() == int(cond["memtotal_kib"])
    if "memtotal_kib_delta" in cond:
        return memtotal_kib() - base_kib == int(cond["memtotal_kib_delta"])
    if "nvme_serial" in cond:
        present = cond["nvme_serial"] in nvme_controllers().values()
        return present == bool(cond.get("present", True))
    if "cpus_online" in cond:
        return _cpu_count("/sys/devices/system/cpu/online") == int(cond["cpus_online"])
    raise ValueError(f"unknown expect condition {dict(cond)!r}")


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, bytes):
        return x.hex()
    return x


def _error(e: BaseException) -> dict[str, Any]:
    return {
        "type": type(e).__name__,
        "code": getattr(e, "code", "exception"),
        "message": getattr(e, "message", str(e)),
    }


class Runner:
    def __init__(self) -> None:
        self.device: hostlib.Device | None = None
        self.heartbeat: subprocess.Popen[str] | None = None

    def handle(self, req: Mapping[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "hello":
            return {"pid": os.getpid(), "python": sys.version.split()[0]}
        if op == "find":
            found = discovery.scan(discovery.pci_devices())
            return {
                "candidates": [dataclasses.asdict(c) for c in found.candidates],
                "rejected": [list(r) for r in found.rejected],
            }
        if op == "open":
            if self.device is not None:
                self.device.close()
            # a free waits for the guest to let go of its NVMe controller: allow for it
            self.device = hostlib.Device.open(
                req.get("credential"), timeout=float(req.get("timeout_s", 60.0))
            )
            session = self.device.session
            return {"vm": self.device.client.credential.vm, "session": _jsonable(session)}
        if op == "call":
            return self._call(req)
        if op == "wait":
            return self._wait(req, "wait", memtotal_kib(), time.monotonic())
        if op == "state":
            return guest_state()
        if op == "heartbeat_start":
            return self._heartbeat_start(float(req.get("period", 0.01)))
        if op == "heartbeat_stop":
            return self._heartbeat_stop()
        raise ValueError(f"unknown op {op!r}")

    def _call(self, req: Mapping[str, Any]) -> dict[str, Any]:
        method = req.get("method")
        if method not in METHODS:
            raise ValueError(f"method {method!r} is not one of {sorted(METHODS)}")
        if self.device is None:
            raise RuntimeError("no device open: send an 'open' request first")
        base = memtotal_kib()
        t0 = time.monotonic()
        result = getattr(self.device, method)(*req.get("args", []), **req.get("kwargs", {}))
        call_s = time.monotonic() - t0
        out: dict[str, Any] = {"result": _jsonable(result), "call_s": call_s}
        if req.get("expect"):
            out.update(self._wait(req, f"after {method}", base, t0))
        return out

    @staticmethod
    def _wait(req: Mapping[str, Any], what: str, base: int, t0: float) -> dict[str, Any]:
        """Poll the request's ``expect`` conditions until all hold: ``{"visible_s"}``
        counted from ``t0``, or TimeoutError naming what the guest shows instead."""
        expect = list(req.get("expect", []))
        if not expect:
            raise ValueError("'expect' must list at least one condition to wait for")
        timeout = float(req.get("expect_timeout", 30.0))
        while not all(_holds(c, base) for c in expect):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(
                    f"{what}: {expect} did not hold within {timeout:g} s "
                    f"(guest shows {guest_state()})"
                )
            time.sleep(POLL_S)
        return {"visible_s": time.monotonic() - t0}

    def _heartbeat_start(self, period: float) -> dict[str, Any]:
        if self.heartbeat is not None:
            raise RuntimeError("a heartbeat is already running")
        hb = subprocess.Popen(
            [sys.executable, "-m", "slicefab_qemu.guest", "heartbeat", "--period", str(period)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert hb.stdout is not None
        first = hb.stdout.readline().strip()
        if first != "ready":
            hb.kill()
            hb.wait()
            raise RuntimeError(f"heartbeat did not start: {first!r}")
        self.heartbeat = hb
        return {"pid": hb.pid}

    def _heartbeat_stop(self) -> dict[str, Any]:
        hb, self.heartbeat = self.heartbeat, None
        if hb is None:
            raise RuntimeError("no heartbeat is running")
        hb.send_signal(signal.SIGTERM)
        out, _ = hb.communicate(timeout=30)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


def serve(port: str) -> int:
    """Answer requests on ``port`` until the guest powers off. While the host end is not
    connected a read returns end-of-file at once, so the loop then waits a little."""
    runner = Runner()
    fd = os.open(port, os.O_RDWR)
    f: BinaryIO = os.fdopen(fd, "r+b", buffering=0)
    buf = b""
    while True:
        chunk = f.read(65536)
        if not chunk:
            time.sleep(0.05)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            rid: Any = None
            try:
                req = json.loads(line)
                rid = req.get("id")
                answer = {"id": rid, "ok": True, **_wrap(runner.handle(req))}
            except Exception as e:  # every failure goes back to the host, the runner stays
                answer = {"id": rid, "ok": False, "error": _error(e)}
            with contextlib.suppress(OSError):  # the host went away; it will ask again
                f.write(json.dumps(answer).encode() + b"\n")


def _wrap(result: dict[str, Any]) -> dict[str, Any]:
    """``call`` answers carry result/call_s/visible_s at the top; others go in result."""
    if "call_s" in result:
        return result
    return {"result": result}
