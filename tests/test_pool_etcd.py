"""The pool on a real 3-member etcd cluster on loopback (issue 7): compose across devices,
16 composers racing for the last capacity, an etcd member killed, a device daemon
SIGKILLed, the etcd failpoints. Every cluster, daemon and device started here is stopped
in a fixture's teardown, also when the test fails.

Devices run in-process (a ResourceManager + PoolMember each) except in the SIGKILL test,
which needs real daemons (``slicefab serve --pool``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from firmware import failpoints
from firmware.errors import AllocationError, NotFound, PermissionDenied, SlicefabError
from firmware.manager import ResourceManager, StateDir, open_manager
from firmware.pool.cluster import LocalEtcd, etcd_binary
from firmware.pool.composer import Pool
from firmware.pool.etcd import Etcd
from firmware.pool.member import PoolMember, local_devices, wait_until
from firmware.pool.model import PREFIX
from firmware.units import GiB
from hostlib import Device, load_credential

pytestmark = pytest.mark.etcd

try:
    etcd_binary()
except SlicefabError:  # pragma: no cover - CI installs etcd-server via .ci/apt-packages
    pytest.skip("etcd-server is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    with LocalEtcd(tmp_path_factory.mktemp("etcd"), 3) as c:
        yield c


@pytest.fixture
def clean(cluster: LocalEtcd) -> LocalEtcd:
    """The module's cluster with no pool keys left by an earlier test."""
    Etcd(cluster.endpoints).delete(PREFIX, prefix=True)
    return cluster


Devices = Callable[..., dict[str, tuple[ResourceManager, PoolMember]]]


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Devices]:
    """Start in-process devices (manager + pool member) on a cluster; all stopped after."""
    with contextlib.ExitStack() as stack:

        def start(endpoints: list[str], n: int, ttl: int = 3, zones: int = 1) -> dict[str, Any]:
            return stack.enter_context(local_devices(tmp_path, endpoints, n, ttl=ttl, zones=zones))

        yield start


def local_slices(devs: dict[str, tuple[ResourceManager, PoolMember]]) -> dict[str, Any]:
    return {d: m.list_slices() for d, (m, _) in devs.items()}


def quiet_check(pool: Pool, devs: dict[str, Any], timeout: float = 10.0) -> list[str]:
    """The pool's invariants once the devices have caught up with etcd (programming and
    freeing are asynchronous): empty, or the violations still there at the time-out."""
    bad: list[str] = []

    def ok() -> bool:
        nonlocal bad
        bad = pool.check(local_slices(devs))
        bad += [f"{d}: {v}" for d, (m, _) in devs.items() for v in m.check_invariants()]
        return not bad

    wait_until(ok, timeout, 0.05)
    return bad


def test_gateway_path_matches_the_server(clean: LocalEtcd) -> None:
    """etcd 3.4 answers on /v3/ (and etcd3gw's own discovery agrees with ours)."""
    e = Etcd(clean.endpoints)
    assert e.api_path == "/v3/"
    assert e.server_version.startswith("3.")
    r = requests.post(clean.endpoints[0] + "/v3/kv/range", json={"key": "AA=="}, timeout=5)
    assert r.status_code == 200


def test_compose_across_devices_and_release(clean: LocalEtcd, devices: Devices) -> None:
    devs = devices(clean.endpoints, 3)
    pool = Pool(clean.endpoints)
    assert sorted(d.device for d in pool.devices()) == ["dev0", "dev1", "dev2"]
    # more than one device has: 80 cores + 96 GiB + an x4 NVMe group
    c = pool.compose(
        {"owner": "vm-a", "cores": 80, "memory": "96 GiB", "nvme": 1, "max_devices": 2},
        cid="c1",
    )
    assert c["state"] == "active"
    assert len(c["parts"]) == 2
    assert sum(p["cores"] for p in c["parts"]) == 80
    assert sum(p["memory"] for p in c["parts"]) == 96 * GiB
    assert sum(len(p["nvme"]) for p in c["parts"]) == 1
    nvme_part = next(p for p in c["parts"] if p["nvme"])
    assert nvme_part["cores"] >= 1  # nvme_with_cores
    assert quiet_check(pool, devs) == []
    for p in c["parts"]:  # each device programmed its own fabric with its part
        m, _ = devs[p["device"]]
        mine = [s for s in m.list_slices() if s["name"].startswith("pool:c1:")]
        assert sum(len(s["alloc"]["cores"]) for s in mine) == p["cores"]
        assert all(s["state"] == "active" and s["owner"] == "vm-a" for s in mine)
        assert m.check_invariants() == []
    # a VM sees its own compositions only
    assert [x["id"] for x in pool.compositions(owner="vm-a")] == ["c1"]
    with pytest.raises(PermissionDenied):
        pool.get("c1", caller="vm-b")
    with pytest.raises(PermissionDenied):
        pool.release("c1", caller="vm-b")
    pool.release("c1", caller="vm-a")
    with pytest.raises(NotFound):
        pool.get("c1")
    for d in pool.devices():
        assert d.free == d.total, d.device
    for m, _ in devs.values():
        assert m.list_slices() == []
    assert quiet_check(pool, devs) == []


def test_request_errors_name_the_field(clean: LocalEtcd, devices: Devices) -> None:
    devices(clean.endpoints, 1)
    pool = Pool(clean.endpoints)
    with pytest.raises(SlicefabError, match="memory"):
        pool.compose({"owner": "vm-a", "memory": "3 MiB"})
    with pytest.raises(SlicefabError, match="affinity"):
        pool.compose({"owner": "vm-a", "cores": 1, "affinity": "near"})
    with pytest.raises(AllocationError, match="cores: requested 65"):
        pool.compose({"owner": "vm-a", "cores": 65})
    # max_devices makes a request the pool could hold impossible to place
    devices_pool = pool.devices()
    assert devices_pool[0].free == devices_pool[0].total


def test_sixteen_composers_race_for_the_last_capacity(clean: LocalEtcd, devices: Devices) -> None:
    devs = devices(clean.endpoints, 3)
    pool = Pool(clean.endpoints)
    # leave 16 + 16 + 8 cores and GiB free: room for exactly 5 requests of 8 + 8 GiB
    for i, n in enumerate((48, 48, 56)):
        pool.compose({"owner": f"fill-{i}", "cores": n, "memory": f"{n} GiB", "max_devices": 1})
    free = sorted(d.free.cores for d in pool.devices())
    assert free == [8, 16, 16]
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def composer(i: int) -> None:
        p = Pool(clean.endpoints)
        try:
            barrier.wait()
            c = p.compose({"owner": f"vm-{i}", "cores": 8, "memory": "8 GiB"})
            results.append(c["id"])
        except AllocationError as e:
            results.append(f"refused: {e.code}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=composer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    won = [r for r in results if not r.startswith("refused")]
    assert len(results) == 16
    assert len(won) == 5, results  # exactly what fits: no oversubscription, no waste
    assert quiet_check(pool, devs) == []
    assert sum(d.free.cores for d in pool.devices()) == 0
    # what the devices really hold equals what etcd reserved
    held = sum(len(s["alloc"]["cores"]) for m, _ in devs.values() for s in m.list_slices())
    assert held == 3 * 64


def test_invariant_checker_catches_oversubscription(clean: LocalEtcd, devices: Devices) -> None:
    """The checker can fail: a record whose free count was not decremented is caught."""
    devices(clean.endpoints, 1)
    pool = Pool(clean.endpoints)
    pool.compose({"owner": "vm-a", "cores": 8, "memory": "8 GiB"}, cid="c1")
    e = Etcd(clean.endpoints)
    kv = e.get(PREFIX + "devices/dev0")
    assert kv is not None
    record = kv.json()
    record["free"]["cores"] = 64  # forget the reservation
    e.put(kv.key, record, kv.lease)
    bad = pool.check()
    assert any("oversubscribed cores" in v for v in bad), bad


def leader_index(cluster: LocalEtcd) -> int:
    for i, m in enumerate(cluster.members):
        st = requests.post(m.client_url + "/v3/maintenance/status", json={}, timeout=5).json()
        if st["header"]["member_id"] == st["leader"]:
            return i
    raise AssertionError("no leader")


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalEtcd]:
    """A cluster of the test's own (it will be damaged); torn down after the devices
    (request it before ``devices``)."""
    with LocalEtcd(tmp_path / "etcd", 3) as c:
        yield c


def test_pool_keeps_working_when_an_etcd_member_dies(
    own_cluster: LocalEtcd, devices: Devices
) -> None:
    cluster = own_cluster
    victim = leader_index(cluster)
    # every client starts on the leader (the first endpoint), so killing it also kills the
    # connections of the composer, the devices' keep-alives and their watches
    endpoints = [cluster.endpoints[victim]] + [
        e for i, e in enumerate(cluster.endpoints) if i != victim
    ]
    devs = devices(endpoints, 2, ttl=2)
    pool = Pool(endpoints)
    pool.compose({"owner": "vm-a", "cores": 8, "memory": "8 GiB"}, cid="before")
    cluster.kill(victim)
    # compose and release go on; the devices' watches and keep-alives fail over
    c = pool.compose({"owner": "vm-b", "cores": 70, "memory": "70 GiB"}, cid="after")
    assert c["state"] == "active" and len(c["parts"]) == 2
    assert pool.etcd.failovers >= 1
    assert all(member._etcd.failovers >= 1 for _, member in devs.values())  # their watches
    time.sleep(2.5)  # longer than the TTL: the leases were kept alive via the others
    assert sorted(d.device for d in pool.devices()) == ["dev0", "dev1"]
    assert pool.get("before")["state"] == "active"
    pool.release("before")
    assert quiet_check(pool, devs) == []
    assert {x["id"] for x in pool.compositions()} == {"after"}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``slicefab serve --pool`` daemons; every one is killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(endpoints: list[str], device_id: str, ttl: int) -> subprocess.Popen[bytes]:
        state = tmp_path / device_id
        log = open(tmp_path / f"{device_id}.log", "wb")  # noqa: SIM115 - closed with the proc
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "firmware.cli",
                "serve",
                "--state-dir",
                str(state),
                "--pool",
                ",".join(endpoints),
                "--device-id",
                device_id,
                "--pool-ttl",
                str(ttl),
                "--no-qemu",
                "--durability",
                "crash",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


@pytest.fixture
def sessions() -> Iterator[contextlib.ExitStack]:
    """Closes the hostlib sessions a test opens, also when it fails."""
    with contextlib.ExitStack() as stack:
        yield stack


def provision(sessions: contextlib.ExitStack, state: Path, vm: str, credential: Path) -> Device:
    """``slicefab vm add`` on a running daemon, then the VM's hostlib session on its
    mailbox."""
    subprocess.run(
        [sys.executable, "-m", "firmware.cli", "vm", "add", vm, "--credential", str(credential),
         "--state-dir", str(state)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    dev = Device.open(credential, mailbox=load_credential(credential).mailbox)
    return sessions.enter_context(dev)


def test_sigkilled_device_is_lost_within_its_ttl(
    clean: LocalEtcd, daemons: Any, tmp_path: Path, sessions: contextlib.ExitStack
) -> None:
    ttl = 2
    procs = {d: daemons(clean.endpoints, d, ttl) for d in ("dev0", "dev1")}
    pool = Pool(clean.endpoints)
    assert wait_until(lambda: len(pool.devices()) == 2, 30), "daemons did not join"
    c = pool.compose({"owner": "vm-a", "cores": 100, "memory": "16 GiB"}, cid="c1")
    assert c["state"] == "active" and {p["device"] for p in c["parts"]} == {"dev0", "dev1"}
    other = pool.compose({"owner": "vm-b", "cores": 4, "max_devices": 1}, cid="c2")
    victim = c["parts"][0]["device"]
    survivor = c["parts"][1]["device"]
    # the owner and another VM, each on its mailbox of the device that will survive
    vm_a = provision(sessions, tmp_path / survivor, "vm-a", tmp_path / "vm-a.toml")
    vm_b = provision(sessions, tmp_path / survivor, "vm-b", tmp_path / "vm-b.toml")
    before = vm_a.pool_compositions()
    assert [(x["id"], x["state"]) for x in before] == [("c1", "active")]
    assert {p["device"]: p["state"] for p in before[0]["parts"]} == {
        victim: "active",
        survivor: "active",
    }
    os.kill(procs[victim].pid, signal.SIGKILL)
    procs[victim].wait(5)
    killed = time.monotonic()
    assert wait_until(lambda: pool.get("c1", caller="vm-a")["state"] == "lost", ttl + 3)
    took = time.monotonic() - killed
    assert took <= ttl + 1.0, f"lost after {took:.2f} s, TTL {ttl} s"
    # the owner is told through its listing and get; the pool status names it
    mine = pool.compositions(owner="vm-a")
    assert mine[0]["state"] == "lost" and mine[0]["lost_devices"] == [victim]
    states = {p["device"]: p["state"] for p in mine[0]["parts"]}
    assert states == {victim: "lost", survivor: "active"}
    assert pool.status()["lost"] == [{"id": "c1", "owner": "vm-a", "lost_devices": [victim]}]
    # ... and through its own mailbox (POOL_COMPOSITIONS), on the surviving device
    told = vm_a.pool_compositions()
    assert [(x["id"], x["state"]) for x in told] == [("c1", "lost")]
    parts = {p["device"]: p for p in told[0]["parts"]}
    assert (parts[victim]["state"], parts[survivor]["state"]) == ("lost", "active")
    assert "lease expired" in parts[victim]["reason"] and parts[survivor]["slices"]
    assert "c1" not in [x["id"] for x in vm_b.pool_compositions()]  # vm-a's only
    on_survivor = other["parts"][0]["device"] == survivor
    assert pool.get("c2")["state"] == ("active" if on_survivor else "lost")
    # releasing gives back the survivor's part only; the survivor frees its slices
    pool.release("c1", caller="vm-a")
    assert [d.device for d in pool.devices()] == [survivor]
    assert pool.check() == []


def test_etcd_failpoints(clean: LocalEtcd, devices: Devices) -> None:
    devs = devices(clean.endpoints, 2)
    pool = Pool(clean.endpoints)
    before = {d.device: d.free for d in pool.devices()}
    failpoints.arm("etcd.before_txn=error")
    try:
        with pytest.raises(failpoints.FailpointError):
            pool.compose({"owner": "vm-a", "cores": 8}, cid="c1")
    finally:
        failpoints.disarm()
    assert pool.compositions() == []
    assert {d.device: d.free for d in pool.devices()} == before
    failpoints.arm("etcd.after_txn=error")
    try:
        with pytest.raises(failpoints.FailpointError):
            pool.compose({"owner": "vm-a", "cores": 8}, cid="c2")
    finally:
        failpoints.disarm()
    # the reservation committed: the devices program it and the owner can release it
    assert pool.wait_programmed("c2")["state"] == "active"
    assert quiet_check(pool, devs) == []
    pool.release("c2")
    assert {d.device: d.free for d in pool.devices()} == before


def test_restarted_device_reports_old_parts_lost(clean: LocalEtcd, devices: Devices) -> None:
    devs = devices(clean.endpoints, 1)
    pool = Pool(clean.endpoints)
    pool.compose({"owner": "vm-a", "cores": 8}, cid="c1")
    m, member = devs["dev0"]
    member.stop(leave=False)  # the daemon dies; a new one starts before the TTL is up
    again = PoolMember(m, clean.endpoints, "dev0", ttl=3)
    again.start()
    try:
        c = pool.get("c1")
        assert c["state"] == "lost" and "restarted" in c["parts"][0]["reason"]
        assert m.list_slices() == []  # the old incarnation's slices were freed
        assert pool.devices()[0].free.cores == 64
        pool.release("c1")
        assert pool.devices()[0].free.cores == 64  # nothing given back twice
        assert pool.check() == []
    finally:
        again.stop()


def test_pool_bench_quick_runs_and_reports_against_its_anchor() -> None:
    """``slicefab bench pool --quick``: its own 3-member cluster and 3 devices, figures
    printed with the bare-transaction anchor of the same run."""
    from firmware.bench import run_bench

    figures = run_bench("pool", quick=True, progress=False)
    assert figures["etcd members / devices"] == "3 / 3"
    assert figures["bare etcd txn p50 (ms)"] > 0
    ratio = figures["compose across 2 devices p50 (ms)"] / figures["bare etcd txn p50 (ms)"]
    assert abs(figures["compose p50 / etcd txn p50"] - ratio) < 0.05 * ratio
    assert figures["compose+release/s, 1 composer"] > 0


def test_a_device_offers_only_what_it_has_free(clean: LocalEtcd, tmp_path: Path) -> None:
    """Slices allocated locally before joining are not offered to the pool."""
    from firmware.slices import SliceSpec

    state = StateDir(tmp_path / "busy")
    m = open_manager(state)
    member = None
    try:
        m.allocate(
            SliceSpec.from_dict(
                {"owner": "vm-local", "cores": {"count": 10}, "memory": {"size": "2560 MiB"},
                 "lanes": {"width": 4, "endpoint": "nvme1"}}
            )
        )  # fmt: skip
        member = PoolMember(m, clean.endpoints, "busy", ttl=3)
        member.start()
        d = Pool(clean.endpoints).devices()[0]
        # 61.5 GiB free: offered in whole 1 GiB units
        assert (d.free.cores, d.free.memory) == (54, 61 * GiB)
        assert list(d.free.nvme) == ["nvme0"]
        assert d.free.vm_slots == 15
    finally:
        if member is not None:
            member.stop()
        m.close()
        state.unlock()
