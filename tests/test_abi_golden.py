"""Golden byte vectors: every command's example request and response, byte for byte.

The vectors in tests/data/abi/ were written by tests/data/abi/make_golden.py from
abi/examples.py. A layout change that moves a single bit fails here; if the change is
meant, regenerate the vectors and review the diff of docs/abi/commands.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from abi.cci import Category, Message
from abi.commands import COMMANDS, decode_request, decode_response, encode_request, encode_response
from abi.examples import ERROR_EXAMPLE, EXAMPLES, TAG
from abi.retcodes import ERROR_DETAIL, ReturnCode, VendorStatus

DATA = Path(__file__).parent / "data" / "abi"
OPCODES = sorted(COMMANDS)


def vector(opcode: int, kind: str) -> Path:
    return DATA / f"{opcode:04x}_{COMMANDS[opcode].name.lower()}_{kind}.bin"


def test_every_command_has_an_example_and_both_vectors() -> None:
    assert set(EXAMPLES) == set(COMMANDS)
    missing = [p.name for op in OPCODES for p in (vector(op, "req"), vector(op, "rsp"))
               if not p.exists()]  # fmt: skip
    assert not missing, f"no golden vector: {missing} (run tests/data/abi/make_golden.py)"


def test_no_stray_vectors() -> None:
    expected = {vector(op, k).name for op in OPCODES for k in ("req", "rsp")} | {"error_rsp.bin"}
    assert {p.name for p in DATA.glob("*.bin")} == expected


@pytest.mark.parametrize("opcode", OPCODES, ids=lambda op: f"{op:04X}_{COMMANDS[op].name}")
def test_request_vector(opcode: int) -> None:
    cmd = COMMANDS[opcode]
    golden = vector(opcode, "req").read_bytes()
    example = EXAMPLES[opcode][0]
    assert encode_request(opcode, example, tag=TAG) == golden
    assert cmd.request.build_reference(example) == golden[12:]  # construct agrees
    request = decode_request(golden)
    assert request.command is cmd
    assert request.message.category is Category.REQUEST and request.message.tag == TAG
    assert request.payload == example
    assert cmd.request.parse_reference(golden[12:]) == example


@pytest.mark.parametrize("opcode", OPCODES, ids=lambda op: f"{op:04X}_{COMMANDS[op].name}")
def test_response_vector(opcode: int) -> None:
    cmd = COMMANDS[opcode]
    golden = vector(opcode, "rsp").read_bytes()
    example = EXAMPLES[opcode][1]
    request = Message(Category.REQUEST, TAG, opcode)
    assert encode_response(request, example) == golden
    assert cmd.response.build_reference(example) == golden[12:]
    response = decode_response(golden)
    assert response.ok and response.command is cmd and response.message.tag == TAG
    assert response.payload == example
    assert cmd.response.parse_reference(golden[12:]) == example


def test_error_response_vector() -> None:
    golden = (DATA / "error_rsp.bin").read_bytes()
    message = Message(
        Category.RESPONSE,
        TAG,
        0xC000,
        ERROR_DETAIL.build(ERROR_EXAMPLE),
        ReturnCode.RESOURCES_EXHAUSTED,
        VendorStatus.INSUFFICIENT,
    )
    assert message.encode() == golden
    response = decode_response(golden)
    assert not response.ok and response.payload is None
    assert response.error == {
        "code": "insufficient",
        "message": ERROR_EXAMPLE["message"],
        "details": {"field": ERROR_EXAMPLE["field"]},
    }


def test_header_bytes_of_a_known_message() -> None:
    """Independent of the examples: the header of ALLOCATE with a 3-byte payload, spelled
    out from CXL r3.1 Figure 7-19."""
    data = Message(Category.REQUEST, 0x5A, 0xC000, b"abc").encode()
    assert data == bytes([0x00, 0x5A, 0x00, 0x00, 0xC0, 3, 0, 0, 0, 0, 0, 0]) + b"abc"
    data = Message(
        Category.RESPONSE, 1, 0x5604, bytes(0x10203), 0x16, 0xBEEF, background=True
    ).encode(max_payload=1 << 21)
    assert data[:12] == bytes([0x01, 0x01, 0x00, 0x04, 0x56, 0x03, 0x02, 0x81, 0x16, 0, 0xEF, 0xBE])
