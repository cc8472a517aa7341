"""``slicefab vm up / down`` and the running-VM columns of ``slicefab vm list``.

``firmware/cli.py`` owns the parser and imports this module only when one of these
commands runs (the firmware itself never needs QEMU).

Naming: ``vm add`` / ``vm remove`` provision and revoke a VM's credential and mailbox;
``vm up`` / ``vm down`` start and stop a QEMU guest for a provisioned VM; ``vm list``
shows both, one row per VM.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from firmware.errors import RequestError
from firmware.units import parse_size
from slicefab_qemu.config import BOOT_TIMEOUT_S, VmConfig


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", help="a provisioned VM id (slicefab vm add)")
    p.add_argument("--credential", type=Path,
                   help="the VM's credential file (default: STATE/vms/VM.credential.toml)")
    p.add_argument("--cpus", type=int, default=1, help="vCPUs at boot (default 1)")
    p.add_argument("--max-cpus", type=int, default=4,
                   help="vCPU slots; the spare ones take core slices (default 4)")
    p.add_argument("--memory", default="1GiB", help="boot memory (default 1GiB)")
    p.add_argument("--hotplug-memory", default="1GiB",
                   help="virtio-mem region: the most slice memory the VM takes (default 1GiB)")
    p.add_argument("--root-ports", type=int, default=2,
                   help="hot-plug slots for NVMe endpoints (default 2)")
    p.add_argument("--kernel", default="", help="kernel image (default: newest /boot/vmlinuz-*)")
    p.add_argument("--accel", choices=["tcg", "kvm"], default="tcg")
    p.add_argument("--timeout", type=float, default=BOOT_TIMEOUT_S, help="boot time-out, s")


def config_from_args(args: argparse.Namespace) -> VmConfig:
    """Raises RequestError naming the flag."""
    return VmConfig(
        name=args.vm,
        boot_cpus=args.cpus,
        max_cpus=args.max_cpus,
        memory=parse_size("memory", args.memory),
        hotplug_memory=parse_size("hotplug_memory", args.hotplug_memory),
        root_ports=args.root_ports,
        kernel=args.kernel,
        accel=args.accel,
    )


def up(
    args: argparse.Namespace, provisioned: list[dict[str, Any]], credential: Path
) -> dict[str, Any]:
    """Boot the VM with ``credential`` (the file ``vm add`` wrote) and leave it running;
    returns what ``vm up`` prints. Raises RequestError for a VM that is not provisioned
    or bad flags, VmError if it cannot boot (nothing is left running then)."""
    row = next((v for v in provisioned if v["vm"] == args.vm), None)
    if row is None:
        raise RequestError(
            "vm", f"VM {args.vm} is not provisioned; run `slicefab vm add {args.vm}` first"
        )
    from slicefab_qemu.launcher import Vm

    vm = Vm(config_from_args(args), state_dir=Path(args.state_dir), mailbox=Path(row["mailbox"]),
            credential=credential)
    boot_s = vm.up(timeout=args.timeout)
    assert vm.record is not None
    out = {
        "vm": args.vm,
        "boot_s": round(boot_s, 2),
        "qemu_pid": vm.record.qemu_pid,
        "run_dir": str(vm.run.root),
        "console_log": str(vm.run.log),
    }
    vm.detach()
    return out


def down(args: argparse.Namespace) -> bool:
    """Raises VmError only if the VM's processes survive SIGKILL."""
    from slicefab_qemu.launcher import stop

    return stop(Path(args.state_dir), args.vm)


def running(state_dir: Path) -> dict[str, dict[str, Any]]:
    """``vm → {"pid", "uptime_s", "boot_s", "run_dir"}`` of VMs that run now."""
    from slicefab_qemu.launcher import list_records

    now = time.time()
    return {
        r.name: {
            "pid": r.qemu_pid,
            "uptime_s": round(now - r.started, 1),
            "boot_s": round(r.boot_s, 2),
            "run_dir": r.run_dir,
        }
        for r in list_records(state_dir)
        if r.running
    }


__all__ = ["add_up_arguments", "config_from_args", "down", "running", "up"]
