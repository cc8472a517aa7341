"""Record the QMP replies tests/test_qemu_usage.py replays (balloon_replies.json).

    .venv/bin/python tests/data/qemu/record_balloon.py [STATE_DIR]

Starts ``slicefab serve`` (with its QEMU backend) and boots one guest (about 30 s under
TCG), then records, at three moments, the balloon's ``guest-stats``, virtio-mem's ``size``
and ``requested-size``, the guest's /proc/meminfo and the host's time:

* ``before_boot``: a QEMU with the same balloon device that never started its guest;
* ``idle``: the booted guest, no slice;
* ``filled``: with a 256 MiB memory slice plugged and 860 MiB of tmpfs written in the guest.

It also opts the slice in to adaptive memory through the admin socket, waits for two
controller ticks, and prints the samples the daemon stored (source ``qemu-balloon``).
Everything it starts is stopped in its ``finally``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[2] / "qemu")]

from slicefab_qemu.config import BALLOON_DEV, BALLOON_POLL_S, VMEM_DEV, VmConfig  # noqa: E402
from slicefab_qemu.lab import Firmware  # noqa: E402
from slicefab_qemu.launcher import Vm  # noqa: E402
from slicefab_qemu.usage import read_memory_stats, slice_use  # noqa: E402

from firmware.adaptive.usage import UsageStore  # noqa: E402
from firmware.admin import AdminClient  # noqa: E402

MiB = 1 << 20


def before_boot() -> dict[str, Any]:
    """The replies of a QEMU whose guest never ran (``-S``): nothing reported yet."""
    script = "".join(
        json.dumps(c) + "\n"
        for c in (
            {"execute": "qmp_capabilities"},
            {"execute": "qom-get", "arguments": {"path": f"/machine/peripheral/{BALLOON_DEV}",
                                                 "property": "guest-stats"}},
            {"execute": "quit"},
        )
    )  # fmt: skip
    r = subprocess.run(
        ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-display", "none", "-S",
         "-device", f"virtio-balloon-pci,bus=pcie.0,id={BALLOON_DEV},"
         f"guest-stats-polling-interval={BALLOON_POLL_S}", "-qmp", "stdio"],
        input=script, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    answers = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    (stats,) = [a["return"] for a in answers if isinstance(a.get("return"), dict) and a["return"]]
    return {"guest-stats": stats, "size": 0, "requested-size": 0, "meminfo": "",
            "host_time": time.time()}  # fmt: skip


def moment(vm: Vm) -> dict[str, Any]:
    def get(dev: str, prop: str) -> Any:
        return vm.qmp.execute("qom-get", {"path": f"/machine/peripheral/{dev}", "property": prop})

    return {
        "guest-stats": get(BALLOON_DEV, "guest-stats"),
        "size": get(VMEM_DEV, "size"),
        "requested-size": get(VMEM_DEV, "requested-size"),
        "meminfo": vm.agent.sh("grep -E 'MemTotal|MemFree|MemAvailable' /proc/meminfo"),
        "host_time": time.time(),
    }


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="sf-balloon-"))
    state = root / "state"
    out: dict[str, Any] = {"before_boot": before_boot()}
    fw = Firmware(state)
    vm: Vm | None = None
    try:
        vm = fw.vm(VmConfig("vm-a"))
        vm.up()
        vm.runner.request("open", timeout=240)
        deadline = time.monotonic() + 60
        while not read_memory_stats(vm.qmp).fresh(time.time()):
            if time.monotonic() > deadline:
                raise SystemExit("no balloon statistics within 60 s")
            time.sleep(0.5)
        out["idle"] = moment(vm)
        made = vm.runner.call("allocate", memory="256MiB",
                              expect=[{"memtotal_kib_delta": 256 * 1024}])  # fmt: skip
        sid = made["result"]["id"]
        admin = AdminClient(state / "admin.sock")
        admin.request("SET_ADAPTIVE", {
            "slice": sid, "resource": "memory", "enabled": True, "predictive": False,
            "minimum": 128 * MiB, "maximum": 512 * MiB, "step": 128 * MiB, "cooldown_s": 30,
            "app_class": ""})  # fmt: skip
        admin.close()
        vm.agent.sh("mkdir -p /tmp/fill && mount -t tmpfs -o size=1100m fill /tmp/fill && "
                    "dd if=/dev/zero of=/tmp/fill/f bs=1M count=860 2>/dev/null",
                    timeout=180)  # fmt: skip
        time.sleep(2 * BALLOON_POLL_S + 1)
        out["filled"] = moment(vm)
        stats = read_memory_stats(vm.qmp)
        print(stats, slice_use(stats, {sid: 256 * MiB}))
        time.sleep(25)  # two ticks of the daemon's controller (every 10 s)
        store = UsageStore(state / "ledger.sqlite")
        print("stored samples:", store.window(sid, 0.0))
        print("decisions:", store.decisions(slice_id=sid))
        store.close()
    finally:
        if vm is not None:
            vm.down()
        fw.close()
    (HERE / "balloon_replies.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
