"""``slicefab pool``: a local pool for a demo, and the pool API on the command line.

::

    slicefab pool up [--dir DIR] [--devices 3] [--etcd-members 1] [--zones 1] [--ttl 5]
    slicefab pool status | list [--owner VM] | show ID
    slicefab pool compose --owner vm-a --cores 8 --memory 32GiB --nvme 1 [--max-devices 2]
    slicefab pool release ID
    slicefab pool migrate ID --from DEV [--to DEV] | --abort
    slicefab pool drain DEV | undrain DEV
    slicefab pool rebalance [--threshold 0.25] [--max-moves 4] [--dry-run]
    slicefab pool down [--dir DIR]

``up`` starts etcd and N device daemons (``slicefab serve --pool ... --device-id devN``)
on loopback, in their own sessions, with their state and logs under DIR, and records them
in DIR/pool.json; ``down`` stops exactly those processes. The other commands reach the
pool through ``--pool URL[,URL...]``, else ``$SLICEFAB_POOL``, else DIR/pool.json.
Also here: the ``serve`` options that make a daemon a pool member (:func:`start_member`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from firmware.errors import ConfigError, SlicefabError
from firmware.manager import ResourceManager, StateDir, default_state_dir
from firmware.units import format_size

POOL_ENV = "SLICEFAB_POOL"
MANIFEST = "pool.json"
UP_TIMEOUT_S = 60.0


def default_pool_dir() -> Path:
    return default_state_dir().parent / "slicefab-pool"


# ---------------------------------------------------------------------- serve --pool


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--pool",
        metavar="URL[,URL...]",
        help="join the pool whose etcd members are at these client URLs (docs/pool.md); "
        "default: no pool (the embedded single-device firmware)",
    )
    s.add_argument("--device-id", help="this device's id in the pool (required with --pool)")
    s.add_argument("--pool-zone", default="zone0", help="the device's zone (latency model)")
    s.add_argument(
        "--pool-ttl", type=int, default=5, help="lease TTL in s: how soon a dead device is lost"
    )


def start_member(args: argparse.Namespace, manager: ResourceManager, state: StateDir) -> Any:
    """With ``--pool``: register the device and start its membership threads; returns the
    member (stop it with ``.stop()``), or None without ``--pool``."""
    if not getattr(args, "pool", None):
        return None
    if not args.device_id:
        raise ConfigError("--pool needs --device-id", field="device_id", expected="e.g. dev0")
    from firmware.pool.member import PoolMember

    member = PoolMember(
        manager,
        args.pool,
        args.device_id,
        zone=args.pool_zone,
        ttl=args.pool_ttl,
        admin_socket=str(state.socket),
    )
    member.start()
    return member


# ---------------------------------------------------------------------- commands


def _endpoints(args: argparse.Namespace) -> list[str]:
    from firmware.pool.etcd import parse_endpoints

    if args.pool:
        return parse_endpoints(args.pool)
    if env := os.environ.get(POOL_ENV):
        return parse_endpoints(env)
    manifest = Path(args.dir) / MANIFEST
    if manifest.exists():
        return list(json.loads(manifest.read_text())["endpoints"])
    raise ConfigError(
        "no pool given",
        field="pool",
        expected=f"--pool URL, ${POOL_ENV}, or a pool started with `slicefab pool up --dir "
        f"{args.dir}`",
    )


def _pool(args: argparse.Namespace) -> Any:
    from firmware.pool.composer import Pool

    return Pool(_endpoints(args))


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cmd_up(args: argparse.Namespace, console: Console) -> int:
    from firmware.pool.cluster import LocalEtcd
    from firmware.pool.composer import Pool

    directory = Path(args.dir).absolute()
    manifest = directory / MANIFEST
    if manifest.exists():
        raise ConfigError(
            f"a pool is already up in {directory} (`slicefab pool down --dir {directory}`)",
            field="dir",
        )
    if not 1 <= args.devices <= 16:
        raise ConfigError(f"--devices {args.devices} is out of range", limit="1..16")
    etcd = LocalEtcd(directory / "etcd", args.etcd_members, detach=True)
    etcd.start()
    record: dict[str, Any] = {
        "endpoints": etcd.endpoints,
        "etcd": [{"name": m.name, "pid": m.process.pid if m.process else 0} for m in etcd.members],
        "devices": [],
    }
    manifest.write_text(json.dumps(record, indent=2))
    try:
        for i in range(args.devices):
            dev_id = f"dev{i}"
            state = directory / dev_id
            state.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable, "-m", "firmware.cli", "serve",
                "--state-dir", str(state),
                "--pool", ",".join(etcd.endpoints),
                "--device-id", dev_id,
                "--pool-zone", f"zone{i % args.zones}",
                "--pool-ttl", str(args.ttl),
                "--durability", "crash",
                "--no-qemu",
            ]  # fmt: skip
            if args.device:
                cmd += ["--device", str(args.device)]
            with open(directory / f"{dev_id}.log", "ab") as log:
                p = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            record["devices"].append({"id": dev_id, "pid": p.pid, "state_dir": str(state)})
            manifest.write_text(json.dumps(record, indent=2))
        pool = Pool(etcd.endpoints)
        deadline = time.monotonic() + UP_TIMEOUT_S
        while len(pool.devices()) < args.devices:
            if time.monotonic() > deadline:
                raise SlicefabError(
                    f"only {len(pool.devices())} of {args.devices} devices joined within "
                    f"{UP_TIMEOUT_S} s; see the logs in {directory}"
                )
            time.sleep(0.1)
    except BaseException:
        _down(directory)
        raise
    if args.json:
        _emit(record)
    else:
        console.print(
            f"pool up in {directory}: etcd {','.join(etcd.endpoints)}, "
            f"{args.devices} devices ({', '.join(d['id'] for d in record['devices'])})"
        )
        console.print(f"export {POOL_ENV}={','.join(etcd.endpoints)}")
    return 0


def _is_ours(pid: int, word: str) -> bool:
    """Whether ``pid`` still runs a process of ours (its command line names ``word``)."""
    try:
        return word in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _down(directory: Path) -> list[int]:
    manifest = directory / MANIFEST
    if not manifest.exists():
        return []
    record = json.loads(manifest.read_text())
    stopped: list[int] = []
    # devices first (they leave the pool cleanly while etcd still runs), then etcd
    for group, word in (
        (record.get("devices", []), "firmware.cli"),
        (record.get("etcd", []), "etcd"),
    ):
        pids = [int(p["pid"]) for p in group if _is_ours(int(p["pid"]), word)]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        # daemons get 10 s to leave the pool; etcd is crash-safe (see LocalEtcd.stop)
        deadline = time.monotonic() + (2 if word == "etcd" else 10)
        for pid in pids:
            while _is_ours(pid, word) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
            if _is_ours(pid, word):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
            stopped.append(pid)
    manifest.unlink()
    return stopped


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def cmd_down(args: argparse.Namespace, console: Console) -> int:
    directory = Path(args.dir).absolute()
    was_up = (directory / MANIFEST).exists()
    stopped = _down(directory)
    if args.json:
        _emit({"stopped": stopped, "was_up": was_up})
    else:
        console.print(
            f"stopped {len(stopped)} processes of the pool in {directory}"
            if was_up
            else f"no pool up in {directory}"
        )
    return 0


def _capacity_row(c: dict[str, Any]) -> str:
    return f"{c['cores']} cores, {format_size(c['memory'])}, nvme {','.join(c['nvme']) or '-'}"


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    st = _pool(args).status()
    if args.json:
        _emit(st)
        return 0
    t = Table(title="pool devices", title_justify="left")
    for col in ("device", "zone", "free", "total", "VMs"):
        t.add_column(col)
    for d in st["devices"]:
        t.add_row(
            d["device"] + (" (draining)" if d.get("draining") else ""),
            d["zone"],
            _capacity_row(d["free"]),
            _capacity_row(d["total"]),
            ", ".join(sorted(d["owners"])) or "-",
        )
    console.print(t)
    console.print(
        "compositions: "
        + (", ".join(f"{n} {s}" for s, n in sorted(st["compositions"].items())) or "none")
    )
    for c in st["lost"]:
        console.print(
            f"[bold red]lost[/]: composition {c['id']} of {c['owner']} "
            f"(devices {', '.join(c['lost_devices'])})"
        )
    return 0


def _composition_table(comps: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("id", "owner", "state", "parts (device: cores, memory, nvme → state)"):
        t.add_column(col)
    for c in comps:
        parts = "\n".join(
            f"{p['device']}: {p['cores']}c, {format_size(p['memory'])}, "
            f"{','.join(p['nvme']) or '-'} → {p['state']}"
            for p in c["parts"]
        )
        t.add_row(c["id"], c["owner"], c["state"], parts)
    return t


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        from firmware.schema import load_toml

        from_file = load_toml(args.file, "composition")
        if args.owner:
            from_file["owner"] = args.owner
        return from_file
    req: dict[str, Any] = {"owner": args.owner}
    for key in ("cores", "memory", "nvme", "nvme_width", "max_devices", "max_latency_us",
                "affinity"):  # fmt: skip
        value = getattr(args, key)
        if value is not None:
            req[key] = value
    if args.nvme_without_cores:
        req["nvme_with_cores"] = False
    return req


def cmd_compose(args: argparse.Namespace, console: Console) -> int:
    if not args.file and not args.owner:
        raise ConfigError("compose needs --owner (or --file)", field="owner")
    view = _pool(args).compose(_request_from_args(args), cid=args.id, wait=not args.no_wait)
    if args.json:
        _emit(view)
    elif "state" in view:
        console.print(_composition_table([view], f"composed {view['id']}"))
    else:
        console.print(f"reserved {view['id']}: {view['placement']}")
    return 0


def cmd_release(args: argparse.Namespace, console: Console) -> int:
    r = _pool(args).release(args.id, caller=args.owner)
    if args.json:
        _emit(r)
    else:
        console.print(f"released {r['id']} of {r['owner']}")
    return 0


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    comps = _pool(args).compositions(owner=args.owner)
    if args.json:
        _emit(comps)
    else:
        console.print(_composition_table(comps, "compositions"))
    return 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    c = _pool(args).get(args.id, caller=args.owner)
    if args.json:
        _emit(c)
    else:
        console.print(_composition_table([c], f"composition {c['id']}"))
    return 0


def _migrator(args: argparse.Namespace) -> Any:
    from firmware.pool.migrate import Migrator

    return Migrator(_endpoints(args))


def _move_line(m: dict[str, Any]) -> str:
    copy = m.get("copy")
    pages = (
        f"{copy['pages_copied']} pages copied of {copy['pages']} in {copy['rounds']} rounds, "
        f"switch {copy['switch_ms']} ms"
        if copy
        else "no page content in this process"
    )
    return f"{m['composition']}: {m['from']} → {m['to']} in {m['total_ms']} ms ({pages})"


def cmd_migrate(args: argparse.Namespace, console: Console) -> int:
    mig = _migrator(args)
    if args.abort:
        r = mig.abort(args.id)
        if args.json:
            _emit(r)
        else:
            console.print(f"aborted the move of {args.id} from {r['from']} to {r['to']}")
        return 0
    if not args.source:
        raise ConfigError("migrate needs --from DEVICE (or --abort)", field="from")
    move = mig.migrate(args.id, args.source, args.target).to_dict()
    if args.json:
        _emit(move)
    else:
        console.print("moved " + _move_line(move))
    return 0


def _report_moves(r: dict[str, Any], console: Console) -> None:
    for m in r["moved"]:
        console.print("moved " + _move_line(m))
    for f in r["failed"]:
        console.print(f"[bold red]not moved[/] {f['composition']}: {f['error']['message']}")


def cmd_drain(args: argparse.Namespace, console: Console) -> int:
    r = _migrator(args).drain(args.device)
    if args.json:
        _emit(r)
    else:
        _report_moves(r, console)
        console.print(
            f"{args.device} is draining and empty"
            if r["empty"]
            else f"{args.device} is draining; parts left: {', '.join(r['parts_left'])}"
        )
    return 0 if r["empty"] else 1


def cmd_undrain(args: argparse.Namespace, console: Console) -> int:
    rec = _migrator(args).set_draining(args.device, False)
    if args.json:
        _emit(rec.to_dict())
    else:
        console.print(f"{args.device} takes new reservations again")
    return 0


def cmd_rebalance(args: argparse.Namespace, console: Console) -> int:
    r = _migrator(args).rebalance(args.threshold, args.max_moves, dry_run=args.dry_run)
    if args.json:
        _emit(r)
        return 0 if not r["failed"] else 1
    for m in r["planned"]:
        console.print(
            f"would move {m['composition']}: {m['from']} → {m['to']} (cost {m['cost_now']} → "
            f"{m['cost_after']})"
        )
    _report_moves(r, console)
    if not (r["planned"] or r["moved"] or r["failed"]):
        console.print(f"balanced: no move lowers a part's cost by more than {args.threshold}")
    return 0 if not r["failed"] else 1


# ---------------------------------------------------------------------- parser


def add_pool_commands(sub: Any, console: Console) -> None:
    """Add ``slicefab pool ...`` to the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", type=Path, default=default_pool_dir(), help="the local pool's directory (up/down)"
    )
    common.add_argument(
        "--pool", metavar="URL[,URL...]", help=f"etcd client URLs (default ${POOL_ENV})"
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    def bind(p: argparse.ArgumentParser, fn: Any) -> None:
        p.set_defaults(func=lambda args: fn(args, console))

    pool = sub.add_parser("pool", help="multi-device pools on etcd (docs/pool.md)")
    ps = pool.add_subparsers(dest="sub", required=True)
    up = ps.add_parser("up", parents=[common], help="start etcd and N device daemons locally")
    up.add_argument("--devices", type=int, default=3, help="device daemons (default 3)")
    up.add_argument("--etcd-members", type=int, default=1, help="etcd members (default 1)")
    up.add_argument("--zones", type=int, default=1, help="spread devices over N zones")
    up.add_argument("--ttl", type=int, default=5, help="device lease TTL in s")
    up.add_argument("--device", type=Path, help="device inventory TOML for every device")
    bind(up, cmd_up)
    down = ps.add_parser("down", parents=[common], help="stop what `pool up` started")
    bind(down, cmd_down)
    st = ps.add_parser("status", parents=[common], help="devices, free capacity, lost parts")
    bind(st, cmd_status)
    ls = ps.add_parser("list", parents=[common], help="compositions and their parts' states")
    ls.add_argument("--owner", help="only this VM's compositions")
    bind(ls, cmd_list)
    sh = ps.add_parser("show", parents=[common], help="one composition")
    sh.add_argument("id")
    sh.add_argument("--owner", help="act as this VM (refused if it is not the owner)")
    bind(sh, cmd_show)
    c = ps.add_parser("compose", parents=[common], help="compose a VM from slices of devices")
    c.add_argument("--file", type=Path, help="composition request file (TOML)")
    c.add_argument("--owner", help="the VM")
    c.add_argument("--id", help="composition id (default: a random one)")
    c.add_argument("--cores", type=int)
    c.add_argument("--memory", help="e.g. 32GiB (a multiple of 1 GiB)")
    c.add_argument("--nvme", type=int, help="NVMe lane groups (whole SSD endpoints)")
    c.add_argument("--nvme-width", type=int, help="minimum link width of each (default 4)")
    c.add_argument("--max-devices", type=int, help="at most this many devices (default 3)")
    c.add_argument("--max-latency-us", type=float, help="max latency between its devices")
    c.add_argument("--affinity", choices=["pack", "spread"])
    c.add_argument(
        "--nvme-without-cores", action="store_true", help="NVMe may go to a device with no cores"
    )
    c.add_argument("--no-wait", action="store_true", help="return once reserved")
    bind(c, cmd_compose)
    r = ps.add_parser("release", parents=[common], help="release a composition")
    r.add_argument("id")
    r.add_argument("--owner", help="act as this VM (refused if it is not the owner)")
    bind(r, cmd_release)
    mg = ps.add_parser("migrate", parents=[common], help="move a composition's part live")
    mg.add_argument("id")
    mg.add_argument("--from", dest="source", help="the device whose part moves")
    mg.add_argument("--to", dest="target", help="the target device (default: least cost)")
    mg.add_argument("--abort", action="store_true", help="roll back a move whose mover died")
    bind(mg, cmd_migrate)
    dr = ps.add_parser("drain", parents=[common], help="move every part off a device")
    dr.add_argument("device")
    bind(dr, cmd_drain)
    ud = ps.add_parser("undrain", parents=[common], help="let a drained device take parts")
    ud.add_argument("device")
    bind(ud, cmd_undrain)
    rb = ps.add_parser("rebalance", parents=[common], help="move parts whose cost drops")
    rb.add_argument(
        "--threshold", type=float, default=0.25, help="least cost gain to move (default 0.25)"
    )
    rb.add_argument("--max-moves", type=int, default=4, help="at most this many (default 4)")
    rb.add_argument("--dry-run", action="store_true", help="only print the planned moves")
    bind(rb, cmd_rebalance)
