"""Slicefab device ABI: message formats, opcodes, return codes, register map. No I/O.

==================  ======================================================================
``abi.cci``         the CXL CCI message (CXL r3.1 Figure 7-19): header, size cap, Message
``abi.commands``    the opcode table: opcode, name, role, request/response layouts, docs
``abi.fmapi``       CXL FM API payloads (54h LD/QoS, 56h Dynamic Capacity), as in libcxlmi
``abi.vendor``      Slicefab's vendor payloads (C0h-C4h: slices, inventory, session, ...)
``abi.retcodes``    CXL return codes, vendor extended status, firmware error code table
``abi.convert``     payload dicts <-> the firmware's JSON-able forms
``abi.layout``      the typed wrapper over construct every layout is written in
``abi.errors``      AbiError -> DecodeError (-> UnknownOpcode), EncodeError
``abi.envelope``    the authentication trailer of VM mailbox frames
``abi.regmap``      the crossbar register map (generated from the SystemRDL source)
``abi.examples``    one example per command: golden vectors and the reference's examples
==================  ======================================================================

``docs/abi/commands.md`` is generated from the table (``python -m abi.gen_docs``).
"""
