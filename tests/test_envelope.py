"""The authentication envelope: sealed frames verify, and every tampering is caught."""

from __future__ import annotations

import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from abi.envelope import (
    KEY_BYTES,
    REQUEST_DOMAIN,
    RESPONSE_DOMAIN,
    TAG_BYTES,
    TRAILER_BYTES,
    BadTag,
    EnvelopeError,
    open_sealed,
    seal,
    verify,
)

KEY = bytes(range(32))


@given(st.binary(max_size=512), st.integers(0, 2**64 - 1))
def test_sealed_frames_open(message: bytes, seq: int) -> None:
    frame = seal(KEY, REQUEST_DOMAIN, "vm-a", seq, message)
    assert len(frame) == len(message) + TRAILER_BYTES
    assert open_sealed(KEY, REQUEST_DOMAIN, "vm-a", frame) == (message, seq)


@given(st.binary(min_size=1, max_size=64), st.data())
def test_any_flipped_bit_is_caught(message: bytes, data: st.DataObject) -> None:
    frame = bytearray(seal(KEY, REQUEST_DOMAIN, "vm-a", 7, message))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(BadTag):
        open_sealed(KEY, REQUEST_DOMAIN, "vm-a", bytes(frame))


def test_bound_to_key_vm_and_direction() -> None:
    frame = seal(KEY, REQUEST_DOMAIN, "vm-a", 1, b"hello")
    with pytest.raises(BadTag):
        open_sealed(bytes(32), REQUEST_DOMAIN, "vm-a", frame)  # another key
    with pytest.raises(BadTag):
        open_sealed(KEY, REQUEST_DOMAIN, "vm-b", frame)  # another VM's mailbox
    with pytest.raises(BadTag):
        open_sealed(KEY, RESPONSE_DOMAIN, "vm-a", frame)  # a request is not a response


def test_malformed_input() -> None:
    with pytest.raises(EnvelopeError, match="shorter than"):
        open_sealed(KEY, REQUEST_DOMAIN, "vm-a", b"x" * (TRAILER_BYTES - 1))
    with pytest.raises(EnvelopeError, match="key"):
        seal(b"short", REQUEST_DOMAIN, "vm-a", 1, b"")
    with pytest.raises(EnvelopeError, match="seq"):
        seal(KEY, REQUEST_DOMAIN, "vm-a", -1, b"")


@given(
    st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES),
    st.sampled_from([REQUEST_DOMAIN, RESPONSE_DOMAIN]),
    st.text(min_size=1, max_size=64),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=300),
)
def test_the_tag_is_rfc2104_hmac_sha256(
    key: bytes, domain: bytes, vm: str, seq: int, message: bytes
) -> None:
    """The tag is computed from cached HMAC pads; it must equal the library's HMAC of the
    documented input, byte for byte (the wire format of every sealed frame)."""
    data = domain + vm.encode() + b"\x00" + seq.to_bytes(8, "little") + message
    want = hmac.digest(key, data, "sha256")
    assert seal(key, domain, vm, seq, message)[-TAG_BYTES:] == want
    assert open_sealed(key, domain, vm, seal(key, domain, vm, seq, message)) == (message, seq)


@given(st.binary(max_size=256), st.integers(0, 2**64 - 1), st.data())
def test_verify_gives_the_seq_of_a_sealed_frame_and_none_for_any_change(
    message: bytes, seq: int, data: st.DataObject
) -> None:
    frame = seal(KEY, REQUEST_DOMAIN, "vm-a", seq, message)
    assert verify(KEY, REQUEST_DOMAIN, "vm-a", frame) == seq
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    tampered = bytearray(frame)
    tampered[bit // 8] ^= 1 << (bit % 8)
    assert verify(KEY, REQUEST_DOMAIN, "vm-a", bytes(tampered)) is None
    assert verify(KEY, RESPONSE_DOMAIN, "vm-a", frame) is None
    assert verify(KEY, REQUEST_DOMAIN, "vm-b", frame) is None


def test_verify_refuses_what_open_sealed_refuses() -> None:
    with pytest.raises(EnvelopeError, match="trailer"):
        verify(KEY, REQUEST_DOMAIN, "vm-a", b"x" * (TRAILER_BYTES - 1))
    with pytest.raises(EnvelopeError, match="key"):
        verify(KEY[:-1], REQUEST_DOMAIN, "vm-a", seal(KEY, REQUEST_DOMAIN, "vm-a", 1, b""))
