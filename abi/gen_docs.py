"""Generate ``docs/abi/commands.md`` from the opcode table.

    python -m abi.gen_docs            # (re)write docs/abi/commands.md
    python -m abi.gen_docs --check    # exit 1 and print a diff if it is stale

:func:`render` is pure (the ABI does no I/O); only :func:`main` reads and writes the file.
Everything in the page comes from :mod:`abi.commands`, :mod:`abi.cci`,
:mod:`abi.retcodes` and :mod:`abi.examples`: edit those, then regenerate.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from abi import cci, commands, examples, retcodes
from abi.layout import Field, Layout

DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "abi" / "commands.md"


def _type(f: Field) -> str:
    kind = f.kind
    if kind == "uint":
        return f"u{f.bits}"
    if kind == "bytes":
        return f"u8[{f.size}]"
    if kind == "rest":
        return "u8[…] (to the end)"
    if kind == "text":
        none = "; length 0 = None" if f.optional else ""
        return f"u{8 * f.prefix} length + UTF-8, ≤ {f.limit} B{none}"
    if kind == "fixed_text":
        none = "; all NUL = None" if f.optional else ""
        return f"char[{f.size}], UTF-8, NUL-padded{none}"
    if kind == "choice":
        return f"u{f.bits}: " + ", ".join(f"{k} = {v!r}" for k, v in f.values)
    if kind == "flags" or (kind == "derived" and f.values):
        bits = "; ".join(
            f"bit {b} {name}" + ("" if vals is None else " (" + ", ".join(
                f"{k} = {v!r}" for k, v in vals) + ")")
            for b, name, vals in f.values
        )  # fmt: skip
        derived = ", derived" if kind == "derived" else ""
        return f"u{f.bits} flags{derived}: {bits}; other bits reserved"
    if kind == "derived":
        return f"u{f.bits}, derived"
    if kind == "reserved":
        return f"u8[{f.size}], reserved (zero)"
    if kind == "struct":
        return "struct"
    if kind == "list":
        item = f.children[0]
        of = "struct" if item.kind == "struct" else _type(item)
        if f.prefix:
            return f"u{8 * f.prefix} count + {of}[count], ≤ {f.limit}"
        return f"{of}[{f.source}], ≤ {f.limit}"
    if kind == "optional":
        inner = f.children[0]
        of = "struct" if inner.kind == "struct" else _type(inner)
        return f"{of}, present if {f.source}"
    if kind == "flag":
        return f"bool: bit {f.source} of flags (no bytes)"
    raise ValueError(f"unknown field kind {kind}")


def _size(f: Field) -> str:
    return "var" if f.size is None else str(f.size)


def _rows(fields: Sequence[Field], prefix: str, offset: int | None) -> list[str]:
    rows: list[str] = []
    for f in fields:
        name = prefix + f.name
        at = "" if offset is None else str(offset)
        doc = f.doc.replace("|", "\\|")
        rows.append(f"| {at} | `{name}` | {_type(f).replace('|', '/')} | {_size(f)} | {doc} |")
        if f.kind == "struct":
            rows += _rows(f.children, name + ".", offset)
        elif f.kind in ("list", "optional") and f.children[0].kind == "struct":
            sub = name + ("[]" if f.kind == "list" else "")
            rows += _rows(f.children[0].children, sub + ".", None)
        offset = None if offset is None or f.size is None else offset + f.size
    return rows


def _layout(title: str, layout: Layout) -> list[str]:
    size = (
        "no payload"
        if layout.size == 0
        else (f"{layout.size} bytes" if layout.size is not None else "variable size")
    )
    out = [f"**{title}** ({size})", ""]
    if layout.fields:
        out += ["| offset | field | type | bytes | meaning |", "|---|---|---|---|---|"]
        out += _rows(layout.fields, "", 0)
        out.append("")
    if layout.doc:
        doc = layout.doc.strip()
        out += (["```c", doc, "```"] if "struct" in doc else [doc]) + [""]
    return out


def _hex(data: bytes) -> list[str]:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        lines.append(f"{i:04x}  " + " ".join(f"{b:02x}" for b in chunk))
    return lines or ["(empty)"]


def _role(roles: commands.Role) -> str:
    return {commands.Role.VM: "VM", commands.Role.ADMIN: "admin"}.get(roles, "VM, admin")


def _example(cmd: commands.Command) -> list[str]:
    req, rsp = examples.EXAMPLES[cmd.opcode]
    request = commands.encode_request(cmd.opcode, req, tag=examples.TAG)
    response = commands.encode_response(cci.Message.decode(request), rsp)
    out = ["<details><summary>Example (golden vectors, header included)</summary>", ""]
    out += ["Request payload:", "", "```python", repr(req), "```", "", "```"]
    out += [*_hex(request), "```", "", "Response payload:", "", "```python", repr(rsp), "```"]
    out += ["", "```", *_hex(response), "```", "", "</details>", ""]
    return out


def _header() -> list[str]:
    out = ["| bytes | field | meaning |", "|---|---|---|"]
    offset = 0
    for sc in cci.HEADER.subcons:
        n = sc.sizeof()
        span = str(offset) if n == 1 else f"{offset}-{offset + n - 1}"
        out.append(f"| {span} | `{sc.name}` | {sc.docs} |")
        offset += n
    return out


def render() -> str:
    """The whole page."""
    out: list[str] = [
        "<!-- generated by abi/gen_docs.py from abi/commands.py: do not edit -->",
        "",
        "# The device ABI: commands",
        "",
        "Every request and response is a CXL CCI message (CXL r3.1 Figure 7-19). Where",
        "CXL's Fabric Manager API has the command, Slicefab uses its opcode and payload",
        "byte for byte (checked against libcxlmi's `src/cxlmi/api-types.h`); everything",
        "else is a vendor command in C000h-FFFFh. All integers are little-endian.",
        "",
        "## Message header",
        "",
        *_header(),
        "",
        f"The payload follows the {cci.HEADER_BYTES}-byte header. The format allows",
        f"{cci.FORMAT_MAX_PAYLOAD} bytes; Slicefab's cap is **{cci.MAX_PAYLOAD} bytes**, checked",
        "from the header alone before anything is copied or parsed. On a VM mailbox the",
        "message is followed by the authentication trailer of `abi/envelope.py`.",
        "",
        "## Roles",
        "",
        "A VM may send only the opcodes marked *VM*, on its own mailbox; the administrator",
        "those marked *admin*, on the admin socket. Any other opcode is refused before",
        "authentication and parsing (return code 15h, vendor status `OPCODE_NOT_ALLOWED`).",
        "",
        "## Opcodes",
        "",
        "| opcode | name | role | request | response |",
        "|---|---|---|---|---|",
    ]
    for cmd in commands.COMMANDS.values():
        req = "-" if cmd.request.size == 0 else cmd.request.name
        rsp = "-" if cmd.response.size == 0 else cmd.response.name
        anchor = f"{cmd.opcode:04x}h-{cmd.name.lower()}"
        out.append(
            f"| {cmd.opcode:04X}h | [{cmd.name}](#{anchor}) | {_role(cmd.roles)} | {req} | {rsp} |"
        )
    out += [
        "",
        "## Payload conventions",
        "",
        "- Field names starting with `_` are on the wire only: counts and flags computed",
        "  from the other fields on build, and reserved bytes. They never appear in the",
        "  payload dicts of `abi`.",
        "- An optional part (`present if …`) is `None` in the dicts and absent on the wire.",
        "- Reserved bits and bytes are zero; a decoder refuses any that are set, as it",
        "  refuses unknown enumeration values, over-long strings and lists, text that is not",
        "  UTF-8, truncated payloads and trailing bytes (`DecodeError`, answered *Invalid",
        "  Input*).",
        "",
        "## Return codes",
        "",
        "A response's return code is a CXL code (CXL r3.1 §8.2.8.4.5.1, Table 8-34); its",
        "vendor extended status says which Slicefab error it was. An error response's payload",
        "is empty or an error detail:",
        "",
        *_layout("Error detail", retcodes.ERROR_DETAIL),
        "| firmware error code | return code | vendor extended status |",
        "|---|---|---|",
    ]
    for code, (rc, vs) in retcodes.ERRORS.items():
        out.append(f"| `{code}` | {rc.value:02X}h {rc.name} | {vs.value} {vs.name} |")
    out += ["", "CXL return codes:", "", "| value | name |", "|---|---|"]
    out += [f"| {rc.value:02X}h | {rc.name} |" for rc in retcodes.ReturnCode]
    out += ["", "## Commands", ""]
    for cmd in commands.COMMANDS.values():
        out += [f"### {cmd.opcode:04X}h {cmd.name}", "", f"Role: {_role(cmd.roles)}.", ""]
        out += [cmd.doc, ""]
        out += _layout("Request", cmd.request) + _layout("Response", cmd.response)
        out += _example(cmd)
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args: Any = parser.parse_args(argv)
    text = render()
    path: Path = args.output
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current == text:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                str(path),
                "generated",
            )
        )
        print(f"\n{path} is stale: run python -m abi.gen_docs", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
