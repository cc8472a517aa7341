"""QEMU's balloon and virtio-mem statistics as a usage source, without QEMU: the QMP
replies in tests/data/qemu/balloon_replies.json were recorded from a Debian 12 guest under
QEMU 7.2 by tests/data/qemu/record_balloon.py, and are replayed here by a stand-in
monitor."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from slicefab_qemu.config import BALLOON_DEV, BALLOON_POLL_S, VMEM_DEV, VmConfig, qemu_args
from slicefab_qemu.errors import QmpFailure, VmError
from slicefab_qemu.usage import (
    STALE_S,
    MemoryStats,
    QemuUsage,
    has_balloon,
    parse_guest_stats,
    read_memory_stats,
    slice_use,
)

from firmware.adaptive.controller import AdaptiveController
from firmware.adaptive.policy import set_policy
from firmware.adaptive.traces import EPOCH, gib
from firmware.adaptive.usage import QEMU_BALLOON, Action, SliceMemory, UsageSample
from firmware.manager import ResourceManager
from firmware.slices import SliceSpec

MiB = 1 << 20
REPLIES: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "qemu" / "balloon_replies.json").read_text()
)


class RecordedQmp:
    """A QMP monitor that answers ``qom-get``/``qom-list`` from one recorded moment."""

    def __init__(self, moment: Mapping[str, Any], *, balloon: bool = True) -> None:
        self.moment, self.balloon = moment, balloon
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        args = dict(arguments or {})
        self.calls.append((command, args))
        if command == "qom-list":
            names = ["sf-vmem", "sf-mbox"] + ([BALLOON_DEV] if self.balloon else [])
            return [{"name": n, "type": "child<x>"} for n in names]
        dev = args["path"].rsplit("/", 1)[-1]
        if dev == BALLOON_DEV and self.balloon and args["property"] == "guest-stats":
            return self.moment["guest-stats"]
        if dev == VMEM_DEV and args["property"] in ("size", "requested-size"):
            return self.moment[args["property"]]
        raise QmpFailure(command, "GenericError", f"Device '{dev}' not found")


def _meminfo_kib(moment: Mapping[str, Any], field: str) -> int:
    for line in moment["meminfo"].splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_the_vm_has_a_balloon_that_polls_guest_statistics(tmp_path: Path) -> None:
    from slicefab_qemu.config import run_paths

    args = qemu_args(VmConfig("vm-a"), run_paths(tmp_path, "vm-a"), tmp_path / "m", 262144)
    assert (
        f"virtio-balloon-pci,bus=pcie.0,id={BALLOON_DEV},"
        f"guest-stats-polling-interval={BALLOON_POLL_S}"
    ) in args


@pytest.mark.parametrize("moment", ["idle", "filled"])
def test_recorded_replies_read_as_the_guests_meminfo(moment: str) -> None:
    m = REPLIES[moment]
    qmp = RecordedQmp(m)
    stats = read_memory_stats(qmp)
    assert [c[1]["property"] for c in qmp.calls] == ["guest-stats", "size", "requested-size"]
    assert stats.total == _meminfo_kib(m, "MemTotal") * 1024  # the guest's MemTotal, exactly
    assert stats.available is not None and stats.total is not None
    # MemAvailable read by the guest agent a moment apart from QEMU's poll
    assert stats.available == pytest.approx(_meminfo_kib(m, "MemAvailable") * 1024, rel=0.05)
    assert stats.available < stats.total
    assert (stats.plugged, stats.requested) == (m["size"], m["requested-size"])
    assert stats.fresh(m["host_time"]) and not stats.fresh(m["host_time"] + STALE_S + 1)


def test_an_idle_guest_uses_none_of_its_slices_and_a_filled_one_most() -> None:
    idle = read_memory_stats(RecordedQmp(REPLIES["idle"]))
    assert idle.slices_in_use() == 0 and slice_use(idle, {7: 0}) == {}  # nothing plugged
    filled = read_memory_stats(RecordedQmp(REPLIES["filled"]))
    used = filled.slices_in_use()
    assert filled.plugged == filled.requested > 0  # the slice, as the controller sized it
    assert used is not None and used == filled.plugged - (filled.available or 0)
    assert 0.3 * filled.plugged < used < filled.plugged  # the guest filled a tmpfs
    assert slice_use(filled, {7: filled.plugged}) == {7: used}


def test_statistics_before_the_guests_first_report_tell_nothing() -> None:
    stats = read_memory_stats(RecordedQmp(REPLIES["before_boot"]))
    assert (stats.total, stats.available, stats.last_update) == (None, None, 0.0)
    assert not stats.fresh(REPLIES["before_boot"]["host_time"])
    assert stats.slices_in_use() is None and slice_use(stats, {1: 64 * MiB}) == {}


def test_a_vm_without_a_balloon_is_recognised() -> None:
    assert has_balloon(RecordedQmp(REPLIES["idle"]))
    assert not has_balloon(RecordedQmp(REPLIES["idle"], balloon=False))
    with pytest.raises(QmpFailure, match="not found"):
        read_memory_stats(RecordedQmp(REPLIES["idle"], balloon=False))


def test_malformed_guest_stats_are_refused() -> None:
    with pytest.raises(VmError, match="guest-stats"):
        parse_guest_stats({"stats": "x", "last-update": 1}, 0, 0)
    with pytest.raises(VmError, match="guest-stats"):
        read_memory_stats(RecordedQmp({**REPLIES["idle"], "guest-stats": [1]}))


def test_use_is_shared_over_a_vms_slices_by_what_they_hold() -> None:
    s = MemoryStats(
        total=2048 * MiB,
        available=256 * MiB,
        last_update=1.0,
        plugged=1024 * MiB,
        requested=1024 * MiB,
    )
    assert s.slices_in_use() == 768 * MiB
    assert slice_use(s, {1: 256 * MiB, 2: 768 * MiB}) == {1: 192 * MiB, 2: 576 * MiB}
    # plenty available: the guest's own RAM covers it; little: never above what is held
    assert MemoryStats(2048 * MiB, 1500 * MiB, 1.0, 1024 * MiB, 1024 * MiB).slices_in_use() == 0
    low = MemoryStats(2048 * MiB, 0, 1.0, 512 * MiB, 1024 * MiB)  # still plugging
    assert slice_use(low, {1: 1024 * MiB}) == {1: 512 * MiB}
    # free memory stands in when the guest gives no MemAvailable
    st = parse_guest_stats(
        {
            "stats": {
                "stat-total-memory": 100,
                "stat-free-memory": 40,
                "stat-available-memory": (1 << 64) - 1,
            },
            "last-update": 5,
        },
        0,
        0,
    )
    assert (st.total, st.available) == (100, 40)


class FakeVmm:
    def __init__(self, stats: dict[str, MemoryStats]) -> None:
        self.stats = stats
        self.asked: list[set[str]] = []

    def memory_stats(self, vms: set[str]) -> dict[str, MemoryStats]:
        self.asked.append(vms)
        return {vm: s for vm, s in self.stats.items() if vm in vms}


def test_the_source_samples_fresh_vms_only() -> None:
    filled = read_memory_stats(RecordedQmp(REPLIES["filled"]))
    now = filled.last_update + 1
    stale = MemoryStats(
        filled.total, filled.available, now - STALE_S - 5, filled.plugged, filled.requested
    )
    vmm = FakeVmm({"vm-a": filled, "vm-b": stale})
    slices = {
        1: SliceMemory("vm-a", 256 * MiB),
        2: SliceMemory("vm-b", 256 * MiB),
        3: SliceMemory("vm-c", 64 * MiB),
    }
    samples = QemuUsage(vmm).sample(now, slices)
    assert vmm.asked == [{"vm-a", "vm-b", "vm-c"}]
    assert [(s.slice_id, s.owner, s.source) for s in samples] == [(1, "vm-a", QEMU_BALLOON)]
    assert samples[0].memory_used == filled.slices_in_use()


#: the memory policy the controller tests opt their slice in with
MEMORY_POLICY = {
    "resource": "memory",
    "minimum": gib(1),
    "maximum": gib(4),
    "step": gib(1),
    "cooldown": 60,
}


def _slice(rm: ResourceManager, owner: str, size: int) -> int:
    spec = {"owner": owner, "name": "web", "memory": {"size": size}}
    return int(rm.allocate(SliceSpec.from_dict(spec))["id"])


def test_the_controller_acts_on_qemus_measure(rm: ResourceManager) -> None:
    """A slice whose guest never reports: the controller grows it from the balloon's
    statistics, which the store keeps with their source."""
    sid = _slice(rm, "vm-a", gib(1))
    set_policy(rm, rm.usage, sid, MEMORY_POLICY, caller=None)
    stats = MemoryStats(
        total=gib(2), available=gib(1) // 10, last_update=EPOCH, plugged=gib(1), requested=gib(1)
    )
    c = AdaptiveController(rm, rm.usage, sources=[QemuUsage(FakeVmm({"vm-a": stats}))])
    (sample,) = c.sample_sources(EPOCH)
    assert (sample.app_class, sample.source, sample.memory_used) == (
        "web",
        QEMU_BALLOON,
        gib(1) - gib(1) // 10,
    )
    (stored,) = rm.usage.window(sid, 0.0)
    assert stored.source == QEMU_BALLOON
    (d,) = c.tick(EPOCH)
    assert (d.action, d.after) == (Action.UP, gib(2))
    # the guest reports in the same minute: its report wins, QEMU's measure is set aside
    rm.usage.record([UsageSample(sid, "vm-a", "web", EPOCH + 10, memory_used=gib(1) // 4)])
    c.sample_sources(EPOCH + 20)
    (stored,) = rm.usage.window(sid, 0.0)
    assert (stored.source, stored.memory_used) == ("guest", gib(1) // 4)


def test_a_failing_source_does_not_stop_the_others(
    rm: ResourceManager, caplog: pytest.LogCaptureFixture
) -> None:
    sid = _slice(rm, "vm-a", gib(1))
    set_policy(rm, rm.usage, sid, MEMORY_POLICY, caller=None)

    class Broken:
        name = "broken"

        def sample(self, now: float, slices: Mapping[int, SliceMemory]) -> list[UsageSample]:
            raise VmError("the monitor went away")

    stats = MemoryStats(gib(2), gib(1), EPOCH, gib(1), gib(1))
    c = AdaptiveController(rm, rm.usage, sources=[Broken(), QemuUsage(FakeVmm({"vm-a": stats}))])
    with caplog.at_level(logging.ERROR, logger="slicefab.adaptive"):
        samples = c.sample_sources(EPOCH)
    assert [s.slice_id for s in samples] == [sid]
    assert "usage source broken failed" in caplog.text
