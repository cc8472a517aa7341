"""The authentication envelope around a CCI message on a VM mailbox.

CXL's CCI message has no room for authentication, and CXL tooling must still be able to
read our traffic, so the message travels unchanged and the envelope is a trailer after it::

    frame = message || seq (u64 LE) || tag (32 bytes)
    tag   = HMAC-SHA256(vm_key, domain || vm_id || 0x00 || seq (u64 LE) || message)

``domain`` separates directions (``SFAB1-REQ`` / ``SFAB1-RSP``), so a response can never be
replayed as a request. ``seq`` is the VM's request counter: strictly increasing, checked by
the firmware (a replayed or reordered request carries a number already seen) and echoed
in the response, which is sealed with the same key so the VM can trust it came from the
firmware and answers *this* request. The key is the VM's 32-byte credential, provisioned by
the administrator (``slicefab vm add``); the VM id is bound in the MAC so that one VM's
frame is never valid on another VM's mailbox, even if keys were equal.

Everything here is pure computation: no I/O, no clock, no state.
"""

from __future__ import annotations

import hmac
import struct

KEY_BYTES = 32
TAG_BYTES = 32
SEQ_BYTES = 8
TRAILER_BYTES = SEQ_BYTES + TAG_BYTES
MAX_SEQ = (1 << 64) - 1

REQUEST_DOMAIN = b"SFAB1-REQ"
RESPONSE_DOMAIN = b"SFAB1-RSP"

_SEQ = struct.Struct("<Q")


class EnvelopeError(ValueError):
    """A frame too short for its trailer, or a key or sequence number out of range."""


class BadTag(EnvelopeError):
    """The MAC does not verify: wrong key, wrong VM, or a modified frame."""


def _tag(key: bytes, domain: bytes, vm_id: str, seq: int, message: bytes) -> bytes:
    # hmac.digest is OpenSSL's one-shot HMAC: a fraction of the cost of an hmac.new object
    # fed piece by piece, on the path of every request and response.
    data = b"".join((domain, vm_id.encode(), b"\x00", _SEQ.pack(seq), message))
    return hmac.digest(key, data, "sha256")


def _check(key: bytes, seq: int) -> None:
    if len(key) != KEY_BYTES:
        raise EnvelopeError(f"key: expected {KEY_BYTES} bytes, got {len(key)}")
    if not 0 <= seq <= MAX_SEQ:
        raise EnvelopeError(f"seq: {seq} is outside 0..2^64-1")


def seal(key: bytes, domain: bytes, vm_id: str, seq: int, message: bytes) -> bytes:
    """``message || seq || tag`` for ``domain`` (REQUEST_DOMAIN or RESPONSE_DOMAIN)."""
    _check(key, seq)
    return message + _SEQ.pack(seq) + _tag(key, domain, vm_id, seq, message)


def split(frame: bytes) -> tuple[bytes, int, bytes]:
    """``(message, seq, tag)`` of a frame, without verifying anything."""
    if len(frame) < TRAILER_BYTES:
        raise EnvelopeError(
            f"frame: {len(frame)} bytes is shorter than the {TRAILER_BYTES}-byte trailer"
        )
    message = frame[:-TRAILER_BYTES]
    (seq,) = _SEQ.unpack_from(frame, len(frame) - TRAILER_BYTES)
    return message, seq, frame[-TAG_BYTES:]


def open_sealed(key: bytes, domain: bytes, vm_id: str, frame: bytes) -> tuple[bytes, int]:
    """Verify a sealed frame; returns ``(message, seq)``.

    Raises:
        EnvelopeError: the frame is too short or the key has the wrong size.
        BadTag: the tag does not verify (compared in constant time).
    """
    message, seq, tag = split(frame)
    _check(key, seq)
    if not hmac.compare_digest(tag, _tag(key, domain, vm_id, seq, message)):
        raise BadTag("frame: authentication tag does not verify")
    return message, seq
