"""Human views of the device: slice tables, utilisation bars, the fabric's permission table.

Shared by the CLI, the demo and (later) ``slicefab top``. They take the JSON-able dicts the
admin service returns, so they render the same thing whether the CLI talks to a daemon or
works in-process.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from firmware.units import format_bandwidth, format_size

_OWNER_STYLES = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "red",
    "bright_cyan",
    "bright_magenta",
)


def ranges(ids: list[int]) -> str:
    """``[0,1,2,3,8]`` → ``"0-3,8"``."""
    out: list[str] = []
    for i in sorted(ids):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        elif out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out) or "-"


def owner_style(owner: str, owners: list[str]) -> str:
    return _OWNER_STYLES[owners.index(owner) % len(_OWNER_STYLES)] if owner in owners else "white"


def slice_table(slices: list[dict[str, Any]], title: str = "Slices") -> Table:
    owners = sorted({s["owner"] for s in slices})
    t = Table(title=title, title_justify="left")
    right = {"id", "memory", "extents", "key"}
    for col in (
        "id",
        "owner",
        "name",
        "state",
        "cores",
        "memory",
        "extents",
        "lanes",
        "key",
        "ports",
        "QoS prio g/max",
    ):
        t.add_column(col, justify="right" if col in right else "left")
    for s in slices:
        a, spec = s["alloc"], s["spec"]
        lanes = a["lanes"]
        lane_txt = "-"
        if lanes:
            lane_txt = f"x{lanes['width']} @{lanes['first']}"
            if spec.get("lanes", {}).get("endpoint"):
                lane_txt += f" ({spec['lanes']['endpoint']})"
        q = spec["qos"]
        qos = (
            f"p{q['priority']} {format_bandwidth(q['guaranteed']) if q['guaranteed'] else '0'}"
            f"/{format_bandwidth(q['maximum']) if q['maximum'] else 'line'}"
        )
        t.add_row(
            str(s["id"]),
            Text(s["owner"], style=owner_style(s["owner"], owners)),
            s.get("name") or "",
            s["state"],
            ranges(a["cores"]),
            s["memory"] if a["extents"] else "-",
            str(len(a["extents"])),
            lane_txt,
            str(a["key"]),
            ranges(a["ports"]),
            qos,
        )
    return t


def utilisation_table(util: dict[str, dict[str, int]], granule_bytes: int) -> Table:
    t = Table(title="Utilisation", title_justify="left")
    t.add_column("resource")
    t.add_column("used", justify="right")
    t.add_column("total", justify="right")
    t.add_column("", width=32)
    for name, u in util.items():
        used, total = u["used"], u["total"]
        if name == "memory_granules":
            name, used_s, total_s = (
                "memory",
                format_size(used * granule_bytes),
                format_size(total * granule_bytes),
            )
        elif name == "guaranteed_mbps":
            name, used_s, total_s = "guaranteed bw", format_bandwidth(used), format_bandwidth(total)
        else:
            used_s, total_s = str(used), str(total)
        t.add_row(name, used_s, total_s, ProgressBar(total=max(total, 1), completed=used, width=30))
    return t


def permission_table(fabric: dict[str, Any], slices: list[dict[str, Any]]) -> Group:
    """The crossbar's active permission table as a matrix: row = input port, column =
    output port, a dot where the input may send to the output; rows coloured by owner VM."""
    owners = sorted({s["owner"] for s in slices})
    port_owner: dict[int, str] = {}
    for s in slices:
        for p in s["alloc"]["ports"]:
            port_owner[p] = s["owner"]
    n = fabric["ports"]
    t = Table(
        title=f"Fabric permission table (generation {fabric['generation']})",
        title_justify="left",
        show_lines=False,
        pad_edge=False,
    )
    t.add_column("in\\out", justify="right")
    for o in range(n):
        t.add_column(str(o), justify="center", width=2)
    t.add_column("owner")
    for i in range(n):
        mask = fabric["permission"][i]
        style = owner_style(port_owner[i], owners) if i in port_owner else "dim"
        cells = [
            Text("●" if mask >> o & 1 else "·", style=style if mask >> o & 1 else "dim")
            for o in range(n)
        ]
        t.add_row(str(i), *cells, Text(port_owner.get(i, "-"), style=style))
    return Group(t)
