"""Generate the crossbar's register-map artefacts from ``rtl/regmap/slicefab_xbar.rdl``.

Usage (from the repository root)::

    .venv/bin/python rtl/regmap/generate.py           # rewrite the committed outputs
    .venv/bin/python rtl/regmap/generate.py --check   # exit 1 with a diff if any is stale

The SystemRDL file is the one source of the register map (docs/DESIGN "The crossbar"). It is
compiled once with systemrdl-compiler and exported four ways:

``abi/regmap.py``
    Typed constants for the firmware and the behavioural model. This exporter is written
    here, on systemrdl-compiler's node API, because no maintained PeakRDL exporter emits
    plain typed constants: PeakRDL-python generates a whole register-access class tree
    with its own callback layer, and the cheader output is C. ``abi`` must stay a leaf
    with no I/O and no run-time dependency, so it gets ``Final`` integers and one pure
    helper, ``port_reg``.
``cffi_ext/include/slicefab_xbar.h``
    peakrdl-cheader, register/field names taken from the instance hierarchy
    (``reuse_typedefs=False``) so that they stay those of the map.
``docs/abi/registers.md``
    peakrdl-markdown, with register arrays documented once (element 0 standing for all)
    instead of unrolled 64 times.
``rtl/regmap/slicefab_xbar_regs.sv``
    peakrdl-etana (the register block of the Verilog crossbar, which Icarus 11 compiles;
    peakrdl-regblock's output does not): passthrough CPU interface (``rtl/slicefab_xbar_axil.sv``
    puts the AXI4-Lite slave and the per-instance checks in front of it), SLVERR for
    unmapped addresses and wrong-direction accesses, synchronous active-high reset.

Every output is a pure function of the RDL (no timestamps, no absolute paths), which is
what ``--check`` relies on.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peakrdl_cheader.exporter import CHeaderExporter
from peakrdl_etana import RegblockExporter  # type: ignore[import-untyped]
from peakrdl_etana.cpuif.passthrough import PassthroughCpuif  # type: ignore[import-untyped]
from peakrdl_etana.udps import ALL_UDPS as ETANA_UDPS  # type: ignore[import-untyped]
from peakrdl_markdown.exporter import MarkdownExporter  # type: ignore[import-untyped]
from py_markdown_table.markdown_table import markdown_table  # type: ignore[import-untyped]
from systemrdl.compiler import RDLCompiler
from systemrdl.messages import MessageHandler
from systemrdl.node import AddressableNode, AddrmapNode, FieldNode, MemNode, RegfileNode, RegNode

REPO_ROOT = Path(__file__).resolve().parents[2]
RDL_SOURCE = Path("rtl/regmap/slicefab_xbar.rdl")
PYTHON_OUTPUT = Path("abi/regmap.py")
C_HEADER_OUTPUT = Path("cffi_ext/include/slicefab_xbar.h")
MARKDOWN_OUTPUT = Path("docs/abi/registers.md")
VERILOG_OUTPUT = Path("rtl/regmap/slicefab_xbar_regs.sv")
VERILOG_MODULE = "slicefab_xbar_regs"

REGISTER_WIDTH = 32  # AXI4-Lite data width of the register port

GENERATED_NOTE = f"generated from {RDL_SOURCE} by rtl/regmap/generate.py — do not edit"


class RegmapShapeError(Exception):
    """The RDL has a shape the Python exporter does not know how to name."""


def compile_regmap(source: Path | None = None) -> AddrmapNode:
    """Compile and elaborate the register map with its default parameters (N_PORTS=64)."""
    rdlc = RDLCompiler()
    # peakrdl-etana looks up its own UDPs on every node; soft ones stay invisible to the RDL
    for udp in ETANA_UDPS:
        rdlc.register_udp(udp, soft=True)
    rdlc.compile_file(str(source or REPO_ROOT / RDL_SOURCE))
    return rdlc.elaborate().top


# --------------------------------------------------------------------------------------
# abi/regmap.py
# --------------------------------------------------------------------------------------


def _access(reg: RegNode) -> str:
    """The register's software access as in SystemRDL ``sw``: "r", "w" or "rw"."""
    readable = reg.has_sw_readable
    writable = reg.has_sw_writable
    return ("r" if readable else "") + ("w" if writable else "")


def _is_constant(reg: RegNode) -> bool:
    """True for a register the hardware never drives and software cannot write."""
    return all(
        not f.is_sw_writable and not f.is_hw_writable and f.get_property("reset") is not None
        for f in reg.fields()
    )


def _register_reset(reg: RegNode) -> int | None:
    """Reset value of the whole register, or None if one of its fields has none."""
    value = 0
    for f in reg.fields():
        reset = f.get_property("reset")
        if not isinstance(reset, int):
            return None
        value |= reset << f.lsb
    return value


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _python_register(prefix: str, label: str, reg: RegNode, out: list[str]) -> None:
    """Constants of one register: offset, access, reset, then each field's position."""
    offset = reg.address_offset
    access = _access(reg)
    if reg.get_property("regwidth") != REGISTER_WIDTH:
        raise RegmapShapeError(f"{prefix}: only {REGISTER_WIDTH}-bit registers are supported")
    out.append("")
    out.append(f"# {label}0x{offset:03X} ({access}): {_one_line(reg.get_property('name'))}")
    out.append(f"{prefix}_OFFSET: Final = 0x{offset:03X}")
    out.append(f'{prefix}_ACCESS: Final = "{access}"')
    reset = _register_reset(reg)
    if reset is not None:
        out.append(f"{prefix}_RESET: Final = 0x{reset:08X}")
    if _is_constant(reg):
        assert reset is not None
        out.append(f"{prefix}_VALUE: Final = 0x{reset:08X}")
    for f in reg.fields():
        _python_field(f"{prefix}_{f.inst_name.upper()}", f, out, constant=_is_constant(reg))


def _python_field(prefix: str, field: FieldNode, out: list[str], *, constant: bool) -> None:
    mask = ((1 << field.width) - 1) << field.lsb
    out.append(f"{prefix}_LSB: Final = {field.lsb}")
    out.append(f"{prefix}_WIDTH: Final = {field.width}")
    out.append(f"{prefix}_MASK: Final = 0x{mask:08X}")
    reset = field.get_property("reset")
    if isinstance(reset, int):
        out.append(f"{prefix}_RESET: Final = 0x{reset:X}")
        if constant:
            out.append(f"{prefix}_VALUE: Final = 0x{reset:X}")
    for udp in ("intwidth", "fracwidth"):
        value = field.get_property(udp, default=None)
        if value is not None:
            out.append(f"{prefix}_{udp.upper()}: Final = {value}")


def _name_table(name: str, doc: str, entries: Sequence[tuple[int, str]]) -> list[str]:
    lines = [f"#: {doc}", f"{name}: Final[Mapping[int, str]] = {{"]
    lines += [f'    0x{offset:03X}: "{reg_name}",' for offset, reg_name in entries]
    lines.append("}")
    return lines


_PORT_REG_FUNCTION = '''


def port_reg(port: int, offset: int) -> int:
    """Byte address of the per-port register at ``offset`` of input ``port``.

    ``PORT_BASE + port * PORT_STRIDE + offset``. Raises ``ValueError`` naming the limit when
    ``port`` is not in ``0..MAX_PORTS-1`` or ``offset`` is not a register of PORT_REGISTERS
    (the register map is laid out for MAX_PORTS; an instance with fewer ports, CAPS.n_ports,
    refuses the extra ones itself).
    """
    if not 0 <= port < MAX_PORTS:
        raise ValueError(f"port {port} out of range: the register map has ports 0..{MAX_PORTS - 1}")
    if offset not in PORT_REGISTERS:
        raise ValueError(
            f"offset 0x{offset:X} is not a per-port register "
            f"(known: {', '.join(f'0x{o:02X}' for o in PORT_REGISTERS)})"
        )
    return PORT_BASE + port * PORT_STRIDE + offset
'''


def render_python(top: AddrmapNode) -> str:
    """The text of ``abi/regmap.py``: every register and field of ``top`` as constants.

    Naming: global register ``R`` gives ``R_OFFSET``, ``R_ACCESS``, ``R_RESET`` (when every
    field has a reset), ``R_VALUE`` (constant registers); its field ``f`` gives
    ``R_F_LSB``, ``R_F_WIDTH``, ``R_F_MASK`` (in place), ``R_F_RESET``, ``R_F_VALUE`` and the
    fixed-point UDPs ``R_F_INTWIDTH``/``R_F_FRACWIDTH``. The register-file array ``port``
    gives ``PORT_BASE``, ``PORT_STRIDE``, ``MAX_PORTS`` and ``PORT_R_*`` for its registers,
    with offsets relative to the port's base.
    """
    body: list[str] = []
    global_regs: list[tuple[int, str]] = []
    port_regs: list[tuple[int, str]] = []
    arrays = 0
    for child in top.children(unroll=False):
        if isinstance(child, RegNode) and not child.is_array:
            _python_register(child.inst_name.upper(), f"{child.inst_name} @ ", child, body)
            global_regs.append((child.address_offset, child.inst_name))
        elif isinstance(child, RegfileNode) and child.is_array and child.inst_name == "port":
            dims = child.array_dimensions
            if dims is None or len(dims) != 1:
                raise RegmapShapeError(f"{child.inst_name}: expected a one-dimensional array")
            arrays += 1
            child.current_idx = [0]
            body.append("")
            body.append(
                f"# {child.inst_name}[0..{dims[0] - 1}]: {_one_line(child.get_property('name'))}"
            )
            body.append(f"PORT_BASE: Final = 0x{child.raw_address_offset:03X}")
            body.append(f"PORT_STRIDE: Final = 0x{child.array_stride:02X}")
            body.append(f"MAX_PORTS: Final = {dims[0]}")
            for reg in child.children(unroll=False):
                if not isinstance(reg, RegNode) or reg.is_array:
                    raise RegmapShapeError(f"port.{reg.inst_name}: expected a plain register")
                _python_register(
                    f"PORT_{reg.inst_name.upper()}", f"port[p].{reg.inst_name} @ +", reg, body
                )
                port_regs.append((reg.address_offset, reg.inst_name))
        else:
            raise RegmapShapeError(f"{child.inst_name}: no Python naming rule for this node")
    if arrays != 1:
        raise RegmapShapeError(f"expected one port array, found {arrays}")

    head = [
        f"# {GENERATED_NOTE}",
        f'"""Register map of the Slicefab crossbar ({top.inst_name}), as typed constants.',
        "",
        "Byte addresses on the AXI4-Lite register port; every register is 32 bits wide.",
        "Semantics: docs/abi/registers.md (from the same RDL source). MASK constants are",
        "in place (already shifted by LSB).",
        '"""',
        "",
        "from collections.abc import Mapping",
        "from typing import Final",
        "",
        f"REGISTER_WIDTH: Final = {REGISTER_WIDTH}",
        f"ADDRMAP_SIZE: Final = 0x{top.size:X}",
    ]
    tail = [""]
    tail += _name_table("GLOBAL_REGISTERS", "Global registers: offset -> name.", global_regs)
    tail += _name_table(
        "PORT_REGISTERS", "Per-port registers: offset within a port -> name.", port_regs
    )
    return "\n".join(head + body + tail) + _PORT_REG_FUNCTION


def export_python(top: AddrmapNode, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_python(top), encoding="utf-8")


# --------------------------------------------------------------------------------------
# cffi_ext/include/slicefab_xbar.h
# --------------------------------------------------------------------------------------


def export_c_header(top: AddrmapNode, path: Path) -> None:
    """peakrdl-cheader with names from the hierarchy (``SLICEFAB_XBAR__PORTX__KEYS__MASK_bm``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    CHeaderExporter().export(top, str(path), reuse_typedefs=False)
    _prepend(path, f"// {GENERATED_NOTE}\n")


# --------------------------------------------------------------------------------------
# docs/abi/registers.md
# --------------------------------------------------------------------------------------


class ArrayMarkdownExporter(MarkdownExporter):  # type: ignore[misc]
    """peakrdl-markdown, documenting each register array once instead of unrolling it.

    Upstream (peakrdl-markdown 1.0.x) unrolls every array, which turns the 64 identical
    ports into half a megabyte of Markdown. This override of its tree walk is upstream's
    ``_add_addrmap_regfile_mem`` with ``unroll=False``: an array is shown by its element 0
    (addresses of element 0, with the array's dimensions, stride and total size).
    """

    def _add_addrmap_regfile_mem(
        self, node: AddrmapNode | RegfileNode | MemNode, msg: MessageHandler, depth: int
    ) -> Any:
        members: list[Any] = []
        member_gen = ""
        for child in node.children(unroll=False, skip_not_present=True):
            if isinstance(child, AddressableNode) and child.is_array:
                # Element 0 stands for the array, so that addresses below it are defined.
                child.current_idx = [0] * len(child.array_dimensions or [])
            if isinstance(child, (AddrmapNode, RegfileNode, MemNode)):
                output = self._add_addrmap_regfile_mem(child, msg, depth - 1)
            elif isinstance(child, RegNode):
                output = self._add_reg(child, msg)
            else:
                msg.warning(f"Unsupported node {child.get_path()}")
                continue
            member_gen += output.generated
            members.append(output)

        gen: str = self._addrnode_header(node, msg, 2)
        if members:
            digits = max(len(f"{m.table_row['Offset']:X}") for m in members)
            for member in members:
                member.table_row["Offset"] = f"0x{member.table_row['Offset']:0{digits}X}"
            gen += self._table([m.table_row for m in members])
        else:
            gen += "No supported members.\n"
        gen += "\n"
        return MarkdownExporter.GenStageOutput(
            node, self._addrnode_table_row(node), gen + (member_gen if depth != 0 else "")
        )

    def _addrnode_table_row(self, node: AddressableNode) -> OrderedDict[str, str | int]:
        row: OrderedDict[str, str | int] = super()._addrnode_table_row(node)
        if node.is_array and node.array_dimensions:
            row["Identifier"] = node.inst_name + "".join(
                f"[0..{dim - 1}]" for dim in node.array_dimensions
            )
        return row

    @staticmethod
    def _table(rows: list[OrderedDict[str, str | int]]) -> str:
        text: str = markdown_table(rows).set_params(row_sep="markdown", quote=False).get_markdown()
        return text


def export_markdown(top: AddrmapNode, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ArrayMarkdownExporter().export(top, str(path), input_files=[str(RDL_SOURCE)])
    _prepend(path, f"<!-- {GENERATED_NOTE} -->\n")


# --------------------------------------------------------------------------------------
# rtl/regmap/slicefab_xbar_regs.sv
# --------------------------------------------------------------------------------------


def export_verilog(top: AddrmapNode, path: Path) -> None:
    """peakrdl-etana register block for the crossbar (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="regmap-etana-") as tmp:
        RegblockExporter().export(
            top,
            tmp,
            cpuif_cls=PassthroughCpuif,
            module_name=VERILOG_MODULE,
            err_if_bad_addr=True,
            err_if_bad_rw=True,
            default_reset_activelow=False,
            default_reset_async=False,
        )
        text = (Path(tmp) / f"{VERILOG_MODULE}.sv").read_text(encoding="utf-8")
    path.write_text(f"// {GENERATED_NOTE}\n" + text, encoding="utf-8")


def _prepend(path: Path, line: str) -> None:
    path.write_text(line + path.read_text(encoding="utf-8"), encoding="utf-8")


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------

EXPORTERS: dict[Path, Callable[[AddrmapNode, Path], None]] = {
    PYTHON_OUTPUT: export_python,
    C_HEADER_OUTPUT: export_c_header,
    MARKDOWN_OUTPUT: export_markdown,
    VERILOG_OUTPUT: export_verilog,
}


def generate(out_root: Path, source: Path | None = None) -> list[Path]:
    """Write every output under ``out_root``; return the paths written."""
    written = []
    for rel, exporter in EXPORTERS.items():
        # A fresh elaboration per exporter: the exporters set array indexes on the nodes.
        exporter(compile_regmap(source), out_root / rel)
        written.append(out_root / rel)
    return written


def check(committed_root: Path, source: Path | None = None) -> list[str]:
    """Regenerate into a temporary directory; return a unified diff per stale output."""
    diffs = []
    with tempfile.TemporaryDirectory(prefix="regmap-check-") as tmp:
        generate(Path(tmp), source)
        for rel in EXPORTERS:
            fresh = (Path(tmp) / rel).read_text(encoding="utf-8")
            committed_path = committed_root / rel
            committed = (
                committed_path.read_text(encoding="utf-8") if committed_path.exists() else ""
            )
            if fresh != committed:
                diffs.append(
                    "".join(
                        difflib.unified_diff(
                            committed.splitlines(keepends=True),
                            fresh.splitlines(keepends=True),
                            fromfile=f"{rel} (committed)",
                            tofile=f"{rel} (from {RDL_SOURCE})",
                        )
                    )
                    or f"{rel}: missing\n"
                )
    return diffs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 and print a diff if a committed output is stale",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO_ROOT,
        help="directory holding abi/, cffi_ext/ and docs/ (default: the repository root)",
    )
    args = parser.parse_args(argv)
    if args.check:
        diffs = check(args.root)
        for diff in diffs:
            sys.stdout.write(diff)
        if diffs:
            print(
                f"{len(diffs)} generated file(s) out of date; "
                "run: .venv/bin/python rtl/regmap/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    for path in generate(args.root):
        print(f"wrote {path.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
