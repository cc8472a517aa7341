"""Write the golden byte vectors of every ABI command from abi/examples.py.

    .venv/bin/python tests/data/abi/make_golden.py

For each command in abi/commands.py: ``<opcode>_<name>_req.bin`` (the example request,
header included, tag abi.examples.TAG) and ``<opcode>_<name>_rsp.bin`` (its success
response); plus ``error_rsp.bin``, an error response with a detail payload. Run it only
when a layout or an example changes on purpose: tests/test_abi_golden.py fails whenever
the bytes the ABI produces drift from these files. Files of commands no longer in the
table are deleted.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, for `import abi`

from abi.cci import Category, Message  # noqa: E402
from abi.commands import COMMANDS, encode_request, encode_response  # noqa: E402
from abi.examples import ERROR_EXAMPLE, EXAMPLES, TAG  # noqa: E402
from abi.retcodes import ERROR_DETAIL, codes_for  # noqa: E402


def vector_name(opcode: int, name: str, kind: str) -> str:
    return f"{opcode:04x}_{name.lower()}_{kind}.bin"


def main() -> None:
    written = set()
    for opcode, cmd in COMMANDS.items():
        req, rsp = EXAMPLES[opcode]
        request = encode_request(opcode, req, tag=TAG)
        response = encode_response(Message.decode(request), rsp)
        for kind, data in (("req", request), ("rsp", response)):
            name = vector_name(opcode, cmd.name, kind)
            (HERE / name).write_bytes(data)
            written.add(name)
    rc, vs = codes_for("insufficient")
    error = Message(Category.RESPONSE, TAG, 0xC000, ERROR_DETAIL.build(ERROR_EXAMPLE), rc, vs)
    (HERE / "error_rsp.bin").write_bytes(error.encode())
    written.add("error_rsp.bin")
    for stale in sorted(p for p in HERE.glob("*.bin") if p.name not in written):
        stale.unlink()
        print(f"deleted {stale.name}")
    print(f"wrote {len(written)} vectors to {HERE}")


if __name__ == "__main__":
    main()
