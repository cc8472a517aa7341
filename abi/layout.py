"""Payload layouts: construct structures behind a small typed interface.

Layouts are written in construct's own idiom (``"count" / u16 * "cores requested"``) from
construct's fixed-size integers, bytes and constants plus a handful of field types of ours
that construct lacks in the strict form a device ABI needs:

======================  ==================================================================
:class:`Struct`         construct's Struct that refuses unknown/missing keys on build,
                        parses to a plain ``dict`` without private (``_``) keys, and
                        records where each field starts so errors can name the offset
:class:`Raw`            exactly n opaque bytes (construct's Bytes also takes an int)
:class:`Text`           length-prefixed UTF-8 with a byte limit; optionally 0 = ``None``
:class:`FixedText`      a NUL-padded UTF-8 field of fixed size (no embedded NUL)
:class:`Choice`         an enumerated integer: unknown values are errors, not passed on
:class:`Flags`          a bit field as ``{name: bool}``; set reserved bits are errors
:class:`List`           a list with a count prefix or a count in an earlier field, bounded
:class:`When`           a field present only when a bit of the struct's ``_flags`` is set
:class:`FromFlag`       a boolean stored as a bit of the enclosing ``_flags`` (no bytes)
:func:`derived`         a field computed on build from the others (counts, flags)
:func:`reserved`        reserved bytes: zero on build, checked zero on parse
======================  ==================================================================

A :class:`Layout` wraps one structure: ``build(dict) -> bytes`` raises only
:class:`~abi.errors.EncodeError`, ``parse(bytes) -> dict`` only
:class:`~abi.errors.DecodeError` (and refuses trailing bytes), and ``fields`` describes
it for the generated reference (``abi/gen_docs.py``) and for the property tests.
Field names starting with ``_`` are private: derived or reserved, never in the dicts.

Speed: construct interprets the structure field by field (a slice description costs
~0.5 ms to build here), so a layout also compiles itself into plain closures
(:mod:`abi._fast`, ~10x faster) and only falls back to construct to report an error.
construct stays the definition; ``build_reference``/``parse_reference`` run it alone,
and the property tests keep both paths equal on valid and on malformed input.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import construct as cs
from construct.core import stream_read, stream_write

from abi.errors import DecodeError, EncodeError

#: a payload as the rest of the code sees it: field name -> value (ints, str, bytes,
#: bool, None for an absent optional field, lists and nested dicts of the same)
Payload = dict[str, Any]

if TYPE_CHECKING:  # construct's classes are generic only in the stubs (construct-typing)
    _Construct = cs.Construct[Any, Any]
    _Subconstruct = cs.Subconstruct[Any, Any, Any, Any]
else:
    _Construct = cs.Construct
    _Subconstruct = cs.Subconstruct

u8 = cs.Int8ul
u16 = cs.Int16ul
u32 = cs.Int32ul
u64 = cs.Int64ul


class FieldError(cs.ConstructError):
    """A field-level failure raised by our field types; becomes Decode/EncodeError."""

    def __init__(
        self,
        message: str,
        path: str | None,
        *,
        limit: int | None = None,
        expected: str | None = None,
    ) -> None:
        super().__init__(message, path=path)
        self.message = message
        self.limit = limit
        self.expected = expected


def _utf8_decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FieldError("not valid UTF-8", path, expected="UTF-8 text") from None


def _utf8_encode(text: str, path: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise FieldError("not encodable as UTF-8", path, expected="UTF-8 text") from None


class _Stream(io.BytesIO):
    """A parse stream that remembers where each field being parsed starts."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.starts: list[int] = []


def _public(name: str | None) -> bool:
    return bool(name) and not str(name).startswith("_")


class Struct(cs.Struct):
    """A construct Struct that is strict about keys and parses to a plain ``dict``.

    Build refuses a value that is not a mapping, lacks a public field (``None`` is the
    value of an absent optional field) or has a key the layout does not know — a typo
    must not silently vanish from the wire. Parse returns only the public fields.
    """

    def __init__(self, *subcons: cs.Construct[Any, Any]) -> None:
        super().__init__(*subcons)
        self.public: tuple[str, ...] = tuple(
            str(sc.name) for sc in self.subcons if _public(sc.name)
        )
        self._public_set = frozenset(self.public)

    def _context(self, context: Any, stream: Any) -> Any:
        ctx = cs.Container(
            _=context,
            _params=context._params,
            _root=None,
            _parsing=context._parsing,
            _building=context._building,
            _sizing=context._sizing,
            _subcons=self._subcons,
            _io=stream,
            _index=context.get("_index", None),
        )
        ctx["_root"] = context.get("_root", ctx)
        return ctx

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        obj: Payload = {}
        context = self._context(context, stream)
        starts = stream.starts if isinstance(stream, _Stream) else None
        for sc in self.subcons:
            if starts is not None:
                starts.append(stream.tell())
            value = sc._parsereport(stream, context, path)
            if starts is not None:
                starts.pop()  # left in place on an error: the failing field's start
            if sc.name:
                context[sc.name] = value
                if _public(sc.name):
                    obj[sc.name] = value
        return obj

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if not isinstance(obj, Mapping):
            raise FieldError(
                f"expected a mapping of fields, got {type(obj).__name__}",
                path,
                expected="a mapping with keys " + ", ".join(self.public),
            )
        unknown = sorted(str(k) for k in obj.keys() - self._public_set)
        if unknown:
            raise FieldError(
                f"unknown field(s) {', '.join(unknown)}",
                path,
                expected="only " + ", ".join(self.public),
            )
        missing = [n for n in self.public if n not in obj]
        if missing:
            raise FieldError(
                f"missing field(s) {', '.join(missing)} (an absent optional field is None)",
                path,
            )
        context = self._context(context, stream)
        context.update(obj)
        for sc in self.subcons:
            value = obj.get(sc.name) if sc.name else None
            built = sc._build(value, stream, context, path)
            if sc.name:
                context[sc.name] = built
        return context


class Text(_Construct):
    """UTF-8 text after a little-endian length prefix of ``prefix`` bytes, at most
    ``max_bytes`` bytes long; with ``optional``, a zero length stands for ``None`` (and an
    empty string cannot be sent)."""

    def __init__(self, max_bytes: int, *, prefix: int = 1, optional: bool = False) -> None:
        super().__init__()
        if max_bytes >= 1 << (8 * prefix):
            raise ValueError("max_bytes does not fit the length prefix")
        self.max_bytes = max_bytes
        self.prefix = prefix
        self.optional = optional

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        n = int.from_bytes(stream_read(stream, self.prefix, path), "little")
        if n > self.max_bytes:
            raise FieldError(
                f"length {n} exceeds the limit of {self.max_bytes} bytes",
                path,
                limit=self.max_bytes,
                expected=f"at most {self.max_bytes} bytes",
            )
        raw = stream_read(stream, n, path)
        if n == 0 and self.optional:
            return None
        return _utf8_decode(raw, path)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if obj is None and self.optional:
            stream_write(stream, bytes(self.prefix), self.prefix, path)
            return None
        if not isinstance(obj, str):
            raise FieldError(f"expected a string, got {type(obj).__name__}", path)
        raw = _utf8_encode(obj, path)
        if len(raw) > self.max_bytes:
            raise FieldError(
                f"{len(raw)} bytes of UTF-8 exceed the limit of {self.max_bytes}",
                path,
                limit=self.max_bytes,
                expected=f"at most {self.max_bytes} bytes",
            )
        if not raw and self.optional:
            raise FieldError("an empty string cannot be sent here; use None", path)
        stream_write(
            stream, len(raw).to_bytes(self.prefix, "little") + raw, self.prefix + len(raw), path
        )
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise cs.SizeofError("variable size", path=path)


class Raw(_Construct):
    """Exactly ``size`` opaque bytes (a nonce, a key, a CXL tag). Unlike construct's
    ``Bytes``, build takes only ``bytes`` of that size, never an integer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        return stream_read(stream, self.size, path)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if not isinstance(obj, bytes | bytearray) or len(obj) != self.size:
            raise FieldError(
                f"expected {self.size} bytes, got {type(obj).__name__}"
                + (f" of {len(obj)}" if isinstance(obj, bytes | bytearray) else ""),
                path,
                limit=self.size,
                expected=f"bytes of length {self.size}",
            )
        stream_write(stream, bytes(obj), self.size, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        return self.size


class FixedText(_Construct):
    """UTF-8 text in a field of exactly ``size`` bytes, padded with NULs (no NUL inside);
    with ``optional``, an all-NUL field stands for ``None``."""

    def __init__(self, size: int, *, optional: bool = False) -> None:
        super().__init__()
        self.size = size
        self.optional = optional

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        raw = stream_read(stream, self.size, path).rstrip(b"\x00")
        if b"\x00" in raw:
            raise FieldError("NUL inside the text", path, expected="text, then NUL padding")
        if not raw and self.optional:
            return None
        return _utf8_decode(raw, path)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if obj is None and self.optional:
            stream_write(stream, bytes(self.size), self.size, path)
            return None
        if not isinstance(obj, str) or "\x00" in obj:
            raise FieldError(f"expected a string without NUL, got {obj!r}", path)
        if not obj and self.optional:
            raise FieldError("an empty string cannot be sent here; use None", path)
        raw = _utf8_encode(obj, path)
        if len(raw) > self.size:
            raise FieldError(
                f"{len(raw)} bytes of UTF-8 exceed the field's {self.size}",
                path,
                limit=self.size,
                expected=f"at most {self.size} bytes",
            )
        stream_write(stream, raw.ljust(self.size, b"\x00"), self.size, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        return self.size


class Choice(_Subconstruct):
    """An enumerated integer: wire values map to names (or other values, e.g. ``True``)
    both ways; a value outside the table is an error in either direction."""

    def __init__(self, subcon: cs.Construct[int, int], values: Mapping[int, Any]) -> None:
        super().__init__(subcon)
        self.values = dict(values)
        # keyed by type too, so that True is not mistaken for 1 (nor 1 for True)
        self.reverse = {(type(v), v): k for k, v in self.values.items()}

    def _expected(self) -> str:
        return "one of " + ", ".join(f"{k}={v!r}" for k, v in self.values.items())

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        raw = self.subcon._parsereport(stream, context, path)
        if raw not in self.values:
            raise FieldError(f"unknown value {raw}", path, expected=self._expected())
        return self.values[raw]

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        try:
            raw = self.reverse.get((type(obj), obj))
        except TypeError:  # unhashable
            raw = None
        if raw is None:
            raise FieldError(f"{obj!r} is not a known value", path, expected=self._expected())
        self.subcon._build(raw, stream, context, path)
        return obj


class Flags(_Construct):
    """A little-endian bit field of ``size`` bytes as a dict: each of ``bits`` (bit ->
    name) is a bool; each of ``fields`` (name -> (lsb, width, {wire: value})) is an
    enumerated sub-field. Bits named by neither are reserved: zero on build, and an error
    on parse when set (as is a sub-field value outside its table)."""

    def __init__(
        self,
        size: int,
        bits: Mapping[int, str],
        *,
        fields: Mapping[str, tuple[int, int, Mapping[int, Any]]] | None = None,
    ) -> None:
        super().__init__()
        self.size = size
        self.bits = dict(sorted(bits.items()))
        self.fields = dict(fields or {})
        self.names = [*self.bits.values(), *self.fields]
        self.mask = sum(1 << b for b in self.bits) | sum(
            ((1 << w) - 1) << lsb for lsb, w, _ in self.fields.values()
        )

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        value = int.from_bytes(stream_read(stream, self.size, path), "little")
        if value & ~self.mask:
            raise FieldError(
                f"reserved bits set (0x{value & ~self.mask:x})",
                path,
                expected=f"reserved bits zero (mask 0x{self.mask:x})",
            )
        out: dict[str, Any] = {name: bool(value >> bit & 1) for bit, name in self.bits.items()}
        for name, (lsb, width, table) in self.fields.items():
            raw = value >> lsb & ((1 << width) - 1)
            if raw not in table:
                raise FieldError(
                    f"{name}: unknown value {raw}",
                    path,
                    expected=f"{name} one of " + ", ".join(f"{k}={v!r}" for k, v in table.items()),
                )
            out[name] = table[raw]
        return out

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if not isinstance(obj, Mapping) or set(obj) != set(self.names):
            raise FieldError(
                "expected a mapping of exactly these flags",
                path,
                expected=", ".join(self.names),
            )
        value = 0
        for bit, name in self.bits.items():
            if not isinstance(obj[name], bool):
                raise FieldError(f"flag {name} must be a bool, got {obj[name]!r}", path)
            value |= int(obj[name]) << bit
        for name, (lsb, _width, table) in self.fields.items():
            raw = [k for k, v in table.items() if v == obj[name] and type(v) is type(obj[name])]
            if not raw:
                raise FieldError(f"{name}: {obj[name]!r} is not a known value", path)
            value |= raw[0] << lsb
        stream_write(stream, value.to_bytes(self.size, "little"), self.size, path)
        return dict(obj)

    def _sizeof(self, context: Any, path: str) -> int:
        return self.size

    def describe_bits(self) -> tuple[tuple[str, str, tuple[Any, ...] | None], ...]:
        """``(bits, name, values)`` per flag: values None for a bool."""
        out: list[tuple[str, str, tuple[Any, ...] | None]] = [
            (str(bit), name, None) for bit, name in self.bits.items()
        ]
        for name, (lsb, width, table) in self.fields.items():
            bits = f"{lsb + width - 1}:{lsb}" if width > 1 else str(lsb)
            out.append((bits, name, tuple(table.items())))
        return tuple(out)


class List(_Subconstruct):
    """A list of ``subcon`` items, at most ``max_items``. The count is either a
    little-endian prefix of ``prefix`` bytes, or the value of an earlier field
    ``count_field`` of the same struct (a CXL layout with the count away from the list;
    make that field :func:`derived` from the list's length)."""

    def __init__(
        self,
        subcon: cs.Construct[Any, Any],
        *,
        max_items: int,
        prefix: int = 0,
        count_field: str | None = None,
    ) -> None:
        super().__init__(subcon)
        if (prefix == 0) == (count_field is None):
            raise ValueError("give exactly one of prefix and count_field")
        self.max_items = max_items
        self.prefix = prefix
        self.count_field = count_field

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        if self.prefix:
            count = int.from_bytes(stream_read(stream, self.prefix, path), "little")
        else:
            count = context[self.count_field]
        if count > self.max_items:
            raise FieldError(
                f"{count} items exceed the limit of {self.max_items}",
                path,
                limit=self.max_items,
                expected=f"at most {self.max_items} items",
            )
        starts = stream.starts if isinstance(stream, _Stream) else None
        items = []
        for i in range(count):
            if starts is not None:
                starts.append(stream.tell())
            items.append(self.subcon._parsereport(stream, context, f"{path}[{i}]"))
            if starts is not None:
                starts.pop()
        return items

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if not isinstance(obj, list | tuple):
            raise FieldError(f"expected a list, got {type(obj).__name__}", path)
        if len(obj) > self.max_items:
            raise FieldError(
                f"{len(obj)} items exceed the limit of {self.max_items}",
                path,
                limit=self.max_items,
                expected=f"at most {self.max_items} items",
            )
        if self.prefix:
            stream_write(stream, len(obj).to_bytes(self.prefix, "little"), self.prefix, path)
        elif context[self.count_field] != len(obj):
            raise FieldError(f"{self.count_field} disagrees with the list's length", path)
        for i, item in enumerate(obj):
            self.subcon._build(item, stream, context, f"{path}[{i}]")
        return list(obj)

    def _sizeof(self, context: Any, path: str) -> int:
        raise cs.SizeofError("variable size", path=path)


def _flags_of(context: Any, up: int) -> Mapping[str, bool]:
    for _ in range(up):
        context = context._
    flags: Mapping[str, bool] = context["_flags"]
    return flags


class When(_Subconstruct):
    """``subcon`` when bit ``flag`` of ``_flags`` (in the struct ``up`` levels out) is set
    (clear, with ``invert``), else nothing on the wire and ``None`` in the dict."""

    def __init__(
        self, flag: str, subcon: cs.Construct[Any, Any], *, up: int = 0, invert: bool = False
    ) -> None:
        super().__init__(subcon)
        self.flag = flag
        self.up = up
        self.invert = invert
        self.flagbuildnone = True

    def _present(self, context: Any) -> bool:
        return _flags_of(context, self.up)[self.flag] != self.invert

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        if self._present(context):
            return self.subcon._parsereport(stream, context, path)
        return None

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if self._present(context) != (obj is not None):
            raise FieldError(f"presence disagrees with flag {self.flag}", path)
        if obj is not None:
            self.subcon._build(obj, stream, context, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise cs.SizeofError("variable size", path=path)


class FromFlag(_Construct):
    """A boolean carried by bit ``flag`` of ``_flags`` in the struct ``up`` levels out:
    no bytes of its own. On build its value feeds the flags (see :func:`derived`)."""

    def __init__(self, flag: str, *, up: int = 1) -> None:
        super().__init__()
        self.flag = flag
        self.up = up

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        return _flags_of(context, self.up)[self.flag]

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        if not isinstance(obj, bool):
            raise FieldError(f"expected a bool, got {obj!r}", path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        return 0


def derived(subcon: cs.Construct[Any, Any], func: Callable[[Any], Any]) -> cs.Construct[Any, Any]:
    """A field computed from the struct's other values on build (``func(context)``) and
    parsed normally (give it a private ``_`` name: it never appears in the dicts)."""
    return cs.Rebuild(subcon, func)


def reserved(size: int) -> cs.Construct[Any, Any]:
    """``size`` reserved bytes: zero on build; parse refuses anything else."""
    return cs.Const(bytes(size))


def get(obj: object, key: str) -> Any:
    """``obj[key]`` if ``obj`` is a mapping, else None (for :func:`derived` functions,
    which run before the nested struct checks its value)."""
    return obj.get(key) if type(obj) is dict or isinstance(obj, Mapping) else None


def count(obj: object) -> int:
    """``len(obj)`` for a list, else 0 (the list's own build then reports the error)."""
    return len(obj) if isinstance(obj, list | tuple) else 0


# --------------------------------------------------------------------------- description


@dataclass(frozen=True)
class Field:
    """One field of a layout, described for the reference and the property tests.

    ``kind`` is one of: ``uint`` (``bits``), ``bytes`` (``size``), ``rest`` (the rest of
    the payload), ``text`` (``limit`` bytes after a ``prefix``-byte length; ``optional``),
    ``fixed_text`` (``size``), ``choice`` (``values``), ``flags`` (``values``: the bit names
    by bit), ``struct`` / ``list`` / ``optional`` (``children``), ``flag`` (a bool in
    ``_flags``), ``derived`` and ``reserved``.
    """

    name: str
    kind: str
    size: int | None
    doc: str = ""
    bits: int = 0
    limit: int | None = None
    prefix: int = 0
    optional: bool = False
    source: str = ""  # list: its count field; optional/flag: the flag's name
    values: tuple[Any, ...] = ()
    children: tuple[Field, ...] = field(default=())

    @property
    def public(self) -> bool:
        return _public(self.name)


def _size(con: cs.Construct[Any, Any]) -> int | None:
    try:
        return con.sizeof()
    except (cs.SizeofError, KeyError, AttributeError):
        return None


def describe(con: cs.Construct[Any, Any], name: str = "", doc: str = "") -> Field:
    """The :class:`Field` tree of a construct built from the types of this module."""
    if isinstance(con, cs.Renamed):
        return describe(con.subcon, str(con.name or name), con.docs or doc)
    size = _size(con)
    if isinstance(con, Struct):
        kids = tuple(describe(sc) for sc in con.subcons)
        return Field(name, "struct", size, doc, children=kids)
    if isinstance(con, cs.FormatField):
        return Field(name, "uint", size, doc, bits=8 * con.length)
    if isinstance(con, cs.Const):
        return Field(name, "reserved", size, doc)
    if isinstance(con, cs.Rebuild):
        inner = describe(con.subcon)
        return Field(name, "derived", size, doc, bits=inner.bits, values=inner.values)
    if isinstance(con, Text):
        return Field(
            name, "text", None, doc, limit=con.max_bytes, prefix=con.prefix, optional=con.optional
        )
    if isinstance(con, FixedText):
        return Field(name, "fixed_text", size, doc, optional=con.optional)
    if isinstance(con, Choice):
        inner = describe(con.subcon)
        return Field(name, "choice", size, doc, bits=inner.bits, values=tuple(con.values.items()))
    if isinstance(con, Flags):
        return Field(name, "flags", size, doc, bits=8 * con.size, values=con.describe_bits())
    if isinstance(con, List):
        return Field(
            name,
            "list",
            None,
            doc,
            limit=con.max_items,
            prefix=con.prefix,
            source=con.count_field or "",
            children=(describe(con.subcon),),
        )
    if isinstance(con, When):
        return Field(
            name,
            "optional",
            None,
            doc,
            source=("not " if con.invert else "") + con.flag,
            children=(describe(con.subcon),),
        )
    if isinstance(con, FromFlag):
        return Field(name, "flag", 0, doc, source=con.flag)
    if isinstance(con, Raw):
        return Field(name, "bytes", size, doc)
    if con is cs.GreedyBytes:
        return Field(name, "rest", None, doc)
    raise TypeError(f"layout field {name!r}: no description for {type(con).__name__}")


# --------------------------------------------------------------------------- the wrapper

_FORMAT = re.compile(r"struct '<(\w)' error during building, given value (.*)$", re.M)
_FORMAT_BITS = {"B": 8, "H": 16, "I": 32, "Q": 64}
_PATH_PREFIX = re.compile(r"^\((?:parsing|building|sizing)\)(?: -> )?")


def _field_path(prefix: str, path: str | None) -> str:
    rest = _PATH_PREFIX.sub("", path or "").replace(" -> ", ".").replace(".[", "[")
    parts: list[str] = []
    for raw in rest.split(".") if rest else ():
        part = raw.lstrip("_")
        # construct's ``name / con * "doc"`` nests two Renamed of one name, and a list
        # item's path extends its list's: both are one step
        if parts and (part == parts[-1] or part.startswith(parts[-1] + "[")):
            parts[-1] = part
        else:
            parts.append(part)
    rest = ".".join(parts)
    return f"{prefix}.{rest}" if rest else prefix


class Layout:
    """One payload layout with a typed ``build``/``parse`` and a description.

    ``name`` prefixes the field paths in errors (e.g. ``allocate.request``).
    """

    def __init__(self, name: str, *fields: cs.Construct[Any, Any], doc: str = "") -> None:
        from abi._fast import Fail, compile_fast  # abi._fast imports this module

        self.name = name
        self.doc = doc
        self.struct = Struct(*fields)
        self.description = describe(self.struct, name, doc)
        self.size = self.description.size  # None: variable
        self._fast_parse, self._fast_build = compile_fast(self.struct)
        self._fail = Fail

    @property
    def fields(self) -> tuple[Field, ...]:
        return self.description.children

    def build(self, value: Mapping[str, Any]) -> bytes:
        """Encode ``value``. Raises :class:`EncodeError` naming the field."""
        out = bytearray()
        try:
            self._fast_build(value, out, {})
        except self._fail:
            return self.build_reference(value)  # raises the precise error
        return bytes(out)

    def parse(self, data: bytes) -> Payload:
        """Decode ``data``, which must hold exactly one payload.

        Raises :class:`DecodeError` naming the field and its offset: truncated data,
        trailing bytes, a reserved bit or byte that is not zero, an unknown enumeration
        value, a string or list over its limit, text that is not UTF-8.
        """
        buf = bytes(data)
        try:
            obj, end = self._fast_parse(buf, 0, {})
        except self._fail:
            return self.parse_reference(buf)  # raises the precise error
        if end != len(buf):
            return self.parse_reference(buf)
        result: Payload = obj
        return result

    def build_fast(self, value: Mapping[str, Any]) -> bytes | None:
        """The fast path alone: the bytes, or None where it declines (and :meth:`build`
        asks construct for the error). For the tests that keep the two paths equal."""
        out = bytearray()
        try:
            self._fast_build(value, out, {})
        except self._fail:
            return None
        return bytes(out)

    def parse_fast(self, data: bytes) -> Payload | None:
        """The fast path alone: the payload, or None where it declines."""
        try:
            obj, end = self._fast_parse(bytes(data), 0, {})
        except self._fail:
            return None
        result: Payload | None = obj if end == len(data) else None
        return result

    def build_reference(self, value: Mapping[str, Any]) -> bytes:
        """:meth:`build` by construct alone (the definition; slow, precise errors)."""
        try:
            return self.struct.build(value)  # type: ignore[arg-type]
        except FieldError as e:
            raise EncodeError(
                _field_path(self.name, e.path), e.message, limit=e.limit, expected=e.expected
            ) from None
        except cs.FormatFieldError as e:
            m = _FORMAT.search(str(e))
            bits = _FORMAT_BITS.get(m.group(1), 0) if m else 0
            raise EncodeError(
                _field_path(self.name, e.path),
                f"{m.group(2) if m else 'the value'} is not an integer in 0..{(1 << bits) - 1}",
                limit=(1 << bits) - 1 if bits else None,
                expected=f"u{bits}" if bits else None,
            ) from None
        except cs.ConstructError as e:
            message = str(e).splitlines()[-1]
            raise EncodeError(_field_path(self.name, e.path), message) from None
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            raise EncodeError(self.name, f"cannot encode: {e!r}") from None

    def parse_reference(self, data: bytes) -> Payload:
        """:meth:`parse` by construct alone (the definition; slow, precise errors)."""
        stream = _Stream(bytes(data))
        try:
            obj: Payload = self.struct.parse_stream(stream)
        except cs.ConstructError as e:
            raise self._decode_error(e, stream, len(data)) from None
        end = stream.tell()
        if end != len(data):
            raise DecodeError(
                self.name,
                f"{len(data) - end} bytes after the last field",
                offset=end,
                limit=end,
                expected=f"a payload of {end} bytes",
            )
        return obj

    def _decode_error(self, e: cs.ConstructError, stream: _Stream, total: int) -> DecodeError:
        where = _field_path(self.name, e.path)
        offset = stream.starts[-1] if stream.starts else None
        if isinstance(e, FieldError):
            return DecodeError(where, e.message, offset=offset, limit=e.limit, expected=e.expected)
        if isinstance(e, cs.StreamError):
            left = total - (offset or 0)
            return DecodeError(
                where,
                f"truncated: the payload ends {left} bytes into this field",
                offset=offset,
                limit=total,
                expected="more bytes",
            )
        if isinstance(e, cs.ConstError):
            return DecodeError(where, "reserved bytes are not zero", offset=offset, expected="zero")
        return DecodeError(where, str(e).splitlines()[-1], offset=offset)


def flatten(fields: Sequence[Field], prefix: str = "") -> list[tuple[str, Field]]:
    """``(dotted name, field)`` for every field, depth first (structs, lists, optionals
    expanded; list items named ``name[]``)."""
    out: list[tuple[str, Field]] = []
    for f in fields:
        name = f"{prefix}{f.name}"
        out.append((name, f))
        if f.kind == "struct":
            out += flatten(f.children, name + ".")
        elif f.kind in ("list", "optional"):
            inner = f.children[0]
            sub = name + ("[]" if f.kind == "list" else "")
            if inner.kind == "struct":
                out += flatten(inner.children, sub + ".")
            elif f.kind == "list":
                out.append((sub, inner))
    return out


__all__ = [
    "Choice",
    "Field",
    "FieldError",
    "FixedText",
    "Flags",
    "FromFlag",
    "Layout",
    "List",
    "Payload",
    "Raw",
    "Struct",
    "Text",
    "When",
    "count",
    "derived",
    "describe",
    "flatten",
    "get",
    "reserved",
    "u8",
    "u16",
    "u32",
    "u64",
]
