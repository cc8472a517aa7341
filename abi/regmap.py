# generated from rtl/regmap/slicefab_xbar.rdl by rtl/regmap/generate.py — do not edit
"""Register map of the Slicefab crossbar (slicefab_xbar), as typed constants.

Byte addresses on the AXI4-Lite register port; every register is 32 bits wide.
Semantics: docs/abi/registers.md (from the same RDL source). MASK constants are
in place (already shifted by LSB).
"""

from collections.abc import Mapping
from typing import Final

REGISTER_WIDTH: Final = 32
ADDRMAP_SIZE: Final = 0x1100

# ID @ 0x000 (r): Identification
ID_OFFSET: Final = 0x000
ID_ACCESS: Final = "r"
ID_RESET: Final = 0x53465842
ID_VALUE: Final = 0x53465842
ID_ID_LSB: Final = 0
ID_ID_WIDTH: Final = 32
ID_ID_MASK: Final = 0xFFFFFFFF
ID_ID_RESET: Final = 0x53465842
ID_ID_VALUE: Final = 0x53465842

# VERSION @ 0x004 (r): Register map version
VERSION_OFFSET: Final = 0x004
VERSION_ACCESS: Final = "r"
VERSION_RESET: Final = 0x00000100
VERSION_VALUE: Final = 0x00000100
VERSION_MINOR_LSB: Final = 0
VERSION_MINOR_WIDTH: Final = 8
VERSION_MINOR_MASK: Final = 0x000000FF
VERSION_MINOR_RESET: Final = 0x0
VERSION_MINOR_VALUE: Final = 0x0
VERSION_MAJOR_LSB: Final = 8
VERSION_MAJOR_WIDTH: Final = 8
VERSION_MAJOR_MASK: Final = 0x0000FF00
VERSION_MAJOR_RESET: Final = 0x1
VERSION_MAJOR_VALUE: Final = 0x1

# CAPS @ 0x008 (r): Capabilities
CAPS_OFFSET: Final = 0x008
CAPS_ACCESS: Final = "r"
CAPS_N_PORTS_LSB: Final = 0
CAPS_N_PORTS_WIDTH: Final = 8
CAPS_N_PORTS_MASK: Final = 0x000000FF
CAPS_N_KEYS_LSB: Final = 8
CAPS_N_KEYS_WIDTH: Final = 8
CAPS_N_KEYS_MASK: Final = 0x0000FF00
CAPS_DATA_BYTES_LSB: Final = 16
CAPS_DATA_BYTES_WIDTH: Final = 8
CAPS_DATA_BYTES_MASK: Final = 0x00FF0000

# CTRL @ 0x00C (w): Control
CTRL_OFFSET: Final = 0x00C
CTRL_ACCESS: Final = "w"
CTRL_RESET: Final = 0x00000000
CTRL_COMMIT_LSB: Final = 0
CTRL_COMMIT_WIDTH: Final = 1
CTRL_COMMIT_MASK: Final = 0x00000001
CTRL_COMMIT_RESET: Final = 0x0
CTRL_CLEAR_COUNTERS_LSB: Final = 1
CTRL_CLEAR_COUNTERS_WIDTH: Final = 1
CTRL_CLEAR_COUNTERS_MASK: Final = 0x00000002
CTRL_CLEAR_COUNTERS_RESET: Final = 0x0

# GEN @ 0x010 (r): Configuration generation
GEN_OFFSET: Final = 0x010
GEN_ACCESS: Final = "r"
GEN_RESET: Final = 0x00000000
GEN_COMMITTED_LSB: Final = 0
GEN_COMMITTED_WIDTH: Final = 16
GEN_COMMITTED_MASK: Final = 0x0000FFFF
GEN_COMMITTED_RESET: Final = 0x0
GEN_ADOPTED_LSB: Final = 16
GEN_ADOPTED_WIDTH: Final = 16
GEN_ADOPTED_MASK: Final = 0xFFFF0000
GEN_ADOPTED_RESET: Final = 0x0

# STATUS @ 0x014 (r): Status
STATUS_OFFSET: Final = 0x014
STATUS_ACCESS: Final = "r"
STATUS_RESET: Final = 0x00000000
STATUS_PENDING_LSB: Final = 0
STATUS_PENDING_WIDTH: Final = 1
STATUS_PENDING_MASK: Final = 0x00000001
STATUS_PENDING_RESET: Final = 0x0

# port[0..63]: Input port
PORT_BASE: Final = 0x100
PORT_STRIDE: Final = 0x40
MAX_PORTS: Final = 64

# port[p].PERM_LO @ +0x000 (rw): Permission mask, outputs 0-31 (shadow)
PORT_PERM_LO_OFFSET: Final = 0x000
PORT_PERM_LO_ACCESS: Final = "rw"
PORT_PERM_LO_RESET: Final = 0x00000000
PORT_PERM_LO_ALLOWED_LSB: Final = 0
PORT_PERM_LO_ALLOWED_WIDTH: Final = 32
PORT_PERM_LO_ALLOWED_MASK: Final = 0xFFFFFFFF
PORT_PERM_LO_ALLOWED_RESET: Final = 0x0

# port[p].PERM_HI @ +0x004 (rw): Permission mask, outputs 32-63 (shadow)
PORT_PERM_HI_OFFSET: Final = 0x004
PORT_PERM_HI_ACCESS: Final = "rw"
PORT_PERM_HI_RESET: Final = 0x00000000
PORT_PERM_HI_ALLOWED_LSB: Final = 0
PORT_PERM_HI_ALLOWED_WIDTH: Final = 32
PORT_PERM_HI_ALLOWED_MASK: Final = 0xFFFFFFFF
PORT_PERM_HI_ALLOWED_RESET: Final = 0x0

# port[p].WEIGHT @ +0x008 (rw): Arbitration weight (shadow)
PORT_WEIGHT_OFFSET: Final = 0x008
PORT_WEIGHT_ACCESS: Final = "rw"
PORT_WEIGHT_RESET: Final = 0x00000001
PORT_WEIGHT_WEIGHT_LSB: Final = 0
PORT_WEIGHT_WEIGHT_WIDTH: Final = 8
PORT_WEIGHT_WEIGHT_MASK: Final = 0x000000FF
PORT_WEIGHT_WEIGHT_RESET: Final = 0x1

# port[p].TB_RATE @ +0x00C (rw): Token-bucket rate (shadow)
PORT_TB_RATE_OFFSET: Final = 0x00C
PORT_TB_RATE_ACCESS: Final = "rw"
PORT_TB_RATE_RESET: Final = 0x00000000
PORT_TB_RATE_RATE_LSB: Final = 0
PORT_TB_RATE_RATE_WIDTH: Final = 32
PORT_TB_RATE_RATE_MASK: Final = 0xFFFFFFFF
PORT_TB_RATE_RATE_RESET: Final = 0x0
PORT_TB_RATE_RATE_INTWIDTH: Final = 16
PORT_TB_RATE_RATE_FRACWIDTH: Final = 16

# port[p].TB_BURST @ +0x010 (rw): Token-bucket burst and enable (shadow)
PORT_TB_BURST_OFFSET: Final = 0x010
PORT_TB_BURST_ACCESS: Final = "rw"
PORT_TB_BURST_RESET: Final = 0x00000000
PORT_TB_BURST_BURST_LSB: Final = 0
PORT_TB_BURST_BURST_WIDTH: Final = 24
PORT_TB_BURST_BURST_MASK: Final = 0x00FFFFFF
PORT_TB_BURST_BURST_RESET: Final = 0x0
PORT_TB_BURST_ENABLE_LSB: Final = 31
PORT_TB_BURST_ENABLE_WIDTH: Final = 1
PORT_TB_BURST_ENABLE_MASK: Final = 0x80000000
PORT_TB_BURST_ENABLE_RESET: Final = 0x0

# port[p].KEYS @ +0x014 (rw): Protection keys (shadow)
PORT_KEYS_OFFSET: Final = 0x014
PORT_KEYS_ACCESS: Final = "rw"
PORT_KEYS_RESET: Final = 0x00000000
PORT_KEYS_MASK_LSB: Final = 0
PORT_KEYS_MASK_WIDTH: Final = 16
PORT_KEYS_MASK_MASK: Final = 0x0000FFFF
PORT_KEYS_MASK_RESET: Final = 0x0

# port[p].ACTIVE_GEN @ +0x018 (r): Adopted generation
PORT_ACTIVE_GEN_OFFSET: Final = 0x018
PORT_ACTIVE_GEN_ACCESS: Final = "r"
PORT_ACTIVE_GEN_RESET: Final = 0x00000000
PORT_ACTIVE_GEN_GEN_LSB: Final = 0
PORT_ACTIVE_GEN_GEN_WIDTH: Final = 16
PORT_ACTIVE_GEN_GEN_MASK: Final = 0x0000FFFF
PORT_ACTIVE_GEN_GEN_RESET: Final = 0x0

# port[p].CNT_PKTS @ +0x020 (r): Packets forwarded
PORT_CNT_PKTS_OFFSET: Final = 0x020
PORT_CNT_PKTS_ACCESS: Final = "r"
PORT_CNT_PKTS_RESET: Final = 0x00000000
PORT_CNT_PKTS_COUNT_LSB: Final = 0
PORT_CNT_PKTS_COUNT_WIDTH: Final = 32
PORT_CNT_PKTS_COUNT_MASK: Final = 0xFFFFFFFF
PORT_CNT_PKTS_COUNT_RESET: Final = 0x0

# port[p].CNT_FLITS @ +0x024 (r): Flits forwarded
PORT_CNT_FLITS_OFFSET: Final = 0x024
PORT_CNT_FLITS_ACCESS: Final = "r"
PORT_CNT_FLITS_RESET: Final = 0x00000000
PORT_CNT_FLITS_COUNT_LSB: Final = 0
PORT_CNT_FLITS_COUNT_WIDTH: Final = 32
PORT_CNT_FLITS_COUNT_MASK: Final = 0xFFFFFFFF
PORT_CNT_FLITS_COUNT_RESET: Final = 0x0

# port[p].CNT_DROPS @ +0x028 (r): Packets dropped
PORT_CNT_DROPS_OFFSET: Final = 0x028
PORT_CNT_DROPS_ACCESS: Final = "r"
PORT_CNT_DROPS_RESET: Final = 0x00000000
PORT_CNT_DROPS_COUNT_LSB: Final = 0
PORT_CNT_DROPS_COUNT_WIDTH: Final = 32
PORT_CNT_DROPS_COUNT_MASK: Final = 0xFFFFFFFF
PORT_CNT_DROPS_COUNT_RESET: Final = 0x0

# port[p].CNT_STALLS @ +0x02C (r): Token-bucket stall cycles
PORT_CNT_STALLS_OFFSET: Final = 0x02C
PORT_CNT_STALLS_ACCESS: Final = "r"
PORT_CNT_STALLS_RESET: Final = 0x00000000
PORT_CNT_STALLS_COUNT_LSB: Final = 0
PORT_CNT_STALLS_COUNT_WIDTH: Final = 32
PORT_CNT_STALLS_COUNT_MASK: Final = 0xFFFFFFFF
PORT_CNT_STALLS_COUNT_RESET: Final = 0x0

#: Global registers: offset -> name.
GLOBAL_REGISTERS: Final[Mapping[int, str]] = {
    0x000: "ID",
    0x004: "VERSION",
    0x008: "CAPS",
    0x00C: "CTRL",
    0x010: "GEN",
    0x014: "STATUS",
}
#: Per-port registers: offset within a port -> name.
PORT_REGISTERS: Final[Mapping[int, str]] = {
    0x000: "PERM_LO",
    0x004: "PERM_HI",
    0x008: "WEIGHT",
    0x00C: "TB_RATE",
    0x010: "TB_BURST",
    0x014: "KEYS",
    0x018: "ACTIVE_GEN",
    0x020: "CNT_PKTS",
    0x024: "CNT_FLITS",
    0x028: "CNT_DROPS",
    0x02C: "CNT_STALLS",
}


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
