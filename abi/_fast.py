"""The fast path of :class:`abi.layout.Layout`: plain Python derived from the construct
definition of a layout.

construct interprets a layout field by field with a context object and a path string per
field; a slice description then costs ~0.5 ms to build and ~0.25 ms to parse, which alone
would cap the mailbox far below issue 3's 5,000 allocate+free pairs per second. This module
walks the same construct tree once and derives a parser and a builder that do the same work
with :mod:`struct` and slicing: for a struct, one generated function each
(:class:`_Codegen`; a SLICE then builds in ~12 µs and parses in ~11, against ~21 and ~23
with a closure per field); for anything else, a pair of closures. They only say *whether*
the bytes or the value are valid: on any failure they raise :class:`Fail` and the layout
re-runs construct, which produces the error that names the field, the offset and the limit.
So construct stays the definition and the error reporter, and
``tests/test_abi_roundtrip.py`` checks on random values and random bytes that both paths
agree.
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
    """A struct's pair, generated as Python source (see :class:`_Codegen`)."""
    return _Codegen(con).functions()


def _plain(con: cs.Construct[Any, Any]) -> cs.Construct[Any, Any]:
    """``con`` without its name and doc (``"x" / u32 * "doc"`` wraps u32 in Renamed)."""
    while isinstance(con, cs.Renamed):
        con = con.subcon
    return con


def _int_field(con: cs.Construct[Any, Any]) -> tuple[str, str] | None:
    """``(byte order, format code)`` of an integer field that can join a run of others (one
    struct format for several fields), None for anything else."""
    if isinstance(con, cs.FormatField) and con.fmtstr[0] in "<>!" and len(con.fmtstr) == 2:
        return str(con.fmtstr[0]), str(con.fmtstr[1])
    return None


def _needs_scope(con: cs.Construct[Any, Any]) -> bool:
    """Whether a field reads its struct's context (a flag, a count, a derived value): the
    generated code keeps a context dict only for structs that contain one."""
    con = _plain(con)
    if isinstance(con, lay.When | lay.FromFlag | cs.Rebuild):
        return True
    if isinstance(con, lay.List):
        return not con.prefix or _needs_scope(con.subcon)
    if isinstance(con, lay.Struct):
        return any(_needs_scope(sc) for sc in con.subcons)
    if isinstance(con, lay.Choice):
        return _needs_scope(con.subcon)
    leaves = (cs.FormatField, cs.Const, lay.Text, lay.FixedText, lay.Flags, lay.Raw)
    return not isinstance(con, leaves) and con is not cs.GreedyBytes


class _Codegen:
    """One struct's parser and builder as generated Python source.

    A closure per field (the rest of this module) pays a call, a tuple and a context dict
    per field: building a SLICE response took 17-20 µs. The generated functions do the same
    checks inline, read or write a run of integer fields with one :mod:`struct` format, and
    keep a context dict only in a struct that has a field reading it. A field type that is
    not inlined here calls its closure. Same contract as the closures: raise :class:`Fail`
    on anything they do not accept, and ``tests/test_abi_roundtrip.py`` holds both to
    construct."""

    def __init__(self, con: lay.Struct) -> None:
        self.con = con
        self.ns: dict[str, Any] = {
            "Fail": Fail, "Mapping": Mapping, "_pack": struct.pack,
            "_unpack_from": struct.unpack_from, "_struct_error": struct.error,
        }  # fmt: skip
        self.lines: list[str] = []
        self.depth = 1
        self.count = 0

    def functions(self) -> tuple[Parser, Builder]:
        self.lines = ["def parse(buf, pos, scope):", "    n = len(buf)"]
        obj = self._parse(self.con, "scope")
        self._emit(f"return {obj}, pos")
        parse_src = "\n".join(self.lines)
        self.lines = ["def build(v, out, scope):"]
        self._build(self.con, "v", "scope")
        self._emit("return v")
        build_src = "\n".join(self.lines)
        for src in (parse_src, build_src):
            exec(compile(src, f"<abi._fast: {type(self.con).__name__}>", "exec"), self.ns)
        parse, build = cast(Parser, self.ns["parse"]), cast(Builder, self.ns["build"])
        parse.source = parse_src  # type: ignore[attr-defined]  # for whoever debugs it
        build.source = build_src  # type: ignore[attr-defined]
        return parse, build

    # ---------------------------------------------------------------- helpers

    def _var(self, prefix: str = "v") -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _const(self, value: Any, prefix: str = "k") -> str:
        name = self._var(prefix)
        self.ns[name] = value
        return name

    def _emit(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    @staticmethod
    def _mapping_with(x: str, keys: str) -> str:
        """The test that ``x`` is a mapping with exactly the keys in the set ``keys``."""
        return f"(type({x}) is dict or isinstance({x}, Mapping)) and {x}.keys() == {keys}"

    def _fail_unless(self, test: str) -> None:
        self._emit(f"if not ({test}): raise Fail")

    @staticmethod
    def _flags(scope: str, up: int) -> str:
        """The expression :func:`_flags_of` evaluates, spelled out."""
        return scope + "['_']" * up + "['_flags']"

    @staticmethod
    def _uint_run(subcons: list[cs.Construct[Any, Any]], i: int) -> tuple[list[str], str]:
        """The format codes of the run of integer fields of one byte order that starts at
        ``subcons[i]`` (empty if that field is not one), and the byte order."""
        first = _int_field(_plain(subcons[i]))
        if first is None:
            return [], ""
        codes = []
        for sc in subcons[i:]:
            uint = _int_field(_plain(sc))
            if uint is None or uint[0] != first[0]:
                break
            codes.append(uint[1])
        return codes, first[0]

    def _take(self, size: str) -> None:
        """``end = pos + size``, failing if the bytes are not there."""
        self._emit(f"end = pos + {size}")
        self._emit("if end > n: raise Fail")

    # ---------------------------------------------------------------- parse

    def _parse(self, con: cs.Construct[Any, Any], scope: str) -> str:
        """Emit the code that parses ``con`` at ``pos`` (advancing it); returns the name of
        the variable that holds the value. ``scope`` names the context dict (or None)."""
        con = _plain(con)
        x = self._var()
        if isinstance(con, lay.Struct):
            return self._parse_struct(con, scope)
        if (uint := _int_field(con)) is not None:
            return self._parse_uints(uint[0], [uint[1]])[0]
        if isinstance(con, cs.Const):
            value = self._const(con.value)
            self._take(str(len(con.value)))
            self._emit(f"if buf[pos:end] != {value}: raise Fail")
            self._emit(f"{x} = {value}")
            self._emit("pos = end")
        elif isinstance(con, cs.Rebuild):
            return self._parse(con.subcon, scope)
        elif isinstance(con, lay.Text):
            self._take(str(con.prefix))
            self._emit(f"{x} = int.from_bytes(buf[pos:end], 'little')")
            self._emit(f"if {x} > {con.max_bytes}: raise Fail")
            self._emit("pos = end")
            self._take(x)
            if con.optional:
                self._emit(f"if {x} == 0: {x} = None")
                self._emit("else:")
                self.depth += 1
            self._emit(f"try: {x} = buf[pos:end].decode('utf-8')")
            self._emit("except UnicodeDecodeError: raise Fail from None")
            if con.optional:
                self.depth -= 1
            self._emit("pos = end")
        elif isinstance(con, lay.Choice):
            raw = self._parse(con.subcon, scope)
            table = self._const(con.values)
            self._emit(f"if {raw} not in {table}: raise Fail")
            self._emit(f"{x} = {table}[{raw}]")
        elif isinstance(con, lay.List):
            self._parse_list(con, scope, x)
        elif isinstance(con, lay.When):
            self._emit(f"if {self._flags(scope, con.up)}[{con.flag!r}] != {con.invert}:")
            self.depth += 1
            self._emit(f"{x} = {self._parse(con.subcon, scope)}")
            self.depth -= 1
            self._emit(f"else: {x} = None")
        elif isinstance(con, lay.FromFlag):
            self._emit(f"{x} = {self._flags(scope, con.up)}[{con.flag!r}]")
        elif isinstance(con, lay.Flags):
            self._parse_flags(con, x)
        elif isinstance(con, lay.Raw):
            self._take(str(con.size))
            self._emit(f"{x} = buf[pos:end]")
            self._emit("pos = end")
        elif con is cs.GreedyBytes:
            self._emit(f"{x} = buf[pos:]")
            self._emit("pos = n")
        else:  # not inlined: its closure
            parse = self._const(compile_fast(con)[0], "p")
            self._emit(f"{x}, pos = {parse}(buf, pos, {scope})")
        return x

    def _parse_uints(self, order: str, codes: list[str]) -> list[str]:
        """A run of integer fields of one byte order: one unpack."""
        fmt = struct.Struct(order + "".join(codes))
        unpack = self._const(fmt.unpack_from, "u")
        names = [self._var() for _ in codes]
        self._take(str(fmt.size))
        self._emit(f"{', '.join(names)}, = {unpack}(buf, pos)")
        self._emit("pos = end")
        return names

    def _parse_struct(self, con: lay.Struct, scope: str) -> str:
        inner = "None"
        if _needs_scope(con):
            inner = self._var("s")
            self._emit(f"{inner} = {{'_': {scope}}}")
        public: list[tuple[str, str]] = []
        subcons = list(con.subcons)
        i = 0
        while i < len(subcons):
            codes, order = self._uint_run(subcons, i)
            if codes:  # a run of integers: one unpack
                run, values = subcons[i : i + len(codes)], self._parse_uints(order, codes)
                i += len(codes)
            else:
                run, values = [subcons[i]], [self._parse(subcons[i], inner)]
                i += 1
            for sc, value in zip(run, values, strict=True):
                if sc.name and inner != "None":
                    self._emit(f"{inner}[{sc.name!r}] = {value}")
                if lay._public(sc.name):
                    public.append((str(sc.name), value))
        obj = self._var("o")
        self._emit(f"{obj} = {{{', '.join(f'{k!r}: {v}' for k, v in public)}}}")
        return obj

    def _parse_flags(self, con: lay.Flags, x: str) -> None:
        word = self._var("w")
        self._take(str(con.size))
        self._emit(f"{word} = int.from_bytes(buf[pos:end], 'little')")
        self._emit(f"if {word} & {~con.mask}: raise Fail")
        self._emit("pos = end")
        bits = ", ".join(f"{name!r}: {word} & {1 << bit} != 0" for bit, name in con.bits.items())
        self._emit(f"{x} = {{{bits}}}")
        for name, (lsb, width, table) in con.fields.items():
            raw, values = self._var("r"), self._const(table)
            self._emit(f"{raw} = {word} >> {lsb} & {(1 << width) - 1}")
            self._emit(f"if {raw} not in {values}: raise Fail")
            self._emit(f"{x}[{name!r}] = {values}[{raw}]")

    def _parse_list(self, con: lay.List, scope: str, x: str) -> None:
        count = self._var("c")
        if con.prefix:
            self._take(str(con.prefix))
            self._emit(f"{count} = int.from_bytes(buf[pos:end], 'little')")
            self._emit("pos = end")
        else:
            self._emit(f"{count} = {scope}[{con.count_field!r}]")
        self._emit(f"if {count} > {con.max_items}: raise Fail")
        item = _plain(con.subcon)
        if (uint := _int_field(item)) is not None:  # integers: one unpack for the whole list
            order, code = uint
            self._take(f"{count} * {struct.calcsize(order + code)}")
            self._emit(f"{x} = list(_unpack_from('{order}%d{code}' % {count}, buf, pos))")
            self._emit("pos = end")
            return
        self._emit(f"{x} = []")
        self._emit(f"for _ in range({count}):")
        self.depth += 1
        self._emit(f"{x}.append({self._parse(item, scope)})")
        self.depth -= 1

    # ---------------------------------------------------------------- build

    def _build(self, con: cs.Construct[Any, Any], x: str, scope: str) -> str:
        """Emit the code that appends ``con``'s bytes for the value in variable ``x`` to
        ``out``; returns the name of the value a context keeps for the field (the
        closures' return value)."""
        con = _plain(con)
        if isinstance(con, lay.Struct):
            self._build_struct(con, x, scope)
        elif (uint := _int_field(con)) is not None:
            self._build_uints(uint[0], [uint[1]], [x])
        elif isinstance(con, cs.Const):
            value = self._const(con.value)
            self._emit(f"out += {value}")
            return value
        elif isinstance(con, cs.Rebuild):
            func = self._const(con.func, "f")
            derived = self._var()
            self._emit(f"try: {derived} = {func}({scope})")
            self._emit("except (KeyError, TypeError, AttributeError): raise Fail from None")
            return self._build(con.subcon, derived, scope)
        elif isinstance(con, lay.Text):
            raw = self._var("r")
            if con.optional:
                self._emit(f"if {x} is None: out += {self._const(bytes(con.prefix))}")
                self._emit("else:")
                self.depth += 1
            self._fail_unless(f"isinstance({x}, str)")
            self._emit(f"try: {raw} = {x}.encode('utf-8')")
            self._emit("except UnicodeEncodeError: raise Fail from None")
            self._emit(f"if len({raw}) > {con.max_bytes}: raise Fail")
            if con.optional:
                self._emit(f"if not {raw}: raise Fail")
            self._emit(f"out += len({raw}).to_bytes({con.prefix}, 'little')")
            self._emit(f"out += {raw}")
            if con.optional:
                self.depth -= 1
        elif isinstance(con, lay.Choice):
            reverse, raw = self._const(con.reverse), self._var("r")
            self._emit(f"try: {raw} = {reverse}.get((type({x}), {x}))")
            self._emit("except TypeError: raise Fail from None")
            self._emit(f"if {raw} is None: raise Fail")
            self._build(con.subcon, raw, scope)
        elif isinstance(con, lay.List):
            return self._build_list(con, x, scope)
        elif isinstance(con, lay.When):
            self._emit(
                f"if ({self._flags(scope, con.up)}[{con.flag!r}] != {con.invert}) "
                f"!= ({x} is not None): raise Fail"
            )
            self._emit(f"if {x} is not None:")
            self.depth += 1
            self._build(con.subcon, x, scope)
            self.depth -= 1
        elif isinstance(con, lay.FromFlag):
            self._fail_unless(f"isinstance({x}, bool)")
        elif isinstance(con, lay.Flags):
            return self._build_flags(con, x)
        elif isinstance(con, lay.Raw):
            self._fail_unless(f"isinstance({x}, (bytes, bytearray)) and len({x}) == {con.size}")
            self._emit(f"out += {x}")
        elif con is cs.GreedyBytes:
            self._fail_unless(f"isinstance({x}, (bytes, bytearray))")
            self._emit(f"out += {x}")
        else:  # not inlined: its closure
            build, built = self._const(compile_fast(con)[1], "b"), self._var()
            self._emit(f"{built} = {build}({x}, out, {scope})")
            return built
        return x

    def _build_flags(self, con: lay.Flags, x: str) -> str:
        names, word, flag = self._const(frozenset(con.names)), self._var("w"), self._var()
        self._fail_unless(self._mapping_with(x, names))
        self._emit(f"{word} = 0")
        for bit, name in con.bits.items():
            self._emit(f"{flag} = {x}[{name!r}]")
            self._emit(f"if {flag} is True: {word} |= {1 << bit}")
            self._emit(f"elif {flag} is not False: raise Fail")
        for name, (lsb, _, table) in con.fields.items():
            reverse: dict[tuple[type, Any], int] = {}
            for raw, value in table.items():  # the first wire value of a value, as construct
                reverse.setdefault((type(value), value), raw)
            rev, raw_var = self._const(reverse), self._var("r")
            self._emit(f"try: {raw_var} = {rev}.get((type({x}[{name!r}]), {x}[{name!r}]))")
            self._emit("except TypeError: raise Fail from None")
            self._emit(f"if {raw_var} is None: raise Fail")
            self._emit(f"{word} |= {raw_var} << {lsb}")
        self._emit(f"out += {word}.to_bytes({con.size}, 'little')")
        built = self._var()
        self._emit(f"{built} = dict({x})")
        return built

    def _build_uints(self, order: str, codes: list[str], values: list[str]) -> None:
        fmt = struct.Struct(order + "".join(codes))
        pack = self._const(fmt.pack, "w")
        self._emit(f"try: out += {pack}({', '.join(values)})")
        self._emit("except _struct_error: raise Fail from None")

    def _build_struct(self, con: lay.Struct, x: str, scope: str) -> None:
        keys = self._const(con._public_set)
        self._fail_unless(self._mapping_with(x, keys))
        inner = "None"
        if _needs_scope(con):
            inner = self._var("s")
            self._emit(f"{inner} = dict({x})")
            self._emit(f"{inner}['_'] = {scope}")
        subcons = list(con.subcons)
        i = 0
        while i < len(subcons):
            codes, order = self._uint_run(subcons, i)
            j = i + max(1, len(codes))
            values = []
            for sc in subcons[i:j]:
                value = self._var()
                if lay._public(sc.name):
                    self._emit(f"{value} = {x}[{sc.name!r}]")
                else:
                    self._emit(f"{value} = {x}.get({sc.name!r})" if sc.name else f"{value} = None")
                values.append(value)
            if codes:  # a run of integers: one pack
                self._build_uints(order, codes, values)
                built = values
            else:
                built = [self._build(subcons[i], values[0], inner)]
            if inner != "None":
                for sc, b in zip(subcons[i:j], built, strict=True):
                    if sc.name:
                        self._emit(f"{inner}[{sc.name!r}] = {b}")
            i = j

    def _build_list(self, con: lay.List, x: str, scope: str) -> str:
        self._fail_unless(
            f"(type({x}) is list or isinstance({x}, (list, tuple))) and len({x}) <= {con.max_items}"
        )
        if con.prefix:
            self._emit(f"out += len({x}).to_bytes({con.prefix}, 'little')")
        else:
            self._emit(f"if {scope}[{con.count_field!r}] != len({x}): raise Fail")
        if (uint := _int_field(_plain(con.subcon))) is not None:  # integers: one pack for all
            self._emit(f"try: out += _pack('{uint[0]}%d{uint[1]}' % len({x}), *{x})")
            self._emit("except _struct_error: raise Fail from None")
        else:
            element = self._var("e")
            self._emit(f"for {element} in {x}:")
            self.depth += 1
            self._build(con.subcon, element, scope)
            self.depth -= 1
        built = self._var()
        self._emit(f"{built} = list({x})")
        return built


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
