"""Real Linux guests under QEMU 7.2 (TCG) using the device through its PCIe BAR.

One firmware daemon (``slicefab serve``, with its QEMU backend) and two guests for the whole
module: vm-a started with the Python launcher, vm-b with ``slicefab vm up``. Inside each
guest the unchanged hostlib finds the ivshmem device with pyudev, authenticates with the
credential the launcher handed in, and calls the API through the BAR (the guest runner,
slicefab_qemu.guest.runner). Booting costs 30-45 s per guest on the 2-core machine, so the
guests boot once, in parallel, and every test reuses them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from slicefab_qemu.config import VMEM_DEV, VmConfig, nvme_serial, run_paths
from slicefab_qemu.lab import Firmware, slicefab
from slicefab_qemu.launcher import Vm, _group_alive, find_record
from slicefab_qemu.runner_client import GuestCallError, GuestRunner
from slicefab_qemu.usage import read_memory_stats

pytestmark = pytest.mark.qemu
MiB = 1 << 20
#: how long a guest may take to give memory back (Linux virtio-mem retries after 50 s)
UNPLUG_S = 120.0


@dataclass
class Lab:
    fw: Firmware
    state: Path
    a: Vm
    a_runner: GuestRunner
    b_runner: GuestRunner

    def requested_size(self) -> int:
        return int(self.a.qmp.execute(
            "qom-get", {"path": f"/machine/peripheral/{VMEM_DEV}", "property": "requested-size"}
        ))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("qemu")
    state = root / "state"
    fw = Firmware(state)
    a: Vm | None = None
    try:
        a = fw.vm(VmConfig("vm-a", root_ports=2))
        fw.provision("vm-b")
        cli = subprocess.Popen(
            [sys.executable, "-m", "firmware.cli", "vm", "up", "vm-b", "--state-dir", str(state),
             "--root-ports", "1", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        a.up()
        _out, err = cli.communicate(timeout=300)
        assert cli.returncode == 0, f"slicefab vm up vm-b failed: {err}"
        a_runner, b_runner = a.runner, GuestRunner(run_paths(state, "vm-b").runner)
        opened: dict[str, Any] = {}

        def open_b() -> None:
            opened["b"] = b_runner.request("open", timeout=240)

        t = threading.Thread(target=open_b)
        t.start()
        opened["a"] = a_runner.request("open", timeout=240)
        t.join()
        assert opened["a"]["result"]["vm"] == "vm-a"
        assert opened["b"]["result"]["vm"] == "vm-b"
        yield Lab(fw, state, a, a_runner, b_runner)
    finally:
        if a is not None:
            a.down()
        subprocess.run(
            [sys.executable, "-m", "firmware.cli", "vm", "down", "vm-b", "--state-dir",
             str(state)], capture_output=True, check=False, timeout=120,
        )
        fw.close()


def test_the_guest_finds_the_device_with_pyudev(lab: Lab) -> None:
    found = lab.a_runner.request("find")["result"]
    assert found["rejected"] == []
    [mbox] = found["candidates"]
    assert mbox["resource2"].startswith("/sys/devices/pci0000:00/")
    assert mbox["resource2"].endswith("/resource2")
    assert mbox["size"] == 256 * 1024  # the mailbox region = BAR2, a power of two


def test_the_cxl_type3_device_is_enumerated(lab: Lab) -> None:
    cxl = lab.a_runner.request("state")["result"]["cxl"]
    assert "mem0" in cxl and "root0" in cxl
    assert any(d.startswith("endpoint") for d in cxl)
    assert any(d.startswith("decoder") for d in cxl)


def test_balloon_statistics_arrive_and_match_the_guest(lab: Lab) -> None:
    """QEMU's balloon statistics, the adaptive controller's measure of a guest's memory
    (slicefab_qemu.usage): they arrive, and agree with the guest's own /proc/meminfo."""
    deadline = time.monotonic() + 60
    while not (stats := read_memory_stats(lab.a.qmp)).fresh(time.time()):
        assert time.monotonic() < deadline, f"no balloon statistics within 60 s: {stats}"
        time.sleep(0.5)
    meminfo = {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in lab.a.agent.sh("cat /proc/meminfo").splitlines()
    }
    assert stats.total == meminfo["MemTotal"]
    assert stats.available is not None and 0 < stats.available < stats.total
    assert stats.available == pytest.approx(meminfo["MemAvailable"], rel=0.1)
    assert stats.plugged == stats.requested == lab.requested_size()


def test_a_slice_appears_resizes_and_goes_while_a_heartbeat_ticks(
    lab: Lab, record_property: Any
) -> None:
    r = lab.a_runner
    base = r.request("state")["result"]
    r.request("heartbeat_start", period=0.01, timeout=120)
    try:
        made = r.call("allocate", memory="128MiB", lanes=4, endpoint="nvme0",
                      expect=[{"memtotal_kib_delta": 128 * 1024}])
        sid = made["result"]["id"]
        assert lab.requested_size() == 128 * MiB  # the VM and the ledger agree
        seen = r.call("get", sid, expect=[{"nvme_serial": nvme_serial(sid), "present": True}])
        assert seen["result"]["lanes"]["width"] == 4
        grown = r.call("resize", sid, memory="256MiB", expect=[{"memtotal_kib_delta": 128 * 1024}])
        assert grown["result"]["memory_bytes"] == 256 * MiB
        assert lab.requested_size() == 256 * MiB
        # the guest gives memory back on its own: up to one virtio-mem retry (50 s) late
        shrunk = r.call("resize", sid, memory="64MiB",
                        expect=[{"memtotal_kib_delta": -192 * 1024}], timeout=UNPLUG_S)
        assert shrunk["result"]["memory_bytes"] == 64 * MiB
        freed = r.call("free", sid, expect=[
            {"memtotal_kib": base["memtotal_kib"]},
            {"nvme_serial": nvme_serial(sid), "present": False},
        ], timeout=UNPLUG_S)
        assert freed["result"]["state"] == "freed"
        assert lab.requested_size() == 0
    finally:
        beat = r.request("heartbeat_stop", timeout=60)["result"]
    record_property("heartbeat_max_gap_ms", beat["max_gap_ms"])
    print(f"\nheartbeat: {beat}")  # the ≤ 200 ms target is checked by `slicefab bench qemu`
    assert beat["ticks"] > 0
    assert r.request("state")["result"]["nvme"] == base["nvme"]


def test_a_qmp_failure_rolls_the_slice_back(lab: Lab) -> None:
    """The block node names the firmware would give the next NVMe controllers are taken
    behind its back, so plugging the slice's controller fails after its memory went in:
    the firmware must undo the memory, drop the slice from the ledger and say why."""
    qmp, r = lab.a.qmp, lab.a_runner
    before = r.request("state")["result"]
    taken = [f"sf-nvme-{i}-blk" for i in range(1, 40)]
    for node in taken:
        qmp.execute("blockdev-add", {"driver": "null-co", "node-name": node})
    try:
        with pytest.raises(GuestCallError) as e:
            r.call("allocate", memory="64MiB", lanes=4, endpoint="nvme1")
        assert e.value.type == "DeviceError"
        assert "vm-a" in str(e.value) and "back as it was" in str(e.value)
        assert r.call("slices")["result"] == []
        assert lab.requested_size() == 0
        assert slicefab(lab.state, "check")["violations"] == []
        assert r.request("state")["result"]["nvme"] == before["nvme"]
        # the guest gives the memory that went in back on its own, up to a retry late;
        # until it has, the next test's MemTotal baseline would include it
        r.wait([{"memtotal_kib": before["memtotal_kib"]}], timeout=UNPLUG_S)
    finally:
        for node in taken:
            qmp.execute("blockdev-del", {"node-name": node})


def test_admission_names_the_vms_limit(lab: Lab) -> None:
    with pytest.raises(GuestCallError) as e:
        lab.a_runner.call("allocate", memory="2GiB")  # the virtio-mem region is 1 GiB
    assert e.value.type == "InsufficientResources"
    assert "virtio-mem" in str(e.value)
    assert lab.a_runner.call("slices")["result"] == []


def test_two_guests_cannot_see_or_touch_each_others_slices(lab: Lab) -> None:
    a, b = lab.a_runner, lab.b_runner
    b_before = b.request("state")["result"]["memtotal_kib"]
    sid = a.call("allocate", memory="64MiB", expect=[{"memtotal_kib_delta": 64 * 1024}])[
        "result"]["id"]
    try:
        for method, args, kwargs in (
            ("get", [sid], {}),
            ("resize", [sid], {"memory": "128MiB"}),
            ("free", [sid], {}),
            ("telemetry", [sid], {}),
        ):
            with pytest.raises(GuestCallError) as e:
                b.call(method, *args, **kwargs)
            assert e.value.type in ("PermissionDenied", "NotFound"), method
        assert b.call("slices")["result"] == []
        assert b.request("state")["result"]["memtotal_kib"] == b_before
        # vm-b's guest sees its own mailbox only; the firmware's state is hidden from it
        [mbox] = b.request("find")["result"]["candidates"]
        assert mbox["size"] == 256 * 1024
        agent_b = Vm.attach(lab.state, "vm-b")
        try:
            listing = agent_b.agent.sh(f"ls -A {lab.state}")
        finally:
            agent_b.detach()
        assert listing.strip() == ""
    finally:
        a.call("free", sid, expect=[{"memtotal_kib_delta": -64 * 1024}], timeout=UNPLUG_S)


def test_vm_list_shows_provisioned_and_running(lab: Lab) -> None:
    rows = {v["vm"]: v for v in slicefab(lab.state, "vm", "list")}
    assert rows["vm-a"]["running"]["pid"] > 0
    assert rows["vm-b"]["running"]["pid"] > 0
    assert rows["vm-a"]["mailbox"].endswith("vm-a.mbox")


def test_down_leaves_no_process_and_no_file(lab: Lab) -> None:
    """Runs last: stops both guests (the fixture's own teardown is then a no-op)."""
    rec_b = find_record(lab.state, "vm-b")
    assert rec_b is not None and rec_b.running
    assert slicefab(lab.state, "vm", "down", "vm-b") == {"vm": "vm-b", "was_running": True}
    assert not _group_alive(rec_b.pgid)
    assert not run_paths(lab.state, "vm-b").root.exists()
    assert lab.a.record is not None
    pgid_a = lab.a.record.pgid
    lab.a.down()
    assert not _group_alive(pgid_a)
    assert not (lab.state / "run").exists()
    assert slicefab(lab.state, "vm", "down", "vm-a") == {"vm": "vm-a", "was_running": False}
