"""Slicefab device ABI: message formats, opcodes, return codes, register map. No I/O."""
