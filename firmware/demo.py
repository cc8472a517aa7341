"""``slicefab demo``: a scripted session of a few VMs on the default device.

It runs the real firmware in-process — allocator, durable ledger, fabric driver on the
behavioural crossbar — on a temporary state directory, and shows the slice table, the
utilisation and the fabric's permission table as VMs allocate, resize and free slices,
including the requests the firmware refuses and why. It ends with a firmware restart that
recovers every slice from the ledger and re-programs the fabric.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule

from firmware.errors import SlicefabError
from firmware.manager import ResourceManager, StateDir, open_manager
from firmware.slices import ResizeSpec, SliceSpec
from firmware.views import permission_table, slice_table, utilisation_table


def run_demo(console: Console, *, state_dir: Path | None = None, device: Path | None = None) -> int:
    if state_dir is not None:
        return _demo(console, StateDir(state_dir), device)
    with tempfile.TemporaryDirectory(prefix="slicefab-demo-") as tmp:
        return _demo(console, StateDir(tmp), device)


def _demo(console: Console, state: StateDir, device: Path | None) -> int:
    m = open_manager(state, device)
    dev = m.device
    console.print(
        Rule(
            f"[bold]Slicefab demo[/] — device {dev.name}: {dev.cores} cores, "
            f"{dev.memory_bytes >> 30} GiB, {dev.lanes} PCIe lanes, {dev.keys} keys, "
            f"{dev.crossbar.ports}-port crossbar"
        )
    )
    console.print(f"state directory: {state.path} (ledger: {state.ledger.name})\n")

    def step(title: str, vm: str, action: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        console.print(f"[bold]▶ {vm}[/]: {title}")
        writes_before = m.fabric.writes
        try:
            r = action()
        except SlicefabError as e:
            console.print(f"  [red]refused[/] ({e.code}): {e.message}")
            return None
        console.print(
            f"  [green]ok[/]: slice {r['id']} {r['state']}, fabric generation "
            f"{m.fabric.generation}, {m.fabric.writes - writes_before} register writes"
        )
        return r

    def show(with_fabric: bool = True) -> None:
        slices = m.list_slices()
        console.print(slice_table(slices))
        console.print(utilisation_table(m.allocator.utilisation(), dev.granule_bytes))
        if with_fabric:
            console.print(permission_table(m.fabric.describe(), slices))
        console.print()

    def alloc(vm: str, rid: str | None = None, **spec: Any) -> Callable[[], dict[str, Any]]:
        return lambda: m.allocate(
            SliceSpec.from_dict({"owner": vm, **spec}), caller=vm, request_id=rid
        )

    db = alloc(
        "vm-a",
        "a-1",
        name="db",
        cores={"count": 8, "same_cluster": True},
        memory={"size": "8 GiB"},
        lanes={"width": 4, "endpoint": "nvme0"},
        qos={"priority": 5, "guaranteed": "20 Gbit/s", "maximum": "40 Gbit/s"},
    )
    a = step(
        "8 cores in one cluster, 8 GiB, the NVMe SSD nvme0 (x4), 20/40 Gbit/s at priority 5",
        "vm-a",
        db,
    )
    step("retries the same request (same request id) after a lost reply", "vm-a", db)
    console.print("  (same slice id: the retry allocated nothing new)")
    b = step(
        "4 cores, 16 GiB non-contiguous, an x2 link, 2 crossbar ports, 10 Gbit/s guaranteed",
        "vm-b",
        alloc(
            "vm-b",
            name="web",
            cores={"count": 4},
            memory={"size": "16 GiB"},
            lanes={"width": 2},
            ports=2,
            qos={"priority": 3, "guaranteed": "10 Gbit/s"},
        ),
    )
    c = step(
        "16 cores, 4 GiB contiguous",
        "vm-c",
        alloc(
            "vm-c", name="batch", cores={"count": 16}, memory={"size": "4 GiB", "contiguous": True}
        ),
    )
    show()

    console.print(Rule("requests the firmware refuses"))
    step("wants nvme0 too", "vm-c", alloc("vm-c", lanes={"width": 4, "endpoint": "nvme0"}))
    step(
        f"asks for protection key {a['alloc']['key'] if a else 0}, held by vm-a",
        "vm-c",
        alloc("vm-c", memory={"size": "2 GiB"}, key=a["alloc"]["key"] if a else 0),
    )
    step(
        "asks for 3 MiB (not a multiple of the 2 MiB granule)",
        "vm-c",
        alloc("vm-c", memory={"size": "3 MiB"}),
    )
    step("asks for 14 crossbar ports", "vm-c", alloc("vm-c", memory={"size": "2 GiB"}, ports=14))
    a2 = step(
        "adds a 2 GiB slice with 70 Gbit/s guaranteed (shares its port 0: 20 + 70 <= 100)",
        "vm-a",
        alloc("vm-a", memory={"size": "2 GiB"}, qos={"guaranteed": "70 Gbit/s"}),
    )
    if a and a2:
        step(
            f"raises slice {a['id']} to 40 Gbit/s guaranteed (port 0 would carry 110 Gbit/s)",
            "vm-a",
            lambda: m.resize(
                a["id"], ResizeSpec.from_dict({"qos": {"guaranteed": "40 Gbit/s"}}), caller="vm-a"
            ),
        )
        step(f"frees slice {a2['id']}", "vm-a", lambda: m.free(a2["id"], caller="vm-a"))
    if a:
        step(
            f"tries to free vm-a's slice {a['id']}", "vm-b", lambda: m.free(a["id"], caller="vm-b")
        )
        step(
            "grows its slice to 12 cores in one cluster (clusters have 8)",
            "vm-a",
            lambda: m.resize(a["id"], ResizeSpec.from_dict({"cores": 12}), caller="vm-a"),
        )
    console.print()

    console.print(Rule("live resize: the slices stay active"))
    if a:
        step(
            "grows memory 8 → 12 GiB and bandwidth to 30 Gbit/s guaranteed",
            "vm-a",
            lambda: m.resize(
                a["id"],
                ResizeSpec.from_dict({"memory": "12 GiB", "qos": {"guaranteed": "30 Gbit/s"}}),
                caller="vm-a",
            ),
        )
        step(
            "shrinks to 6 cores",
            "vm-a",
            lambda: m.resize(a["id"], ResizeSpec.from_dict({"cores": 6}), caller="vm-a"),
        )
    if c:
        step(
            "shrinks memory 4 → 2 GiB",
            "vm-c",
            lambda: m.resize(c["id"], ResizeSpec.from_dict({"memory": "2 GiB"}), caller="vm-c"),
        )
    show(with_fabric=False)

    console.print(Rule("free: units return, the fabric forgets the VM"))
    if b:
        step("frees its slice", "vm-b", lambda: m.free(b["id"], caller="vm-b"))
    show()

    console.print(Rule("firmware restart: recover from the ledger, re-program the fabric"))
    before = m.list_slices()
    m.close()
    state.unlock()
    m2: ResourceManager = open_manager(state, None)
    after = m2.list_slices()
    console.print(
        f"recovered {len(after)} slices (had {len(before)}), identical: "
        f"{'yes' if after == before else 'NO'}; fresh crossbar re-programmed with "
        f"{m2.fabric.last_writes} register writes (generation {m2.fabric.generation})"
    )
    violations = m2.check_invariants()
    console.print(f"invariant check: {violations if violations else '[green]0 violations[/]'}")
    m2.close()
    state.unlock()
    return 0 if after == before and not violations else 1
