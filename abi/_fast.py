"""The fast path of :class:`abi.layout.Layout`: plain closures derived from the construct
definition of a layout.

construct interprets a layout field by field with a context object and a path string per
field; a slice description then costs ~0.5 ms to build and ~0.25 ms to parse, which alone
would cap the mailbox far below issue 3's 5,000 allocate+free pairs per second. This module
walks the same construct tree once and returns a pair of closures per field that do the
same work with :mod:`struct` and slicing. They only say *whether* the bytes or the value are
valid: on any failure they raise :class:`Fail` and the layout re-runs construct, which
produces the error that names the field, the offset and the limit. So construct stays the
definition and the error reporter, and ``tests/test_abi_roundtrip.py`` checks on random
values and random bytes that both paths agree.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, cast

import construct as cs

from abi import layout as lay

Scope = dict[str, Any]
Parser = Callable[[bytes, int, Scope], tuple[Any, int]]
Builder = Callable[[Any, bytearray, Scope], Any]


class Fail(Exception):
    """The fast path cannot decode/encode this; construct will say why."""


def _flags_of(scope: Scope, up: int) -> Mapping[str, bool]:
    for _ in range(up):
        scope = scope["_"]
    flags: Mapping[str, bool] = scope["_flags"]
    return flags


def _read(buf: bytes, pos: int, n: int) -> int:
    end = pos + n
    if end > len(buf):
        raise Fail
    return end


def _uint(fmt: str) -> tuple[Parser, Builder]:
    st = struct.Struct(fmt)
    size = st.size
    unpack, pack = st.unpack_from, st.pack

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        end = pos + size
        if end > len(buf):
            raise Fail
        return unpack(buf, pos)[0], end

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        try:
            out += pack(v)
        except struct.error:
            raise Fail from None
        return v

    return parse, build


def _const(value: bytes) -> tuple[Parser, Builder]:
    n = len(value)

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        end = _read(buf, pos, n)
        if buf[pos:end] != value:
            raise Fail
        return value, end

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        out += value
        return value

    return parse, build


def _struct(con: lay.Struct) -> tuple[Parser, Builder]:
    fields = [(sc.name, lay._public(sc.name), *compile_fast(sc)) for sc in con.subcons]
    public = con._public_set

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        inner: Scope = {"_": scope}
        obj: dict[str, Any] = {}
        for name, pub, p, _ in fields:
            v, pos = p(buf, pos, inner)
            if name:
                inner[name] = v
                if pub:
                    obj[name] = v
        return obj, pos

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if not (type(v) is dict or isinstance(v, Mapping)) or v.keys() != public:
            raise Fail
        inner: Scope = dict(v)
        inner["_"] = scope
        for name, _, _, b in fields:
            built = b(v.get(name) if name else None, out, inner)
            if name:
                inner[name] = built
        return v

    return parse, build


def _rebuild(con: cs.Rebuild[Any, Any]) -> tuple[Parser, Builder]:
    parse, inner = compile_fast(con.subcon)
    func = cast(Callable[[Any], Any], con.func)  # abi.layout.derived: always a function

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        try:
            value = func(scope)
        except (KeyError, TypeError, AttributeError):
            raise Fail from None
        return inner(value, out, scope)

    return parse, build


def _text(con: lay.Text) -> tuple[Parser, Builder]:
    prefix, limit, optional = con.prefix, con.max_bytes, con.optional

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        start = _read(buf, pos, prefix)
        n = int.from_bytes(buf[pos:start], "little")
        if n > limit:
            raise Fail
        end = _read(buf, start, n)
        if n == 0 and optional:
            return None, end
        try:
            return bytes(buf[start:end]).decode("utf-8"), end
        except UnicodeDecodeError:
            raise Fail from None

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if v is None and optional:
            out += bytes(prefix)
            return None
        if not isinstance(v, str):
            raise Fail
        try:
            raw = v.encode("utf-8")
        except UnicodeEncodeError:
            raise Fail from None
        if len(raw) > limit or (not raw and optional):
            raise Fail
        out += len(raw).to_bytes(prefix, "little")
        out += raw
        return v

    return parse, build


def _fixed_text(con: lay.FixedText) -> tuple[Parser, Builder]:
    size, optional = con.size, con.optional

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        end = _read(buf, pos, size)
        raw = bytes(buf[pos:end]).rstrip(b"\x00")
        if b"\x00" in raw:
            raise Fail
        if not raw and optional:
            return None, end
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError:
            raise Fail from None

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if v is None and optional:
            out += bytes(size)
            return None
        if not isinstance(v, str) or "\x00" in v or (not v and optional):
            raise Fail
        try:
            raw = v.encode("utf-8")
        except UnicodeEncodeError:
            raise Fail from None
        if len(raw) > size:
            raise Fail
        out += raw.ljust(size, b"\x00")
        return v

    return parse, build


def _choice(con: lay.Choice) -> tuple[Parser, Builder]:
    p, b = compile_fast(con.subcon)
    values, reverse = con.values, con.reverse

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        raw, end = p(buf, pos, scope)
        if raw not in values:
            raise Fail
        return values[raw], end

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        try:
            raw = reverse.get((type(v), v))
        except TypeError:
            raise Fail from None
        if raw is None:
            raise Fail
        b(raw, out, scope)
        return v

    return parse, build


def _flags(con: lay.Flags) -> tuple[Parser, Builder]:
    size, mask = con.size, con.mask
    bits = list(con.bits.items())
    fields = [(name, lsb, (1 << w) - 1, table) for name, (lsb, w, table) in con.fields.items()]
    names = set(con.names)

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        end = _read(buf, pos, size)
        value = int.from_bytes(buf[pos:end], "little")
        if value & ~mask:
            raise Fail
        out: dict[str, Any] = {name: bool(value >> bit & 1) for bit, name in bits}
        for name, lsb, m, table in fields:
            raw = value >> lsb & m
            if raw not in table:
                raise Fail
            out[name] = table[raw]
        return out, end

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if not (type(v) is dict or isinstance(v, Mapping)) or v.keys() != names:
            raise Fail
        value = 0
        for bit, name in bits:
            flag = v[name]
            if flag is True:
                value |= 1 << bit
            elif flag is not False:
                raise Fail
        for name, lsb, _, table in fields:
            raw = [k for k, t in table.items() if t == v[name] and type(t) is type(v[name])]
            if not raw:
                raise Fail
            value |= raw[0] << lsb
        out += value.to_bytes(size, "little")
        return dict(v)

    return parse, build


def _list(con: lay.List) -> tuple[Parser, Builder]:
    p, b = compile_fast(con.subcon)
    prefix, count_field, limit = con.prefix, con.count_field, con.max_items

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        if prefix:
            start = _read(buf, pos, prefix)
            n = int.from_bytes(buf[pos:start], "little")
            pos = start
        else:
            n = scope[count_field]  # type: ignore[index]
        if n > limit:
            raise Fail
        items = []
        for _ in range(n):
            item, pos = p(buf, pos, scope)
            items.append(item)
        return items, pos

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if not (type(v) is list or isinstance(v, list | tuple)) or len(v) > limit:
            raise Fail
        if prefix:
            out += len(v).to_bytes(prefix, "little")
        elif scope[count_field] != len(v):  # type: ignore[index]
            raise Fail
        for item in v:
            b(item, out, scope)
        return list(v)

    return parse, build


def _when(con: lay.When) -> tuple[Parser, Builder]:
    p, b = compile_fast(con.subcon)
    flag, up, invert = con.flag, con.up, con.invert

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        if _flags_of(scope, up)[flag] != invert:
            return p(buf, pos, scope)
        return None, pos

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if (_flags_of(scope, up)[flag] != invert) != (v is not None):
            raise Fail
        if v is not None:
            b(v, out, scope)
        return v

    return parse, build


def _from_flag(con: lay.FromFlag) -> tuple[Parser, Builder]:
    flag, up = con.flag, con.up

    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        return _flags_of(scope, up)[flag], pos

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if not isinstance(v, bool):
            raise Fail
        return v

    return parse, build


def _bytes(n: int) -> tuple[Parser, Builder]:
    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        end = _read(buf, pos, n)
        return bytes(buf[pos:end]), end

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if not isinstance(v, bytes | bytearray) or len(v) != n:
            raise Fail
        out += v
        return v

    return parse, build


def _rest() -> tuple[Parser, Builder]:
    def parse(buf: bytes, pos: int, scope: Scope) -> tuple[Any, int]:
        return bytes(buf[pos:]), len(buf)

    def build(v: Any, out: bytearray, scope: Scope) -> Any:
        if not isinstance(v, bytes | bytearray):
            raise Fail
        out += v
        return v

    return parse, build


def compile_fast(con: cs.Construct[Any, Any]) -> tuple[Parser, Builder]:
    """``(parse, build)`` closures for a construct built from :mod:`abi.layout`'s types.

    Raises:
        TypeError: a construct class this module does not know (the layout then has no
            fast path; the description in :func:`abi.layout.describe` fails the same way).
    """
    if isinstance(con, cs.Renamed):
        return compile_fast(con.subcon)
    if isinstance(con, lay.Struct):
        return _struct(con)
    if isinstance(con, cs.FormatField):
        return _uint(con.fmtstr)
    if isinstance(con, cs.Const):
        return _const(con.value)
    if isinstance(con, cs.Rebuild):
        return _rebuild(con)
    if isinstance(con, lay.Text):
        return _text(con)
    if isinstance(con, lay.FixedText):
        return _fixed_text(con)
    if isinstance(con, lay.Choice):
        return _choice(con)
    if isinstance(con, lay.Flags):
        return _flags(con)
    if isinstance(con, lay.List):
        return _list(con)
    if isinstance(con, lay.When):
        return _when(con)
    if isinstance(con, lay.FromFlag):
        return _from_flag(con)
    if isinstance(con, lay.Raw):
        return _bytes(con.size)
    if con is cs.GreedyBytes:
        return _rest()
    raise TypeError(f"no fast path for {type(con).__name__}")
