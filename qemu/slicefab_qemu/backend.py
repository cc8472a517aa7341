"""The firmware's QEMU backend: a VM's live slices become hardware of its running VM, over
QMP (``qemu.qmp``), in step with the ledger.

=========================  ==================================================================
slice resource             what the VM gets (device ids in slicefab_qemu.config)
=========================  ==================================================================
memory                     the VM's virtio-mem ``requested-size`` = the sum of its slices'
                           memory (the guest onlines it: ``memhp_default_state``)
lanes pinned to an NVMe    one NVMe controller per slice (``sf-nvme-<slice>``, serial
endpoint                   ``slicefab-<slice>``, a ``null-co`` block node) hot-plugged into
                           a free ``pcie-root-port``; unplugged when the slice goes
cores                      nothing in the VM (see "Why cores are not vCPUs" in docs/qemu.md:
                           QEMU 7.2 hot-adds a vCPU the Debian kernel onlines in ~1.2 s,
                           but never completes its removal, so a free could not finish)
lanes without an endpoint  nothing: no device stands behind them
=========================  ==================================================================

How it hooks into the Resource Allocation Manager (``ResourceManager.vm_hook``):

* :meth:`QemuVmm.admit` — before the allocator decides, under the manager's lock: refuses
  a request the VM's hardware cannot take (virtio-mem region, free root ports), with the
  limit named, so nothing is reserved for it;
* :meth:`QemuVmm.plan` — at every fabric sync, under the manager's lock: what each running
  VM must have, from the slices in the fabric's image (cheap: VMs that run only);
* :meth:`QemuVmm.apply` — right after the crossbar took the same image: makes each VM
  match its plan. A QMP failure undoes what this apply did to that VM and raises
  :class:`~firmware.errors.FabricError`, which the manager handles as a crossbar refusal:
  a new slice is rolled back (ledger and VM as before), a free leaves the slice in
  ``error`` holding its units, and a retry re-applies.

An NVMe controller's removal completes before ``apply`` returns (QEMU's ``DEVICE_DELETED``:
the guest has let go of it), so the manager never hands the endpoint's lanes to another
VM while this one still has the controller. Memory is different: what the firmware keeps
in step with the ledger is virtio-mem's ``requested-size``; the guest gives memory back on
its own, usually within a second, but when a block cannot be offlined at once Linux's
virtio-mem driver retries only after 50 s (``VIRTIO_MEM_RETRY_TIMER_MIN_MS``), and holding
the firmware for that long would stall every VM. The memory is the guest's RAM, not a
unit of the device, so isolation does not depend on it. Additions return once QEMU has
the device; the guest sees it asynchronously (``slicefab bench qemu`` measures how long).

For the adaptive controller, :meth:`QemuVmm.memory_stats` reads each running guest's
memory statistics (its balloon's ``guest-stats`` and virtio-mem's sizes); the usage
source built on it is :class:`slicefab_qemu.usage.QemuUsage`.

A VM is found through its run directory (``<state>/run/<vm>/vm.json``, written by the
launcher); a watcher thread notices VMs that boot or go away and brings a new VM to its
slices' state. The backend reads what a VM has from QEMU itself (its device tree), so a
firmware restart loses nothing. A slice of a VM that is not running is only a ledger entry.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from firmware import failpoints
from firmware.allocator import Allocator
from firmware.errors import FabricError, InsufficientResources
from firmware.inventory import Device
from firmware.manager import slices_in_image
from firmware.slices import ResizeSpec, Slice, SliceSpec
from slicefab_qemu.config import (
    NVME_PREFIX,
    ROOT_PORT_PREFIX,
    VMEM_DEV,
    VmConfig,
    nvme_serial,
    peripheral_path,
)
from slicefab_qemu.errors import QmpFailure, VmError
from slicefab_qemu.launcher import VmRecord, list_records
from slicefab_qemu.qmp import QmpChannel
from slicefab_qemu.usage import MemoryStats, has_balloon, read_memory_stats

log = logging.getLogger("slicefab.qemu")

#: how long a removal may take in the guest (ACPI eject, virtio-mem unplug) under TCG
UNPLUG_TIMEOUT_S = 20.0
WATCH_INTERVAL_S = 0.5
#: how long a statistics read waits for a VM busy being reconfigured (then: next tick)
STATS_LOCK_S = 1.0
NVME_BLOCK_SIZE = 1 << 30  # the null-co namespace each NVMe controller shows


@dataclass(frozen=True)
class SliceHw:
    """What one slice asks of its VM."""

    memory: int = 0  # bytes
    nvme: bool = False


@dataclass(frozen=True)
class Plan:
    """Every running VM's slices (``vm → slice id → hardware``), numbered so that an older
    plan never overwrites a newer one."""

    seq: int
    vms: Mapping[str, Mapping[int, SliceHw]]


@dataclass
class VmHardware:
    """What a VM has, as read from QEMU and kept up to date by this backend."""

    memory: int = 0
    nvme: dict[int, str] = field(default_factory=dict)  # slice id → root port

    def matches(self, want: Mapping[int, SliceHw]) -> bool:
        return self.memory == sum(h.memory for h in want.values()) and set(self.nvme) == {
            i for i, h in want.items() if h.nvme
        }


class _Undo:
    """The steps an apply has done to one VM, undone in reverse if a later step fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, undo: Callable[[], None]) -> None:
        self.steps.append((what, undo))

    def run(self) -> list[str]:
        failed: list[str] = []
        for what, undo in reversed(self.steps):
            try:
                undo()
            except (VmError, FabricError) as e:
                failed.append(f"undo {what}: {e}")
        return failed


class VmSession:
    """One running VM, as the backend drives it over its own QMP monitor."""

    def __init__(self, record: VmRecord, unplug_timeout: float) -> None:
        self.record = record
        self.name = record.name
        self.config: VmConfig = record.vm_config
        self.unplug_timeout = unplug_timeout
        self.qmp = QmpChannel(record.paths.firmware_qmp, name=f"fw-{record.name}")
        self.qmp.connect(timeout=5.0)
        self.plan_seq = -1
        self.hw = self.read_hardware()
        #: whether the VM has the launcher's balloon (guest memory statistics)
        self.balloon = has_balloon(self.qmp)

    def close(self) -> None:
        self.qmp.close()

    # ---------------------------------------------------------------- reading QEMU

    def read_hardware(self) -> VmHardware:
        """What the VM has now, from QEMU's device tree (``/machine/peripheral``)."""
        hw = VmHardware()
        hw.memory = int(
            self.qmp.execute(
                "qom-get", {"path": peripheral_path(VMEM_DEV), "property": "requested-size"}
            )
        )
        for child in self.qmp.execute("qom-list", {"path": "/machine/peripheral"}):
            name = str(child["name"])
            if name.startswith(NVME_PREFIX):
                bus = str(
                    self.qmp.execute(
                        "qom-get", {"path": peripheral_path(name), "property": "parent_bus"}
                    )
                )
                port = next((p for p in bus.split("/") if p.startswith(ROOT_PORT_PREFIX)), "")
                hw.nvme[int(name[len(NVME_PREFIX) :])] = port
        return hw

    def free_root_ports(self) -> list[str]:
        used = set(self.hw.nvme.values())
        return [
            f"{ROOT_PORT_PREFIX}{i}"
            for i in range(self.config.root_ports)
            if f"{ROOT_PORT_PREFIX}{i}" not in used
        ]

    # ---------------------------------------------------------------- changing it

    def reconcile(self, want: Mapping[int, SliceHw]) -> None:
        """Make the VM match ``want``: removals first (they free ports and slots), then
        memory, then additions. Raises FabricError after undoing this call's steps."""
        if self.hw.matches(want):
            return
        undo = _Undo()
        try:
            for sid in sorted(set(self.hw.nvme) - {i for i, h in want.items() if h.nvme}):
                port = self.hw.nvme[sid]
                self._nvme_del(sid)
                undo.push(f"NVMe of slice {sid} removal", partial(self._nvme_add, sid, port))
            target = sum(h.memory for h in want.values())
            if target != self.hw.memory:
                before = self.hw.memory
                self._memory(target)
                undo.push(f"memory {before} → {target}", partial(self._memory, before))
            for sid, h in sorted(want.items()):
                if h.nvme and sid not in self.hw.nvme:
                    ports = self.free_root_ports()
                    if not ports:
                        raise FabricError(
                            f"VM {self.name}: no free pcie-root-port for the NVMe controller "
                            f"of slice {sid} ({self.config.root_ports} in the VM)",
                            vm=self.name,
                            slice=sid,
                        )
                    self._nvme_add(sid, ports[0])
                    undo.push(f"NVMe of slice {sid}", partial(self._nvme_del, sid))
        except (VmError, FabricError) as e:
            problems = undo.run()
            with contextlib.suppress(VmError):
                self.hw = self.read_hardware()
            state = (
                "it is back as it was"
                if not problems
                else "undoing failed too: " + "; ".join(problems)
            )
            msg = e.message if isinstance(e, FabricError) else str(e)
            raise FabricError(
                f"VM {self.name}: {msg}; {state}", vm=self.name, undo_failures=problems
            ) from e

    def _memory(self, size: int) -> None:
        """Set the virtio-mem target. The guest plugs or unplugs on its own; a shrink is
        not waited for (see the module docstring)."""
        self._change(
            "qom-set",
            {"path": peripheral_path(VMEM_DEV), "property": "requested-size", "value": size},
        )
        self.hw.memory = size

    def _nvme_add(self, sid: int, port: str) -> None:
        node = f"{NVME_PREFIX}{sid}-blk"
        try:
            self._change(
                "blockdev-add",
                {
                    "driver": "null-co",
                    "node-name": node,
                    "size": NVME_BLOCK_SIZE,
                    "read-zeroes": True,
                },
            )
            self._change(
                "device_add",
                {
                    "driver": "nvme",
                    "id": f"{NVME_PREFIX}{sid}",
                    "serial": nvme_serial(sid),
                    "drive": node,
                    "bus": port,
                },
            )
        except VmError as e:
            # A node left behind would refuse the next add of this slice as a duplicate,
            # also after a lost answer to the blockdev-add. But if QEMU refused the
            # blockdev-add itself, no node of ours exists: the name may be another's.
            if not (isinstance(e, QmpFailure) and e.command == "blockdev-add"):
                with contextlib.suppress(VmError):
                    self._change("blockdev-del", {"node-name": node})
            raise
        self.hw.nvme[sid] = port

    def _nvme_del(self, sid: int) -> None:
        dev = f"{NVME_PREFIX}{sid}"
        self._change("device_del", {"id": dev}, wait=("DEVICE_DELETED", {"device": dev}))
        self.hw.nvme.pop(sid, None)
        self._change("blockdev-del", {"node-name": f"{dev}-blk"})

    def _change(
        self,
        command: str,
        arguments: dict[str, Any],
        wait: tuple[str, dict[str, Any]] | None = None,
    ) -> Any:
        """One QMP command that changes the VM's hardware (a durable step: it outlives the
        firmware), bracketed by the ``qmp.before_call`` / ``qmp.after_call`` failpoints;
        ``wait``: the event (name, data to match) that completes it. An ``error``
        failpoint is a QMP failure (VmError), undone like QEMU's own refusals."""
        if failpoints.armed:
            failpoints.hit("qmp.before_call", VmError)
        if wait is None:
            result = self.qmp.execute(command, arguments)
        else:
            result = self.qmp.execute_and_wait(
                command, arguments, wait[0], wait[1], timeout=self.unplug_timeout
            )
        if failpoints.armed:
            failpoints.hit("qmp.after_call", VmError)
        return result


class QemuVmm:
    """The manager's VM hook for QEMU guests started by ``slicefab vm up`` on the same
    state directory (see the module docstring for the protocol)."""

    def __init__(
        self,
        state_dir: Path,
        device: Device,
        *,
        unplug_timeout: float = UNPLUG_TIMEOUT_S,
        watch_interval: float = WATCH_INTERVAL_S,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.device = device
        self.unplug_timeout = unplug_timeout
        self.watch_interval = watch_interval
        self._lock = threading.RLock()  # serialises everything that talks to a VM
        self._sessions: dict[str, VmSession] = {}
        #: the running VMs (replaced whole, never changed in place): admit() fits their
        #: hardware, plan() looks at their slices only
        self._configs: dict[str, VmConfig] = {}
        self._seq = itertools.count()
        self._last: Plan = Plan(-1, {})
        self._read: Callable[[Callable[[Allocator], Plan]], Plan] | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._refresh_running()

    # ---------------------------------------------------------------- the hook

    def admit(self, owner: str, slice_id: int | None, request: SliceSpec | ResizeSpec) -> None:
        """Refuse what the VM's hardware cannot take. Called under the manager's lock,
        before the allocator; pure (no QMP). Raises InsufficientResources naming the VM's
        limit."""
        config = self._configs.get(owner)
        if config is None:
            return  # not a running QEMU VM: nothing to fit
        have = dict(self._last.vms.get(owner, {}))  # less the resized slice, popped next
        old = have.pop(slice_id, SliceHw()) if slice_id is not None else SliceHw()
        if isinstance(request, SliceSpec):
            new = SliceHw(
                memory=request.memory.size if request.memory else 0,
                nvme=self._is_nvme(request.lanes.endpoint if request.lanes else None),
            )
        else:
            new = SliceHw(
                memory=old.memory if request.memory is None else request.memory,
                nvme=old.nvme,
            )
        others = list(have.values())
        memory = sum(h.memory for h in others)
        if memory + new.memory > config.hotplug_memory:
            raise InsufficientResources(
                f"VM {owner} memory",
                new.memory,
                config.hotplug_memory - memory,
                "bytes",
                f"its virtio-mem region holds {config.hotplug_memory} bytes "
                "(slicefab vm up --hotplug-memory)",
                vm=owner,
            )
        if new.memory % config.block_size:
            raise InsufficientResources(
                f"VM {owner} memory",
                new.memory,
                new.memory - new.memory % config.block_size,
                "bytes",
                f"virtio-mem plugs whole {config.block_size}-byte blocks",
                vm=owner,
            )
        nvme = sum(1 for h in others if h.nvme)
        if new.nvme and nvme + 1 > config.root_ports:
            raise InsufficientResources(
                f"VM {owner} pcie-root-ports",
                1,
                config.root_ports - nvme,
                "",
                "one per NVMe-pinned lane slice (slicefab vm up --root-ports)",
                vm=owner,
            )

    def plan(self, slices: Iterable[Slice]) -> Plan:
        """What each running VM must have (called under the manager's lock)."""
        running = self._configs
        granule = self.device.granule_bytes
        vms: dict[str, dict[int, SliceHw]] = {vm: {} for vm in running}
        for s in slices:
            if s.owner in running:
                lanes = s.spec.lanes
                vms[s.owner][s.id] = SliceHw(
                    memory=s.alloc.granules * granule,
                    nvme=self._is_nvme(lanes.endpoint if lanes is not None else None),
                )
        return Plan(next(self._seq), vms)

    def apply(self, plan: Plan) -> None:
        """Bring every running VM to ``plan``. Raises FabricError naming each VM whose
        hardware had to change for this plan and could not (each one undone)."""
        with self._lock:
            changed = [
                vm
                for vm, want in plan.vms.items()
                if dict(want) != dict(self._last.vms.get(vm, {}))
            ]
            if plan.seq > self._last.seq:
                self._last = plan
            self._sync_sessions()
            errors: list[str] = []
            for vm, session in self._sessions.items():
                if plan.seq <= session.plan_seq or vm not in plan.vms:
                    continue
                try:
                    session.reconcile(plan.vms[vm])
                    session.plan_seq = plan.seq
                except FabricError as e:
                    log.warning("%s", e.message)
                    if vm in changed:
                        errors.append(e.message)
            if errors:
                raise FabricError("; ".join(errors))

    def _is_nvme(self, endpoint: str | None) -> bool:
        if endpoint is None:
            return False
        ep = self.device.endpoint(endpoint)
        return ep is not None and ep.kind.lower() == "nvme"

    # ---------------------------------------------------------------- VMs coming and going

    def attach(self, read: Callable[[Callable[[Allocator], Plan]], Plan]) -> None:
        """Start following VMs. ``read`` is ``ResourceManager.read``: a VM that boots is
        brought to a plan read under the manager's lock."""
        self._read = read
        self._watch_once()
        self._watcher = threading.Thread(target=self._watch, name="qemu-vmm", daemon=True)
        self._watcher.start()

    def _refresh_running(self) -> list[VmRecord]:
        records = [r for r in list_records(self.state_dir) if r.qemu_pid and r.running]
        self._configs = {r.name: r.vm_config for r in records}
        return records

    def _sync_sessions(self) -> None:
        """Open sessions to VMs that booted, close those of VMs that went away (lock held)."""
        records = {r.name: r for r in self._refresh_running()}
        for vm in list(self._sessions):
            r = records.get(vm)
            if r is None or r.instance != self._sessions[vm].record.instance:
                self._sessions.pop(vm).close()
        for vm, r in records.items():
            if vm not in self._sessions:
                try:
                    self._sessions[vm] = VmSession(r, self.unplug_timeout)
                except VmError as e:
                    log.warning("VM %s: cannot attach: %s", vm, e)

    def _watch_once(self) -> None:
        with self._lock:
            before = set(self._sessions)
            self._sync_sessions()
            new = set(self._sessions) - before
        if new and self._read is not None:
            with contextlib.suppress(FabricError):  # logged; the next sync retries
                self.apply(self._read(lambda a: self.plan(slices_in_image(a))))

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval):
            try:
                self._watch_once()
            except Exception:  # the watcher must outlive any one VM's trouble
                log.exception("qemu backend watcher")

    def memory_stats(self, vms: set[str]) -> dict[str, MemoryStats]:
        """The memory statistics of those of ``vms`` that run with a balloon. A VM that
        does not answer is logged and left out; if another thread is reconfiguring VMs
        for longer than :data:`STATS_LOCK_S`, the answer is empty (the next tick reads)."""
        if not self._lock.acquire(timeout=STATS_LOCK_S):
            return {}
        try:
            out: dict[str, MemoryStats] = {}
            for vm, session in self._sessions.items():
                if vm not in vms or not session.balloon:
                    continue
                try:
                    out[vm] = read_memory_stats(session.qmp)
                except VmError as e:
                    log.warning("VM %s: cannot read memory statistics: %s", vm, e)
            return out
        finally:
            self._lock.release()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        with self._lock:
            for s in self._sessions.values():
                s.close()
            self._sessions.clear()
