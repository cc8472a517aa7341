"""Property tests of the ABI: every message round-trips, construct and the fast path agree,
and malformed input only ever raises DecodeError naming the field.

Payload values are drawn from each layout's own description (abi.layout.Field), so a new
command is covered the moment it enters the table.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from abi.cci import (
    FORMAT_MAX_PAYLOAD,
    HEADER,
    HEADER_BYTES,
    MAX_PAYLOAD,
    Category,
    Message,
    check_header,
    request_bytes,
    success_bytes,
    unpack_raw,
    unpack_raw_reference,
)
from abi.commands import (
    COMMANDS,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from abi.errors import DecodeError, EncodeError, UnknownOpcode
from abi.examples import EXAMPLES, TAG
from abi.layout import Field, Layout
from abi.retcodes import ERROR_DETAIL

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LAYOUTS: dict[str, Layout] = {ERROR_DETAIL.name: ERROR_DETAIL}
for _cmd in COMMANDS.values():
    LAYOUTS.setdefault(_cmd.request.name, _cmd.request)
    LAYOUTS.setdefault(_cmd.response.name, _cmd.response)


# ------------------------------------------------------------------ strategies


def _text(limit: int, *, no_nul: bool = False, nonempty: bool = False) -> st.SearchStrategy[str]:
    chars = st.characters(codec="utf-8", exclude_characters="\x00" if no_nul else "")
    return st.text(chars, min_size=1 if nonempty else 0, max_size=max(1, limit // 4)).filter(
        lambda s: len(s.encode("utf-8")) <= limit
    )


def value_of(f: Field) -> st.SearchStrategy[Any]:
    """Any value the layout field accepts."""
    kind = f.kind
    if kind == "uint":
        return st.integers(0, (1 << f.bits) - 1)
    if kind == "bytes":
        return st.binary(min_size=f.size or 0, max_size=f.size or 0)
    if kind == "rest":
        return st.binary(max_size=64)
    if kind == "text":
        assert f.limit is not None
        text = _text(f.limit, nonempty=f.optional)
        return st.none() | text if f.optional else text
    if kind == "fixed_text":
        text = _text(f.size or 0, no_nul=True, nonempty=f.optional)
        return st.none() | text if f.optional else text
    if kind == "choice":
        return st.sampled_from([v for _, v in f.values])
    if kind == "flags":
        return st.fixed_dictionaries(
            {name: st.booleans() if vals is None else st.sampled_from([v for _, v in vals])
             for _, name, vals in f.values}
        )  # fmt: skip
    if kind == "struct":
        return st.fixed_dictionaries({c.name: value_of(c) for c in f.children if c.public})
    if kind == "list":
        assert f.limit is not None
        return st.lists(value_of(f.children[0]), max_size=min(f.limit, 3))
    if kind == "optional":
        return st.none() | value_of(f.children[0])
    if kind == "flag":
        return st.booleans()
    raise AssertionError(f"no strategy for {kind}")


def payload_of(layout: Layout) -> st.SearchStrategy[dict[str, Any]]:
    return value_of(layout.description)


# ------------------------------------------------------------------ header


messages = st.builds(
    Message,
    category=st.sampled_from(Category),
    tag=st.integers(0, 255),
    opcode=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=64),
    return_code=st.integers(0, 0xFFFF),
    ext_status=st.integers(0, 0xFFFF),
    background=st.booleans(),
).filter(lambda m: m.category is Category.RESPONSE or not (m.return_code or m.ext_status))


@given(messages)
def test_message_round_trip(m: Message) -> None:
    data = m.encode()
    assert len(data) == HEADER_BYTES + len(m.payload)
    assert Message.decode(data) == m
    assert check_header(data).payload_length == len(m.payload)


@given(st.binary(min_size=HEADER_BYTES, max_size=HEADER_BYTES))
def test_fast_header_unpacking_agrees_with_construct(data: bytes) -> None:
    assert unpack_raw(data) == unpack_raw_reference(data)


@given(messages)
def test_fast_header_packing_agrees_with_construct(m: Message) -> None:
    n = len(m.payload)
    reference = HEADER.build(
        {
            "category_byte": {"reserved": 0, "category": int(m.category)},
            "tag": m.tag,
            "reserved": 0,
            "command": m.opcode & 0xFF,
            "command_set": m.opcode >> 8,
            "length": {"background": m.background, "reserved": 0, "payload_length": n},
            "return_code": m.return_code,
            "ext_status": m.ext_status,
        }
    )
    assert m.encode()[:HEADER_BYTES] == reference


def _decode_checked(data: bytes) -> Message | str:
    """Message.decode as check_header defines it (what its one-test shortcut must match):
    the message, or the field of the DecodeError."""
    try:
        h = check_header(data)
    except DecodeError as e:
        return e.field
    if len(data) - HEADER_BYTES != h.payload_length:
        return "header.payload_length"
    return Message(
        h.category, h.tag, h.opcode, data[HEADER_BYTES:], h.return_code, h.ext_status,
        h.background,
    )  # fmt: skip


@given(st.one_of(st.binary(max_size=48), messages.map(Message.encode)), st.data())
def test_decode_shortcut_agrees_with_the_checked_path(data: bytes, more: st.DataObject) -> None:
    if data and more.draw(st.booleans()):  # flip a header bit now and then
        bit = more.draw(st.integers(0, min(len(data), HEADER_BYTES) * 8 - 1))
        data = bytes(b ^ (1 << bit % 8) if i == bit // 8 else b for i, b in enumerate(data))
    try:
        got: Message | str = Message.decode(data)
    except DecodeError as e:
        got = e.field
    assert got == _decode_checked(data)


@given(messages, st.binary(max_size=64))
def test_success_bytes_is_the_encoded_reply(m: Message, payload: bytes) -> None:
    assert success_bytes(m, payload) == m.reply(payload).encode()
    with pytest.raises(EncodeError):
        success_bytes(m, payload + b"x", max_payload=len(payload))


@given(st.integers(-2, 0x101), st.integers(-2, 0x10001), st.binary(max_size=64), st.booleans())
def test_request_bytes_is_the_encoded_request(
    tag: int, opcode: int, payload: bytes, as_bool: bool
) -> None:
    """request_bytes is Message.encode for a request, refusals (out-of-range or bool
    fields, a payload over the cap) included."""
    if as_bool:
        tag = bool(tag & 1)  # a bool is not a tag, even though it packs as one
    try:
        expected: bytes | str = Message(Category.REQUEST, tag, opcode, payload).encode()
    except EncodeError as e:
        expected = e.field
    try:
        got: bytes | str = request_bytes(tag, opcode, payload)
    except EncodeError as e:
        got = e.field
    assert got == expected
    if isinstance(expected, bytes):
        with pytest.raises(EncodeError):
            request_bytes(tag, opcode, payload + b"x", max_payload=len(payload))


@given(st.binary(max_size=40))
def test_decoding_random_bytes_raises_only_decode_error(data: bytes) -> None:
    for decode in (Message.decode, decode_request, decode_response):
        with contextlib.suppress(DecodeError):
            decode(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(COMMANDS)), st.sampled_from(Category), st.binary(max_size=80))
def test_random_payloads_behind_valid_headers(opcode: int, category: Category, body: bytes) -> None:
    """Every opcode's decoder with random payload bytes: a result or DecodeError."""
    wire = Message(category, 1, opcode, body).encode()
    decode = decode_request if category is Category.REQUEST else decode_response
    with contextlib.suppress(DecodeError):
        decode(wire)


GOOD = Message(Category.REQUEST, 1, 0xC201, b"ab").encode()


@pytest.mark.parametrize(
    ("data", "field", "offset"),
    [
        (GOOD[:11], "header", 0),  # truncated header
        (b"", "header", 0),
        (GOOD + b"c", "header.payload_length", 5),  # more bytes than declared
        (GOOD[:-1], "header.payload_length", 5),  # fewer
        (bytes([0x10]) + GOOD[1:], "header.category", 0),  # reserved bits 7:4
        (bytes([0x02]) + GOOD[1:], "header.category", 0),  # unknown category
        (bytes([0x0F]) + GOOD[1:], "header.category", 0),
        (GOOD[:2] + b"\x01" + GOOD[3:], "header.reserved", 2),
        (GOOD[:7] + b"\x20" + GOOD[8:], "header.payload_length", 5),  # bit 21
        (GOOD[:7] + b"\x40" + GOOD[8:], "header.payload_length", 5),  # bit 22
        (GOOD[:8] + b"\x01\x00" + GOOD[10:], "header.return_code", 8),  # in a request
        (GOOD[:10] + b"\x00\x01" + GOOD[12:], "header.ext_status", 10),
    ],
)
def test_malformed_headers_name_the_field(data: bytes, field: str, offset: int) -> None:
    with pytest.raises(DecodeError) as e:
        Message.decode(data)
    assert e.value.field == field
    assert e.value.offset == offset
    assert type(e.value) is DecodeError


def test_oversize_is_refused_from_the_header_alone() -> None:
    header = Message(Category.REQUEST, 1, 0xC201, bytes(MAX_PAYLOAD + 1)).encode(
        max_payload=FORMAT_MAX_PAYLOAD
    )[:HEADER_BYTES]
    with pytest.raises(DecodeError) as e:
        check_header(header)  # only the 12 bytes: the payload was never read
    assert e.value.field == "header.payload_length"
    assert e.value.limit == MAX_PAYLOAD
    assert check_header(header, max_payload=MAX_PAYLOAD + 1).payload_length == MAX_PAYLOAD + 1
    with pytest.raises(EncodeError, match="payload_length"):
        Message(Category.REQUEST, 1, 0xC201, bytes(MAX_PAYLOAD + 1)).encode()


def test_unknown_opcode_and_wrong_category() -> None:
    with pytest.raises(UnknownOpcode) as e:
        decode_request(Message(Category.REQUEST, 1, 0xC0FF).encode())
    assert e.value.field == "header.opcode"
    request = encode_request("NOP", {"data": b""})
    with pytest.raises(DecodeError, match="expected a response"):
        decode_response(request)
    with pytest.raises(DecodeError, match="expected a request"):
        decode_request(encode_response(Message.decode(request), {"data": b""}))
    with pytest.raises(EncodeError):
        encode_request(0xC0FF, {})


@pytest.mark.parametrize(
    "m",
    [
        Message(Category.REQUEST, 256, 0),
        Message(Category.REQUEST, 0, 0x10000),
        Message(Category.REQUEST, 0, 0, return_code=1),
        Message(Category.RESPONSE, 0, 0, return_code=-1),
        Message(Category.RESPONSE, 0, 0, ext_status=True),
        Message(7, 0, 0),  # type: ignore[arg-type]
    ],
)
def test_header_encode_errors(m: Message) -> None:
    with pytest.raises(EncodeError):
        m.encode()


# ------------------------------------------------------------------ payloads


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@FAST
@given(data=st.data())
def test_payload_round_trip(name: str, data: st.DataObject) -> None:
    layout = LAYOUTS[name]
    value = data.draw(payload_of(layout))
    encoded = layout.build_reference(value)  # construct: the definition
    assert layout.build_fast(value) == encoded  # the fast path builds the same bytes
    assert layout.build(value) == encoded
    assert layout.parse_fast(encoded) == value
    assert layout.parse_reference(encoded) == value
    assert layout.parse(encoded) == value


def _mutations(example: bytes) -> st.SearchStrategy[bytes]:
    flip = st.tuples(st.integers(0, max(0, len(example) - 1)), st.integers(1, 255)).map(
        lambda t: (
            example[: t[0]] + bytes([example[t[0]] ^ t[1]]) + example[t[0] + 1 :]
            if example
            else bytes([t[1]])
        )
    )
    cut = st.integers(0, len(example)).map(lambda n: example[:n])
    grow = st.binary(min_size=1, max_size=8).map(lambda b: example + b)
    insert = st.tuples(st.integers(0, len(example)), st.binary(min_size=1, max_size=4)).map(
        lambda t: example[: t[0]] + t[1] + example[t[0] :]
    )
    return st.one_of(flip, cut, grow, insert, st.binary(max_size=64))


EXAMPLE_PAYLOADS = [
    (f"{op:04X}_{kind}", layout, layout.build(EXAMPLES[op][i]))
    for op, cmd in COMMANDS.items()
    for i, (kind, layout) in enumerate((("req", cmd.request), ("rsp", cmd.response)))
]


@pytest.mark.parametrize(
    ("ident", "layout", "example"), EXAMPLE_PAYLOADS, ids=lambda x: x if isinstance(x, str) else ""
)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzzed_payloads_decode_or_raise_decode_error(
    ident: str, layout: Layout, example: bytes, data: st.DataObject
) -> None:
    """Mutated valid payloads: success or DecodeError only, and the fast path and
    construct agree on which (and on the value)."""
    mutated = data.draw(_mutations(example))
    try:
        reference: Any = layout.parse_reference(mutated)
    except DecodeError as error:
        reference = error
    fast = layout.parse_fast(mutated)
    if isinstance(reference, DecodeError):
        assert fast is None, f"the fast path accepts what construct refuses: {reference}"
        with pytest.raises(DecodeError) as raised:
            layout.parse(mutated)
        assert (raised.value.field, raised.value.offset) == (reference.field, reference.offset)
    else:
        assert fast == reference
        assert layout.parse(mutated) == reference


@pytest.mark.parametrize(
    ("ident", "layout", "example"), EXAMPLE_PAYLOADS, ids=lambda x: x if isinstance(x, str) else ""
)
def test_truncated_and_padded_payloads_name_the_field(
    ident: str, layout: Layout, example: bytes
) -> None:
    greedy = any(f.kind == "rest" for f in layout.fields)
    for n in range(len(example)) if not greedy else ():
        with pytest.raises(DecodeError) as e:
            layout.parse(example[:n])
        assert e.value.field.startswith(layout.name)
        assert e.value.offset is not None and e.value.offset <= n
    if not greedy:
        with pytest.raises(DecodeError, match="after the last field") as e:
            layout.parse(example + b"\x00")
        assert e.value.offset == len(example)


def _payload(opcode: int, kind: int = 0) -> tuple[Layout, bytearray]:
    cmd = COMMANDS[opcode]
    layout = cmd.request if kind == 0 else cmd.response
    return layout, bytearray(layout.build(EXAMPLES[opcode][kind]))


@pytest.mark.parametrize(
    ("opcode", "kind", "offset", "value", "field"),
    [
        (0xC000, 0, 1, 0x80, "allocate.request.flags"),  # reserved flag bit 15
        (0x5402, 0, 2, 0x01, "set_ld_allocations.reserved"),
        (0x5401, 1, 1, 0x03, "get_ld_allocations.response.memory_granularity"),
        (0x5604, 0, 2, 0x04, "initiate_dc_add.request.selection_policy"),
        (0x5605, 0, 2, 0x02, "initiate_dc_release.request.flags"),  # removal policy 2
        (0x5605, 0, 2, 0x40, "initiate_dc_release.request.flags"),  # reserved bit 6
        (0x5605, 0, 3, 0x01, "initiate_dc_release.request.reserved"),
        (0x5604, 0, 68, 0x01, "initiate_dc_add.request.extents[0].reserved"),
        (0xC003, 1, 9, 0x07, "slice.state"),  # unknown lifecycle state
        (0x5400, 1, 10, 0x04, "get_ld_info.response.qos_telemetry_capability"),
        (0xC103, 1, 61, 0x02, "lanes.response.endpoints[0].free"),
    ],
)
def test_reserved_and_unknown_values_name_the_field(
    opcode: int, kind: int, offset: int, value: int, field: str
) -> None:
    layout, data = _payload(opcode, kind)
    data[offset] |= value
    with pytest.raises(DecodeError) as e:
        layout.parse(bytes(data))
    assert e.value.field == field
    assert e.value.offset is not None


def test_limits_are_enforced_both_ways() -> None:
    alloc = COMMANDS[0xC000].request
    example = dict(EXAMPLES[0xC000][0])
    with pytest.raises(EncodeError) as e:
        alloc.build({**example, "request_id": "r" * 129})
    assert e.value.field == "allocate.request.request_id" and e.value.limit == 128
    data = bytearray(alloc.build(example))
    rid = data.index(b"req-0001") - 1
    data[rid] = 200  # a declared request_id length over the limit
    with pytest.raises(DecodeError) as d:
        alloc.parse(bytes(data))
    assert d.value.field == "allocate.request.request_id" and d.value.limit == 128
    with pytest.raises(EncodeError, match="limit of 1024"):
        COMMANDS[0xC004].response.build({"total": 0, "next_id": 0, "slices": [{}] * 1025})


@pytest.mark.parametrize(("field", "item"), [("cores", 1), ("extents", {"start": 0, "length": 1})])
def test_list_limits_hold_on_the_fast_path_too(field: str, item: Any) -> None:
    """One valid item over a list's limit: the fast path declines (and construct names
    the limit), whether the list is integers (one struct format) or structs (a loop)."""
    layout = COMMANDS[0xC003].response  # GET: a SLICE, whose alloc has both kinds
    example = EXAMPLES[0xC003][1]
    limit = 4096
    over = {**example, "alloc": {**example["alloc"], field: [item] * (limit + 1)}}
    assert layout.build_fast(over) is None
    with pytest.raises(EncodeError, match=f"limit of {limit}") as e:
        layout.build(over)
    assert e.value.field == f"slice.alloc.{field}"
    at_limit = {**example, "alloc": {**example["alloc"], field: [item] * limit}}
    data = bytearray(layout.build(at_limit))
    count = data.index((limit).to_bytes(2, "little"))  # the list's u16 count prefix
    size = 2 if field == "cores" else 16
    data[count : count + 2] = (limit + 1).to_bytes(2, "little")
    data[count + 2 : count + 2] = bytes(size)  # the extra item's bytes are there
    assert layout.parse_fast(bytes(data)) is None
    with pytest.raises(DecodeError) as d:
        layout.parse(bytes(data))
    assert d.value.field == f"slice.alloc.{field}" and d.value.limit == limit


@pytest.mark.parametrize(
    "change",
    [
        {"name": 5},
        {"ports": 256},
        {"ports": -1},
        {"key": "auto"},
        {"cores": {"count": 1, "same_cluster": 1, "ids": None}},
        {"cores": {"count": 1, "ids": None}},
        {"memory": {"size": 1, "contiguous": False, "extra": 1}},
        {"lanes": {"width": 4, "first": None, "endpoint": ""}},
        {"lanes": {"width": 4, "first": None, "endpoint": "x" * 33}},
        {"lanes": {"width": 4, "first": None, "endpoint": "a\x00b"}},
        {"qos": None},
        {"request_id": ""},
        {"owner": "vm-a"},
        {"name": "\ud800"},
    ],
)
def test_bad_values_raise_encode_error_naming_the_field(change: dict[str, Any]) -> None:
    alloc = COMMANDS[0xC000].request
    value = {**EXAMPLES[0xC000][0], **change}
    with pytest.raises(EncodeError) as e:
        alloc.build(value)
    with pytest.raises(EncodeError) as r:
        alloc.build_reference(value)
    assert e.value.field == r.value.field
    assert e.value.field.startswith("allocate.request")
    key = next(iter(change))
    assert key in e.value.field or key in e.value.message


@FAST
@given(st.sampled_from(sorted(COMMANDS)), st.data())
def test_junk_values_raise_only_encode_error(opcode: int, data: st.DataObject) -> None:
    """A valid example with one top-level field replaced by junk: EncodeError or success,
    and both paths agree."""
    layout = COMMANDS[opcode].request
    example = dict(EXAMPLES[opcode][0])
    assume(example)
    key = data.draw(st.sampled_from(sorted(example)))
    junk = data.draw(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=5),
            st.binary(max_size=5),
            st.booleans(),
            st.lists(st.integers(0, 3), max_size=3),
            st.dictionaries(st.text(max_size=3), st.integers()),
        )
    )
    value = {**example, key: junk}
    try:
        reference: Any = layout.build_reference(value)
    except EncodeError as error:
        reference = error
    fast = layout.build_fast(value)
    if isinstance(reference, EncodeError):
        assert fast is None, f"the fast path encodes what construct refuses: {reference}"
        with pytest.raises(EncodeError) as raised:
            layout.build(value)
        assert raised.value.field == reference.field
    else:
        assert fast == reference


@FAST
@given(st.sampled_from(sorted(COMMANDS)), st.integers(0, 255), st.data())
def test_whole_request_and_response_round_trip(opcode: int, tag: int, data: st.DataObject) -> None:
    cmd = COMMANDS[opcode]
    req = data.draw(payload_of(cmd.request))
    rsp = data.draw(payload_of(cmd.response))
    try:
        wire = encode_request(opcode, req, tag=tag)
    except EncodeError:
        assume(False)  # a drawn payload over the mailbox cap
    request = decode_request(wire)
    assert (request.command, request.message.tag, request.payload) == (cmd, tag, req)
    try:
        answer = encode_response(request.message, rsp)
    except EncodeError:
        assume(False)
    response = decode_response(answer)
    assert response.ok and response.payload == rsp and response.message.tag == tag


def test_examples_use_the_shared_tag() -> None:
    assert decode_request(encode_request("NOP", {"data": b"x"}, tag=TAG)).message.tag == TAG
