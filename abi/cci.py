"""The CXL CCI message: the frame every Slicefab request and response travels in.

CXL r3.1 Figure 7-19 ("CCI Message Format"); libcxlmi mirrors it as
``struct cxlmi_cci_msg`` (src/cxlmi/api-types.h)::

    struct cxlmi_cci_msg {
        uint8_t category;        /* bits 3:0: 0 request, 1 response; bits 7:4 reserved */
        uint8_t tag;             /* echoed in the response */
        uint8_t rsv1;
        uint8_t command;         /* opcode bits 7:0 */
        uint8_t command_set;     /* opcode bits 15:8 */
        uint8_t pl_length[3];    /* bits 20:0 payload length (LE), 22:21 reserved,
                                    bit 23 background operation */
        uint16_t return_code;    /* meaningful in responses */
        uint16_t vendor_ext_status;
        uint8_t payload[];
    } __attribute__ ((packed));

libcxlmi's comment calls the length "20 bit" and its decoder masks 20 bits; the figure
gives bits 20:0, and this module follows the figure (our cap, :data:`MAX_PAYLOAD`, is far
below either limit, so the two never disagree on a frame we accept).

Return code and vendor extended status only mean something in a response; Slicefab
requires them zero in a request (as libcxlmi and QEMU send them), so a request cannot
smuggle bits there.

The firmware applies its size cap from the 12-byte header alone, before anything is
copied or parsed (:func:`check_header`); :meth:`Message.decode` then checks that the
declared length matches the bytes that actually follow.

:data:`HEADER` is the construct definition of the header, the reference for the docs
and the tests. The hot path (every mailbox round trip, the ≤ 50 µs target of issue 3)
packs and unpacks the same 12 bytes with :mod:`struct` (a few µs against ~90 µs here);
``tests/test_abi_roundtrip.py`` checks the two agree on every header.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

import construct as cs

from abi.errors import DecodeError, EncodeError

HEADER_BYTES = 12
#: the largest payload the CCI format can express (21-bit length)
FORMAT_MAX_PAYLOAD = (1 << 21) - 1
#: Slicefab's mailbox cap: a larger declared payload is refused from the header alone
MAX_PAYLOAD = 4096


class Category(enum.IntEnum):
    """Byte 0 bits 3:0 of the header (CXL r3.1 Figure 7-19); 2..15 are reserved.
    libcxlmi: ``CXL_MCTP_CATEGORY_REQ`` / ``CXL_MCTP_CATEGORY_RSP``."""

    REQUEST = 0
    RESPONSE = 1


# Bound once: reading an enum member off its class costs ~125 ns on Python 3.11 (a
# descriptor), more than the rest of a header check; the hot paths use these names.
_REQUEST, _RESPONSE = Category.REQUEST, Category.RESPONSE
_CATEGORIES = (_REQUEST, _RESPONSE)

#: the header as construct sees it: bits in the order of Figure 7-19
HEADER = cs.Struct(
    "category_byte"
    / cs.BitStruct("reserved" / cs.BitsInteger(4), "category" / cs.BitsInteger(4))
    * "bits 3:0 category (0 request, 1 response), bits 7:4 reserved",
    "tag" / cs.Int8ul * "chosen by the requester, echoed in the response",
    "reserved" / cs.Int8ul * "reserved, zero",
    "command" / cs.Int8ul * "opcode bits 7:0",
    "command_set" / cs.Int8ul * "opcode bits 15:8",
    "length"
    / cs.ByteSwapped(
        cs.BitStruct(
            "background" / cs.Flag,
            "reserved" / cs.BitsInteger(2),
            "payload_length" / cs.BitsInteger(21),
        )
    )
    * "bits 20:0 payload length in bytes (LE), 22:21 reserved, 23 background operation",
    "return_code" / cs.Int16ul * "CXL return code (responses; zero in requests)",
    "ext_status" / cs.Int16ul * "vendor extended status (responses; zero in requests)",
)

# category, tag, reserved, command, command set, length bits 15:0, length byte 2, rc, status
_FAST = struct.Struct("<BBBBBHBHH")


class RawHeader(NamedTuple):
    """The header's fields as stored, before any check (what both decoders produce)."""

    category_reserved: int
    category: int
    tag: int
    reserved: int
    command: int
    command_set: int
    background: bool
    length_reserved: int
    payload_length: int
    return_code: int
    ext_status: int


def unpack_raw(buf: bytes) -> RawHeader:
    """The raw fields of the first 12 bytes of ``buf`` (fast path; ``len(buf) >= 12``)."""
    c, tag, rsv, cmd, cset, lo, hi, rc, vs = _FAST.unpack_from(buf)
    return RawHeader(
        c >> 4, c & 0xF, tag, rsv, cmd, cset, bool(hi >> 7), hi >> 5 & 3, (hi & 0x1F) << 16 | lo,
        rc, vs,
    )  # fmt: skip


def unpack_raw_reference(buf: bytes) -> RawHeader:
    """:func:`unpack_raw` through the construct definition :data:`HEADER` (slow path)."""
    h: Any = HEADER.parse(buf[:HEADER_BYTES])
    return RawHeader(
        h.category_byte.reserved, h.category_byte.category, h.tag, h.reserved, h.command,
        h.command_set, h.length.background, h.length.reserved, h.length.payload_length,
        h.return_code, h.ext_status,
    )  # fmt: skip


class Header(NamedTuple):
    """A checked header: what :func:`check_header` returns."""

    category: Category
    tag: int
    opcode: int
    payload_length: int
    return_code: int = 0
    ext_status: int = 0
    background: bool = False


def _check(raw: RawHeader, max_payload: int) -> Header:
    if raw.category_reserved:
        raise DecodeError(
            "header.category", "reserved bits 7:4 are set", offset=0, expected="bits 7:4 zero"
        )
    if raw.category not in (Category.REQUEST, Category.RESPONSE):
        raise DecodeError(
            "header.category",
            f"unknown category {raw.category}",
            offset=0,
            expected="0 (request) or 1 (response)",
        )
    if raw.reserved:
        raise DecodeError("header.reserved", "reserved byte is not zero", offset=2, expected="0")
    if raw.length_reserved:
        raise DecodeError(
            "header.payload_length",
            "reserved bits 22:21 are set",
            offset=5,
            expected="bits 22:21 zero",
        )
    if raw.payload_length > max_payload:
        raise DecodeError(
            "header.payload_length",
            f"{raw.payload_length} bytes exceeds the cap of {max_payload}",
            offset=5,
            limit=max_payload,
            expected=f"at most {max_payload} bytes",
        )
    category = _CATEGORIES[raw.category]
    if category is Category.REQUEST and (raw.return_code or raw.ext_status):
        field = "return_code" if raw.return_code else "ext_status"
        raise DecodeError(
            f"header.{field}",
            "must be zero in a request",
            offset=8 if raw.return_code else 10,
            expected="0",
        )
    return Header(
        category,
        raw.tag,
        raw.command_set << 8 | raw.command,
        raw.payload_length,
        raw.return_code,
        raw.ext_status,
        raw.background,
    )


def check_header(buf: bytes, *, max_payload: int = MAX_PAYLOAD) -> Header:
    """Check the 12-byte header at the start of ``buf`` and nothing else: the cheap test
    the firmware applies before it copies or parses a payload.

    Raises:
        DecodeError: fewer than 12 bytes; a reserved bit or byte set; an unknown category;
            a declared payload longer than ``max_payload``; a request with a non-zero
            return code or extended status. The error names the header field.
    """
    if len(buf) < HEADER_BYTES:
        raise DecodeError(
            "header",
            f"truncated: {len(buf)} of {HEADER_BYTES} bytes",
            offset=0,
            limit=HEADER_BYTES,
            expected=f"{HEADER_BYTES} bytes",
        )
    c, tag, rsv, cmd, cset, lo, hi, rc, vs = _FAST.unpack_from(buf)
    n = (hi & 0x1F) << 16 | lo
    # The common case, every field valid, in one test; anything else goes through _check,
    # which names the field at fault.
    if not rsv and not hi & 0x60 and n <= max_payload and (c == 1 or (c == 0 and not rc | vs)):
        return Header(_CATEGORIES[c], tag, cset << 8 | cmd, n, rc, vs, hi >= 0x80)
    return _check(unpack_raw(buf), max_payload)


class Message(NamedTuple):
    """One CCI message: a request (``category`` REQUEST) or a response.

    ``opcode`` is ``command_set << 8 | command`` (e.g. 5400h: set 54h, command 00h).
    Immutable; a named tuple rather than a frozen dataclass because one is built on
    every hop of every round trip, and a tuple costs a quarter as much to build.
    """

    category: Category
    tag: int
    opcode: int
    payload: bytes = b""
    return_code: int = 0
    ext_status: int = 0
    background: bool = False

    @property
    def command(self) -> int:
        return self.opcode & 0xFF

    @property
    def command_set(self) -> int:
        return self.opcode >> 8

    def encode(self, *, max_payload: int = MAX_PAYLOAD) -> bytes:
        """The message's bytes. Raises :class:`EncodeError` naming the field out of range
        (a payload over ``max_payload`` included)."""
        category, tag, opcode, payload, rc, vs, background = self
        # The common case in one test (plain ints in range, a known category, a payload
        # under the cap); anything else takes the checks, which name the field at fault.
        if not (
            type(tag) is int and 0 <= tag <= 0xFF
            and type(opcode) is int and 0 <= opcode <= 0xFFFF
            and type(rc) is int and 0 <= rc <= 0xFFFF
            and type(vs) is int and 0 <= vs <= 0xFFFF
            and (category is _RESPONSE or (category is _REQUEST and not rc | vs))
            and type(payload) is bytes
            and len(payload) <= max_payload and len(payload) <= FORMAT_MAX_PAYLOAD
        ):  # fmt: skip
            self._check_fields(max_payload)
        n = len(payload)
        head = _FAST.pack(
            category, tag, 0, opcode & 0xFF, opcode >> 8, n & 0xFFFF,
            n >> 16 | (0x80 if background else 0), rc, vs,
        )  # fmt: skip
        return head + bytes(payload)

    def _check_fields(self, max_payload: int) -> None:
        """Raise the EncodeError that names the first header field out of range."""
        for name, value, hi in (
            ("tag", self.tag, 0xFF),
            ("opcode", self.opcode, 0xFFFF),
            ("return_code", self.return_code, 0xFFFF),
            ("ext_status", self.ext_status, 0xFFFF),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
                raise EncodeError(f"header.{name}", f"{value!r} is not in 0..{hi}", limit=hi)
        try:
            category = Category(self.category)
        except ValueError:
            raise EncodeError("header.category", f"unknown category {self.category!r}") from None
        if category is Category.REQUEST and (self.return_code or self.ext_status):
            raise EncodeError("header.return_code", "must be zero in a request", expected="0")
        n = len(self.payload)
        cap = min(max_payload, FORMAT_MAX_PAYLOAD)
        if n > cap:
            raise EncodeError(
                "header.payload_length", f"{n} bytes exceeds the cap of {cap}", limit=cap
            )

    @classmethod
    def decode(cls, buf: bytes, *, max_payload: int = MAX_PAYLOAD) -> Message:
        """Decode one whole message. Raises :class:`DecodeError`: everything
        :func:`check_header` refuses, plus a declared payload length that disagrees
        with the bytes that follow the header."""
        actual = len(buf) - HEADER_BYTES
        if actual >= 0:  # the common case, a valid message, in one test (as check_header)
            c, tag, rsv, cmd, cset, lo, hi, rc, vs = _FAST.unpack_from(buf)
            n = (hi & 0x1F) << 16 | lo
            if (
                not rsv and not hi & 0x60 and n == actual and n <= max_payload
                and (c == 1 or (c == 0 and not rc | vs))
            ):  # fmt: skip
                return cls(
                    _CATEGORIES[c], tag, cset << 8 | cmd, bytes(buf[HEADER_BYTES:]), rc, vs,
                    hi >= 0x80,
                )  # fmt: skip
        h = check_header(buf, max_payload=max_payload)
        if actual != h.payload_length:
            raise DecodeError(
                "header.payload_length",
                f"declares {h.payload_length} bytes but {actual} follow the header",
                offset=5,
                limit=actual,
                expected=f"{actual}",
            )
        return cls(
            h.category,
            h.tag,
            h.opcode,
            bytes(buf[HEADER_BYTES:]),
            h.return_code,
            h.ext_status,
            h.background,
        )

    def reply(self, payload: bytes = b"", return_code: int = 0, ext_status: int = 0) -> Message:
        """The response to this request: same tag and opcode."""
        return Message(_RESPONSE, self.tag, self.opcode, payload, return_code, ext_status)


def _plain_bytes(category: int, tag: int, opcode: int, payload: bytes, cap: int) -> bytes | None:
    """The bytes of a message whose return code, extended status and background bit are
    zero, or None when a field is not a plain in-range value (:meth:`Message.encode` then
    names it)."""
    n = len(payload)
    if (
        type(tag) is int and 0 <= tag <= 0xFF
        and type(opcode) is int and 0 <= opcode <= 0xFFFF
        and type(payload) is bytes and n <= cap and n <= FORMAT_MAX_PAYLOAD
    ):  # fmt: skip
        head = _FAST.pack(category, tag, 0, opcode & 0xFF, opcode >> 8, n & 0xFFFF, n >> 16, 0, 0)
        return head + payload
    return None


def success_bytes(request: Message, payload: bytes, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """``request.reply(payload).encode(max_payload=...)``, the bytes of a success
    response, without building the reply first: it is on the path of every answer.
    Raises :class:`EncodeError` as :meth:`Message.encode` does."""
    data = _plain_bytes(1, request.tag, request.opcode, payload, max_payload)
    return request.reply(payload).encode(max_payload=max_payload) if data is None else data


def request_bytes(
    tag: int, opcode: int, payload: bytes, *, max_payload: int = MAX_PAYLOAD
) -> bytes:
    """``Message(Category.REQUEST, tag, opcode, payload).encode(max_payload=...)``, the
    bytes of a request, without building the message first: a VM sends one per call.
    Raises :class:`EncodeError` as :meth:`Message.encode` does."""
    data = _plain_bytes(0, tag, opcode, payload, max_payload)
    if data is None:
        return Message(_REQUEST, tag, opcode, payload).encode(max_payload=max_payload)
    return data


__all__ = [
    "FORMAT_MAX_PAYLOAD",
    "HEADER",
    "HEADER_BYTES",
    "MAX_PAYLOAD",
    "Category",
    "Header",
    "Message",
    "RawHeader",
    "check_header",
    "request_bytes",
    "success_bytes",
    "unpack_raw",
    "unpack_raw_reference",
]
