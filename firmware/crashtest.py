"""The crash-consistency test (issue 8): kill the firmware at a random failpoint in the
middle of a random history, restart it, and check what it recovered against the history.

How one crash point runs (:class:`CrashTest`):

1. A daemon (``slicefab serve``) serves the state directory. Its failpoints are armed with
   ``NAME=crash@N``, NAME drawn from the points a single device reaches (ledger, fabric,
   reply) and N from 1..8.
2. Several VMs (hostlib clients over their shared-memory mailboxes, as a VM uses the
   device) run a seeded random history of allocate / resize / free on their own slices,
   concurrently. Every operation is recorded with its outcome: ``acked`` (the answer came
   back: the slice as the device reported it), ``refused`` (an error answer: nothing may
   have changed), or ``lost`` (the daemon died with it in flight).
3. The daemon dies by SIGKILL at the failpoint (if the history ends first, it is killed
   there: an ``idle`` kill). A new daemon starts on the same state directory and recovers.
4. The checker compares what the new daemon serves with the history:

   * every VM holds exactly the slices of its acknowledged operations, with exactly the
     units it was told (every field of the VM's view);
   * a lost operation is all-or-nothing: a lost allocate left no slice or one slice that
     is exactly the request; a lost resize left the slice as it was or at every one of
     its targets; a lost free left the slice as it was or gone;
   * retrying each lost operation with its request id applies it exactly once: a retry of
     an applied operation answers the first result and changes nothing;
   * the invariant checker (admin ``CHECK``: no unit owned twice or leaked, held + free =
     total, bandwidth admission, the crossbar read back against the slice table) is clean;
   * the crossbar's register file (:mod:`firmware.fabric.regfile`, which outlives the
     process like a device's registers) holds, in both its shadow registers and the
     committed configuration the ports run, exactly the image the ledger's slices imply
     (read by this process from the files, independently of the daemon).

5. The recovered daemon is then armed for the next crash point, so each point costs one
   daemon start. Daemons are forked from a pre-imported server
   (``multiprocessing``'s forkserver) running the real ``slicefab serve`` code
   (``firmware.cli.main``); only the interpreter start-up and imports are shared. The
   failpoints of a running daemon are armed over a pipe by this harness's child entry
   point, as etcd's gofail arms them over HTTP; the firmware itself only reads
   ``SLICEFAB_FAILPOINTS``.

Used by ``tests/test_crash.py`` (CI: 100 crash points; ``make crash-test``: 1,000) and by
``slicefab bench crash``.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import multiprocessing
import os
import random
import signal
import sqlite3
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from firmware import failpoints
from firmware.admin import AdminClient
from firmware.bench import percentile
from firmware.fabric import image as img
from firmware.fabric.regfile import RegisterFile
from firmware.inventory import Device, load_device
from firmware.manager import StateDir
from firmware.slices import Allocation, Slice, SliceSpec
from hostlib.client import AsyncClient, SliceInfo
from hostlib.credentials import Credential
from hostlib.errors import SlicefabError, TransportError

#: the failpoints a single device's daemon reaches without QEMU or a pool
REACHABLE = tuple(p for p in failpoints.POINTS if p.split(".")[0] in ("ledger", "fabric", "reply"))
MAX_HIT = 8  # N of crash@N is drawn from 1..MAX_HIT
READY_TIMEOUT_S = 60.0
OP_TIMEOUT_S = 60.0  # a live daemon answers long before; a dead one is noticed at once

MiB = 1 << 20

_ctx = multiprocessing.get_context("forkserver")
_ctx.set_forkserver_preload(["firmware.crashtest", "firmware.cli", "firmware.api",
                             "firmware.mailboxes", "firmware.admin"])


# ---------------------------------------------------------------------- the daemon


def _serve_child(argv: list[str], log: str, control: Connection) -> None:
    """The daemon's process (forked by the forkserver): ``slicefab serve`` with a thread
    that arms failpoints sent over ``control``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # SIGUSR1 dumps every thread's stack to the log (the load test's deadlock watchdog)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

    def arm() -> None:
        while True:
            try:
                spec = control.recv()
            except (EOFError, OSError):
                return
            failpoints.arm(spec)
            control.send(spec)

    threading.Thread(target=arm, name="failpoint-control", daemon=True).start()
    from firmware.cli import main

    os._exit(main(argv))


class Daemon:
    """One ``slicefab serve`` process on a state directory, started ready to serve."""

    def __init__(self, state: Path, *extra: str) -> None:
        self.state = StateDir(state)
        ours, theirs = _ctx.Pipe()
        self._control = ours
        self.started = time.monotonic()
        self.proc = _ctx.Process(
            target=_serve_child,
            args=(["serve", "--state-dir", str(state), "--no-qemu", *extra],
                  str(state / "daemon.log"), theirs),
            daemon=True,
        )
        self.proc.start()
        theirs.close()
        self.ready_s = self._wait_ready()

    def _wait_ready(self) -> float:
        """Seconds from the start until the admin socket answers. Raises RuntimeError if
        the daemon dies or does not answer within READY_TIMEOUT_S."""
        deadline = self.started + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.proc.is_alive():
                raise RuntimeError(f"daemon exited {self.proc.exitcode} at start: {self.log()}")
            try:
                AdminClient(self.state.socket, timeout=5).close()
                return time.monotonic() - self.started
            except Exception:  # not listening yet (no socket, refused, stale)
                time.sleep(0.002)
        raise RuntimeError(f"daemon not ready within {READY_TIMEOUT_S} s: {self.log()}")

    def log(self) -> str:
        p = self.state.path / "daemon.log"
        return p.read_text()[-20000:] if p.exists() else ""

    def arm(self, spec: str) -> None:
        self._control.send(spec)
        if self._control.recv() != spec:
            raise RuntimeError("the daemon did not confirm its failpoints")

    def admin(self) -> AdminClient:
        return AdminClient(self.state.socket, timeout=OP_TIMEOUT_S)

    def dump_threads(self) -> str:
        """Every thread's stack in the daemon (SIGUSR1), from its log."""
        if not self.proc.is_alive():
            return f"(the daemon is gone, exit {self.proc.exitcode})"
        os.kill(self.proc.pid or 0, signal.SIGUSR1)
        time.sleep(0.5)
        return self.log()

    def memory(self) -> dict[str, int]:
        """The daemon's memory from /proc/PID/status, in bytes: ``VmRSS`` (resident),
        ``RssAnon`` (its private heap and stacks, without the mapped mailboxes, ledger
        and libraries); empty once it is gone."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return {}
        out = {}
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                out[name] = int(value.split()[0]) * 1024
        return out

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid or 0, signal.SIGKILL)
        self.proc.join(30)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 30 s); never raises."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(30)
        if self.proc.is_alive():
            self.kill()
        self._control.close()


# ---------------------------------------------------------------------- the history


@dataclass
class Op:
    """One operation of the history and what became of it."""

    point: int
    vm: str
    kind: str  # allocate, resize, free
    args: dict[str, Any]  # hostlib keyword arguments (resize/free: the slice id in "slice")
    request_id: str
    outcome: str = "pending"  # acked, refused, lost
    result: dict[str, Any] | None = None  # acked: the SliceInfo; refused: the error

    def record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in
                ("point", "vm", "kind", "args", "request_id", "outcome", "result")}


def _info_dict(s: SliceInfo) -> dict[str, Any]:
    return {"id": s.id, "state": s.state, "memory": s.memory_bytes, "cores": list(s.cores),
            "lanes": None if s.lanes is None else [s.lanes.port, s.lanes.first, s.lanes.width],
            "key": s.key, "ports": list(s.ports),
            "qos": [s.qos.priority, s.qos.guaranteed_mbps, s.qos.maximum_mbps]}


def _same(a: SliceInfo, b: SliceInfo) -> bool:
    """Equal in every field the VM sees, whatever the lifecycle state in the answer."""
    return replace(a, state="active") == replace(b, state="active")


def matches_request(s: SliceInfo, op: Op) -> bool:
    """Whether ``s`` is exactly what ``op`` (an allocate, or a resize's targets) asked."""
    a = op.args
    want_cores = a.get("cores")
    return (
        ("memory" not in a or s.memory_bytes == a["memory"])
        and (want_cores is None or len(s.cores) == want_cores)
        and (op.kind != "allocate" or want_cores is not None or not s.cores)
        and ("lanes" not in a or (s.lanes is not None and s.lanes.width == a["lanes"]))
        and (op.kind != "allocate" or "lanes" in a or s.lanes is None)
        and ("priority" not in a or s.qos.priority == a["priority"])
        and ("guaranteed" not in a or s.qos.guaranteed_mbps == a["guaranteed"])
    )


class History:
    """The seeded generator of operations and the model of what each VM holds."""

    def __init__(self, vms: list[str], seed: int, granule: int, prefix: str = "") -> None:
        self.vms = vms
        self.prefix = prefix  # request ids are unique per VM across histories with others
        self.rng = random.Random(seed)
        self.granule = granule
        self.held: dict[str, dict[int, SliceInfo]] = {vm: {} for vm in vms}
        self.ops: list[Op] = []
        self._n = 0

    def next_op(self, point: int, vm: str) -> Op:
        rng, held = self.rng, self.held[vm]
        self._n += 1
        rid = f"{self.prefix}{vm}.{point}.{self._n}"
        roll = rng.random()
        if not held or (roll < 0.45 and len(held) < 6):
            args: dict[str, Any] = {
                "memory": self.granule * rng.choice((1, 4, 32, 256, 1024, 2048)),
                "priority": rng.randint(0, 7),
                "guaranteed": rng.choice((0, 0, 1000, 20000, 45000)),
            }
            if rng.random() < 0.3:
                args["cores"] = rng.randint(1, 6)
            if rng.random() < 0.25:  # two x4 SSDs and 32 lanes: scarce
                args["lanes"] = 4
                args["endpoint"] = rng.choice(("nvme0", "nvme1"))
            op = Op(point, vm, "allocate", args, rid)
        else:
            sid = rng.choice(sorted(held))
            if roll < 0.75:
                change: dict[str, Any] = {}
                if rng.random() < 0.8:
                    change["memory"] = self.granule * rng.choice((1, 8, 64, 512, 1536))
                if held[sid].cores and rng.random() < 0.3:
                    change["cores"] = rng.randint(1, 6)
                if not change or rng.random() < 0.3:
                    change["priority"] = rng.randint(0, 7)
                    change["guaranteed"] = rng.choice((0, 1000, 30000))
                op = Op(point, vm, "resize", {"slice": sid, **change}, rid)
            else:
                op = Op(point, vm, "free", {"slice": sid}, rid)
        self.ops.append(op)
        return op

    def apply(self, op: Op, s: SliceInfo) -> None:
        """The device acknowledged ``op`` with ``s``."""
        op.outcome, op.result = "acked", _info_dict(s)
        if op.kind == "free":
            self.held[op.vm].pop(op.args["slice"], None)
        else:
            self.held[op.vm][s.id] = s


async def execute(client: AsyncClient, op: Op) -> SliceInfo:
    """Send ``op`` over ``client`` (its request id makes a repeat idempotent)."""
    args = dict(op.args)
    if op.kind == "allocate":
        return await client.allocate(request_id=op.request_id, **args)
    sid = args.pop("slice")
    if op.kind == "resize":
        return await client.resize(sid, request_id=op.request_id, **args)
    return await client.free(sid, request_id=op.request_id)


# ---------------------------------------------------------------------- the checker


def ledger_slices(state: StateDir) -> list[Slice]:
    """The slices in the ledger, read from the file (read-only, beside the daemon)."""
    db = sqlite3.connect(f"file:{state.ledger}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, spec, alloc FROM slices ORDER BY id").fetchall()
    finally:
        db.close()
    return [Slice(i, SliceSpec.from_dict(json.loads(s)), Allocation.from_dict(json.loads(a)))
            for i, s, a in rows]


def check_registers(state: StateDir, device: Device, slices: list[Slice]) -> list[str]:
    """The crossbar's register file against the image the ledger's slices imply: the
    shadow registers and the committed configuration the ports run."""
    want = img.register_image(img.port_configs(device, img.demand_from_slices(device, slices)))
    xb = device.crossbar
    regs = RegisterFile(state.crossbar, xb.ports, device.keys, xb.data_bytes)
    try:
        bad = []
        for what, have in (("shadow", regs.shadow_image()),
                           ("committed", regs.committed_image())):
            for addr in sorted(a for a in want if have.get(a) != want[a]):
                bad.append(f"crossbar {what} register 0x{addr:04X} holds "
                           f"0x{have.get(addr, 0):08X}, the ledger implies 0x{want[addr]:08X}")
        return bad
    finally:
        regs.close()


def check_vm(vm: str, model: dict[int, SliceInfo], lost: Op | None,
             recovered: dict[int, SliceInfo]) -> list[str]:
    """What ``vm`` holds after recovery against its acknowledged history and its lost op."""
    bad: list[str] = []
    extra = sorted(set(recovered) - set(model))
    missing = sorted(set(model) - set(recovered))
    for sid, s in recovered.items():
        if s.state != "active":
            bad.append(f"{vm}: slice {sid} recovered {s.state}, not active")
    touched = lost.args.get("slice") if lost is not None else None
    if lost is not None and lost.kind == "allocate":
        if len(extra) > 1 or (extra and not matches_request(recovered[extra[0]], lost)):
            bad.append(f"{vm}: lost allocate {lost.request_id} left {extra}: "
                       f"{[_info_dict(recovered[i]) for i in extra]}, asked {lost.args}")
        extra = []
    if lost is not None and lost.kind == "free" and touched in missing:
        missing.remove(touched)
    if extra:
        bad.append(f"{vm}: slices {extra} were never acknowledged")
    if missing:
        bad.append(f"{vm}: acknowledged slices {missing} are lost")
    for sid in sorted(set(model) & set(recovered)):
        before, now = model[sid], recovered[sid]
        if _same(before, now):
            continue
        if lost is not None and lost.kind == "resize" and sid == touched:
            if not matches_request(now, lost):
                bad.append(f"{vm}: lost resize {lost.request_id} of slice {sid} is half "
                           f"applied: {_info_dict(now)}, asked {lost.args}, was "
                           f"{_info_dict(before)}")
            continue
        bad.append(f"{vm}: slice {sid} is {_info_dict(now)}, acknowledged as "
                   f"{_info_dict(before)}")
    return bad


# ---------------------------------------------------------------------- the run


@dataclass
class CrashReport:
    points: int = 0  # crash points tried
    fired: int = 0  # killed by the armed failpoint
    idle: int = 0  # the history ended first: killed by SIGKILL from outside
    by_point: dict[str, int] = field(default_factory=dict)
    lost_ops: int = 0
    acked_ops: int = 0
    refused_ops: int = 0
    violations: list[str] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    clean_start_s: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        def pct(xs: list[float], q: float) -> float:
            return percentile(sorted(xs), q) * 1e3

        clean = statistics.median(self.clean_start_s) * 1e3 if self.clean_start_s else 0.0
        return {
            "crash_points_tried": self.points,
            "killed_at_failpoint": self.fired,
            "killed_idle": self.idle,
            "violations": len(self.violations),
            "ops_acked": self.acked_ops,
            "ops_refused": self.refused_ops,
            "ops_lost_in_crash": self.lost_ops,
            "recovery_p50_ms": pct(self.recovery_s, 0.5),
            "recovery_p99_ms": pct(self.recovery_s, 0.99),
            "clean_restart_p50_ms": clean,
            "recovery_vs_clean_restart_p50": pct(self.recovery_s, 0.5) / clean if clean else 0.0,
            **{f"fired_{k}": v for k, v in sorted(self.by_point.items())},
        }


class CrashTest:
    """``points`` crash points on a fresh state directory under ``workdir``."""

    def __init__(self, workdir: Path, *, seed: int = 1, vms: int = 4, ops_per_vm: int = 12,
                 durability: str = "power") -> None:
        self.state_path = Path(workdir) / "state"
        self.state = StateDir(self.state_path)
        self.device = load_device(None)
        self.vm_names = [f"vm-{i}" for i in range(vms)]
        self.ops_per_vm = ops_per_vm
        self.extra = ("--durability", durability)
        self.seed = seed
        self.rng = random.Random(seed)
        self.history = History(self.vm_names, seed, self.device.granule_bytes)
        self.creds: dict[str, Credential] = {}
        self.report = CrashReport()

    def dump(self, path: Path) -> None:
        """The recorded history (every op and outcome), to reproduce a failure."""
        path.write_text(json.dumps({"seed": self.seed,
                                    "ops": [o.record() for o in self.history.ops]}, indent=1))

    def run(self, points: int, progress: Callable[[int], None] | None = None) -> CrashReport:
        daemon = Daemon(self.state_path, *self.extra)
        try:
            admin = daemon.admin()
            try:
                for vm in self.vm_names:
                    mbox = str(self.state_path / f"{vm}.mbox")
                    r = admin.call("vm_add", {"vm": vm, "mailbox": mbox})
                    if not r["ok"]:
                        raise RuntimeError(f"vm_add {vm}: {r['error']}")
                    res = r["result"]
                    self.creds[vm] = Credential(vm, bytes.fromhex(res["key"]), res["mailbox"])
            finally:
                admin.close()
            lost: dict[str, Op] = {}
            for point in range(points + 1):
                last = point == points
                lost = asyncio.run(self._incarnation(daemon, point, lost, last))
                if last:
                    break
                self.report.points += 1
                daemon.kill()
                if daemon.proc.exitcode != -signal.SIGKILL:
                    self.report.violations.append(
                        f"point {point}: the daemon exited {daemon.proc.exitcode}, not by "
                        f"SIGKILL: {daemon.log()}")
                daemon.stop()
                daemon = Daemon(self.state_path, *self.extra)
                self.report.recovery_s.append(daemon.ready_s)
                if progress is not None:
                    progress(point + 1)
            for _ in range(5):  # the anchor: a clean restart of the same state
                daemon.stop()
                daemon = Daemon(self.state_path, *self.extra)
                self.report.clean_start_s.append(daemon.ready_s)
        finally:
            daemon.stop()
        return self.report

    async def _incarnation(self, daemon: Daemon, point: int, lost: dict[str, Op],
                           last: bool) -> dict[str, Op]:
        clients = {vm: await AsyncClient.open(self.creds[vm], mailbox=self.creds[vm].mailbox,
                                              timeout=OP_TIMEOUT_S)
                   for vm in self.vm_names}
        try:
            if point > 0:
                await self._check(daemon, point, clients, lost)
            if last:
                return {}
            name = self.rng.choice(REACHABLE)
            n = self.rng.randint(1, MAX_HIT)
            daemon.arm(f"{name}=crash@{n}")
            lost = await self._drive(daemon, point, clients)
            if daemon.proc.is_alive():
                self.report.idle += 1
            else:
                self.report.fired += 1
                self.report.by_point[name] = self.report.by_point.get(name, 0) + 1
            return lost
        finally:
            for c in clients.values():
                await c.close()

    async def _drive(self, daemon: Daemon, point: int,
                     clients: dict[str, AsyncClient]) -> dict[str, Op]:
        """Every VM runs its part of the history until it is done or the daemon dies.
        Returns each VM's op in flight at the death."""
        loop = asyncio.get_running_loop()
        inflight: dict[str, Op] = {}

        async def vm_loop(vm: str) -> None:
            for _ in range(self.ops_per_vm):
                op = self.history.next_op(point, vm)
                inflight[vm] = op
                try:
                    s = await execute(clients[vm], op)
                except TransportError:
                    return  # no answer: the daemon died with it in flight
                except SlicefabError as e:
                    op.outcome, op.result = "refused", {"code": e.code, "message": str(e)}
                    self.report.refused_ops += 1
                else:
                    self.history.apply(op, s)
                    self.report.acked_ops += 1
                del inflight[vm]

        tasks = [asyncio.ensure_future(vm_loop(vm)) for vm in self.vm_names]
        died: asyncio.Future[None] = loop.create_future()

        def on_death() -> None:
            if not died.done():
                died.set_result(None)

        loop.add_reader(daemon.proc.sentinel, on_death)
        try:
            await asyncio.wait([*tasks, died], return_when=asyncio.FIRST_COMPLETED)
            while not died.done() and not all(t.done() for t in tasks):
                await asyncio.wait([*tasks, died], return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(daemon.proc.sentinel)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        for op in inflight.values():
            op.outcome = "lost"
        self.report.lost_ops += len(inflight)
        return inflight

    async def _check(self, daemon: Daemon, point: int, clients: dict[str, AsyncClient],
                     lost: dict[str, Op]) -> None:
        """The recovered state against the history (the module docstring's list), then the
        lost ops retried once with their request ids."""
        bad: list[str] = []
        slices = ledger_slices(self.state)
        bad += check_registers(self.state, self.device, slices)
        admin = daemon.admin()
        try:
            r = admin.call("check")
            bad += [f"check: {v}" for v in (r["result"]["violations"] if r["ok"] else [r])]
            listed = admin.call("list")
            daemon_ids = sorted(s["id"] for s in listed["result"])
        finally:
            admin.close()
        if daemon_ids != [s.id for s in slices]:
            bad.append(f"the daemon serves slices {daemon_ids}, the ledger holds "
                       f"{[s.id for s in slices]}")
        owners = {s.owner for s in slices} - set(self.vm_names)
        if owners:
            bad.append(f"slices of owners {sorted(owners)} that never asked")
        for vm, client in clients.items():
            held = {s.id: s for s in await client.slices()}
            model = self.history.held[vm]
            op = lost.get(vm)
            found = check_vm(vm, model, op, held)
            bad += found
            if found:
                self.history.held[vm] = held
                continue
            if op is None:
                continue
            # the lost op's outcome as recovered, then a retry: exactly once
            applied = (op.kind == "free" and op.args["slice"] not in held) or (
                op.kind == "allocate" and bool(set(held) - set(model))) or (
                op.kind == "resize" and not _same(held[op.args["slice"]],
                                                  model[op.args["slice"]]))
            if op.kind == "free" and op.args["slice"] not in held:
                model.pop(op.args["slice"], None)
            for sid in set(held) - set(model):
                model[sid] = held[sid]
            if op.kind == "resize":
                model[op.args["slice"]] = held[op.args["slice"]]
            retry = Op(op.point, vm, op.kind, op.args, op.request_id)
            try:
                s = await execute(client, retry)
            except SlicefabError as e:
                if applied:
                    bad.append(f"{vm}: retry of applied {op.request_id} refused: {e}")
                continue
            prior = model.get(s.id)
            if applied and op.kind != "free" and (prior is None or not _same(s, prior)):
                bad.append(f"{vm}: retry of applied {op.request_id} answered "
                           f"{_info_dict(s)}, recovered {prior}")
            self.history.ops.append(retry)
            self.history.apply(retry, s)
            after = {x.id: x for x in await client.slices()}
            if set(after) != set(model) or any(not _same(after[i], model[i]) for i in after):
                bad.append(f"{vm}: after the retry of {op.request_id} it holds "
                           f"{sorted(after)}, the history says {sorted(model)}")
                self.history.held[vm] = after
        self.report.violations += [f"point {point - 1}: {b}" for b in bad]


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sf-crash-") as tmp:
        yield Path(tmp)


def bench_crash(quick: bool) -> dict[str, Any]:
    """``slicefab bench crash``: crash points tried, violations found, recovery time
    (restart to serving) p50/p99 against a clean restart of the same state."""
    points = 20 if quick else 200
    with _workdir(None) as tmp:
        test = CrashTest(tmp, seed=int(time.time()))
        report = test.run(points)
        figures = report.figures()
        figures["seed"] = test.seed
        for v in report.violations[:20]:
            print(f"violation: {v}")
        return figures
