"""``slicefab bench NAME``: benchmarks that print their figures.

Every figure is measured in the run that prints it, next to the anchor it is compared with
(a baseline measured in the same run, or the issue's target), so a reader can judge it on
any machine. Keys say what and in which unit (``ops_per_s``, ``p99_us``, ``ratio``).

``alloc`` (issue 2):
  * the allocator alone (pure Python, in memory) on the default device holding ~500 live
    slices, a seeded random mix of allocate / resize / free;
  * the same through the whole Resource Allocation Manager with the durable ledger (WAL,
    fsync per commit) and the fabric driver, from 16 concurrent clients, against one
    client on the same ledger (what group commit buys);
  * growth: microseconds per memory operation with 2^20 granules vs 2^10.

``fastpath`` (issue 5), the C fast path against the Python reference in the same run:
  * register image + minimal write list for a 64-port crossbar carrying 1,000 slices, per
    reconfiguration (one slice freed and one allocated, or a QoS resize);
  * allocator operations per second on the default device at 500 live slices: allocate /
    free half and half (wall clock, and CPU time, which other work on a shared machine
    disturbs less), and the ``alloc`` mix with resizes.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from abi.commands import decode_response, encode_request
from abi.envelope import REQUEST_DOMAIN, RESPONSE_DOMAIN, open_sealed, seal
from firmware.allocator import Allocator
from firmware.errors import AllocationError
from firmware.fabric.image import PortDemand
from firmware.inventory import Device, load_device
from firmware.manager import ResourceManager, StateDir, open_manager
from firmware.slices import QoS, ResizeSpec, SliceSpec

VMS = 16
TARGET_LIVE = 500


def random_spec(rng: random.Random, owner: str, granule: int, *, ports: int = 1) -> SliceSpec:
    """A small slice, mostly memory, like the many short-lived slices of a busy device."""
    cores = {"count": rng.randint(1, 2)} if rng.random() < 0.08 else None
    lanes = {"width": 1} if rng.random() < 0.01 else None
    d: dict[str, Any] = {
        "owner": owner,
        "memory": {
            "size": granule * rng.choice((1, 1, 2, 4, 8, 16, 32)),
            "contiguous": rng.random() < 0.3,
        },
        "ports": ports,
    }
    if cores:
        d["cores"] = cores
    if lanes:
        d["lanes"] = lanes
    if ports:
        d["qos"] = {"priority": rng.randint(0, 7), "guaranteed": rng.choice((0, 10, 50, 100))}
    return SliceSpec.from_dict(d)


def random_resize(
    rng: random.Random, s_mem_bytes: int, granule: int, *, qos: bool = True
) -> ResizeSpec:
    if rng.random() < 0.8 or s_mem_bytes == 0 or not qos:
        target = max(granule, s_mem_bytes + granule * rng.choice((-4, -2, -1, 1, 2, 4)))
        return ResizeSpec(memory=target)
    return ResizeSpec(qos=QoS(rng.randint(0, 7), rng.choice((0, 10, 50)), -1))


def percentile(sorted_xs: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of an ascending list; 0.0 for an empty one."""
    if not sorted_xs:
        return 0.0
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def _run_allocator(
    device: Device, ops: int, seed: int, live_target: int, ports: int = 1
) -> tuple[float, list[float], int]:
    """Seeded random mix on a bare allocator; returns (seconds spent in the allocator,
    latencies_us, refused)."""
    rng = random.Random(seed)
    alloc = Allocator(device)
    g = device.granule_bytes
    live: list[int] = []

    def one() -> tuple[float, bool]:
        """One random operation; only the allocator call is timed (building the request
        is the client's work)."""
        r = rng.random()
        op: Callable[[], object]
        if not live or (len(live) < live_target and r < 0.6):
            spec = random_spec(rng, f"vm-{rng.randrange(VMS)}", g, ports=ports)

            def op() -> object:
                s = alloc.allocate(spec)
                live.append(s.id)
                return s
        elif r < 0.8:
            sid = live[rng.randrange(len(live))]
            rs = random_resize(rng, alloc.slices[sid].alloc.granules * g, g, qos=ports > 0)

            def op() -> object:
                return alloc.resize(sid, rs)
        else:
            sid = live.pop(rng.randrange(len(live)))

            def op() -> object:
                return alloc.release(sid)

        t0 = time.perf_counter()
        try:
            op()
        except AllocationError:
            return time.perf_counter() - t0, False
        return time.perf_counter() - t0, True

    while len(live) < live_target:  # warm up to the working set, untimed
        one()
    lat: list[float] = []
    refused = 0
    for _ in range(ops):
        dt, ok = one()
        lat.append(dt * 1e6)
        refused += not ok
    return sum(lat) / 1e6, sorted(lat), refused


def bench_allocator(quick: bool) -> dict[str, Any]:
    device = load_device()
    ops = 5_000 if quick else 50_000
    secs, lat, refused = _run_allocator(device, ops, seed=1, live_target=TARGET_LIVE)
    return {
        "allocator_live_slices": TARGET_LIVE,
        "allocator_ops": ops,
        "allocator_ops_per_s": round(ops / secs),
        "allocator_p50_us": round(percentile(lat, 0.50), 1),
        "allocator_p99_us": round(percentile(lat, 0.99), 1),
        "allocator_refused": refused,
        "allocator_target_ops_per_s": 20_000,
    }


def _durable_run(
    m: ResourceManager, clients: int, ops_per_client: int, seed: int
) -> tuple[float, list[float], int]:
    g = m.device.granule_bytes
    lat: list[list[float]] = [[] for _ in range(clients)]
    refused = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        vm = f"vm-{i % VMS}"
        mine = [s["id"] for s in m.list_slices(owner=vm)]
        barrier.wait()
        for n in range(ops_per_client):
            r = rng.random()
            t0 = time.perf_counter()
            try:
                if not mine or r < 0.4:
                    mine.append(
                        m.allocate(
                            random_spec(rng, vm, g), caller=vm, request_id=f"{vm}-{seed}-{n}"
                        )["id"]
                    )
                elif r < 0.7:
                    sid = mine[rng.randrange(len(mine))]
                    mem = m.get(sid, caller=vm)["alloc"]["extents"]
                    m.resize(sid, random_resize(rng, sum(n for _, n in mem) * g, g), caller=vm)
                else:
                    m.free(mine.pop(rng.randrange(len(mine))), caller=vm)
            except AllocationError:
                refused[i] += 1
            lat[i].append((time.perf_counter() - t0) * 1e6)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t_start = time.perf_counter()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t_start
    return secs, sorted(x for per_client in lat for x in per_client), sum(refused)


def bench_durable(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="slicefab-bench-") as tmp:
        state = StateDir(Path(tmp))
        m = open_manager(state)
        try:
            rng = random.Random(7)
            g = m.device.granule_bytes
            while len(m.allocator.slices) < TARGET_LIVE:  # the working set, untimed
                vm = f"vm-{rng.randrange(VMS)}"
                with contextlib.suppress(AllocationError):
                    m.allocate(random_spec(rng, vm, g), caller=vm)
            b0, r0 = m.ledger.batches, m.ledger.records
            per = 100 if quick else 400
            secs1, lat1, _ = _durable_run(m, 1, per, seed=2)
            single = per / secs1
            b1, r1 = m.ledger.batches, m.ledger.records
            clients = 16
            secs, lat, refused = _durable_run(m, clients, per, seed=3)
            ops = clients * per
            b2, r2 = m.ledger.batches, m.ledger.records
            violations = m.check_invariants()
        finally:
            m.close()
            state.unlock()
    out.update(
        {
            "durable_clients": clients,
            "durable_ops": ops,
            "durable_ops_per_s": round(ops / secs),
            "durable_p50_us": round(percentile(lat, 0.50), 1),
            "durable_p99_us": round(percentile(lat, 0.99), 1),
            "durable_refused": refused,
            "durable_records_per_fsync": round((r2 - r1) / max(1, b2 - b1), 2),
            "durable_target_ops_per_s": 2_000,
            "single_client_ops_per_s": round(single),
            "single_client_p50_us": round(percentile(lat1, 0.50), 1),
            "single_client_records_per_fsync": round((r1 - r0) / max(1, b1 - b0), 2),
            "group_commit_ratio_vs_single_client": round((ops / secs) / single, 2),
            "invariant_violations": len(violations),
        }
    )
    return out


def bench_growth(quick: bool) -> dict[str, Any]:
    base = load_device()
    ops = 5_000 if quick else 30_000
    out: dict[str, Any] = {}
    per_op: dict[int, float] = {}
    for exp in (10, 20):
        dev = replace(base, memory_bytes=base.granule_bytes << exp)
        # memory-only slices (no ports) so only the memory allocator's size varies
        best = min(_run_allocator(dev, ops, seed=5, live_target=100, ports=0)[0] for _ in range(3))
        per_op[exp] = best / ops * 1e6
        out[f"growth_us_per_op_2e{exp}_granules"] = round(per_op[exp], 2)
    out["growth_ratio_2e20_vs_2e10"] = round(per_op[20] / per_op[10], 2)
    out["growth_target_ratio_max"] = 2.0
    return out


def bench_alloc(quick: bool) -> dict[str, Any]:
    return {**bench_allocator(quick), **bench_durable(quick), **bench_growth(quick)}


BENCHES: dict[str, Callable[[bool], dict[str, Any]]] = {"alloc": bench_alloc}

#: benchmarks in modules of their own, imported only when run: they need what the others
#: do not (prometheus_client, simulators, QEMU guests)
LAZY_BENCHES: dict[str, tuple[str, str]] = {
    "metrics": ("firmware.bench_metrics", "bench_metrics"),  # issue 8, telemetry
    "crash": ("firmware.crashtest", "bench_crash"),  # issue 8: kills and restarts daemons
    "load": ("firmware.loadtest", "bench_load"),  # issue 8: 64 VMs against a daemon
    "rtl": ("firmware.bench_rtl", "bench_rtl"),  # issue 4: builds and runs simulations
    "synth": ("firmware.bench_synth", "bench_synth"),  # issue 4: yosys LUT/FF counts
    "qemu": ("slicefab_qemu.bench", "bench_qemu"),  # issue 6: boots guests
    "placement": ("firmware.pool.bench", "bench_placement"),  # issue 7: docs/pool.md
    "pool": ("firmware.pool.bench", "bench_pool"),  # issue 7: starts etcd + 3 devices
    "adaptive": ("firmware.adaptive.bench", "bench_adaptive"),  # issue 9: docs/adaptive.md
    "migration": ("firmware.adaptive.bench", "bench_migration"),  # issue 9: etcd, docs/pool.md
}


def bench_names() -> list[str]:
    return [*BENCHES, *LAZY_BENCHES]


def run_bench(name: str, *, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run benchmark ``name`` (one of :func:`bench_names`); raises KeyError for another."""
    if name not in BENCHES:
        module, func = LAZY_BENCHES[name]
        BENCHES[name] = getattr(importlib.import_module(module), func)
    if progress:
        print(f"running bench {name}{' (quick)' if quick else ''} ...", flush=True)
    return BENCHES[name](quick)


# ---------------------------------------------------------------------- mailbox (issue 3)


class _BenchVm:
    """A VM speaking the wire contract on any client transport (what hostlib does, minus
    its conveniences): encode, seal, send, verify, decode."""

    def __init__(self, vm: str, key: bytes, transport: Any) -> None:
        self.vm, self.key, self.transport, self.seq = vm, key, transport, 0

    def hello(self) -> None:
        """HELLO (exempt from the counter), then continue from the VM's last accepted seq."""
        import os

        self.seq = -1  # call() sends HELLO with seq 0
        self.seq = int(self.call("HELLO", {"client_nonce": os.urandom(16)})["last_seq"])

    def call(self, name: str, payload: dict[str, Any]) -> Any:
        self.seq += 1
        frame = seal(
            self.key,
            REQUEST_DOMAIN,
            self.vm,
            self.seq,
            encode_request(name, payload, tag=self.seq & 0xFF),
        )
        message, _ = open_sealed(
            self.key, RESPONSE_DOMAIN, self.vm, self.transport.request(frame, timeout=10)
        )
        r = decode_response(message)
        if not r.ok:
            raise RuntimeError(f"{name}: {r.error}")
        return r.payload


_ALLOC = {
    "name": "", "cores": None, "memory": {"size": 2 << 20, "contiguous": False},
    "lanes": None, "key": None, "ports": 1, "request_id": None,
    "qos": {"priority": 0, "guaranteed_mbps": 0, "maximum_mbps": 0},
}  # fmt: skip


def _vm_worker(vm: str, key_hex: str, mailbox: str, pairs: int, start: Any, out: Any) -> None:
    """A VM process: allocate+free pairs over its mailbox (multiprocessing target)."""
    from hostlib.mailbox import MailboxClient

    client = _BenchVm(vm, bytes.fromhex(key_hex), MailboxClient(Path(mailbox)))
    client.hello()  # a fresh client learns its VM's counter
    start.wait()
    t0 = time.perf_counter()
    for _ in range(pairs):
        sid = client.call("ALLOCATE", _ALLOC)["id"]
        client.call("FREE", {"slice": sid, "request_id": None})
    out.put(time.perf_counter() - t0)


@contextlib.contextmanager
def _daemon(state_dir: str, *extra: str) -> Iterator[None]:
    """``slicefab serve`` on ``state_dir`` in its own process, stopped on the way out."""
    import subprocess
    import sys

    daemon = subprocess.Popen(
        [sys.executable, "-m", "firmware.cli", "serve", "--state-dir", state_dir, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        banner = daemon.stdout.readline()
        if "serving" not in banner:
            raise RuntimeError(
                f"daemon did not start: {banner}{daemon.stderr.read() if daemon.stderr else ''}"
            )
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        for f in (daemon.stdout, daemon.stderr):
            if f is not None:
                f.close()


def _pairs_per_s(creds: list[Any], pairs_per_vm: int) -> float:
    """Allocate+free pairs per second from one VM process per credential."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(
            target=_vm_worker, args=(c.vm, c.key.hex(), c.mailbox, pairs_per_vm, start, out)
        )
        for c in creds
    ]
    for w in workers:
        w.start()
    time.sleep(1.0)  # let every worker map its mailbox before the clock starts
    t0 = time.perf_counter()
    start.set()
    for w in workers:
        w.join(timeout=600)
    secs = time.perf_counter() - t0
    if any(w.exitcode != 0 for w in workers):
        raise RuntimeError("a VM worker failed")
    return pairs_per_vm * len(creds) / secs


def bench_mailbox(quick: bool) -> dict[str, Any]:
    """The firmware as it runs: ``slicefab serve`` in its own process; VMs in others.

    * authenticated no-op round trip over vm-0's shared-memory mailbox vs vm-1's Unix
      socket (``serve --vm-sockets``: the same pipeline), alternating blocks in one run,
      with a third block through hostlib's :class:`~hostlib.client.Device` on vm-2's
      mailbox (the wire's cost plus the library's own checks: what a VM program sees);
    * allocate+free pairs per second from 4 VM processes on their own mailboxes, with the
      daemon at each durability level (``--durability power``, the default: one fsync per
      group commit; ``crash``: none), one after the other on the same state directory.
    """
    from firmware.mailboxes import default_mailbox, socket_path
    from hostlib.client import Device
    from hostlib.credentials import Credential
    from hostlib.mailbox import MailboxClient
    from hostlib.socket_transport import SocketClient

    n = 2_000 if quick else 20_000
    pairs_per_vm = 100 if quick else 500
    with tempfile.TemporaryDirectory(prefix="slicefab-bench-") as tmp:
        state = StateDir(Path(tmp))
        m = open_manager(state)
        try:
            creds = [
                m.vms.add(f"vm-{i}", str(default_mailbox(state.path, f"vm-{i}"))) for i in range(4)
            ]
        finally:
            m.close()
            state.unlock()
        with _daemon(tmp, "--vm-sockets"):
            shm = _BenchVm("vm-0", creds[0].key, MailboxClient(Path(creds[0].mailbox)))
            sock = _BenchVm("vm-1", creds[1].key, SocketClient(socket_path(Path(creds[1].mailbox))))
            # what a VM's program sees: hostlib's blocking client on its own mailbox
            c2 = creds[2]
            device = Device.open(Credential(c2.vm, c2.key, c2.mailbox), mailbox=c2.mailbox)
            shm_lat: list[float] = []
            sock_lat: list[float] = []
            device_lat: list[float] = []
            calls: tuple[tuple[Callable[[], object], list[float]], ...] = (
                (lambda: shm.call("NOP", {"data": b""}), shm_lat),
                (lambda: sock.call("NOP", {"data": b""}), sock_lat),
                (lambda: device.nop(b""), device_lat),
            )
            for _ in range(20):  # alternate blocks so machine noise hits all alike
                for call, lat in calls:
                    for _ in range(n // 20):
                        t0 = time.perf_counter()
                        call()
                        lat.append((time.perf_counter() - t0) * 1e6)
            shm.transport.close()
            sock.transport.close()
            device.close()
            for lat in (shm_lat, sock_lat, device_lat):
                lat.sort()
            power = _pairs_per_s(creds, pairs_per_vm)
        with _daemon(tmp, "--durability", "crash"):
            crash = _pairs_per_s(creds, pairs_per_vm)
    shm_p50, sock_p50 = percentile(shm_lat, 0.5), percentile(sock_lat, 0.5)
    device_p50 = percentile(device_lat, 0.5)
    return {
        "noop_rtts_each": len(shm_lat),
        "shm_noop_rtt_p50_us": round(shm_p50, 1),
        "shm_noop_rtt_p99_us": round(percentile(shm_lat, 0.99), 1),
        "socket_noop_rtt_p50_us": round(sock_p50, 1),
        "socket_noop_rtt_p99_us": round(percentile(sock_lat, 0.99), 1),
        "ratio_shm_vs_socket_p50": round(shm_p50 / sock_p50, 2),
        "hostlib_device_noop_rtt_p50_us": round(device_p50, 1),
        "ratio_device_vs_shm_p50": round(device_p50 / shm_p50, 2),
        "target_shm_rtt_p50_us_max": 50,
        "vm_processes": len(creds),
        "alloc_free_pairs_each_run": pairs_per_vm * len(creds),
        "alloc_free_pairs_per_s": round(power),
        "alloc_free_pairs_per_s_durability_crash": round(crash),
        "ratio_crash_vs_power": round(crash / power, 2),
        "target_pairs_per_s": 5_000,
    }


BENCHES["mailbox"] = bench_mailbox


# ---------------------------------------------------------------------- fast path (issue 5)


def _fastpath_state(device: Device, slices: int, seed: int) -> Allocator:
    """An allocator holding ``slices`` live slices of 32 VMs (1-2 crossbar ports each)."""
    rng = random.Random(seed)
    a = Allocator(device)
    g = device.granule_bytes
    while len(a.slices) < slices:
        spec = random_spec(rng, f"vm-{rng.randrange(32)}", g, ports=rng.choice((1, 1, 2)))
        with contextlib.suppress(AllocationError):
            a.allocate(spec)
    return a


def _demand_sequence(a: Allocator, steps: int, seed: int) -> list[list[PortDemand]]:
    """The per-port demand after each of ``steps`` slice changes (a free plus an allocate,
    or a QoS resize), as the allocator hands it to the fabric driver."""
    rng = random.Random(seed)
    g = a.device.granule_bytes
    live = len(a.slices)
    out = [a.port_demand()]
    while len(out) <= steps:
        ids = list(a.slices)
        sid = ids[rng.randrange(len(ids))]
        if rng.random() < 0.3 and a.slices[sid].alloc.ports:
            qos = QoS(rng.randint(0, 7), rng.choice((0, 10, 50)), -1)
            with contextlib.suppress(AllocationError):
                a.resize(sid, ResizeSpec(qos=qos))
        else:
            a.release(sid)
        while len(a.slices) < live:  # keep the table at its size
            vm = f"vm-{rng.randrange(32)}"
            with contextlib.suppress(AllocationError):
                a.allocate(random_spec(rng, vm, g, ports=rng.choice((1, 1, 2))))
        out.append(a.port_demand())
    return out


def _best_of(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Run each timed callable ``rounds`` times, alternating between them so that machine
    noise hits all alike; the best (lowest) seconds of each."""
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


def bench_fastpath_image(quick: bool) -> dict[str, Any]:
    """Register image + minimal write list for a 64-port crossbar carrying 1,000 slices."""
    from firmware import fastpath
    from firmware.fabric import image as img

    device = replace(load_device(), crossbar=replace(load_device().crossbar, ports=64))
    slices = 1_000
    steps = 100 if quick else 400
    with fastpath.selected(True):
        a = _fastpath_state(device, slices, seed=11)
    seq = _demand_sequence(a, steps, seed=12)
    start = img.ImagePlanner(device).target(seq[0])
    fresh = [[replace(d) for d in demand] for demand in seq]  # no PortDemand reused
    writes: dict[str, list[list[tuple[int, int]]]] = {}

    def reference() -> float:
        """image.py as specified: demand -> every port's registers -> diff, per change."""
        current, out = dict(start), []
        t0 = time.perf_counter()
        for demand in seq[1:]:
            target = img.register_image(img.port_configs(device, demand))
            out.append(img.diff(current, target))
            current = target
        dt = time.perf_counter() - t0
        writes["reference"] = out
        return dt

    def planner(name: str, p: img.ImagePlanner | fastpath.CImagePlanner, demands: Any) -> float:
        p.load(start)
        out = []
        t0 = time.perf_counter()
        for demand in demands[1:]:
            out.append(p.plan(demand))
            p.applied()
        dt = time.perf_counter() - t0
        writes[name] = out
        return dt

    runs: dict[str, Callable[[], float]] = {
        "reference": reference,
        "python_planner": lambda: planner("python_planner", img.ImagePlanner(device), seq),
        "c": lambda: planner("c", fastpath.CImagePlanner(device), seq),
        "c_all_ports_copied": lambda: planner(
            "c_all_ports_copied", fastpath.CImagePlanner(device), fresh
        ),
    }
    best = _best_of(3 if quick else 7, runs)
    if any(w != writes["reference"] for w in writes.values()):
        raise RuntimeError("bench fastpath: the paths disagree on a write list")
    us = {name: secs / steps * 1e6 for name, secs in best.items()}
    return {
        "image_ports": device.crossbar.ports,
        "image_live_slices": len(a.slices),
        "image_reconfigurations": steps,
        "image_mean_writes": round(sum(map(len, writes["c"])) / steps, 1),
        "image_python_us": round(us["reference"], 2),
        "image_c_us": round(us["c"], 2),
        "image_ratio_c_vs_python": round(us["reference"] / us["c"], 1),
        "image_target_ratio_min": 20,
        "image_python_planner_us": round(us["python_planner"], 2),
        "image_ratio_c_vs_python_planner": round(us["python_planner"] / us["c"], 1),
        "image_c_all_ports_copied_us": round(us["c_all_ports_copied"], 2),
    }


def _alloc_free_workload(
    device: Device, ops: int, seed: int
) -> tuple[list[SliceSpec], list[float], list[float]]:
    rng = random.Random(seed)
    g = device.granule_bytes
    specs = [random_spec(rng, f"vm-{rng.randrange(VMS)}", g) for _ in range(ops + 2 * TARGET_LIVE)]
    return specs, [rng.random() for _ in range(ops)], [rng.random() for _ in range(ops)]


def _run_alloc_free(
    device: Device, work: tuple[list[SliceSpec], list[float], list[float]], fast: bool
) -> tuple[float, float, int, list[Any]]:
    """Allocate / free, half and half, around TARGET_LIVE live slices; returns the wall and
    CPU seconds of the timed loop (requests prepared beforehand, as a client would), the
    refusals, and the live slices' allocations at the end (the two paths must agree)."""
    from firmware import fastpath

    specs, kinds, picks = work
    with fastpath.selected(fast):
        a = Allocator(device)
    live: list[int] = []
    nxt = 0
    while len(live) < TARGET_LIVE:  # the working set, untimed
        with contextlib.suppress(AllocationError):
            live.append(a.allocate(specs[nxt]).id)
        nxt += 1
    refused = 0
    allocate, release = a.allocate, a.release
    t0, cpu0 = time.perf_counter(), time.process_time()
    for kind, pick in zip(kinds, picks, strict=True):
        if kind < 0.5 or not live:
            try:
                live.append(allocate(specs[nxt]).id)
            except AllocationError:
                refused += 1
            nxt += 1
        else:
            release(live.pop(int(pick * len(live))))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return wall, cpu, refused, sorted((s.id, s.alloc) for s in a.slices.values())


def bench_fastpath_alloc(quick: bool) -> dict[str, Any]:
    """The allocator in-process on the default device, fast path vs Python reference."""
    from firmware import fastpath

    device = load_device()
    ops = 5_000 if quick else 40_000
    work = _alloc_free_workload(device, ops, seed=21)
    refused: dict[bool, int] = {}
    held: dict[bool, list[Any]] = {}
    cpu = {True: float("inf"), False: float("inf")}  # best CPU seconds: steadier when shared

    def af(fast: bool) -> float:
        secs, cpu_secs, refused[fast], held[fast] = _run_alloc_free(device, work, fast)
        cpu[fast] = min(cpu[fast], cpu_secs)
        return secs

    def mix(fast: bool) -> float:
        with fastpath.selected(fast):
            return _run_allocator(device, ops, seed=1, live_target=TARGET_LIVE)[0]

    best = _best_of(
        2 if quick else 5,
        {"af_py": lambda: af(False), "af_c": lambda: af(True)}
        | {"mix_py": lambda: mix(False), "mix_c": lambda: mix(True)},
    )
    if refused[True] != refused[False] or held[True] != held[False]:
        raise RuntimeError("bench fastpath: the paths allocated differently")
    rate = {name: ops / secs for name, secs in best.items()}
    return {
        "alloc_ops": ops,
        "alloc_live_slices": TARGET_LIVE,
        "alloc_free_ops_per_s_python": round(rate["af_py"]),
        "alloc_free_ops_per_s_c": round(rate["af_c"]),
        "alloc_free_ratio_c_vs_python": round(rate["af_c"] / rate["af_py"], 2),
        "alloc_free_cpu_ops_per_s_python": round(ops / cpu[False]),
        "alloc_free_cpu_ops_per_s_c": round(ops / cpu[True]),
        "alloc_free_cpu_ratio_c_vs_python": round(cpu[False] / cpu[True], 2),
        "alloc_free_target_ratio_min": 5,
        "alloc_free_target_ops_per_s": 100_000,
        "alloc_free_refused": refused[True],
        "mix_ops_per_s_python": round(rate["mix_py"]),
        "mix_ops_per_s_c": round(rate["mix_c"]),
        "mix_ratio_c_vs_python": round(rate["mix_c"] / rate["mix_py"], 2),
    }


def bench_fastpath(quick: bool) -> dict[str, Any]:
    return {**bench_fastpath_image(quick), **bench_fastpath_alloc(quick)}


BENCHES["fastpath"] = bench_fastpath
