"""The register map: RDL layout as specified, generated outputs up to date and faithful.

The constants of ``abi/regmap.py`` are checked against an independent walk of the compiled
RDL (systemrdl-compiler's walker), not against the generator's own code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from systemrdl import RDLCompiler, RDLListener, RDLWalker
from systemrdl.node import AddrmapNode, FieldNode, RegfileNode, RegNode

import abi.regmap as rm

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "rtl/regmap/generate.py"
RDL = REPO / "rtl/regmap/slicefab_xbar.rdl"
OUTPUTS = (
    "abi/regmap.py",
    "cffi_ext/include/slicefab_xbar.h",
    "docs/abi/registers.md",
    "rtl/regmap/slicefab_xbar_regs.sv",
)


def run_generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def top() -> AddrmapNode:
    rdlc = RDLCompiler()
    rdlc.compile_file(str(RDL))
    return rdlc.elaborate().top


# --- generator ---------------------------------------------------------------------------


def test_committed_outputs_are_up_to_date() -> None:
    result = run_generator("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_reports_a_stale_output_with_a_diff(tmp_path: Path) -> None:
    for rel in OUTPUTS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    assert run_generator("--check", "--root", str(tmp_path)).returncode == 0

    stale = tmp_path / "abi/regmap.py"
    stale.write_text(stale.read_text().replace("PORT_STRIDE: Final = 0x40", "PORT_STRIDE = 0x80"))
    (tmp_path / "docs/abi/registers.md").unlink()
    result = run_generator("--check", "--root", str(tmp_path))
    assert result.returncode == 1
    assert "-PORT_STRIDE = 0x80" in result.stdout
    assert "+PORT_STRIDE: Final = 0x40" in result.stdout
    assert "docs/abi/registers.md" in result.stdout
    assert "2 generated file(s) out of date" in result.stderr


def test_generation_is_deterministic_and_location_free(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert run_generator("--root", str(tmp_path / name)).returncode == 0
    for rel in OUTPUTS:
        text = (tmp_path / "a" / rel).read_text()
        assert text == (tmp_path / "b" / rel).read_text(), rel
        assert str(tmp_path) not in text and str(REPO) not in text, rel


@pytest.mark.parametrize(
    ("rel", "comment"),
    list(zip(OUTPUTS, ["# {}", "// {}", "<!-- {} -->", "// {}"], strict=True)),
)
def test_outputs_start_with_the_do_not_edit_note(rel: str, comment: str) -> None:
    first = (REPO / rel).read_text().splitlines()[0]
    note = "generated from rtl/regmap/slicefab_xbar.rdl by rtl/regmap/generate.py — do not edit"
    assert first == comment.format(note)


# --- the layout the issue specifies --------------------------------------------------------

SPEC_GLOBAL = {"ID": 0x000, "VERSION": 0x004, "CAPS": 0x008, "CTRL": 0x00C, "GEN": 0x010}
SPEC_GLOBAL["STATUS"] = 0x014
SPEC_PORT = {
    "PERM_LO": 0x00,
    "PERM_HI": 0x04,
    "WEIGHT": 0x08,
    "TB_RATE": 0x0C,
    "TB_BURST": 0x10,
    "KEYS": 0x14,
    "ACTIVE_GEN": 0x18,
    "CNT_PKTS": 0x20,
    "CNT_FLITS": 0x24,
    "CNT_DROPS": 0x28,
    "CNT_STALLS": 0x2C,
}
# (register, field): (msb, lsb, sw access, reset or None)
SPEC_FIELDS: dict[tuple[str, str], tuple[int, int, str, int | None]] = {
    ("ID", "id"): (31, 0, "r", 0x53465842),
    ("VERSION", "major"): (15, 8, "r", 1),
    ("VERSION", "minor"): (7, 0, "r", 0),
    ("CAPS", "n_ports"): (7, 0, "r", None),
    ("CAPS", "n_keys"): (15, 8, "r", None),
    ("CAPS", "data_bytes"): (23, 16, "r", None),
    ("CTRL", "commit"): (0, 0, "w", 0),
    ("CTRL", "clear_counters"): (1, 1, "w", 0),
    ("GEN", "committed"): (15, 0, "r", 0),
    ("GEN", "adopted"): (31, 16, "r", 0),
    ("STATUS", "pending"): (0, 0, "r", 0),
    ("PERM_LO", "allowed"): (31, 0, "rw", 0),
    ("PERM_HI", "allowed"): (31, 0, "rw", 0),
    ("WEIGHT", "weight"): (7, 0, "rw", 1),
    ("TB_RATE", "rate"): (31, 0, "rw", 0),
    ("TB_BURST", "burst"): (23, 0, "rw", 0),
    ("TB_BURST", "enable"): (31, 31, "rw", 0),
    ("KEYS", "mask"): (15, 0, "rw", 0),
    ("ACTIVE_GEN", "gen"): (15, 0, "r", 0),
    **{(cnt, "count"): (31, 0, "r", 0) for cnt in SPEC_PORT if cnt.startswith("CNT_")},
}


def test_rdl_layout_is_the_specified_one(top: AddrmapNode) -> None:
    regs = {c.inst_name: c for c in top.children() if isinstance(c, RegNode)}
    assert {name: r.address_offset for name, r in regs.items()} == SPEC_GLOBAL
    port = top.get_child_by_name("port")
    assert isinstance(port, RegfileNode)
    assert (port.raw_address_offset, port.array_stride, port.array_dimensions) == (
        0x100,
        0x40,
        [64],
    )
    port_regs = {c.inst_name: c for c in port.children() if isinstance(c, RegNode)}
    assert {name: r.address_offset for name, r in port_regs.items()} == SPEC_PORT
    seen = {}
    for name, reg in {**regs, **port_regs}.items():
        assert reg.get_property("regwidth") == 32
        for f in reg.fields():
            seen[(name, f.inst_name)] = (
                f.msb,
                f.lsb,
                f.get_property("sw").name,
                f.get_property("reset"),
            )
    assert seen == SPEC_FIELDS
    assert int.from_bytes(b"SFXB", "big") == rm.ID_VALUE == 0x53465842
    rate = port_regs["TB_RATE"].get_child_by_name("rate")
    assert isinstance(rate, FieldNode)
    assert (rate.get_property("intwidth"), rate.get_property("fracwidth")) == (16, 16)


def test_n_ports_parameter_sizes_the_port_array() -> None:
    rdlc = RDLCompiler()
    rdlc.compile_file(str(RDL))
    port = rdlc.elaborate(parameters={"N_PORTS": 8}).top.get_child_by_name("port")
    assert isinstance(port, RegfileNode)
    assert port.array_dimensions == [8]


# --- abi/regmap.py against an independent walk of the RDL ----------------------------------


class _ExpectedConstants(RDLListener):
    """Collects the constants abi/regmap.py must define, by walking the compiled RDL."""

    def __init__(self) -> None:
        self.constants: dict[str, int | str] = {}
        self.prefix = ""
        self.constant_reg = False

    def enter_Regfile(self, node: RegfileNode) -> None:
        assert node.inst_name == "port" and node.array_dimensions is not None
        self.constants["PORT_BASE"] = node.raw_address_offset
        self.constants["PORT_STRIDE"] = node.array_stride or 0
        self.constants["MAX_PORTS"] = node.array_dimensions[0]

    def enter_Reg(self, node: RegNode) -> None:
        in_port = isinstance(node.parent, RegfileNode)
        self.prefix = ("PORT_" if in_port else "") + node.inst_name.upper()
        c = self.constants
        c[f"{self.prefix}_OFFSET"] = node.address_offset
        c[f"{self.prefix}_ACCESS"] = ("r" if node.has_sw_readable else "") + (
            "w" if node.has_sw_writable else ""
        )
        resets = [f.get_property("reset") for f in node.fields()]
        if all(isinstance(r, int) for r in resets):
            c[f"{self.prefix}_RESET"] = sum(f.get_property("reset") << f.lsb for f in node.fields())
        self.constant_reg = all(
            f.get_property("sw").name == "r" and f.get_property("hw").name == "na"
            for f in node.fields()
        )
        if self.constant_reg:
            c[f"{self.prefix}_VALUE"] = c[f"{self.prefix}_RESET"]

    def enter_Field(self, node: FieldNode) -> None:
        name = f"{self.prefix}_{node.inst_name.upper()}"
        c = self.constants
        c[f"{name}_LSB"] = node.lsb
        c[f"{name}_WIDTH"] = node.width
        c[f"{name}_MASK"] = ((1 << node.width) - 1) << node.lsb
        reset = node.get_property("reset")
        if reset is not None:
            c[f"{name}_RESET"] = reset
            if self.constant_reg:
                c[f"{name}_VALUE"] = reset
        for udp in ("intwidth", "fracwidth"):
            if node.get_property(udp, default=None) is not None:
                c[f"{name}_{udp.upper()}"] = node.get_property(udp)


def test_constants_agree_with_the_compiled_rdl(top: AddrmapNode) -> None:
    listener = _ExpectedConstants()
    RDLWalker(unroll=False).walk(top, listener, skip_top=True)
    expected = listener.constants
    expected["REGISTER_WIDTH"] = 32
    expected["ADDRMAP_SIZE"] = top.size

    generated = {
        name: value
        for name, value in vars(rm).items()
        if name.isupper() and isinstance(value, int | str)
    }
    assert generated == expected

    assert dict(rm.GLOBAL_REGISTERS) == {v: k for k, v in SPEC_GLOBAL.items()}
    assert dict(rm.PORT_REGISTERS) == {v: k for k, v in SPEC_PORT.items()}


# --- port_reg -----------------------------------------------------------------------------


def test_port_reg_addresses() -> None:
    assert rm.port_reg(0, rm.PORT_PERM_LO_OFFSET) == 0x100
    assert rm.port_reg(1, rm.PORT_KEYS_OFFSET) == 0x154
    assert rm.port_reg(63, rm.PORT_CNT_STALLS_OFFSET) == 0x10EC
    assert rm.port_reg(63, rm.PORT_CNT_STALLS_OFFSET) < rm.ADDRMAP_SIZE


@pytest.mark.parametrize("port", [-1, 64, 1000])
def test_port_reg_refuses_ports_outside_the_map(port: int) -> None:
    with pytest.raises(ValueError, match=rf"port {port} out of range.*0\.\.63"):
        rm.port_reg(port, rm.PORT_WEIGHT_OFFSET)


@pytest.mark.parametrize("offset", [-4, 0x1C, 0x30, 0x40, 0x02])
def test_port_reg_refuses_offsets_that_are_not_registers(offset: int) -> None:
    with pytest.raises(ValueError, match="is not a per-port register"):
        rm.port_reg(0, offset)


# --- the PeakRDL outputs ------------------------------------------------------------------


def test_c_header_layout_matches_the_map(tmp_path: Path) -> None:
    header = (REPO / "cffi_ext/include/slicefab_xbar.h").read_text()
    assert "slicefab_xbar__portx__stride40_t port[64];" in header
    assert "#define SLICEFAB_XBAR__PORTX__KEYS__MASK_bm 0xffff" in header
    assert f"sizeof(slicefab_xbar_t) == 0x{rm.ADDRMAP_SIZE:x}" in header
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to check the header's static_assert")
    probe = tmp_path / "probe.c"
    keys_1 = rm.port_reg(1, rm.PORT_KEYS_OFFSET)
    probe.write_text(
        '#include "slicefab_xbar.h"\n#include <stddef.h>\n'
        f'static_assert(offsetof(slicefab_xbar_t, port[1].KEYS) == {keys_1:#x}, "KEYS");\n'
    )
    result = subprocess.run(
        [cc, "-std=c11", "-fsyntax-only", "-I", str(REPO / "cffi_ext/include"), str(probe)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_markdown_documents_every_register_once() -> None:
    doc = (REPO / "docs/abi/registers.md").read_text()
    for name in [*SPEC_GLOBAL, *SPEC_PORT]:
        assert doc.count(f"### {name} register") == 1, name
    assert "port[0..63]" in doc and "port[1]" not in doc
    assert "Array Stride: 0x40" in doc
