"""``slicefab``: the command line of the firmware and its administrator.

Every command that needs device state talks to the daemon (``slicefab serve``) over its
admin socket when one is running on the state directory; otherwise it opens the state
directory in-process (recovering the ledger and programming the behavioural fabric), does
its work and closes it. Both paths go through the same dispatch table (firmware.service).

Exit status: 0 success, 1 the device refused the request (the error says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from firmware.adaptive.controller import AdaptiveController, AdaptiveService, interval_arg
from firmware.admin import AdminClient, AdminServer, LocalClient
from firmware.errors import SlicefabError
from firmware.inventory import load_device
from firmware.ledger import Durability
from firmware.manager import StateDir, default_state_dir, open_manager
from firmware.pool import cli as pool_cli
from hostlib.transport import PeerClosed, TransportError

console = Console()
err_console = Console(stderr=True)


class CommandError(Exception):
    """The device answered with an error: print it, exit 1."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "error"))
        self.error = error


Client = AdminClient | LocalClient

#: the daemon's GIL switch interval (see cmd_serve)
SWITCH_INTERVAL_S = 0.0002


def connect(args: argparse.Namespace) -> Client:
    """The running daemon of the state directory, else the state directory in-process."""
    state = StateDir(args.state_dir)
    if state.socket.exists():
        try:
            return AdminClient(state.socket)
        except PeerClosed:
            pass  # a stale socket from a daemon that died: work in-process
    return LocalClient(open_manager(state, args.device), state)


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[Client]:
    """A client for the command's state directory, closed when the command is done."""
    client = connect(args)
    try:
        yield client
    finally:
        client.close()


def call(
    client: Client, op: str, args: dict[str, Any] | None = None, request_id: str | None = None
) -> Any:
    answer = client.call(op, args, request_id)
    if not answer["ok"]:
        raise CommandError(answer["error"])
    return answer["result"]


def emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- commands


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before the daemon starts its threads. glibc gives each
    thread that allocates an arena of its own (up to 8 per core); with a pool of mailbox
    workers the freed memory then sits in many half-empty arenas, and the daemon's RSS
    crept up by ~20 MiB over a minute of the 64-VM load test while its Python heap stayed
    flat (docs/reliability.md, "Load test"). No-op where there is no glibc ``mallopt``."""
    import ctypes

    m_arena_max = -8  # <malloc.h>
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(m_arena_max, arenas)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT (exit 0), or until a ledger failure (exit 3:
    memory may be ahead of the disk, so a supervisor must restart it to recover)."""
    # The daemon's threads hand work to each other (mailbox pollers, ledger writer): the
    # default 5 ms GIL switch interval would add up to 5 ms to every hand-off.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    _limit_malloc_arenas()
    from firmware.api import Api
    from firmware.mailboxes import MailboxService

    metrics_at = None
    if args.metrics is not None:  # a bad address is refused before anything is opened
        from firmware import metrics

        metrics_at = metrics.parse_address(args.metrics, public=args.metrics_public)
    state = StateDir(args.state_dir)
    manager = open_manager(state, args.device, durability=Durability(args.durability))
    api = Api(manager, manager.vms)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    manager.on_fatal = stopping.set
    # Everything started below is stopped in the finally, also when a later start fails.
    server: AdminServer | None = None
    vmm = None
    mailboxes: MailboxService | None = None
    endpoint = None
    member = None
    adaptive = None
    try:
        server = AdminServer(state.socket, api)
        server.start()
        member = pool_cli.start_member(args, manager, state)  # --pool: docs/pool.md
        api.pool = member  # POOL_COMPOSITIONS (None without --pool: answered unsupported)
        vmm = None if args.no_qemu else _qemu_backend(manager, state)
        mailboxes = MailboxService(api, state.path, sockets=args.vm_sockets)
        mailboxes.refresh()
        manager.on_vms_changed = mailboxes.refresh
        if args.adaptive_interval > 0:  # docs/adaptive.md
            controller = AdaptiveController(manager, manager.usage, sources=_usage_sources(vmm))
            adaptive = AdaptiveService(controller, args.adaptive_interval).start()
        if metrics_at is not None:
            endpoint = metrics.serve(api, mailboxes.channels, *metrics_at)
        n = len(manager.allocator.slices)
        print(
            f"slicefab: serving device {manager.device.name} on {state.socket} "
            f"({n} slice{'s' if n != 1 else ''} recovered, fabric generation "
            f"{manager.fabric.generation}, {len(mailboxes.channels())} VM mailboxes, "
            f"durability {args.durability}"
            + (f", metrics on {endpoint.url}" if endpoint is not None else "")
            + (f", pool member {args.device_id})" if member is not None else ")"),
            flush=True,
        )
        while not stopping.wait(0.2):  # a timed wait lets the signal handlers run
            pass
    finally:
        if adaptive is not None:
            adaptive.stop()
        if member is not None:
            member.stop()
        if endpoint is not None:
            endpoint.stop()
        if server is not None:
            server.stop()
        if mailboxes is not None:
            mailboxes.close()
        if vmm is not None:
            vmm.close()
        manager.close()
        state.unlock()
    if manager.failed is not None:
        err_console.print(
            f"slicefab: stopped after a ledger failure: {manager.failed}; "
            "restart to recover from the ledger",
            markup=False,
        )
        return 3
    return 0


def _qemu_backend(manager: Any, state: StateDir) -> Any:
    """The QEMU backend (slicefab_qemu.backend): slices of VMs started with ``slicefab vm
    up`` on this state directory become their hardware. None without qemu.qmp."""
    try:
        from slicefab_qemu.backend import QemuVmm
    except ImportError:
        return None
    vmm = QemuVmm(state.path, manager.device)
    manager.vm_hook = vmm
    vmm.attach(manager.read)
    return vmm


def _usage_sources(vmm: Any) -> list[Any]:
    """The adaptive controller's measures besides the guests' reports: the QEMU guests'
    balloon statistics when the QEMU backend runs (docs/adaptive.md, "Usage sources")."""
    if vmm is None:
        return []
    from slicefab_qemu.usage import QemuUsage

    return [QemuUsage(vmm)]


def cmd_device_show(args: argparse.Namespace) -> int:
    dev = load_device(args.device)
    summary = dev.summary()
    if args.json:
        emit_json(summary)
        return 0
    from rich.table import Table

    t = Table(title=f"Device {dev.name} — {dev.model}", title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row(
        "cores", f"{dev.cores} in {len(dev.cluster_sizes)} clusters of {dev.cluster_sizes[0]}"
    )
    t.add_row(
        "memory",
        f"{summary['memory']['size']} in {dev.granules} granules of "
        f"{summary['memory']['granule']} (≤ {dev.max_extents_per_slice} extents a slice)",
    )
    t.add_row(
        "PCIe lanes",
        f"{dev.lanes} in {len(dev.port_lanes)} ports: "
        + ", ".join(f"x{n}" for n in dev.port_lanes),
    )
    for e in dev.endpoints:
        t.add_row(
            f"  endpoint {e.name}",
            f"{e.kind}, port {e.port}, lanes {e.first_lane}-"
            f"{e.first_lane + e.width - 1} (x{e.width})",
        )
    t.add_row("protection keys", str(dev.keys))
    t.add_row(
        "crossbar",
        f"{dev.crossbar.ports} ports at {summary['crossbar']['port_bandwidth']}, "
        f"{dev.crossbar.data_width_bits}-bit at {dev.crossbar.clock_mhz} MHz",
    )
    t.add_row("fingerprint", dev.fingerprint())
    console.print(t)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from firmware.views import utilisation_table

    with session(args) as client:
        st = call(client, "status")
        dev = call(client, "device")
    if args.json:
        emit_json(st)
        return 0
    console.print(
        f"[bold]{st['device']}[/]: {st['slices']} live slices, fabric generation "
        f"{st['fabric']['generation']}, ledger {StateDir(args.state_dir).ledger} "
        f"({st['ledger']['batches']} commits)"
    )
    console.print(utilisation_table(st["utilisation"], _granule(dev)))
    return 0


def _granule(device_info: dict[str, Any]) -> int:
    return int(device_info["granule_bytes"])


def cmd_slices_list(args: argparse.Namespace) -> int:
    from firmware.views import slice_table

    with session(args) as client:
        slices = call(client, "list", {"owner": args.owner} if args.owner else {})
    if args.json:
        emit_json(slices)
    else:
        console.print(slice_table(slices))
    return 0


def cmd_slices_show(args: argparse.Namespace) -> int:
    with session(args) as client:
        s = call(client, "show", {"slice": args.id})
    if args.json:
        emit_json(s)
    else:
        from firmware.views import slice_table

        console.print(slice_table([s], title=f"Slice {s['id']}"))
        console.print("extents (granule start, length):", s["alloc"]["extents"])
    return 0


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Build a slice spec dict from ``alloc`` flags (or read ``--file``)."""
    if args.file:
        from firmware.schema import load_toml

        from_file = load_toml(args.file, "slice")
        if args.owner:
            from_file["owner"] = args.owner
        return from_file
    spec: dict[str, Any] = {}
    if args.owner:
        spec["owner"] = args.owner
    if args.name:
        spec["name"] = args.name
    if args.core_ids:
        spec["cores"] = {
            "ids": args.core_ids,
            "same_cluster": args.same_cluster,
        }
    elif args.cores is not None:
        spec["cores"] = {"count": args.cores, "same_cluster": args.same_cluster}
    if args.memory is not None:
        spec["memory"] = {"size": args.memory, "contiguous": args.contiguous}
    if args.lanes is not None:
        spec["lanes"] = {"width": args.lanes}
        if args.endpoint:
            spec["lanes"]["endpoint"] = args.endpoint
        if args.first_lane is not None:
            spec["lanes"]["first"] = args.first_lane
    if args.key is not None:
        spec["key"] = args.key
    if args.ports is not None:
        spec["ports"] = args.ports
    qos = {
        k: v
        for k, v in (
            ("priority", args.priority),
            ("guaranteed", args.guaranteed),
            ("maximum", args.maximum),
        )
        if v is not None
    }
    if qos:
        spec["qos"] = qos
    return spec


def _print_slice(args: argparse.Namespace, s: dict[str, Any], verb: str) -> None:
    if args.json:
        emit_json(s)
    else:
        from firmware.views import slice_table

        console.print(f"{verb} slice [bold]{s['id']}[/] for {s['owner']}")
        console.print(slice_table([s], title=""))


def cmd_alloc(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    with session(args) as client:
        s = call(client, "allocate", {"spec": spec}, args.request_id)
    _print_slice(args, s, "allocated")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    rs: dict[str, Any] = {}
    if args.memory is not None:
        rs["memory"] = args.memory
    if args.cores is not None:
        rs["cores"] = args.cores
    qos = {
        k: v
        for k, v in (
            ("priority", args.priority),
            ("guaranteed", args.guaranteed),
            ("maximum", args.maximum),
        )
        if v is not None
    }
    if qos:
        rs["qos"] = qos
    with session(args) as client:
        s = call(client, "resize", {"slice": args.id, "resize": rs}, args.request_id)
    _print_slice(args, s, "resized")
    return 0


def cmd_free(args: argparse.Namespace) -> int:
    with session(args) as client:
        s = call(client, "free", {"slice": args.id}, args.request_id)
    if args.json:
        emit_json(s)
    else:
        console.print(f"freed slice [bold]{s['id']}[/] of {s['owner']}")
    return 0


def cmd_fabric_show(args: argparse.Namespace) -> int:
    from firmware.views import permission_table

    with session(args) as client:
        fabric = call(client, "fabric")
        slices = call(client, "list")
    if args.json:
        emit_json(fabric)
    else:
        console.print(permission_table(fabric, slices))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Recompute every invariant and read the crossbar back; exit 1 on any violation."""
    with session(args) as client:
        violations = call(client, "check")["violations"]
    if args.json:
        emit_json({"violations": violations})
    elif violations:
        for v in violations:
            err_console.print(f"violation: {v}", markup=False, highlight=False)
    else:
        console.print("all invariants hold; the crossbar matches the slice table")
    return 1 if violations else 0


def cmd_top(args: argparse.Namespace) -> int:
    """A live view of the device (firmware.top); ``--once`` prints one frame."""
    from firmware.top import run_top

    if args.json and not args.once:
        err_console.print("slicefab: error: top --json needs --once", markup=False)
        return 2
    with session(args) as client:
        return run_top(args, lambda op: call(client, op), console)


def _credential_file(args: argparse.Namespace) -> Path:
    """``--credential``, else where ``vm add`` writes it: STATE/vms/VM.credential.toml."""
    return Path(args.credential or Path(args.state_dir) / "vms" / f"{args.vm}.credential.toml")


def cmd_vm_add(args: argparse.Namespace) -> int:
    """Provision a VM and write the credential file the administrator hands to it."""
    from firmware.mailboxes import default_mailbox
    from firmware.vms import VmCredential, write_credential_file

    mailbox = args.mailbox or default_mailbox(Path(args.state_dir), args.vm)
    with session(args) as client:
        r = call(client, "vm_add", {"vm": args.vm, "mailbox": str(Path(mailbox).absolute())})
    cred_path = _credential_file(args)
    cred_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_credential_file(cred_path, VmCredential(r["vm"], bytes.fromhex(r["key"]), r["mailbox"]))
    if args.json:
        emit_json({"vm": r["vm"], "mailbox": r["mailbox"], "credential": str(cred_path)})
    else:
        console.print(f"provisioned [bold]{r['vm']}[/]: mailbox {r['mailbox']}")
        console.print(f"credential (secret, hand it to the VM): {cred_path}")
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    """Provisioned VMs, and which of them run as QEMU guests (``vm up``)."""
    with session(args) as client:
        vms = call(client, "vm_list")
    try:
        from slicefab_qemu.cli import running as qemu_running

        up = qemu_running(Path(args.state_dir))
    except ImportError:
        up = {}
    for v in vms:
        v["running"] = up.pop(v["vm"], None)
    vms += [{"vm": vm, "mailbox": "", "last_seq": None, "running": r} for vm, r in up.items()]
    if args.json:
        emit_json(vms)
    else:
        from rich.table import Table

        t = Table(title="VMs", title_justify="left")
        for col in ("vm", "mailbox", "last seq", "QEMU guest"):
            t.add_column(col)
        for v in vms:
            r = v["running"]
            guest = f"up {r['uptime_s']} s, pid {r['pid']}" if r else "-"
            t.add_row(v["vm"], v["mailbox"] or "(not provisioned)", str(v["last_seq"]), guest)
        console.print(t)
    return 0


def cmd_vm_up(args: argparse.Namespace) -> int:
    """Boot a QEMU guest for a provisioned VM (slicefab_qemu) and leave it running."""
    from slicefab_qemu.cli import up

    with session(args) as client:
        vms = call(client, "vm_list")
    r = up(args, vms, _credential_file(args))
    if args.json:
        emit_json(r)
    else:
        console.print(f"[bold]{r['vm']}[/] is up in {r['boot_s']} s (QEMU pid {r['qemu_pid']})")
        console.print(f"run directory {r['run_dir']}; console log {r['console_log']}")
    return 0


def cmd_vm_down(args: argparse.Namespace) -> int:
    from slicefab_qemu.cli import down

    was = down(args)
    if args.json:
        emit_json({"vm": args.vm, "was_running": was})
    else:
        console.print(f"{args.vm} {'stopped' if was else 'was not running'}")
    return 0


def cmd_vm_remove(args: argparse.Namespace) -> int:
    with session(args) as client:
        call(client, "vm_remove", {"vm": args.vm})
    if not args.json:
        console.print(f"removed {args.vm}: its credential no longer authenticates")
    else:
        emit_json({"vm": args.vm})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from firmware.demo import run_demo

    return run_demo(console, state_dir=args.state_dir_demo, device=args.device)


def cmd_bench(args: argparse.Namespace) -> int:
    from firmware.bench import bench_names, run_bench

    if args.name not in bench_names():
        err_console.print(
            f"slicefab: unknown benchmark {args.name!r}; known: {', '.join(bench_names())}"
        )
        return 2
    figures = run_bench(args.name, quick=args.quick, progress=not args.json)
    if args.json:
        emit_json(figures)
    else:
        from rich.table import Table

        t = Table(title=f"bench {args.name}", title_justify="left")
        t.add_column("figure")
        t.add_column("value", justify="right")
        for k, v in figures.items():
            t.add_row(k, f"{v:,.2f}" if isinstance(v, float) else str(v))
        console.print(t)
    return 0


# ---------------------------------------------------------------------- parser


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of core ids, e.g. 0,1,2"
        ) from None
    return ids


def _key(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a key number or 'auto'") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="firmware state directory: ledger, admin socket "
        "(default: $SLICEFAB_STATE_DIR or ~/.local/state/slicefab)",
    )
    common.add_argument(
        "--device",
        type=Path,
        default=None,
        help="device inventory TOML (default: the shipped default device)",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = argparse.ArgumentParser(
        prog="slicefab",
        description="Slicefab: offload-device firmware emulator (Resource Allocation Manager).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the firmware daemon")
    s.add_argument(
        "--vm-sockets",
        action="store_true",
        help="also serve each VM's API on a Unix socket beside its mailbox",
    )
    s.add_argument(
        "--durability",
        choices=[d.value for d in Durability],
        default=Durability.POWER.value,
        help="what an acknowledged operation survives: 'power' (fsync every group commit; "
        "the default) or 'crash' (the firmware process being killed; no fsync per commit)",
    )
    s.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (default: off; loopback "
        "only unless --metrics-public; port 0 picks a free one, printed at start)",
    )
    s.add_argument(
        "--metrics-public",
        action="store_true",
        help="allow --metrics on a non-loopback address (it shows every VM's slices)",
    )
    s.add_argument(
        "--no-qemu",
        action="store_true",
        help="do not apply slices to the QEMU guests of `slicefab vm up` (docs/qemu.md)",
    )
    s.add_argument(
        "--adaptive-interval",
        type=interval_arg,
        default=10.0,
        metavar="SECONDS",
        help="how often the adaptive controller samples and decides (default 10; 0: off; "
        "docs/adaptive.md)",
    )
    pool_cli.add_serve_arguments(s)
    s.set_defaults(func=cmd_serve)

    dev = sub.add_parser("device", help="the device inventory").add_subparsers(
        dest="sub", required=True
    )
    d = dev.add_parser("show", parents=[common], help="show the device inventory")
    d.set_defaults(func=cmd_device_show)

    st = sub.add_parser("status", parents=[common], help="utilisation, fabric and ledger state")
    st.set_defaults(func=cmd_status)

    sl = sub.add_parser("slices", help="list and inspect slices").add_subparsers(
        dest="sub", required=True
    )
    ls = sl.add_parser("list", parents=[common], help="list live slices")
    ls.add_argument("--owner", help="only this VM's slices")
    ls.set_defaults(func=cmd_slices_list)
    sh = sl.add_parser("show", parents=[common], help="show one slice")
    sh.add_argument("id", type=int)
    sh.set_defaults(func=cmd_slices_show)

    a = sub.add_parser("alloc", parents=[common], help="allocate a slice")
    a.add_argument("--file", type=Path, help="slice file (TOML); flags below are ignored")
    a.add_argument("--owner", help="owner VM id")
    a.add_argument("--name", help="a label")
    a.add_argument("--cores", type=int, help="number of cores")
    a.add_argument("--core-ids", type=_id_list, help="explicit core ids, comma-separated")
    a.add_argument("--same-cluster", action="store_true", help="all cores in one cluster")
    a.add_argument("--memory", help="memory size, e.g. '4GiB'")
    a.add_argument("--contiguous", action="store_true", help="memory in one extent")
    a.add_argument("--lanes", type=int, help="PCIe link width 1/2/4/8/16")
    a.add_argument("--endpoint", help="pin the lanes to this endpoint (e.g. nvme0)")
    a.add_argument("--first-lane", type=int, help="explicit first lane (naturally aligned)")
    a.add_argument("--key", type=_key, help="protection key number, or 'auto' (default)")
    a.add_argument("--ports", type=int, help="crossbar ports (default 1)")
    a.add_argument("--priority", type=int, help="QoS priority 0-7")
    a.add_argument("--guaranteed", help="guaranteed bandwidth per port, e.g. '10Gbit/s'")
    a.add_argument("--maximum", help="maximum bandwidth per port, e.g. '25Gbit/s'")
    a.add_argument("--request-id", help="idempotency key: a retry with it allocates once")
    a.set_defaults(func=cmd_alloc)

    r = sub.add_parser("resize", parents=[common], help="resize a live slice")
    r.add_argument("id", type=int)
    r.add_argument("--memory", help="new memory size, e.g. '8GiB'")
    r.add_argument("--cores", type=int, help="new number of cores")
    r.add_argument("--priority", type=int)
    r.add_argument("--guaranteed", help="new guaranteed bandwidth per port")
    r.add_argument("--maximum", help="new maximum bandwidth per port")
    r.add_argument("--request-id")
    r.set_defaults(func=cmd_resize)

    f = sub.add_parser("free", parents=[common], help="free a slice")
    f.add_argument("id", type=int)
    f.add_argument("--request-id")
    f.set_defaults(func=cmd_free)

    fab = sub.add_parser("fabric", help="the crossbar").add_subparsers(dest="sub", required=True)
    fs = fab.add_parser("show", parents=[common], help="the active permission table")
    fs.set_defaults(func=cmd_fabric_show)

    vm = sub.add_parser("vm", help="VM credentials and mailboxes").add_subparsers(
        dest="sub", required=True
    )
    va = vm.add_parser("add", parents=[common], help="provision a VM: key, mailbox, credential")
    va.add_argument("vm", help="the VM id")
    va.add_argument("--mailbox", type=Path, help="mailbox file (default: STATE/mailboxes/VM.mbox)")
    va.add_argument(
        "--credential",
        type=Path,
        help="where to write the VM's credential (default: STATE/vms/VM.credential.toml)",
    )
    va.set_defaults(func=cmd_vm_add)
    vl = vm.add_parser("list", parents=[common], help="provisioned VMs and running guests")
    vl.set_defaults(func=cmd_vm_list)
    vu = vm.add_parser("up", parents=[common], help="boot a QEMU guest for a provisioned VM")
    from slicefab_qemu.cli import add_up_arguments

    add_up_arguments(vu)
    vu.set_defaults(func=cmd_vm_up)
    vd = vm.add_parser("down", parents=[common], help="stop a VM's QEMU guest")
    vd.add_argument("vm")
    vd.set_defaults(func=cmd_vm_down)
    vr = vm.add_parser("remove", parents=[common], help="revoke a VM's credential")
    vr.add_argument("vm")
    vr.set_defaults(func=cmd_vm_remove)

    ck = sub.add_parser(
        "check", parents=[common], help="check invariants and the crossbar against the ledger"
    )
    ck.set_defaults(func=cmd_check)

    from firmware.top import add_arguments as add_top_arguments

    tp = sub.add_parser("top", parents=[common], help="a live view of the device")
    add_top_arguments(tp)
    tp.set_defaults(func=cmd_top)

    pool_cli.add_pool_commands(sub, console)

    dm = sub.add_parser("demo", parents=[common], help="a scripted session of a few VMs")
    dm.add_argument(
        "--keep",
        dest="state_dir_demo",
        type=Path,
        default=None,
        help="keep the demo's state in this directory (default: a temporary one)",
    )
    dm.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", parents=[common], help="run a benchmark, print its figures")
    b.add_argument(
        "name",
        help="alloc, mailbox, fastpath, metrics, rtl, synth, qemu, adaptive, placement or "
        "pool (docs/benchmarks.md, docs/pool.md)",
    )
    b.add_argument("--quick", action="store_true", help="shorter run (for tests)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except CommandError as e:
        if getattr(args, "json", False):
            emit_json({"error": e.error})
        err_console.print(f"slicefab: error: {e.error['message']}", markup=False, highlight=False)
        return 1
    except SlicefabError as e:
        if getattr(args, "json", False):
            emit_json({"error": e.to_dict()})
        err_console.print(f"slicefab: error: {e.message}", markup=False, highlight=False)
        return 1
    except TransportError as e:  # the daemon went away mid-request: the outcome is unknown
        message = (
            f"lost the daemon ({e}); the request may or may not have been applied: "
            "retry it with the same --request-id once the daemon is back"
        )
        if getattr(args, "json", False):
            emit_json({"error": {"code": "unavailable", "message": message, "details": {}}})
        err_console.print(f"slicefab: error: {message}", markup=False, highlight=False)
        return 4


if __name__ == "__main__":
    sys.exit(main())
