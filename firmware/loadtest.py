"""The load test (issue 8): many VMs at once over their mailboxes, competing for scarce
units, with the invariant checker running throughout.

``VMS`` (64) hostlib clients, one per provisioned VM, each over its own shared-memory
mailbox to one real daemon (``slicefab serve``, started as in :mod:`firmware.crashtest`),
run a random mix of allocate / resize / free for a bounded time. The default device is
scarce on purpose for 64 VMs: 16 protection keys and 16 crossbar ports (both held per VM,
so at most 16 VMs hold slices at any moment), two x4 NVMe SSDs, 64 GiB of memory, 64
cores. Refusals (``insufficient``, ``conflict``, ...) are expected and counted by type;
anything else is an error.

Running beside the clients:

* the **invariant checker**: admin ``CHECK`` (no unit owned twice or leaked, bandwidth
  admission, the crossbar read back against the slice table) every
  ``check_interval`` seconds over the admin socket; every violation is reported;
* a **watchdog**: every client must complete a request (answered or refused) at least
  every ``stall_s`` seconds. If one does not, the run stops and the report carries the
  daemon's thread dump (SIGUSR1, faulthandler) and the clients' task stacks;
* **memory**: the daemon's RSS (``/proc/PID/status``) sampled every 0.25 s; the report
  compares the mean of the last quarter of the run with the first.

The clients run as asyncio tasks in this process (one event loop, like a host with many
guests on few cores); their latency includes that loop's scheduling. The figures are
compared with one client running the same mix alone, measured in the same run.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.bench import percentile
from firmware.crashtest import Daemon, History, execute
from firmware.inventory import load_device
from hostlib.client import AsyncClient
from hostlib.credentials import Credential
from hostlib.errors import AllocationError, SlicefabError

VMS = 64
#: a request that takes longer than this means a client is stuck (deadlock watchdog)
STALL_S = 20.0
RSS_INTERVAL_S = 0.25
#: memory growth that fails the run: last quarter over second quarter (after the warm-up)
RSS_GROWTH_LIMIT = 0.10
RSS_GROWTH_FLOOR = 8 << 20  # and at least this many bytes (noise on a small process)


@dataclass
class LoadReport:
    duration_s: float = 0.0
    clients: int = 0
    latencies_s: dict[str, list[float]] = field(default_factory=dict)  # by op kind
    outcomes: Counter[str] = field(default_factory=Counter)  # acked, or the error code
    errors: list[str] = field(default_factory=list)  # unexpected failures
    violations: list[str] = field(default_factory=list)
    checks: int = 0
    stalled: list[str] = field(default_factory=list)
    dump: str = ""
    progress: dict[str, int] = field(default_factory=dict)  # completed requests per VM
    #: (seconds into the run, VmRSS, RssAnon) every RSS_INTERVAL_S
    rss: list[tuple[float, int, int]] = field(default_factory=list)
    baseline_ops_per_s: float = 0.0
    baseline_p50_ms: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies_s.values())

    def rss_quarters(self, column: int = 2) -> tuple[float, float]:
        """Mean memory (bytes; column 1 VmRSS, 2 RssAnon) of the second and of the last
        quarter of the run. The first quarter is the warm-up: the worker pool reaches its
        size, SQLite's page caches fill, every mailbox is touched once. The growth check
        uses RssAnon: VmRSS also counts the pages of the 64 mailboxes and the ledger as the
        daemon first touches them."""
        if len(self.rss) < 8:
            return 0.0, 0.0
        q = len(self.rss) // 4
        return (statistics.fmean(r[column] for r in self.rss[q : 2 * q]),
                statistics.fmean(r[column] for r in self.rss[-q:]))

    @property
    def rss_growth(self) -> float:
        first, last = self.rss_quarters()
        return (last - first) / first if first else 0.0

    @property
    def memory_grew(self) -> bool:
        first, last = self.rss_quarters()
        return last - first > max(RSS_GROWTH_FLOOR, RSS_GROWTH_LIMIT * first)

    def figures(self) -> dict[str, Any]:
        every = sorted(x for v in self.latencies_s.values() for x in v)

        def pct(xs: list[float], q: float) -> float:
            return percentile(xs, q) * 1e3

        first, last = self.rss_quarters()
        rss_first, rss_last = self.rss_quarters(1)
        ops = self.requests / self.duration_s if self.duration_s else 0.0
        out: dict[str, Any] = {
            "clients": self.clients,
            "duration_s": round(self.duration_s, 1),
            "requests": self.requests,
            "ops_per_s": ops,
            "p50_ms": pct(every, 0.5),
            "p99_ms": pct(every, 0.99),
            "one_client_ops_per_s": self.baseline_ops_per_s,
            "one_client_p50_ms": self.baseline_p50_ms,
            "throughput_vs_one_client": ops / self.baseline_ops_per_s
            if self.baseline_ops_per_s else 0.0,
        }
        for kind, xs in sorted(self.latencies_s.items()):
            xs = sorted(xs)
            out[f"{kind}_p50_ms"] = pct(xs, 0.5)
            out[f"{kind}_p99_ms"] = pct(xs, 0.99)
        out.update({f"outcome_{k}": v for k, v in sorted(self.outcomes.items())})
        out.update({
            "unexpected_errors": len(self.errors),
            "invariant_checks": self.checks,
            "invariant_violations": len(self.violations),
            "stalled_clients": len(self.stalled),
            "slowest_client_requests": min(self.progress.values(), default=0),
            "vmrss_second_quarter_mib": rss_first / (1 << 20),
            "vmrss_last_quarter_mib": rss_last / (1 << 20),
            "anon_second_quarter_mib": first / (1 << 20),
            "anon_last_quarter_mib": last / (1 << 20),
            "anon_growth_ratio": self.rss_growth,
        })
        return out


class LoadTest:
    """One daemon on a fresh state directory under ``workdir``, ``vms`` VMs provisioned."""

    def __init__(self, workdir: Path, *, vms: int = VMS, seed: int = 1,
                 stall_s: float = STALL_S, check_interval: float = 1.0) -> None:
        self.state_path = Path(workdir) / "state"
        self.vm_names = [f"vm-{i:02d}" for i in range(vms)]
        self.seed = seed
        self.stall_s = stall_s
        self.check_interval = check_interval
        self.granule = load_device(None).granule_bytes
        self.creds: dict[str, Credential] = {}

    def run(self, duration_s: float, baseline_s: float = 3.0) -> LoadReport:
        report = LoadReport(clients=len(self.vm_names))
        daemon = Daemon(self.state_path, "--durability", "power")
        try:
            admin = daemon.admin()
            try:
                for vm in self.vm_names:
                    r = admin.call("vm_add", {"vm": vm,
                                              "mailbox": str(self.state_path / f"{vm}.mbox")})
                    if not r["ok"]:
                        raise RuntimeError(f"vm_add {vm}: {r['error']}")
                    key, mbox = bytes.fromhex(r["result"]["key"]), r["result"]["mailbox"]
                    self.creds[vm] = Credential(vm, key, mbox)
            finally:
                admin.close()
            if baseline_s > 0:  # the anchor: one client alone, same mix, same daemon
                alone = LoadReport(clients=1)
                asyncio.run(self._clients(daemon, self.vm_names[:1], baseline_s, alone,
                                          "one."))
                report.baseline_ops_per_s = alone.requests / alone.duration_s
                every = sorted(x for v in alone.latencies_s.values() for x in v)
                report.baseline_p50_ms = statistics.median(every) * 1e3 if every else 0.0
                self._free_all(daemon)
            stop = threading.Event()
            watchers = [
                threading.Thread(target=self._checker, args=(daemon, report, stop),
                                 name="load-check", daemon=True),
                threading.Thread(target=self._sample_rss, args=(daemon, report, stop),
                                 name="load-rss", daemon=True),
            ]
            for t in watchers:
                t.start()
            try:
                asyncio.run(self._clients(daemon, self.vm_names, duration_s, report,
                                          "all."))
            finally:
                stop.set()
                for t in watchers:
                    t.join(30)
            violations = self._check_once(daemon)  # and once more at rest
            report.checks += 1
            report.violations += violations
        finally:
            daemon.stop()
        return report

    def _free_all(self, daemon: Daemon) -> None:
        admin = daemon.admin()
        try:
            for s in admin.call("list")["result"]:
                admin.call("free", {"slice": s["id"]})
        finally:
            admin.close()

    def _check_once(self, daemon: Daemon) -> list[str]:
        admin = daemon.admin()
        try:
            r = admin.call("check")
        finally:
            admin.close()
        return list(r["result"]["violations"]) if r["ok"] else [f"CHECK refused: {r['error']}"]

    def _checker(self, daemon: Daemon, report: LoadReport, stop: threading.Event) -> None:
        while not stop.wait(self.check_interval):
            try:
                report.violations += self._check_once(daemon)
                report.checks += 1
            except Exception as e:  # the daemon unreachable is a finding, not a crash
                report.errors.append(f"invariant check: {e!r}")

    @staticmethod
    def _sample_rss(daemon: Daemon, report: LoadReport, stop: threading.Event) -> None:
        t0 = time.monotonic()
        while not stop.wait(RSS_INTERVAL_S):
            mem = daemon.memory()
            if mem:
                report.rss.append((time.monotonic() - t0, mem["VmRSS"], mem["RssAnon"]))

    async def _clients(self, daemon: Daemon, vms: list[str], duration_s: float,
                       report: LoadReport, prefix: str) -> None:
        history = History(vms, self.seed, self.granule, prefix)
        last_progress = {vm: time.monotonic() for vm in vms}
        report.progress = dict.fromkeys(vms, 0)
        clients = {vm: await AsyncClient.open(self.creds[vm], mailbox=self.creds[vm].mailbox,
                                              timeout=self.stall_s * 3) for vm in vms}
        t0 = time.monotonic()
        deadline = t0 + duration_s

        async def client(vm: str) -> None:
            while time.monotonic() < deadline:
                op = history.next_op(0, vm)
                start = time.perf_counter()
                try:
                    s = await execute(clients[vm], op)
                except AllocationError as e:  # insufficient, conflict: contention
                    report.outcomes[e.code] += 1
                except SlicefabError as e:
                    report.outcomes[e.code] += 1
                    if e.code not in ("invalid", "not_found", "lifecycle"):
                        report.errors.append(f"{vm} {op.kind} {op.args}: {e.code}: {e}")
                else:
                    history.apply(op, s)
                    report.outcomes["acked"] += 1
                report.latencies_s.setdefault(op.kind, []).append(time.perf_counter() - start)
                report.progress[vm] += 1
                last_progress[vm] = time.monotonic()

        tasks = {vm: asyncio.ensure_future(client(vm)) for vm in vms}
        try:
            while not all(t.done() for t in tasks.values()):
                await asyncio.wait(list(tasks.values()), timeout=0.5)
                now = time.monotonic()
                stuck = sorted(vm for vm, t in tasks.items()
                               if not t.done() and now - last_progress[vm] > self.stall_s)
                if stuck:
                    report.stalled = stuck
                    report.dump = self._dump(daemon, tasks, stuck)
                    break
        finally:
            report.duration_s = time.monotonic() - t0
            for t in tasks.values():
                t.cancel()
            results = await asyncio.gather(*tasks.values(), return_exceptions=True)
            for vm, r in zip(tasks, results, strict=True):
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                    report.errors.append(f"{vm}: client failed: {r!r}")
            for c in clients.values():
                await c.close()

    @staticmethod
    def _dump(daemon: Daemon, tasks: Mapping[str, asyncio.Task[None]], stuck: list[str]) -> str:
        """The daemon's threads and the stuck clients' stacks."""
        import io

        out = io.StringIO()
        for vm in stuck[:4]:
            out.write(f"--- client {vm}\n")
            tasks[vm].print_stack(file=out)
        return f"{out.getvalue()}--- daemon threads\n{daemon.dump_threads()}"


def bench_load(quick: bool) -> dict[str, Any]:
    """``slicefab bench load``: 64 VMs for 30 s (``--quick``: 8 s)."""
    duration = 8.0 if quick else 30.0
    with tempfile.TemporaryDirectory(prefix="sf-load-") as tmp:
        report = LoadTest(Path(tmp), seed=random.randrange(1 << 30)).run(
            duration, baseline_s=2.0 if quick else 5.0)
    for line in [*report.violations[:10], *report.errors[:10], *report.stalled]:
        print(f"problem: {line}", file=sys.stderr)
    if report.dump:
        print(report.dump, file=sys.stderr)
    return report.figures()
