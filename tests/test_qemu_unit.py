"""The QEMU integration without QEMU: the composed command lines, config validation, the
backend's admission and plans, and the manager's VM hook (rollback on a failed apply)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from slicefab_qemu.backend import Plan, QemuVmm, SliceHw, VmHardware
from slicefab_qemu.config import (
    MAILBOX_DEV,
    VMEM_DEV,
    RunPaths,
    VmConfig,
    qemu_args,
    run_paths,
    vng_argv,
)

from firmware.errors import FabricError, InsufficientResources, RequestError
from firmware.manager import ResourceManager
from firmware.slices import ResizeSpec, Slice, SliceSpec

MiB = 1 << 20


def test_the_vm_is_composed_of_the_devices_the_backend_expects(tmp_path: Path) -> None:
    run = run_paths(tmp_path, "vm-a")
    args = " ".join(qemu_args(VmConfig("vm-a", root_ports=3), run, tmp_path / "m.mbox", 262144))
    assert f"ivshmem-plain,bus=pcie.0,id={MAILBOX_DEV},memdev=sf-mbox-mem" in args
    assert f"mem-path={tmp_path / 'm.mbox'},size=262144,share=on" in args
    assert "cxl-type3,bus=sf-cxl-rp" in args and "cxl-fmw.0.targets.0=sf-cxl-hb" in args
    assert f"virtio-mem-pci,bus=pcie.0,id={VMEM_DEV}" in args and "requested-size=0" in args
    assert [f"sf-rp{i}" in args for i in range(4)] == [True, True, True, False]
    assert "-smp 1,maxcpus=4" in args and "maxmem=2G" in args
    assert str(run.qmp) in args and str(run.firmware_qmp) in args


def test_vng_gets_the_kernel_tcg_and_our_devices(tmp_path: Path) -> None:
    argv = vng_argv("/v/vng", VmConfig("vm-a"), Path("/boot/vmlinuz-x"), ["-device", "x"], "cmd")
    assert argv[:3] == ["/v/vng", "--run", "/boot/vmlinuz-x"]
    assert "--disable-kvm" in argv and "--force-9p" in argv
    assert "memhp_default_state=online_movable" in argv
    assert "preempt=full" in argv  # the heartbeat's ≤ 200 ms needs a preemptible guest
    assert argv[-1] == "--qemu-opts=-device x"
    assert "--disable-kvm" not in vng_argv("v", VmConfig("v", accel="kvm"), Path("k"), [], "c")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "-bad"}, "name"),
        ({"max_cpus": 0}, "max_cpus"),
        ({"memory": 100 * MiB}, "memory"),
        ({"block_size": 3 * MiB}, "block_size"),
        ({"hotplug_memory": 3 * MiB}, "hotplug_memory"),
        ({"cxl_memory": 300 * MiB}, "cxl_memory"),
        ({"accel": "hvf"}, "accel"),
    ],
)
def test_bad_config_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as e:
        VmConfig(**{"name": "vm-a", **change}).validate()
    assert e.value.field == field


def test_a_mailbox_that_is_not_a_power_of_two_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RequestError) as e:
        qemu_args(VmConfig("vm-a"), run_paths(tmp_path, "vm-a"), tmp_path / "m", 3 * 4096)
    assert e.value.field == "mailbox"


def test_socket_paths_too_long_for_unix_sockets_are_refused() -> None:
    with pytest.raises(RequestError) as e:
        RunPaths(Path("/tmp/" + "x" * 100)).check()
    assert e.value.field == "state_dir" and "107" in e.value.message


def test_hardware_matches_a_plan() -> None:
    hw = VmHardware(memory=192 * MiB, nvme={3: "sf-rp0"})
    assert hw.matches({3: SliceHw(64 * MiB, True), 4: SliceHw(128 * MiB)})
    assert not hw.matches({3: SliceHw(64 * MiB, False), 4: SliceHw(128 * MiB)})
    assert not hw.matches({3: SliceHw(64 * MiB, True)})


def _vmm(tmp_path: Path, rm: ResourceManager, config: VmConfig) -> QemuVmm:
    vmm = QemuVmm(tmp_path, rm.device)
    # a VM "running" as far as admission and planning go (no QEMU is contacted by them)
    vmm._configs = {config.name: config}
    return vmm


def test_admission_names_the_vms_limits(tmp_path: Path, rm: ResourceManager) -> None:
    vmm = _vmm(tmp_path, rm, VmConfig("vm-a", hotplug_memory=256 * MiB, root_ports=1))
    vmm.admit("vm-a", None, SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "256MiB"}}))
    with pytest.raises(InsufficientResources) as e:
        vmm.admit("vm-a", None, SliceSpec.from_dict({"owner": "vm-a",
                                                      "memory": {"size": "258MiB"}}))
    assert "virtio-mem" in e.value.message
    nvme = {"owner": "vm-a", "lanes": {"width": 4, "endpoint": "nvme0"}}
    vmm.admit("vm-a", None, SliceSpec.from_dict(nvme))
    vmm._last = Plan(0, {"vm-a": {1: SliceHw(0, True), 2: SliceHw(128 * MiB)}})
    with pytest.raises(InsufficientResources) as e:
        vmm.admit("vm-a", None, SliceSpec.from_dict({**nvme, "lanes": {"width": 4,
                                                                        "endpoint": "nvme1"}}))
    assert "pcie-root-port" in e.value.message
    vmm.admit("vm-a", 2, ResizeSpec(memory=256 * MiB))  # its own 128 MiB is replaced
    with pytest.raises(InsufficientResources):
        vmm.admit("vm-a", 2, ResizeSpec(memory=258 * MiB))
    vmm.admit("vm-b", None, SliceSpec.from_dict({"owner": "vm-b", "memory": {"size": "8GiB"}}))


def test_a_plan_covers_running_vms_only(tmp_path: Path, rm: ResourceManager) -> None:
    vmm = _vmm(tmp_path, rm, VmConfig("vm-a"))
    a = rm.allocate(SliceSpec.from_dict({"owner": "vm-a", "memory": {"size": "64MiB"},
                                         "lanes": {"width": 4, "endpoint": "nvme0"}}))
    rm.allocate(SliceSpec.from_dict({"owner": "vm-b", "memory": {"size": "64MiB"}}))
    plan = rm.read(lambda al: vmm.plan(list(al.slices.values())))
    assert dict(plan.vms) == {"vm-a": {a["id"]: SliceHw(64 * MiB, True)}}
    assert vmm.plan([]).seq > plan.seq


class FailingHook:
    """A VM hook whose apply fails while ``fail`` is set: what a QMP failure looks like to
    the manager."""

    def __init__(self) -> None:
        self.fail = False
        self.plans: list[list[int]] = []

    def admit(self, owner: str, slice_id: int | None, request: SliceSpec | ResizeSpec) -> None:
        if owner == "refused":
            raise InsufficientResources("VM refused memory", 1, 0)

    def plan(self, slices: list[Slice]) -> list[int]:
        return sorted(s.id for s in slices)

    def apply(self, plan: list[int]) -> None:
        self.plans.append(plan)
        if self.fail:
            raise FabricError("VM vm-a: device_add: GenericError: boom; it is back as it was")


def test_a_failed_vm_apply_rolls_the_new_slice_back(rm: ResourceManager) -> None:
    hook = FailingHook()
    rm.vm_hook = hook
    kept = rm.allocate(SliceSpec.from_dict({"owner": "vm-a", "cores": {"count": 1}}))
    hook.fail = True
    with pytest.raises(FabricError, match="boom"):
        rm.allocate(SliceSpec.from_dict({"owner": "vm-a", "cores": {"count": 2}}))
    assert [r.id for r in rm.ledger.slices()] == [kept["id"]]  # not durable any more
    assert {s["id"]: s["state"] for s in rm.list_slices()} == {kept["id"]: "active",
                                                               kept["id"] + 1: "error"}
    hook.fail = False
    assert rm.check_invariants() == []  # syncs: the VM drops it, its units come back
    assert hook.plans[-1] == [kept["id"]]
    assert [s["id"] for s in rm.list_slices()] == [kept["id"]]
    with pytest.raises(InsufficientResources):
        rm.allocate(SliceSpec.from_dict({"owner": "refused", "cores": {"count": 1}}))
    assert len(rm.list_slices()) == 1


def test_a_failed_vm_apply_on_free_keeps_the_slice_held(rm: ResourceManager) -> None:
    hook = FailingHook()
    rm.vm_hook = hook
    s = rm.allocate(SliceSpec.from_dict({"owner": "vm-a", "cores": {"count": 1}}))
    hook.fail = True
    with pytest.raises(FabricError):
        rm.free(s["id"])
    assert rm.get(s["id"])["state"] == "error"  # still held: the VM may still have it
    hook.fail = False
    assert rm.free(s["id"])["state"] == "freed"
    assert rm.list_slices() == [] and rm.check_invariants() == []


class FakeQemu:
    """QEMU's device tree as the backend's QMP commands see it: virtio-mem's
    requested-size, block nodes and NVMe controllers (id → root port)."""

    def __init__(self) -> None:
        self.memory = 0
        self.nodes: set[str] = set()
        self.devices: dict[str, tuple[str, str]] = {}  # id → (bus, drive)
        self.log: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        from slicefab_qemu.errors import QmpFailure

        a = arguments or {}
        self.log.append(command)
        if command == "qom-get" and a["property"] == "requested-size":
            return self.memory
        if command == "qom-get":
            dev = a["path"].rsplit("/", 1)[1]
            return f"/machine/q35/pcie.0/{self.devices[dev][0]}/x"
        if command == "qom-list":
            return [{"name": d} for d in self.devices]
        if command == "qom-set":
            self.memory = a["value"]
        elif command == "blockdev-add":
            if a["node-name"] in self.nodes:
                raise QmpFailure(command, "GenericError", "Duplicate nodes with node-name")
            self.nodes.add(a["node-name"])
        elif command == "blockdev-del":
            if a["node-name"] not in self.nodes or any(
                drive == a["node-name"] for _, drive in self.devices.values()
            ):
                raise QmpFailure(command, "GenericError", "Node not found or in use")
            self.nodes.discard(a["node-name"])
        elif command == "device_add":
            self.devices[a["id"]] = (a["bus"], a["drive"])
        elif command == "device_del":
            del self.devices[a["id"]]
        return {}

    def execute_and_wait(self, command: str, arguments: dict[str, Any], *rest: Any,
                         **kw: Any) -> Any:
        return self.execute(command, arguments)


def _session(qemu: FakeQemu) -> Any:
    from slicefab_qemu.backend import VmSession

    s = VmSession.__new__(VmSession)  # no QEMU to connect to: the fake's QMP instead
    s.name, s.config, s.unplug_timeout, s.plan_seq = "vm-a", VmConfig("vm-a", root_ports=2), 1.0, -1
    s.qmp = qemu  # type: ignore[assignment]
    s.hw = s.read_hardware()
    return s


@pytest.fixture
def _failpoints_off() -> Any:
    from firmware import failpoints

    failpoints.disarm()
    yield failpoints
    failpoints.disarm()


def test_qmp_failpoints_bracket_every_change_and_a_failure_is_undone(
    _failpoints_off: Any,
) -> None:
    """``qmp.before_call``/``qmp.after_call`` fire around each QMP command that changes the
    VM; an error there is a QMP failure: the apply is undone and the backend's view is read
    back from QEMU, and the next apply reaches the plan."""
    fp = _failpoints_off
    qemu = FakeQemu()
    session = _session(qemu)
    want = {7: SliceHw(128 * MiB, nvme=True)}
    fp.arm("qmp.before_call=error@2")  # the blockdev-add is never sent
    with pytest.raises(FabricError, match=r"qmp\.before_call.*back as it was"):
        session.reconcile(want)
    assert qemu.memory == 0 and not qemu.nodes and not qemu.devices  # memory undone
    assert "blockdev-add" not in qemu.log
    # after device_add QEMU has the controller, but the answer is "lost": undone where it
    # can be, and what QEMU really has is read back
    fp.arm("qmp.after_call=error@3")
    with pytest.raises(FabricError, match=r"qmp\.after_call"):
        session.reconcile(want)
    assert session.hw.memory == qemu.memory == 0
    assert session.hw.nvme == {7: "sf-rp0"} and "sf-nvme-7" in qemu.devices
    assert not fp.armed
    session.reconcile(want)  # disarmed: reaches the plan
    assert session.hw.matches(want) and qemu.memory == 128 * MiB
    session.reconcile({})
    assert qemu.memory == 0 and not qemu.devices and not qemu.nodes


def test_a_refused_blockdev_add_leaves_anothers_node_alone(_failpoints_off: Any) -> None:
    """QEMU refusing the block node because its name is taken means the node is someone
    else's: the undo must not delete it (tests/test_qemu.py takes the names on purpose)."""
    qemu = FakeQemu()
    qemu.nodes.add("sf-nvme-7-blk")  # taken behind the firmware's back
    session = _session(qemu)
    with pytest.raises(FabricError, match=r"Duplicate nodes.*back as it was"):
        session.reconcile({7: SliceHw(64 * MiB, nvme=True)})
    assert qemu.nodes == {"sf-nvme-7-blk"} and not qemu.devices and qemu.memory == 0
